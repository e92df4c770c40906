"""Multi-tensor LARS kernels for NVIDIA Hopper in Pallas Mosaic GPU.

Design (after apex ``multi_tensor_apply``): every leaf stays the separate
array it is (no concatenation); a *tile table* maps each block of one launch to
a (branch, start) pair. A branch is the code for one leaf and one tile shape:
``full`` tiles of ``tile`` elements at a dynamic start, and one ``end`` branch
for the rest of the leaf (at least 128 elements) at a static start. The block
picks its branch with ``lax.switch`` (an ``scf.index_switch``), so one launch
serves every leaf, whatever its size, dtype or masks.

* :func:`sums_kernel` (the norm pass) writes per-block partial sums, one row
  per block; the launcher reduces each leaf's rows in a fixed order (no
  atomics: the result is bitwise repeatable).
* :func:`update_kernel` reads per-leaf trust ratios and writes each leaf's
  update and new momentum.

Tiles are loaded straight from global memory into registers (a warpgroup-wide
strided layout: coalesced vector loads). The ``end`` branch loads the largest
multiple of 128 elements the same way, then the leaf's last 128 elements (a
window overlapping the previous piece, masked out of the sums), so no access
ever leaves the leaf: no padding, any size of at least 128 works. Leaves under
128 elements (narrow biases and norms) are left to XLA by the launchers, with
the same elementwise code (see :func:`small_leaves`).

On a CPU the kernels run in Mosaic GPU's interpret mode
(``plgpu.InterpretGPUParams``), which executes the same kernel code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import elementwise as ew

# Elements per block of a full tile. 4096 fp32 elements are 32 values per thread
# of the 128-thread warpgroup per array: enough bytes in flight per block to
# stream at full bandwidth while staying far from register spills. Chosen by
# that arithmetic, not yet by measurement (gpu_check.py sweeps it).
TILE = 4096
# Elements per vector access: 4 fp32 values are one 16-byte load. Not measured.
VEC = 4
# Threads of one Pallas Mosaic GPU thread (a warpgroup): the granule of a
# strided register array.
WARPGROUP = 128

# Kernel parameter bytes one launch may use. Mosaic GPU passes every buffer as
# an MLIR memref descriptor (2 pointers, offset, size, stride: 40 bytes for 1-D)
# and CUDA caps a kernel's parameters at 32,764 bytes (4 KiB before CUDA 12.1),
# so the leaves are split into launches of at most this many bytes: ResNet-50's
# 161 leaves take 2 launches per pass. Chosen from that limit, with margin.
PARAM_BYTES = 24 * 1024
_DESCRIPTOR_BYTES = 40  # a 1-D memref descriptor
_FIXED_PARAM_BYTES = 256  # the table (2-D), the scalars and the ratios

# Lane semantics: the kernel states its register layouts (warpgroup-strided)
# and Pallas emits them directly. The Warpgroup semantics (Pallas' default)
# infers layouts over the whole module instead, which took minutes for the 161
# leaves of ResNet-50 (its cost grows faster than the number of branches).
SEMANTICS = plgpu.LoweringSemantics.Lane

_AXIS = "block"


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


def _layout(size: int):
    """The warpgroup-strided layout of ``size`` elements with the widest vectors."""
    vec = VEC
    while size % (vec * WARPGROUP):
        vec //= 2
    return plgpu.Layout.WG_STRIDED((size,), vec_size=vec)


def _strided(ref, start, size: int):
    """Loads ``ref[start:start+size]`` into a warpgroup-strided register array."""
    return plgpu.load(ref.at[pl.ds(start, size)], layout=_layout(size))


def _pieces(branch: Branch, start) -> list[tuple[object, int, int]]:
    """(start, size, skip) vector pieces covering a branch's elements.

    A full tile is one piece. An end block of size S is a piece of the largest
    multiple of 128 elements, then, if S is not one, the last 128 elements of
    the leaf: that window overlaps the first piece by ``skip`` elements, which
    the window recomputes (same inputs, same operations, same values) and which
    its sums leave out. No access leaves the leaf, and no element is handled by
    two blocks.
    """
    if branch.full:
        return [(pl.multiple_of(start, branch.size), branch.size, 0)]
    bulk = branch.size // WARPGROUP * WARPGROUP
    pieces = [(branch.start, bulk, 0)]
    if branch.size > bulk:
        end = branch.start + branch.size
        pieces.append((end - WARPGROUP, WARPGROUP, WARPGROUP - (branch.size - bulk)))
    return pieces


def _skip_mask(x, skip: int):
    """Zeroes the first ``skip`` elements of a window (they belong to another piece)."""
    if not skip:
        return x
    index = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=_layout(x.shape[0]))
    return jnp.where(index >= skip, x, jnp.zeros_like(x))


def _scalar_getter(ref):
    return lambda i: ref[i]


def sums_kernel(
    table_ref,
    scalars_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[ew.LeafSpec],
    flags: ew.StepFlags,
    with_params: bool,
) -> None:
    """Norm pass: block b writes its tile's two float32 sums to ``out[b]``.

    ``refs`` are the leaves' params (when ``with_params``), their gradients,
    then the (blocks, 2) output. Without params this is the global-norm pass
    (sum of g**2).
    """
    n = len(leaves)
    w_refs = refs[:n] if with_params else (None,) * n
    g_refs = refs[n : 2 * n] if with_params else refs[:n]
    out_ref = refs[-1]
    scalars = _scalar_getter(scalars_ref)
    block = lax.axis_index(_AXIS)
    start = table_ref[block, 1]

    def branch_fn(branch: Branch):
        leaf = leaves[branch.leaf]
        w_ref, g_ref = w_refs[branch.leaf], g_refs[branch.leaf]

        def run() -> None:
            s_w = s_u = None
            for piece_start, size, skip in _pieces(branch, start):
                w = None if w_ref is None else _strided(w_ref, piece_start, size)
                g = _strided(g_ref, piece_start, size)
                if skip:  # a zero contributes nothing to either sum
                    g = _skip_mask(g, skip)
                    w = None if w is None else _skip_mask(w, skip)
                a, b = ew.tile_sums(w, g, scalars, flags, leaf)
                s_w = a if s_w is None else s_w + a
                s_u = b if s_u is None else s_u + b
            out_ref[block, ew.SUM_W2] = s_w
            out_ref[block, ew.SUM_U2] = s_u

        return run

    lax.switch(table_ref[block, 0], [branch_fn(b) for b in plan.branches])


def update_kernel(
    table_ref,
    scalars_ref,
    ratios_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[ew.LeafSpec],
    flags: ew.StepFlags,
) -> None:
    """Update pass: each block updates one tile of one leaf.

    ``refs`` are the params, gradients and momenta of the leaves, then their
    updates (or new params, with ``flags.write_params``) and new momenta
    (outputs). The launcher aliases the new momenta (and params) to the
    inputs: a block reads all of its elements before it writes them, and no
    block reads another's.
    """
    n = len(leaves)
    w_refs, g_refs, v_refs, first_refs, vout_refs = (refs[i * n : (i + 1) * n] for i in range(5))
    scalars = _scalar_getter(scalars_ref)
    block = lax.axis_index(_AXIS)
    start = table_ref[block, 1]

    def branch_fn(branch: Branch):
        i = branch.leaf
        leaf = leaves[i]

        def run() -> None:
            ratio = ratios_ref[i]
            pieces = _pieces(branch, start)
            # All loads before any store: the end window overlaps the bulk
            # piece, and the outputs may be the inputs' buffers.
            loaded = [
                [_strided(r[i], piece_start, size) for r in (w_refs, g_refs, v_refs)]
                for piece_start, size, _ in pieces
            ]
            for (piece_start, size, _), (w, g, v) in zip(pieces, loaded, strict=True):
                first, v_new = ew.tile_update(w, g, v, ratio, scalars, flags, leaf)
                first_refs[i][pl.ds(piece_start, size)] = first
                vout_refs[i][pl.ds(piece_start, size)] = v_new

        return run

    lax.switch(table_ref[block, 0], [branch_fn(b) for b in plan.branches])


# --------------------------------------------------------------------------
# Launchers.


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


def small_leaves(leaves: Sequence[ew.LeafSpec]) -> list[int]:
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


def _split(leaves):
    small = set(small_leaves(leaves))
    big = [i for i in range(len(leaves)) if i not in small]
    return big, sorted(small), (lambda xs, idx: [xs[i] for i in idx])


def leaf_sums(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
    tile: int = TILE,
    param_bytes: int = PARAM_BYTES,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Runs the norm pass over non-empty leaves; returns (len(leaves), 2) float32 sums.

    Args:
      params: The leaves' params, or None for the global-norm pass (sum g**2).
      grads: The leaves' gradients.
      scalars: The float32 scalars vector (see ``elementwise``).
      flags: Static options.
      leaves: Static per-leaf facts (sizes must be positive).
      tile: Elements per full tile.
      param_bytes: Kernel parameter bytes per launch (see ``PARAM_BYTES``).
      interpret: Run in Mosaic GPU interpret mode (on a CPU): True, or a
        ``plgpu.InterpretGPUParams``.
    """
    big, small, pick = _split(leaves)
    rows = [None] * len(leaves)
    if small:
        part = ew.leaf_sums_reference(
            None if params is None else pick(params, small),
            pick(grads, small),
            scalars,
            flags,
            pick(leaves, small),
        )
        for k, i in enumerate(small):
            rows[i] = part[k]
    for group in launch_groups(len(big), 1 if params is None else 2, param_bytes):
        idx = [big[k] for k in group]
        part = _kernel_sums(
            None if params is None else pick(params, idx),
            pick(grads, idx),
            scalars,
            flags,
            tuple(pick(leaves, idx)),
            tile,
            interpret,
        )
        for k, i in enumerate(idx):
            rows[i] = part[k]
    return jnp.stack(rows)


