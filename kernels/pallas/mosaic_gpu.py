"""Multi-tensor LARS kernels for NVIDIA Hopper in Pallas Mosaic GPU: a norm and an update pass.

Every leaf stays the separate array it is; a *tile table* maps each block of a
launch to a (branch, start) pair, a branch being the code for one leaf and one
tile shape (``full`` tiles at a dynamic start, one ``end`` branch for the rest
of the leaf), picked with ``lax.switch``. So one launch serves every leaf,
whatever its size, dtype or masks. No access leaves a leaf (the end branch
overlaps its last 128-element window with the piece before, masked out of the
sums); leaves under 128 elements are left to XLA (``gpu_plan.small_leaves``).

* :func:`sums_kernel` writes per-block partial sums, reduced per leaf in a
  fixed order (no atomics: bitwise repeatable).
* :func:`update_kernel` writes each leaf's update (or new param) and new
  momentum over the inputs' buffers.

Off a GPU the kernels run in Mosaic GPU's interpreter (``interpret=True`` or a
``plgpu.InterpretGPUParams``), which executes the same kernel code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lars.contract import LeafSpec

from . import elementwise as ew
from .gpu_plan import (
    PARAM_BYTES,
    TILE,
    VEC,
    WARPGROUP,
    Branch,
    TilePlan,
    launch_groups,
    plan_tiles,
    small_leaves,
)

# Explicit register layouts: Pallas' default inference compiles too slowly (docs/pallas.md).
SEMANTICS = plgpu.LoweringSemantics.Lane

_AXIS = "block"


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
    leaves: Sequence[LeafSpec],
    flags: ew.Flags,
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
    leaves: Sequence[LeafSpec],
    flags: ew.Flags,
    ratio_index: Sequence[int] | None = None,
) -> None:
    """Update pass: each block updates one tile of one leaf.

    ``refs`` are the params, gradients and momenta of the leaves, then their
    updates (or new params, with ``flags.write_params``) and new momenta
    (outputs). The launcher aliases the new momenta (and params) to the
    inputs: a block reads all of its elements before it writes them, and no
    block reads another's. Leaf i's trust ratio is ``ratios_ref[ratio_index[i]]``
    (``ratios_ref[i]`` without an index): every launch reads the one ratio
    vector, no gather makes a copy for each.
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
            ratio = ratios_ref[i if ratio_index is None else ratio_index[i]]
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


def _split(leaves):
    small = set(small_leaves(leaves))
    big = [i for i in range(len(leaves)) if i not in small]
    return big, sorted(small), (lambda xs, idx: [xs[i] for i in idx])


def leaf_sums(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
    tile: int = TILE,
    param_bytes: int = PARAM_BYTES,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Runs the norm pass over non-empty leaves; returns (len(leaves), 2) float32 sums.

    Args:
      params: The leaves' params, or None for the global-norm pass (sum g**2).
      grads: The leaves' gradients.
      scalars: The float32 ``contract.Scalar`` vector.
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
        part = small_sums(
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


def small_sums(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
) -> jax.Array:
    """The norm pass of leaves under 128 elements, in XLA: (len(leaves), 2) float32 sums.

    The leaves are zero-padded to 128 elements and stacked, one (leaves, 128)
    array per weight-decay setting, and summed along rows: one reduction (one
    launch) for each setting instead of one per leaf (ResNet-50 has 14 such
    leaves). The padding is masked out of both sums.
    """
    rows: list = [None] * len(leaves)
    for decay in (False, True):
        idx = [k for k, leaf in enumerate(leaves) if leaf.decay == decay]
        if not idx:
            continue
        valid = np.zeros((len(idx), WARPGROUP), bool)
        for r, k in enumerate(idx):
            valid[r, : leaves[k].size] = True

        def stacked(xs, idx=idx):
            return jnp.stack(
                [
                    jnp.pad(xs[k].reshape(-1).astype(jnp.float32), (0, WARPGROUP - leaves[k].size))
                    for k in idx
                ]
            )

        g = stacked(grads)
        if params is None:
            s_w = jnp.sum(jnp.where(valid, g * g, 0.0), axis=1)
            s_u = jnp.zeros_like(s_w)
        else:
            w = stacked(params)
            u = ew.effective_grad(g, w, scalars, flags, decay)
            s_w = jnp.sum(jnp.where(valid, w * w, 0.0), axis=1)
            s_u = jnp.sum(jnp.where(valid, u * u, 0.0), axis=1)
        part = jnp.stack([s_w, s_u], axis=1)
        for r, k in enumerate(idx):
            rows[k] = part[r]
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
    flags: ew.Flags,
    leaves: Sequence[LeafSpec],
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
            ratios,
            tuple(idx),
            scalars,
            flags,
            tuple(pick(leaves, idx)),
            tile,
            interpret,
        )
        for k, i in enumerate(idx):
            updates[i], new_momentum[i] = upd[k], mom[k]
    return updates, new_momentum


def _kernel_update(
    params, grads, momentum, ratios, ratio_index, scalars, flags, leaves, tile, interpret
):
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
        functools.partial(
            update_kernel, plan=plan, leaves=leaves, flags=flags, ratio_index=ratio_index
        ),
        out_type=tuple(out_type),
        input_output_aliases=aliases,
        grid=(plan.num_blocks,),
        interpret=interpret,
    )
    outs = kernel(jnp.asarray(plan.table), scalars, ratios, *flat)
    return _shaped(outs[:n], params), _shaped(outs[n:], params)


def _aliased_kernel(body, *, out_type, input_output_aliases, grid, interpret):
    """``plgpu.kernel`` (a Lane-semantics grid over ``_AXIS``) with input/output aliases.

    Built on Pallas' private ``_mpmd_map``, as ``plgpu.kernel`` is (which has
    no aliases in jax 0.11.2; why not ``jax.new_ref`` operands: docs/pallas.md).
    Under ``jax.vmap`` it launches once per batch entry.
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
