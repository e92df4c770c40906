"""Test data, the float64 oracle and lowering helpers shared by the Pallas kernel tests."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from backend_cases import ALL_OPTIONS

from lars.contract import NUM_SCALARS, LeafSpec, Scalar
from lars.kernels.pallas import elementwise as ew

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)

ALL_ON = ALL_OPTIONS
FLAG_SETS = {"plain": ew.Flags(), "all": ALL_ON}


def _scalars(**values) -> np.ndarray:
    out = np.zeros(NUM_SCALARS, np.float32)
    for name, value in values.items():
        out[Scalar[name]] = value
    return out


# The kernels' run-time scalars (contract.Scalar). FINITE is 0: a kernel that
# read it without flags.skip_nonfinite would skip every step.
SCALARS = _scalars(
    LR=0.3,
    MOMENTUM=0.9,
    WEIGHT_DECAY=0.05,
    CLIP_DIVISOR=4.0,  # ||g||
    CLIP_FACTOR=1.5,  # the max norm
    CLIP_VALUE=0.4,
    TRUST_COEFFICIENT=0.02,
    EPS=1e-8,
    TRUST_CLIP=0.05,
    FINITE=0.0,
)

# Small blocks, so that the test leaves span several full blocks plus remainders.
TPU_BLOCKS = {"block_rows": 32, "block_lanes": 256}
GPU_TILE = 512


# --------------------------------------------------------------------------
# Test data and the float64 oracle.


@dataclasses.dataclass
class Leaves:
    specs: list
    shapes: list
    params: list
    grads: list
    momentum: list
    ratios: np.ndarray


def make_leaves(shapes, dtypes, seed=0) -> Leaves:
    """Leaves of the given shapes and (param, grad) dtypes; every 2nd leaf decays."""
    rng = np.random.default_rng(seed)
    specs, params, grads, momentum = [], [], [], []
    for i, (shape, (p_dtype, g_dtype)) in enumerate(zip(shapes, dtypes, strict=True)):
        specs.append(LeafSpec(tuple(shape), p_dtype, g_dtype, F32, decay=i % 2 == 0, trust=True))
        params.append(jnp.asarray(rng.standard_normal(shape), p_dtype))
        grads.append(jnp.asarray(0.5 * rng.standard_normal(shape), g_dtype))
        momentum.append(jnp.asarray(0.1 * rng.standard_normal(shape), F32))
    ratios = rng.uniform(0.05, 1.0, len(shapes)).astype(np.float32)
    return Leaves(specs, list(shapes), params, grads, momentum, ratios)


def options(**values) -> tuple:
    """``StepSpec.options`` (sorted (name, value) pairs) from keyword arguments."""
    return tuple(sorted(values.items()))


def leaf_spec(size: int, dtype=F32) -> LeafSpec:
    """A 1-D leaf of ``size`` elements, decayed and trust-ratio scaled."""
    return LeafSpec((size,), dtype, dtype, F32, decay=True, trust=True)


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def oracle_grad(g, w, scalars, flags, decay) -> np.ndarray:
    s = scalars.astype(np.float64)
    if flags.clip_norm:
        g = g / s[Scalar.CLIP_DIVISOR] * s[Scalar.CLIP_FACTOR]
    if flags.clip_value:
        g = np.clip(g, -s[Scalar.CLIP_VALUE], s[Scalar.CLIP_VALUE])
    if decay:
        g = g + s[Scalar.WEIGHT_DECAY] * w
    return g


def oracle_sums(leaves: Leaves, flags, with_params=True) -> np.ndarray:
    rows = []
    for spec, w, g in zip(leaves.specs, leaves.params, leaves.grads, strict=True):
        w, g = f64(w).ravel(), f64(g).ravel()
        if not with_params:
            rows.append([np.sum(g * g), 0.0])
        else:
            u = oracle_grad(g, w, SCALARS, flags, spec.decay)
            rows.append([np.sum(w * w), np.sum(u * u)])
    return np.asarray(rows)


def oracle_update(leaves: Leaves, flags):
    s = SCALARS.astype(np.float64)
    lr, mu = s[Scalar.LR], s[Scalar.MOMENTUM]
    out = []
    for i, spec in enumerate(leaves.specs):
        w, g, v = f64(leaves.params[i]), f64(leaves.grads[i]), f64(leaves.momentum[i])
        u = oracle_grad(g, w, SCALARS, flags, spec.decay) * np.float64(leaves.ratios[i])
        if flags.lr_inside_momentum:
            u = lr * u
        v_new = u + mu * v
        direction = u + mu * v_new if flags.nesterov else v_new
        step = direction if flags.lr_inside_momentum else lr * direction
        out.append((-step, v_new))
    return out


def assert_close(got, want, rtol, what):
    """|got - want| <= rtol * max|want| (errors judged against the leaf's scale)."""
    got, want = f64(got), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= rtol * scale + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def bits(x) -> np.ndarray:
    """The raw bytes of an array (tells -0.0 from 0.0 and NaN payloads apart)."""
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def aliased_operands(text: str) -> list[set[int]]:
    """Per custom call in lowered StableHLO, the operand indices it aliases to outputs."""
    pattern = r"output_tuple_indices = \[\d+\], operand_index = (\d+)"
    return [
        {int(i) for i in re.findall(pattern, line)}
        for line in text.splitlines()
        if "stablehlo.custom_call" in line
    ]


def mosaic_tpu_kernels(text: str) -> list[str]:
    """The Mosaic TPU kernels of lowered StableHLO, as MLIR text.

    Each ``tpu_custom_call`` carries its kernel as base64 MLIR bytecode in its
    backend config, in Mosaic's serialized form; it is parsed here with the TPU
    dialect registered and deserialized (``mosaic-serde``), as jax does when it
    downgrades a kernel, so the text names ops as written (``arith.subf``).
    """
    import base64
    import json

    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import tpu
    from jax._src.lib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    kernels = []
    for config in re.findall(r'backend_config = "(\{\\22custom_call_config.*?)"', text):
        body = json.loads(config.replace("\\22", '"'))["custom_call_config"]["body"]
        context = jax_mlir.make_ir_context()
        tpu.register_dialect(context)
        with context, ir.Location.unknown():
            context.allow_unregistered_dialects = True
            module = ir.Module.parse(base64.b64decode(body))
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
            kernels.append(str(module))
    return kernels


def mosaic_ops(kernel: str) -> set[str]:
    """The names of the ops in a kernel's MLIR text (e.g. ``arith.subf``)."""
    return set(re.findall(r"\b((?:arith|math|tpu|vector|scf|memref)\.[a-z_0-9]+)\b", kernel))
