"""The device's timeline of a few calls of each compiled step (``jax.profiler``).

``trace(runners, calls)`` runs each runner's calls (``Runner.run``: back to
back, then one wait) inside one profiler session, each runner's inside a
``jax.profiler.TraceAnnotation`` of its own with a pause between runners, and
reads the session's XSpace (``jax.profiler.ProfileData``). The device's events
are those of the stream lines ("Stream #...": CUPTI's kernels, copies and
memsets) of the device planes ("/device:GPU:N"); the lines XLA's profiler
derives from them ("XLA Ops", "XLA Modules", ...) and CUPTI's overhead line
are left out. An event belongs to the runner whose annotation, widened to the
middle of the pauses on either side, holds its start.

Per runner (``Timeline``), per step of the traced sample:

- ``busy_ms``: the time some event ran (the union of their intervals);
- ``span_ms``: from the first event's start to the last one's end;
- ``idle_ms`` = span - busy: the device waited inside the sample, in
  ``long_gaps`` gaps of at least ``LONG_GAP_NS`` (``long_gap_ms`` in all, per
  step; ``max_gap_ms`` the longest, not per step) and in many short ones (a
  launch after another);
- ``wall_ms``: the annotation, from the first call to the end of the wait: it
  is the span plus the time before the first event (the first call's
  dispatch) and after the last.

So a gap the device spends waiting for each call's dispatch shows as about
one long gap a call, and a cost of each step as the short gaps or the busy
time. The profiler's own work (CUPTI's records) can lengthen the host's side
of each launch a little; the events' times are the device's.

On a CPU there are no device planes: ``trace`` gives each runner ``None`` and
says why.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax

# A gap between two device events at least this long counts as long: far
# above a launch after a launch (a few microseconds), well under a call's
# dispatch of ResNet-50's 161 leaves (about 2 ms on the H200's host, 2026-12-04).
LONG_GAP_NS = 50_000
# The pause between two runners' samples: their events cannot mix, whatever
# the offset between the host's clock and the device's (microseconds).
PAUSE_S = 0.02
# The annotation's prefix (a runner's name follows it).
PREFIX = "lars-trace:"
# Kernels named per runner, the longest first.
TOP_KERNELS = 4


@dataclasses.dataclass(frozen=True)
class Timeline:
    """One runner's traced sample; times in ms per step unless said."""

    steps: int
    events: float  # device events a step
    busy_ms: float
    span_ms: float
    idle_ms: float
    long_gaps: int  # in the whole sample
    long_gap_ms: float
    max_gap_ms: float  # the longest gap, not per step
    wall_ms: float
    top: tuple[tuple[str, float, float], ...]  # (kernel, ms a step, launches a step)


def timeline(
    events: Sequence[tuple[str, float, float]], wall_ns: float, steps: int
) -> Timeline | None:
    """The figures of one sample from its device events ``(name, start_ns, end_ns)``.

    ``wall_ns`` is the sample's annotation; None where there is no event.
    """
    if not events or steps < 1:
        return None
    spans = sorted((s, e) for _, s, e in events)
    busy, gaps = 0.0, []
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = cur_e - spans[0][0]
    long = [g for g in gaps if g >= LONG_GAP_NS]
    by_name: dict[str, list[float]] = {}
    for name, s, e in events:
        by_name.setdefault(name, []).append(e - s)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    per = 1e6 * steps  # ns in all -> ms a step
    return Timeline(
        steps=steps,
        events=len(events) / steps,
        busy_ms=busy / per,
        span_ms=span / per,
        idle_ms=(span - busy) / per,
        long_gaps=len(long),
        long_gap_ms=sum(long) / per,
        max_gap_ms=max(gaps, default=0.0) / 1e6,
        wall_ms=wall_ns / per,
        top=tuple((n, sum(d) / per, len(d) / steps) for n, d in top),
    )


def _is_stream(plane: str, line: str) -> bool:
    return plane.startswith("/device:") and line.startswith("Stream #")


