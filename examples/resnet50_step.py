"""Step time of a synthetic ImageNet-shaped ResNet-50 training step, and the optimizer's share.

For every backend in ``lars.available_backends()``, plus ``jax.jit(optax.lars)``
for comparison, this times (median over ``--steps`` runs, after warmup):

- ``step``: a full jitted training step (forward, backward, optimizer, apply),
  with the training state donated;
- ``fwd_bwd``: the same step without the optimizer (forward and backward only);
- ``optimizer``: the optimizer update and apply alone, on fixed gradients,
  with parameters and optimizer state donated.

The optimizer's share of the step is ``(step - fwd_bwd) / step``; ``optimizer
/ step`` is the share measured directly. Results go to a CSV (with the
device, versions and date). On a CPU, smoke-run it at a tiny size::

  python -m examples.resnet50_step --batch 2 --image-size 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
LR, MOMENTUM, WEIGHT_DECAY, TRUST = 0.1, 0.9, 5e-5, 0.001


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``python -m examples.resnet50_step --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m examples.resnet50_step",
        description="Time a synthetic ResNet-50 training step and the LARS update's share "
        "of it, for each lars backend and for jax.jit(optax.lars).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=256, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="image side (pixels)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype")
    p.add_argument("--steps", type=int, default=20, help="timed repetitions of each function")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    p.add_argument(
        "--backends",
        nargs="+",
        help="lars backends to time (default: all available) plus 'optax' for optax.lars",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the CSV")
    args = p.parse_args(argv)
    for name in ("batch", "image_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.image_size < 32:
        p.error("--image-size must be >= 32 (ResNet-50 downsamples 32x)")
    return args


def _time(fn: Callable[[], object], steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (each call waited for)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def make_optimizers(names: Sequence[str] | None) -> dict[str, object]:
    """``{label: optax.GradientTransformation}``: lars backends and optax.lars."""
    import optax

    import lars

    names = list(names) if names else [*lars.available_backends(), "optax"]
    mask = lars.exclude_bias_and_norm
    txs = {}
    for name in names:
        if name == "optax":
            txs["optax.lars"] = optax.lars(
                LR,
                weight_decay=WEIGHT_DECAY,
                weight_decay_mask=mask,
                trust_coefficient=TRUST,
                trust_ratio_mask=mask,
                momentum=MOMENTUM,
            )
        else:
            txs[f"lars[{name}]"] = lars.lars(
                LR,
                momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY,
                trust_coefficient=TRUST,
                weight_decay_mask=mask,
                trust_ratio_mask=mask,
                backend=name,
            )
    return txs


def benchmark(args: argparse.Namespace) -> list[dict]:
    """Builds the model and data, times each optimizer; returns CSV rows."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from examples import training
    from examples.models import ResNet50

    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    model = ResNet50(dtype=dtype, rngs=nnx.Rngs(0))
    key_x, key_y = jax.random.split(jax.random.key(0))
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = jax.random.normal(key_x, shape, jnp.float32).astype(dtype)
    labels = jax.random.randint(key_y, (args.batch,), 0, 1000)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def loss_fn(params, batch_stats, x, y):
        m = nnx.merge(graphdef, params, batch_stats, copy=True)
        loss = training.cross_entropy(m(x), y)
        return loss, nnx.state(m, nnx.BatchStat)

    @jax.jit
    def fwd_bwd(params, batch_stats, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, stats), grads = grad_fn(params, batch_stats, x, y)
        return loss, stats, grads

    def run_fwd_bwd():
        return fwd_bwd(params, batch_stats, images, labels)

    t_fwd_bwd = _time(run_fwd_bwd, args.steps, args.warmup)
    _, _, grads = run_fwd_bwd()
    device = jax.devices()[0]
    rows = []
    for label, tx in make_optimizers(args.backends).items():
        step = training.make_train_step(graphdef, tx)
        holder = [training.TrainState(*jax.tree.map(jnp.copy, (params, batch_stats)), None)]
        holder[0] = holder[0]._replace(opt_state=tx.init(holder[0].params))

        def run_step(step=step, holder=holder):
            holder[0], metrics = step(holder[0], images, labels)
            return metrics["loss"]

        t_step = _time(run_step, args.steps, args.warmup)

        def apply(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        update = jax.jit(apply, donate_argnums=(0, 1))
        ps = [jax.tree.map(jnp.copy, params), tx.init(params)]

        def run_update(update=update, ps=ps):
            ps[0], ps[1] = update(ps[0], ps[1], grads)
            return ps[0]

        t_opt = _time(run_update, args.steps, args.warmup)
        rows.append(
            {
                "optimizer": label,
                "batch": args.batch,
                "image_size": args.image_size,
                "dtype": args.dtype,
                "params": n_params,
                "step_ms": round(t_step, 3),
                "fwd_bwd_ms": round(t_fwd_bwd, 3),
                "optimizer_ms": round(t_opt, 3),
                "optimizer_share_from_difference": round((t_step - t_fwd_bwd) / t_step, 4),
                "optimizer_share_measured": round(t_opt / t_step, 4),
                "device": f"{device.platform}: {device.device_kind}",
                "jax": metadata.version("jax"),
                "jaxlib": metadata.version("jaxlib"),
                "flax": metadata.version("flax"),
                "optax": metadata.version("optax"),
                "lars": metadata.version("lars"),
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            }
        )
        del holder, ps
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints a table and writes the CSV; returns the exit status."""
    args = parse_args(argv)
    rows = benchmark(args)
    device = re.sub(r"[^A-Za-z0-9]+", "-", rows[0]["device"]).strip("-").lower()
    path = args.out / f"resnet50_step_{device}_b{args.batch}_{args.image_size}_{args.dtype}.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"ResNet-50, batch {args.batch}, {args.image_size}x{args.image_size}, {args.dtype}, "
        f"{rows[0]['params']:,} parameters, on {rows[0]['device']}"
    )
    print(f"{'optimizer':<22}{'step ms':>10}{'fwd+bwd ms':>12}{'opt ms':>10}{'opt share':>11}")
    for r in rows:
        print(
            f"{r['optimizer']:<22}{r['step_ms']:>10.2f}{r['fwd_bwd_ms']:>12.2f}"
            f"{r['optimizer_ms']:>10.2f}{100 * r['optimizer_share_measured']:>10.1f}%"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
