"""Checks and times the Pallas LARS kernels on a GPU, in one run (a few minutes).

Run from the repository root on a machine with an NVIDIA Hopper GPU::

    python -m bench.pallas_gpu_check [--out DIR] [--quick]

1. Correctness: the "pallas" backend's ``run`` against the reference's on a
   pytree of awkward shapes (0-d, 1, 127, 4097, 65537 elements, conv kernels,
   empty and zero leaves) for several option sets and dtypes, and the global
   norm pass against float64 NumPy.
2. Timing, on the ResNet-50 parameter set (161 arrays, 25.6M parameters; float32
   and bfloat16 gradients) and on one 64M-element array: the pallas step (for a
   few tile sizes), ``jax.jit`` of the reference step, ``jax.jit(optax.lars)``,
   and a device-to-device copy of the bytes a step must move at least (read w,
   g, v; write w, v). Each step includes applying the update to the params.
   Reported: median and spread of device time per step (``block_until_ready``
   around many steps), the fraction of the copy-derived floor, kernel launches
   per step (from the compiled HLO) and compile time.

Writes ``gpu_check.json`` and ``gpu_check.txt`` to ``--out`` (default: the
``$OUT`` environment variable, else the current directory) and prints the
table. Also runs (lowering only, ``--lower-only``) where there is no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lars
from bench import gpu_check_cases
from bench.hlo import count_launches
from bench.workloads import resnet50_shapes
from lars import _reference
from lars.contract import NUM_SCALARS, LarsConfig, StepInputs, StepSpec
from lars.kernels import pallas
from lars.kernels.pallas import elementwise, gpu_plan, mosaic_gpu

# --------------------------------------------------------------------------
# The steps compared, on flat lists of leaves.


def _run(backend, params, grads, momentum, lr, *, config, decay_mask, trust_mask, **options):
    spec = StepSpec.build(
        config,
        params,
        grads,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        options=tuple(sorted(options.items())),
    )
    return backend.run(spec, StepInputs(params, grads, momentum, jnp.asarray(lr, jnp.float32)))


pallas_step = functools.partial(_run, pallas.BACKEND)
reference_step = functools.partial(_run, _reference.BACKEND)

# --------------------------------------------------------------------------
# Parameter sets.


ODD_SHAPES = [(), (1,), (127,), (4097,), (65537,), (3, 3, 16, 32), (0,), (33,), (5, 3), (1000,)]


def make_leaves(shapes, param_dtype, grad_dtype, seed=0, zero=()):
    rng = np.random.default_rng(seed)
    params, grads, momentum = [], [], []
    for i, s in enumerate(shapes):
        w = rng.standard_normal(s).astype(np.float32) * (0.0 if i in zero else 0.5)
        params.append(jnp.asarray(w, param_dtype))
        grads.append(jnp.asarray(0.05 * rng.standard_normal(s), grad_dtype))
        momentum.append(jnp.asarray(0.01 * rng.standard_normal(s), jnp.float32))
    return params, grads, momentum


# --------------------------------------------------------------------------
# 1. Correctness.

# The option sets of bench.gpu_check (one source), as LarsConfigs.
CONFIGS = {
    "defaults": LarsConfig(),
    "decay_nesterov_clip": LarsConfig(**gpu_check_cases.CONFIGS["decay-nesterov-trustclip-masks"]),
    "everything": LarsConfig(**gpu_check_cases.CONFIGS["everything"]),
}


def max_scaled_error(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if not want.size:
        return 0.0
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(got - want))) / scale


def check_correctness(log) -> dict:
    results = {}
    dtypes = {
        "fp32": (jnp.float32, jnp.float32),
        "bf16_grads": (jnp.float32, jnp.bfloat16),
        "bf16_params": (jnp.bfloat16, jnp.bfloat16),
    }
    for dname, (p_dtype, g_dtype) in dtypes.items():
        params, grads, momentum = make_leaves(ODD_SHAPES, p_dtype, g_dtype, seed=1, zero=(7,))
        grads[8] = jnp.zeros_like(grads[8])
        n = len(params)
        for cname, config in CONFIGS.items():
            for masks_name, masks in {
                "all": ([True] * n, [True] * n),
                "ndim": ([len(s) > 1 for s in ODD_SHAPES], [len(s) > 1 for s in ODD_SHAPES]),
            }.items():
                kw = dict(config=config, decay_mask=masks[0], trust_mask=masks[1])
                lr = jnp.asarray(0.1, jnp.float32)
                got = jax.jit(lambda p, g, v, lr, kw=kw: pallas_step(p, g, v, lr, **kw))(
                    params, grads, momentum, lr
                )
                want = jax.jit(lambda p, g, v, lr, kw=kw: reference_step(p, g, v, lr, **kw))(
                    params, grads, momentum, lr
                )
                errs = {
                    field: max(max_scaled_error(a, b) for a, b in zip(x, y, strict=True))
                    for field, x, y in zip(
                        ("updates", "momentum", "trust_ratio"), got, want, strict=True
                    )
                }
                tol = 2e-2 if dname == "bf16_params" else 1e-5
                ok = all(e <= tol for e in errs.values()) and all(
                    np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(got)
                )
                key = f"{dname}/{cname}/{masks_name}"
                results[key] = {"ok": bool(ok), "max_scaled_error": errs}
                log(f"  {key:40s} {'ok  ' if ok else 'FAIL'} {errs}")
    # Determinism: the same inputs twice, bitwise.
    params, grads, momentum = make_leaves(resnet50_shapes(), jnp.float32, jnp.float32, seed=2)
    n = len(params)
    kw = dict(config=CONFIGS["everything"], decay_mask=[True] * n, trust_mask=[True] * n)
    f = jax.jit(lambda p, g, v, lr: pallas_step(p, g, v, lr, **kw))
    a = f(params, grads, momentum, jnp.asarray(0.1, jnp.float32))
    b = f(params, grads, momentum, jnp.asarray(0.1, jnp.float32))
    same = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    results["resnet50/deterministic"] = {"ok": bool(same)}
    log(f"  resnet50 bitwise deterministic: {same}")
    # The global-norm pass against float64.
    g64 = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads)
    specs = StepSpec.build(
        CONFIGS["everything"], params, grads, decay_mask=[True] * n, trust_mask=[True] * n
    ).leaves
    sums = jax.jit(
        lambda g: mosaic_gpu.leaf_sums(
            None,
            g,
            jnp.zeros((NUM_SCALARS,), jnp.float32),
            flags=elementwise.Flags(),
            leaves=specs,
        )
    )(grads)
    rel = abs(float(jnp.sum(sums[:, 0])) - g64) / g64
    results["resnet50/global_norm_vs_float64"] = {"ok": bool(rel < 1e-5), "rel_error": rel}
    log(f"  resnet50 sum g**2 vs float64: relative error {rel:.2e}")
    return results


# --------------------------------------------------------------------------
# 2. Timing.


def time_step(fn, args, *, n_state: int, warmup=3, iters=30, repeats=5) -> dict:
    """Median and spread of the time of one step.

    ``fn(*args)`` returns new values for the first ``n_state`` arguments
    (params and optimizer state), which are donated and fed back, as in a
    training loop; ``iters`` steps are timed per sample, between
    ``block_until_ready`` calls.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=tuple(range(n_state))).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    launches = count_launches(compiled.as_text())
    state, rest = list(args[:n_state]), list(args[n_state:])

    def run(k):
        nonlocal state
        for _ in range(k):
            out = compiled(*state, *rest)
            state = list(out) if n_state > 1 else [out]
        jax.block_until_ready(state)

    run(warmup)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(iters)
        samples.append((time.perf_counter() - t) / iters)
    return {
        "median_ms": 1e3 * statistics.median(samples),
        "min_ms": 1e3 * min(samples),
        "max_ms": 1e3 * max(samples),
        "launches": launches,
        "compile_s": compile_s,
    }


