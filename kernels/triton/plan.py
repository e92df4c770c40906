"""The launch plan of the Triton LARS step: which leaves go in which launch, and the tile tables.

Plain Python and NumPy, computed on the host at trace time from a step's
static facts (``lars.contract.StepSpec``: leaves, masks, switches, options);
it imports neither triton nor jax-triton. A :class:`StepPlan` holds no
hyperparameter values (they may be traced), so it is a ``jax.jit`` static
argument. See docs/triton.md for the design of the tables and the fused pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lars.contract import LeafSpec, StepSpec
from lars.contract import StepFlags as Flags

# Leaves per launch: 192 slots of up to 5 pointers fit CUDA 12.1+'s 32 kB of
# kernel parameters and cover ResNet-50's 161 leaves (chosen from these limits).
SLOTS_PER_LAUNCH = 192
# Elements per program: 64 per thread of 4 warps. Measured on an H200
# (2026-12-04, bench/results/h200-2026-12-04/, ResNet-50 fp32 in place, 20
# steps per jitted call): 0.340 ms a step at 8192 with lookahead 256 against
# 0.581 to 0.615 at 4096 with lookahead 512 or 256, hints or not. Each item
# pays its claim, table row and pointer selection; halving the items paid
# more than the bytes: ncu counted 22.3 DRAM B/param at 4096 in a 0.457 ms
# launch (1.25 TB/s). The L2 model (bench/l2_model.py) predicts 20.00 B/param
# for both geometries with the evict-first hints. Not yet timed: larger
# chunks, and the two-pass form (fused=False) at 8192 (0.576 ms at 4096).
CHUNK = 8192
# Elements per vector step: two 16-byte fp32 loads per thread (not measured).
BLOCK = 1024
# Warps per program: the Triton default (not measured).
NUM_WARPS = 4
# Fused pass: items between a layer's last sums item and its first update
# item (16 MB of fp32 w and g at CHUNK 8192). Timed with CHUNK (above): at
# 4096, 256 and 512 ran alike (0.610 and 0.601 ms, no hints); the L2 model
# predicts 20.00 B/param with the hints at 8192 and 256, 26 to 27 without.
LOOKAHEAD = 256
# Fused pass: the update's loads and stores (each line's last use in the step)
# carry an evict-first hint, so the norms' w and g stay in L2 until their
# update reads them (from the L2 model, above). Timed on an H200: no
# difference in time either way (0.340 and 0.341 ms at 8192; 0.615 and 0.601
# at 4096); the DRAM bytes with and without them are not yet measured.
EVICT_FIRST = True
# Fused pass: where a program finds its leaf's pointers. False: a chain of
# selects over the kernel's pointer arguments on the item's slot, which ptxas
# compiles to predicated loads from the constant bank, all issued (2,311 of
# the 4,304 SASS instructions of the fused kernel at 192 slots). True: the
# program that claims item 0 writes every argument's address into the sync
# buffer once; every item then loads its five. Not yet timed on a GPU, so
# not the default (the GPU check's timing-tuning step times it).
POINTER_TABLE = False
# Fused pass: partial-sum rows added per vector step when a ratio is finalised.
REDUCE_BLOCK = 256
# Fused pass: polls of a ready flag before an update item gives up (a debug
# switch; 0, the default, waits without bound and compiles no check).
SPIN_LIMIT = 0

# Words of the fused pass's zeroed int32 sync buffer: the item counter, then
# (with a spin limit) the error word, then per slot its arrivals and ready flag;
# with the pointer table, then its ready flag and per pointer argument (role
# by role, slot by slot) its address as two words, low then high.
SYNC_COUNTER = 0
SYNC_ERROR = 1  # 0, or ERROR_SPIN once a wait gave up (only with a spin limit)
ERROR_SPIN = 1

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
COL_ITEMS = 8  # the table's rows (a program that claims a row past them exits)
TABLE_COLUMNS = 9

# Items of the fused pass (COL_KIND).
KIND_SUMS = 0  # partial sums of one chunk of a multi-chunk leaf
KIND_UPDATE = 1  # update of one chunk, once the leaf's ratio is published
KIND_WHOLE = 2  # a single-chunk leaf: sums, ratio and update in one program

# Columns of the per-chunk partial sums a norm pass writes.
SUM_W2 = 0  # sum of w**2 (of g**2 in the global-norm pass)
SUM_U2 = 1  # sum of u**2, u the clipped and decayed gradient

# The passes of a step.
GLOBAL_NORM = "global_norm"  # sum of g**2 over every leaf (grad_clip_norm only)
SUMS = "sums"  # per leaf, sum of w**2 and of u**2 (leaves with a trust ratio)
UPDATE = "update"  # per element: new momentum, and the update or the new param
FUSED = "fused"  # SUMS, the trust ratios and UPDATE in one launch

# Element offsets are int32 chunk numbers times CHUNK, computed in int64 in the
# kernels; the table itself is int32.
_MAX_CHUNKS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The launch geometry (the backend's options; see the module constants).

    Attributes:
      slots: Leaves per launch.
      chunk: Elements per program; a multiple of ``block``.
      block: Elements per vector step; a power of two.
      num_warps: Warps per program (GPU launches only); a power of two.
      fused: One fused launch per dtype group (norms, ratios and update);
        False: the two-pass form (a norm pass, then an update pass).
      lookahead: Fused pass: items between a layer's sums and its update.
      evict_first: Fused pass: the update's loads and stores carry an
        evict-first L2 hint (``eviction_policy="evict_first"``).
      pointer_table: Fused pass: items load their leaf's pointers from a
        table of addresses written once per launch (``POINTER_TABLE``)
        instead of selecting them among the pointer arguments.
      spin_limit: Fused pass, a debug switch: 0 waits for a ratio without
        bound; N > 0 gives up after N polls, sets the launch's error word
        (``SYNC_ERROR``) and updates the chunk with a NaN ratio, so a
        protocol fault returns instead of hanging.
    """

    slots: int = SLOTS_PER_LAUNCH
    chunk: int = CHUNK
    block: int = BLOCK
    num_warps: int = NUM_WARPS
    fused: bool = True
    lookahead: int = LOOKAHEAD
    spin_limit: int = SPIN_LIMIT
    evict_first: bool = EVICT_FIRST
    pointer_table: bool = POINTER_TABLE

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two, got {self.block}")
        if self.chunk < self.block or self.chunk % self.block:
            raise ValueError(f"chunk must be a multiple of block={self.block}, got {self.chunk}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        if self.spin_limit < 0:
            raise ValueError(f"spin_limit must be >= 0, got {self.spin_limit}")
        if not isinstance(self.evict_first, (bool, np.bool_)):
            raise TypeError(f"evict_first must be a bool, got {self.evict_first!r}")
        if not isinstance(self.pointer_table, (bool, np.bool_)):
            raise TypeError(f"pointer_table must be a bool, got {self.pointer_table!r}")


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
    """Everything static about one step's launches: hashable, a jit-static argument.

    Attributes:
      leaves: The step's leaves (``StepSpec.leaves``).
      flags: Its switches.
      tuning: The launch geometry.
    """

    leaves: tuple[LeafSpec, ...]
    flags: Flags
    tuning: Tuning

    @classmethod
    def of(cls, spec: StepSpec) -> StepPlan:
        """The plan of ``spec``, its options (normalised) the :class:`Tuning`."""
        return cls(tuple(spec.leaves), spec.flags, Tuning(**dict(spec.options)))

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

    def count_launches(self) -> dict[str, int]:
        """Triton launches per pass of a step."""
        return {kind: len(self.launches(kind)) for kind in self.passes()}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The identity of one generated entry point (see ``entry.entry_source``).

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
            geometry = ("CHUNK", "BLOCK", "REDUCE_BLOCK", "SPIN_LIMIT", "EVICT_FIRST")
            return (*options, *geometry, "POINTER_TABLE")
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
        values.update(SPIN_LIMIT=tuning.spin_limit, EVICT_FIRST=bool(tuning.evict_first))
        values.update(POINTER_TABLE=bool(tuning.pointer_table))
        return {name: values[name] for name in self.constexpr_names()}


def kernel_spec(launch: Launch, flags: Flags) -> KernelSpec:
    """The entry point a launch runs."""
    if launch.kind == UPDATE:
        with_params = flags.write_params or flags.has_decay
    else:
        with_params = launch.kind in (SUMS, FUSED)
    return KernelSpec(launch.kind, len(launch.leaves), with_params)


# Pointer arguments per slot of a fused launch (w, g, v, out, v_out): the
# pointer table's entries per slot.
FUSED_ROLES = len(KernelSpec(FUSED, 1, True).pointer_roles())


def sync_words(slots: int, tuning: Tuning) -> int:
    """Words of a fused launch's sync buffer (see ``SYNC_COUNTER``)."""
    table = 1 + 2 * FUSED_ROLES * slots if tuning.pointer_table else 0
    return 1 + (tuning.spin_limit > 0) + 2 * slots + table


def group_by_dtypes(
    leaves: Sequence[LeafSpec], chosen: Sequence[int]
) -> dict[tuple[str, str], list[int]]:
    """``chosen`` leaf indices by (param dtype, grad dtype) names, groups in order of first use."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i in chosen:
        key = (np.dtype(leaves[i].param_dtype).name, np.dtype(leaves[i].grad_dtype).name)
        groups.setdefault(key, []).append(i)
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
    """The item table of one fused launch.

    A leaf of one chunk with a trust ratio is one KIND_WHOLE item. A longer one
    is a KIND_SUMS item per chunk, then, ``lookahead`` sums items of later
    leaves on (or at the end), a KIND_UPDATE item per chunk. A leaf without a
    trust ratio is KIND_UPDATE items at once (its ratio is 1: nothing to wait
    for). Every leaf's update items come after all of its sums items, the
    order programs claim them in. Every row's COL_ITEMS holds the number of
    items (the kernel reads row 0's).

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
        return (slot, c, length, int(decay[slot]), kind, int(trust[slot]), first, chunks, 0)

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
    table = np.asarray(rows, np.int32).reshape(-1, TABLE_COLUMNS)
    table[:, COL_ITEMS] = len(table)
    return table, spans


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


def too_large(spec: StepSpec) -> str | None:
    """None when the int32 tile tables address every leaf of ``spec``, else which does not."""
    chunk = Tuning(**dict(spec.options)).chunk
    for i, leaf in enumerate(spec.leaves):
        if -(-leaf.size // chunk) > _MAX_CHUNKS:
            return f"leaf {i} has {leaf.size} elements, more than the int32 tile table addresses"
    return None
