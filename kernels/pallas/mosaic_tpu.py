"""Multi-tensor LARS kernels for TPU in Pallas Mosaic TPU.

Every leaf stays the separate array it is (in HBM, no concatenation), and all
leaves of all dtypes go through one kernel launch per pass. A TensorCore runs
one program at a time, so the launch is a single kernel invocation that walks a
static schedule of blocks, leaf after leaf, streaming them itself with double
buffering: while block t is computed in one VMEM slot, the DMA of block t+1
fills the other, *including across leaf boundaries* (the first block of the
next leaf is fetched while the last block of this one is computed), and the
results of block t drain to HBM while block t+1 is computed.

* :func:`sums_kernel` (the norm pass) accumulates each leaf's two sums in SMEM
  in block order: the result is bitwise repeatable.
* :func:`update_kernel` reads per-leaf trust ratios from SMEM and writes each
  leaf's update and new momentum.

These two passes read w and g twice. ``mosaic_tpu_fused`` does the whole step
in one pass for the layers that fit its VMEM ring, on the plans and DMA
helpers defined here; the backend leaves only larger layers to these kernels.

Each leaf is viewed as a 2-D array the vector unit can tile: ``(n / 128, 128)``
when 128 divides its size, else ``(1, n)``, and cut into full blocks (a
``fori_loop``) plus one remainder block (static), so no DMA crosses the leaf's
end and no mask is needed.

On a CPU the kernels run in Pallas' interpret mode: ``interpret=True`` turns
the kernel, its DMAs and semaphores into XLA operations (fast to run, a few
seconds to compile); ``pltpu.InterpretParams()`` (the TPU simulator, slower)
works as well. Both execute this kernel code.
"""

from __future__ import annotations

import contextlib
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

# Rows of 128 lanes per block of a (n / 128, 128) view. 512 rows of fp32 are
# 256 KiB; the update pass keeps 2 slots of 5 such blocks (2.5 MiB, plus the
# same again for a second dtype), well within the 16 MiB default scoped VMEM of
# the smallest current TPU (v5e). A multiple of 32 so that fp32, bf16 and fp16
# blocks are whole (8, 128)-element tiles. Chosen by that arithmetic; not
# measured (no TPU was available).
BLOCK_ROWS = 512
# Lanes per block of a (1, n) view (leaves whose size 128 does not divide):
# such blocks fill one sublane in 8, so they are kept 8x smaller in elements.
BLOCK_LANES = 8192
LANES = 128

# The chip the kernels are traced for when no TPU is attached (interpret mode,
# cross-lowering): Pallas asks it for the memory tiling.
DEFAULT_CHIP = "TPU v5 lite"

ROWS, LANES_KIND = "rows", "lanes"


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


def _window(branch: Branch, start):
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
class _Stream:
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

    def block(self, branch: Branch, leaves: Sequence[ew.LeafSpec], slot):
        """The VMEM block of ``branch`` in ``slot``."""
        dtype = np.dtype(getattr(leaves[branch.leaf], self.dtype_attr))
        buf = self.buffers[(dtype.name, branch.kind)]
        return buf.at[_buffer_window(branch, slot)]


def _buffer_keys(dtype_attr: str, leaves, plan: TilePlan) -> list[tuple[str, str]]:
    keys = []
    for branch in plan.branches:
        key = (np.dtype(getattr(leaves[branch.leaf], dtype_attr)).name, branch.kind)
        if key not in keys:
            keys.append(key)
    return keys


def _scratch_shapes(dtype_attrs: Sequence[str], leaves, plan: TilePlan, slots: int = 2) -> list:
    """Per role, a (slots, *block) VMEM buffer per (dtype, kind) in use; then
    per role a (slots,) array of DMA semaphores."""
    shapes = []
    for attr in dtype_attrs:
        for name, kind in _buffer_keys(attr, leaves, plan):
            shapes.append(pltpu.VMEM((slots, *plan.block_shape(kind)), np.dtype(name)))
    shapes.extend(pltpu.SemaphoreType.DMA((slots,)) for _ in dtype_attrs)
    return shapes


def _streams(dtype_attrs, hbm_groups, scratch, leaves, plan) -> list[_Stream]:
    """Splits the kernel's scratch refs into one ``_Stream`` per role."""
    scratch = list(scratch)
    keys = [_buffer_keys(attr, leaves, plan) for attr in dtype_attrs]
    sems = scratch[sum(map(len, keys)) :]
    streams = []
    for attr, hbm, role_keys, sem in zip(dtype_attrs, hbm_groups, keys, sems, strict=True):
        buffers = {key: scratch.pop(0) for key in role_keys}
        streams.append(_Stream(attr, hbm, buffers, sem))
    return streams


