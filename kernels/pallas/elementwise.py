"""The per-element LARS math shared by the Pallas kernels, and its references.

Both kernels (Mosaic GPU and Mosaic TPU) and the plain-JAX references call the
functions here on arrays of one tile, so the three run the same floating-point
operations in the same order as ``lars._reference.reference_step``. The only
difference from the reference is the order in which the norms are summed.

The values that change between steps (learning rate, momentum, weight decay,
the clipping thresholds) reach the kernels as a small float32 array,
``scalars``, never as Python constants: a new learning rate does not recompile.
What is static (which options are on, per-leaf masks and dtypes) is a
:class:`StepFlags` and a :class:`LeafSpec` per leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Positions in the float32 ``scalars`` vector handed to every kernel.
LR = 0
MOMENTUM = 1
WEIGHT_DECAY = 2
CLIP_DIVISOR = 3  # ||g|| when the global-norm clip triggers, else 1
CLIP_FACTOR = 4  # grad_clip_norm when the clip triggers, else 1
CLIP_VALUE = 5
FINITE = 6  # 1 for a step to take, 0 for one to skip (flags.skip_nonfinite)
NUM_SCALARS = 8  # padded, so the vector is one 32-byte row

# Columns of the per-leaf sums the norm kernels write.
SUM_W2 = 0  # sum of w**2 (or of g**2 for the global-norm pass)
SUM_U2 = 1  # sum of u**2, u the clipped and decayed gradient


@dataclasses.dataclass(frozen=True)
class StepFlags:
    """The static switches of one step (hashable: part of the kernel's identity).

    Attributes:
      clip_norm: Global-norm clipping is on (grads are scaled by the scalars
        ``CLIP_FACTOR / CLIP_DIVISOR``, both 1 when the clip does not trigger).
      clip_value: Element-wise clipping to ``[-CLIP_VALUE, CLIP_VALUE]`` is on.
      nesterov: Nesterov momentum.
      lr_inside_momentum: The optax.lars form ``v = mu*v + lr*r*g; w -= v``.
      write_params: The update pass writes the new params (over the params'
        buffers) instead of the updates; the norm passes ignore it.
      skip_nonfinite: The update pass reads the ``FINITE`` scalar; where it is
        0 it leaves params and momenta as they were and writes updates of
        -0.0 (``x + -0.0 == x`` for every x), so a skipped step needs no copy
        of them.
    """

    clip_norm: bool = False
    clip_value: bool = False
    nesterov: bool = False
    lr_inside_momentum: bool = False
    write_params: bool = False
    skip_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What a kernel needs to know about one leaf, statically.

    Attributes:
      size: Number of elements.
      param_dtype: dtype of the param (and of the update written).
      grad_dtype: dtype of the gradient.
      momentum_dtype: dtype of the momentum buffer (float32 for these kernels).
      decay: Weight decay applies to this leaf.
      trust: The trust ratio applies (else r = 1 and no norms are needed).
    """

    size: int
    param_dtype: np.dtype
    grad_dtype: np.dtype
    momentum_dtype: np.dtype
    decay: bool
    trust: bool


def scalar(scalars: jax.Array | Callable[[int], jax.Array], i: int) -> jax.Array:
    """Reads entry ``i`` of ``scalars`` (an array, or a getter for a kernel ref)."""
    return scalars(i) if callable(scalars) else scalars[i]


def clipped_grad(g: jax.Array, scalars, flags: StepFlags) -> jax.Array:
    """Steps 1-2 of the rule on float32 ``g``: global-norm scale, then value clip.

    ``(g / CLIP_DIVISOR) * CLIP_FACTOR`` is ``optax.clip_by_global_norm``'s
    ``(g / ||g||) * max_norm`` when the clip triggers and exactly ``g``
    otherwise (both scalars are then 1, and x / 1 * 1 == x in IEEE arithmetic).
    """
    if flags.clip_norm:
        g = (g / scalar(scalars, CLIP_DIVISOR)) * scalar(scalars, CLIP_FACTOR)
    if flags.clip_value:
        c = scalar(scalars, CLIP_VALUE)
        g = jnp.clip(g, -c, c)
    return g


def effective_grad(g: jax.Array, w: jax.Array, scalars, flags: StepFlags, decay: bool) -> jax.Array:
    """Steps 1-3: the clipped gradient plus ``weight_decay * w`` where decay applies."""
    g = clipped_grad(g, scalars, flags)
    if decay:
        g = g + scalar(scalars, WEIGHT_DECAY) * w
    return g


def momentum_update(
    g: jax.Array, v: jax.Array, ratio: jax.Array, scalars, flags: StepFlags
) -> tuple[jax.Array, jax.Array]:
    """Steps 5-6 on float32 arrays: returns (step to subtract from w, new momentum).

    The operations are those of ``reference_step`` in the same order, so with
    equal ratios the results agree bitwise.
    """
    lr = scalar(scalars, LR)
    mu = scalar(scalars, MOMENTUM)
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
    zero, then at most ``trust_clip`` (None: no clip). The backend applies it to
    the vector of all leaves' sums in XLA; the fused TPU kernel to a vector of
    one leaf's sums on the vector unit.
    """
    w_norm = jnp.sqrt(sum_w2)
    u_norm = jnp.sqrt(sum_u2)
    r = trust_coefficient * w_norm / (u_norm + eps)
    r = jnp.where(jnp.logical_or(w_norm == 0.0, u_norm == 0.0), 1.0, r)
    if trust_clip is not None:
        r = jnp.minimum(r, trust_clip)
    return r


def _sum(x: jax.Array) -> jax.Array:
    # A 0-d value is its own sum (Mosaic GPU cannot reduce a scalar).
    return x if x.ndim == 0 else jnp.sum(x)


def tile_sums(
    w: jax.Array | None, g: jax.Array, scalars, flags: StepFlags, leaf: LeafSpec
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
    flags: StepFlags,
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
        take = (jnp.zeros_like(w32) + scalar(scalars, FINITE)) > 0.5
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
    flags: StepFlags,
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
    flags: StepFlags,
    leaves: Sequence[LeafSpec],
) -> tuple[list[jax.Array], list[jax.Array]]:
    """What the update pass computes: (updates or new params, new momentum), leaf by leaf."""
    updates, new_momentum = [], []
    for i, (w, g, v, leaf) in enumerate(zip(params, grads, momentum, leaves, strict=True)):
        upd, v_new = tile_update(w, g, v, ratios[i], scalars, flags, leaf)
        updates.append(upd)
        new_momentum.append(v_new)
    return updates, new_momentum
