"""Measures one workload with one gradient dtype: every step, one row each."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import device_trace, steps, timing
from bench.workloads import Workload

# The most device events (launches) a traced sample may hold (``_traces``):
# the profiler's records and their reading grow with them. At 100 steps a
# call on ResNet-50: 3 calls of an in-place step (3 to 10 launches a step),
# one of an update form (about 165); not optax (851) nor the reference (552).
TRACE_MAX_EVENTS = 20_000

# Row dtype label -> gradient dtype (params and momentum are always float32).
DTYPES: dict[str, Any] = {"fp32": jnp.float32, "bf16-grads": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to time each step.

    Attributes:
      warmup: Untimed steps per runner after the first.
      rounds: Samples per runner.
      min_sample_s: Shortest sample (see ``bench.timing``).
      budget_s: Stop sampling a workload after this many seconds (>= 3 rounds).
      settle_s: Sleep before each sample (see ``bench.timing``).
      slow_factor: A backend whose step takes more than this many times
        optax's is timed on one step and skipped on the workloads that follow
        (0: never).
      max_compile_s: A backend is skipped on a workload where its compile
        time, estimated from optax's there and the largest ratio of the two
        seen so far, would exceed this (0: never).
      steps_per_call: Steps per jitted call of every LARS row, optax's
        included (``bench.steps``): 1 times each step as its own call; K > 1
        times K steps in one jitted loop, a step's share of a jitted training
        loop. The ``copy`` row is always one copy per call; with K > 1 a
        ``copy-loop`` row times K copies in one loop, and the floor
        (``floor_ms``, ``frac_of_floor``) is the faster of the two.
      compile_workers: How many steps are compiled at once (XLA compiles
        without holding the GIL); every compile ends before any timing starts.
        ``compile_s`` of a step compiled beside others is longer than alone.
      trace_calls: > 0: after the timing, one more sample of each step (at
        most this many calls, and no more than its timed samples had) runs
        under ``jax.profiler`` and its row gets the device's timeline
        (``bench.device_trace``: the ``trace_*`` keys, or ``trace_note``).
    """

    warmup: int = 5
    rounds: int = 30
    min_sample_s: float = 0.02
    budget_s: float = 30.0
    settle_s: float = 0.05
    slow_factor: float = 25.0
    max_compile_s: float = 300.0
    steps_per_call: int = 1
    compile_workers: int = 1
    trace_calls: int = 0


@dataclasses.dataclass
class History:
    """What the workloads measured so far showed about each backend.

    The command line measures the smallest workloads first and passes the same
    ``History`` to every call, so an interpreter-speed backend (e.g. Pallas in
    interpret mode on a CPU) is found on a small workload and not compiled or
    run on the large ones.

    Attributes:
      skip: Backend -> reason: skipped from now on.
      compile_ratio: Backend -> the largest (its compile time / optax's) seen.
    """

    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    compile_ratio: dict[str, float] = dataclasses.field(default_factory=dict)


def bytes_per_param(dtype: str) -> int:
    """Bytes a LARS step must move per parameter: read w, g, v, write w, v."""
    grad_bytes = np.dtype(DTYPES[dtype]).itemsize
    return 4 + grad_bytes + 4 + 4 + 4


def host_arrays(
    shapes: Sequence[tuple[int, ...]], dtype: Any, scale: float, phase: float
) -> list[np.ndarray]:
    """Deterministic, varied values on the host, one array per shape.

    Array ``j`` holds ``scale * sin(0.7 * i + phase + j)`` for element ``i``:
    values spread over [-scale, scale] with non-zero norms, cheap to make and
    the same on every machine.
    """
    out = []
    for j, shape in enumerate(shapes):
        i = np.arange(math.prod(shape), dtype=np.float32)
        values = scale * np.sin(np.float32(0.7) * i + np.float32(phase + j))
        out.append(values.astype(dtype).reshape(shape))
    return out


