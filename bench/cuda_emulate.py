"""Runs the CUDA handler's kernels on the CPU and checks them: ``make cuda-emulate``.

``python -m bench.cuda_emulate`` cuts the kernels out of
``kernels/native/lars_cuda.cu`` (from ``constexpr int kThreads`` to the
handler), with at most 3 leaves per launch, into
``build/cuda-emulation/lars_cuda_kernels.inc``; compiles
``bench/cuda_emulation/check.cc`` with it (g++ or clang++, C++20, the CUDA
toolkit's headers for ``cuda_bf16.h``/``cuda_fp16.h``); runs it. It prints
``OK ...`` and exits with 0 when every check passed (``check.cc`` says which).

This checks the kernels' indexing, vector groups, reductions, tickets and
arithmetic without a GPU; it cannot show what depends on blocks running
concurrently or on the GPU's memory model (``bench.gpu_check`` on a GPU does).

``--sanitize`` chooses how the check is built (``SANITIZE``):

* ``address`` (the default): AddressSanitizer and UndefinedBehaviorSanitizer.
  The buffers end where their allocations end, so that a kernel reading or
  writing one element past a leaf, at any size or alignment checked, stops
  the run with the access's stack: the CPU's stand-in for
  ``compute-sanitizer --tool memcheck``.
* ``thread``: ThreadSanitizer, on the quick configurations (``check quick``:
  float32 and bfloat16 in place, with and without the global-norm clip; all
  of them take TSan well over 15 minutes with a block's 256 threads). A
  block's threads are real threads meeting at barriers, so a shared-memory
  access that a missing ``__syncthreads`` leaves unordered is reported: the
  stand-in for ``--tool racecheck`` within a block (blocks run one after
  another here).
* ``none``: a plain build.

``--concurrent`` runs every block of a launch at once, each a host thread
(``kThreads`` set to 1, so a block is one thread and its shared memory that
thread's): the fused launch's claims, windows and waits, and the sums'
last-block election, in the kernels' own code with blocks racing (the claim
protocol's model, ``bench/native_fused_protocol.py``, covers the schedules).
The host's memory model is stronger than the GPU's: what it cannot show is
an ordering that only the GPU's weaker one breaks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kernels" / "native" / "lars_cuda.cu"
OUT = ROOT / "build" / "cuda-emulation"
MAX_LEAVES = 3
# The sanitizers' flags, and the check's arguments under each: every error
# stops the run (no recovery; TSAN_OPTIONS halt_on_error).
_DEBUG = ("-fno-omit-frame-pointer", "-g")
SANITIZE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "address": (("-fsanitize=address,undefined", "-fno-sanitize-recover=all", *_DEBUG), ()),
    "thread": (("-fsanitize=thread", "-Wno-tsan", *_DEBUG), ("quick",)),
    "none": ((), ()),
}


def kernels_source(text: str, threads: int | None = None) -> str:
    """The kernels part of ``lars_cuda.cu``, with ``kMaxLeaves`` set to ``MAX_LEAVES``
    (and ``kThreads``, a block's threads, to ``threads`` when given).

    Raises:
      ValueError: if the markers, the ``kMaxLeaves`` or the ``kThreads`` line
        are not found.
    """
    start, end = text.find("constexpr int kThreads"), text.find("// --- handler")
    if start < 0 or end < start:
        raise ValueError("lars_cuda.cu: no 'constexpr int kThreads' ... '// --- handler' section")
    part = text[start:end]
    values = {"kMaxLeaves": MAX_LEAVES, **({"kThreads": threads} if threads else {})}
    for name, value in values.items():
        part, n = re.subn(rf"constexpr int {name} = \d+;", f"constexpr int {name} = {value};", part)
        if n != 1:
            raise ValueError(f"lars_cuda.cu: no 'constexpr int {name} = N;' line")
    return part


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (beside nvcc, or $CUDA_HOME), if any."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_bf16.h").exists()), None)


def cxx_compiler() -> str | None:
    """The C++ compiler: $CXX (else g++), or clang++; None if there is none."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def build(
    kernels: str, out: Path, sanitize: str = "address", concurrent: bool = False
) -> Path | None:
    """Compiles ``check.cc`` with ``kernels`` (a :func:`kernels_source` text) in ``out``.

    ``concurrent``: a launch's blocks run at once, one host thread each
    (``kernels`` must have ``threads=1``). Returns the executable, or None
    when the compiler failed (its errors are printed). Raises RuntimeError
    without a compiler or the CUDA headers.
    """
    include = cuda_include()
    compiler = cxx_compiler()
    if include is None or compiler is None:
        raise RuntimeError("needs a C++20 compiler and the CUDA toolkit's headers (cuda_bf16.h)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lars_cuda_kernels.inc").write_text(kernels)
    exe = out / "check"
    here = ROOT / "bench" / "cuda_emulation"
    cmd = [compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", f"-I{include}"]
    cmd += list(SANITIZE[sanitize][0])
    cmd += ["-DLARS_EMULATE_CONCURRENT_BLOCKS"] if concurrent else []
    cmd += [f"-I{out}", f"-I{here}", f"-I{SOURCE.parent}", str(here / "check.cc"), "-o", str(exe)]
    return exe if subprocess.run(cmd).returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    """Builds and runs the check; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_emulate", description=__doc__)
    parser.add_argument("--sanitize", choices=sorted(SANITIZE), default="address")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="blocks of one thread, all of a launch's at once (not with --sanitize thread)",
    )
    args = parser.parse_args(argv)
    if args.concurrent and args.sanitize == "thread":
        parser.error("--concurrent: the kernels' volatile loads of flags are races to TSan")
    out = OUT / "concurrent" if args.concurrent else OUT
    kernels = kernels_source(SOURCE.read_text(), threads=1 if args.concurrent else None)
    try:
        exe = build(kernels, out, sanitize=args.sanitize, concurrent=args.concurrent)
    except RuntimeError as e:
        print(e)
        return 2
    if exe is None:
        return 1
    print("sanitizer:", args.sanitize, "(concurrent blocks)" if args.concurrent else "", flush=True)
    return subprocess.run([str(exe), *SANITIZE[args.sanitize][1]], env=run_env()).returncode


def run_env() -> dict[str, str]:
    """The check's environment: ThreadSanitizer stops at its first report."""
    return dict(os.environ, TSAN_OPTIONS="halt_on_error=1 " + os.environ.get("TSAN_OPTIONS", ""))


if __name__ == "__main__":
    sys.exit(main())