def _kernel_sums(params, grads, scalars, flags, leaves, tile, interpret) -> jax.Array:
    plan = plan_tiles([leaf.size for leaf in leaves], tile)
    flat = [x.reshape(-1) for x in ([] if params is None else params)]
    flat += [x.reshape(-1) for x in grads]
    kernel = plgpu.kernel(
        functools.partial(
            sums_kernel, plan=plan, leaves=leaves, flags=flags, with_params=params is not None
        ),
        out_type=jax.ShapeDtypeStruct((plan.num_blocks, 2), jnp.float32),
        grid=(plan.num_blocks,),
        grid_names=(_AXIS,),
        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS),
        interpret=_interpret_params(interpret),
    )
    partials = kernel(jnp.asarray(plan.table), scalars, *flat)
    return reduce_partials(partials, plan)


def reduce_partials(partials: jax.Array, plan: TilePlan) -> jax.Array:
    """Sums each leaf's block rows in block order (a gather and one reduction).

    Every leaf's rows are gathered into a zero-padded (leaves, max_blocks, 2)
    array, so the reduction order is fixed by the plan, not by scheduling.
    """
    counts = [b - a for a, b in plan.leaf_blocks]
    width = max(counts)
    zero_row = plan.num_blocks  # index of an appended row of zeros
    index = np.full((len(counts), width), zero_row, np.int32)
    for leaf, (a, b) in enumerate(plan.leaf_blocks):
        index[leaf, : b - a] = np.arange(a, b)
    padded = jnp.concatenate([partials, jnp.zeros((1, 2), partials.dtype)])
    return jnp.sum(padded[index], axis=1)