def split(
    profile: Any, names: Iterable[str]
) -> tuple[dict[str, tuple[float, list[tuple[str, float, float]]]], list[str]]:
    """Each runner's annotation length and device events, from one XSpace.

    Args:
      profile: A ``jax.profiler.ProfileData``.
      names: The runners' names.

    Returns:
      ({name: (annotation ns, [(event, start_ns, end_ns), ...])} for the
      names whose annotation was found, the device planes' line names seen).
    """
    wanted = {PREFIX + n: n for n in names}
    marks: list[tuple[float, float, str]] = []
    device: list[tuple[str, float, float]] = []
    lines: list[str] = []
    for plane in profile.planes:
        for line in plane.lines:
            if plane.name.startswith("/device:"):
                lines.append(line.name)
            stream = _is_stream(plane.name, line.name)
            for ev in line.events:
                if stream:
                    device.append((ev.name, ev.start_ns, ev.end_ns))
                elif ev.name in wanted and plane.name.startswith("/host:"):
                    marks.append((ev.start_ns, ev.end_ns, wanted[ev.name]))
    marks.sort()
    out: dict[str, tuple[float, list[tuple[str, float, float]]]] = {}
    pause_ns = 1e9 * PAUSE_S
    for i, (start, end, name) in enumerate(marks):
        lo = (marks[i - 1][1] + start) / 2 if i else start - pause_ns / 2
        hi = (end + marks[i + 1][0]) / 2 if i + 1 < len(marks) else end + pause_ns / 2
        out[name] = (end - start, [ev for ev in device if lo <= ev[1] < hi])
    return out, sorted(set(lines))


def trace(runners: Sequence[Any], calls: dict[str, int]) -> tuple[dict[str, Timeline | None], str]:
    """Traces ``calls[name]`` calls of each runner; ({name: Timeline or None}, a note).

    The note says what was missing ("" when every runner has its timeline).
    A runner not in ``calls`` is not traced.
    """
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # no Python call events: the host's TraceMes only
    opts.host_tracer_level = 1
    traced = [r for r in runners if calls.get(r.name, 0) > 0]
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, profiler_options=opts):
            for r in traced:
                time.sleep(PAUSE_S)
                with jax.profiler.TraceAnnotation(PREFIX + r.name):
                    r.run(calls[r.name])
            time.sleep(PAUSE_S)
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return dict.fromkeys((r.name for r in traced), None), "the profiler wrote no XSpace"
        profile = jax.profiler.ProfileData.from_file(files[0])
        samples, lines = split(profile, [r.name for r in traced])
    out: dict[str, Timeline | None] = {}
    for r in traced:
        wall, events = samples.get(r.name, (0.0, []))
        out[r.name] = timeline(events, wall, calls[r.name] * r.steps_per_call)
    missing = sorted(n for n, t in out.items() if t is None)
    if not missing:
        return out, ""
    if not lines:
        return out, "no device plane in the trace (no device events: a CPU, or no CUPTI)"
    return out, f"no device events for {', '.join(missing)}; device lines: {', '.join(lines)}"


def columns(t: Timeline | None, note: str) -> dict[str, Any]:
    """A row's trace columns (``trace_*``), or its ``trace_note``."""
    if t is None:
        return {"trace_note": note or "no device events"}
    return {
        "trace_steps": t.steps,
        "trace_events": t.events,
        "trace_busy_ms": t.busy_ms,
        "trace_span_ms": t.span_ms,
        "trace_idle_ms": t.idle_ms,
        "trace_long_gaps": t.long_gaps,
        "trace_long_gap_ms": t.long_gap_ms,
        "trace_max_gap_ms": t.max_gap_ms,
        "trace_wall_ms": t.wall_ms,
        "trace_top": "; ".join(f"{n[:60]} {ms:.4f} ms x{k:g}" for n, ms, k in t.top),
    }
