"""Timing compiled steps side by side.

Each sample runs ``k`` calls back to back (each call's outputs feed the next,
as in training) and waits for the last one with ``block_until_ready``; the
sample's time over the ``k * steps_per_call`` steps it ran is one per-step
time. ``k`` is chosen per runner so a sample lasts at least ``min_sample_s``
(1 for any call slower than that).
The runners take turns, one sample each per round, in an order that rotates
from round to round, so a change in the machine's load touches them alike.
Each sample starts after ``settle_s`` seconds of sleep, so that what one
runner leaves behind does not land in the next one's sample: on a CPU, XLA's
threads go on freeing ``jax.jit(optax.lars)``'s temporaries (306 MB on
ResNet-50) in the kernel for about 10 ms after its step has returned, and a
step timed in that window shares the cores with it. The rotation alone does
not even that out (with four runners, one follows optax in a quarter of the
rounds and another never does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from bench.steps import Runner, on_device


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step times of one runner, in seconds.

    Attributes:
      median, p25, p75, min, max: Statistics of the samples' per-step times.
      samples: The number of samples.
      steps_per_sample: Steps per sample (``k`` calls of ``steps_per_call``).
      issue_median: The median over the samples of the per-step time until
        the sample's last call had returned (``Runner.run``): the calling
        thread's part.
    """

    median: float
    p25: float
    p75: float
    min: float
    max: float
    samples: int
    steps_per_sample: int
    issue_median: float = math.nan

    @classmethod
    def of(cls, per_step: Sequence[float], k: int, issued: Sequence[float] = ()) -> Timing:
        """Statistics of ``per_step`` times (and of the ``issued`` parts)."""
        a = np.asarray(per_step, dtype=np.float64)
        return cls(
            median=float(np.median(a)),
            p25=float(np.percentile(a, 25)),
            p75=float(np.percentile(a, 75)),
            min=float(a.min()),
            max=float(a.max()),
            samples=int(a.size),
            steps_per_sample=k,
            issue_median=float(np.median(issued)) if len(issued) else math.nan,
        )


def clock(runner: Runner, calls: int) -> tuple[float, float]:
    """(seconds to run ``calls`` calls and wait for the last, seconds until the last was issued)."""
    with on_device(runner.name):  # the watchers are told outside the timed interval
        start = time.perf_counter()
        issued = runner.run(calls)
        return time.perf_counter() - start, issued


def time_runners(
    runners: Sequence[Runner],
    *,
    warmup: int,
    rounds: int,
    min_sample_s: float,
    max_calls_per_sample: int = 200,
    budget_s: float | None = None,
    settle_s: float = 0.0,
) -> dict[str, Timing]:
    """Times the runners' steps, interleaved (see the module doc).

    Args:
      runners: Compiled steps, already run once.
      warmup: Untimed calls per runner first.
      rounds: Samples per runner (fewer if ``budget_s`` runs out, at least 3).
      min_sample_s: The shortest a sample should last.
      max_calls_per_sample: Upper bound on ``k``.
      budget_s: Stop taking rounds after this many seconds (after 3 rounds).
      settle_s: Seconds of sleep before each sample (not timed).

    Returns:
      {runner name: Timing}.
    """
    calls_per_sample = {}
    for r in runners:
        if warmup:
            r.run(warmup)
        one = min(clock(r, 1)[0] for _ in range(2))
        k = 1 if one >= min_sample_s else math.ceil(min_sample_s / max(one, 1e-7))
        calls_per_sample[r.name] = max(1, min(k, max_calls_per_sample))
    per_step: dict[str, list[float]] = {r.name: [] for r in runners}
    issued: dict[str, list[float]] = {r.name: [] for r in runners}
    start = time.perf_counter()
    for i in range(rounds):
        shift = i % len(runners)
        for r in [*runners[shift:], *runners[:shift]]:
            k = calls_per_sample[r.name]
            if settle_s > 0:
                time.sleep(settle_s)
            total, issue = clock(r, k)
            per_step[r.name].append(total / (k * r.steps_per_call))
            issued[r.name].append(issue / (k * r.steps_per_call))
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    per_call = {r.name: r.steps_per_call for r in runners}
    return {
        name: Timing.of(ts, calls_per_sample[name] * per_call[name], issued[name])
        for name, ts in per_step.items()
    }
