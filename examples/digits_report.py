"""Tables (Markdown, CSV) and plots of the digits experiment."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from examples.digits_experiment import RunResult

LABELS = {"sgd": "SGD + momentum", "lars": "LARS"}
COLORS = {"sgd": "tab:orange", "lars": "tab:blue"}


def environment() -> dict[str, str]:
    """Device, library versions and date, for the record."""
    import jax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU's model name
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for package in ("lars", "jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{device.platform.upper()} ({device.device_kind})",
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def percent(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value), in percent."""
    arr = 100.0 * np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def summarise(results: Sequence[RunResult]) -> list[dict]:
    """One row per (optimizer, batch size): accuracy over seeds, divergences, lr."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.optimizer, r.spec.batch_size), []).append(r)
    rows = []
    for (opt, batch), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean, std = percent([r.final_test_acc for r in runs])
        rows.append(
            {
                "optimizer": opt,
                "batch_size": batch,
                "peak_lr": round(runs[0].spec.peak_lr, 6),
                "trust_coefficient": runs[0].spec.trust_coefficient if opt == "lars" else "",
                "seeds": len(runs),
                "test_acc_mean": round(mean, 3),
                "test_acc_std": round(std, 3),
                "diverged": sum(r.diverged for r in runs),
                "seconds_per_run": round(float(np.mean([r.seconds for r in runs])), 1),
                "cpu_seconds_per_run": round(float(np.mean([r.cpu_seconds for r in runs])), 1),
            }
        )
    return rows


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Writes dict rows (all with the same keys) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_rows(results: Sequence[RunResult]) -> list[dict]:
    """One CSV row per run."""
    return [
        {
            "optimizer": r.spec.optimizer,
            "batch_size": r.spec.batch_size,
            "seed": r.spec.seed,
            "epochs": r.spec.epochs,
            "peak_lr": round(r.spec.peak_lr, 6),
            "trust_coefficient": r.spec.trust_coefficient if r.spec.optimizer == "lars" else "",
            "weight_decay": r.spec.weight_decay,
            "final_test_acc": round(r.final_test_acc, 5),
            "best_test_acc": round(max(r.history["test_acc"]), 5),
            "final_train_loss": round(r.final_train_loss, 6),
            "diverged": r.diverged,
            "seconds": round(r.seconds, 1),
            "cpu_seconds": round(r.cpu_seconds, 1),
        }
        for r in results
    ]


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    text = f"{row['test_acc_mean']:.1f} ± {row['test_acc_std']:.1f}"
    if row["diverged"]:
        text += f" ({row['diverged']}/{row['seeds']} diverged)"
    return text


def markdown_table(summary: Sequence[dict], n_train: int) -> str:
    """The main table: test accuracy (mean ± std over seeds) per batch size."""
    by_key = {(r["optimizer"], r["batch_size"]): r for r in summary}
    batches = sorted({r["batch_size"] for r in summary})
    lines = [
        "| batch size | steps/epoch | SGD peak lr | SGD test acc (%) "
        "| LARS peak lr | LARS test acc (%) | LARS - SGD (points) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        sgd, lrs = by_key.get(("sgd", b)), by_key.get(("lars", b))
        gap = (
            f"{lrs['test_acc_mean'] - sgd['test_acc_mean']:+.1f}"
            if sgd is not None and lrs is not None
            else "-"
        )
        label = f"{b} (full)" if b == n_train else str(b)
        lines.append(
            f"| {label} | {n_train // b} | {sgd['peak_lr']:.3g} | {_cell(sgd)} "
            if sgd is not None
            else f"| {label} | {n_train // b} | - | - "
        )
        lines[-1] += (
            f"| {lrs['peak_lr']:.3g} | {_cell(lrs)} | {gap} |"
            if lrs is not None
            else "| - | - | - |"
        )
    return "\n".join(lines)


def tuning_table(rows: Sequence[dict]) -> str:
    """The learning-rate sweep as a Markdown table."""
    lines = [
        "| optimizer | base lr (batch 32) | trust coefficient | peak lr | "
        "validation acc (%) | validation loss | chosen |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['optimizer']]} | {r['base_lr']:g} | {r['trust_coefficient'] or '-'} "
            f"| {r['peak_lr']:.3g} | {100 * r['val_acc']:.1f} | {r['val_loss']:.3g} "
            f"| {'✓' if r['chosen'] else ''} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_batch(path: Path, results: Sequence[RunResult], n_train: int) -> None:
    """Final test accuracy against batch size, mean ± std with each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    batches = sorted({r.spec.batch_size for r in results})
    for opt in ("sgd", "lars"):
        runs = [r for r in results if r.spec.optimizer == opt]
        if not runs:
            continue
        xs, means, stds = [], [], []
        for b in batches:
            accs = [r.final_test_acc for r in runs if r.spec.batch_size == b]
            if not accs:
                continue
            mean, std = percent(accs)
            xs.append(b)
            means.append(mean)
            stds.append(std)
            ax.scatter([b] * len(accs), 100 * np.asarray(accs), color=COLORS[opt], alpha=0.35, s=14)
        ax.errorbar(
            xs, means, yerr=stds, color=COLORS[opt], marker="o", capsize=4, label=LABELS[opt]
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([f"{b}\n(full)" if b == n_train else str(b) for b in batches])
    ax.set_xlabel("batch size (learning rate scaled linearly)")
    ax.set_ylabel("test accuracy (%)")
    spec = results[0].spec
    depth = 2 * len(spec.widths) + 2
    ax.set_title(f"Digits, ResNet-{depth}, {spec.epochs} epochs: accuracy vs batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_curves(path: Path, results: Sequence[RunResult], batch_size: int) -> None:
    """Test accuracy and training loss per epoch at ``batch_size`` (mean, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for opt in ("sgd", "lars"):
        runs = [r for r in results if r.spec.optimizer == opt and r.spec.batch_size == batch_size]
        if not runs:
            continue
        length = max(len(r.history["test_acc"]) for r in runs)
        for key, ax, scale in (("test_acc", ax_acc, 100.0), ("train_loss", ax_loss, 1.0)):
            curves = np.full((len(runs), length), np.nan)
            for i, r in enumerate(runs):
                curves[i, : len(r.history[key])] = scale * np.asarray(r.history[key], float)
            epochs = np.arange(1, length + 1)
            with np.errstate(invalid="ignore"):
                ax.plot(epochs, np.nanmean(curves, 0), color=COLORS[opt], label=LABELS[opt])
                ax.fill_between(
                    epochs, np.nanmin(curves, 0), np.nanmax(curves, 0), color=COLORS[opt], alpha=0.2
                )
    n = len({r.spec.seed for r in results})
    seeds = f"{n} seeds" if n > 1 else "1 seed"
    ax_acc.set_xlabel("epoch (= step at full batch)")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title(f"Test accuracy, batch {batch_size} (mean, min-max of {seeds})")
    ax_loss.set_xlabel("epoch (= step at full batch)")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("Training cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
