"""Plots of the single-array sweep: GB/s and fraction of the copy floor vs size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.steps import COPY

_STYLE = {"fp32": "-", "bf16-grads": "--"}


def _series(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for r in rows:
        if r.get("group") != "sweep":
            continue
        y = float(r.get(key, "nan") or "nan")
        if math.isnan(y):
            continue
        out.setdefault((str(r["backend"]), str(r["dtype"])), []).append((int(r["n_params"]), y))
    return {k: sorted(v) for k, v in out.items()}


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Writes sweep_gbps.png and sweep_copy_fraction.png; returns their paths.

    Returns an empty list when there are no sweep rows or matplotlib is not
    installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    figures = (
        ("gb_per_s", "achieved GB/s (bytes a LARS step must move / time)", "sweep_gbps.png"),
        ("frac_of_copy", "fraction of the copy bandwidth", "sweep_copy_fraction.png"),
    )
    for key, ylabel, filename in figures:
        series = _series(rows, key)
        if not series:
            continue
        backends = sorted({b for b, _ in series}, key=lambda b: (b == COPY, b))
        if key == "frac_of_copy":
            backends = [b for b in backends if b != COPY]
        colors = {b: ("black" if b == COPY else f"C{i}") for i, b in enumerate(backends)}
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        for (backend, dtype), points in sorted(series.items()):
            if backend not in colors:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                _STYLE.get(dtype, ":"),
                marker="o",
                markersize=3,
                color=colors[backend],
                label=f"{backend} ({dtype})",
            )
        ax.set_xscale("log")
        if key == "gb_per_s":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("array size (elements)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
