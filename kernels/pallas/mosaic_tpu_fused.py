"""The fused Mosaic TPU LARS kernel: one pass over memory per layer.

Each layer's w and g are read once from HBM into a ring of VMEM blocks (the
schedule of ``fused_plan``), summed as they arrive, the layer's trust ratio
computed on the vector unit, and the layer updated from the ring while the
momentum streams in and the results stream out: 20 instead of 28 bytes per
float32 parameter. The kernel is one invocation walking that static schedule;
each layer's sums accumulate in the order of ``mosaic_tpu``'s norm pass.
Layers larger than the ring are left to ``mosaic_tpu``'s two passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lars.contract import LeafSpec, Scalar

from . import elementwise as ew
from .fused_plan import (
    IN_ROLES,
    OUT_ROLES,
    RING_ROLES,
    Entry,
    FusedPlan,
    buffers_bytes,
    plan_fused,
)
from .tpu_pipeline import (
    ANY,
    BLOCK_LANES,
    BLOCK_ROWS,
    LANES,
    SMEM,
    copies,
    scalar_getter,
    scratch_shapes,
    split_streams,
    tpu_context,
)

# VMEM the kernel asks for on top of its buffers (Mosaic's internal scratch).
VMEM_MARGIN = 4 * 1024 * 1024


# --------------------------------------------------------------------------
# The kernel.


def _ratio(sum_w2, sum_u2, scalars, flags: ew.Flags):
    """A leaf's trust ratio from its sums, computed on (8, 128) vectors.

    The vector unit has the square root and the division the scalar unit
    lacks. Every entry holds the same value, so the max is that value exactly.
    """

    def vec(x):
        return jnp.full((8, LANES), x, jnp.float32)

    r = ew.trust_ratio(
        vec(sum_w2),
        vec(sum_u2),
        vec(ew.scalar(scalars, Scalar.TRUST_COEFFICIENT)),
        vec(ew.scalar(scalars, Scalar.EPS)),
        vec(ew.scalar(scalars, Scalar.TRUST_CLIP)) if flags.trust_clip else None,
    )
    if flags.skip_nonfinite:  # a skipped step reports ratios of 1, as the reference
        r = jnp.where(vec(ew.scalar(scalars, Scalar.FINITE)) != 0.0, r, 1.0)
    return jnp.max(r)


def _for_each_block(entry: Entry, body) -> None:
    """Calls ``body(k)`` for the entry's blocks: a loop, or one static call."""
    if entry.branch.full:

        def step(k, carry):
            body(k)
            return carry

        lax.fori_loop(0, entry.count, step, 0)
    else:
        body(0)


def fused_kernel(
    scalars_ref,
    *refs,
    fplan: FusedPlan,
    leaves: Sequence[LeafSpec],
    flags: ew.Flags,
) -> None:
    """The whole step of the launch's leaves, one leaf after the other.

    ``refs`` are the params, gradients and momenta in HBM; the updates (or new
    params, with ``flags.write_params``) and new momenta (outputs in HBM,
    aliased to the inputs by the launcher); the (leaves,) SMEM ratios output;
    then the VMEM ring, the stream buffers, the DMA semaphores and a (2,) SMEM
    accumulator.
    """
    n = len(leaves)
    plan = fplan.tiles
    ring_size = fplan.ring
    groups = [refs[i * n : (i + 1) * n] for i in range(5)]
    ratio_ref = refs[5 * n]
    scratch = list(refs[5 * n + 1 : -1])
    acc_ref = refs[-1]
    sizes = [
        len(scratch_shapes(roles, leaves, plan, slots))
        for roles, slots in ((RING_ROLES, ring_size), (IN_ROLES, 2))
    ]
    ring = split_streams(RING_ROLES, groups[:2], scratch[: sizes[0]], leaves, plan)
    v_in = split_streams(IN_ROLES, groups[2:3], scratch[sizes[0] : sum(sizes)], leaves, plan)
    outs = split_streams(OUT_ROLES, groups[3:], scratch[sum(sizes) :], leaves, plan)
    scalars = scalar_getter(scalars_ref)
    all_entries = [e for entries in fplan.entries for e in entries]

    def start(streams, entry: Entry, k, slot, to_vmem=True):
        for c in copies(entry.branch, entry.start(k), slot, streams, leaves, to_vmem):
            c.start()

    def wait(streams, entry: Entry, k, slot, to_vmem=True):
        for c in copies(entry.branch, entry.start(k), slot, streams, leaves, to_vmem):
            c.wait()

    def issue(lo: int, hi: int) -> None:
        """Starts the ring loads of the global blocks [lo, hi)."""
        for entry in all_entries:
            a, b = max(lo, entry.first), min(hi, entry.first + entry.count)
            if a >= b:
                continue
            if entry.branch.full:

                def load(k, carry, entry=entry):
                    start(ring, entry, k, (entry.first + k) % ring_size)
                    return carry

                lax.fori_loop(a - entry.first, b - entry.first, load, 0)
            else:
                start(ring, entry, 0, entry.first % ring_size)

    def ring_tiles(entry: Entry, k):
        slot = (entry.first + k) % ring_size
        return [x.block(entry.branch, leaves, slot)[...] for x in ring]

    issue(*fplan.initial)
    for j, entries in enumerate(fplan.entries):
        leaf = leaves[j]
        start(v_in, entries[0], 0, 0)  # the first momentum block, while w and g arrive

        if leaf.trust:  # the norms, as the leaf's blocks arrive in the ring
            acc_ref[ew.SUM_W2] = jnp.float32(0)
            acc_ref[ew.SUM_U2] = jnp.float32(0)
            for entry in entries:

                def add_sums(k, entry=entry, leaf=leaf):
                    wait(ring, entry, k, (entry.first + k) % ring_size)
                    w, g = ring_tiles(entry, k)
                    a, b = ew.tile_sums(w, g, scalars, flags, leaf)
                    acc_ref[ew.SUM_W2] += a
                    acc_ref[ew.SUM_U2] += b

                _for_each_block(entry, add_sums)
            ratio_ref[j] = _ratio(acc_ref[ew.SUM_W2], acc_ref[ew.SUM_U2], scalars, flags)
        else:
            ratio_ref[j] = jnp.float32(1)

        done = 0  # blocks of the leaf updated before the entry: its stream slots' parity
        for e, entry in enumerate(entries):
            after = entries[e + 1] if e + 1 < len(entries) else None

            def update(k, entry=entry, after=after, done=done, leaf=leaf, j=j):
                slot = (done + k) % 2
                if not leaf.trust:
                    wait(ring, entry, k, (entry.first + k) % ring_size)
                if entry.branch.full:

                    @pl.when(k + 1 < entry.count)
                    def _():
                        start(v_in, entry, k + 1, 1 - slot)

                    if after is not None:

                        @pl.when(k + 1 == entry.count)
                        def _():
                            start(v_in, after, 0, 1 - slot)

                    @pl.when(k >= 2)
                    def _():
                        wait(outs, entry, k - 2, slot, to_vmem=False)

                wait(v_in, entry, k, slot)
                w, g = ring_tiles(entry, k)
                v = v_in[0].block(entry.branch, leaves, slot)[...]
                first, v_new = ew.tile_update(w, g, v, ratio_ref[j], scalars, flags, leaf)
                outs[0].block(entry.branch, leaves, slot)[...] = first
                outs[1].block(entry.branch, leaves, slot)[...] = v_new
                start(outs, entry, k, slot, to_vmem=False)

            _for_each_block(entry, update)
            for k in range(max(0, entry.count - 2), entry.count):  # drain the results
                wait(outs, entry, k, (done + k) % 2, to_vmem=False)
            done += entry.count
        issue(*fplan.refills[j])


