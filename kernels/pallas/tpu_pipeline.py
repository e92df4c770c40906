"""The block schedule and the DMA pipeline of the Mosaic TPU kernels.

Each leaf is viewed as a 2-D array the vector unit can tile (:func:`leaf_view`)
and cut into full blocks plus one remainder block (:func:`plan_tiles`), so no
DMA crosses a leaf's end and no mask is needed. :func:`pipeline` walks that
schedule, leaf after leaf, with double buffering: the DMA of block t+1
(possibly the next leaf's first block) runs while block t is computed, and the
results of block t drain while block t+1 is computed. ``mosaic_tpu`` and
``mosaic_tpu_fused`` build their kernels on these pieces.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lars.contract import LeafSpec

# Rows per (n / 128, 128) block: sized to a v5e's scoped VMEM (arithmetic, docs/pallas.md).
BLOCK_ROWS = 512
# Lanes per (1, n) block: such blocks fill one sublane in 8, so 8x fewer elements.
BLOCK_LANES = 8192
LANES = 128

# The chip the kernels are traced for when no TPU is attached (interpret mode,
# cross-lowering): Pallas asks it for the memory tiling.
DEFAULT_CHIP = "TPU v5 lite"

ROWS, LANES_KIND = "rows", "lanes"

ANY = pl.BlockSpec(memory_space=pl.ANY)
SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)


@dataclasses.dataclass(frozen=True)
class Branch:
    """One kind of block: a leaf's full blocks, or its remainder block.

    Attributes:
      leaf: Position of the leaf in the launch's leaf list.
      kind: ``ROWS`` for a (n / 128, 128) view, ``LANES_KIND`` for (1, n).
      full: Full blocks (their start is a loop variable); else the remainder.
      start: Static start (in rows or lanes) of a remainder branch.
      length: Rows (or lanes) in the block.
    """

    leaf: int
    kind: str
    full: bool
    start: int
    length: int


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The block schedule of one launch.

    Attributes:
      views: Per leaf, the 2-D view its arrays are reshaped to.
      branches: The branches, in schedule order.
      table: (blocks, 2) int32: branch index and start (rows or lanes) of every
        block, in schedule order.
      block_rows, block_lanes: The full block sizes.
    """

    views: tuple[tuple[int, int], ...]
    branches: tuple[Branch, ...]
    table: np.ndarray
    block_rows: int
    block_lanes: int

    @property
    def num_steps(self) -> int:
        return int(self.table.shape[0])

    def block_shape(self, kind: str) -> tuple[int, int]:
        return (self.block_rows, LANES) if kind == ROWS else (1, self.block_lanes)


