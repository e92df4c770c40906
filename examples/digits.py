"""Large-batch training of a small ResNet on scikit-learn's digits: SGD vs LARS.

The experiment of You, Gitman & Ginsburg (2017) at laptop scale: train a
ResNet-8 (Flax NNX, BatchNorm) on the 1,797 8x8 digits (upsampled to 16x16)
with batch sizes from 32 up to the whole training set. The learning rate grows
linearly with the batch size (from a base batch of 32), with linear warmup and
polynomial decay; every run gets the same number of epochs, so the full-batch
run takes one step per epoch. Plain SGD with momentum and LARS
(``lars.lars``, BatchNorm and biases excluded from adaptation and decay) get
the same schedule, momentum and weight decay; each one's learning rate is
chosen by the same small sweep at full batch on a validation split carved out
of the training set.

Run from the repository root::

  python -m examples.digits --quick     # a 1-minute demo (8x8 images, 40 epochs)
  python -m examples.digits             # the full experiment (~15 CPU minutes)
  python -m examples.digits --resume    # continue an interrupted run

The full run writes a Markdown table, CSVs and plots to ``examples/results``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
BASE_BATCH = 32
# The sweep (base learning rates at batch 32; the peak lr is base * batch / 32); a
# grid whose best point is on its edge is extended by up to MAX_EXTENSIONS points.
SGD_GRID = (0.0125, 0.025, 0.05, 0.1)
LARS_GRID = (0.05, 0.1, 0.2, 0.4)
# What the sweep chose in examples/results (used when not tuning, e.g. --quick).
DEFAULT_SGD_LR = 0.0125
DEFAULT_LARS_LR = 0.1
TUNE_SEED = 1000
MAX_EXTENSIONS = 2


def _batch_size(text: str) -> int | str:
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        msg = f"batch size must be an integer or 'full', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be >= 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must look like 8,16,32, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``python -m examples.digits --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m examples.digits",
        description=(
            "Train a small ResNet on scikit-learn's digits with SGD+momentum and with LARS "
            "at batch sizes up to the full training set (linear lr scaling, warmup, "
            "polynomial decay) and report test accuracy as a table and plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short demo: 8x8 images, batch 64 and full, 1 seed, 40 epochs, no sweep (the "
        "learning rates the full sweep chose); writes to examples/out/quick",
    )
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (default 60; quick 40)")
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_batch_size,
        help="batch sizes, 'full' = the whole training set (default 32 128 512 full)",
    )
    p.add_argument("--seeds", type=_positive_int, help="seeds per setting (default 3; quick 1)")
    p.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sweep each optimizer's learning rate at full batch on a validation split "
        "first (default: on, off with --quick)",
    )
    p.add_argument(
        "--sgd-lr",
        type=float,
        default=DEFAULT_SGD_LR,
        help="SGD base learning rate at batch 32, used without --tune",
    )
    p.add_argument(
        "--lars-lr",
        type=float,
        default=DEFAULT_LARS_LR,
        help="LARS base learning rate at batch 32, used without --tune",
    )
    p.add_argument("--lars-tc", type=float, default=0.001, help="LARS trust coefficient")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (both)")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum (both)")
    p.add_argument(
        "--warmup-epochs", type=int, help="linear warmup epochs (default: 10%% of the epochs)"
    )
    p.add_argument("--widths", type=_widths, default=(8, 16, 32), help="ResNet stage widths")
    p.add_argument(
        "--image-size", type=int, help="images are resized to this side (default 16; quick 8)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results folder (default examples/results; quick: examples/out/quick)",
    )
    p.add_argument(
        "--ckpt-dir", type=Path, help="checkpoint folder (default examples/out/checkpoints/...)"
    )
    p.add_argument("--ckpt-every", type=_positive_int, default=25, help="save every N epochs")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --ckpt-dir (finished runs are reused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.epochs is None:
        args.epochs = 40 if args.quick else 60
    if args.image_size is None:
        args.image_size = 8 if args.quick else 16
    if args.batch_sizes is None:
        args.batch_sizes = [64, "full"] if args.quick else [32, 128, 512, "full"]
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.tune is None:
        args.tune = not args.quick
    if args.warmup_epochs is None:
        args.warmup_epochs = max(1, round(args.epochs / 10))
    if args.out is None:
        args.out = HERE / "out" / "quick" if args.quick else HERE / "results"
    if args.ckpt_dir is None:
        args.ckpt_dir = HERE / "out" / "checkpoints" / mode
    return args


def _run_spec(args, optimizer: str, batch: int, seed: int, peak_lr: float, tag: str) -> Any:
    """One run of the experiment with the command line's shared settings."""
    from examples.digits_experiment import RunSpec

    return RunSpec(
        optimizer=optimizer,
        batch_size=batch,
        seed=seed,
        epochs=args.epochs,
        peak_lr=peak_lr,
        trust_coefficient=args.lars_tc,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        warmup_epochs=args.warmup_epochs,
        widths=args.widths,
        tag=tag,
    )


