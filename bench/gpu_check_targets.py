"""The GPU targets, read off a ``bench.gpu_check`` document.

The project's GPU targets (docs/gpu-check.md), for every form's step on
ResNet-50's parameter set, fp32 and bf16 gradients:

* at least ``SPEEDUP_MIN`` times as fast as ``jax.jit(optax.lars)``;
* at most ``FLOOR_MAX`` times the floor: the faster of the copy of the same
  bytes (20 a parameter with fp32 gradients, 18 with bf16) and that copy in
  the step's loop;
* at most ``LAUNCHES_MAX`` kernel launches a step for one dtype group (all of
  ResNet-50's parameters are one), the loop's own launches left out;

and on one 64M-element array, at least ``ARRAY_COPY_MIN`` of the floor's
bandwidth on the bytes a step must move there (``must_move``): one leaf of
256 MB, far above L2, has its norms before any update, so w and g are read
twice (28 bytes a parameter with fp32 grads, 24 with bf16, against the
floor's 20 and 18). ``targets(doc)`` gives one line per timed form
(``timing-model``, ``timing-tuning`` and ``timing-array``), ``verdicts(doc)``
one per workload and gradient dtype: the rows that met every target, else
the one nearest the floor and what it missed by.
"""

from __future__ import annotations

import math
from typing import Any

SPEEDUP_MIN = 3.0
FLOOR_MAX = 1.25
LAUNCHES_MAX = 4
ARRAY_COPY_MIN = 0.90

# Bytes of a gradient, by the timing's gradient dtype label (``bench.measure.DTYPES``).
_GRAD_BYTES = {"fp32": 4, "bf16-grads": 2}


def must_move(dtype: str) -> tuple[int, int]:
    """(the floor's bytes a parameter, a one-leaf step's) for fp32 params and momentum.

    The floor reads w, g, v and writes w, v once; a leaf larger than L2 reads
    w and g once more, for its norms.
    """
    g = _GRAD_BYTES[dtype]
    return 16 + g, 20 + 2 * g


# The rows that are no form of ``lars``'s kernels: the baselines and the floor.
_NOT_FORMS = ("optax", "reference", "reference:apply", "copy", "copy-loop")
_STEPS = ("timing-model", "timing-tuning", "timing-array")


def floor_frac(row: dict[str, Any]) -> float | None:
    """A timing row's floor over its time (the copy alone's in JSONs without ``frac_of_floor``)."""
    frac = row.get("frac_of_floor", row.get("frac_of_copy"))
    return frac if frac and not math.isnan(frac) else None


