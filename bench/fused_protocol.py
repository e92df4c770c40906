"""A model of the fused Triton launch's claim / arrive / ready protocol, over its real tables.

The fused pass of the Triton backend (``lars.kernels.triton``: ``entry.py``
claims, ``programs.fused_program`` does the rest) synchronises its programs
through one int32 buffer, zeroed at launch: ``sync[0]`` hands out table rows
(``atomic_add``, so items start in table order); then, after an error word
in a launch with a spin limit (``plan.SYNC_ERROR``), two words per slot: a
layer's finished sums items (the arrival that makes it ``chunks`` adds the
partials and publishes the trust ratio) and its ready flag, on which its
update items spin. The model waits without bound, as the kernel does
without a spin limit.

This module executes that protocol step by step, one atomic or memory
operation of one program at a time, over the launches the backend's own step
builds (:func:`captured_launches` runs ``step.pass_fused`` with a recording
launcher: table, grid and zeroed outputs exactly as a GPU launch gets them).
At most ``resident`` programs run at once (a program becomes resident when
one exits, as on a GPU whose SMs are full); a scheduler picks which resident
program takes the next step. A spin that reads 0 changes nothing, so the
model only ever schedules programs that can make progress, and a launch
*deadlocks* when every resident program spins and none can set a flag.

:func:`simulate` checks, for one schedule: no deadlock; every claimed row is
inside the table; every item runs exactly once; a layer's partials are all
written when they are added; and an update item of a layer with a trust ratio
runs only after all of that layer's sums items finished and its ratio was
published in this launch. Memory is sequentially consistent in the model:
the kernel's acq_rel arrival and release/acquire flag are what make the GPU
behave so for these accesses. :func:`explore` checks every schedule of a
small launch (a search over all interleavings). A program that claims a
row at or past the table's item count exits, as the kernel's guard makes it
(``guard=False`` models a kernel without it). The ``sync``, ``grid``,
``table``, ``claim`` and ``guard`` arguments exist for negative controls:
stale counters, a wrong grid, a reordered table, claiming by program id, no
guard.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

import numpy as np

from lars.contract import LeafSpec
from lars.contract import StepFlags as Flags
from lars.kernels.triton import plan as P
from lars.kernels.triton import step as S

# Program phases: the next operation a resident program performs.
CLAIM = 0  # atomic_add(sync[0], 1): its table row
PARTIALS = 1  # a sums item: the chunk's partial sums, stored to its row
ARRIVE = 2  # atomic_add(arrivals, 1); the last arrival goes on to REDUCE
REDUCE = 3  # the last arrival adds the layer's partials and stores the ratio
PUBLISH = 4  # atomic_xchg(ready, 1)
WAIT = 5  # an update item of a trust layer: spin until ready != 0
UPDATE = 6  # read the ratio, update the chunk
WHOLE = 7  # a single-chunk layer: sums, ratio and update in one program

POLICIES = ("random", "round_robin", "depth_first", "latest_row")


@dataclasses.dataclass(frozen=True)
class FusedLaunch:
    """One fused launch as the step issues it.

    Attributes:
      table: (items, TABLE_COLUMNS) int32, the item table.
      grid: Programs launched.
      slots: Leaves of the launch.
      sync_zeroed: The sync buffer (the last output) is zeroed at launch.
      slot_base: The sync buffer's first per-slot word (after the item
        counter, and the error word of a launch with a spin limit).
    """

    table: np.ndarray = dataclasses.field(repr=False)
    grid: int
    slots: int
    sync_zeroed: bool
    slot_base: int = 1

    @property
    def items(self) -> int:
        return int(self.table.shape[0])


def make_plan(
    shapes: Sequence[tuple[int, ...]],
    *,
    param_dtype: str = "float32",
    grad_dtype: str = "float32",
    trust: Sequence[bool] | None = None,
    decay: Sequence[bool] | None = None,
    write_params: bool = True,
    **tuning: int,
) -> P.StepPlan:
    """The backend's plan of a step on leaves of ``shapes`` (trust and decay on by default).

    ``tuning`` holds ``plan.Tuning`` fields (``lookahead``, ``chunk``, ``block``, ``slots``).
    """
    n = len(shapes)
    trust = [True] * n if trust is None else list(trust)
    decay = [True] * n if decay is None else list(decay)
    if len(trust) != n or len(decay) != n:
        raise ValueError(f"trust and decay need {n} entries, one per shape")
    p, g = np.dtype(param_dtype), np.dtype(grad_dtype)
    leaves = tuple(
        LeafSpec(tuple(s), p, g, np.dtype(np.float32), bool(d), bool(t))
        for s, t, d in zip(shapes, trust, decay, strict=True)
    )
    flags = Flags(has_decay=any(decay), write_params=write_params)
    return P.StepPlan(leaves, flags, P.Tuning(**tuning))


def captured_launches(plan: P.StepPlan) -> list[FusedLaunch]:
    """The fused launches ``step.pass_fused`` issues for ``plan``, as a launcher receives them.

    The arrays are zero-strided NumPy views (no memory per parameter): only
    their shapes and dtypes reach the plan.
    """
    record: list[FusedLaunch] = []

    def launcher(spec, inputs, outputs, aliases, grid, constexprs, zeroed=()):
        del aliases, constexprs
        if spec.kind != P.FUSED:
            raise ValueError(f"expected fused launches only, got {spec.kind}")
        sync = outputs[-1]
        base = int(np.prod(sync.shape)) - 2 * spec.slots
        if len(sync.shape) != 1 or base not in (1, 2) or np.dtype(sync.dtype) != np.int32:
            raise ValueError(f"the last output is not the sync buffer: {sync}")
        table = np.array(inputs[0], np.int32)
        zeroed_sync = len(outputs) - 1 in zeroed
        record.append(FusedLaunch(table, int(grid), spec.slots, zeroed_sync, base))
        return [np.zeros(o.shape, o.dtype) for o in outputs]

    def arrays(dtype_of) -> list[np.ndarray]:
        return [np.broadcast_to(np.zeros((), dtype_of(leaf)), leaf.shape) for leaf in plan.leaves]

    params = arrays(lambda leaf: leaf.param_dtype)
    grads = arrays(lambda leaf: leaf.grad_dtype)
    momentum = arrays(lambda leaf: leaf.momentum_dtype)
    values = np.zeros(16, np.float32)
    S.pass_fused(params, grads, momentum, values, plan=plan, launch=launcher, xp=np)
    return record


def completed_sync(launch: FusedLaunch) -> np.ndarray:
    """The sync buffer as a correct run of ``launch`` leaves it (what "not zeroed" reuses)."""
    sync = np.zeros(launch.slot_base + 2 * launch.slots, np.int64)
    sync[0] = launch.grid
    for row in launch.table:
        if row[P.COL_KIND] == P.KIND_SUMS:
            sync[launch.slot_base + 2 * row[P.COL_SLOT]] += 1
            sync[launch.slot_base + 2 * row[P.COL_SLOT] + 1] = 1
    return sync


@dataclasses.dataclass
class Outcome:
    """What one schedule did.

    Attributes:
      deadlock: Every resident program was spinning and none could progress.
      violations: Each broken property, in words (empty when correct).
      steps: Operations performed.
      max_waiting: Most programs spinning at once.
      finished: Rows in the order their work was done (a sums item when its
        partials are stored, any other when it updates).
    """

    deadlock: bool = False
    violations: list[str] = dataclasses.field(default_factory=list)
    steps: int = 0
    max_waiting: int = 0
    finished: list[int] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.deadlock and not self.violations


class _Model:
    """The launch's shared state and its programs; :meth:`act` performs one operation."""

    def __init__(
        self, launch: FusedLaunch, sync: np.ndarray | None, claim: str, guard: bool = True
    ) -> None:
        if claim not in ("atomic", "program_id"):
            raise ValueError(f"claim must be 'atomic' or 'program_id', got {claim!r}")
        self.table = launch.table
        self.claim = claim
        self.guard = guard
        self.base = launch.slot_base
        words = launch.slot_base + 2 * launch.slots
        self.sync = np.zeros(words, np.int64) if sync is None else sync.copy()
        self.sums_total = np.zeros(launch.slots, np.int64)  # the table's sums items per slot
        for row in self.table:
            if row[P.COL_KIND] == P.KIND_SUMS:
                self.sums_total[row[P.COL_SLOT]] += 1
        self.sums_done = np.zeros(launch.slots, np.int64)  # partial rows stored this launch
        self.published = np.zeros(launch.slots, bool)  # ratio stored this launch
        self.runs = np.zeros(launch.items, np.int64)
        self.finished: list[int] = []
        self.violations: list[str] = []

    def act(self, block: list[int]) -> str:
        """One operation of ``block`` = [phase, row, program id]; returns "go", "wait" or "exit"."""
        phase, row = block[0], block[1]
        if phase == CLAIM:
            if self.claim == "atomic":
                row = int(self.sync[0])
                self.sync[0] += 1
            else:
                row = block[2]
            block[1] = row
            if self.guard and row >= self.table[0, P.COL_ITEMS]:
                return "exit"  # the kernel's guard: a row past the item count does nothing
            if row >= len(self.table):
                self.violations.append(
                    f"a program claimed row {row} of a {len(self.table)}-item table "
                    "(the kernel would read past its table)"
                )
                return "exit"
            kind, trust = self.table[row, P.COL_KIND], self.table[row, P.COL_TRUST]
            if kind == P.KIND_SUMS:
                block[0] = PARTIALS
            elif kind == P.KIND_WHOLE:
                block[0] = WHOLE
            else:
                block[0] = WAIT if trust else UPDATE
            return "go"
        slot = int(self.table[row, P.COL_SLOT])
        if phase == PARTIALS:
            self.sums_done[slot] += 1
            self.runs[row] += 1
            self.finished.append(row)
            block[0] = ARRIVE
            return "go"
        if phase == ARRIVE:
            before = self.sync[self.base + 2 * slot]
            self.sync[self.base + 2 * slot] += 1
            if before == self.table[row, P.COL_CHUNKS] - 1:
                block[0] = REDUCE
                return "go"
            return "exit"
        if phase == REDUCE:
            if self.sums_done[slot] != self.sums_total[slot]:
                self.violations.append(
                    f"slot {slot}: partials added with {self.sums_done[slot]} of "
                    f"{self.sums_total[slot]} chunks written"
                )
            self.published[slot] = True
            block[0] = PUBLISH
            return "go"
        if phase == PUBLISH:
            self.sync[self.base + 2 * slot + 1] = 1
            return "exit"
        if phase == WAIT:
            if self.sync[self.base + 2 * slot + 1] == 0:
                return "wait"
            block[0] = UPDATE
            return "go"
        if phase == UPDATE and self.table[row, P.COL_TRUST]:
            if self.sums_done[slot] != self.sums_total[slot] or not self.published[slot]:
                self.violations.append(
                    f"row {row}: update of slot {slot} chunk {self.table[row, P.COL_CHUNK]} ran "
                    f"with {self.sums_done[slot]} of {self.sums_total[slot]} sums done, ratio "
                    + ("published" if self.published[slot] else "not published")
                )
        self.runs[row] += 1  # UPDATE or WHOLE: the item's last operation
        self.finished.append(row)
        return "exit"

    def finish(self) -> None:
        never = np.flatnonzero(self.runs == 0)
        twice = np.flatnonzero(self.runs > 1)
        if never.size:
            self.violations.append(f"{never.size} items never ran (first: row {never[0]})")
        if twice.size:
            self.violations.append(f"{twice.size} items ran more than once (first: row {twice[0]})")