def leaf_sums_reference(*args, **kwargs) -> jax.Array:
    """The plain-JAX reference of :func:`leaf_sums` (same arguments, no tiling)."""
    for k in ("tile", "param_bytes", "interpret"):
        kwargs.pop(k, None)
    return ew.leaf_sums_reference(*args, **kwargs)


def update(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    ratios: jax.Array,
    scalars: jax.Array,
    *,
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
    tile: int = TILE,
    param_bytes: int = PARAM_BYTES,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Runs the update pass over non-empty leaves.

    Args:
      params, grads, momentum: The leaves' arrays.
      ratios: (len(leaves),) float32 trust ratios.
      scalars: The float32 scalars vector.
      flags, leaves, tile, param_bytes, interpret: As in :func:`leaf_sums`.

    Returns:
      (updates, new momenta), in the leaves' shapes; with
      ``flags.write_params`` the new params in place of the updates. The
      kernels write the new momenta (and params) over the given arrays'
      buffers when they are donated.
    """
    big, small, pick = _split(leaves)
    updates: list = [None] * len(leaves)
    new_momentum: list = [None] * len(leaves)
    if small:
        upd, mom = ew.update_reference(
            pick(params, small),
            pick(grads, small),
            pick(momentum, small),
            ratios[np.asarray(small)],
            scalars,
            flags,
            pick(leaves, small),
        )
        for k, i in enumerate(small):
            updates[i], new_momentum[i] = upd[k], mom[k]
    for group in launch_groups(len(big), 5, param_bytes):
        idx = [big[k] for k in group]
        upd, mom = _kernel_update(
            pick(params, idx),
            pick(grads, idx),
            pick(momentum, idx),
            ratios[np.asarray(idx)],
            scalars,
            flags,
            tuple(pick(leaves, idx)),
            tile,
            interpret,
        )
        for k, i in enumerate(idx):
            updates[i], new_momentum[i] = upd[k], mom[k]
    return updates, new_momentum


def _kernel_update(params, grads, momentum, ratios, scalars, flags, leaves, tile, interpret):
    plan = plan_tiles([leaf.size for leaf in leaves], tile)
    flat = [x.reshape(-1) for x in (*params, *grads, *momentum)]
    out_type = [jax.ShapeDtypeStruct((leaf.size,), leaf.param_dtype) for leaf in leaves]
    out_type += [jax.ShapeDtypeStruct((leaf.size,), leaf.momentum_dtype) for leaf in leaves]
    # Operands: table, scalars, ratios, then n params, n gradients, n momenta;
    # outputs: n updates (or params), n momenta. Aliased: momentum -> new
    # momentum, and with write_params param -> new param.
    n = len(leaves)
    aliases = {3 + 2 * n + i: n + i for i in range(n)}
    if flags.write_params:
        aliases.update({3 + i: i for i in range(n)})
    kernel = _aliased_kernel(
        functools.partial(update_kernel, plan=plan, leaves=leaves, flags=flags),
        out_type=tuple(out_type),
        input_output_aliases=aliases,
        grid=(plan.num_blocks,),
        interpret=interpret,
    )
    outs = kernel(jnp.asarray(plan.table), scalars, ratios, *flat)
    return _shaped(outs[:n], params), _shaped(outs[n:], params)


def _aliased_kernel(body, *, out_type, input_output_aliases, grid, interpret):
    """``plgpu.kernel`` (a Lane-semantics grid over ``_AXIS``) with input/output aliases.

    ``plgpu.kernel`` in jax 0.11.2 has no ``input_output_aliases``; the route it
    offers, writing into ``jax.new_ref`` operands, cannot be batched inside a
    ``custom_jvp`` under ``jit`` ("No state discharge rule implemented for
    primitive: custom_jvp_call"), so ``jax.vmap`` of a step would fail. This
    calls the function ``plgpu.kernel`` is built on, Pallas' ``_mpmd_map``
    (private: checked against jax 0.11.2 by the tests, which lower it for
    CUDA and run it in the GPU simulator, also under ``jax.vmap``). Under
    ``jax.vmap`` it launches once per batch entry.
    """
    from jax._src import config as jax_config
    from jax._src.pallas import mpmd

    call = mpmd._mpmd_map(
        [(plgpu.Mesh(grid=grid, grid_names=(_AXIS,)), body)],
        out_type,
        input_output_aliases=input_output_aliases,
        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS),
        interpret=_interpret_params(interpret),
        name="update_kernel",
    )

    @custom_batching.custom_vmap
    def run(*args):
        with jax_config._check_vma(False):  # as plgpu.kernel
            return call(*args)

    @run.def_vmap
    def _one_launch_per_batch_entry(axis_size, in_batched, *args):
        # Pallas cannot batch the kernel body (its loads have no batching
        # rule): under jax.vmap each batch entry is a launch of its own.
        def entry(b):
            return run(
                *(x[b] if batched else x for x, batched in zip(args, in_batched, strict=True))
            )

        outs = [entry(b) for b in range(axis_size)]
        stacked = tuple(jnp.stack(xs) for xs in zip(*outs, strict=True))
        return stacked, (True,) * len(stacked)

    return run


def _shaped(flat: Sequence[jax.Array], like: Sequence[jax.Array]) -> list[jax.Array]:
    """``flat`` reshaped to the shapes of ``like``."""
    return [x.reshape(y.shape) for x, y in zip(flat, like, strict=True)]


def update_reference(*args, **kwargs) -> tuple[list[jax.Array], list[jax.Array]]:
    """The plain-JAX reference of :func:`update` (same arguments, no tiling)."""
    for k in ("tile", "param_bytes", "interpret"):
        kwargs.pop(k, None)
    return ew.update_reference(*args, **kwargs)