def leaf_view(size: int) -> tuple[int, int]:
    """The 2-D view of a leaf of ``size`` > 0 elements."""
    return (size // LANES, LANES) if size % LANES == 0 else (1, size)


def plan_tiles(
    sizes: Sequence[int], block_rows: int = BLOCK_ROWS, block_lanes: int = BLOCK_LANES
) -> TilePlan:
    """Lays the leaves of ``sizes`` out as blocks, leaf after leaf.

    Raises:
      ValueError: for block sizes the vector unit cannot tile.
    """
    if block_rows <= 0 or block_rows % 32:
        raise ValueError(f"block_rows must be a positive multiple of 32, got {block_rows}")
    if block_lanes <= 0 or block_lanes % LANES:
        raise ValueError(f"block_lanes must be a positive multiple of {LANES}, got {block_lanes}")
    branches: list[Branch] = []
    rows: list[tuple[int, int]] = []
    views = []
    for leaf, n in enumerate(sizes):
        view = leaf_view(n)
        views.append(view)
        kind = ROWS if view[1] == LANES else LANES_KIND
        total, block = (view[0], block_rows) if kind == ROWS else (view[1], block_lanes)
        n_full = total // block
        if n_full:
            branches.append(Branch(leaf, kind, True, 0, block))
            rows.extend((len(branches) - 1, t * block) for t in range(n_full))
        if total % block:
            start = n_full * block
            branches.append(Branch(leaf, kind, False, start, total - start))
            rows.append((len(branches) - 1, start))
    table = np.asarray(rows, np.int32).reshape(-1, 2)
    return TilePlan(tuple(views), tuple(branches), table, block_rows, block_lanes)


def window(branch: Branch, start):
    """Index of the branch's block in the leaf's 2-D view."""
    if branch.full:
        start = pl.multiple_of(start, branch.length)
    else:
        start = branch.start
    if branch.kind == ROWS:
        return (pl.ds(start, branch.length), slice(None))
    return (slice(None), pl.ds(start, branch.length))


def _buffer_window(branch: Branch, slot):
    """Index of the branch's block in a (slots, *block) VMEM buffer."""
    if branch.kind == ROWS:
        return (slot, pl.ds(0, branch.length), slice(None))
    return (slot, slice(None), pl.ds(0, branch.length))


@dataclasses.dataclass(frozen=True)
class Stream:
    """The HBM arrays and VMEM buffers of one operand role (e.g. "the params").

    Attributes:
      dtype_attr: The ``LeafSpec`` attribute holding the role's dtype.
      hbm: Per leaf, its array in HBM.
      buffers: (dtype name, kind) -> the (slots, *block) VMEM buffer of that role.
      sems: The role's DMA semaphores, one per slot.
    """

    dtype_attr: str
    hbm: Sequence
    buffers: dict
    sems: object

    def block(self, branch: Branch, leaves: Sequence[LeafSpec], slot):
        """The VMEM block of ``branch`` in ``slot``."""
        dtype = np.dtype(getattr(leaves[branch.leaf], self.dtype_attr))
        buf = self.buffers[(dtype.name, branch.kind)]
        return buf.at[_buffer_window(branch, slot)]


def buffer_keys(dtype_attr: str, leaves, plan: TilePlan) -> list[tuple[str, str]]:
    keys = []
    for branch in plan.branches:
        key = (np.dtype(getattr(leaves[branch.leaf], dtype_attr)).name, branch.kind)
        if key not in keys:
            keys.append(key)
    return keys


def scratch_shapes(dtype_attrs: Sequence[str], leaves, plan: TilePlan, slots: int = 2) -> list:
    """Per role, a (slots, *block) VMEM buffer per (dtype, kind) in use; then
    per role a (slots,) array of DMA semaphores."""
    shapes = []
    for attr in dtype_attrs:
        for name, kind in buffer_keys(attr, leaves, plan):
            shapes.append(pltpu.VMEM((slots, *plan.block_shape(kind)), np.dtype(name)))
    shapes.extend(pltpu.SemaphoreType.DMA((slots,)) for _ in dtype_attrs)
    return shapes


def split_streams(dtype_attrs, hbm_groups, scratch, leaves, plan) -> list[Stream]:
    """Splits the kernel's scratch refs into one ``Stream`` per role."""
    scratch = list(scratch)
    keys = [buffer_keys(attr, leaves, plan) for attr in dtype_attrs]
    sems = scratch[sum(map(len, keys)) :]
    streams = []
    for attr, hbm, role_keys, sem in zip(dtype_attrs, hbm_groups, keys, sems, strict=True):
        buffers = {key: scratch.pop(0) for key in role_keys}
        streams.append(Stream(attr, hbm, buffers, sem))
    return streams


def copies(branch: Branch, start, slot, streams, leaves, to_vmem: bool):
    """The DMA descriptors moving one block of every stream to or from VMEM."""
    out = []
    for stream in streams:
        hbm = stream.hbm[branch.leaf].at[window(branch, start)]
        vmem = stream.block(branch, leaves, slot)
        src, dst = (hbm, vmem) if to_vmem else (vmem, hbm)
        out.append(pltpu.make_async_copy(src, dst, stream.sems.at[slot]))
    return out


def branch_runs(plan: TilePlan) -> list[tuple[Branch, int]]:
    """The launch's schedule: per leaf, its full-block branch (with the number of
    blocks) and/or its remainder branch (count 1), in order."""
    counts: dict[int, int] = {}
    for b, _ in plan.table:
        counts[int(b)] = counts.get(int(b), 0) + 1
    return [(branch, counts[i]) for i, branch in enumerate(plan.branches)]


def pipeline(plan: TilePlan, leaves, ins, outs, compute, carry=None):
    """The body of every kernel: double-buffered DMA around ``compute``.

    The schedule is static: leaf after leaf, a ``fori_loop`` over the leaf's
    full blocks, then its remainder block. Step t uses VMEM slot t % 2. While
    block t is computed, the DMA of block t+1 runs, be it the next block of the
    same leaf or the first block of the next leaf, so the input stream never
    stops at a leaf boundary. Outputs of block t drain while block t+1 is
    computed; they are waited for before their slot is reused and at the end
    of each leaf.

    ``compute(branch, in_blocks, out_blocks, carry) -> carry`` gets the VMEM
    blocks (refs) of the current step.
    """
    schedule = branch_runs(plan)
    firsts = []  # global index of the first step of each schedule entry
    total = 0
    for _, count in schedule:
        firsts.append(total)
        total += count

    def start_in(branch, start, slot):
        for c in copies(branch, start, slot, ins, leaves, True):
            c.start()

    def wait_in(branch, start, slot):
        for c in copies(branch, start, slot, ins, leaves, True):
            c.wait()

    def start_out(branch, start, slot):
        for c in copies(branch, start, slot, outs, leaves, False):
            c.start()

    def wait_out(branch, start, slot):
        for c in copies(branch, start, slot, outs, leaves, False):
            c.wait()

    def run(branch, start, slot, carry):
        in_blocks = [x.block(branch, leaves, slot) for x in ins]
        out_blocks = [x.block(branch, leaves, slot) for x in outs]
        return compute(branch, in_blocks, out_blocks, carry)

    if schedule:
        start_in(schedule[0][0], 0, 0)
    for e, (branch, count) in enumerate(schedule):
        first = firsts[e]
        nxt = schedule[e + 1][0] if e + 1 < len(schedule) else None

        def prefetch_next(slot, nxt=nxt):
            # The next entry's first block: start 0 (a remainder's start is static).
            if nxt is not None:
                start_in(nxt, 0, slot)

        if branch.full:
            size = branch.length

            def body(
                k,
                carry,
                branch=branch,
                first=first,
                count=count,
                size=size,
                prefetch_next=prefetch_next,
            ):
                slot = (first + k) % 2
                start = k * size

                @pl.when(k + 1 < count)
                def _():
                    start_in(branch, start + size, 1 - slot)

                @pl.when(k + 1 == count)
                def _():
                    prefetch_next(1 - slot)

                wait_in(branch, start, slot)
                if outs:

                    @pl.when(k >= 2)
                    def _():
                        wait_out(branch, start - 2 * size, slot)

                carry = run(branch, start, slot, carry)
                start_out(branch, start, slot)
                return carry

            carry = lax.fori_loop(0, count, body, carry)
            for k in range(max(0, count - 2), count):  # drain the last outputs
                if outs:
                    wait_out(branch, k * size, (first + k) % 2)
        else:
            slot = first % 2
            prefetch_next(1 - slot)
            wait_in(branch, branch.start, slot)
            carry = run(branch, branch.start, slot, carry)
            if outs:
                start_out(branch, branch.start, slot)
                wait_out(branch, branch.start, slot)
    return carry


def scalar_getter(ref):
    return lambda i: ref[i]


def tpu_context():
    """The tracing context: a TPU target named for Pallas when none is attached."""
    if jax.default_backend() == "tpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=DEFAULT_CHIP, platform="tpu", num_cores=1)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))
