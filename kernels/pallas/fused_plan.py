"""The static schedule of the fused Mosaic TPU kernel, and its VMEM ring's size.

The blocks of the fused layers are numbered in order, leaf after leaf, and
block b lives in ring slot ``b % ring``. The loads of the first ``ring`` blocks
start at once; when the update of layer j ends, the slots of its blocks are
free, and the loads after them start, up to ``ring`` blocks past the first
block of layer j+1. So the kernel never waits for a load that has not been
started and never loads into a slot whose block is still to be used
(``tests/test_pallas_fused.py`` replays the plan to check both). A layer is
fused when its blocks fit in the ring (:func:`fusable`), whose default size
comes from the chip's VMEM (:func:`default_ring`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jax.experimental.pallas import tpu as pltpu

from lars.contract import LeafSpec

from .tpu_pipeline import (
    BLOCK_LANES,
    BLOCK_ROWS,
    LANES,
    ROWS,
    Branch,
    TilePlan,
    branch_runs,
    buffer_keys,
    plan_tiles,
    tpu_context,
)

# Share of the chip's VMEM for the ring (arithmetic on ResNet-50's layers, docs/pallas.md).
RING_FRACTION = 0.5

RING_ROLES = ("param_dtype", "grad_dtype")  # w and g: read once, kept in the ring
IN_ROLES = ("momentum_dtype",)  # v: streamed
OUT_ROLES = ("param_dtype", "momentum_dtype")  # the update (or new w) and new v


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
    for branch, count in branch_runs(tiles):
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


def _slot_bytes(dtype_name: str, kind: str, block_rows: int, block_lanes: int) -> int:
    """VMEM bytes of one block buffer slot (a (1, n) block pads to a full tile
    of 32 bytes per lane: 8 float32 or 16 bfloat16 sublanes)."""
    if kind == ROWS:
        return block_rows * LANES * np.dtype(dtype_name).itemsize
    return 32 * block_lanes


def buffers_bytes(roles, leaves, plan: TilePlan, slots: int) -> int:
    """VMEM bytes of the buffers of ``roles`` (``slots`` slots each) for ``plan``."""
    total = 0
    for attr in roles:
        for name, kind in buffer_keys(attr, leaves, plan):
            total += slots * _slot_bytes(name, kind, plan.block_rows, plan.block_lanes)
    return total


def vmem_capacity() -> int:
    """VMEM bytes of the TensorCore traced for (``DEFAULT_CHIP`` off a TPU)."""
    with tpu_context():
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)


def default_ring(
    leaves: Sequence[LeafSpec],
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
) -> int:
    """Ring slots for ``leaves`` (sizes > 0): ``RING_FRACTION`` of the chip's VMEM
    over the bytes of one slot of every ring buffer these leaves use."""
    plan = plan_tiles([leaf.size for leaf in leaves], block_rows, block_lanes)
    per_slot = buffers_bytes(RING_ROLES, leaves, plan, 1)
    if not per_slot:
        return 2
    return max(2, int(vmem_capacity() * RING_FRACTION) // per_slot)


def fusable(
    leaves: Sequence[LeafSpec],
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
