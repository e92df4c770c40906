"""An LRU model of the GPU L2 under the fused Triton launch: DRAM bytes per parameter.

A model, not a measurement. The fused pass (``lars.kernels.triton``) reads a
layer's w and g once for its norms and again, a little later, for its update;
whether the second read hits L2 decides between about 20 and 28 bytes per
float32 parameter. This module replays the launch's memory accesses in the
order its programs claim the items of the backend's real item tables
(``plan.StepPlan.launches``), with ``resident`` programs running at once, and
feeds them to a fully associative, write-back LRU cache:

* Programs run as events in time: a vector step (``BLOCK`` elements of each
  array the item streams) takes time in proportion to the bytes it moves,
  at the same rate for every program. A program that finishes its item
  claims the next row of the table; an update item of a layer with a trust
  ratio is parked (spins, no accesses) until the layer's last sums item has
  finished. A masked-off step of a short chunk moves nothing and takes a
  tenth of a full step.
* A sums step reads g, then w; an update step reads g, v and w (w when the
  params are written or decay applies), then writes the update (the params
  in place) and v; a single-chunk layer does its sums steps, then its update
  steps. Partial sums, ratios, flags and the table (about 0.01 B/param) are
  left out.
* Reads that miss are fetched from DRAM; writes allocate without a fetch
  (every line is written whole) and dirty data is written back when evicted
  or at the end (every written byte reaches DRAM once).
* With ``evict_first`` the update's loads and stores (each line's last use)
  make their lines the least recently used, as an evict-first hint would.
* The cache unit is ``"step"`` (default): the bytes one vector step of one
  program touches in one array (4 kB of fp32: 32 lines of 128 B, always
  touched together, so they sit together in the LRU order), or ``"line"``:
  each 128-byte line on its own (32 times slower; the two give the same
  ResNet-50 figures to 0.01 B/param). Every access streams whole lines, so 32-byte sectors
  would give the same counts.

A real L2 is set associative with hashed sets, split in two partitions, and
not exactly LRU: read its figures as the schedule's reuse distance measured
in cache sizes. ``python -m bench.l2_model --help`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from bench import workloads as W
from bench.fused_protocol import make_plan
from lars.kernels.triton import plan as P

LINE = 128  # bytes per cache line
MB = 1 << 20  # bytes per MiB (the --l2-mb unit)


class LRU:
    """A fully associative, write-back, write-allocate (no fetch) LRU cache of ``capacity`` bytes.

    Entries have sizes (a unit of several lines); the least recently used
    ones are evicted until the rest fit.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[int, list] = OrderedDict()  # key -> [bytes, dirty]
        self.read_bytes = 0  # fetched from DRAM
        self.write_bytes = 0  # written back to DRAM
        self.hits = 0
        self.misses = 0

    def access(self, key: int, size: int, write: bool, evict_first: bool = False) -> bool:
        """Reads or writes the ``size``-byte unit ``key``; True on a hit.

        With ``evict_first`` the unit becomes the least recently used one (the
        next to go), as a last use marked with an eviction hint.
        """
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key, last=not evict_first)
            if write:
                entry[1] = True
            self.hits += 1
            return True
        self.misses += 1
        if not write:
            self.read_bytes += size
        self.entries[key] = [size, write]
        if evict_first:
            self.entries.move_to_end(key, last=False)
        self.used += size
        while self.used > self.capacity:
            _, (evicted, dirty) = self.entries.popitem(last=False)
            self.used -= evicted
            if dirty:
                self.write_bytes += evicted
        return False

    def flush(self) -> None:
        """Writes back every dirty unit (the data reaches DRAM eventually)."""
        for entry in self.entries.values():
            if entry[1]:
                self.write_bytes += entry[0]
                entry[1] = False