def _loop_launches(rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Per (workload, dtype): launches a step of the loop itself (``copy-loop`` less ``copy``)."""
    by_name: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if r["backend"] in ("copy", "copy-loop") and r.get("launches") is not None:
            by_name[(r["workload"], r["dtype"], r["backend"])] = r["launches"]
    return {
        (w, d): max(0, n - by_name.get((w, d, "copy"), 1))
        for (w, d, name), n in by_name.items()
        if name == "copy-loop"
    }


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per timed form: its figures, each target met or not (None: not one there).

    Keys: step, workload, group ("model" or "sweep"), dtype, row, x_optax,
    x_floor, launches (the loop's own left out), array_bandwidth (the
    fraction of the copy's bandwidth on ``must_move``'s bytes; sweep rows
    only), and ``speedup``, ``floor``, ``launch``, ``bandwidth`` (True,
    False, or None where the target does not apply), ``met`` (every target
    that applies met; a missing figure misses its target).
    """
    out = []
    for step in _STEPS:
        rows = doc["steps"].get(step, {}).get("rows", [])
        loop = _loop_launches(rows)
        for r in rows:
            if r["backend"] in _NOT_FORMS or r.get("median_ms") is None:
                continue
            frac = floor_frac(r)
            x_floor = 1 / frac if frac else None
            bandwidth = None
            if frac and r["dtype"] in _GRAD_BYTES:
                floor_bytes, leaf_bytes = must_move(r["dtype"])
                bandwidth = frac * leaf_bytes / floor_bytes
            x_optax = r.get("speedup_vs_optax")
            launches = r.get("launches")
            if launches is not None:
                launches -= loop.get((r["workload"], r["dtype"]), 0)
            line = {
                "step": step,
                "workload": r["workload"],
                "group": r.get("group", "sweep" if step == "timing-array" else "model"),
                "dtype": r["dtype"],
                "row": r["backend"],
                "x_optax": x_optax,
                "x_floor": x_floor,
                "launches": launches,
                "array_bandwidth": None,
                "speedup": None,
                "floor": None,
                "launch": None,
                "bandwidth": None,
            }
            if line["group"] == "sweep":
                line["array_bandwidth"] = bandwidth
                line["bandwidth"] = bandwidth is not None and bandwidth >= ARRAY_COPY_MIN
            else:
                line["speedup"] = x_optax is not None and x_optax >= SPEEDUP_MIN
                line["floor"] = x_floor is not None and x_floor <= FLOOR_MAX
                line["launch"] = launches is not None and launches <= LAUNCHES_MAX
            line["met"] = all(
                line[k] is not False for k in ("speedup", "floor", "launch", "bandwidth")
            )
            out.append(line)
    return out


def _figures(t: dict[str, Any]) -> str:
    if t["group"] == "sweep":
        leaf_bytes = must_move(t["dtype"])[1] if t["dtype"] in _GRAD_BYTES else "?"
        return (
            f"{_pct(t['array_bandwidth'])} of the copy's bandwidth on the {leaf_bytes} bytes "
            f"a parameter it must move (target {ARRAY_COPY_MIN:.0%}; {_x(t['x_floor'])} the floor)"
        )
    return (
        f"{_x(t['x_optax'])} optax (target {SPEEDUP_MIN:g}), "
        f"{_x(t['x_floor'])} the floor (target {FLOOR_MAX:g}), "
        f"{'-' if t['launches'] is None else t['launches']} launches "
        f"(target {LAUNCHES_MAX})"
    )


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def verdicts(doc: dict[str, Any]) -> list[str]:
    """One line per workload and gradient dtype timed: met by which rows, or missed by how much."""
    lines = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in targets(doc):
        groups.setdefault((t["workload"], t["dtype"]), []).append(t)
    for (workload, dtype), ts in groups.items():
        met = [t for t in ts if t["met"]]
        if met:
            best = min(met, key=lambda t: t["x_floor"] or math.inf)
            others = sorted({t["row"] for t in met} - {best["row"]})
            also = f"; also {', '.join(others)}" if others else ""
            lines.append(f"MET {workload} {dtype}: {best['row']}: {_figures(best)}{also}")
            continue
        best = min(ts, key=lambda t: t["x_floor"] or math.inf)
        lines.append(
            f"MISSED {workload} {dtype}: nearest the floor {best['row']}: {_figures(best)}"
        )
    return lines


def table(doc: dict[str, Any]) -> list[str]:
    """The report's section: every form against the targets, then the verdicts."""
    ts = targets(doc)
    if not ts:
        return []

    def cell(figure: str, met: bool | None) -> str:
        return figure if met is None else f"{figure} {'yes' if met else 'NO'}"

    lines = [
        "",
        "## Targets",
        "",
        f"ResNet-50's set: at least {SPEEDUP_MIN:g}x `jax.jit(optax.lars)`, at most "
        f"{FLOOR_MAX:g}x the floor, at most {LAUNCHES_MAX} launches a step (the loop's own "
        f"left out: `copy-loop`'s less `copy`'s); one 64M-element array: at least "
        f"{ARRAY_COPY_MIN:.0%} of the copy's bandwidth on the bytes a step must move over "
        "one leaf larger than L2 (w and g read twice: 28 bytes a parameter with fp32 "
        "grads, 24 with bf16) (bench/gpu_check_targets.py).",
        "",
        *(
            ["With `--cpu` the kernels are interpreted: these figures say nothing of them.", ""]
            if str(doc.get("environment", {}).get("mode", "")).startswith("cpu")
            else []
        ),
        "| step | workload | grads | row | x optax | x floor | launches | array: of copy's "
        "bandwidth | met |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for t in ts:
        launches = "-" if t["launches"] is None else str(t["launches"])
        lines.append(
            f"| {t['step']} | {t['workload']} | {t['dtype']} | {t['row']} "
            f"| {cell(_x(t['x_optax']), t['speedup'])} | {cell(_x(t['x_floor']), t['floor'])} "
            f"| {cell(launches, t['launch'])} "
            f"| {cell(_pct(t['array_bandwidth']), t['bandwidth'])} "
            f"| {'yes' if t['met'] else 'NO'} |"
        )
    lines += ["", *[f"- {v}" for v in verdicts(doc)]]
    return lines
