"""The Markdown report and the short table of ``bench.gpu_check``, from its JSON document.

The document: ``{"environment": {...}, "seconds": float, "steps": {step:
{"status", "seconds", "reason", "checks": [{"case", "ok", "detail"}],
"rows": [bench.measure rows], ...}}, "quarantine": {form: {"kind", "reason",
"step"}}}`` (``bench.gpu_check_quarantine``). The GPU targets' section and
lines: ``bench.gpu_check_targets``.
"""

from __future__ import annotations

import math
from typing import Any

from bench import gpu_check_targets


def _num(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def timing_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every timing row of the document, in step order."""
    rows = []
    for name, step in doc["steps"].items():
        if name.startswith("timing"):
            rows += step.get("rows", [])
    return rows


def failed_checks(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(step, case, detail) of every failed check."""
    return [
        (name, c["case"], str(c.get("detail", "")))
        for name, step in doc["steps"].items()
        for c in step.get("checks", [])
        if not c.get("ok")
    ]


def time_split(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per in-place form on ResNet-50 (fp32): its step, its fixed costs, its kernels.

    ``step_ms`` is the form's row of ``timing-model`` (``spc`` steps a call).
    ``timing-overhead`` times the same step on one element a leaf at two loop
    lengths a < b; a step there costs s + c / n at n steps a call, so
    ``fixed_ms`` = s (a step's cost whatever the bytes: launches, XLA's loop,
    host work per step) and ``call_ms`` = c (a call's: JAX's dispatch, where
    the device waits for it; where the device works while the host
    dispatches, the costs overlap instead of adding, and c / n bounds the
    call's share from above). With one loop length ``fixed_ms`` is its time
    and ``call_ms`` is None. ``kernel_ms`` is ncu's kernel time a step of the
    form (``step_kernel_ms``), ``rest_ms`` = step -
    kernels: time the GPU ran none of the step's kernels. ``busy_ms`` is the
    device's busy time a step in the row's traced sample (``trace_busy_ms``,
    ``bench.device_trace``). None where a figure is missing.
    """

    def rows(step: str, workload: str) -> list[dict[str, Any]]:
        return [
            r
            for r in doc["steps"].get(step, {}).get("rows", [])
            if r.get("workload") == workload and r.get("dtype") == "fp32" and "median_ms" in r
        ]

    steps = {r["backend"]: r for r in rows("timing-model", "resnet50")}
    fixed: dict[str, dict[int, float]] = {}
    for r in rows("timing-overhead", "resnet50-1elem"):
        fixed.setdefault(r["backend"], {})[r.get("steps_per_call", 1)] = r["median_ms"]
    ncu = doc["steps"].get("ncu", {})
    forms = ncu.get("forms") or ncu.get("ncu_forms") or {}
    kernels = {name: step_kernel_ms(f) for name, f in forms.items()}
    out = []
    for row in sorted(set(steps) | set(fixed)):
        if not row.endswith(":apply"):
            continue
        step = steps[row]["median_ms"] if row in steps else None
        kernel = kernels.get(row.removesuffix(":apply"))
        by_loop = fixed.get(row, {})
        per_step = per_call = None
        if len(by_loop) >= 2:
            a, b = min(by_loop), max(by_loop)
            per_call = (by_loop[a] - by_loop[b]) / (1 / a - 1 / b)
            per_step = by_loop[b] - per_call / b
        elif by_loop:
            per_step = next(iter(by_loop.values()))
        out.append(
            {
                "row": row,
                "spc": steps[row].get("steps_per_call") if row in steps else None,
                "step_ms": step,
                "fixed_ms": per_step,
                "call_ms": per_call,
                "kernel_ms": kernel,
                "busy_ms": steps[row].get("trace_busy_ms") if row in steps else None,
                "rest_ms": step - kernel if step is not None and kernel is not None else None,
            }
        )
    return out


def step_kernel_ms(form: dict[str, Any]) -> float | None:
    """ncu's kernel time a step of one profiled form, without its setup kernels.

    ncu counts every kernel of the program: the form's ``steps`` steps, and
    kernels that ran once (constants and buffers its first step set up). A
    kernel name launched a multiple of ``steps`` times is the step's; the others
    are left out. Without per-kernel figures, ``kernel_time_ms_per_step``.
    """
    by_kernel, steps = form.get("by_kernel"), form.get("steps")
    if not by_kernel or not steps:
        return form.get("kernel_time_ms_per_step")
    ns = sum(
        m.get("gpu__time_duration.sum", 0.0)
        for m in by_kernel.values()
        if m.get("launches", 0) and m["launches"] % steps == 0
    )
    return ns / steps / 1e6


def _time_split_table(split: list[dict[str, Any]]) -> list[str]:
    if not split:
        return []
    lines = [
        "",
        "## Where an in-place step's time goes (ResNet-50, fp32)",
        "",
        "`step`: `timing-model` at `n` steps a call; `kernels`: ncu's kernel time a step "
        "(kernels launched once, to set up the first step, left out); "
        "`rest` = step - kernels, time the GPU ran none of the step's kernels. From "
        "`timing-overhead` (the same step on one element a leaf, at two loop lengths; a "
        "step costs fixed + call / n there): `fixed`, a step's cost whatever the bytes "
        "(launches, XLA's loop, host work a step), and `call / n`, a call's cost (JAX's "
        "dispatch) shared by the n steps of a `timing-model` call. A `rest` near "
        "`fixed` + `call / n` is those costs; a `rest` well above them grows with the bytes. "
        "`busy`: the device's busy time a step in the row's traced sample (the next table).",
        "",
        "| row | n | step ms | kernels ms | busy ms | rest ms | fixed ms | call ms | call / n ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in split:
        shared = r["call_ms"] / r["spc"] if r["call_ms"] is not None and r["spc"] else None
        lines.append(
            f"| {r['row']} | {_num(r['spc'], 'd')} | {_num(r['step_ms'], '.3f')} "
            f"| {_num(r['kernel_ms'], '.3f')} | {_num(r.get('busy_ms'), '.3f')} "
            f"| {_num(r['rest_ms'], '.3f')} "
            f"| {_num(r['fixed_ms'], '.3f')} | {_num(r['call_ms'], '.3f')} "
            f"| {_num(shared, '.3f')} |"
        )
    return lines


def _trace_table(rows: list[dict[str, Any]]) -> list[str]:
    traced = [r for r in rows if "trace_busy_ms" in r or "trace_note" in r]
    if not traced:
        return []
    lines = [
        "",
        "## The device's timeline (`jax.profiler`, one more sample of each row)",
        "",
        "Per step of the traced sample (`steps`: its calls times n): `wall`, from its first "
        "call to the end of the wait; `span`, from the device's first event (kernel, copy, "
        "memset) to its last; `busy`, the time some event ran; `idle` = span - busy, in "
        "long gaps (at least 50 us: about one a call where the device waits for each call's "
        "dispatch) and short ones (a launch after a launch). wall - span is the first "
        "call's dispatch and the wait's return. `events`: device events a step.",
        "",
        "| workload | grads | row | steps | ms | wall ms | span ms | busy ms | idle ms "
        "| long gaps | their ms | max gap ms | events | longest kernels, or why none |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in traced:
        said = r.get("trace_top") or r.get("trace_note", "")
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['backend']} "
            f"| {_num(r.get('trace_steps'), 'd')} | {_num(r.get('median_ms'), '.3f')} "
            f"| {_num(r.get('trace_wall_ms'), '.3f')} | {_num(r.get('trace_span_ms'), '.3f')} "
            f"| {_num(r.get('trace_busy_ms'), '.3f')} | {_num(r.get('trace_idle_ms'), '.3f')} "
            f"| {_num(r.get('trace_long_gaps'), 'd')} "
            f"| {_num(r.get('trace_long_gap_ms'), '.3f')} "
            f"| {_num(r.get('trace_max_gap_ms'), '.3f')} | {_num(r.get('trace_events'), '.1f')} "
            f"| {said[:300]} |"
        )
    return lines


def _x_floor(row: dict[str, Any]) -> float | None:
    """A row's time over the floor's (``gpu_check_targets.floor_frac``)."""
    frac = gpu_check_targets.floor_frac(row)
    return 1 / frac if frac else None


def _timing_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | grads | row | ms | p25-p75 ms | issued ms | GB/s | x floor | x optax "
        "| launches | temp MB | diff vs optax | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['backend']} "
            f"| {_num(r.get('median_ms'), '.3f')} "
            f"| {_num(r.get('p25_ms'), '.3f')}-{_num(r.get('p75_ms'), '.3f')} "
            f"| {_num(r.get('issue_ms'), '.3f')} | {_num(r.get('gb_per_s'), '.0f')} "
            f"| {_num(_x_floor(r), '.2f')} "
            f"| {_num(r.get('speedup_vs_optax'), '.2f')} | {_num(r.get('launches'), 'd')} "
            f"| {_num((r.get('temp_bytes') or math.nan) / 1e6, '.1f')} "
            f"| {_num(r.get('rel_diff_vs_optax'), '.1e')} | {r.get('note', '')} |"
        )
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The report: environment, steps, failures, correctness, timing, ncu."""
    env = doc["environment"]
    lines = ["# GPU check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", f"Whole run: {doc['seconds']:.0f} s.", ""]
    if doc.get("unfinished"):
        lines += [f"Unfinished: {doc['unfinished']} when this report was written.", ""]
    lines += ["## Steps", ""]
    lines += ["| step | status | s | checks passed | reason |", "|---|---|---:|---:|---|"]
    for name, step in doc["steps"].items():
        checks = step.get("checks", [])
        passed = f"{sum(c['ok'] for c in checks)}/{len(checks)}" if checks else ""
        lines.append(
            f"| {name} | {step['status']} | {step.get('seconds', 0.0):.1f} | {passed} "
            f"| {step.get('reason', '')} |"
        )
    failed = failed_checks(doc)
    lines += ["", "## Failed checks", ""]
    lines += [f"- `{s}` {c}: {d}" for s, c, d in failed] or ["None."]
    held = doc.get("quarantine") or {}
    if held:
        lines += ["", "## Quarantined forms", ""]
        lines += [
            "Left out of every step after the one named (a hang: of `sanitize` too), "
            "so that they cannot cost the others their figures "
            "(bench/gpu_check_quarantine.py).",
            "",
            "| form | kind | after | why |",
            "|---|---|---|---|",
        ]
        lines += [f"| {f} | {e['kind']} | {e['step']} | {e['reason']} |" for f, e in held.items()]
    corr = doc["steps"].get("correctness", {}).get("checks", [])
    if corr:
        lines += ["", "## Correctness (scaled max error against the reference)", ""]
        lines += ["| case | ok | detail |", "|---|---|---|"]
        lines += [f"| {c['case']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in corr]
    rows = timing_rows(doc)
    if rows:
        lines += ["", "## Timing", ""]
        lines += [
            "Median per-step time (params and state donated), `x floor`: time over the "
            "copy's time for the same bytes (1.0 is the 20-byte floor for fp32 grads, "
            "18 for bf16), `x optax`: speed-up over `jax.jit(optax.lars)`, launches: "
            "per step, from the compiled HLO (a custom call counts once), temp: the "
            "compiled step's temporary memory. With several steps per call, `copy-loop` "
            "is the copy in the same loop, per copy: what it takes over `copy` is what "
            "the loop costs a step. The floor is the faster of `copy` and `copy-loop`, "
            "so that a copy that also pays a call's dispatch does not flatter the steps.",
            "",
            *_timing_table(rows),
        ]
    lines += gpu_check_targets.table(doc)
    lines += _time_split_table(time_split(doc))
    lines += _trace_table(rows)
    ncu = doc["steps"].get("ncu", {})
    if ncu:
        lines += ["", "## Nsight Compute", ""]
        skip = ("checks", "rows", "forms", "details", "by_kernel", "ncu_forms")
        lines += [f"- {k}: {v}" for k, v in ncu.items() if k not in skip]
        lines += _ncu_forms_table(ncu.get("forms") or ncu.get("ncu_forms") or {})
        if ncu.get("details"):
            lines += ["", "The fused kernel, one launch:", "", "```", ncu["details"], "```"]
    tools = doc["steps"].get("sanitize", {}).get("tools", {})
    if tools:
        lines += ["", "## compute-sanitizer (the native and Triton kernels)", ""]
        lines += ["| tool | status | errors | s | first findings or reason |"]
        lines += ["|---|---|---:|---:|---|"]
        for tool, r in tools.items():
            said = "; ".join(r.get("findings", [])[:6]) if r.get("errors") else r.get("reason", "")
            lines.append(
                f"| {tool} | {r['status']} | {_num(r.get('errors'), 'd')} "
                f"| {_num(r.get('seconds'), '.0f')} | {said[:600]} |"
            )
    return "\n".join(lines) + "\n"


def _ncu_forms_table(forms: dict[str, Any]) -> list[str]:
    """Per form: DRAM bytes and kernel time per step; then its kernels, by name."""
    if not forms:
        return []
    lines = ["", "| form | kernels/step | DRAM B/param | kernel ms/step | note |"]
    lines.append("|---|---:|---:|---:|---|")
    for name, f in forms.items():
        lines.append(
            f"| {name} | {_num(f.get('kernels_per_step'), '.1f')} "
            f"| {_num(f.get('dram_bytes_per_param'), '.1f')} "
            f"| {_num(f.get('kernel_time_ms_per_step'), '.3f')} | {f.get('reason', '')[:200]} |"
        )
    lines += [
        "",
        "| form | kernel | launches | ms (all launches) | DRAM MB |",
        "|---|---|---:|---:|---:|",
    ]
    for name, f in forms.items():
        for kernel, m in sorted(
            (f.get("by_kernel") or {}).items(),
            key=lambda kv: -kv[1].get("gpu__time_duration.sum", 0),
        )[:12]:
            dram = m.get("dram__bytes_read.sum", 0.0) + m.get("dram__bytes_write.sum", 0.0)
            lines.append(
                f"| {name} | `{kernel}` | {m.get('launches', 0):.0f} "
                f"| {m.get('gpu__time_duration.sum', 0.0) / 1e6:.3f} | {dram / 1e6:.1f} |"
            )
    return lines


def short_table(doc: dict[str, Any]) -> str:
    """A few lines for the end of the output: steps, failures, timing summary."""
    lines = ["", "step           status    seconds  checks"]
    for name, step in doc["steps"].items():
        checks = step.get("checks", [])
        passed = f"{sum(c['ok'] for c in checks)}/{len(checks)}" if checks else ""
        lines.append(f"{name:14s} {step['status']:8s} {step.get('seconds', 0.0):8.1f}  {passed}")
    for s, c, d in failed_checks(doc)[:10]:
        lines.append(f"FAILED {s}: {c}: {d[:160]}")
    for form, e in (doc.get("quarantine") or {}).items():
        lines.append(f"QUARANTINED {form} ({e['kind']}, after {e['step']}): {e['reason'][:160]}")
    rows = timing_rows(doc)
    if rows:
        lines.append("")
        lines.append(f"{'workload':12s} {'grads':10s} {'row':20s} {'ms':>9s} {'xfloor':>7s} "
                     f"{'xoptax':>7s} {'launch':>6s}")  # fmt: skip
        for r in rows:
            lines.append(
                f"{r['workload'][:12]:12s} {r['dtype']:10s} {r['backend']:20s} "
                f"{_num(r.get('median_ms'), '9.3f'):>9s} "
                f"{_num(_x_floor(r), '7.2f'):>7s} "
                f"{_num(r.get('speedup_vs_optax'), '7.2f'):>7s} {_num(r.get('launches'), '6d'):>6s}"
            )
    verdicts = gpu_check_targets.verdicts(doc)
    if verdicts:
        lines += ["", *verdicts]
    split = [r for r in time_split(doc) if r["fixed_ms"] is not None or r["rest_ms"] is not None]
    if split:
        heads = ("step ms", "kern ms", "busy ms", "rest ms", "fixed ms", "call ms")
        lines += ["", f"{'in place':20s} " + " ".join(f"{h:>8s}" for h in heads)]
        for r in split:
            figures = (
                r["step_ms"],
                r["kernel_ms"],
                r.get("busy_ms"),
                r["rest_ms"],
                r["fixed_ms"],
                r["call_ms"],
            )
            lines.append(f"{r['row']:20s} " + " ".join(f"{_num(x, '.3f'):>8s}" for x in figures))
    traced = [r for r in rows if "trace_busy_ms" in r and r["dtype"] == "fp32"]
    if traced:
        heads = ("wall ms", "span ms", "busy ms", "gap ms", "gaps")
        lines += ["", f"{'traced (fp32)':33s} " + " ".join(f"{h:>8s}" for h in heads)]
        for r in traced:
            figures = [r.get(f"trace_{k}_ms") for k in ("wall", "span", "busy", "long_gap")]
            lines.append(
                f"{r['workload'][:12]:12s} {r['backend']:20s} "
                + " ".join(f"{_num(x, '.3f'):>8s}" for x in figures)
                + f" {_num(r.get('trace_long_gaps'), '8d'):>8s}"
            )
    ncu = doc["steps"].get("ncu", {})
    for f in (ncu.get("forms") or {"": ncu}).values():
        if "dram_bytes_per_param" in f:
            lines.append(
                f"ncu {f['form']}: {f['dram_bytes_per_param']:.1f} DRAM B/param, "
                f"{f['kernels_per_step']:.1f} kernels/step, "
                f"{f.get('kernel_time_ms_per_step', math.nan):.3f} kernel ms/step"
            )
    return "\n".join(lines)