def _scaled(base_lr: float, batch_size: int) -> float:
    return base_lr * batch_size / BASE_BATCH


def tune(args: argparse.Namespace, data, say) -> tuple[dict[str, float], list[dict]]:
    """Sweeps each optimizer's base lr at full batch on a validation split.

    The training set is split (stratified, 80/20, fixed seed) into a tuning
    set and a validation set; each grid point trains once at the tuning set's
    full batch; the best final validation accuracy wins (ties: lower loss).
    When the best point is on the edge of the grid, the grid is extended past
    it by a factor of 2 (at most ``MAX_EXTENSIONS`` times), for both optimizers.

    Returns:
      ({optimizer: chosen base lr}, rows of the sweep table).
    """
    from sklearn.model_selection import train_test_split

    from examples.digits_experiment import Runner

    x_fit, x_val, y_fit, y_val = train_test_split(
        data.x_train, data.y_train, test_size=0.2, stratify=data.y_train, random_state=0
    )
    runner = Runner(
        x_fit,
        y_fit,
        x_val,
        y_val,
        ckpt_dir=args.ckpt_dir / "tune",
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        progress=not args.no_progress,
    )
    batch = len(x_fit)
    rows, chosen = [], {}
    for opt, grid in (("sgd", SGD_GRID), ("lars", LARS_GRID)):
        scored, pending, extensions = [], list(grid), 0
        while pending:
            base = pending.pop(0)
            spec = _run_spec(args, opt, batch, TUNE_SEED, _scaled(base, batch), "tune")
            result = runner.run(spec)
            acc, loss = result.final_test_acc, result.history["test_loss"][-1]
            loss = loss if np.isfinite(loss) else float("inf")
            say(
                f"tune {opt:>4} base lr {base:g} (peak {spec.peak_lr:.3g} at batch {batch}): "
                f"validation accuracy {100 * acc:.1f}%, loss {loss:.3g}"
            )
            scored.append((-acc, loss, base))
            rows.append(
                {
                    "optimizer": opt,
                    "base_lr": base,
                    "trust_coefficient": args.lars_tc if opt == "lars" else "",
                    "batch_size": batch,
                    "peak_lr": round(spec.peak_lr, 6),
                    "val_acc": round(acc, 5),
                    "val_loss": round(loss, 6),
                    "diverged": result.diverged,
                    "extension": base not in grid,
                    "seconds": round(result.seconds, 1),
                    "cpu_seconds": round(result.cpu_seconds, 1),
                    "chosen": False,
                }
            )
            # The best point on the edge of the grid: extend the grid past it (same rule
            # for both optimizers, at most MAX_EXTENSIONS extra runs).
            if not pending and extensions < MAX_EXTENSIONS:
                best, tried = min(scored)[2], [b for _, _, b in scored]
                if best == min(tried):
                    pending.append(best / 2)
                    extensions += 1
                elif best == max(tried):
                    pending.append(best * 2)
                    extensions += 1
        chosen[opt] = min(scored)[2]
        for row in rows:
            if row["optimizer"] == opt and row["base_lr"] == chosen[opt]:
                row["chosen"] = True
    return chosen, rows