@dataclasses.dataclass(frozen=True)
class Result:
    """DRAM traffic the model predicts for one step.

    Attributes:
      params: Parameters of the step.
      read_bytes: Bytes fetched from DRAM.
      write_bytes: Bytes written back to DRAM.
      compulsory_bytes: Every byte the step reads, once, plus every byte it
        writes, once: the floor (20 B/param in place, fp32).
      time: When the last item finished, in units of one program's fp32
        vector load (a proxy for time, for comparing schedules).
      spin_fraction: Share of the programs' time spent spinning.
    """

    params: int
    read_bytes: int
    write_bytes: int
    compulsory_bytes: int
    time: float
    spin_fraction: float

    @property
    def bytes_per_param(self) -> float:
        return (self.read_bytes + self.write_bytes) / self.params

    @property
    def floor_per_param(self) -> float:
        return self.compulsory_bytes / self.params


class _Arrays:
    """Cache keys and unit sizes of each leaf's arrays: w, g, v, and the update if not in place."""

    _ROLES: ClassVar[dict[str, int]] = {"w": 0, "g": 1, "v": 2, "update": 3}

    def __init__(self, plan: P.StepPlan, in_place: bool, unit: str, evict_first: bool) -> None:
        if unit not in ("step", "line"):
            raise ValueError(f"unit must be 'step' or 'line', got {unit!r}")
        self.unit = unit
        self.evict_first = evict_first
        self.in_place = in_place
        self.block = plan.tuning.block
        self.chunk = plan.tuning.chunk
        self.leaves = plan.leaves

    def units(self, leaf: int, role: str, first: int, count: int) -> list[tuple[int, int]]:
        """(key, bytes) of the units elements [first, first + count) of one array occupy.

        ``role`` is "w", "g", "v" or "out" (the params in place, else the update).
        """
        spec = self.leaves[leaf]
        if role == "out":
            role = "w" if self.in_place else "update"
        dtype = {"g": spec.grad_dtype, "v": spec.momentum_dtype}.get(role, spec.param_dtype)
        size = np.dtype(dtype).itemsize
        array = 4 * leaf + self._ROLES[role]
        lo, hi = first * size, (first + count) * size
        if self.unit == "step":
            step = self.block * size
            return [((array << 40) | (lo // step), -(-(hi - lo) // LINE) * LINE)]
        return [((array << 40) | line, LINE) for line in range(lo // LINE, -(-hi // LINE))]


def _item_steps(row: np.ndarray, leaf: int, arrays: _Arrays, decay: bool) -> list[list[tuple]]:
    """Per vector step of one item, its accesses (key, bytes, write, evict first), in order.

    An update's accesses are each unit's last use: with ``arrays.evict_first``
    they carry the hint.
    """
    kind, chunk, length = row[P.COL_KIND], int(row[P.COL_CHUNK]), int(row[P.COL_LENGTH])
    base = chunk * arrays.chunk
    n_steps = arrays.chunk // arrays.block
    counts = [max(0, min(arrays.block, length - k * arrays.block)) for k in range(n_steps)]
    phases = []
    if kind != P.KIND_UPDATE:
        phases.append(([("g", False), ("w", False)], False))
    if kind != P.KIND_SUMS:
        reads = ("g", "v", "w") if arrays.in_place or decay else ("g", "v")
        accesses = [(r, False) for r in reads] + [("out", True), ("v", True)]
        phases.append((accesses, arrays.evict_first))
    steps: list[list[tuple]] = []
    for accesses, hint in phases:
        for k, n in enumerate(counts):
            first = base + k * arrays.block
            step = []
            for role, write in accesses if n else ():
                step += [(key, b, write, hint) for key, b in arrays.units(leaf, role, first, n)]
            steps.append(step)
    return steps


def simulate(
    plan: P.StepPlan,
    *,
    l2_bytes: int,
    resident: int,
    in_place: bool = True,
    unit: str = "step",
    seed: int = 0,
    jitter: float = 0.0,
    evict_first: bool = False,
) -> Result:
    """Replays the fused launches of ``plan`` through an LRU of ``l2_bytes``.

    Time is simulated event by event: a program's vector step takes time
    proportional to the bytes it moves (a masked-off step a tenth of a full
    fp32 load), so that programs streaming more fall behind as they would in
    a memory-bound kernel; a program with nothing to do is parked until the
    layer it waits for is ready. ``seed`` draws the programs' start times
    within the first step (the order they claim in and, from there, break
    ties) and, with ``jitter``, each step's time: its nominal time times a
    factor drawn uniformly from [1 - jitter, 1 + jitter] (programs that do
    not move in lockstep).

    Args:
      plan: The step's plan (its fused launches run one after the other, the
        cache carried over).
      l2_bytes: Cache capacity.
      resident: Programs running at once (SMs x programs per SM).
      in_place: The params are written over (else the update goes to a new
        array and w is read by the update only where decay applies).
      unit: "step" or "line" (see the module docstring).
      seed: See above.
      jitter: See above; in [0, 1).
      evict_first: The update's loads and stores (each unit's last use) are
        marked to be evicted first (Triton's ``eviction_policy="evict_first"``),
        modelled as making them least recently used.
    """
    if resident < 1:
        raise ValueError(f"resident must be >= 1, got {resident}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    arrays = _Arrays(plan, in_place, unit, evict_first)
    cache = LRU(l2_bytes)
    rng = np.random.default_rng(seed)
    unit_cost = arrays.block * 4  # bytes of one fp32 vector load: one time unit
    now = spin = busy = 0.0
    compulsory: dict[int, int] = {}
    for launch in plan.launches(P.FUSED):
        table = launch.table
        leaves = launch.leaves
        kinds, slots, trusts = table[:, P.COL_KIND], table[:, P.COL_SLOT], table[:, P.COL_TRUST]
        sums_left = np.bincount(slots[kinds == P.KIND_SUMS], minlength=len(leaves))
        parked: dict[int, list[tuple[float, int]]] = {}  # slot -> (since, program)
        counter = 0
        start = now
        # Per program: [row, steps, next step]; the heap holds (time, program).
        programs = [[-1, None, 0] for _ in range(min(resident, len(table)))]
        heap = [(start + float(t), i) for i, t in enumerate(rng.random(len(programs)))]
        heapq.heapify(heap)
        while heap:
            now, i = heapq.heappop(heap)
            prog = programs[i]
            if prog[0] < 0:
                if counter == len(table):
                    continue  # nothing left to claim: the program exits
                leaf = leaves[slots[counter]]
                steps = _item_steps(table[counter], leaf, arrays, plan.leaves[leaf].decay)
                prog[:] = [counter, steps, 0]
                counter += 1
            row = prog[0]
            slot = int(slots[row])
            if kinds[row] == P.KIND_UPDATE and trusts[row] and sums_left[slot]:
                parked.setdefault(slot, []).append((now, i))
                continue
            moved = 0
            for key, size, write, hint in prog[1][prog[2]]:
                cache.access(key, size, write, hint)
                compulsory.setdefault(~key if write else key, size)
                moved += size
            cost = max(0.1, moved / unit_cost)
            if jitter:
                cost *= 1.0 + jitter * (2.0 * rng.random() - 1.0)
            busy += cost
            prog[2] += 1
            if prog[2] == len(prog[1]):
                if kinds[row] == P.KIND_SUMS:
                    sums_left[slot] -= 1
                    if not sums_left[slot]:
                        for since, j in parked.pop(slot, ()):
                            spin += now + cost - since
                            heapq.heappush(heap, (now + cost, j))
                prog[:] = [-1, None, 0]
            heapq.heappush(heap, (now + cost, i))
        if parked:
            raise RuntimeError(f"programs still waiting on slots {sorted(parked)}")
    cache.flush()
    params = sum(leaf.size for leaf in plan.leaves)
    return Result(
        params=params,
        read_bytes=cache.read_bytes,
        write_bytes=cache.write_bytes,
        compulsory_bytes=sum(compulsory.values()),
        time=now,
        spin_fraction=spin / max(1.0, spin + busy),
    )


# --------------------------------------------------------------------------
# The command line.

_WORKLOADS = {w.name: w for w in (W.RESNET50, W.TRANSFORMER, W.sweep_workload(64_000_000))}
_GRADS = {"fp32": "float32", "bf16": "bfloat16"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.l2_model",
        description="Predicted DRAM bytes per parameter of the fused Triton step (an LRU model "
        "of the L2, not a measurement).",
    )
    p.add_argument("--l2-mb", type=_floats, default=[60.0], help="L2 sizes in MiB (H200: 60)")
    p.add_argument(
        "--lookahead", type=_ints, default=[P.LOOKAHEAD], help="lookahead values, e.g. 0,64,256"
    )
    p.add_argument(
        "--workload",
        default="resnet50",
        help=f"comma-separated, from {', '.join(_WORKLOADS)}",
    )
    p.add_argument("--grads", default="fp32", help="fp32, bf16 or both (fp32,bf16)")
    p.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H200: 132)")
    p.add_argument(
        "--blocks-per-sm",
        type=_ints,
        default=[4],
        help="resident programs per SM, e.g. 2,4,16 (4: 128 registers per thread at 4 warps)",
    )
    p.add_argument(
        "--mask",
        choices=("all", "no-1d"),
        default="all",
        help="leaves with trust ratio and decay: all, or all but 1-D ones",
    )
    p.add_argument("--not-in-place", action="store_true", help="write updates, not new params")
    p.add_argument("--unit", choices=("step", "line"), default="step", help="cache unit")
    p.add_argument(
        "--evict-first",
        action=argparse.BooleanOptionalAction,
        default=P.EVICT_FIRST,
        help="the update's loads and stores carry an evict-first hint (default: as the "
        "backend's default tuning)",
    )
    p.add_argument("--chunk", type=int, default=P.CHUNK, help="elements per item")
    p.add_argument("--seed", type=int, default=0, help="start times (and jitter) of the programs")
    p.add_argument(
        "--jitter", type=float, default=0.0, help="each step's time varies by up to this fraction"
    )
    return p


def rows(args: argparse.Namespace) -> list[dict]:
    """One result row per combination of the arguments."""
    names = [n.strip() for n in args.workload.split(",") if n.strip()]
    unknown = [n for n in names if n not in _WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(_WORKLOADS)}")
    grads = [g.strip() for g in args.grads.split(",") if g.strip()]
    if any(g not in _GRADS for g in grads):
        raise ValueError(f"--grads takes fp32 and bf16, got {args.grads!r}")
    out = []
    for name in names:
        shapes = _WORKLOADS[name].shapes
        mask = [len(s) > 1 or args.mask == "all" for s in shapes]
        for grad in grads:
            for lookahead in args.lookahead:
                plan = make_plan(
                    shapes,
                    grad_dtype=_GRADS[grad],
                    trust=mask,
                    decay=mask,
                    write_params=not args.not_in_place,
                    lookahead=lookahead,
                    chunk=args.chunk,
                )
                for per_sm in args.blocks_per_sm:
                    for mb in args.l2_mb:
                        r = simulate(
                            plan,
                            l2_bytes=int(mb * MB),
                            resident=args.sms * per_sm,
                            in_place=not args.not_in_place,
                            unit=args.unit,
                            seed=args.seed,
                            jitter=args.jitter,
                            evict_first=args.evict_first,
                        )
                        out.append(
                            dict(
                                workload=name,
                                grads=grad,
                                lookahead=lookahead,
                                resident=args.sms * per_sm,
                                l2_mb=mb,
                                result=r,
                            )
                        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        table = rows(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("An LRU model of the L2 (not a measurement): predicted DRAM bytes per parameter.")
    hints = "on" if args.evict_first else "off"
    print(f"CHUNK {args.chunk}, evict-first hints on the update {hints}.")
    head = (
        "workload",
        "grads",
        "lookahead",
        "resident",
        "L2 MiB",
        "B/param",
        "floor",
        "spin %",
        "time",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in table:
        r = row["result"]
        cells = (
            row["workload"],
            row["grads"],
            row["lookahead"],
            row["resident"],
            f"{row['l2_mb']:g}",
            f"{r.bytes_per_param:.2f}",
            f"{r.floor_per_param:.2f}",
            f"{100 * r.spin_fraction:.1f}",
            f"{r.time:.0f}",
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
