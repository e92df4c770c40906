"""Multi-tensor LARS kernels for TPU in Pallas Mosaic TPU: a norm pass and an update pass.

Every leaf stays the separate array it is (in HBM), and all leaves of all
dtypes go through one launch per pass: a single kernel invocation that walks
the static block schedule of ``tpu_pipeline``, streaming the blocks itself
with double buffering, across leaf boundaries.

* :func:`sums_kernel` (the norm pass) accumulates each leaf's two sums in SMEM
  in block order: the result is bitwise repeatable.
* :func:`update_kernel` reads per-leaf trust ratios from SMEM and writes each
  leaf's update (or new param) and new momentum over the inputs' buffers.

Off a TPU, ``interpret=True`` runs the kernels in Pallas' XLA interpreter and
``pltpu.InterpretParams()`` in the TPU simulator; both execute this code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lars.contract import LeafSpec

from . import elementwise as ew
from .tpu_pipeline import (
    ANY,
    BLOCK_LANES,
    BLOCK_ROWS,
    SMEM,
    TilePlan,
    pipeline,
    plan_tiles,
    scalar_getter,
    scratch_shapes,
    split_streams,
    tpu_context,
)

_SUMS_ROLES = ("param_dtype", "grad_dtype")
_UPDATE_ROLES = ("param_dtype", "grad_dtype", "momentum_dtype", "param_dtype", "momentum_dtype")


def sums_kernel(
    scalars_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[LeafSpec],
    flags: ew.Flags,
    with_params: bool,
) -> None:
    """Norm pass: ``out[2j]`` and ``out[2j+1]`` get leaf j's two float32 sums.

    ``refs`` are the leaves' params (when ``with_params``) and gradients in
    HBM, the (2 * leaves,) SMEM output, then the VMEM buffers and semaphores.
    Each leaf's sums accumulate block after block in a fixed order.
    """
    n = len(leaves)
    roles = _SUMS_ROLES if with_params else _SUMS_ROLES[1:]
    hbm_groups = [refs[i * n : (i + 1) * n] for i in range(len(roles))]
    out_ref = refs[len(roles) * n]
    streams = split_streams(roles, hbm_groups, refs[len(roles) * n + 1 :], leaves, plan)
    scalars = scalar_getter(scalars_ref)

    def zero(i, carry):
        out_ref[i] = jnp.float32(0)
        return carry

    lax.fori_loop(0, 2 * n, zero, 0)

    def compute(branch, in_blocks, out_blocks, carry):
        del out_blocks
        leaf = leaves[branch.leaf]
        w = in_blocks[0][...] if with_params else None
        a, b = ew.tile_sums(w, in_blocks[-1][...], scalars, flags, leaf)
        out_ref[2 * branch.leaf + ew.SUM_W2] += a
        out_ref[2 * branch.leaf + ew.SUM_U2] += b
        return carry

    pipeline(plan, leaves, streams, [], compute, 0)


def update_kernel(
    scalars_ref,
    ratios_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[LeafSpec],
    flags: ew.Flags,
) -> None:
    """Update pass: block after block, leaf after leaf.

    ``refs`` are the params, gradients and momenta of the leaves in HBM, their
    updates (or new params, with ``flags.write_params``) and new momenta
    (outputs, HBM), then VMEM buffers and semaphores. The launcher aliases the
    new momenta (and params) to the inputs: a block's results are written
    where it was read from, after it was read, and no block reads another's.
    """
    n = len(leaves)
    hbm_groups = [refs[i * n : (i + 1) * n] for i in range(5)]
    streams = split_streams(_UPDATE_ROLES, hbm_groups, refs[5 * n :], leaves, plan)
    scalars = scalar_getter(scalars_ref)

    def compute(branch, in_blocks, out_blocks, carry):
        leaf = leaves[branch.leaf]
        w, g, v = (b[...] for b in in_blocks)
        first, v_new = ew.tile_update(w, g, v, ratios_ref[branch.leaf], scalars, flags, leaf)
        out_blocks[0][...] = first
        out_blocks[1][...] = v_new
        return carry

    pipeline(plan, leaves, streams[:3], streams[3:], compute, 0)


# --------------------------------------------------------------------------
# Launchers.


def leaf_sums(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Runs the norm pass over non-empty leaves; returns (len(leaves), 2) float32 sums.

    Args:
      params: The leaves' params, or None for the global-norm pass (sum g**2).
      grads: The leaves' gradients.
      scalars: The float32 ``contract.Scalar`` vector.
      flags: Static options.
      leaves: Static per-leaf facts (sizes must be positive).
      block_rows, block_lanes: Block sizes (see ``tpu_pipeline``).
      interpret: False on a TPU; True (XLA interpreter) or a
        ``pltpu.InterpretParams`` (TPU simulator) elsewhere.
    """
    leaves = tuple(leaves)
    plan = plan_tiles([leaf.size for leaf in leaves], block_rows, block_lanes)
    roles = _SUMS_ROLES if params is not None else _SUMS_ROLES[1:]
    arrays = [*([] if params is None else params), *grads]
    flat = [x.reshape(v) for x, v in zip(arrays, plan.views * len(roles), strict=True)]
    kernel = pl.pallas_call(
        functools.partial(
            sums_kernel,
            plan=plan,
            leaves=leaves,
            flags=flags,
            with_params=params is not None,
        ),
        out_shape=jax.ShapeDtypeStruct((2 * len(leaves),), jnp.float32),
        in_specs=[SMEM] + [ANY] * len(flat),
        out_specs=SMEM,
        scratch_shapes=scratch_shapes(roles, leaves, plan),
        interpret=interpret,
    )
    with tpu_context():
        sums = kernel(scalars, *flat)
    return sums.reshape(len(leaves), 2)


