"""The timing phases of ``bench.gpu_check`` (``bench.gpu_check_phases``).

``timing(cpu, which, steps_per_call, result, workers)`` runs one of them
(``which``: "model", "array", "overhead", "tuning"): ``bench.measure`` on its
workloads, its rows and checks recorded in ``result`` (the phase's
``gpu_check_phases.Partial``) as they come, and the form whose calls run on
the device named there while they do (a step killed at its timeout blames
it: ``bench.gpu_check_quarantine``). What each measures: docs/gpu-check.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bench import gpu_check_cases as C
from bench import measure, steps, workloads


def _timing_workloads(cpu: bool, which: str) -> list[workloads.Workload]:
    if which == "overhead":
        leaves = 5 if cpu else len(workloads.RESNET50.shapes)
        return [
            workloads.Workload(
                "resnet50-1elem" if not cpu else "tiny-1elem",
                "model",
                ((1,),) * leaves,
                f"{leaves} leaves of one element: a step's fixed cost",
            )
        ]
    if which == "model":
        if cpu:
            shapes = ((3, 3, 4, 8), (8,), (8,), (100, 10), (10,))
            return [workloads.Workload("tiny-model", "model", shapes, "5 arrays (--cpu)")]
        return [w for w in workloads.full_workloads() if w.name == "resnet50"]
    return [workloads.sweep_workload(4096 if cpu else 64 * 1024 * 1024)]


# The shortest timed sample on a GPU. It was 0.01 s on the H200 (2026-12-04):
# native in place on ResNet-50 took 5.8 ms a call of 20 steps, so a sample
# held 2 calls, and the first one's dispatch (about 1.8 ms: 2 ms a call at
# one step a call, for every row) ran while the GPU had nothing to do. That
# alone puts a step about 0.045 ms (25%) above its kernels
# (tests/test_bench_timing.py models it); at 0.1 s a sample holds about 18
# such calls and the dispatch adds under 3% (less at 100 steps a call).
SAMPLE_S = 0.1

# The overhead step's two loop lengths (steps a call), on a GPU and with
# --cpu: a step at n steps a call costs s + c / n (s a step's fixed cost, c a
# call's), so two lengths give both (``bench.gpu_check_report.time_split``).
# Not the timing steps' length: at 1,000 steps a call optax's 851 launches a
# step would take seconds a call.
OVERHEAD_LOOPS = (20, 200)
OVERHEAD_LOOPS_CPU = (1, 10)

# Calls in the one more sample of each timing-model row traced with
# ``jax.profiler`` (``bench.device_trace``): with more than one, a wait for
# each call's dispatch shows as a long gap between calls.
TRACE_CALLS = 3

# A timed row whose first call's update is further than this from optax's
# (bench.steps.rel_diff) fails its check: a timing of wrong results is none.
# Seen on the H200: 7.5e-4 at one step per call, 1.9e-5 at 20.
TIMED_DIFF_LIMIT = 1e-2


def timing(cpu: bool, which: str, steps_per_call: int, result: Any, workers: int) -> dict[str, Any]:
    """optax, every form (both modes) and a copy, interleaved (``bench.measure``).

    ``steps_per_call`` > 1 times that many steps in one jitted loop (optax's
    too): a step's share of a jitted training loop, without the host's
    dispatch of each call (about 2 ms for ResNet-50's 161 leaves on an H200's
    host, 2026-12-04: every row of a one-step call measured that, not the GPU).
    Rows and checks go to ``result`` (a ``gpu_check_phases.Partial``) as they
    come; ``workers`` programs compile at once.
    """
    # No settle sleep: on a GPU, XLA's allocator keeps freed temporaries (no
    # kernel work after optax's step), and the phase's time is counted.
    # Samples of at least SAMPLE_S: a sample's first call finds the GPU idle,
    # so its dispatch (about 2 ms for 161 leaves) is in the sample's time.
    settings = measure.Settings(
        warmup=1 if cpu else 3,
        rounds=3 if cpu else 15,
        min_sample_s=0.0 if cpu else SAMPLE_S,
        budget_s=1.0 if cpu else 8.0,
        slow_factor=0,
        max_compile_s=0,
        settle_s=0.0,
        steps_per_call=steps_per_call,
        compile_workers=workers,
    )
    # The model's fp32 rows are traced, last of the phase (``deferred``):
    # nothing is timed in this process after the profiler has run. They are
    # timed first, so that a phase that runs out of time loses bf16's rows
    # and the trace, not fp32's.
    traced = which == "model"
    step = f"timing-{which}"  # the tuning step times "model" workloads
    names = ["reference"]
    for form in C.forms(cpu):
        if form.unavailable() is None:
            names += [form.name, form.name + ":apply"]
    dtypes = list(measure.DTYPES)  # fp32 first (with --cpu, fp32 alone)
    if which == "tuning":  # the fused launch's geometries, in place, fp32 only
        tuned = [f for f in C.tuning_forms(cpu) if f.unavailable() is None]
        fused = [
            f
            for f in C.forms(cpu)
            if f.name in ("triton", "native-fused") and f.unavailable() is None
        ]
        names = [f"{f.name}:apply" for f in fused + tuned]
        dtypes, which = dtypes[:1], "model"
    per_call = [steps_per_call]
    if which == "overhead":  # in place, fp32 only; the reference shows XLA's own launches
        names = ["reference:apply"] + [n for n in names if n.endswith(":apply")]
        dtypes = dtypes[:1]
        # At two loop lengths: a cost per call and one per step tell apart.
        per_call = list(OVERHEAD_LOOPS_CPU if cpu else OVERHEAD_LOOPS)
    rows = []
    deferred: list[Callable[[], None]] = []  # the traces, run after every timing
    where = [""]
    families = {f.name: f.family or f.name for f in C.forms(cpu) + C.tuning_forms(cpu)}

    def watch(runner: str | None) -> None:
        """Names the form whose calls run now in the result (``Partial.running``):
        a step killed at its timeout blames it. optax, the reference and the
        copies are no form: a timeout in their runs blames none."""
        form, _, mode = (runner or "").partition(":")
        family = families.get(form)
        case = f"{family}/{mode or 'update'}/{step}: {runner} {where[0]}"
        result.running(case if family else None)

    with steps.watching(watch):
        for w in _timing_workloads(cpu, which):
            # With ``cpu`` one gradient dtype per workload (interpreters are slow).
            for dtype in [dtypes[which == "array"]] if cpu else dtypes:
                for spc in per_call:
                    trace = TRACE_CALLS if traced and dtype == "fp32" else 0
                    run = dataclasses.replace(settings, steps_per_call=spc, trace_calls=trace)
                    where[0] = f"on {w.name} {dtype}, {spc} a call"
                    # The rows are saved once timed; the trace's columns are added after.
                    measured = measure.measure(
                        w, dtype, names, run, on_timed=result.add_rows, deferred=deferred
                    )
                    result.save()
                    rows += measured
                    for r in measured:
                        print(
                            f"  {w.name:12s} {dtype:10s} {r['backend']:20s} "
                            f"{r.get('median_ms', float('nan')):9.3f} ms "
                            f"(compile {r.get('compile_s', float('nan')):5.1f} s, {spc} a call) "
                            f"{r['note']}",
                            flush=True,
                        )
        where[0] = "under the profiler"
        for trace_rows in deferred:  # their columns go into the rows saved above
            trace_rows()
            result.save()
    for r in rows:
        case = f"{r['workload']}/{r['dtype']}/{r['backend']}"
        if len(per_call) > 1:
            case += f"/{r.get('steps_per_call', '?')} a call"
        if "median_ms" not in r:
            result.check(case, False, "not timed")
        elif r.get("rel_diff_vs_optax", 0.0) > TIMED_DIFF_LIMIT:  # NaN passes: copy rows
            result.check(case, False, f"first update {r['rel_diff_vs_optax']:.1e} from optax's")
    return {}
