"""A model of the CUDA handler's FusedKernel claim protocol (backend option ``fused``).

``kernels/native/lars_cuda_fused.cuh`` runs a launch's sums items S_0..S_{N-1}
and update items U_0..U_{N-1} (one of each per block-sized chunk, in leaf
order) on a persistent grid. Thread 0 of a block claims, one memory
operation at a time:

1. reads ``u_next`` (u) and ``s_next`` (s), in that order; u == N: the block
   exits;
2. reads ``ready[leaf(u)]``; set: compare-and-swap ``u_next`` from u to u + 1,
   success gives U_u, failure goes back to 1;
3. else, if s < N and (s inside u's leaf or s < u + lookahead):
   ``atomicAdd(s_next, 1)``, a result below N gives S_that, else back to 1;
   otherwise the block waits (back to 1).

A sums item writes its partials and takes its leaf's ticket; the leaf's
last ticket adds the partials and sets ``ready``. An update item needs its
leaf's ratio.

This module runs that protocol over the chunk counts of real trees, one
operation of one block at a time, with at most ``resident`` blocks on the
device (a block of a larger grid starts when one exits) and a random
scheduler. Memory is sequentially consistent, as the kernel's fences make
it for these accesses. A block that decided to wait is not scheduled again
until memory has changed since its reads (its next try would decide the
same), so the launch *deadlocks* when every resident block waits.

:func:`simulate` checks, for one schedule: no deadlock; every item runs
exactly once; an update runs only after all of its leaf's sums and the
ratio; a claimed sums item lies inside the window (u's leaf or u +
lookahead) overrun by at most the blocks claiming at once. The
``window_covers_leaf``, ``wait_for_ready`` and ``tickets_zeroed`` arguments
exist for negative controls.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "native" / "lars_cuda.cu"


def gpu_chunk() -> int:
    """``kGpuChunk`` of the CUDA handler (elements per block-sized chunk)."""
    found = re.search(r"constexpr int64_t kGpuChunk = (\d+);", SOURCE.read_text())
    if found is None:
        raise ValueError(f"{SOURCE.name}: no 'constexpr int64_t kGpuChunk = N;' line")
    return int(found.group(1))


def chunk_counts(sizes: Sequence[int], chunk: int | None = None) -> list[int]:
    """Chunks (items of each kind) per leaf, as the handler counts them (an empty leaf: 1)."""
    chunk = gpu_chunk() if chunk is None else chunk
    return [max(1, math.ceil(n / chunk)) for n in sizes]


@dataclasses.dataclass
class Outcome:
    """What one schedule did.

    Attributes:
      deadlock: Every resident block waited with work left.
      errors: Broken invariants (empty when the schedule is correct).
      steps: Memory operations run.
      max_overrun: The largest (claimed sums item - window end) seen.
    """

    deadlock: bool
    errors: list[str]
    steps: int
    max_overrun: int


def simulate(
    counts: Sequence[int],
    lookahead: int,
    resident: int,
    grid: int | None = None,
    seed: int = 0,
    *,
    window_covers_leaf: bool = True,
    wait_for_ready: bool = False,
    tickets_zeroed: bool = True,
    max_steps: int = 10_000_000,
) -> Outcome:
    """Runs one random schedule of one launch.

    Args:
      counts: Chunks per leaf (``chunk_counts``).
      lookahead: The kernel's ``lookahead`` (chunks).
      resident: Blocks on the device at once.
      grid: Blocks launched (default: min(items, resident), as the handler).
      seed: The scheduler's seed.
      window_covers_leaf: False drops "s inside u's leaf" from the window.
      wait_for_ready: True claims U_u without its leaf being ready and waits
        for it after (instead of claiming only ready updates).
      tickets_zeroed: False starts every ticket at 1 (stale counters).
      max_steps: A bound on the operations run.
    """
    rng = np.random.default_rng(seed)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(first[-1])
    leaf_of = np.repeat(np.arange(len(counts)), counts)
    grid = min(n, resident) if grid is None else grid
    u_next = s_next = 0
    ready = [False] * len(counts)
    tickets = [0 if tickets_zeroed else 1] * len(counts)
    sums_done = [0] * len(counts)
    ran_s, ran_u = [0] * n, [0] * n
    errors: list[str] = []
    version = 0  # memory writes so far: a waiting block tries again after one
    blocks: list[_Block] = []
    started = steps = 0
    max_overrun = -n

    def window_end(u: int) -> int:  # the first sums item outside the window
        leaf_end = int(first[leaf_of[min(u, n - 1)] + 1]) if window_covers_leaf else 0
        return max(leaf_end, u + lookahead)

    while started < min(grid, resident):
        blocks.append(_Block())
        started += 1
    waiting: list[_Block] = []  # blocks that wait for memory to change
    seen = version
    while (blocks or waiting) and steps < max_steps:
        if version != seen:
            blocks += waiting
            waiting.clear()
            seen = version
        if not blocks:
            return Outcome(True, errors, steps, max_overrun)
        k = int(rng.integers(len(blocks)))
        b = blocks[k]
        b.waits_at = -1
        steps += 1
        if b.phase == "read_u":
            b.u = u_next
            if b.u >= n:
                blocks[k] = blocks[-1]
                blocks.pop()
                if started < grid:
                    blocks.append(_Block())
                    started += 1
            else:
                b.read_at = version
                b.phase = "cas_u" if wait_for_ready else "read_s"
        elif b.phase == "read_s":  # issued with u's load: it may see a later s
            b.s = s_next
            b.phase = "read_ready"
        elif b.phase == "read_ready":
            if ready[leaf_of[b.u]]:
                b.phase = "cas_u"
            elif b.s < n and b.s < window_end(b.u):
                b.phase = "add_s"
            else:  # waits; tries again once memory changed since its reads
                b.phase, b.waits_at = "read_u", b.read_at
        elif b.phase == "cas_u":
            if u_next == b.u:
                u_next += 1
                version += 1
                b.item, b.phase = b.u, "wait_ready" if wait_for_ready else "update"
            else:
                b.phase = "read_u"
        elif b.phase == "wait_ready":
            if ready[leaf_of[b.item]]:
                b.phase = "update"
            else:
                b.waits_at = version
        elif b.phase == "add_s":
            mine, s_next, version = s_next, s_next + 1, version + 1
            if mine < n:
                max_overrun = max(max_overrun, mine + 1 - window_end(u_next))
                b.item, b.phase = mine, "sums"
            else:
                b.phase = "read_u"
        elif b.phase == "sums":
            leaf = leaf_of[b.item]
            ran_s[b.item] += 1
            sums_done[leaf] += 1
            tickets[leaf] += 1
            version += 1
            b.phase = "publish" if tickets[leaf] == counts[leaf] else "read_u"
        elif b.phase == "publish":
            leaf = leaf_of[b.item]
            if sums_done[leaf] != counts[leaf]:
                errors.append(f"leaf {leaf}: ratio before all of its {counts[leaf]} sums items")
            ready[leaf] = True
            version += 1
            b.phase = "read_u"
        elif b.phase == "update":
            leaf = leaf_of[b.item]
            if not ready[leaf] or sums_done[leaf] != counts[leaf]:
                errors.append(f"update item {b.item} of leaf {leaf} before its ratio")
            ran_u[b.item] += 1
            b.phase = "read_u"
        if b.waits_at == version:
            blocks[k] = blocks[-1]
            blocks.pop()
            waiting.append(b)
    if blocks or waiting:
        errors.append(f"did not finish in {max_steps} steps")
    for name, ran in (("sums", ran_s), ("update", ran_u)):
        bad = [i for i, c in enumerate(ran) if c != 1]
        if bad:
            errors.append(f"{len(bad)} {name} items not run exactly once (first: {bad[0]})")
    return Outcome(False, errors, steps, max_overrun)


@dataclasses.dataclass
class _Block:
    """A resident block: its next operation and what its thread 0 holds."""

    phase: str = "read_u"
    u: int = 0  # u_next as it read it
    s: int = 0  # s_next as it read it
    read_at: int = 0  # the memory version when it read u
    item: int = 0  # the item it claimed
    waits_at: int = -1  # the memory version at which it decided to wait
