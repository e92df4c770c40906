"""One pass over memory per layer on TPU: the fused Mosaic TPU LARS kernel.

The two-pass kernels of ``mosaic_tpu`` read a layer's w and g from HBM twice,
once for its norms and once for its update: 28 bytes per float32 parameter. A
TPU has no cache to catch the second read, so this kernel keeps them in VMEM.
It reads each layer's w and g once, into a *ring* of VMEM blocks, sums the
layer's blocks as they arrive, computes the layer's trust ratio on the vector
unit, and then streams the momentum in and the new params (or updates) and new
momentum out, taking w and g from the ring: 20 bytes per float32 parameter.

The schedule (:class:`FusedPlan`) is static and plain Python. The blocks of the
fused layers are numbered in order, leaf after leaf, and block b lives in ring
slot ``b % ring``. The loads of the first ``ring`` blocks start at once. When
the update of layer j ends, the slots of its blocks are free, and the loads
of the blocks after them start, up to ``ring`` blocks past the first block of
layer j+1. So while one layer is summed and updated, the loads of the layers
after it are already under way, as far as the ring has room. The kernel never
waits for a load that has not been started, and never starts a load into a
slot whose block has not been used. ``tests/test_pallas.py`` checks both by
replaying the plan. A layer is fused when its blocks fit in the ring. Larger
layers are left to the two-pass kernels, in a launch of their own.

A TensorCore runs one program at a time, so the kernel is one invocation that
walks this schedule; there is nothing to synchronise and nothing to deadlock.
Each layer's sums are accumulated block after block, in the order of the
two-pass norm kernel, so the sums agree bitwise with it.

On a CPU the kernel runs in Pallas' interpret mode, like ``mosaic_tpu``. The
ring size comes from the chip's VMEM (``ring_blocks``); tests pass small
rings, so that they wrap around many times and split the leaves.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import elementwise as ew
from .mosaic_tpu import (
    _ANY,
    _SMEM,
    BLOCK_LANES,
    BLOCK_ROWS,
    LANES,
    ROWS,
    Branch,
    TilePlan,
    _buffer_keys,
    _copies,
    _scalar_getter,
    _scratch_shapes,
    _streams,
    _tiles,
    plan_tiles,
    tpu_context,
)

# The share of the chip's VMEM the ring may use. The rest holds the streamed
# blocks (momentum in, two results out, double-buffered: about 1.5 MiB with the
# default blocks) and what Mosaic needs for itself. For a TPU v5e or v6e
# (128 MiB of VMEM) this is a ring of 64 MiB: 128 float32 blocks of w and g,
# so every layer of ResNet-50 (the largest is 2.4M params, 36 blocks) is fused,
# and the next layer's loads can start while a layer is updated. For a v4
# (16 MiB), it is 16 blocks: layers of up to 1M params. Chosen by that
# arithmetic; not measured (no TPU was available).
RING_FRACTION = 0.5
# VMEM the kernel asks for on top of its buffers (Mosaic's internal scratch).
VMEM_MARGIN = 4 * 1024 * 1024
# The trust scalars the kernel reads from SMEM.
TRUST_COEFFICIENT, EPS, TRUST_CLIP = 0, 1, 2
NUM_TRUST_SCALARS = 4

_RING_ROLES = ("param_dtype", "grad_dtype")  # w and g: read once, kept in the ring
_IN_ROLES = ("momentum_dtype",)  # v: streamed
_OUT_ROLES = ("param_dtype", "momentum_dtype")  # the update (or new w) and new v


@dataclasses.dataclass(frozen=True)
class Entry:
    """A run of blocks of one branch, in the fused schedule.

    Attributes:
      branch: The branch (a leaf's full blocks, or its remainder block).
      first: The global index of its first block (its ring slot is
        ``first % ring``).
      count: Its number of blocks.
    """

    branch: Branch
    first: int
    count: int

    def start(self, k):
        """The start (rows or lanes) of its k-th block in the leaf's view."""
        return k * self.branch.length if self.branch.full else self.branch.start


@dataclasses.dataclass(frozen=True)
class FusedPlan:
    """The static schedule of one fused launch.

    Attributes:
      tiles: The blocks of the launch's leaves (as for the two-pass kernels).
      ring: Slots in the ring (blocks of w and of g kept in VMEM).
      entries: Per leaf, its entries in order.
      initial: The global block range whose loads start first.
      refills: Per leaf, the global block range whose loads start once the
        leaf's update is done.
    """

    tiles: TilePlan
    ring: int
    entries: tuple[tuple[Entry, ...], ...]
    initial: tuple[int, int]
    refills: tuple[tuple[int, int], ...]

    @property
    def num_blocks(self) -> int:
        return self.tiles.num_steps


def leaf_blocks(size: int, block_rows: int = BLOCK_ROWS, block_lanes: int = BLOCK_LANES) -> int:
    """The number of blocks of a leaf of ``size`` > 0 elements."""
    return plan_tiles([size], block_rows, block_lanes).num_steps


def plan_fused(
    sizes: Sequence[int],
    ring: int,
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
) -> FusedPlan:
    """The fused schedule of leaves of ``sizes`` (each > 0) with a ring of ``ring`` slots.

    Raises:
      ValueError: if ``ring`` < 2, or a leaf has more blocks than the ring.
    """
    if ring < 2:
        raise ValueError(f"the ring needs at least 2 slots, got {ring}")
    tiles = plan_tiles(sizes, block_rows, block_lanes)
    per_leaf: list[list[Entry]] = [[] for _ in sizes]
    first = 0
    for branch, count in _tiles(tiles):
        per_leaf[branch.leaf].append(Entry(branch, first, count))
        first += count
    total = first
    starts = [entries[0].first for entries in per_leaf] + [total]
    for j in range(len(sizes)):
        blocks = starts[j + 1] - starts[j]
        if blocks > ring:
            raise ValueError(f"leaf {j} has {blocks} blocks, more than the ring's {ring} slots")
    # After leaf j's update every block before leaf j+1 is used, so the loads
    # may run up to `ring` blocks past leaf j+1's first block.
    refills = tuple(
        (min(total, starts[j] + ring), min(total, starts[j + 1] + ring)) for j in range(len(sizes))
    )
    return FusedPlan(
        tiles,
        ring,
        tuple(tuple(e) for e in per_leaf),
        (0, min(total, ring)),
        refills,
    )


# --------------------------------------------------------------------------
# The kernel.


def _ratio(sum_w2, sum_u2, trust_ref, scalars, flags: ew.StepFlags, trust_clip: bool):
    """A leaf's trust ratio from its sums, computed on (8, 128) vectors.

    The vector unit has the square root and the division the scalar unit
    lacks. Every entry holds the same value, so the max is that value exactly.
    """

    def vec(x):
        return jnp.full((8, LANES), x, jnp.float32)

    r = ew.trust_ratio(
        vec(sum_w2),
        vec(sum_u2),
        vec(trust_ref[TRUST_COEFFICIENT]),
        vec(trust_ref[EPS]),
        vec(trust_ref[TRUST_CLIP]) if trust_clip else None,
    )
    if flags.skip_nonfinite:  # a skipped step reports ratios of 1, as the reference
        r = jnp.where(vec(scalars(ew.FINITE)) != 0.0, r, 1.0)
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
    trust_ref,
    *refs,
    fplan: FusedPlan,
    leaves: Sequence[ew.LeafSpec],
    flags: ew.StepFlags,
    trust_clip: bool,
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
        len(_scratch_shapes(roles, leaves, plan, slots))
        for roles, slots in ((_RING_ROLES, ring_size), (_IN_ROLES, 2))
    ]
    ring = _streams(_RING_ROLES, groups[:2], scratch[: sizes[0]], leaves, plan)
    v_in = _streams(_IN_ROLES, groups[2:3], scratch[sizes[0] : sum(sizes)], leaves, plan)
    outs = _streams(_OUT_ROLES, groups[3:], scratch[sum(sizes) :], leaves, plan)
    scalars = _scalar_getter(scalars_ref)
    all_entries = [e for entries in fplan.entries for e in entries]

    def start(streams, entry: Entry, k, slot, to_vmem=True):
        for c in _copies(entry.branch, entry.start(k), slot, streams, leaves, to_vmem):
            c.start()

    def wait(streams, entry: Entry, k, slot, to_vmem=True):
        for c in _copies(entry.branch, entry.start(k), slot, streams, leaves, to_vmem):
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
            ratio_ref[j] = _ratio(
                acc_ref[ew.SUM_W2], acc_ref[ew.SUM_U2], trust_ref, scalars, flags, trust_clip
            )
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