def _copies(branch: Branch, start, slot, streams, leaves, to_vmem: bool):
    """The DMA descriptors moving one block of every stream to or from VMEM."""
    out = []
    for stream in streams:
        hbm = stream.hbm[branch.leaf].at[_window(branch, start)]
        vmem = stream.block(branch, leaves, slot)
        src, dst = (hbm, vmem) if to_vmem else (vmem, hbm)
        out.append(pltpu.make_async_copy(src, dst, stream.sems.at[slot]))
    return out


def _tiles(plan: TilePlan) -> list[tuple[Branch, int]]:
    """The launch's schedule: per leaf, its full-block branch (with the number of
    blocks) and/or its remainder branch (count 1), in order."""
    counts: dict[int, int] = {}
    for b, _ in plan.table:
        counts[int(b)] = counts.get(int(b), 0) + 1
    return [(branch, counts[i]) for i, branch in enumerate(plan.branches)]


def _pipeline(plan: TilePlan, leaves, ins, outs, compute, carry=None):
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
    schedule = _tiles(plan)
    firsts = []  # global index of the first step of each schedule entry
    total = 0
    for _, count in schedule:
        firsts.append(total)
        total += count

    def start_in(branch, start, slot):
        for c in _copies(branch, start, slot, ins, leaves, True):
            c.start()

    def wait_in(branch, start, slot):
        for c in _copies(branch, start, slot, ins, leaves, True):
            c.wait()

    def start_out(branch, start, slot):
        for c in _copies(branch, start, slot, outs, leaves, False):
            c.start()

    def wait_out(branch, start, slot):
        for c in _copies(branch, start, slot, outs, leaves, False):
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


def _scalar_getter(ref):
    return lambda i: ref[i]


_SUMS_ROLES = ("param_dtype", "grad_dtype")
_UPDATE_ROLES = ("param_dtype", "grad_dtype", "momentum_dtype", "param_dtype", "momentum_dtype")


def sums_kernel(
    scalars_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[ew.LeafSpec],
    flags: ew.StepFlags,
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
    streams = _streams(roles, hbm_groups, refs[len(roles) * n + 1 :], leaves, plan)
    scalars = _scalar_getter(scalars_ref)

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

    _pipeline(plan, leaves, streams, [], compute, 0)


def update_kernel(
    scalars_ref,
    ratios_ref,
    *refs,
    plan: TilePlan,
    leaves: Sequence[ew.LeafSpec],
    flags: ew.StepFlags,
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
    streams = _streams(_UPDATE_ROLES, hbm_groups, refs[5 * n :], leaves, plan)
    scalars = _scalar_getter(scalars_ref)

    def compute(branch, in_blocks, out_blocks, carry):
        leaf = leaves[branch.leaf]
        w, g, v = (b[...] for b in in_blocks)
        first, v_new = ew.tile_update(w, g, v, ratios_ref[branch.leaf], scalars, flags, leaf)
        out_blocks[0][...] = first
        out_blocks[1][...] = v_new
        return carry

    _pipeline(plan, leaves, streams[:3], streams[3:], compute, 0)


# --------------------------------------------------------------------------
# Launchers.


def tpu_context():
    """The tracing context: a TPU target named for Pallas when none is attached."""
    if jax.default_backend() == "tpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=DEFAULT_CHIP, platform="tpu", num_cores=1)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


_ANY = pl.BlockSpec(memory_space=pl.ANY)
_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)


def leaf_sums(
    params: Sequence[jax.Array] | None,
    grads: Sequence[jax.Array],
    scalars: jax.Array,
    *,
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
    block_rows: int = BLOCK_ROWS,
    block_lanes: int = BLOCK_LANES,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Runs the norm pass over non-empty leaves; returns (len(leaves), 2) float32 sums.

    Args:
      params: The leaves' params, or None for the global-norm pass (sum g**2).
      grads: The leaves' gradients.
      scalars: The float32 scalars vector (see ``elementwise``).
      flags: Static options.
      leaves: Static per-leaf facts (sizes must be positive).
      block_rows, block_lanes: Block sizes (see the module constants).
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
        in_specs=[_SMEM] + [_ANY] * len(flat),
        out_specs=_SMEM,
        scratch_shapes=_scratch_shapes(roles, leaves, plan),
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
    flags: ew.StepFlags,
    leaves: Sequence[ew.LeafSpec],
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
        in_specs=[_SMEM, _SMEM] + [_ANY] * len(flat),
        out_specs=tuple([_ANY] * len(out_shape)),
        scratch_shapes=_scratch_shapes(_UPDATE_ROLES, leaves, plan),
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
