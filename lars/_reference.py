"""The "reference" backend: the pure-JAX LARS step every other backend is tested against.

:func:`reference_step` is the step, written out; :func:`update_with_ratios`
is its update half with the trust ratios given (shards of sharded params);
:func:`run` implements the backend contract (``lars.contract``) on top of
the two, and ``BACKEND`` registers it. It works on flat lists of leaves and
leaves fusion to XLA. The order of floating-point operations
follows ``optax`` (``clip_by_global_norm``, ``add_decayed_weights``,
``scale_by_trust_ratio``, ``trace``, ``scale_by_schedule``), so results agree
with braintools and optax to the last bit or close to it.

Complex leaves (complex64/complex128 params) are computed as ``optax.lars``
computes them: in their complex dtype, with real norms of ``|x|`` (the
squares of ``optax.tree.norm`` for the global norm, ``jnp.linalg.norm`` per
leaf) and the real trust ratio and learning rate multiplied in as complex
numbers. The front end refuses ``grad_clip_value`` on complex leaves (complex
numbers have no order; ``optax.clip`` raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lars.contract import (
    Backend,
    Feature,
    LarsConfig,
    StepInputs,
    StepResult,
    StepSpec,
    compute_dtype,
    norm_dtype,
)


def reference_step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
) -> StepResult:
    """One LARS step over all leaves, in plain JAX.

    Args:
      params: The parameter leaves.
      grads: The gradient leaves (same shapes; dtype equal or lower precision).
      momentum: The momentum leaves (``compute_dtype`` of each param).
      lr: The learning rate for this step, a float32 scalar array.
      config: The step's hyperparameters.
      decay_mask: Per leaf, whether weight decay applies.
      trust_mask: Per leaf, whether the trust ratio applies (else r = 1).

    Returns:
      A ``StepResult``.
    """
    gs = [g.astype(compute_dtype(p.dtype)) for p, g in zip(params, grads, strict=True)]

    # 1. Global-norm clipping (optax.clip_by_global_norm).
    if config.grad_clip_norm is not None:
        zero = jnp.zeros((), norm_dtype(gs[0].dtype))
        g_norm = jnp.sqrt(sum((jnp.sum(global_squares(g)) for g in gs), zero))
        gs = _clip_by_global_norm(gs, g_norm, config)

    # 2. Element-wise clipping (optax.clip).
    gs = _clip_by_value(gs, config)

    updates, new_momentum, ratios = [], [], []
    for p, g, v, decay, trust in zip(params, gs, momentum, decay_mask, trust_mask, strict=True):
        w = p.astype(g.dtype)
        # 3. Coupled weight decay (optax.add_decayed_weights).
        if decay and config.has_weight_decay:
            g = g + config.weight_decay * w
        # 4. Per-leaf trust ratio (optax.scale_by_trust_ratio).
        if trust:
            r = trust_ratio(jnp.linalg.norm(w), jnp.linalg.norm(g), config)
        else:
            r = jnp.ones((), norm_dtype(g.dtype))
        u, v_new = _leaf_update(p, g, v, r, lr, config)
        updates.append(u)
        new_momentum.append(v_new)
        ratios.append(r.astype(jnp.float32))
    return StepResult(updates, new_momentum, ratios)


def trust_ratio(w_norm: jax.Array, g_norm: jax.Array, config: LarsConfig) -> jax.Array:
    """r = eta * ||w|| / (||g|| + eps); 1 where a norm is 0; then min(r, trust_clip).

    In the norms' dtype (the leaf's compute dtype).
    """
    dtype = g_norm.dtype
    r = config.trust_coefficient * w_norm / (g_norm + config.eps)
    r = jnp.where(jnp.logical_or(w_norm == 0.0, g_norm == 0.0), 1.0, r).astype(dtype)
    if config.trust_clip is not None:
        r = jnp.minimum(r, config.trust_clip).astype(dtype)
    return r


def global_squares(g: jax.Array) -> jax.Array:
    """|g|**2 entry by entry, as ``optax.tree.norm`` squares (real and imaginary parts)."""
    if jnp.iscomplexobj(g):
        return jnp.square(g.real) + jnp.square(g.imag)
    return g * g


def leaf_squares(x: jax.Array) -> jax.Array:
    """|x|**2 entry by entry, as ``jnp.linalg.norm`` squares (``real(x * conj(x))``)."""
    if jnp.iscomplexobj(x):
        return jnp.real(x * jnp.conj(x))
    return x * x


def clipped_grads(
    params: Sequence[jax.Array], grads: Sequence[jax.Array], g_norm: jax.Array | None, config
) -> list[jax.Array]:
    """Steps 1.-2.: grads in their compute dtype, clipped by global norm and value.

    ``g_norm`` is the global gradient norm, used when ``grad_clip_norm`` is set.
    """
    gs = [g.astype(compute_dtype(p.dtype)) for p, g in zip(params, grads, strict=True)]
    if config.grad_clip_norm is not None:
        gs = _clip_by_global_norm(gs, jnp.asarray(g_norm, norm_dtype(gs[0].dtype)), config)
    return _clip_by_value(gs, config)


def _clip_by_global_norm(gs: list[jax.Array], g_norm: jax.Array, config: LarsConfig) -> list:
    """optax.clip_by_global_norm given the norm: g if ||g|| < c else (g / ||g||) * c."""
    trigger = g_norm < config.grad_clip_norm
    return [jnp.where(trigger, g, (g / g_norm) * config.grad_clip_norm) for g in gs]


def _clip_by_value(gs: list[jax.Array], config: LarsConfig) -> list:
    """optax.clip: every entry into [-c, c] (when grad_clip_value is set)."""
    if config.grad_clip_value is None:
        return gs
    c = config.grad_clip_value
    return [jnp.clip(g, -c, c) for g in gs]


def _leaf_update(
    p: jax.Array, g: jax.Array, v: jax.Array, r: jax.Array, lr: jax.Array, config: LarsConfig
) -> tuple[jax.Array, jax.Array]:
    """Steps 5.-6. for one leaf: (update, new momentum) from the decayed g and ratio r."""
    u = g * r
    # 5.-6. Momentum and the learning rate (optax.trace, scale_by_schedule).
    lr_t = lr.astype(g.dtype)
    if config.lr_inside_momentum:
        u = lr_t * u
    v_new = u + config.momentum * v.astype(g.dtype)
    direction = u + config.momentum * v_new if config.nesterov else v_new
    step = direction if config.lr_inside_momentum else lr_t * direction
    return (-step).astype(p.dtype), v_new.astype(v.dtype)


def update_with_ratios(spec: StepSpec, inputs: StepInputs) -> StepResult:
    """The update half of :func:`reference_step`, with ``inputs.ratios`` given.

    For shards (``lars._sharded``): the ratios (one per leaf; 1 outside the
    trust mask) and ``inputs.global_norm`` (used with ``grad_clip_norm``) are
    those of whole layers, summed over the shards by the caller.
    """
    params, grads, momentum, lr, _, ratios, global_norm = inputs
    config = spec.config
    gs = clipped_grads(params, grads, global_norm, config)
    out, new_momentum, out_ratios = [], [], []
    for i, (p, g, v, leaf) in enumerate(zip(params, gs, momentum, spec.leaves, strict=True)):
        if leaf.decay:
            g = g + config.weight_decay * p.astype(g.dtype)
        r = ratios[i].astype(norm_dtype(g.dtype))
        u, v_new = _leaf_update(p, g, v, r, lr, config)
        out.append(u)
        new_momentum.append(v_new)
        out_ratios.append(r.astype(jnp.float32))
    return StepResult(out, new_momentum, out_ratios)


def run(spec: StepSpec, inputs: StepInputs) -> StepResult:
    """The backend contract's step (``lars.contract``), in plain JAX.

    Every other backend's ``run`` is checked against this one, and its
    derivatives are this function's.
    """
    params, grads, momentum, lr, finite = inputs[:5]
    if spec.given_ratios:
        result = update_with_ratios(spec, inputs)
    else:
        masks = dict(decay_mask=spec.decay_mask, trust_mask=spec.trust_mask)
        result = reference_step(params, grads, momentum, lr, config=spec.config, **masks)
    first, new_momentum, out_ratios = result
    if spec.write_params:
        first = [(p + u).astype(p.dtype) for p, u in zip(params, first, strict=True)]
    if finite is not None:  # a skipped step: nothing moves
        keep = params if spec.write_params else [negative_zeros_like(u) for u in first]
        first = [jnp.where(finite, a, b) for a, b in zip(first, keep, strict=True)]
        new_momentum = [
            jnp.where(finite, a, b.astype(a.dtype))
            for a, b in zip(new_momentum, momentum, strict=True)
        ]
        out_ratios = [jnp.where(finite, r, jnp.ones_like(r)) for r in out_ratios]
    return StepResult(list(first), list(new_momentum), list(out_ratios))


def negative_zeros_like(x: jax.Array) -> jax.Array:
    """Updates that move nothing: ``p + (-0.0) == p`` bitwise, signed zeros included.

    For complex leaves both parts are -0.0.
    """
    zero = complex(-0.0, -0.0) if jnp.iscomplexobj(x) else -0.0
    return jnp.full_like(x, zero)


# XLA partitions and fuses the plain step itself: the reference asks for no
# routing (no GIVEN_RATIOS) and no in-place form; JAX differentiates it.
BACKEND = Backend(
    name="reference",
    run=run,
    features=lambda platform: frozenset({Feature.DIFFERENTIABLE}),
)
