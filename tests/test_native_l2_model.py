"""The L2 model of the native CUDA step (``bench.native_l2_model``).

Its figures are a model's, not measurements; these tests hold it to what it
must give whatever the schedule (the compulsory bytes with a cache that holds
everything; both reads from DRAM with one too small for a chunk) and to the
two effects the fused launch's defaults rest on: the sums running ahead of
the updates by a window that fits the L2 bring the step to 20 B/param, and
the chunks in flight count against the L2 as much as the window.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree
    sys.path.insert(0, str(ROOT))

from bench import native_l2_model as M  # noqa: E402
from bench import workloads  # noqa: E402
from lars.kernels.native import ffi  # noqa: E402

RESNET50 = [math.prod(s) for s in workloads.RESNET50.shapes]
MB = M.MB


def test_bounds_whatever_the_schedule():
    sizes = [5000, 70000, 1, 0, 33000]
    n = sum(sizes)
    for schedule in M.SCHEDULES:
        # A cache holding everything: each byte read once and written once.
        whole = M.simulate(sizes, schedule, 4, 8, 1 << 30, 4096)
        assert whole.dram_bytes == 20 * n, schedule
        # One too small for a vector step of one array: every read misses.
        tiny = M.simulate(sizes, schedule, 4, 8, 1024, 4096)
        assert tiny.dram_bytes == 28 * n, schedule


def test_two_launches_read_w_and_g_twice_on_resnet50():
    r = M.simulate(RESNET50, "two-launch", l2_bytes=60 * MB, chunk=16384)
    assert r.bytes_per_param == pytest.approx(28.0, abs=0.01)


def test_the_fused_default_geometry_reaches_the_floor_on_resnet50():
    r = M.simulate(RESNET50, "fused", ffi.FUSED_LOOKAHEAD, 528, 60 * MB, ffi.FUSED_CHUNK)
    assert r.bytes_per_param < 20.1
    assert r.wait_fraction < 0.1


def test_chunks_in_flight_count_against_the_l2():
    """The same window (2M elements) with 528 blocks of 16,384 elements overflows 60 MB."""
    big = M.simulate(RESNET50, "fused", 128, 528, 60 * MB, 16384)
    few = M.simulate(RESNET50, "fused", 128, 132, 60 * MB, 16384)
    assert big.bytes_per_param > 22.5
    assert few.bytes_per_param < 20.1


def test_rejects_an_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        M.simulate([10], "three-launch")
