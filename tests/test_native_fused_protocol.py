"""The CUDA handler's fused launch (backend option ``fused``): its claim protocol.

``bench.native_fused_protocol`` runs the protocol of
``kernels/native/lars_cuda_fused.cuh`` one memory operation at a time with
random schedules, over real trees (ResNet-50's chunk counts at the two
launches' ``kGpuChunk`` and at the fused launch's default chunk) and random
ones, from one block to the 528 an H200 holds (132
SMs, 4 blocks each). The kernel itself runs on the CPU in
``bench/cuda_emulation`` (``tests/test_cuda_emulate.py``), with blocks one after
another; these tests cover what that cannot: blocks claiming at once. The
negative controls are protocols one rule short, which the model must catch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree
    sys.path.insert(0, str(ROOT))

from bench import native_fused_protocol as M  # noqa: E402
from bench import workloads  # noqa: E402
from lars.kernels.native import ffi  # noqa: E402


def resnet50_counts(chunk: int | None = None) -> list[int]:
    return M.chunk_counts([math.prod(s) for s in workloads.RESNET50.shapes], chunk)


def test_chunk_counts_follow_the_handler():
    assert M.gpu_chunk() == 16384
    assert M.chunk_counts([0, 1, 16384, 16385, 40003]) == [1, 1, 1, 2, 3]
    counts = resnet50_counts()
    assert len(counts) == 161
    assert sum(counts) == 1667 and max(counts) == 144  # 512 x 512 x 3 x 3 kernels


@pytest.mark.parametrize(
    ("resident", "lookahead"), [(1, 1), (3, 1), (16, 4), (64, 16), (528, 128), (528, 1)]
)
def test_resnet50_schedules_finish_in_order(resident, lookahead):
    counts = resnet50_counts()
    _finish_in_order(counts, resident, lookahead)


def test_resnet50_at_the_fused_default_geometry():
    """Chunks of ffi.FUSED_CHUNK elements, lookahead ffi.FUSED_LOOKAHEAD, 528 blocks."""
    counts = resnet50_counts(ffi.FUSED_CHUNK)
    assert ffi.FUSED_CHUNK == 4096 and sum(counts) == 6334  # 6,226 whole chunks, 108 partial
    _finish_in_order(counts, 528, ffi.FUSED_LOOKAHEAD)


def _finish_in_order(counts: list[int], resident: int, lookahead: int) -> None:
    for seed in range(2):
        out = M.simulate(counts, lookahead, resident, seed=seed)
        assert not out.deadlock and out.errors == [], (seed, out.errors[:3])
        # The window is overrun by at most the blocks claiming at once.
        assert out.max_overrun <= resident


def test_random_trees_and_grids():
    rng = np.random.default_rng(7)
    for seed in range(40):
        counts = [int(c) for c in rng.integers(1, 12, size=int(rng.integers(1, 9)))]
        resident = int(rng.integers(1, 10))
        grid = int(rng.integers(1, 2 * sum(counts) + 2))  # also more blocks than fit
        lookahead = int(rng.integers(1, 6))
        out = M.simulate(counts, lookahead, resident, grid=grid, seed=seed)
        assert not out.deadlock and out.errors == [], (counts, resident, grid, out.errors[:3])


def test_a_small_lookahead_keeps_the_sums_near_the_updates():
    """With one resident block the window is exact: never past u's leaf or u + lookahead."""
    out = M.simulate(resnet50_counts(), 4, 1, seed=3)
    assert out.errors == [] and out.max_overrun <= 0


def test_negative_control_a_window_without_the_leaf_deadlocks():
    """Without "s inside u's leaf", a leaf longer than the lookahead never gets its ratio."""
    out = M.simulate([20, 3], 4, 8, seed=0, window_covers_leaf=False)
    assert out.deadlock


def test_negative_control_claiming_unready_updates_deadlocks():
    """Updates claimed in order and waited on afterwards can hold every block."""
    out = M.simulate([6, 6], 2, 2, seed=0, wait_for_ready=True)
    assert out.deadlock


def test_negative_control_stale_tickets_are_caught():
    out = M.simulate([3, 1, 5], 2, 4, seed=0, tickets_zeroed=False)
    assert out.deadlock or out.errors
