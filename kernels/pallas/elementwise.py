"""The per-element LARS math shared by the Pallas kernels, and its references.

The kernels (Mosaic GPU, Mosaic TPU, the fused Mosaic TPU kernel) and the
plain-JAX references call these functions on one tile's arrays, so all of them
run the operations of ``lars._reference`` in its order; only the order in which
the norms are summed differs. Run-time values come from the float32 vector
laid out as ``contract.Scalar``; what is static is the step's
``contract.StepFlags`` (``StepSpec.flags``, here ``Flags``) and a
``contract.LeafSpec`` per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lars.contract import LeafSpec, Scalar
from lars.contract import StepFlags as Flags

# Columns of the per-leaf sums the norm kernels write.
SUM_W2 = 0  # sum of w**2 (or of g**2 for the global-norm pass)
SUM_U2 = 1  # sum of u**2, u the clipped and decayed gradient


def scalar(scalars: jax.Array | Callable[[int], jax.Array], i: int) -> jax.Array:
    """Reads entry ``i`` of ``scalars`` (an array, or a getter for a kernel ref)."""
    return scalars(int(i)) if callable(scalars) else scalars[int(i)]


def clipped_grad(g: jax.Array, scalars, flags: Flags) -> jax.Array:
    """Steps 1-2 of the rule on float32 ``g``: global-norm scale, then value clip.

    ``(g / CLIP_DIVISOR) * CLIP_FACTOR`` is ``optax.clip_by_global_norm``'s
    ``(g / ||g||) * max_norm`` when the clip triggers and exactly ``g``
    otherwise (both scalars are then 1, and x / 1 * 1 == x in IEEE arithmetic).
    """
    if flags.clip_norm:
        g = (g / scalar(scalars, Scalar.CLIP_DIVISOR)) * scalar(scalars, Scalar.CLIP_FACTOR)
    if flags.clip_value:
        c = scalar(scalars, Scalar.CLIP_VALUE)
        g = jnp.clip(g, -c, c)
    return g


def effective_grad(g: jax.Array, w: jax.Array, scalars, flags: Flags, decay: bool) -> jax.Array:
    """Steps 1-3: the clipped gradient plus ``weight_decay * w`` where decay applies."""
    g = clipped_grad(g, scalars, flags)
    if decay:
        g = g + scalar(scalars, Scalar.WEIGHT_DECAY) * w
    return g


def momentum_update(
    g: jax.Array, v: jax.Array, ratio: jax.Array, scalars, flags: Flags
) -> tuple[jax.Array, jax.Array]:
    """Steps 5-6 on float32 arrays: returns (step to subtract from w, new momentum).

    The operations are those of ``reference_step`` in the same order, so with
    equal ratios the results agree bitwise.
    """
    lr = scalar(scalars, Scalar.LR)
    mu = scalar(scalars, Scalar.MOMENTUM)
    u = g * ratio
    if flags.lr_inside_momentum:
        u = lr * u
    v_new = u + mu * v
    direction = u + mu * v_new if flags.nesterov else v_new
    step = direction if flags.lr_inside_momentum else lr * direction
    return step, v_new


def trust_ratio(
    sum_w2: jax.Array,
    sum_u2: jax.Array,
    trust_coefficient: jax.Array,
    eps: jax.Array,
    trust_clip: jax.Array | None,
) -> jax.Array:
    """Step 4 of the rule, elementwise on float32 arrays of per-leaf sums.

    ``r = trust_coefficient * ||w|| / (||u|| + eps)``, 1 where either norm is
    zero, then at most ``trust_clip`` (None: no clip). The step applies it to
    all leaves' sums in XLA (:func:`leaf_ratios`); the fused TPU kernel to one
    leaf's sums on the vector unit.
    """
    w_norm = jnp.sqrt(sum_w2)
    u_norm = jnp.sqrt(sum_u2)
    r = trust_coefficient * w_norm / (u_norm + eps)
    r = jnp.where(jnp.logical_or(w_norm == 0.0, u_norm == 0.0), 1.0, r)
    if trust_clip is not None:
        r = jnp.minimum(r, trust_clip)
    return r


def leaf_ratios(
    sums: jax.Array, scalars: jax.Array, flags: Flags, leaves: Sequence[LeafSpec]
) -> jax.Array:
    """Per leaf, the trust ratio from its row of (len(leaves), 2) sums: 1 where
    the trust ratio does not apply, and 1 on a skipped step (as the reference)."""
    r = trust_ratio(
        sums[:, SUM_W2],
        sums[:, SUM_U2],
        scalar(scalars, Scalar.TRUST_COEFFICIENT),
        scalar(scalars, Scalar.EPS),
        scalar(scalars, Scalar.TRUST_CLIP) if flags.trust_clip else None,
    )
    r = jnp.where(np.asarray([leaf.trust for leaf in leaves], bool), r, 1.0)
    return skipped_ratios(r, scalars, flags)


def skipped_ratios(ratios: jax.Array, scalars: jax.Array, flags: Flags) -> jax.Array:
    """``ratios``, or 1 where ``flags.skip_nonfinite`` and FINITE is 0."""
    if flags.skip_nonfinite:
        return jnp.where(scalar(scalars, Scalar.FINITE) != 0.0, ratios, 1.0)
    return ratios


def _sum(x: jax.Array) -> jax.Array:
    # A 0-d value is its own sum (Mosaic GPU cannot reduce a scalar).
    return x if x.ndim == 0 else jnp.sum(x)


def tile_sums(
    w: jax.Array | None, g: jax.Array, scalars, flags: Flags, leaf: LeafSpec
) -> tuple[jax.Array, jax.Array]:
    """The two sums a norm kernel accumulates over one tile, in float32.

    With ``w`` None (the global-norm pass) returns (sum of g**2, 0); else
    (sum of w**2, sum of u**2) with u the effective gradient of the leaf.
    """
    g = g.astype(jnp.float32)
    if w is None:
        return _sum(g * g), jnp.zeros((), jnp.float32)
    w = w.astype(jnp.float32)
    u = effective_grad(g, w, scalars, flags, leaf.decay)
    return _sum(w * w), _sum(u * u)


def tile_update(
    w: jax.Array,
    g: jax.Array,
    v: jax.Array,
    ratio: jax.Array,
    scalars,
    flags: Flags,
    leaf: LeafSpec,
) -> tuple[jax.Array, jax.Array]:
    """One tile of the update: returns (update or new param, new momentum).

    The first result is in the param dtype: the update, or with
    ``flags.write_params`` the new param ``w + update``, added in float32 and
    rounded once, as ``optax.apply_updates`` computes it (for bfloat16 and
    float16 params, rounding the float32 sum of two such values gives the
    correctly rounded sum: float32's 24 bits are at least twice their precision
    plus 2, so the double rounding is harmless).
    """
    w32 = w.astype(jnp.float32)
    u = effective_grad(g.astype(jnp.float32), w32, scalars, flags, leaf.decay)
    step, v_new = momentum_update(u, v.astype(jnp.float32), ratio, scalars, flags)
    # step * -1, not -step: Mosaic TPU lowers a negation as 0 - x, which turns
    # a zero step into +0.0 where the reference's -step gives -0.0.
    update = (step * -1.0).astype(leaf.param_dtype)
    if flags.write_params:
        update = (w32 + update.astype(jnp.float32)).astype(leaf.param_dtype)
    v_new = v_new.astype(leaf.momentum_dtype)
    if flags.skip_nonfinite:
        # The flag broadcast to the tile (a vector select; NaN-safe, unlike
        # arithmetic blending).
        take = (jnp.zeros_like(w32) + scalar(scalars, Scalar.FINITE)) > 0.5
        keep = w if flags.write_params else jnp.zeros_like(update) * -1.0  # -0.0
        update = jnp.where(take, update, keep)
        v_new = jnp.where(take, v_new, v)
    return update, v_new


# --------------------------------------------------------------------------
# Plain-JAX references of the two kernel passes (whole leaves, no tiling).


def leaf_sums_reference(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    flags: Flags,
    leaves: Sequence[LeafSpec],
) -> jax.Array:
    """What a norm pass computes, per leaf: a (len(leaves), 2) float32 array."""
    rows = []
    for i, (g, leaf) in enumerate(zip(grads, leaves, strict=True)):
        w = None if params is None else params[i].reshape(-1)
        rows.append(jnp.stack(tile_sums(w, g.reshape(-1), scalars, flags, leaf)))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.float32)


def update_reference(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    ratios: jax.Array,
    scalars: jax.Array,
    flags: Flags,
    leaves: Sequence[LeafSpec],
) -> tuple[list[jax.Array], list[jax.Array]]:
    """What the update pass computes: (updates or new params, new momentum), leaf by leaf."""
    updates, new_momentum = [], []
    for i, (w, g, v, leaf) in enumerate(zip(params, grads, momentum, leaves, strict=True)):
        upd, v_new = tile_update(w, g, v, ratios[i], scalars, flags, leaf)
        updates.append(upd)
        new_momentum.append(v_new)
    return updates, new_momentum
