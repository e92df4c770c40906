"""The cases, the test pytree and the per-dtype tolerances of the backend suite.

``backend_base.BackendTests`` runs every backend through these: each ``Case``
is a set of ``lars.lars`` keyword arguments with an independent float64 form
for the oracle (``oracle.py``), ``make_problem`` builds the pytree of awkward
shapes (0-d, 1, 127, 4097, 65537, a conv kernel, empty and zero leaves), and
``assert_matches_oracle`` compares a run with the oracle leaf by leaf within
``TOLERANCES`` (whose numbers are explained beside them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle

import lars
from lars.contract import StepFlags

# --------------------------------------------------------------------------
# Learning rates: each comes with an independent float64 formula for the oracle.

LR = 0.5


def warmup_cosine(count: Any) -> Any:
    """The schedule under test (optax, float32 on device)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.05, peak_value=0.5, warmup_steps=3, decay_steps=12, end_value=0.02
    )(count)


def warmup_cosine_f64(t: int) -> float:
    """``warmup_cosine`` written out in float64: linear warmup, then cosine decay."""
    if t < 3:
        return 0.05 + (0.5 - 0.05) * t / 3
    progress = min(t - 3, 9) / 9
    return 0.02 + (0.5 - 0.02) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------
# The cases: lars.lars keyword arguments (except the learning rate and masks).