def _slot_bytes(dtype_name: str, kind: str, block_rows: int, block_lanes: int) -> int:
    """VMEM bytes of one block buffer slot (a (1, n) block pads to a full tile
    of 32 bytes per lane: 8 float32 or 16 bfloat16 sublanes)."""
    if kind == ROWS:
        return block_rows * LANES * np.dtype(dtype_name).itemsize
    return 32 * block_lanes


def _buffers_bytes(roles, leaves, plan: TilePlan, slots: int) -> int:
    total = 0
    for attr in roles:
        for name, kind in _buffer_keys(attr, leaves, plan):
            total += slots * _slot_bytes(name, kind, plan.block_rows, plan.block_lanes)
    return total


def _vmem_capacity() -> int:
    """VMEM bytes of the TensorCore traced for (``DEFAULT_CHIP`` off a TPU)."""
    with tpu_context():
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)


def default_ring(
    leaves: Sequence[ew.LeafSpec],
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
) -> int:
    """Ring slots for ``leaves`` (sizes > 0): ``RING_FRACTION`` of the chip's VMEM
    over the bytes of one slot of every ring buffer these leaves use."""
    plan = plan_tiles([leaf.size for leaf in leaves], block_rows, block_lanes)
    per_slot = _buffers_bytes(_RING_ROLES, leaves, plan, 1)
    if not per_slot:
        return 2
    return max(2, int(_vmem_capacity() * RING_FRACTION) // per_slot)


def fusable(
    leaves: Sequence[ew.LeafSpec],
    *,
    ring_blocks: int | None = None,
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
) -> tuple[list[bool], int]:
    """Which leaves (sizes > 0) the fused kernel takes, and the ring size.

    A leaf is fused when its blocks fit in the ring (``ring_blocks``, by
    default :func:`default_ring`).
    """
    ring = ring_blocks if ring_blocks is not None else default_ring(leaves, block_rows, block_lanes)
    return [leaf_blocks(leaf.size, block_rows, block_lanes) <= ring for leaf in leaves], ring


def trust_scalars(trust_coefficient, eps, trust_clip) -> jax.Array:
    """The (NUM_TRUST_SCALARS,) float32 SMEM input of the fused kernel."""
    values = [trust_coefficient, eps, trust_clip] + [0.0] * (NUM_TRUST_SCALARS - 3)
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in values])


