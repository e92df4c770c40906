"""A float64 NumPy LARS oracle, written from the update rule alone.

This module does not import ``lars``: it restates the rule (the default is
``braintools.optim.Lars`` 0.4.0, the options are those of ``lars.lars``) so
that every backend can be checked against something that shares no code with
it. Leaves are plain NumPy arrays in flat lists; masks are per-leaf bools.

One step, for leaf i with weight w, gradient g and momentum v:

1. global-norm clip: n = sqrt(sum over all leaves of sum(g**2));
   g = g if n < grad_clip_norm else g / n * grad_clip_norm
2. value clip: g = clip(g, -grad_clip_value, grad_clip_value)
3. weight decay (where the decay mask is True): g = g + weight_decay * w
4. trust ratio (where the trust mask is True):
   r = trust_coefficient * ||w|| / (||g|| + eps), r = 1 where ||w|| == 0 or
   ||g|| == 0, then r = min(r, trust_clip); r = 1 where the mask is False
5. u = r * g (times lr when ``lr_inside_momentum``); v = momentum * v + u
6. direction = u + momentum * v (nesterov) or v
7. w = w - lr * direction (or w - direction when lr is already inside v)

The learning rate of step t (t = 0, 1, ...) is ``lr`` or ``lr(t)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """Hyperparameters of the oracle (the ``lars.lars`` argument names)."""

    learning_rate: float | Callable[[int], float] = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    nesterov: bool = False
    trust_clip: float | None = None
    grad_clip_norm: float | None = None
    grad_clip_value: float | None = None
    lr_inside_momentum: bool = False


@dataclasses.dataclass
class OracleState:
    """Float64 state of the oracle."""

    params: list[np.ndarray]
    momentum: list[np.ndarray]
    trust_ratio: list[float]
    count: int = 0
    # Per leaf, the largest |v| seen so far: the scale to judge momentum errors
    # by (the final v of a small leaf can be near zero by cancellation).
    momentum_scale: list[float] = dataclasses.field(default_factory=list)
    # Per leaf, how strongly the last step's trust ratio depends on the params
    # it was computed from: |d log r / d||w||| = 1/||w|| + wd/(||g + wd w|| + eps)
    # (0 where no ratio was computed). A float32 run's ratio inherits its
    # params' accumulated error through it; large when earlier steps cancelled
    # most of w.
    ratio_sensitivity: list[float] = dataclasses.field(default_factory=list)


def init(params: Sequence[Any]) -> OracleState:
    """Zero momentum and ratios of 1 for ``params`` (converted to float64)."""
    ps = [np.asarray(p, np.float64) for p in params]
    return OracleState(
        params=ps,
        momentum=[np.zeros_like(p) for p in ps],
        trust_ratio=[1.0] * len(ps),
        momentum_scale=[0.0] * len(ps),
    )


def lr_at(cfg: OracleConfig, count: int) -> float:
    """The learning rate of step ``count``."""
    lr = cfg.learning_rate
    return float(lr(count)) if callable(lr) else float(lr)


def step(
    state: OracleState,
    grads: Sequence[Any],
    cfg: OracleConfig,
    *,
    decay_mask: Sequence[bool] | None = None,
    trust_mask: Sequence[bool] | None = None,
    round_params: Sequence[Callable[[np.ndarray], np.ndarray]] | None = None,
) -> OracleState:
    """One LARS step in float64.

    Args:
      state: The oracle state before the step.
      grads: One gradient per leaf (any float dtype; converted to float64).
      cfg: The hyperparameters.
      decay_mask: Per leaf, whether weight decay applies (default: all).
      trust_mask: Per leaf, whether the trust ratio applies (default: all).
      round_params: Per leaf, a function that rounds a float64 array to the
        storage dtype of the params (models params kept in float32/bfloat16:
        the update is materialised in the param dtype, then the sum is rounded
        to it, as ``optax.apply_updates`` does). Default: no rounding.

    Returns:
      The state after the step.
    """
    n = len(state.params)
    decay_mask = [True] * n if decay_mask is None else list(decay_mask)
    trust_mask = [True] * n if trust_mask is None else list(trust_mask)
    gs = [np.asarray(g, np.float64) for g in grads]
    assert len(gs) == n == len(decay_mask) == len(trust_mask)
    lr = lr_at(cfg, state.count)

    if cfg.grad_clip_norm is not None:
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in gs))
        if not norm < cfg.grad_clip_norm:
            gs = [g / norm * cfg.grad_clip_norm for g in gs]
    if cfg.grad_clip_value is not None:
        c = cfg.grad_clip_value
        gs = [np.clip(g, -c, c) for g in gs]

    new_params, new_momentum, ratios, scales, sensitivity = [], [], [], [], []
    for i in range(n):
        w, g, v = state.params[i], gs[i], state.momentum[i]
        if decay_mask[i]:
            g = g + cfg.weight_decay * w
        r, sens = 1.0, 0.0
        if trust_mask[i]:
            w_norm = float(np.sqrt(np.sum(w * w)))
            g_norm = float(np.sqrt(np.sum(g * g)))
            if w_norm == 0.0 or g_norm == 0.0:
                r = 1.0
            else:
                r = cfg.trust_coefficient * w_norm / (g_norm + cfg.eps)
                wd = cfg.weight_decay if decay_mask[i] else 0.0
                sens = 1.0 / w_norm + abs(wd) / (g_norm + cfg.eps)
            if cfg.trust_clip is not None:
                r = min(r, cfg.trust_clip)
        u = r * g
        if cfg.lr_inside_momentum:
            u = lr * u
        v_new = cfg.momentum * v + u
        direction = u + cfg.momentum * v_new if cfg.nesterov else v_new
        delta = -direction if cfg.lr_inside_momentum else -lr * direction
        if round_params is not None:
            rnd = round_params[i]
            w_new = rnd(w + rnd(delta))
        else:
            w_new = w + delta
        new_params.append(w_new)
        new_momentum.append(v_new)
        ratios.append(r)
        v_max = float(np.max(np.abs(v_new))) if v_new.size else 0.0
        scales.append(max(state.momentum_scale[i], v_max))
        sensitivity.append(sens)
    return OracleState(new_params, new_momentum, ratios, state.count + 1, scales, sensitivity)


def run(
    params: Sequence[Any],
    grads_per_step: Sequence[Sequence[Any]],
    cfg: OracleConfig,
    **kwargs: Any,
) -> OracleState:
    """Runs :func:`step` once per entry of ``grads_per_step`` from ``init(params)``."""
    state = init(params)
    for grads in grads_per_step:
        state = step(state, grads, cfg, **kwargs)
    return state


def rounder(dtype: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function rounding float64 arrays to ``dtype`` (then back to float64)."""
    dtype = np.dtype(dtype)
    return lambda x: np.asarray(x).astype(dtype).astype(np.float64)