def simulate(
    launch: FusedLaunch,
    resident: int,
    *,
    policy: str = "random",
    seed: int = 0,
    sync: np.ndarray | None = None,
    grid: int | None = None,
    table: np.ndarray | None = None,
    claim: str = "atomic",
    start_order: Sequence[int] | None = None,
    guard: bool = True,
) -> Outcome:
    """Runs ``launch`` under one schedule with at most ``resident`` programs at once.

    Args:
      launch: The launch (table, grid, slots).
      resident: Programs resident at once (>= 1).
      policy: Which resident program acts next: "random" (uniform over those
        that can progress, drawn from ``seed``), "round_robin", or
        "depth_first" (the newest one, until it exits or spins), or
        "latest_row" (the one with the latest row, unclaimed ones first: it
        runs update items ahead of the sums they wait for).
      seed: The random policy's seed.
      sync: The sync buffer at launch (default zeros; a negative control passes
        :func:`completed_sync`).
      grid: Programs launched (default ``launch.grid``).
      table: The item table (default ``launch.table``).
      claim: "atomic" (the kernel: ``sync[0]`` hands out rows) or "program_id"
        (row = program id; a negative control).
      start_order: Program ids in the order they become resident (default
        0, 1, ...; only "program_id" claims depend on it).
      guard: A program that claims a row at or past the table's item count
        (``plan.COL_ITEMS`` of row 0) exits, as the kernel does; False (a
        negative control) models a kernel without that check.
    """
    if resident < 1:
        raise ValueError(f"resident must be >= 1, got {resident}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if table is not None or grid is not None:
        launch = dataclasses.replace(
            launch,
            table=launch.table if table is None else np.asarray(table, np.int32),
            grid=launch.grid if grid is None else grid,
        )
    model = _Model(launch, sync, claim, guard)
    order = list(range(launch.grid)) if start_order is None else list(start_order)
    if sorted(order) != list(range(launch.grid)):
        raise ValueError("start_order must be a permutation of the program ids")
    rng = np.random.default_rng(seed)
    pending = deque(order)  # programs not yet resident, in start order
    active: list[list[int]] = []  # resident programs that can progress
    waiting: dict[int, list[list[int]]] = {}  # slot -> its programs spinning on ready
    out = Outcome()
    resident_now = 0

    def admit() -> None:
        nonlocal resident_now
        while pending and resident_now < resident:
            active.append([CLAIM, -1, pending.popleft()])
            resident_now += 1

    admit()
    while active:
        if policy == "random":
            i = int(rng.integers(len(active)))
            active[i], active[-1] = active[-1], active[i]
            block = active.pop()
        elif policy == "round_robin":
            block = active.pop(0)
        elif policy == "depth_first":
            block = active.pop()
        else:
            i = max(range(len(active)), key=lambda j: _lateness(active[j]))
            active[i], active[-1] = active[-1], active[i]
            block = active.pop()
        result = model.act(block)
        out.steps += 1
        if result == "go":
            active.append(block)
        elif result == "wait":
            waiting.setdefault(int(model.table[block[1], P.COL_SLOT]), []).append(block)
            out.max_waiting = max(out.max_waiting, sum(map(len, waiting.values())))
        else:
            resident_now -= 1
            admit()
        if block[0] == PUBLISH or result == "exit":  # a flag may have been set: wake spinners
            for slot in [s for s in waiting if model.sync[model.base + 2 * s + 1]]:
                active.extend(waiting.pop(slot))
    if any(waiting.values()):
        out.deadlock = True
        stuck = sorted(waiting)
        out.violations.append(
            f"deadlock: {resident_now} resident programs, those spinning wait on slots {stuck[:5]}"
        )
        return out
    model.finish()
    out.violations.extend(model.violations)
    out.finished = model.finished
    return out


def _lateness(block: list[int]) -> int:
    return 2**62 if block[0] == CLAIM else block[1]


def explore(
    launch: FusedLaunch,
    resident: int,
    *,
    sync: np.ndarray | None = None,
    grid: int | None = None,
    table: np.ndarray | None = None,
    max_states: int = 200_000,
    guard: bool = True,
) -> tuple[Outcome, int]:
    """Every schedule of a small launch: returns (the first bad outcome or a good one, states).

    A depth-first search over all interleavings of the resident programs'
    operations (states are hashed, so each is expanded once). Programs are
    identical until they claim, so which pending program becomes resident
    does not matter for atomic claims.
    """
    if table is not None or grid is not None:
        launch = dataclasses.replace(
            launch,
            table=launch.table if table is None else np.asarray(table, np.int32),
            grid=launch.grid if grid is None else grid,
        )

    def fresh() -> _Model:
        return _Model(launch, sync, "atomic", guard)

    def key(m: _Model, blocks: tuple, started: int) -> tuple:
        return (
            tuple(m.sync),
            tuple(m.sums_done),
            tuple(m.published),
            tuple(m.runs),
            tuple(sorted(blocks)),
            started,
            len(m.violations),
        )

    seen: set = set()
    stack = [(fresh(), (), 0)]
    while stack:
        model, blocks, started = stack.pop()
        while started < launch.grid and len(blocks) < resident:
            blocks = (*blocks, (CLAIM, -1))
            started += 1
        k = key(model, blocks, started)
        if k in seen:
            continue
        seen.add(k)
        if len(seen) > max_states:
            raise RuntimeError(f"more than {max_states} states: the launch is too large to explore")
        if model.violations:
            return Outcome(violations=list(model.violations)), len(seen)
        movable = False
        for i, (phase, row) in enumerate(blocks):
            child = _copy(model)
            block = [phase, row, 0]
            result = child.act(block)
            if result == "wait":
                continue
            movable = True
            rest = blocks[:i] + blocks[i + 1 :]
            stack.append((child, rest if result == "exit" else (*rest, tuple(block[:2])), started))
        if not movable and blocks:
            return Outcome(deadlock=True, violations=["deadlock"]), len(seen)
        if not blocks:
            model.finish()
            if model.violations:
                return Outcome(violations=list(model.violations)), len(seen)
    return Outcome(), len(seen)


def _copy(model: _Model) -> _Model:
    twin = object.__new__(_Model)
    twin.table = model.table
    twin.claim = model.claim
    twin.guard = model.guard
    twin.base = model.base
    twin.sync = model.sync.copy()
    twin.sums_total = model.sums_total
    twin.sums_done = model.sums_done.copy()
    twin.published = model.published.copy()
    twin.runs = model.runs.copy()
    twin.finished = []  # not tracked while exploring
    twin.violations = list(model.violations)
    return twin


def update_before_sums(table: np.ndarray) -> np.ndarray:
    """A reordered copy of ``table`` (a negative control).

    The first update row of a layer with a trust ratio is moved just before
    that layer's last sums row.
    """
    kinds, slots = table[:, P.COL_KIND], table[:, P.COL_SLOT]
    for u in np.flatnonzero((kinds == P.KIND_UPDATE) & (table[:, P.COL_TRUST] != 0)):
        last_sums = np.flatnonzero((kinds == P.KIND_SUMS) & (slots == slots[u]))[-1]
        rows = list(range(len(table)))
        rows.insert(int(last_sums), rows.pop(int(u)))
        return table[rows]
    raise ValueError("the table has no update item of a layer with a trust ratio")