# --------------------------------------------------------------------------
# The launcher.


def fused_update(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
    ring_blocks: int,
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """The whole LARS step of non-empty leaves, in one launch and one pass.

    Args:
      params, grads, momentum: The leaves' arrays.
      scalars: The float32 ``contract.Scalar`` vector (the trust ratio's
        coefficient, eps and clip included).
      flags: Static options.
      leaves: Static per-leaf facts (sizes must be positive, and each leaf's
        blocks must fit in the ring).
      ring_blocks: Ring slots (see ``fused_plan.fusable``).
      block_rows, block_lanes: Block sizes (see ``tpu_pipeline``).
      interpret: As in ``mosaic_tpu.update``.

    Returns:
      (updates, new momenta, ratios): with ``flags.write_params`` the new params
      in place of the updates, written over the params' buffers when they are
      donated; the new momenta over the momenta's; ratios (len(leaves),) float32.
    """
    leaves = tuple(leaves)
    fplan = plan_fused([leaf.size for leaf in leaves], ring_blocks, block_rows, block_lanes)
    plan = fplan.tiles
    flat = [x.reshape(v) for x, v in zip((*params, *grads, *momentum), plan.views * 3, strict=True)]
    n = len(leaves)
    views = list(zip(plan.views, leaves, strict=True))
    out_shape = [jax.ShapeDtypeStruct(v, leaf.param_dtype) for v, leaf in views]
    out_shape += [jax.ShapeDtypeStruct(v, leaf.momentum_dtype) for v, leaf in views]
    out_shape.append(jax.ShapeDtypeStruct((n,), jnp.float32))
    # Inputs: scalars, then n params, n gradients, n momenta; outputs:
    # n updates (or params), n momenta, the ratios.
    aliases = {1 + 2 * n + i: n + i for i in range(n)}
    if flags.write_params:
        aliases.update({1 + i: i for i in range(n)})
    scratch = [
        *scratch_shapes(RING_ROLES, leaves, plan, ring_blocks),
        *scratch_shapes(IN_ROLES, leaves, plan),
        *scratch_shapes(OUT_ROLES, leaves, plan),
        pltpu.SMEM((2,), jnp.float32),
    ]
    vmem = (
        buffers_bytes(RING_ROLES, leaves, plan, ring_blocks)
        + buffers_bytes(IN_ROLES + OUT_ROLES, leaves, plan, 2)
        + VMEM_MARGIN
    )
    kernel = pl.pallas_call(
        functools.partial(fused_kernel, fplan=fplan, leaves=leaves, flags=flags),
        out_shape=tuple(out_shape),
        in_specs=[SMEM] + [ANY] * len(flat),
        out_specs=tuple([ANY] * (2 * n) + [SMEM]),
        scratch_shapes=scratch,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(vmem_limit_bytes=vmem),
        interpret=interpret,
    )
    with tpu_context():
        outs = kernel(scalars, *flat)
    shapes = [p.shape for p in params]
    first = [o.reshape(s) for o, s in zip(outs[:n], shapes, strict=True)]
    new_momentum = [o.reshape(s) for o, s in zip(outs[n : 2 * n], shapes, strict=True)]
    return first, new_momentum, outs[2 * n]


def fused_update_reference(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
    **unused,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """The plain-JAX reference of :func:`fused_update` (same arguments, no tiling)."""
    del unused
    sums = ew.leaf_sums_reference(params, grads, scalars, flags, leaves)
    r = ew.leaf_ratios(sums, scalars, flags, leaves)
    first, new_momentum = ew.update_reference(params, grads, momentum, r, scalars, flags, leaves)
    return first, new_momentum, r
