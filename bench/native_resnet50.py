"""Times the native LARS step on the ResNet-50 parameter set against its anchors.

Run from the repository root with ``python -m bench.native_resnet50``
(``--help`` for options; ``--rounds 1 --steps 1`` for a quick run). The
recorded run is ``bench/results/native_resnet50_cpu.json``. Every variant is a
``jax.jit`` of a full step (update and apply) with params and state donated
and the learning rate passed as a device array:

* ``optax.lars``: ``jax.jit(optax.lars)``, the baseline a JAX user has today;
* ``reference``: ``lars.lars(backend="reference")``;
* ``native``: ``lars.lars(backend="native")`` (updates, then
  ``optax.apply_updates``);
* ``native_apply``: the native backend's step alone writing the new params in
  place (``lars.kernels.native.run`` with ``StepSpec.write_params``);
* ``Lars:<backend>``: ``lars.Lars(...).update(grads)`` (jitted inside, without
  donation);
* ``train:<name>``: the first three inside a training step that computes the
  gradients in the same program (``g = c * p``, the gradient of
  ``0.5 * c * sum(p**2)``, materialized as backprop leaves real gradients).

and three memory-bandwidth floors, each moving 20 bytes per parameter:

* ``copy``: an XLA copy of 10 bytes per parameter into a donated buffer;
* ``numpy_copy``: ``numpy.copyto`` of the same bytes (one thread);
* ``inplace_scale``: an XLA in-place ``x * c`` of 10 bytes per parameter
  (reads and writes the same lines, like an in-place optimizer step).

The variants run interleaved, round after round, so that load from other
processes hits all of them alike; per-round ratios and their medians are
printed. ResNet-50: 53 conv kernels (HWIO), a BatchNorm scale and offset per
conv, fc (2048, 1000) and (1000,): 161 arrays, 25,557,032 parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lars
from lars import contract
from lars.kernels import native


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (HWIO conv kernels)."""
    shapes: list[tuple[int, ...]] = [(7, 7, 3, 64), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = width * 4
        for b in range(blocks):
            for shape in ((1, 1, cin, width), (3, 3, width, width), (1, 1, width, out)):
                shapes += [shape, (shape[-1],), (shape[-1],)]
            if b == 0:
                shapes += [(1, 1, cin, out), (out,), (out,)]
            cin = out
    shapes += [(2048, 1000), (1000,)]
    return shapes


def _arrays(shapes: list[tuple[int, ...]], seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05) for s in shapes]


def make_variants(
    shapes: list[tuple[int, ...]], weight_decay: float
) -> dict[str, tuple[Callable, list]]:
    """name -> (jitted step, its initial argument list); arg 0 and 1 are donated."""
    variants: dict[str, tuple[Callable, list]] = {}
    lr = jnp.asarray(0.1, jnp.float32)

    def optimizer_step(make_opt: Callable) -> Callable:
        def step(params, state, grads, lr):
            opt = make_opt(lambda count: lr)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step, donate_argnums=(0, 1))

    def train_step(make_opt: Callable) -> Callable:
        # The gradients are computed in the same program (as in a training
        # step): here of 0.5 * c * sum(p**2), i.e. g = c * p, materialized in
        # memory as backprop through conv and dense layers leaves them (the
        # barrier keeps XLA from fusing this toy gradient into the optimizer).
        def step(params, state, c, lr):
            grads = jax.grad(lambda p: 0.5 * c * sum(jnp.sum(x * x) for x in p))(params)
            grads = jax.lax.optimization_barrier(grads)
            opt = make_opt(lambda count: lr)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step, donate_argnums=(0, 1))

    makers = {
        "optax.lars": lambda lr_fn: optax.lars(lr_fn, weight_decay=weight_decay, momentum=0.9),
        "reference": lambda lr_fn: lars.lars(
            lr_fn, weight_decay=weight_decay, momentum=0.9, backend="reference"
        ),
        "native": lambda lr_fn: lars.lars(
            lr_fn, weight_decay=weight_decay, momentum=0.9, backend="native"
        ),
    }
    for seed, (name, make_opt) in enumerate(makers.items()):
        params = _arrays(shapes, seed)
        grads = _arrays(shapes, seed + 100)
        state = make_opt(lambda count: 0.1).init(params)
        variants[name] = (optimizer_step(make_opt), [params, state, grads, lr])
        params = _arrays(shapes, seed + 200)
        state = make_opt(lambda count: 0.1).init(params)
        c = jnp.asarray(0.01, jnp.float32)
        variants["train:" + name] = (train_step(make_opt), [params, state, c, lr])

    # lars.Lars (the braintools-style object: its step is jitted without
    # donation, so every step writes fresh buffers).
    for seed, backend in enumerate(("reference", "native")):
        opt = lars.Lars(0.1, momentum=0.9, weight_decay=weight_decay, backend=backend)
        opt.register_trainable_weights(_arrays(shapes, seed + 300))

        def lars_object_step(opt, grads, lr):
            opt.update(grads)
            return opt, grads

        variants["Lars:" + backend] = (lars_object_step, [opt, _arrays(shapes, seed + 400), lr])

    params = _arrays(shapes, 10)
    mask = [True] * len(shapes)
    spec = contract.StepSpec.build(
        contract.LarsConfig(momentum=0.9, weight_decay=weight_decay),
        params,
        params,
        decay_mask=mask,
        trust_mask=mask,
        write_params=True,
    )

    def apply_step(params, momentum, grads, lr):
        result = native.run(spec, contract.StepInputs(params, grads, momentum, lr))
        return result.updates, result.momentum

    momentum = [jnp.zeros(s, jnp.float32) for s in shapes]
    variants["native_apply"] = (
        jax.jit(apply_step, donate_argnums=(0, 1)),
        [params, momentum, _arrays(shapes, 110), lr],
    )
    return variants


