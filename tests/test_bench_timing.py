"""``bench.timing``: samples, their per-step times and the host's part of them.

The runners here are stand-ins: what is checked is the arithmetic and the order
of the samples, not a machine's speed.
"""

from __future__ import annotations

import pytest


def test_time_runners_divides_by_the_steps_of_a_call(monkeypatch):
    from bench import timing

    class Fake:
        name = "loop"
        steps_per_call = 4

        def run(self, k: int) -> float: ...

    # (seconds with the wait, seconds until the last call was issued)
    monkeypatch.setattr(timing, "clock", lambda runner, k: (0.4 * k, 0.1 * k))
    out = timing.time_runners([Fake()], warmup=0, rounds=3, min_sample_s=0.0)
    assert out["loop"].median == pytest.approx(0.1)
    assert out["loop"].issue_median == pytest.approx(0.025)
    assert out["loop"].steps_per_sample == 4


def test_runner_run_returns_the_time_until_its_calls_were_issued():
    """``Runner.run``: the host's part, before the wait for the last call."""
    import time as _time

    from bench import steps

    class SlowResult:
        """Ready only 0.2 s after it was made: a device still at work."""

        def __init__(self) -> None:
            self.made = _time.perf_counter()

        def block_until_ready(self):
            _time.sleep(max(0.0, self.made + 0.2 - _time.perf_counter()))
            return self

    runner = steps.Runner(
        name="fake",
        compiled=lambda x: (SlowResult(),),
        carry=(0,),
        fixed=(),
        compile_s=0.0,
        launches=1,
        temp_bytes=0.0,
        bytes_xla=0.0,
    )
    start = _time.perf_counter()
    issued = runner.run(3)
    total = _time.perf_counter() - start
    assert issued < 0.1 <= 0.2 <= total


def test_settle_sleeps_before_each_sample_outside_the_timed_interval(monkeypatch):
    """``settle_s`` sleeps once before every sample, outside the clocked run."""
    from bench import timing

    events: list[str] = []

    class Fake:
        steps_per_call = 1

        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, k: int) -> float:
            events.append(f"run {self.name} {k}")
            return 0.0

    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(f"sleep {s}"))
    out = timing.time_runners(
        [Fake("a"), Fake("b")], warmup=0, rounds=3, min_sample_s=0.0, settle_s=0.25
    )
    sampled = events[4:]  # after the two single steps per runner that choose k
    assert sampled == ["sleep 0.25", "run a 1", "sleep 0.25", "run b 1",
                       "sleep 0.25", "run b 1", "sleep 0.25", "run a 1",
                       "sleep 0.25", "run a 1", "sleep 0.25", "run b 1"]  # fmt: skip
    assert all(t.samples == 3 for t in out.values())
    events.clear()
    timing.time_runners([Fake("a")], warmup=0, rounds=2, min_sample_s=0.0)
    assert not any(e.startswith("sleep") for e in events)  # the default: no sleep


class _QueuedDevice:
    """A stand-in step whose call costs the host ``host_s`` (JAX's dispatch) and then
    runs ``device_s`` on a device that starts it once the call is issued and the call
    before it is done: a sample's first call finds the device idle."""

    name = "queued"
    steps_per_call = 20

    def __init__(self, host_s: float, device_s: float) -> None:
        self.host_s, self.device_s = host_s, device_s

    def run(self, calls: int) -> float:
        import time as _time

        start = _time.perf_counter()
        done = start
        for _ in range(calls):
            _time.sleep(self.host_s)
            done = max(done, _time.perf_counter()) + self.device_s
        issued = _time.perf_counter() - start
        _time.sleep(max(0.0, done - _time.perf_counter()))
        return issued


def test_a_sample_of_few_calls_pays_one_dispatch_the_device_did_not_hide():
    """Why the GPU check's samples last 0.1 s: with the H200's figures of native in
    place (a call of 20 steps, 3.7 ms of kernels, about 1.8 ms of dispatch for
    161 leaves), 0.01-s samples hold 2 calls and measure a step 20-30% above its
    kernels; 0.1-s samples hold 18 and come within a few percent."""
    from bench import timing

    runner = _QueuedDevice(host_s=0.0018, device_s=0.0037)
    step = 0.0037 / 20
    short = timing.time_runners([runner], warmup=1, rounds=5, min_sample_s=0.01)["queued"]
    long = timing.time_runners([runner], warmup=1, rounds=3, min_sample_s=0.1)["queued"]
    assert short.steps_per_sample <= 3 * 20 and long.steps_per_sample >= 15 * 20
    assert short.median > 1.15 * step  # one undisguised dispatch in 2 calls
    assert long.median < 1.08 * step  # ... in 18


def test_the_watchers_are_told_once_a_sample_outside_its_time(monkeypatch):
    """``steps.watching``: told the runner's name before its calls and None after,
    once per sample (``Runner.run`` inside ``clock`` does not tell them again),
    and their work is not in the sample's time."""
    import time as _time

    import numpy as np

    from bench import steps, timing

    told: list[str | None] = []

    def watch(name):
        told.append(name)
        _time.sleep(0.05)  # a slow watcher

    runner = steps.Runner("r", lambda x: (x,), (np.zeros(1),), (), 0.0, 1, 0.0, 0.0)
    with steps.watching(watch):
        total, _ = timing.clock(runner, 2)
        runner.run(1)
    timing.clock(runner, 1)  # no watcher any more
    assert told == ["r", None, "r", None]
    assert total < 0.04
