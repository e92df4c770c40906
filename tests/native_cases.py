"""Test data and helpers shared by the native backend's tests (test_native*.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lars.contract import LarsConfig, StepSpec
from lars.kernels import native


def require_native() -> None:
    """Fails (never skips) the calling test when the native library cannot run here."""
    reason = native.BACKEND.unavailable(jax.default_backend())
    if reason is not None:
        pytest.fail(f"the native backend is unavailable: {reason}")


# Odd shapes: 0-d, tiny, odd, just over a SIMD width, just over one chunk
# (65,536 elements), a conv kernel, empty leaves, zero-weight / zero-grad /
# all-zero leaves, and consecutive multi-chunk leaves.
SHAPES = {
    "scalar": (),
    "one": (1,),
    "odd": (127,),
    "mid": (4097,),
    "chunk_plus_one": (65537,),
    "conv": (3, 3, 16, 32),
    "empty": (0,),
    "empty2": (2, 0, 3),
    "zero_w": (33,),
    "zero_g": (5, 3),
    "dead": (6,),
    "three_chunks": (140001,),
    "two_chunks": (70000,),
    "bias": (32,),
}
NAMES = list(SHAPES)
ZERO_W = {"zero_w", "dead"}
ZERO_G = {"zero_g", "dead"}
STEPS = 10

DECAY_MASK = [i % 3 != 1 for i in range(len(SHAPES))]
TRUST_MASK = [len(s) != 1 or n == "chunk_plus_one" for n, s in SHAPES.items()]

CONFIGS = {
    "defaults": {},
    "no_momentum": {"momentum": 0.0},
    "weight_decay": {"weight_decay": 0.05},
    "nesterov": {"nesterov": True, "weight_decay": 0.01},
    "trust_clip": {"trust_clip": 0.1},
    "lr_inside_momentum": {"lr_inside_momentum": True, "eps": 0.0},
    "clip_norm_triggered": {"grad_clip_norm": 1.0, "weight_decay": 0.05},
    "clip_norm_not_triggered": {"grad_clip_norm": 1e6},
    "clip_value": {"grad_clip_value": 0.05},
    "both_clips": {"grad_clip_norm": 2.0, "grad_clip_value": 0.01, "weight_decay": 0.05},
    "large_eps": {"eps": 0.5},
    "everything": {
        "momentum": 0.8,
        "weight_decay": 0.05,
        "nesterov": True,
        "trust_clip": 0.1,
        "grad_clip_norm": 5.0,
        "grad_clip_value": 0.15,
        "eps": 1e-3,
        "lr_inside_momentum": True,
    },
}


def config_of(name: str) -> LarsConfig:
    return LarsConfig(**{"trust_coefficient": 0.02, **CONFIGS[name]})


def lr_at(t: int) -> float:
    """A learning rate that changes every step (exercises the lr buffer)."""
    return 0.5 * 0.9**t


def make_leaves(seed: int = 0, shapes: dict | None = None):
    """Float64 params and per-step grads: per-leaf scales spread the ratios."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    w_scales = np.geomspace(0.05, 3.0, len(shapes))
    g_scales = np.geomspace(0.3, 0.03, len(shapes))
    params, grads = [], [[] for _ in range(STEPS)]
    for (name, shape), ws, gs in zip(shapes.items(), w_scales, g_scales, strict=True):
        params.append(np.zeros(shape) if name in ZERO_W else ws * rng.standard_normal(shape))
        for t in range(STEPS):
            g = np.zeros(shape) if name in ZERO_G else gs * rng.standard_normal(shape)
            grads[t].append(g)
    return params, grads


def spec_of(
    config: LarsConfig,
    params: list,
    grads: list,
    decay_mask: Any = None,
    trust_mask: Any = None,
    **fields: Any,
) -> StepSpec:
    """The StepSpec of a step on these leaves (masks all True unless given)."""
    n = len(params)
    return StepSpec.build(
        config,
        params,
        grads,
        decay_mask=[True] * n if decay_mask is None else decay_mask,
        trust_mask=[True] * n if trust_mask is None else trust_mask,
        **fields,
    )


def big_problem(seed: int = 5):
    """1.6M float32 parameters in five leaves, three of them several chunks long."""
    shapes = {"a": (1_000_003,), "b": (3, 3, 64, 64), "c": (64,), "d": (300_001,), "e": ()}
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes.values()]
    grads = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in shapes.values()]
    momentum = [jnp.asarray(rng.standard_normal(s) * 0.01, jnp.float32) for s in shapes.values()]
    return params, grads, momentum


def param_bytes(params) -> int:
    return sum(p.size * p.dtype.itemsize for p in params)


def assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def small():
    """Two small float32 leaves: params, grads, momentum."""
    p = [jnp.ones((3,), jnp.float32), jnp.ones((2, 2), jnp.float32)]
    g = [jnp.full((3,), 0.1, jnp.float32), jnp.full((2, 2), 0.1, jnp.float32)]
    v = [jnp.zeros((3,), jnp.float32), jnp.zeros((2, 2), jnp.float32)]
    return p, g, v
