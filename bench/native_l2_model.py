"""An LRU model of the GPU L2 under the native CUDA step: DRAM bytes per parameter.

A model, not a measurement (``bench.l2_model`` is its counterpart for the
fused Triton launch, and lends it its cache, ``LRU``). The CUDA handler
(``kernels/native/lars_cuda.cu``) reads each chunk's w and g for its sums and
again for its update; whether the second read hits L2 decides between about
20 and 28 bytes per float32 parameter in place. This module replays the
memory accesses of two schedules of the in-place fp32 step, with
``resident`` blocks running at once, each moving its chunk in vector steps
(``STEP`` elements: a 256-thread block's 16-byte accesses), the blocks'
steps interleaved in time (a step takes time in proportion to the bytes it
moves, the same rate for every block):

* ``two-launch``: ``SumsKernel`` then ``UpdateKernel``, blocks in index order
  (a block of the second launch starts once the first launch is done);
* ``fused``: ``FusedKernel``'s claims (``bench.native_fused_protocol``): an
  update when its leaf is ready, else a sums item inside the window (the
  next update's leaf, or ``lookahead`` chunks past it), else the block waits
  until a leaf becomes ready.

A sums step reads g and w; an update step reads g, v and w and writes w and
v. Reads that miss are fetched; writes allocate without a fetch and reach
DRAM once (write-back). Partial sums, ratios and counters (under 0.01
B/param) are left out. ``python -m bench.native_l2_model`` prints the
figures for ResNet-50's set.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import sys
from collections.abc import Sequence

import numpy as np

from bench import workloads as W
from bench.l2_model import LRU, MB
from bench.native_fused_protocol import chunk_counts, gpu_chunk

STEP = 1024  # elements per vector step: 256 threads x 4 float32
SCHEDULES = ("two-launch", "fused")


@dataclasses.dataclass(frozen=True)
class Result:
    """What the model predicts for one in-place fp32 step.

    Attributes:
      schedule: One of ``SCHEDULES``.
      lookahead: The fused launch's lookahead (chunks); 0 for the others.
      params: Parameters of the step.
      dram_bytes: Bytes fetched plus bytes written back.
      time: When the last item finished, in units of one block's 4-byte
        element access (a proxy for comparing schedules).
      wait_fraction: Share of the blocks' time spent waiting for work.
    """

    schedule: str
    lookahead: int
    params: int
    dram_bytes: int
    time: float
    wait_fraction: float

    @property
    def bytes_per_param(self) -> float:
        return self.dram_bytes / self.params


def simulate(
    sizes: Sequence[int],
    schedule: str,
    lookahead: int = 128,
    resident: int = 528,
    l2_bytes: int = 60 * MB,
    chunk: int | None = None,
) -> Result:
    """Replays one step's accesses through an LRU of ``l2_bytes``.

    Args:
      sizes: Elements per leaf (float32 params, grads and momentum).
      schedule: One of ``SCHEDULES``.
      lookahead: The fused launch's lookahead, in chunks.
      resident: Blocks running at once (an H200: 132 SMs x 4).
      l2_bytes: The cache's size.
      chunk: Elements per block-sized chunk (default: the handler's).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    chunk = gpu_chunk() if chunk is None else chunk
    counts = chunk_counts(sizes, chunk)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(first[-1])
    leaf_of = np.repeat(np.arange(len(sizes)), counts)
    cache = LRU(l2_bytes)
    s_next = u_next = 0
    sums_left = list(counts)
    ready = [False] * len(sizes)
    fused = schedule == "fused"

    def claim() -> int | None:
        """An item (s >= 0, or -1 - u), or None: wait (or done, when u_next == n)."""
        nonlocal s_next, u_next
        if u_next < n:
            u = u_next
            if ready[leaf_of[u]] if fused else s_next == n and not any(sums_left):
                u_next += 1
                return -1 - u
        if s_next < n:
            window = max(int(first[leaf_of[min(u_next, n - 1)] + 1]), u_next + lookahead)
            if not fused or s_next < window:
                s_next += 1
                return s_next - 1
        return None

    def steps(item: int) -> list[tuple[int, int]]:
        """(first element, elements) of each vector step of the item's chunk."""
        c = item if item >= 0 else -1 - item
        leaf = int(leaf_of[c])
        begin = (c - int(first[leaf])) * chunk
        end = min(sizes[leaf], begin + chunk)
        return [(leaf, i) for i in range(begin, end, STEP)] or [(leaf, -1)]

    # Blocks: heap of (time, id, item, remaining steps); parked blocks wait.
    heap: list[tuple[float, int, int, list]] = []
    parked: list[int] = []
    busy = waited = 0.0
    now = 0.0

    def start(block: int, at: float) -> None:
        item = claim()
        if item is None:
            if u_next < n:
                parked.append(block)
            return
        heapq.heappush(heap, (at, block, item, steps(item)))

    for b in range(min(resident, n)):  # the handler's grid
        start(b, 0.0)
    wait_since = {b: 0.0 for b in parked}
    while heap:
        now, block, item, todo = heapq.heappop(heap)
        leaf, i = todo.pop(0)
        elems = 0 if i < 0 else min(STEP, sizes[leaf] - i)
        unit = 4 * elems
        if elems:
            key = (leaf * 4) << 40 | i
            if item >= 0:  # sums: g, w
                cache.access(key + (1 << 40), unit, False)
                cache.access(key, unit, False)
            else:  # update: g, v, w read; w, v written
                cache.access(key + (1 << 40), unit, False)
                cache.access(key + (2 << 40), unit, False)
                cache.access(key, unit, False)
                cache.access(key, unit, True)
                cache.access(key + (2 << 40), unit, True)
        cost = max(1, elems) * (2 if item >= 0 else 5)
        busy += cost
        if todo:
            heapq.heappush(heap, (now + cost, block, item, todo))
            continue
        end = now + cost
        woke = False
        if item >= 0:
            sums_left[leaf] -= 1
            ready[leaf] = sums_left[leaf] == 0
            woke = ready[leaf]
        start(block, end)
        if block in parked:
            wait_since[block] = end
        if woke or (not fused and not any(sums_left)):
            again, parked[:] = list(parked), []
            for b in again:
                waited += end - wait_since.pop(b, end)
                start(b, end)
                if b in parked:
                    wait_since[b] = end
    cache.flush()
    for since in wait_since.values():
        waited += now - since
    return Result(
        schedule=schedule,
        lookahead=lookahead if fused else 0,
        params=int(sum(sizes)),
        dram_bytes=cache.read_bytes + cache.write_bytes,
        time=now,
        wait_fraction=waited / max(busy + waited, 1.0),
    )


# (chunk, lookahead, resident blocks) of the fused launch printed by ``main``:
# the handler's default (4096, 512) and what bench/gpu_check times beside it.
GEOMETRIES = (
    (16384, 64, 528),
    (16384, 128, 528),
    (16384, 256, 528),
    (8192, 256, 528),
    (4096, 512, 528),
    (4096, 1024, 528),
    (16384, 128, 132),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--l2-mb", type=float, default=60.0, help="the L2's size (H200: 60)")
    args = p.parse_args(argv)
    sizes = [math.prod(s) for s in W.RESNET50.shapes]
    l2 = int(args.l2_mb * MB)
    print(f"ResNet-50, fp32, in place; L2 {args.l2_mb:g} MB")
    head = ("schedule", "chunk", "lookahead", "blocks", "B/param", "waiting")
    print("{:11s} {:>6s} {:>9s} {:>6s} {:>8s} {:>8s}".format(*head))
    runs = [("two-launch", 16384, 0, 528)] + [("fused", *g) for g in GEOMETRIES]
    for schedule, chunk, lookahead, resident in runs:
        r = simulate(sizes, schedule, lookahead, resident, l2, chunk)
        print(
            f"{schedule:11s} {chunk:6d} {lookahead or '':>9} {resident:6d} "
            f"{r.bytes_per_param:8.2f} {r.wait_fraction:8.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
