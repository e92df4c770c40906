"""The CUDA handler's kernels run on the CPU (bench/cuda_emulate.py, ``make cuda-emulate``).

``bench.cuda_emulate`` cuts the kernels out of ``kernels/native/lars_cuda.cu``
(the element access they use is in ``lars_cuda_access.cuh``), compiles them
for the CPU with stand-ins for the CUDA built-ins and checks every dtype pair,
output mode and three option sets against float64 sums and a scalar reference
of the update, and the fused launch (``lars_cuda_fused.cuh``) against the two
launches' bits (``bench/cuda_emulation/check.cc``), built with AddressSanitizer
and UBSan (a negative control reads past a leaf and must be stopped), and
under ThreadSanitizer on its quick configurations (a negative control drops
a barrier and must be reported), and with every block of a launch running at
once (the fused launch's claims racing). It
needs a C++20 compiler and the CUDA toolkit's headers, not a GPU; without the
headers it cannot compile and the test says so.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree
    sys.path.insert(0, str(ROOT))

from bench import cuda_emulate  # noqa: E402

NEEDS_TOOLS = pytest.mark.skipif(
    cuda_emulate.cuda_include() is None or cuda_emulate.cxx_compiler() is None,
    reason="needs the CUDA toolkit's headers (cuda_bf16.h) and a C++20 compiler",
)


def test_the_kernels_are_cut_out_with_a_small_launch():
    part = cuda_emulate.kernels_source(cuda_emulate.SOURCE.read_text())
    assert part.startswith("constexpr int kThreads")
    assert f"constexpr int kMaxLeaves = {cuda_emulate.MAX_LEAVES};" in part
    assert "__global__ void UpdateKernel" in part and "XLA_FFI" not in part
    one = cuda_emulate.kernels_source(cuda_emulate.SOURCE.read_text(), threads=1)
    assert one.startswith("constexpr int kThreads = 1;")
    with pytest.raises(ValueError, match="kMaxLeaves"):
        cuda_emulate.kernels_source("constexpr int kThreads = 1;\n// --- handler")
    with pytest.raises(ValueError, match="handler"):
        cuda_emulate.kernels_source("no markers")


def _emulate(*args: str) -> tuple[str, str]:
    """Runs ``python -m bench.cuda_emulate ARGS``; (its stdout, all its output), passed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.cuda_emulate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    return done.stdout, output


@pytest.mark.slow
@NEEDS_TOOLS
def test_the_cuda_kernels_pass_their_checks_on_the_cpu():
    stdout, output = _emulate()
    found = re.search(
        r"^OK (\d+) configurations x 2 alignments, and fused at 2 lookaheads$", stdout, re.M
    )
    assert found and int(found.group(1)) >= 72, output[-8000:]
    # Built with AddressSanitizer and UBSan: an access past a buffer stops it.
    assert "sanitizer: address" in stdout, output[-8000:]


@NEEDS_TOOLS
def test_a_read_past_a_leaf_stops_the_sanitized_check(tmp_path: Path):
    """Negative control: the sums reading one element past each leaf's end."""
    source = cuda_emulate.kernels_source(cuda_emulate.SOURCE.read_text())
    exact = "const int64_t end = min(leaf.n, begin + t.chunk);"
    assert exact in source
    mutated = source.replace(exact, "const int64_t end = min(leaf.n + 1, begin + t.chunk);")
    exe = cuda_emulate.build(mutated, tmp_path)
    assert exe is not None
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-4000:]


def _run_thread_sanitized(kernels: str, out: Path) -> subprocess.CompletedProcess:
    exe = cuda_emulate.build(kernels, out, sanitize="thread")
    assert exe is not None
    return subprocess.run(
        [str(exe), "quick"], capture_output=True, text=True, timeout=900, env=cuda_emulate.run_env()
    )


@pytest.mark.slow
@NEEDS_TOOLS
def test_a_blocks_threads_share_memory_without_races(tmp_path: Path):
    """ThreadSanitizer on the quick configurations: no data race within a block."""
    done = _run_thread_sanitized(
        cuda_emulate.kernels_source(cuda_emulate.SOURCE.read_text()), tmp_path
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    assert "ThreadSanitizer" not in done.stderr
    assert re.search(r"^OK \d+ configurations", done.stdout, re.M), done.stdout[-2000:]


@NEEDS_TOOLS
def test_a_missing_barrier_is_a_race_thread_sanitizer_reports(tmp_path: Path):
    """Negative control: BlockSum without its last barrier (thread 0 then writes
    shared[0] for the next sum while the others may still read it)."""
    source = cuda_emulate.kernels_source(cuda_emulate.SOURCE.read_text())
    exact = "  const double total = shared[0];\n  __syncthreads();\n  return total;"
    assert exact in source
    mutated = source.replace(exact, "  const double total = shared[0];\n  return total;")
    done = _run_thread_sanitized(mutated, tmp_path)
    assert done.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in done.stderr, done.stderr[-4000:]


@pytest.mark.slow
@NEEDS_TOOLS
def test_the_fused_launch_on_concurrent_blocks_gives_the_two_launches_bits():
    """Every block of a launch at once, one host thread each: the fused launch's
    claims race (8 blocks, lookaheads 1, 3 and 1000 at 1024 elements a chunk,
    three runs each), under AddressSanitizer, against the two launches' bits."""
    stdout, output = _emulate("--concurrent")
    found = re.search(r"^OK (\d+) configurations, fused on 8 concurrent blocks", stdout, re.M)
    assert found and int(found.group(1)) >= 72, output[-8000:]
    assert "sanitizer: address (concurrent blocks)" in stdout