def _error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def measure(
    workload: Workload,
    dtype: str,
    backends: Sequence[str],
    settings: Settings,
    history: History | None = None,
    on_timed: Callable[[list[dict[str, Any]]], None] | None = None,
    deferred: list[Callable[[], None]] | None = None,
) -> list[dict[str, Any]]:
    """Times optax, each backend and the copy floor on one workload.

    Args:
      workload: The parameter shapes.
      dtype: A key of ``DTYPES``.
      backends: ``lars`` backend names.
      settings: Timing settings.
      history: What earlier workloads showed; updated in place.
      on_timed: Called with the rows once they are timed, before the trace
        (``settings.trace_calls``), which then adds its columns to the same
        dicts: a caller that saves them keeps the timing if the trace fails.
      deferred: Where given, the trace is not run here: a call that runs it
        (adds its columns to the rows, then drops the steps' buffers) is
        appended, for the caller to run after its other timings, since
        nothing should be timed in a process after the profiler has run.

    Returns:
      One dict of the measured columns of ``bench.report.COLUMNS`` per step:
      "optax", each backend, "copy". A backend that fails to compile or run, or
      is skipped, gets a row with NaN figures and the reason in ``note``; one
      whose second step took more than ``settings.slow_factor`` times optax's
      is timed on that step alone (``samples`` = 1) and skipped from then on.
    """
    history = History() if history is None else history
    # float32 params (scale 0.05) and gradients (scale 1e-3); every step gets
    # its own device copy of the params (device_put copies), the grads are shared.
    params0 = host_arrays(workload.shapes, np.float32, 0.05, 0.0)
    grads = jax.device_put(host_arrays(workload.shapes, DTYPES[dtype], 1e-3, 0.5))
    moved = workload.n_params * bytes_per_param(dtype)
    names = [steps.OPTAX, *backends]
    runners: dict[str, steps.Runner] = {}
    notes: dict[str, str] = {}
    diffs: dict[str, float] = {}
    spc = settings.steps_per_call
    workers = max(1, settings.compile_workers)
    # Lowering traces Python, here, while the programs lowered before compile,
    # ``workers`` at a time. A skip estimate needs optax's compile time first.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        optax_program = steps.lars_program(steps.OPTAX, jax.device_put(params0), grads, spc)
        optax_future = pool.submit(optax_program.compile)
        known = any(history.compile_ratio.get(b) for b in backends)
        estimate = settings.max_compile_s > 0 and known
        optax_compile = max(optax_future.result().compile_s, 1e-3) if estimate else 0.0
        futures: dict[str, concurrent.futures.Future] = {}
        for name in backends:
            ratio = history.compile_ratio.get(name)
            if name in history.skip:
                notes[name] = f"skipped: {history.skip[name]}"
                continue
            if estimate and ratio and ratio * optax_compile > settings.max_compile_s:
                notes[name] = (
                    f"skipped: compiling would take about {ratio * optax_compile:.0f} s "
                    f"({ratio:.1f}x optax's {optax_compile:.1f} s; "
                    f"limit {settings.max_compile_s:g} s)"
                )
                continue
            try:
                program = steps.lars_program(name, jax.device_put(params0), grads, spc)
            except Exception as e:
                notes[name] = "compile failed: " + _error(e)
                continue
            futures[name] = pool.submit(program.compile)
        floors = [steps.copy_program(moved)] + ([steps.copy_program(moved, spc)] if spc > 1 else [])
        for program in floors:
            futures[program.name] = pool.submit(program.compile)
        runners[steps.OPTAX] = optax_future.result()
        optax_compile = max(runners[steps.OPTAX].compile_s, 1e-3)
        for name, future in futures.items():
            if name not in backends:  # the copy floors: a failure is the harness's
                runners[name] = future.result()
                continue
            try:
                runners[name] = future.result()
            except Exception as e:
                notes[name] = "compile failed: " + _error(e)
                continue
            ratio = history.compile_ratio.get(name)
            history.compile_ratio[name] = max(ratio or 0.0, runners[name].compile_s / optax_compile)
    del futures, floors

    # First call of each, from the same params: the updates must agree with optax.
    runners[steps.OPTAX].run(1)
    reference = steps.first_update(runners[steps.OPTAX], params0)
    diffs[steps.OPTAX] = 0.0
    for name in backends:
        if name not in runners:
            continue
        try:
            runners[name].run(1)
            diffs[name] = steps.rel_diff(runners[name], params0, reference)
        except Exception as e:
            notes[name] = "run failed: " + _error(e)
            runners.pop(name).release()
    for name in (steps.COPY, steps.COPY_LOOP):
        if name in runners:
            runners[name].run(1)
    del reference, params0
    copy = runners[steps.COPY]
    if not np.isnan(copy.bytes_xla) and copy.bytes_xla < 0.99 * 2 * (moved // 8) * 4:
        notes[steps.COPY] = f"XLA reports only {copy.bytes_xla:.0f} bytes accessed"

    # A second call of each: a backend far slower than optax is timed on it alone.
    second = {name: timing.clock(r, 1)[0] / r.steps_per_call for name, r in runners.items()}
    slow: set[str] = set()
    timings: dict[str, timing.Timing] = {}
    if settings.slow_factor > 0:
        limit = settings.slow_factor * max(second[steps.OPTAX], 1e-4)
        for name in backends:
            if name in runners and second[name] > limit:
                ratio = second[name] / second[steps.OPTAX]
                slow.add(name)
                history.skip[name] = f"{ratio:.0f}x slower than optax on {workload.name} {dtype}"
                notes[name] = f"slow: one call timed ({ratio:.0f}x optax's)"
                timings[name] = timing.Timing.of([second[name]], spc)
    timings.update(
        timing.time_runners(
            [r for name, r in runners.items() if name not in slow],
            warmup=settings.warmup,
            rounds=settings.rounds,
            min_sample_s=settings.min_sample_s,
            budget_s=settings.budget_s,
            settle_s=settings.settle_s,
        )
    )
    copy_s = timings[steps.COPY].median
    # The floor: the faster of the copy alone and the copy in the step's loop,
    # so that a copy slowed by what one call costs does not flatter the steps.
    floor_s = min(timings[n].median for n in (steps.COPY, steps.COPY_LOOP) if n in timings)
    optax_s = timings[steps.OPTAX].median
    rows = []
    for name in [*names, *([steps.COPY_LOOP] if spc > 1 else []), steps.COPY]:
        row: dict[str, Any] = {
            "workload": workload.name,
            "group": workload.group,
            "dtype": dtype,
            "backend": name,
            "n_arrays": workload.n_arrays,
            "n_params": workload.n_params,
            "param_bytes": 4 * workload.n_params,
            "bytes_moved": moved,
            "note": notes.get(name, ""),
        }
        t = timings.get(name)
        r = runners.get(name)
        if t is None or r is None:
            rows.append(row)
            continue
        row.update(
            median_ms=1e3 * t.median,
            p25_ms=1e3 * t.p25,
            p75_ms=1e3 * t.p75,
            min_ms=1e3 * t.min,
            max_ms=1e3 * t.max,
            issue_ms=1e3 * t.issue_median,
            samples=t.samples,
            steps_per_sample=t.steps_per_sample,
            steps_per_call=r.steps_per_call,
            gb_per_s=moved / t.median / 1e9,
            copy_gb_per_s=moved / copy_s / 1e9,
            frac_of_copy=copy_s / t.median,
            floor_ms=1e3 * floor_s,
            frac_of_floor=floor_s / t.median,
            speedup_vs_optax=optax_s / t.median,
            launches=r.launches,
            compile_s=r.compile_s,
            temp_bytes=r.temp_bytes,
            bytes_xla=r.bytes_xla,
            rel_diff_vs_optax=diffs.get(name, float("nan")),
        )
        rows.append(row)
    if on_timed is not None:
        on_timed(rows)

    def trace() -> None:
        traces = _traces(runners, timings, settings.trace_calls)
        for row in rows:
            row.update(traces.get(row["backend"], {}))
        for r in runners.values():
            r.release()
        runners.clear()
        gc.collect()

    if deferred is not None and settings.trace_calls > 0:
        deferred.append(trace)
    else:
        trace()
    return rows


def _traces(
    runners: dict[str, steps.Runner], timings: dict[str, timing.Timing], most: int
) -> dict[str, dict[str, Any]]:
    """Each timed runner's ``trace_*`` columns (``Settings.trace_calls``); {} when off.

    A runner whose one call would launch more than ``TRACE_MAX_EVENTS`` is
    not traced (optax's 851 launches a step, at 100 steps a call).
    """
    if most <= 0:
        return {}
    calls, out = {}, {}
    for name, r in runners.items():
        if name not in timings:
            continue
        per_call = max(r.launches, 1) * r.steps_per_call
        if per_call > TRACE_MAX_EVENTS:
            out[name] = {"trace_note": f"not traced: {per_call} launches a call"}
            continue
        fit = min(
            most, TRACE_MAX_EVENTS // per_call, timings[name].steps_per_sample // r.steps_per_call
        )
        calls[name] = max(1, fit)
    try:
        found, note = device_trace.trace(list(runners.values()), calls)
    except Exception as e:  # the timing stands without its trace
        failed = "trace failed: " + _error(e)
        return {**out, **{name: {"trace_note": failed} for name in calls}}
    return {**out, **{name: device_trace.columns(t, note) for name, t in found.items()}}
