"""The "native" backend: one XLA FFI custom call does the LARS step for all leaves.

``BACKEND`` implements ``lars.contract`` with the C++ handler (``lars_cpu.cc``)
and, where it was built, the CUDA handler (``lars_cuda.cu``);
:mod:`.library` loads them from ``lib/``, :mod:`.ffi` builds the call. Without
the library the package still imports and ``BACKEND.unavailable`` says why.
Design, numerics and measurements: ``docs/native.md``.

Features: on the CPU in place, ``skip_nonfinite`` and given trust ratios
(meshes and ``jax.shard_map``); on an NVIDIA GPU in place only. The
hyperparameters are compiled into the call, so they must be concrete numbers;
the learning rate is an operand.

Backend options (``backend_options=``):

* ``num_threads``: a non-negative int, how many threads the CPU handler uses
  (0: XLA's intra-op pool size). Default: :func:`get_num_threads` when the
  step is traced. Part of the compiled call; results do not depend on it.
* ``fused``: a bool, default False. True: the CUDA handler runs the sums and
  the updates in one launch (``lars_cuda_fused.cuh``), each update soon after
  its leaf's sums so that its second read of params and grads can come from
  L2; bitwise the two launches' results at the same chunk. Not yet timed on
  a GPU, hence not the default. The CPU handler's schedule already keeps a
  layer in cache; there it changes nothing.
* ``lookahead``, ``chunk``, ``blocks_per_sm``: with ``fused=True``, the
  launch's geometry: how many chunks the sums may run ahead of the next
  update beyond its leaf (an int in [1, 2**30]; default
  ``ffi.FUSED_LOOKAHEAD``, 512), the elements of a chunk (a multiple of 1024
  up to 2**20; default ``ffi.FUSED_CHUNK``, 4096; the sums' order follows
  the chunks, so the bits of the trust ratios do too), and at most how many
  blocks an SM runs (0, the default: as many as fit).

Process-wide CPU settings (read when a step runs; results never depend on
them): :func:`set_cpu_isa` (the instruction set of the loops) and
:func:`set_cpu_cache_bytes` (the cache size the earlier, lookahead schedule
counts on; the default schedule, where each worker updates the chunks of a
layer it summed, needs none).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import numpy as np

from lars import contract
from lars.kernels.native import ffi, library
from lars.kernels.native.ffi import get_num_threads, run, set_num_threads

__all__ = [
    "BACKEND",
    "cpu_cache_bytes",
    "cpu_isa",
    "get_num_threads",
    "last_step_seconds",
    "last_step_start_ns",
    "last_step_threads",
    "run",
    "set_cpu_cache_bytes",
    "set_cpu_isa",
    "set_num_threads",
]


def cpu_isa() -> str:
    """The instruction set the CPU loops use: "avx512", "avx2" or "base"."""
    return library.cpu().LarsNativeCpuIsa().decode().removeprefix("isa_")


def set_cpu_isa(name: str) -> None:
    """Forces the CPU loops of an instruction set ("avx512", "avx2" or "base").

    Raises:
      ValueError: if that set was not compiled or the processor lacks it.
    """
    if library.cpu().LarsNativeSetCpuIsa(name.encode()) != 0:
        raise ValueError(f"instruction set {name!r} is not available on this machine")


def last_step_threads() -> tuple[int, int]:
    """(threads used, work items run by pool threads) of the last CPU step."""
    threads, helper_items = ctypes.c_int64(), ctypes.c_int64()
    library.cpu().LarsNativeLastStepThreads(ctypes.byref(threads), ctypes.byref(helper_items))
    return threads.value, helper_items.value


def last_step_seconds() -> float:
    """Seconds the CPU handler ran in the last CPU step (0.0 before any)."""
    return library.cpu().LarsNativeLastStepNanos() * 1e-9


def last_step_start_ns() -> int:
    """When the CPU handler of the last CPU step started (0 before any), in
    nanoseconds of the monotonic clock: on Linux the clock of
    ``time.perf_counter_ns()``, so that a caller can split a step's time into
    before the handler, the handler and after it."""
    return int(library.cpu().LarsNativeLastStepStartNanos())


def cpu_cache_bytes() -> int:
    """The cache size, in bytes, the lookahead CPU schedule counts on (detected or set).

    The largest data cache of the first core read from the operating system
    when the library loads, unless set. The default schedule does not use it.
    """
    return int(library.cpu().LarsNativeCpuCacheBytes())


def set_cpu_cache_bytes(n: int | None) -> None:
    """Sets the cache size the lookahead CPU schedule counts on; None: detected.

    That schedule (the default before the shares one, kept for timing
    comparisons) queues a layer's update pass a little after its norm pass
    when its params, gradients and momentum fit in about three quarters of
    this size, else right behind it. The default schedule needs no cache size:
    each worker updates the chunks it summed, the last first, right after the
    layer's norms. Results depend on neither.

    Raises:
      ValueError: if ``n`` is not None or a non-negative int.
    """
    if n is None:
        value = -1
    elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be None or a non-negative int of bytes, got {n!r}")
    else:
        value = n
    if library.cpu().LarsNativeCpuTune(b"cache_bytes", value) != 0:
        raise ValueError(f"the native library refused cache size {n!r}")


def _unsupported(spec: contract.StepSpec, platform: str) -> str | None:
    traced = ffi.traced_hyperparameter(spec.config)
    if traced is not None:
        return traced
    if platform != "cpu" and spec.given_ratios:
        return "the CUDA handler takes no given trust ratios (sharded params)"
    if platform != "cpu" and spec.skip_nonfinite:
        return "the CUDA handler takes no finite flag (skip_nonfinite)"
    return None


def _features(platform: str) -> frozenset[contract.Feature]:
    if library.unavailable(platform) is not None:
        return frozenset()
    if platform == "cpu":
        return frozenset(
            {
                contract.Feature.IN_PLACE,
                contract.Feature.SKIP_NONFINITE,
                contract.Feature.GIVEN_RATIOS,
                contract.Feature.SHARD_MAP,
            }
        )
    return frozenset({contract.Feature.IN_PLACE})


_FUSED_OPTIONS = ("lookahead", "chunk", "blocks_per_sm")


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    known = ("num_threads", "fused", *_FUSED_OPTIONS)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"backend 'native' has no option(s) {unknown}; its options are {', '.join(known)}"
        )
    out: dict[str, Any] = {}
    if "num_threads" in options:
        out["num_threads"] = ffi.check_threads(options["num_threads"])
    if "fused" in options:
        fused = options["fused"]
        if not isinstance(fused, bool | np.bool_):
            raise ValueError(f"fused must be a bool, got {fused!r}")
        out["fused"] = bool(fused)
    given = [k for k in _FUSED_OPTIONS if k in options]
    if given and not out.get("fused", False):
        raise ValueError(f"{', '.join(given)} apply to the fused launch only: pass fused=True too")
    out.update(ffi.check_fused_options(options))
    return out


BACKEND = contract.Backend(
    name="native",
    run=ffi.run,
    unavailable=library.unavailable,
    unsupported=_unsupported,
    features=_features,
    dtypes=ffi.DTYPES,
    options=_options,
)
