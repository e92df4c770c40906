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