BASE_KWARGS = {"momentum": 0.9, "trust_coefficient": 0.02, "eps": 1e-8}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the optimizer.

    Attributes:
      name: The test id.
      kwargs: Overrides of ``BASE_KWARGS`` (``lars.lars`` keyword arguments).
      schedule: Use ``warmup_cosine`` instead of the constant ``LR``.
      decay_mask: How ``weight_decay_mask`` is given (see ``MASKS``), or None.
      trust_mask: How ``trust_ratio_mask`` is given, or None.
      base: Start from ``BASE_KWARGS`` (False: the package's defaults, lr 1.0).
    """

    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    schedule: bool = False
    decay_mask: str | None = None
    trust_mask: str | None = None
    base: bool = True

    def lars_kwargs(self) -> dict:
        return {**(BASE_KWARGS if self.base else {}), **self.kwargs}

    def learning_rate(self) -> float | Callable:
        return warmup_cosine if self.schedule else (LR if self.base else 1.0)

    def oracle_config(self) -> oracle.OracleConfig:
        lr = warmup_cosine_f64 if self.schedule else (LR if self.base else 1.0)
        return oracle.OracleConfig(learning_rate=lr, **self.lars_kwargs())


DECAY = 0.05
CLIP = 0.1  # below most leaves' ratio eta*||w||/||g|| in the tree below

CASES = [
    Case("defaults"),
    Case("package_defaults", base=False),
    Case("no_momentum", {"momentum": 0.0}),
    Case("weight_decay", {"weight_decay": DECAY}),
    Case("decay_mask_tree", {"weight_decay": DECAY}, decay_mask="ndim_tree"),
    Case("decay_mask_callable", {"weight_decay": DECAY}, decay_mask="callable"),
    Case("trust_mask_prefix", trust_mask="prefix"),
    Case("both_masks", {"weight_decay": DECAY}, decay_mask="callable", trust_mask="callable"),
    Case("nesterov", {"nesterov": True}),
    Case("trust_clip", {"trust_clip": CLIP}),
    Case("trust_clip_masked", {"trust_clip": CLIP, "weight_decay": DECAY}, trust_mask="ndim_tree"),
    Case("schedule", schedule=True),
    Case("lr_inside_momentum", {"lr_inside_momentum": True}, schedule=True),
    Case(
        "optax_form_nesterov",
        {"lr_inside_momentum": True, "nesterov": True, "eps": 0.0, "weight_decay": DECAY},
        schedule=True,
        decay_mask="prefix",
    ),
    Case("grad_clip_norm", {"grad_clip_norm": 1.0, "weight_decay": DECAY}),
    Case("grad_clip_value", {"grad_clip_value": 0.05}),
    Case("large_eps", {"eps": 0.5}),
    Case(
        "everything",
        {
            "momentum": 0.8,
            "weight_decay": DECAY,
            "nesterov": True,
            "trust_clip": CLIP,
            "grad_clip_norm": 5.0,
            "grad_clip_value": 0.15,
            "eps": 1e-3,
            "lr_inside_momentum": True,
        },
        schedule=True,
        decay_mask="prefix",
        trust_mask="callable",
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# Every option and mask form of CASES, in 6 cases: for backends whose kernels
# run in an interpreter here, where each case compiles for seconds.
INTERPRETED_CASES = [
    "defaults",  # braintools defaults
    "both_masks",  # weight decay, both masks as callables
    "trust_clip_masked",  # trust_clip with an ndim-tree trust mask
    "optax_form_nesterov",  # lr inside momentum, nesterov, eps 0, prefix mask, schedule
    "grad_clip_norm",  # global-norm clipping with weight decay
    "everything",  # every option at once
]

# The kernels' switches with every option on (not in place, not skipping).
ALL_OPTIONS = StepFlags(
    clip_norm=True,
    clip_value=True,
    has_decay=True,
    nesterov=True,
    lr_inside_momentum=True,
    trust_clip=True,
)


def oracle_run(
    case: Case, params: Any, grads: list, paths, shapes, round_params=None, **overrides
) -> oracle.OracleState:
    """The float64 oracle's trajectory for ``case`` (``overrides``: OracleConfig fields)."""
    return oracle.run(
        as_f64_leaves(params),
        [as_f64_leaves(g) for g in grads],
        dataclasses.replace(case.oracle_config(), **overrides),
        decay_mask=expected_mask(case.decay_mask, paths, shapes),
        trust_mask=expected_mask(case.trust_mask, paths, shapes),
        round_params=round_params,
    )


# --------------------------------------------------------------------------
# The pytree: odd shapes, empty leaves, zero leaves, nesting.

PREFIX_FALSE = ("conv", "layer")  # top-level subtrees a prefix mask turns off


def leaf_shapes(big: int, mid: int) -> dict:
    """The nested dict of leaf shapes of the test pytree."""
    return {
        "scalar": (),
        "one": (1,),
        "odd": (127,),
        "mid": (mid,),
        "big": (big,),
        "conv": {"kernel": (3, 3, 16, 32), "bias": (32,)},
        "empty": (0,),
        "empty2": (0, 5),
        "zero_w": (33,),  # zero weights at the start: r = 1 on the first step
        "zero_g": (5, 3),  # zero gradients throughout
        "dead": (6,),  # zero weights and zero gradients: must stay exactly zero
        "layer": {"w": (8, 4), "b": (4,)},
    }


def _paths_and_shapes(shapes: dict) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return [(tuple(k.key for k in path), shape) for path, shape in flat]


def make_problem(
    big: int, mid: int, steps: int, seed: int = 0
) -> tuple[dict, list[dict], list[tuple[str, ...]]]:
    """Float64 params, per-step grads (nested dicts of NumPy arrays) and leaf paths.

    Each leaf gets its own weight and gradient scale, so trust ratios span
    about 0.01 to 1 and ``trust_clip=CLIP`` binds on some leaves only.
    """
    shapes = leaf_shapes(big, mid)
    items = _paths_and_shapes(shapes)
    rng = np.random.default_rng(seed)
    w_scales = np.geomspace(0.05, 3.0, len(items))
    g_scales = np.geomspace(0.3, 0.03, len(items))
    params_flat, grads_flat = [], [[] for _ in range(steps)]
    for (path, shape), ws, gs in zip(items, w_scales, g_scales, strict=True):
        zero_w = path[0] in ("zero_w", "dead")
        zero_g = path[0] in ("zero_g", "dead")
        params_flat.append(np.zeros(shape) if zero_w else ws * rng.standard_normal(shape))
        for t in range(steps):
            grads_flat[t].append(np.zeros(shape) if zero_g else gs * rng.standard_normal(shape))
    treedef = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
    params = jax.tree.unflatten(treedef, params_flat)
    grads = [jax.tree.unflatten(treedef, g) for g in grads_flat]
    return params, grads, [p for p, _ in items]


def expected_mask(kind: str | None, paths: list[tuple[str, ...]], shapes: list) -> list[bool]:
    """The per-leaf mask each mask form must resolve to (computed independently)."""
    if kind is None:
        return [True] * len(paths)
    if kind in ("ndim_tree", "callable"):
        return [len(s) > 1 for s in shapes]
    if kind == "prefix":
        return [p[0] not in PREFIX_FALSE for p in paths]
    raise ValueError(kind)


def lars_mask(kind: str | None, params: Any) -> Any:
    """The mask argument handed to lars for each mask form."""
    if kind is None:
        return None
    if kind == "ndim_tree":
        return jax.tree.map(lambda x: bool(np.ndim(x) > 1), params)
    if kind == "callable":
        return lars.exclude_bias_and_norm
    if kind == "prefix":
        return {k: k not in PREFIX_FALSE for k in params}
    raise ValueError(kind)


# --------------------------------------------------------------------------
# Tolerances.


@dataclasses.dataclass(frozen=True)
class Tol:
    """Per-dtype tolerances, relative to what each quantity can be compared with.

    Attributes:
      delta: Param error allowed relative to the leaf's largest total change
        ``max|w_T - w_0|`` (the oracle's).
      ulps: Param error allowed in units of the storage dtype's spacing at the
        leaf's largest magnitude (rounding of the stored params).
      momentum: Momentum error relative to the leaf's largest |v| over the run.
      ratio: Trust-ratio error relative to the ratio.
    """

    delta: float
    ulps: float
    momentum: float
    ratio: float


# Why these numbers. float32: compute rounds each norm, ratio and product to
# 2**-24 relative; over 10 steps the reference backend stays within 3e-7 of the
# oracle for momentum and ratios and within 2.4 ulps for params (the oracle
# rounds the params to float32 where they are stored). 2e-5 and 8 ulps leave
# room for another summation order (tree or chunked reductions of 65537
# elements) without letting a wrong rule through: every case changes the
# result by more than 50 times that (checked in test_oracle.py).
# bfloat16 gradients on float32 params: the gradients are exactly representable
# in float64, so the oracle sees the same inputs and only float32 compute
# differs: the float32 tolerances apply.
# bfloat16 params: the oracle rounds the params to bfloat16 at every step, as
# the backend must (updates are materialised in the param dtype, then added).
# When the float32 and float64 updates straddle a rounding boundary, a stored
# param differs by one bfloat16 ulp (2**-8 relative) and the difference feeds
# the following steps: the reference stays within 0.2 ulps and 0.5% of the
# change for params, 7e-5 for momentum and 2e-7 for ratios. 2 ulps, 2%, 2e-3
# and 2e-3 allow such straddles but not computing in bfloat16 (the momentum and
# ratios of a step computed in bfloat16 are off by about 1e-2).
TOLERANCES = {
    "float32": Tol(delta=2e-5, ulps=8.0, momentum=2e-5, ratio=2e-5),
    "bf16_grads": Tol(delta=2e-5, ulps=8.0, momentum=2e-5, ratio=2e-5),
    "bf16_params": Tol(delta=2e-2, ulps=2.0, momentum=2e-3, ratio=2e-3),
}
DTYPES = {  # (param dtype, grad dtype)
    "float32": (jnp.float32, jnp.float32),
    "bf16_grads": (jnp.float32, jnp.bfloat16),
    "bf16_params": (jnp.bfloat16, jnp.bfloat16),
}


def _spacing(dtype: Any, magnitude: float) -> float:
    """The spacing of ``dtype`` at ``magnitude``, and at least its smallest normal.

    XLA flushes subnormal results to zero, so below the smallest normal number
    a value and zero cannot be told apart.
    """
    info = jnp.finfo(dtype)
    return max(magnitude * float(info.eps), float(info.tiny))


def assert_matches_oracle(
    params: Any,
    state: lars.LarsState,
    want: oracle.OracleState,
    params0: list[np.ndarray],
    paths: list[tuple[str, ...]],
    tol: Tol,
    param_dtype: Any,
) -> None:
    """Compares the backend's params and state with the oracle, leaf by leaf."""
    got_p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    got_v = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.momentum)]
    assert state.trust_ratio.shape == (len(paths),) and state.trust_ratio.dtype == jnp.float32
    got_r = [float(x) for x in np.asarray(state.trust_ratio)]
    assert int(state.count) == want.count
    assert len(got_p) == len(want.params) == len(paths)
    for i, path in enumerate(paths):
        where = "/".join(path)
        w0, gp, wp = params0[i], got_p[i], want.params[i]
        assert gp.shape == wp.shape, where
        assert np.all(np.isfinite(gp)), f"non-finite params at {where}"
        if gp.size:
            change = float(np.max(np.abs(wp - w0)))
            mag = float(max(np.max(np.abs(wp)), np.max(np.abs(w0))))
            allowed = tol.delta * change + tol.ulps * _spacing(param_dtype, mag)
            err = float(np.max(np.abs(gp - wp)))
            assert err <= allowed, (
                f"params at {where}: max error {err:.3g} > {allowed:.3g} "
                f"(total change {change:.3g})"
            )
            v_scale = want.momentum_scale[i]
            v_err = float(np.max(np.abs(got_v[i] - want.momentum[i])))
            assert v_err <= tol.momentum * v_scale + _spacing(jnp.float32, 0.0), (
                f"momentum at {where}: max error {v_err:.3g} vs scale {v_scale:.3g}"
            )
        # The last ratio is computed from the run's own w_(T-1), which carries
        # up to `allowed` per element (sqrt(n) times that in norm) of error:
        # relative to the ratio it is that norm error times the oracle's
        # sensitivity, small unless earlier steps cancelled most of w.
        r_want = want.trust_ratio[i]
        inherited = 0.0
        if gp.size and want.ratio_sensitivity and want.count > 1:  # w_0 is exact
            inherited = want.ratio_sensitivity[i] * np.sqrt(gp.size) * allowed
        assert abs(got_r[i] - r_want) <= (tol.ratio + inherited) * r_want, (
            f"trust ratio at {where}: {got_r[i]!r} vs oracle {r_want!r} "
            f"(allowed {tol.ratio:.3g} + {inherited:.3g} inherited from the params, relative)"
        )


def to_device(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def as_f64_leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
