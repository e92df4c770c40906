"""Loads the native libraries and registers their XLA FFI targets, once.

``lib/`` beside this file holds ``liblars_native_cpu`` (the CPU handler,
``lars_cpu.cc``) and, when a CUDA compiler was found at build time,
``liblars_native_cuda`` (``lars_cuda.cu``); the top-level CMakeLists.txt
builds them when the package is installed (``pip install .``, a wheel), and
into the source tree's ``kernels/native/lib`` for an editable install
(``pip install -e .``, what ``make`` does) or a plain CMake build, where the
checkout's ``lars.kernels`` is loaded from. ``lib/build-info.txt`` says what
was built. :func:`load` registers what is there under
:data:`TARGET` and remembers why anything is missing; without a library the
package still imports and ``BACKEND.unavailable`` says why.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path
from typing import Any

import jax

TARGET = "lars_native_step"
LIB_DIR = Path(__file__).resolve().parent / "lib"
_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"
CPU_LIBRARY = "liblars_native_cpu" + _SUFFIX
CUDA_LIBRARY = "liblars_native_cuda" + _SUFFIX

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _open(path: Path, symbol: str, platform: str, missing: str) -> tuple[Any, str | None]:
    """(the library, None), or (None, why not): loads ``path`` and registers ``symbol``."""
    if not path.exists():
        return None, missing
    try:
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, symbol)), platform)
    except (OSError, AttributeError) as e:
        return None, f"the {path.name} library failed to load: {e}"
    return lib, None


def load() -> dict[str, Any]:
    """Loads the libraries once and registers the FFI targets; returns the state.

    The state holds ``cpu`` (the CPU library or None), ``cuda`` (likewise) and
    ``cpu_error`` / ``cuda_error`` (why a library is missing).
    """
    with _lock:
        if _state:
            return _state
        cpu, cpu_error = _open(
            LIB_DIR / CPU_LIBRARY,
            "LarsNativeStepCpu",
            "cpu",
            f"the native library is not built ({CPU_LIBRARY} is missing from {LIB_DIR}); "
            "install the package with pip (`pip install .`, or `pip install -e .` in a "
            "checkout), or build it with `cmake -S . -B build/native && cmake --build "
            "build/native`",
        )
        if cpu is not None:
            cpu.LarsNativeCpuIsa.restype = ctypes.c_char_p
            cpu.LarsNativeSetCpuIsa.argtypes = [ctypes.c_char_p]
            cpu.LarsNativeSetCpuIsa.restype = ctypes.c_int
            cpu.LarsNativeLastStepThreads.restype = None
            cpu.LarsNativeLastStepNanos.restype = ctypes.c_int64
            cpu.LarsNativeLastStepStartNanos.restype = ctypes.c_int64
            cpu.LarsNativeCpuTune.argtypes = [ctypes.c_char_p, ctypes.c_int64]
            cpu.LarsNativeCpuTune.restype = ctypes.c_int
            cpu.LarsNativeCpuCacheBytes.restype = ctypes.c_int64
        cuda, cuda_error = _open(
            LIB_DIR / CUDA_LIBRARY,
            "LarsNativeStepCuda",
            "CUDA",
            "the CUDA handler is not built (no CUDA compiler was found, or "
            "LARS_NATIVE_CUDA=OFF, when the native library was built; see "
            f"{LIB_DIR / 'build-info.txt'})",
        )
        _state.update(cpu=cpu, cuda=cuda, cpu_error=cpu_error, cuda_error=cuda_error)
        return _state


def unavailable(platform: str) -> str | None:
    """None when a handler for ``platform`` ("cpu", "gpu", ...) is loaded, else why not."""
    state = load()
    if platform == "cpu":
        return None if state["cpu"] is not None else state["cpu_error"]
    if platform in ("gpu", "cuda"):
        return None if state["cuda"] is not None else state["cuda_error"]
    return f"the native backend has no handler for the {platform!r} platform"


def require_any() -> None:
    """Raises RuntimeError when neither handler is loaded."""
    state = load()
    if state["cpu"] is None and state["cuda"] is None:
        raise RuntimeError(f"native backend unavailable: {state['cpu_error']}")


def cpu() -> Any:
    """The CPU library (for its settings functions); RuntimeError when it is missing."""
    state = load()
    if state["cpu"] is None:
        raise RuntimeError(f"native backend unavailable: {state['cpu_error']}")
    return state["cpu"]