def flat_step(step_fn, config, masks):
    """A training step on flat lists: (params, momentum, grads, lr) -> (params, momentum)."""

    def f(params, momentum, grads, lr):
        res = step_fn(params, grads, momentum, lr, config=config, **masks)
        new = [(w + u).astype(w.dtype) for w, u in zip(params, res.updates, strict=True)]
        return new, res.momentum

    return f


def _optax_step(tx, params, state, grads, lr):
    del lr
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def timing(log, quick: bool, smoke: bool = False) -> dict:
    results = {}
    # Samples: warmup steps, then `repeats` samples of `iters` steps each.
    counts = dict(warmup=1, iters=1, repeats=2) if smoke else dict(warmup=3, iters=30, repeats=5)
    workloads = {"resnet50": resnet50_shapes(), "one_64M": [(64 * 1024 * 1024,)]}
    grad_dtypes = {"fp32": jnp.float32, "bf16_grads": jnp.bfloat16}
    tiles = [gpu_plan.TILE] if quick else sorted({2048, gpu_plan.TILE, 8192})
    if smoke:  # the harness on a CPU: tiny workloads, kernels in interpret mode
        workloads = {"small": [(300,), (5, 3), (1000,)]}
        grad_dtypes = {"fp32": jnp.float32}
        tiles = [512]
    config = LarsConfig(momentum=0.9, weight_decay=5e-5, trust_coefficient=0.001)
    lr = jnp.asarray(0.1, jnp.float32)
    for wname, shapes in workloads.items():
        n_params = sum(math.prod(s) for s in shapes)
        for gname, g_dtype in grad_dtypes.items():
            key = f"{wname}/{gname}"
            params, grads, momentum = make_leaves(shapes, jnp.float32, g_dtype, seed=3)
            n = len(params)
            masks = dict(decay_mask=[True] * n, trust_mask=[True] * n)
            g_bytes = np.dtype(g_dtype).itemsize
            floor_bytes = n_params * (4 + g_bytes + 4 + 4 + 4)  # read w, g, v; write w, v
            row: dict[str, Any] = {"n_arrays": n, "n_params": n_params, "floor_bytes": floor_bytes}

            # Device-to-device copy of floor_bytes (read + write floor_bytes / 2 each).
            buf = jnp.zeros((floor_bytes // 8,), jnp.float32)
            copy = time_step(lambda x: x + 1.0, (buf,), n_state=1, **counts)
            bandwidth = floor_bytes / (copy["median_ms"] * 1e-3)
            row["copy"] = {**copy, "GB_per_s": bandwidth / 1e9}
            del buf

            impls = {"reference": flat_step(reference_step, config, masks)}
            for tile in tiles:
                step = functools.partial(pallas_step, kernel="mosaic_gpu", tile=tile)
                impls[f"pallas_tile{tile}"] = flat_step(step, config, masks)
            tx = optax.lars(0.1, weight_decay=5e-5, trust_coefficient=0.001, momentum=0.9)
            optax_step = functools.partial(_optax_step, tx)

            for name, fn in impls.items():
                try:
                    r = time_step(
                        fn,
                        ([jnp.copy(x) for x in params], [jnp.copy(v) for v in momentum], grads, lr),
                        n_state=2,
                        **counts,
                    )
                    r["fraction_of_floor"] = (floor_bytes / bandwidth) / (r["median_ms"] * 1e-3)
                    row[name] = r
                except Exception as e:  # keep going: report what failed
                    row[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                    traceback.print_exc()
                log(f"  {key:22s} {name:18s} {row[name]}")
            try:
                tree_p = {str(i): jnp.copy(x) for i, x in enumerate(params)}
                tree_g = {str(i): x for i, x in enumerate(grads)}
                r = time_step(
                    optax_step, (tree_p, tx.init(tree_p), tree_g, lr), n_state=2, **counts
                )
                r["fraction_of_floor"] = (floor_bytes / bandwidth) / (r["median_ms"] * 1e-3)
                row["optax_lars"] = r
            except Exception as e:
                row["optax_lars"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"  {key:22s} {'optax_lars':18s} {row['optax_lars']}")
            log(f"  {key:22s} {'copy':18s} {row['copy']}")
            results[key] = row
    return results


def lowering_only(log) -> dict:
    """Lowers the ResNet-50 step for "cuda" (no GPU needed); reports the time."""
    shapes = resnet50_shapes()
    params, grads, momentum = make_leaves(shapes, jnp.float32, jnp.bfloat16, seed=4)
    n = len(params)
    kw = dict(
        config=CONFIGS["everything"],
        decay_mask=[True] * n,
        trust_mask=[True] * n,
        kernel="mosaic_gpu",
        interpret=False,
    )
    t0 = time.perf_counter()
    text = (
        jax.jit(lambda p, g, v, lr: pallas_step(p, g, v, lr, **kw))
        .trace(params, grads, momentum, jnp.asarray(0.1, jnp.float32))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    seconds = time.perf_counter() - t0
    calls = text.count("custom_call @mosaic_gpu")
    log(f"  resnet50 step lowered for cuda in {seconds:.1f} s: {calls} Mosaic GPU kernels")
    return {"lower_s": seconds, "mosaic_gpu_custom_calls": calls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="one tile size only")
    parser.add_argument("--lower-only", action="store_true", help="no GPU: lowering only")
    parser.add_argument("--smoke", action="store_true", help="no GPU: the harness, tiny inputs")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    device = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": getattr(device, "device_kind", str(device)),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "optax": optax.__version__,
        "lars": lars.__version__,
        "python": platform.python_version(),
        "tile_default": gpu_plan.TILE,
    }
    log(f"environment: {env}")
    out: dict[str, Any] = {"environment": env}
    if args.smoke:
        log("timing harness on tiny inputs (interpret mode, numbers meaningless):")
        out["timing"] = timing(log, True, smoke=True)
    else:
        log("lowering (ResNet-50, cuda):")
        out["lowering"] = lowering_only(log)
    if not (args.lower_only or args.smoke):
        if jax.default_backend() != "gpu":
            log("no GPU: stopping after the lowering check")
            return 1
        log("correctness (pallas vs reference_step):")
        out["correctness"] = check_correctness(log)
        log("timing (ms per step, including applying the update):")
        out["timing"] = timing(log, args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    failed = [k for k, v in out.get("correctness", {}).items() if not v.get("ok")]
    if failed:
        log(f"FAILED checks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
