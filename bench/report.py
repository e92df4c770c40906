"""The results: a long-format CSV, a terminal table and a Markdown table."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Every CSV column, in order (see bench/README.md for their meaning).
ENV_COLUMNS = ("date", "device", "platform", "jax", "jaxlib", "optax", "lars", "python")
COLUMNS = (
    *ENV_COLUMNS,
    "workload",
    "group",
    "dtype",
    "backend",
    "n_arrays",
    "n_params",
    "param_bytes",
    "bytes_moved",
    "median_ms",
    "p25_ms",
    "p75_ms",
    "min_ms",
    "max_ms",
    "samples",
    "steps_per_sample",
    "steps_per_call",
    "gb_per_s",
    "copy_gb_per_s",
    "frac_of_copy",
    "floor_ms",
    "frac_of_floor",
    "speedup_vs_optax",
    "launches",
    "compile_s",
    "temp_bytes",
    "bytes_xla",
    "rel_diff_vs_optax",
    "note",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    return str(value)


def with_environment(rows: Iterable[dict[str, Any]], env: dict[str, str]) -> list[dict[str, Any]]:
    """The rows with the environment columns filled in."""
    return [{**{k: env[k] for k in ENV_COLUMNS}, **row} for row in rows]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Writes ``rows`` as CSV with every column of ``COLUMNS`` (blank when missing)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in COLUMNS])


def read_csv(path: Path) -> list[dict[str, str]]:
    """Reads a results CSV back (all values as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


TABLE_HEADER = (
    "workload",
    "dtype",
    "backend",
    "median ms",
    "p25-p75 ms",
    "GB/s",
    "% copy",
    "x optax",
    "launches",
    "compile s",
    "temp MB",
    "params MB",
    "diff vs optax",
)


def table_cells(row: dict[str, Any]) -> list[str]:
    """One row of the human-readable table."""
    launches = _num(row, "launches")
    diff = _num(row, "rel_diff_vs_optax")
    cells = [
        str(row["workload"]),
        str(row["dtype"]),
        str(row["backend"]),
        _ms(_num(row, "median_ms")),
        f"{_ms(_num(row, 'p25_ms'))}-{_ms(_num(row, 'p75_ms'))}",
        _fmt(_num(row, "gb_per_s"), ".1f"),
        _fmt(100 * _num(row, "frac_of_copy"), ".0f"),
        _fmt(_num(row, "speedup_vs_optax"), ".2f"),
        "-" if math.isnan(launches) or launches < 0 else str(int(launches)),
        _fmt(_num(row, "compile_s"), ".2f"),
        _fmt(_num(row, "temp_bytes") / 1e6, ".1f"),
        _fmt(_num(row, "param_bytes") / 1e6, ".1f"),
        "-" if math.isnan(diff) else f"{diff:.1e}",
    ]
    if row.get("note"):
        cells[-1] += f"  ({row['note']})"
    return cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table, a blank line between workloads."""
    body = [table_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(TABLE_HEADER)]
    widths[-1] = len(TABLE_HEADER[-1])

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(TABLE_HEADER), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, body, strict=True):
        key = (row["workload"], row["dtype"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(cells))
    return "\n".join(out)


def _mode_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    per_call = sorted(
        {int(_num(r, "steps_per_call")) for r in rows if _num(r, "steps_per_call") > 1}
    )
    if not per_call:
        return []
    k = ", ".join(map(str, per_call))
    return [
        f"- steps per call: {k}. Every LARS row, optax included, ran {k} steps in one "
        "jitted `lax.fori_loop` per call (its arrays crossed the jit boundary once per call, "
        "as in a jitted training loop); times are per step, `launches` those of one step. "
        "The copy floor ran one copy per call."
    ]


def format_markdown(rows: Sequence[dict[str, Any]], env: dict[str, str]) -> str:
    """A Markdown page: how the run was taken, then the table."""
    head = [
        "# LARS step benchmark",
        "",
        f"- date (UTC): {env['date']}",
        f"- device: {env['device']} (JAX platform `{env['platform']}`)",
        f"- versions: jax {env['jax']}, jaxlib {env['jaxlib']}, optax {env['optax']}, "
        f"lars {env['lars']}, Python {env['python']}, {env['os']}",
        f"- command: `{env['command']}`",
        *_mode_lines(rows),
        "",
        "Step times are medians over interleaved samples; `% copy` is the copy floor's "
        "time over the step's (the fraction of the measured copy bandwidth), `x optax` the "
        "speed-up over `jax.jit(optax.lars)`; `temp MB` is the compiled step's temporary "
        "memory with params and state donated. Columns are described in bench/README.md.",
        "",
    ]
    summary = format_summary(rows)
    if summary:
        head += ["Model parameter sets, median step time:", ""]
        head += [f"- {line}" for line in summary.splitlines()]
        head += [""]
    lines = ["| " + " | ".join(TABLE_HEADER) + " |"]
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(TABLE_HEADER) - 3)) + "|")
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*head, *lines, ""])


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line per model workload and dtype: each backend against optax and the copy."""
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("group") == "model":
            groups.setdefault((str(row["workload"]), str(row["dtype"])), {})[
                str(row["backend"])
            ] = row
    lines = []
    for (workload, dtype), by_name in groups.items():
        optax_row, copy_row = by_name.get("optax"), by_name.get("copy")
        if optax_row is None or copy_row is None:
            continue
        parts = [f"optax {_ms(_num(optax_row, 'median_ms'))} ms"]
        for name, row in by_name.items():
            if name in ("optax", "copy") or math.isnan(_num(row, "median_ms")):
                continue
            parts.append(
                f"{name} {_ms(_num(row, 'median_ms'))} ms "
                f"({_fmt(_num(row, 'speedup_vs_optax'), '.2f')}x optax, "
                f"{_fmt(100 * _num(row, 'frac_of_copy'), '.0f')}% of copy)"
            )
        parts.append(
            f"copy floor {_ms(_num(copy_row, 'median_ms'))} ms "
            f"({_fmt(_num(copy_row, 'gb_per_s'), '.1f')} GB/s)"
        )
        lines.append(f"{workload} {dtype}: " + ", ".join(parts))
    return "\n".join(lines)