def _result_flags(argv: Sequence[str] | None) -> list[str]:
    """The command-line flags that change results (not --resume, --out, progress, ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    dropped = {"--resume": 0, "--no-progress": 0, "--out": 1, "--ckpt-dir": 1, "--ckpt-every": 1}
    kept, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in dropped:
            i += 1 + (dropped[flag] if "=" not in argv[i] else 0)
            continue
        kept.append(argv[i])
        i += 1
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment; returns the exit status."""
    args = parse_args(argv)
    start, cpu_start = time.perf_counter(), time.process_time()

    from examples import digits_report as report
    from examples.digits_data import load_digits_split
    from examples.digits_experiment import Runner

    def say(text: str) -> None:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    data = load_digits_split(args.image_size)
    n_train = len(data.x_train)
    batch_sizes = sorted({n_train if b == "full" else b for b in args.batch_sizes})
    if batch_sizes[-1] > n_train:
        raise SystemExit(f"batch sizes must be at most the {n_train} training images")
    say(
        f"digits: {n_train} training / {len(data.x_test)} test images of "
        f"{args.image_size}x{args.image_size}; ResNet widths {args.widths}; {args.epochs} epochs; "
        f"batch sizes {batch_sizes}; {args.seeds} seed(s)"
    )

    tuning_rows: list[dict] = []
    if args.tune:
        chosen, tuning_rows = tune(args, data, say)
        base_lrs = chosen
        say(f"chosen base learning rates (batch {BASE_BATCH}): {base_lrs}")
    else:
        base_lrs = {"sgd": args.sgd_lr, "lars": args.lars_lr}

    runner = Runner(
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        ckpt_dir=args.ckpt_dir / "final",
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        progress=not args.no_progress,
    )
    results = []
    for seed in range(args.seeds):
        for batch in batch_sizes:
            for opt in ("sgd", "lars"):
                spec = _run_spec(args, opt, batch, seed, _scaled(base_lrs[opt], batch), "final")
                r = runner.run(spec)
                results.append(r)
                say(
                    f"{opt:>4} batch {batch:>4} seed {seed}: test accuracy "
                    f"{100 * r.final_test_acc:.1f}%, train loss {r.final_train_loss:.3g}"
                    f"{' (diverged)' if r.diverged else ''} [{r.seconds:.0f} s]"
                )

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = report.summarise(results)
    report.write_csv(out / "summary.csv", summary)
    report.write_csv(out / "runs.csv", report.run_rows(results))
    if tuning_rows:
        report.write_csv(out / "tuning.csv", tuning_rows)
    report.plot_accuracy_vs_batch(out / "accuracy_vs_batch.png", results, n_train)
    report.plot_curves(out / "curves_full_batch.png", results, batch_sizes[-1])
    table = report.markdown_table(summary, n_train)
    env = report.environment()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    run_wall = sum(r.seconds for r in results) + sum(r["seconds"] for r in tuning_rows)
    run_cpu = sum(r.cpu_seconds for r in results) + sum(r["cpu_seconds"] for r in tuning_rows)
    command = " ".join(["python -m examples.digits", *_result_flags(argv)])
    depth = 2 * len(args.widths) + 2
    md = [
        f"# Digits ResNet-{depth}: SGD vs LARS as the batch grows",
        "",
        f"Test accuracy (%) after {args.epochs} epochs, mean ± std over {args.seeds} seed(s); "
        f"{n_train} training and {len(data.x_test)} test images.",
        "",
        table,
        "",
        f"- reproduce with: `{command}`",
        f"- time, all runs together (sweep and compilation included): {run_wall / 60:.1f} min "
        f"wall clock, {run_cpu / 60:.1f} min CPU time (all threads); per run: runs.csv, "
        "tuning.csv",
        f"- base learning rates at batch {BASE_BATCH} (peak lr = base * batch / {BASE_BATCH}): "
        f"SGD {base_lrs['sgd']:g}, LARS {base_lrs['lars']:g} "
        f"(trust coefficient {args.lars_tc:g})",
        f"- warmup {args.warmup_epochs} epochs, then polynomial (power 2) decay to 0; "
        f"momentum {args.momentum}; weight decay {args.weight_decay:g} "
        "(not on biases or BatchNorm)",
        f"- date: {env['date']}; device: {env['device']}, {env['cpu']}; Python {env['python']}",
        f"- versions: {env['versions']}",
    ]
    if tuning_rows:
        md += [
            "",
            "## Learning-rate sweep (full batch, validation split)",
            "",
            report.tuning_table(sorted(tuning_rows, key=lambda r: (r["optimizer"], r["base_lr"]))),
        ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    say("")
    say(table)
    say("")
    say(f"table: {out / 'results.md'} (CSV: {out / 'summary.csv'}, {out / 'runs.csv'})")
    say(f"plots: {out / 'accuracy_vs_batch.png'}, {out / 'curves_full_batch.png'}")
    say(f"done in {elapsed:.0f} s ({cpu:.0f} s CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
