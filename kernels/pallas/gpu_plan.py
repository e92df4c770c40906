"""The tile tables of the Mosaic GPU kernels: which block handles which elements.

A leaf's full tiles of ``tile`` elements come first, then one ``end`` block
with the rest of the leaf (at least 128 elements); :func:`launch_groups` splits
the leaves into launches that fit CUDA's kernel-parameter limit. Plain Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lars.contract import LeafSpec

# Elements per full tile: 32 float32 values per thread and array (arithmetic, docs/pallas.md).
TILE = 4096
# Elements per vector access: 4 float32 values are one 16-byte load.
VEC = 4
# Threads of one Pallas Mosaic GPU thread (a warpgroup): the granule of a
# strided register array.
WARPGROUP = 128

# Kernel-parameter bytes per launch: CUDA's limit (32,764) with margin (docs/pallas.md).
PARAM_BYTES = 24 * 1024
_DESCRIPTOR_BYTES = 40  # a 1-D memref descriptor
_FIXED_PARAM_BYTES = 256  # the table (2-D), the scalars and the ratios


@dataclasses.dataclass(frozen=True)
class Branch:
    """The code of one kind of block.

    Attributes:
      leaf: Position of the leaf in the launch's leaf list.
      full: A full tile at the table's (dynamic) start; else the leaf's end.
      start: Static first element of an ``end`` branch.
      size: Elements the branch handles (``tile`` for a full tile).
    """

    leaf: int
    full: bool
    start: int
    size: int


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The tile table of one launch.

    Attributes:
      tile: Elements per full tile.
      branches: The branches, indexed by the table's first column.
      table: (blocks, 2) int32: branch id and first element of every block.
      leaf_blocks: Per leaf, its [first, last) block range (consecutive).
    """

    tile: int
    branches: tuple[Branch, ...]
    table: np.ndarray
    leaf_blocks: tuple[tuple[int, int], ...]

    @property
    def num_blocks(self) -> int:
        return int(self.table.shape[0])


def plan_tiles(sizes: Sequence[int], tile: int = TILE) -> TilePlan:
    """Lays the leaves of ``sizes`` (each >= 128 elements) out as blocks.

    A leaf's full tiles come first, then its ``end`` block: the rest of the
    leaf, at least 128 elements (when less would be left, the end block takes
    the last full tile as well).

    Raises:
      ValueError: if ``tile`` is not a positive multiple of ``VEC * 128``, or a
        leaf is smaller than 128 elements.
    """
    if tile <= 0 or tile % (VEC * WARPGROUP):
        raise ValueError(f"tile must be a positive multiple of {VEC * WARPGROUP}, got {tile}")
    branches: list[Branch] = []
    rows: list[tuple[int, int]] = []
    leaf_blocks = []
    for leaf, n in enumerate(sizes):
        if n < WARPGROUP:
            raise ValueError(f"leaf {leaf} has {n} < {WARPGROUP} elements (see small_leaves)")
        first = len(rows)
        n_full, rem = divmod(n, tile)
        if 0 < rem < WARPGROUP:  # too short for a vector: the end takes a full tile too
            n_full -= 1
        if n_full:
            branches.append(Branch(leaf, True, 0, tile))
            rows.extend((len(branches) - 1, t * tile) for t in range(n_full))
        if n > n_full * tile:
            start = n_full * tile
            branches.append(Branch(leaf, False, start, n - start))
            rows.append((len(branches) - 1, start))
        leaf_blocks.append((first, len(rows)))
    table = np.asarray(rows, np.int32).reshape(-1, 2)
    return TilePlan(tile, tuple(branches), table, tuple(leaf_blocks))


def small_leaves(leaves: Sequence[LeafSpec]) -> list[int]:
    """Indices of the leaves under 128 elements, which the kernels leave to XLA.

    A warpgroup-wide register array has at least 128 elements (one per thread),
    so such a leaf cannot be loaded as one. These leaves are tiny by definition
    (biases and normalisation vectors of narrow layers); the launchers compute
    them with the same ``elementwise`` functions in XLA, which fuses them.
    """
    return [i for i, leaf in enumerate(leaves) if leaf.size < WARPGROUP]


def launch_groups(
    num_leaves: int, buffers_per_leaf: int, param_bytes: int = PARAM_BYTES
) -> list[range]:
    """Consecutive groups of leaves, each small enough for one launch's parameters."""
    per_launch = (param_bytes - _FIXED_PARAM_BYTES) // (buffers_per_leaf * _DESCRIPTOR_BYTES)
    if per_launch < 1:
        raise ValueError(f"param_bytes={param_bytes} leaves no room for a single leaf")
    return [range(a, min(a + per_launch, num_leaves)) for a in range(0, num_leaves, per_launch)]
