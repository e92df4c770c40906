"""bench.device_trace: the device's timeline of a traced sample, from an XSpace."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import pytest

from bench import device_trace, measure, steps, workloads

US = 1_000.0  # ns


def test_timeline_figures_from_intervals_worked_by_hand():
    # Two overlapping kernels (0-10 and 5-20 us), a 10-us gap, a kernel (30-40),
    # a 160-us gap (long), a kernel (200-260): busy 20 + 10 + 60 = 90 us of a
    # 260-us span, over 2 steps.
    events = [("a", 0, 10 * US), ("b", 5 * US, 20 * US), ("a", 30 * US, 40 * US)]
    events.append(("c", 200 * US, 260 * US))
    t = device_trace.timeline(events, wall_ns=300 * US, steps=2)
    assert t.steps == 2 and t.events == 2.0
    assert t.busy_ms == pytest.approx(0.045) and t.span_ms == pytest.approx(0.130)
    assert t.idle_ms == pytest.approx(0.085)
    assert t.long_gaps == 1 and t.long_gap_ms == pytest.approx(0.080)
    assert t.max_gap_ms == pytest.approx(0.160) and t.wall_ms == pytest.approx(0.150)
    # Kernels by their total time: c 60 us, a 20 us (two launches), b 15 us.
    assert [(n, round(ms, 4), k) for n, ms, k in t.top] == [
        ("c", 0.03, 0.5),
        ("a", 0.01, 1.0),
        ("b", 0.0075, 0.5),
    ]
    cols = device_trace.columns(t, "")
    assert cols["trace_busy_ms"] == t.busy_ms and cols["trace_long_gaps"] == 1
    assert cols["trace_top"].startswith("c 0.0300 ms x0.5; a 0.0100 ms x1")
    assert device_trace.timeline([], 1.0, 2) is None
    assert device_trace.columns(None, "") == {"trace_note": "no device events"}


def _event(meta: int, start_ns: float, duration_ns: float, base_ns: float = 0.0) -> str:
    offset, duration = int((start_ns - base_ns) * 1000), int(duration_ns * 1000)
    return f"events {{ metadata_id: {meta} offset_ps: {offset} duration_ps: {duration} }}"


# A session's XSpace as the CUDA profiler writes one (names as XLA's CUPTI
# collector gives them): the host's annotations, the device's stream lines,
# a line derived from them and CUPTI's overhead, which are not the device's work.
HOST = f"""
planes {{
  id: 1
  name: "/host:CPU"
  lines {{ id: 1 name: "python" timestamp_ns: 0
    {_event(1, 1000 * US, 1000 * US)}
    {_event(2, 3000 * US, 1000 * US)}
    {_event(3, 3100 * US, 10 * US)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "{device_trace.PREFIX}native:apply" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "{device_trace.PREFIX}copy" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "PjitFunction(run)" }} }}
}}
"""
DEVICE = f"""
planes {{
  id: 2
  name: "/device:GPU:0"
  lines {{ id: 7 name: "Stream #7(Kernel,Memset)" timestamp_ns: 1000000
    {_event(1, 1200 * US, 100 * US, 1000 * US)}
    {_event(2, 1500 * US, 200 * US, 1000 * US)}
    {_event(3, 2600 * US, 300 * US, 1000 * US)}
    {_event(3, 3100 * US, 300 * US, 1000 * US)} }}
  lines {{ id: 8 name: "XLA Ops" timestamp_ns: 1000000
    {_event(1, 1000 * US, 3000 * US, 1000 * US)} }}
  lines {{ id: 9 name: "CUPTI overhead" timestamp_ns: 1000000
    {_event(1, 1300 * US, 10 * US, 1000 * US)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "SumsKernel" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "UpdateKernel" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "copy_fusion" }} }}
}}
"""


def test_split_gives_each_runner_the_device_events_of_its_annotation():
    profile = jax.profiler.ProfileData.from_text_proto(HOST + DEVICE)
    samples, lines = device_trace.split(profile, ["native:apply", "copy", "optax"])
    assert lines == ["CUPTI overhead", "Stream #7(Kernel,Memset)", "XLA Ops"]
    assert set(samples) == {"native:apply", "copy"}  # optax was not annotated
    wall, events = samples["native:apply"]
    assert wall == pytest.approx(1000 * US)
    assert [(n, s / US, e / US) for n, s, e in events] == [
        ("SumsKernel", 1200, 1300),
        ("UpdateKernel", 1500, 1700),
    ]
    # 2.6 ms is past the middle (2.5 ms) of the pause between the two annotations.
    wall, events = samples["copy"]
    assert [s / US for _, s, _ in events] == [2600, 3100]
    t = device_trace.timeline(events, wall, steps=1)
    assert t.busy_ms == pytest.approx(0.6) and t.long_gaps == 1
    # Without device planes (a CPU) the annotations are found, with no events.
    samples, lines = device_trace.split(jax.profiler.ProfileData.from_text_proto(HOST), ["copy"])
    assert samples == {"copy": (pytest.approx(1000 * US), [])} and lines == []


def test_a_real_profile_on_the_cpu_has_the_annotations_and_no_device_plane():
    f = jax.jit(lambda x: x * 2.0, donate_argnums=0)
    x = f(jnp.ones(1024))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            with jax.profiler.TraceAnnotation(device_trace.PREFIX + "double"):
                x = f(x).block_until_ready()
        (path,) = list(__import__("pathlib").Path(tmp).rglob("*.xplane.pb"))
        profile = jax.profiler.ProfileData.from_file(str(path))
    samples, lines = device_trace.split(profile, ["double"])
    assert samples["double"][0] > 0 and samples["double"][1] == [] and lines == []


def test_measure_traces_each_row_where_asked_and_the_cpu_says_why_none():
    w = workloads.sweep_workload(127)
    base = dict(warmup=1, rounds=3, min_sample_s=0.0, budget_s=1.0, settle_s=0.0)
    settings = measure.Settings(**base, slow_factor=0, steps_per_call=2, trace_calls=2)
    rows = measure.measure(w, "fp32", ["reference:apply"], settings)
    assert {r["backend"] for r in rows} == {steps.OPTAX, "reference:apply", "copy", "copy-loop"}
    for r in rows:
        assert "no device plane" in r["trace_note"], r
        assert not any(k.startswith("trace_") and k != "trace_note" for k in r)
    untraced = measure.measure(w, "fp32", ["reference:apply"], measure.Settings(**base))
    assert not any(k.startswith("trace_") for r in untraced for k in r)


def test_a_runner_with_too_many_launches_a_call_is_not_traced(monkeypatch):
    monkeypatch.setattr(measure, "TRACE_MAX_EVENTS", 1)
    w = workloads.sweep_workload(127)
    base = dict(warmup=1, rounds=3, min_sample_s=0.0, budget_s=1.0, settle_s=0.0)
    settings = measure.Settings(**base, slow_factor=0, steps_per_call=2, trace_calls=2)
    rows = {r["backend"]: r for r in measure.measure(w, "fp32", ["reference:apply"], settings)}
    launches = rows["reference:apply"]["launches"]
    assert launches > 0
    assert rows["reference:apply"]["trace_note"] == f"not traced: {2 * launches} launches a call"


def test_rows_are_handed_over_before_the_trace_and_a_failed_trace_leaves_them(monkeypatch):
    seen = []

    def timed(rows):
        # Handed over timed and not yet traced.
        seen.append([(r["backend"], "median_ms" in r, "trace_note" in r) for r in rows])

    def broken(runners, calls):
        raise RuntimeError("the profiler could not start")

    monkeypatch.setattr(device_trace, "trace", broken)
    w = workloads.sweep_workload(127)
    base = dict(warmup=1, rounds=3, min_sample_s=0.0, budget_s=1.0, settle_s=0.0)
    settings = measure.Settings(**base, slow_factor=0, steps_per_call=2, trace_calls=2)
    rows = measure.measure(w, "fp32", ["reference:apply"], settings, on_timed=timed)
    assert len(seen) == 1 and all(t and not traced for _, t, traced in seen[0])
    assert [r["backend"] for r in rows] == [b for b, _, _ in seen[0]]
    for r in rows:
        assert "median_ms" in r and r["trace_note"].startswith("trace failed: RuntimeError")


def test_a_deferred_trace_runs_when_the_caller_asks_and_then_drops_the_buffers(monkeypatch):
    """measure(deferred=...): the rows come back untraced, the steps kept; the
    call left behind traces them into the same rows and releases the steps."""
    released = []
    monkeypatch.setattr(steps.Runner, "release", lambda self: released.append(self.name))
    w = workloads.sweep_workload(127)
    base = dict(warmup=1, rounds=3, min_sample_s=0.0, budget_s=1.0, settle_s=0.0)
    settings = measure.Settings(**base, slow_factor=0, steps_per_call=2, trace_calls=2)
    deferred: list = []
    rows = measure.measure(w, "fp32", ["reference:apply"], settings, deferred=deferred)
    assert len(deferred) == 1 and released == []
    assert not any(k.startswith("trace_") for r in rows for k in r)
    deferred[0]()
    assert all("no device plane" in r["trace_note"] for r in rows)
    assert sorted(released) == sorted(r["backend"] for r in rows)
    # Nothing to trace: nothing is left behind.
    untraced = measure.Settings(**base, slow_factor=0, steps_per_call=2)
    measure.measure(w, "fp32", ["reference:apply"], untraced, deferred=deferred)
    assert len(deferred) == 1
