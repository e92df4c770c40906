"""The launch plan of the Triton LARS step: which leaves go in which launch, and the tile table.

Everything here is plain Python and NumPy, computed on the host at trace time
from static facts (shapes, dtypes, masks, options); it imports neither triton
nor jax-triton, so the GPU launcher (``backend.py``) and the interpreter
launcher (``interpret.py``) share it unchanged.

Addressing leaves. jax-triton hands every array to a kernel as its own pointer
argument, and JAX gives no device addresses to put in a pointer table, so a
launch takes a fixed number of leaves ("slots"), each as its own pointer
arguments (the kernel's signature is generated for that number, see
``kernels.py``). Each program of a launch reads one row of an int32 *tile
table*: the slot it serves, which ``CHUNK``-element chunk of that leaf, how many
elements the chunk has, and whether weight decay applies; it then selects its
slot's pointers with a chain of scalar selects and streams the chunk. Leaves
are grouped by (param dtype, grad dtype) so that all slots of a launch have the
same pointer types, and each group is cut into launches of at most
``SLOTS_PER_LAUNCH`` leaves.

The fused pass (the default, ``Tuning.fused``). One launch per dtype group
(and ``SLOTS_PER_LAUNCH`` leaves) does the norms, the trust ratios and the
update, so that a layer's w and g are read from HBM once: the update of a
chunk follows the norm of the same chunk closely enough that its second read
hits L2. Each row of the launch's tile table is an *item*: the partial sums of
one chunk (``KIND_SUMS``), the update of one chunk (``KIND_UPDATE``), or both
for a leaf of a single chunk (``KIND_WHOLE``, ratio computed in between). A
program claims the next item with an atomic counter, not by its program id, so
items start in table order: a layer's update items come after all its sums
items, ``Tuning.lookahead`` items later, and the program that claims one waits
(spins) until the last of those sums has finished. That wait cannot deadlock:
every item it waits for was claimed earlier by a program that is already
running. The last sums item of a layer to finish (an arrival counter per leaf)
adds the layer's per-chunk partials in chunk order and publishes the trust
ratio; the result does not depend on which program ran which item. Between
the sums and the update of a chunk the launch reads at most the rest of its
layer and ``lookahead`` chunks: for ResNet-50's largest layer (2.4M params)
19 MB + 16 MB, inside an H100's 50 MB L2.

The two-pass form (``Tuning(fused=False)``): a norm pass over the leaves with a
trust ratio, the ratios in XLA, and an update pass over all non-empty leaves;
the update re-reads w and g from HBM (28 instead of 20 bytes per fp32 param).
It needs no atomics and is kept as the fallback.

Launches per dtype group and pass: ``ceil(leaves / SLOTS_PER_LAUNCH)``, plus a
norm pass over all gradients with ``grad_clip_norm`` (the global norm must be
known before any update). ResNet-50 (161 float32 leaves, one dtype group)
therefore takes one fused launch per step (two with ``grad_clip_norm``), or 2
(3) in the two-pass form, plus a few small XLA operations. Concatenating the
leaves instead would need no slots but copies w, g and v in and w, v out every
step (about 20 extra bytes per fp32 parameter on top of the 20 the step
needs): not acceptable unmeasured.

The tuning constants below were chosen by the arithmetic given with each, not
by measurement: this backend has not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Leaves per launch. Every leaf takes up to 5 pointer arguments in the update
# pass (w, g, v in; update or new w, new v out), 8 bytes each: 192 slots are
# 7.7 kB of kernel parameters. That needs the 32 kB parameter space of CUDA 12.1+
# on Volta and newer (the 4 kB of older CUDA fits 64 slots: Tuning(slots=64));
# ptxas accepts it for sm_90 (tests/test_triton.py). 192 covers ResNet-50's 161
# leaves, so a dtype group takes one launch per pass (two per step, three with
# grad_clip_norm), inside the kernels issue's bound of four. Each program pays
# one select per slot and pointer (at most 5 * 191) before it streams its
# 8192-element chunk. Chosen from these limits, not measured on a GPU.
SLOTS_PER_LAUNCH = 192
# Elements one program streams. 8192 elements over 128 threads are 64 per
# thread, so the per-program setup (table reads, pointer selects) is spread
# thin; ResNet-50's 25.6M parameters make about 3,200 programs, about 1.5 waves
# of resident blocks on an H100 (132 SMs x 16 blocks of 4 warps). Not measured.
CHUNK = 8192
# Elements per vector step of a program: 1024 over 128 threads are 8 per
# thread, two 16-byte loads of fp32 (one of bf16/fp16) per array. Not measured.
BLOCK = 1024
# Warps per program (128 threads). The Triton default; not measured.
NUM_WARPS = 4
# Fused pass: items between a layer's last sums item and its first update item.
# A program that claims an update item early waits for the sums in flight; a
# later one finds the ratio ready but the layer's chunks further back in L2.
# 256 chunks of 8192 fp32 (w and g) are 16 MB, which with ResNet-50's largest
# layer (19 MB of w and g) stays inside an H100's 50 MB L2; and 256 items are
# several hundred microseconds of streaming, far longer than one item (the
# longest a waiting program waits). From these sizes, not measured.
LOOKAHEAD = 256
# Fused pass: partial-sum rows a program adds per vector step when it
# finalises a layer's trust ratio (ResNet-50's largest layer has 289 chunks).
REDUCE_BLOCK = 256

# Columns of the int32 tile table: one row per program.
COL_SLOT = 0  # the slot (leaf position in the launch) the program serves
COL_CHUNK = 1  # which chunk of that leaf: its first element is COL_CHUNK * CHUNK
COL_LENGTH = 2  # elements in the chunk (CHUNK, or fewer for a leaf's last chunk)
COL_DECAY = 3  # 1 if weight decay applies to the leaf, else 0
# Fused pass only (zero in the tables of the two-pass form):
COL_KIND = 4  # KIND_SUMS, KIND_UPDATE or KIND_WHOLE
COL_TRUST = 5  # 1 if the trust ratio applies to the leaf (else the ratio is 1)
COL_FIRST_ROW = 6  # the leaf's first row of partial sums (KIND_SUMS)
COL_CHUNKS = 7  # chunks in the leaf
TABLE_COLUMNS = 8

# Items of the fused pass (COL_KIND).
KIND_SUMS = 0  # partial sums of one chunk of a multi-chunk leaf
KIND_UPDATE = 1  # update of one chunk, once the leaf's ratio is published
KIND_WHOLE = 2  # a single-chunk leaf: sums, ratio and update in one program

# Positions in the float32 ``scalars`` vector every launch reads: the values
# that may change between steps reach the kernels as data, never as constants,
# so a new learning rate does not recompile.
LR = 0
MOMENTUM = 1
WEIGHT_DECAY = 2
CLIP_DIVISOR = 3  # ||g|| when the global-norm clip triggers, else 1
CLIP_FACTOR = 4  # grad_clip_norm when the clip triggers, else 1
CLIP_VALUE = 5
TRUST_COEFFICIENT = 6  # the fused pass computes the ratios: the formula's scalars
EPS = 7
TRUST_CLIP = 8
FINITE = 9  # 1 for a step to take, 0 for one to skip (Flags.skip_nonfinite)
NUM_SCALARS = 16  # padded to 64 bytes

# Columns of the per-chunk partial sums a norm pass writes.
SUM_W2 = 0  # sum of w**2 (of g**2 in the global-norm pass)
SUM_U2 = 1  # sum of u**2, u the clipped and decayed gradient

# The passes of a step.
GLOBAL_NORM = "global_norm"  # sum of g**2 over every leaf (grad_clip_norm only)
SUMS = "sums"  # per leaf, sum of w**2 and of u**2 (leaves with a trust ratio)
UPDATE = "update"  # per element: new momentum, and the update or the new param
FUSED = "fused"  # SUMS, the trust ratios and UPDATE in one launch (see above)

# Param and gradient dtypes the kernels handle (any pair of them); compute and
# momentum are float32.
DTYPES = ("float32", "bfloat16", "float16")

# Element offsets are int32 chunk numbers times CHUNK, computed in int64 in the
# kernels; the table itself is int32.
_MAX_CHUNKS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The launch geometry (see the module constants for the defaults' reasons).

    Attributes:
      slots: Leaves per launch.
      chunk: Elements per program; a multiple of ``block``.
      block: Elements per vector step; a power of two.
      num_warps: Warps per program (GPU launches only).
      fused: One fused launch per dtype group (norms, ratios and update);
        False: the two-pass form (a norm pass, then an update pass).
      lookahead: Fused pass: items between a layer's sums and its update.
    """

    slots: int = SLOTS_PER_LAUNCH
    chunk: int = CHUNK
    block: int = BLOCK
    num_warps: int = NUM_WARPS
    fused: bool = True
    lookahead: int = LOOKAHEAD

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two, got {self.block}")
        if self.chunk < self.block or self.chunk % self.block:
            raise ValueError(f"chunk must be a multiple of block={self.block}, got {self.chunk}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What the plan knows about one leaf (static).

    Attributes:
      size: Number of elements.
      param_dtype: Name of the param dtype ("float32", "bfloat16", "float16").
      grad_dtype: Name of the gradient dtype.
      decay: Weight decay applies to this leaf (and is on in the config).
      trust: The trust ratio applies (else r = 1 and no norms are needed).
    """

    size: int
    param_dtype: str
    grad_dtype: str
    decay: bool
    trust: bool


@dataclasses.dataclass(frozen=True)
class Flags:
    """The static switches of a step (part of each kernel's identity).

    Attributes:
      clip_norm: Global-norm clipping is on.
      clip_value: Element-wise clipping is on.
      has_decay: Weight decay is on for at least one leaf.
      nesterov: Nesterov momentum.
      lr_inside_momentum: The optax form v = mu*v + lr*r*g; w -= v.
      trust_clip: r = min(r, trust_clip) is on.
      write_params: The update pass writes the new params (over the old ones)
        instead of the updates.
      skip_nonfinite: The update reads the ``FINITE`` scalar; at 0 it leaves
        params and momenta as they were (updates -0.0): ``skip_nonfinite``
        then needs no copies of them.
    """

    clip_norm: bool = False
    clip_value: bool = False
    has_decay: bool = False
    nesterov: bool = False
    lr_inside_momentum: bool = False
    trust_clip: bool = False
    write_params: bool = False
    skip_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: up to ``Tuning.slots`` leaves of one dtype group.

    Attributes:
      kind: The pass (GLOBAL_NORM, SUMS, UPDATE or FUSED).
      leaves: Indices of the step's leaves, in slot order.
      param_dtype: The group's param dtype name.
      grad_dtype: The group's gradient dtype name.
      table: (programs, TABLE_COLUMNS) int32, one row per program.
      spans: Per slot, its [first, last) rows of the table (consecutive; the
        rows of its partial sums in a FUSED launch).
    """

    kind: str
    leaves: tuple[int, ...]
    param_dtype: str
    grad_dtype: str
    table: np.ndarray = dataclasses.field(compare=False, repr=False)
    spans: tuple[tuple[int, int], ...] = dataclasses.field(compare=False, repr=False)

    @property
    def num_programs(self) -> int:
        return int(self.table.shape[0])


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything static about one step: hashable, so it can be a jit-static argument."""

    leaves: tuple[LeafSpec, ...]
    flags: Flags
    tuning: Tuning

    def launches(self, kind: str) -> list[Launch]:
        """The launches of pass ``kind``, dtype group by dtype group."""
        if kind == SUMS:
            chosen = [i for i, leaf in enumerate(self.leaves) if leaf.size and leaf.trust]
        elif kind in (GLOBAL_NORM, UPDATE, FUSED):
            chosen = [i for i, leaf in enumerate(self.leaves) if leaf.size]
        else:
            raise ValueError(f"unknown pass {kind!r}")
        launches = []
        for (p_dtype, g_dtype), members in group_by_dtypes(self.leaves, chosen).items():
            for a in range(0, len(members), self.tuning.slots):
                ids = tuple(members[a : a + self.tuning.slots])
                sizes = [self.leaves[i].size for i in ids]
                decay = [self.leaves[i].decay for i in ids]
                if kind == FUSED:
                    trust = [self.leaves[i].trust for i in ids]
                    table, spans = make_fused_table(
                        sizes, decay, trust, self.tuning.chunk, self.tuning.lookahead
                    )
                else:
                    table, spans = make_table(sizes, decay, self.tuning.chunk)
                launches.append(Launch(kind, ids, p_dtype, g_dtype, table, tuple(spans)))
        return launches

    def passes(self) -> tuple[str, ...]:
        """The passes of a step, in order."""
        first = (GLOBAL_NORM,) if self.flags.clip_norm else ()
        return (*first, FUSED) if self.tuning.fused else (*first, SUMS, UPDATE)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The identity of one generated entry point (see ``kernels.entry_source``).

    Attributes:
      kind: The pass (GLOBAL_NORM, SUMS, UPDATE or FUSED).
      slots: Leaves the launch serves (pointer arguments per role).
      with_params: The params are arguments (always for SUMS and FUSED; for
        UPDATE when the new params are written or weight decay is on; never
        for GLOBAL_NORM).
    """

    kind: str
    slots: int
    with_params: bool

    @property
    def name(self) -> str:
        return f"lars_{self.kind}_{self.slots}" + ("_w" if self.with_params else "")

    def scalar_args(self) -> tuple[str, ...]:
        """The leading non-leaf inputs, in argument order."""
        if self.kind == UPDATE:
            return ("table_ptr", "scalars_ptr", "ratios_ptr")
        return ("table_ptr", "scalars_ptr")

    def pointer_roles(self) -> tuple[str, ...]:
        """The per-leaf pointer roles, in argument order (inputs, then outputs)."""
        roles = ("w",) if self.with_params else ()
        if self.kind in (UPDATE, FUSED):
            return (*roles, "g", "v", "out", "v_out")
        return (*roles, "g")

    def output_args(self) -> tuple[str, ...]:
        """Outputs that are not per leaf (after the per-leaf outputs)."""
        if self.kind == UPDATE:
            return ()
        if self.kind == FUSED:
            return ("partials_ptr", "ratios_out_ptr", "sync_ptr")
        return ("partials_ptr",)

    def constexpr_names(self) -> tuple[str, ...]:
        update = ("NESTEROV", "LR_INSIDE", "WRITE_PARAMS", "SKIP_NONFINITE")
        if self.kind == UPDATE:
            return ("CLIP_NORM", "CLIP_VALUE", "HAS_DECAY", *update, "CHUNK", "BLOCK")
        if self.kind == FUSED:
            options = ("CLIP_NORM", "CLIP_VALUE", "HAS_DECAY", *update, "TRUST_CLIP")
            return (*options, "CHUNK", "BLOCK", "REDUCE_BLOCK")
        return ("GLOBAL", "CLIP_NORM", "CLIP_VALUE", "HAS_DECAY", "CHUNK", "BLOCK")

    def arg_names(self) -> list[str]:
        """Every runtime argument, in order: inputs, then outputs (jax-triton's order)."""
        names = list(self.scalar_args())
        for role in self.pointer_roles():
            names += [f"{role}_{k}" for k in range(self.slots)]
        return names + list(self.output_args())

    def constexprs(self, flags: Flags, tuning: Tuning) -> dict[str, bool | int]:
        """The compile-time values of this launch."""
        if self.kind == GLOBAL_NORM:  # raw gradients: no option applies
            values = {"GLOBAL": True, "CLIP_NORM": False, "CLIP_VALUE": False, "HAS_DECAY": False}
        else:
            values = {
                "GLOBAL": False,
                "CLIP_NORM": flags.clip_norm,
                "CLIP_VALUE": flags.clip_value,
                "HAS_DECAY": flags.has_decay,
                "NESTEROV": flags.nesterov,
                "LR_INSIDE": flags.lr_inside_momentum,
                "WRITE_PARAMS": flags.write_params,
                "SKIP_NONFINITE": flags.skip_nonfinite,
                "TRUST_CLIP": flags.trust_clip,
            }
        values.update(CHUNK=tuning.chunk, BLOCK=tuning.block, REDUCE_BLOCK=REDUCE_BLOCK)
        return {name: values[name] for name in self.constexpr_names()}


def kernel_spec(launch: Launch, flags: Flags) -> KernelSpec:
    """The entry point a launch runs."""
    if launch.kind == UPDATE:
        with_params = flags.write_params or flags.has_decay
    else:
        with_params = launch.kind in (SUMS, FUSED)
    return KernelSpec(launch.kind, len(launch.leaves), with_params)


def group_by_dtypes(
    leaves: Sequence[LeafSpec], chosen: Sequence[int]
) -> dict[tuple[str, str], list[int]]:
    """``chosen`` leaf indices by (param dtype, grad dtype), groups in order of first use."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i in chosen:
        groups.setdefault((leaves[i].param_dtype, leaves[i].grad_dtype), []).append(i)
    return groups


def make_table(
    sizes: Sequence[int], decay: Sequence[bool], chunk: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The tile table of one launch: each leaf cut into ``chunk``-element programs.

    Returns:
      (table, spans): the (programs, TABLE_COLUMNS) int32 table, and per slot
      the [first, last) range of its rows.
    """
    rows: list[tuple[int, ...]] = []
    spans = []
    unused = (0,) * (TABLE_COLUMNS - 4)
    for slot, (n, d) in enumerate(zip(sizes, decay, strict=True)):
        first = len(rows)
        for c in range(-(-n // chunk)):
            rows.append((slot, c, min(chunk, n - c * chunk), int(d), *unused))
        spans.append((first, len(rows)))
    return np.asarray(rows, np.int32).reshape(-1, TABLE_COLUMNS), spans


def make_fused_table(
    sizes: Sequence[int],
    decay: Sequence[bool],
    trust: Sequence[bool],
    chunk: int,
    lookahead: int,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The item table of one fused launch (see the module docstring).

    A leaf of one chunk with a trust ratio is one KIND_WHOLE item. A longer one
    is a KIND_SUMS item per chunk, then, ``lookahead`` sums items of later
    leaves on (or at the end), a KIND_UPDATE item per chunk. A leaf without a
    trust ratio is KIND_UPDATE items at once (its ratio is 1: nothing to wait
    for). Every leaf's update items come after all of its sums items, the
    order programs claim them in.

    Returns:
      (table, spans): the (items, TABLE_COLUMNS) int32 table, and per slot the
      [first, last) rows of its partial sums (empty unless KIND_SUMS).
    """
    rows: list[tuple[int, ...]] = []
    spans: list[tuple[int, int]] = []
    pending: list[list[int]] = []  # [slot, items still to wait]
    partial_rows = 0

    def item(slot: int, c: int, kind: int) -> tuple[int, ...]:
        n = sizes[slot]
        first, _ = spans[slot]
        length = min(chunk, n - c * chunk)
        chunks = -(-n // chunk)
        return (slot, c, length, int(decay[slot]), kind, int(trust[slot]), first, chunks)

    def updates(slot: int) -> None:
        rows.extend(item(slot, c, KIND_UPDATE) for c in range(-(-sizes[slot] // chunk)))

    def flush() -> None:
        while pending and pending[0][1] <= 0:
            updates(pending.pop(0)[0])

    def tick() -> None:  # one more sums or whole item emitted
        for entry in pending:
            entry[1] -= 1
        flush()

    for slot, n in enumerate(sizes):
        chunks = -(-n // chunk)
        if trust[slot] and chunks > 1:
            spans.append((partial_rows, partial_rows + chunks))
            partial_rows += chunks
        else:
            spans.append((partial_rows, partial_rows))
        if chunks == 0:
            continue
        if not trust[slot]:
            updates(slot)
        elif chunks == 1:
            rows.append(item(slot, 0, KIND_WHOLE))
            tick()
        else:
            for c in range(chunks):
                rows.append(item(slot, c, KIND_SUMS))
                tick()
            pending.append([slot, lookahead])
            flush()
    for slot, _ in pending:
        updates(slot)
    return np.asarray(rows, np.int32).reshape(-1, TABLE_COLUMNS), spans


def reduce_index(spans: Sequence[tuple[int, int]], num_rows: int) -> np.ndarray:
    """Gather indices that line up each slot's partial-sum rows, padded.

    Row ``num_rows`` is the zero row the caller appends to the partials, so
    ``sum(padded[index], axis=1)`` sums each slot's rows in table order: the
    reduction order is fixed by the plan, never by scheduling (no atomics).
    """
    width = max((b - a for a, b in spans), default=0)
    index = np.full((len(spans), max(width, 1)), num_rows, np.int32)
    for slot, (a, b) in enumerate(spans):
        index[slot, : b - a] = np.arange(a, b)
    return index


def check_leaf(i: int, size: int, param_dtype, grad_dtype, momentum_dtype, chunk: int) -> None:
    """Raises a TypeError/ValueError naming leaf ``i`` if the kernels cannot handle it."""
    p, g, v = (np.dtype(d).name for d in (param_dtype, grad_dtype, momentum_dtype))
    if p not in DTYPES or g not in DTYPES:
        raise TypeError(
            f"leaf {i}: the triton backend handles float32, bfloat16 and float16 params and "
            f"gradients; this leaf has a {p} param and a {g} gradient "
            "(use backend='reference' or 'native' for float64)"
        )
    if v != "float32":
        raise TypeError(f"leaf {i}: momentum must be float32 for a {p} param, got {v}")
    if -(-size // chunk) > _MAX_CHUNKS:
        raise ValueError(f"leaf {i} has {size} elements, more than the int32 tile table addresses")