def leaf_sums_reference(*args, **kwargs) -> jax.Array:
    """The plain-JAX reference of :func:`leaf_sums` (same arguments, no tiling)."""
    for k in ("block_rows", "block_lanes", "interpret"):
        kwargs.pop(k, None)
    return ew.leaf_sums_reference(*args, **kwargs)


def update(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    ratios: jax.Array,
    scalars: jax.Array,
    *,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Runs the update pass over non-empty leaves.

    Args:
      params, grads, momentum: The leaves' arrays.
      ratios: (len(leaves),) float32 trust ratios.
      scalars: The float32 scalars vector.
      flags, leaves, block_rows, block_lanes, interpret: As in :func:`leaf_sums`.

    Returns:
      (updates, new momenta), in the leaves' shapes; with
      ``flags.write_params`` the new params in place of the updates. The
      kernel writes the new momenta (and params) over the given arrays'
      buffers when they are donated.
    """
    leaves = tuple(leaves)
    plan = plan_tiles([leaf.size for leaf in leaves], block_rows, block_lanes)
    flat = [x.reshape(v) for x, v in zip((*params, *grads, *momentum), plan.views * 3, strict=True)]
    out_shape = [
        jax.ShapeDtypeStruct(v, leaf.param_dtype)
        for v, leaf in zip(plan.views, leaves, strict=True)
    ]
    out_shape += [
        jax.ShapeDtypeStruct(v, leaf.momentum_dtype)
        for v, leaf in zip(plan.views, leaves, strict=True)
    ]
    # Inputs: scalars, ratios, then n params, n gradients, n momenta; outputs:
    # n updates (or params), n momenta. Aliased: momentum -> new momentum, and
    # with write_params param -> new param.
    n = len(leaves)
    aliases = {2 + 2 * n + i: n + i for i in range(n)}
    if flags.write_params:
        aliases.update({2 + i: i for i in range(n)})
    kernel = pl.pallas_call(
        functools.partial(update_kernel, plan=plan, leaves=leaves, flags=flags),
        out_shape=tuple(out_shape),
        in_specs=[SMEM, SMEM] + [ANY] * len(flat),
        out_specs=tuple([ANY] * len(out_shape)),
        scratch_shapes=scratch_shapes(_UPDATE_ROLES, leaves, plan),
        input_output_aliases=aliases,
        interpret=interpret,
    )
    with tpu_context():
        outs = kernel(scalars, ratios, *flat)
    shapes = [p.shape for p in params]
    updates = [o.reshape(s) for o, s in zip(outs[:n], shapes, strict=True)]
    new_momentum = [o.reshape(s) for o, s in zip(outs[n:], shapes, strict=True)]
    return updates, new_momentum


def update_reference(*args, **kwargs) -> tuple[list[jax.Array], list[jax.Array]]:
    """The plain-JAX reference of :func:`update` (same arguments, no tiling)."""
    for k in ("block_rows", "block_lanes", "interpret"):
        kwargs.pop(k, None)
    return ew.update_reference(*args, **kwargs)