def make_floors(num_params: int) -> dict[str, tuple[Callable, list]]:
    """Copies of 10 bytes per parameter (20 bytes moved per parameter)."""
    n = int(num_params * 2.5)
    copy = jax.jit(lambda dst, src: jax.lax.dynamic_update_slice(dst, src, (0,)), donate_argnums=0)
    scale = jax.jit(lambda x, c: x * c, donate_argnums=0)
    src_np = np.ones(n, np.float32)
    dst_np = np.zeros(n, np.float32)

    def numpy_copy(dst, src):
        np.copyto(dst, src)
        return dst

    return {
        "copy": (copy, [jnp.zeros(n, jnp.float32), jnp.ones(n, jnp.float32)]),
        "numpy_copy": (numpy_copy, [dst_np, src_np]),
        "inplace_scale": (scale, [jnp.ones(n, jnp.float32), jnp.asarray(1.0, jnp.float32)]),
    }


def bytes_per_step(params: list[Any], grads: list[Any]) -> int:
    """The ideal memory traffic of one in-place step: read w, g, v; write w, v."""
    total = 0
    for p, g in zip(params, grads, strict=True):
        size = math.prod(np.shape(p))
        v_bytes = contract.compute_dtype(p.dtype).itemsize
        total += size * (2 * np.dtype(p.dtype).itemsize + np.dtype(g.dtype).itemsize + 2 * v_bytes)
    return total


def _run(fn: Callable, args: list, steps: int) -> float:
    """Runs ``steps`` steps (feeding donated outputs back); returns seconds per step."""
    jax.block_until_ready([a for a in args if not isinstance(a, lars.Lars)])
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
        if isinstance(out, tuple):
            args[0], args[1] = out
        else:
            args[0] = out
    jax.block_until_ready(args[0].params if isinstance(args[0], lars.Lars) else args[0])
    return (time.perf_counter() - start) / steps


def _cpu_model() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def temp_bytes(fn: Callable, args: list) -> int | None:
    """XLA's temporary allocation for one call (None for non-jitted functions)."""
    if not hasattr(fn, "lower"):
        return None
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def measure(rounds: int, steps: int, weight_decay: float, threads: int) -> dict[str, Any]:
    """Times every variant and floor; returns the numbers (also printed)."""
    native.set_num_threads(threads)
    shapes = resnet50_shapes()
    num_params = sum(math.prod(s) for s in shapes)
    leaves = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    step_bytes = bytes_per_step(leaves, leaves)  # 20 bytes per parameter
    entries = {**make_variants(shapes, weight_decay), **make_floors(num_params)}
    temps = {name: temp_bytes(fn, args) for name, (fn, args) in entries.items()}
    for fn, args in entries.values():  # compile and warm up
        _run(fn, args, 2)
    times: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(rounds):
        for name, (fn, args) in entries.items():
            times[name].append(_run(fn, args, steps))
    t = {name: np.asarray(v) for name, v in times.items()}
    floor_name = min(("copy", "numpy_copy", "inplace_scale"), key=lambda k: np.median(t[k]))
    ratios = {
        "optax.lars / native_apply": t["optax.lars"] / t["native_apply"],
        "optax.lars / native": t["optax.lars"] / t["native"],
        "reference / native_apply": t["reference"] / t["native_apply"],
        "reference / native": t["reference"] / t["native"],
        "train: optax.lars / native": t["train:optax.lars"] / t["train:native"],
        "train: reference / native": t["train:reference"] / t["train:native"],
        "Lars: reference / native": t["Lars:reference"] / t["Lars:native"],
        f"native_apply / floor ({floor_name})": t["native_apply"] / t[floor_name],
        f"native / floor ({floor_name})": t["native"] / t[floor_name],
    }
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average_after": os.getloadavg()[0],
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
        "optax": optax.__version__,
        "native_isa": native.cpu_isa(),
        "threads": threads,
        "num_params": num_params,
        "num_arrays": len(shapes),
        "rounds": rounds,
        "steps_per_round": steps,
        "ms_median": {k: float(np.median(v) * 1e3) for k, v in t.items()},
        "ms_min": {k: float(np.min(v) * 1e3) for k, v in t.items()},
        "ratio_median": {k: float(np.median(v)) for k, v in ratios.items()},
        "bandwidth_GBps": {
            k: float(step_bytes / np.median(t[k]) / 1e9)
            for k in ("copy", "numpy_copy", "inplace_scale", "native_apply")
        },
        "temp_bytes": temps,
        "param_bytes": 4 * num_params,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="native threads (0: auto)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = measure(args.rounds, args.steps, args.weight_decay, args.threads)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