def fused_update(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    scalars: jax.Array,
    trust: jax.Array,
    *,
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
    trust_clip: bool,
    ring_blocks: int,
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """The whole LARS step of non-empty leaves, in one launch and one pass.

    Args:
      params, grads, momentum: The leaves' arrays.
      scalars: The float32 scalars vector (see ``elementwise``).
      trust: The trust scalars (:func:`trust_scalars`).
      flags: Static options.
      leaves: Static per-leaf facts (sizes must be positive, and each leaf's
        blocks must fit in the ring).
      trust_clip: Clip the trust ratios at ``trust[TRUST_CLIP]``.
      ring_blocks: Ring slots (see :func:`fusable`).
      block_rows, block_lanes: Block sizes (see ``mosaic_tpu``).
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
    # Inputs: scalars, trust, then n params, n gradients, n momenta; outputs:
    # n updates (or params), n momenta, the ratios.
    aliases = {2 + 2 * n + i: n + i for i in range(n)}
    if flags.write_params:
        aliases.update({2 + i: i for i in range(n)})
    scratch = [
        *_scratch_shapes(_RING_ROLES, leaves, plan, ring_blocks),
        *_scratch_shapes(_IN_ROLES, leaves, plan),
        *_scratch_shapes(_OUT_ROLES, leaves, plan),
        pltpu.SMEM((2,), jnp.float32),
    ]
    vmem = (
        _buffers_bytes(_RING_ROLES, leaves, plan, ring_blocks)
        + _buffers_bytes(_IN_ROLES + _OUT_ROLES, leaves, plan, 2)
        + VMEM_MARGIN
    )
    kernel = pl.pallas_call(
        functools.partial(
            fused_kernel, fplan=fplan, leaves=leaves, flags=flags, trust_clip=trust_clip
        ),
        out_shape=tuple(out_shape),
        in_specs=[_SMEM, _SMEM] + [_ANY] * len(flat),
        out_specs=tuple([_ANY] * (2 * n) + [_SMEM]),
        scratch_shapes=scratch,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(vmem_limit_bytes=vmem),
        interpret=interpret,
    )
    with tpu_context():
        outs = kernel(scalars, trust, *flat)
    shapes = [p.shape for p in params]
    first = [o.reshape(s) for o, s in zip(outs[:n], shapes, strict=True)]
    new_momentum = [o.reshape(s) for o, s in zip(outs[n : 2 * n], shapes, strict=True)]
    return first, new_momentum, outs[2 * n]


def fused_update_reference(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    scalars: jax.Array,
    trust: jax.Array,
    *,
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
    trust_clip: bool,
    **unused,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """The plain-JAX reference of :func:`fused_update` (same arguments, no tiling)."""
    del unused
    sums = ew.leaf_sums_reference(params, grads, scalars, flags, leaves)
    r = ew.trust_ratio(
        sums[:, ew.SUM_W2],
        sums[:, ew.SUM_U2],
        trust[TRUST_COEFFICIENT],
        trust[EPS],
        trust[TRUST_CLIP] if trust_clip else None,
    )
    r = jnp.where(np.asarray([leaf.trust for leaf in leaves], bool), r, 1.0)
    if flags.skip_nonfinite:
        r = jnp.where(scalars[ew.FINITE] != 0.0, r, 1.0)
    first, new_momentum = ew.update_reference(params, grads, momentum, r, scalars, flags, leaves)
    return first, new_momentum, r
