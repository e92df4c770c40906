"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "out"

QUICK = dict(warmup=2, rounds=5, min_sample_s=0.005, budget_s=2.0, max_compile_s=10.0, settle_s=0.0)
FULL = dict(
    warmup=5, rounds=30, min_sample_s=0.02, budget_s=30.0, max_compile_s=300.0, settle_s=0.05
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``python -m bench --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Time a LARS step on every available lars backend beside jax.jit(optax.lars) "
            "and a device-to-device copy of the same bytes, on the default JAX device. "
            "Writes results.csv, results.md and the sweep plots to --out."
        ),
    )
    p.add_argument("--quick", action="store_true", help="fewer, smaller workloads and samples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (%(default)s)")
    p.add_argument(
        "--backends",
        help="comma-separated lars backends to time (default: all available, and "
        '"<backend>:apply" for the in-place apply_gradients step where a backend has one); '
        "optax and copy always run",
    )
    p.add_argument(
        "--workloads",
        help="comma-separated workload names or groups (model, sweep, small); see --list",
    )
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16-grads (default: both)")
    p.add_argument("--rounds", type=int, help="samples per step (default 30, --quick 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per step (default 5, --quick 2)")
    p.add_argument(
        "--budget", type=float, help="seconds of sampling per workload (default 30, --quick 2)"
    )
    p.add_argument(
        "--settle",
        type=float,
        help="seconds of sleep before each sample, so that no step's leftovers (e.g. XLA "
        "freeing optax's temporaries) land in the next one's (default 0.05, --quick 0)",
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="time every LARS row, optax included, as this many steps in one jitted "
        "lax.fori_loop (a step's share of a jitted training loop, whose arrays cross the "
        "jit boundary once); times are per step; the copy floor stays one copy per call "
        "(default %(default)s: each step its own call)",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        default=1,
        help="compile this many steps at once, before any is timed (default %(default)s)",
    )
    p.add_argument(
        "--slow-factor",
        type=float,
        default=25.0,
        help="a backend more than this many times slower than optax on a workload is timed "
        "once there and skipped on the rest (0: never; default %(default)s)",
    )
    p.add_argument(
        "--max-compile",
        type=float,
        help="skip a backend on a workload where its compile time, estimated from optax's, "
        "would exceed this many seconds (0: never; default 300, --quick 10)",
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        disable = True
    if disable:

        class _Silent:
            def update(self, n: int = 1) -> None: ...
            def set_description(self, s: str) -> None: ...
            def close(self) -> None: ...

        return _Silent()
    return tqdm(total=total, unit="set", file=sys.stderr, dynamic_ncols=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)

    from bench import workloads as wl

    default = wl.quick_workloads() if args.quick else wl.full_workloads()
    quick_names = {w.name for w in wl.quick_workloads()}
    everything = {w.name: w for w in [*wl.full_workloads(), *wl.quick_workloads()]}
    if args.list:
        for w in everything.values():
            mark = "quick" if w.name in quick_names else ""
            print(
                f"{w.name:20s} {w.group:6s} {mark:5s} {w.n_arrays:5d} arrays "
                f"{w.n_params:>12,d} params  {w.description}"
            )
        return 0
    try:
        selected = (
            wl.select(list(everything.values()), args.workloads) if args.workloads else default
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    import lars
    from bench import environment, measure, plots, report, steps

    available = lars.available_backends()
    available += steps.in_place_rows(available)
    backends = _split(args.backends) or available
    unknown = [b for b in backends if b not in available]
    if unknown:
        print(
            f"error: backend(s) {', '.join(unknown)} not available here; "
            f"available: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    dtypes = _split(args.dtypes) or list(measure.DTYPES)
    bad = [d for d in dtypes if d not in measure.DTYPES]
    if bad:
        print(
            f"error: unknown dtype(s) {', '.join(bad)}; choose from {', '.join(measure.DTYPES)}",
            file=sys.stderr,
        )
        return 2
    base = QUICK if args.quick else FULL
    settings = measure.Settings(
        warmup=base["warmup"] if args.warmup is None else args.warmup,
        rounds=base["rounds"] if args.rounds is None else args.rounds,
        min_sample_s=base["min_sample_s"],
        budget_s=base["budget_s"] if args.budget is None else args.budget,
        slow_factor=args.slow_factor,
        max_compile_s=base["max_compile_s"] if args.max_compile is None else args.max_compile,
        settle_s=base["settle_s"] if args.settle is None else args.settle,
        steps_per_call=args.steps_per_call,
        compile_workers=args.compile_workers,
    )
    if (
        settings.rounds < 1
        or settings.warmup < 0
        or settings.settle_s < 0
        or settings.steps_per_call < 1
        or settings.compile_workers < 1
    ):
        print(
            "error: --rounds, --steps-per-call and --compile-workers must be >= 1, "
            "--warmup and --settle >= 0",
            file=sys.stderr,
        )
        return 2

    env = environment.collect(sys.argv[1:] if argv is None else argv)
    print(
        f"{env['device']} | jax {env['jax']} jaxlib {env['jaxlib']} optax {env['optax']} "
        f"lars {env['lars']} | backends: {', '.join(backends)}",
        file=sys.stderr,
    )
    # Fewest arrays, then fewest params first, so that a backend far slower than
    # optax to run or to compile (an interpreter, say) shows it on a small
    # workload and is skipped on the larger ones (see measure.History).
    tasks = sorted(
        ((w, d) for w in selected for d in dtypes), key=lambda t: (t[0].n_arrays, t[0].n_params)
    )
    bar = _progress(len(tasks), args.no_progress)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    history = measure.History()
    start = time.perf_counter()
    try:
        for w, d in tasks:
            bar.set_description(f"{w.name} {d}")
            results[(w.name, d)] = measure.measure(w, d, backends, settings, history)
            bar.update(1)
    finally:
        bar.close()
    rows = [r for w in selected for d in dtypes for r in results[(w.name, d)]]
    elapsed = time.perf_counter() - start
    rows = report.with_environment(rows, env)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(report.format_markdown(rows, env))
    written = [out / "results.csv", out / "results.md"]
    if not args.no_plots:
        title = f"LARS step, one array: {env['device']}, jax {env['jax']}, {env['date'][:10]}"
        written += plots.plot_sweep(rows, out, title)

    print(report.format_table(rows))
    summary = report.format_summary(rows)
    if summary:
        print("\n" + summary)
    print(f"\n{len(rows)} rows in {elapsed:.1f} s on {jax.devices()[0]}; wrote:")
    for path in written:
        print(f"  {path}")
    return 0
