"""The native LARS backend: one XLA FFI custom call does the step for all leaves.

The C++ handler (``lars_cpu.cc``) and, when built with a CUDA compiler, the
CUDA handler (``lars_cuda.cu``) are compiled by the top-level CMakeLists.txt
into ``lib/`` beside this file (``make venv`` does it). Without the library the
package still imports and the other backends work; ``unavailable()`` then says
why "native" cannot run.

Numerics: the elementwise arithmetic is the reference's, in the same dtypes and
order (float32, or float64 for float64 params), each operation rounded on its
own (no fused multiply-adds: the un-jitted reference gives the same bits; a
jitted one may fuse ``u + momentum * v`` and differ in the last bit). The
per-leaf sums of squares have a fixed order: on the CPU, 16 lanes (element i of
a range in lane i mod 16), each adding 16 squares in float32 (float64 for
float64 params) before adding that partial in float64; ranges are fixed chunks
of 65,536 elements whose sums are added in chunk order; on the GPU, float64
per thread, a fixed tree per block, blocks added in order. The norms are at
least as accurate as the reference's float32 reductions, and results are
bitwise identical from run to run, whatever the number of threads or the
instruction set.

Two entry points share the handler:

* :func:`step` has the signature of ``lars._reference.reference_step`` and
  returns updates; the handler writes the momentum only and XLA computes the
  updates ``-lr * v`` where ``optax.apply_updates`` uses them, so the step needs
  no buffer for them (with nesterov the handler writes the updates, over the
  gradients' buffers);
* :func:`apply` returns the new params instead, written in place over the
  params' buffers: with params and state donated to ``jax.jit``, the step
  allocates nothing.

Derivatives (``jax.grad``, ``jax.jvp`` through a step, e.g. for
meta-gradients) are those of the reference step, the same function: the custom
call has no derivative of its own, so its ``custom_jvp`` rule differentiates
the reference.

Memory traffic (CPU): a leaf of up to 65,536 elements is done by one thread in
one go (sums, then the update while it is in cache): read w, g, v and write w,
v once, 20 bytes per float32 parameter. A larger leaf needs its norms before
any update, so w and g are read twice (28 bytes). Work is shared by the calling
thread and XLA's intra-op thread pool (:func:`set_num_threads`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars._config import LarsConfig
from lars._reference import (
    StepResult,
    compute_dtype,
    reference_step,
    reference_update_with_ratios,
)

TARGET = "lars_native_step"
# What the handler writes besides the momentum and ratios (OutputMode in C++).
WRITE_UPDATES, WRITE_PARAMS, MOMENTUM_ONLY = 0, 1, 2
LIB_DIR = Path(__file__).resolve().parent / "lib"
_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"
CPU_LIBRARY = "liblars_native_cpu" + _SUFFIX
CUDA_LIBRARY = "liblars_native_cuda" + _SUFFIX

# (params dtype, grads dtype) pairs the handlers implement.
SUPPORTED_DTYPES = {
    (np.dtype(jnp.float32), np.dtype(jnp.float32)),
    (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)),
    (np.dtype(jnp.float32), np.dtype(jnp.float16)),
    (np.dtype(jnp.bfloat16), np.dtype(jnp.bfloat16)),
    (np.dtype(jnp.float16), np.dtype(jnp.float16)),
    (np.dtype(jnp.float64), np.dtype(jnp.float64)),
    (np.dtype(jnp.float64), np.dtype(jnp.bfloat16)),
    (np.dtype(jnp.float64), np.dtype(jnp.float16)),
}

_HYPERPARAMETERS = (
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "eps",
    "trust_clip",
    "grad_clip_norm",
    "grad_clip_value",
)

_lock = threading.Lock()
_state: dict[str, Any] = {}
_num_threads = 0


def _load() -> dict[str, Any]:
    """Loads the libraries once and registers the FFI targets; returns the state.

    The state holds ``cpu`` (the CPU library or None), ``cuda`` (likewise) and
    ``cpu_error`` / ``cuda_error`` (why a library is missing).
    """
    with _lock:
        if _state:
            return _state
        state: dict[str, Any] = {"cpu": None, "cuda": None}
        cpu_path = LIB_DIR / CPU_LIBRARY
        if not cpu_path.exists():
            state["cpu_error"] = (
                f"the native library is not built ({cpu_path.name} is missing from "
                "lars/kernels/native/lib); build it with `make venv` or "
                "`cmake -S . -B build/native && cmake --build build/native`"
            )
        else:
            try:
                lib = ctypes.CDLL(str(cpu_path))
                jax.ffi.register_ffi_target(
                    TARGET, jax.ffi.pycapsule(lib.LarsNativeStepCpu), platform="cpu"
                )
                lib.LarsNativeCpuIsa.restype = ctypes.c_char_p
                lib.LarsNativeSetCpuIsa.argtypes = [ctypes.c_char_p]
                lib.LarsNativeSetCpuIsa.restype = ctypes.c_int
                lib.LarsNativeLastStepThreads.restype = None
                state["cpu"] = lib
            except (OSError, AttributeError) as e:
                state["cpu_error"] = f"the native library failed to load: {e}"
        cuda_path = LIB_DIR / CUDA_LIBRARY
        if not cuda_path.exists():
            state["cuda_error"] = (
                "the CUDA handler is not built (no CUDA compiler was found when the "
                "native library was built)"
            )
        else:
            try:
                lib = ctypes.CDLL(str(cuda_path))
                jax.ffi.register_ffi_target(
                    TARGET, jax.ffi.pycapsule(lib.LarsNativeStepCuda), platform="CUDA"
                )
                state["cuda"] = lib
            except (OSError, AttributeError) as e:
                state["cuda_error"] = f"the CUDA handler failed to load: {e}"
        _state.update(state)
        return _state


def unavailable(platform: str | None = None) -> str | None:
    """None when the native step can run on ``platform``, else the reason.

    Args:
      platform: "cpu", "gpu" or "tpu"; the default JAX backend when None.

    With several devices, ``lars._sharded`` runs the handler on each shard.
    """
    state = _load()
    if platform is None:
        platform = jax.default_backend()
    if platform == "cpu":
        if state["cpu"] is None:
            return state["cpu_error"]
        return None
    if platform in ("gpu", "cuda"):
        return None if state["cuda"] is not None else state["cuda_error"]
    return f"the native backend has no handler for the {platform!r} platform"


def unsupported(config: LarsConfig) -> str | None:
    """None when the native step implements ``config``, else a sentence naming why.

    Every option of ``LarsConfig`` is implemented; hyperparameters must be
    concrete numbers (they become attributes of the compiled call), so traced
    values (e.g. under ``optax.inject_hyperparams``) are not supported.
    """
    for name in _HYPERPARAMETERS:
        value = getattr(config, name)
        if isinstance(value, jax.core.Tracer):
            return (
                f"{name} is a traced value; the native backend compiles hyperparameters "
                "into the call (only the learning rate may change from step to step)"
            )
    return None


def set_num_threads(n: int) -> None:
    """Sets how many threads the CPU handler uses (0: XLA's intra-op pool size).

    Applies to functions traced afterwards (the count is an attribute of the
    compiled call). Results do not depend on it.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"num_threads must be a non-negative int, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """The thread count set by :func:`set_num_threads` (0: automatic)."""
    return _num_threads


def cpu_isa() -> str:
    """The instruction set the CPU loops use: "avx512", "avx2" or "base"."""
    lib = _require_cpu()
    name = lib.LarsNativeCpuIsa().decode()
    return name.removeprefix("isa_")


def set_cpu_isa(name: str) -> None:
    """Forces the CPU loops of an instruction set ("avx512", "avx2" or "base").

    Raises:
      ValueError: if that set was not compiled or the processor lacks it.
    """
    lib = _require_cpu()
    if lib.LarsNativeSetCpuIsa(name.encode()) != 0:
        raise ValueError(f"instruction set {name!r} is not available on this machine")


def last_step_threads() -> tuple[int, int]:
    """(threads used, work items run by pool threads) of the last CPU step."""
    lib = _require_cpu()
    threads, helper_items = ctypes.c_int64(), ctypes.c_int64()
    lib.LarsNativeLastStepThreads(ctypes.byref(threads), ctypes.byref(helper_items))
    return threads.value, helper_items.value


def _require_cpu() -> Any:
    state = _load()
    if state["cpu"] is None:
        raise RuntimeError(f"native backend unavailable: {state['cpu_error']}")
    return state["cpu"]


def _check_leaves(
    params: Sequence[jax.Array], grads: Sequence[jax.Array], momentum: Sequence[jax.Array]
) -> None:
    if not (len(params) == len(grads) == len(momentum)):
        raise ValueError(
            f"params, grads and momentum have {len(params)}, {len(grads)} and "
            f"{len(momentum)} leaves"
        )
    for i, (p, g, v) in enumerate(zip(params, grads, momentum, strict=True)):
        if not (p.shape == g.shape == v.shape):
            raise ValueError(
                f"leaf {i}: params {p.shape}, grads {g.shape} and momentum {v.shape} differ "
                "in shape"
            )
        pair = (np.dtype(p.dtype), np.dtype(g.dtype))
        if pair not in SUPPORTED_DTYPES:
            raise TypeError(
                f"leaf {i}: the native backend does not support {pair[0]} params with "
                f"{pair[1]} gradients"
            )
        if np.dtype(v.dtype) != np.dtype(compute_dtype(p.dtype)):
            raise TypeError(
                f"leaf {i}: momentum has dtype {v.dtype}, expected "
                f"{np.dtype(compute_dtype(p.dtype))} for {p.dtype} params"
            )


def _attr(value: Any) -> np.float64:
    return np.float64(0.0 if value is None else float(value))


def _call(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    mode: int,
    num_threads: int | None = None,
    given: tuple[jax.Array, jax.Array] | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """The FFI call behind :func:`step` and :func:`apply`.

    ``mode`` is one of ``WRITE_UPDATES``, ``WRITE_PARAMS`` (the first result
    field holds the new params) and ``MOMENTUM_ONLY`` (the handler writes the
    momentum and ratios only; the updates, ``-lr * v`` or ``-v``, are left to
    XLA, which fuses them into ``optax.apply_updates``; not with nesterov).
    ``given`` is (ratios, global gradient norm), computed by the caller: the
    handler then skips its sums and only updates. ``finite`` is a bool scalar
    (CPU only): when False the handler leaves params and momentum in place,
    writes -0.0 updates and ratios of 1 (see :func:`skips_nonfinite`).
    """
    _require_cpu_or_cuda()
    lacking = unsupported(config)
    if lacking is not None:
        raise ValueError(f"backend 'native' does not support this configuration: {lacking}")
    params = [jnp.asarray(p) for p in params]
    grads = [jnp.asarray(g) for g in grads]
    momentum = [jnp.asarray(v) for v in momentum]
    _check_leaves(params, grads, momentum)
    n = len(params)
    if len(decay_mask) != n or len(trust_mask) != n:
        raise ValueError(
            f"decay_mask and trust_mask need one bool per leaf ({n}), got "
            f"{len(decay_mask)} and {len(trust_mask)}"
        )
    if n == 0:
        return StepResult([], [], [])
    lr = jnp.asarray(lr, jnp.float32)
    if lr.shape != ():
        raise ValueError(f"lr must be a scalar, got shape {lr.shape}")

    if mode not in (WRITE_UPDATES, WRITE_PARAMS, MOMENTUM_ONLY):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == MOMENTUM_ONLY and config.nesterov:
        raise ValueError("MOMENTUM_ONLY cannot give nesterov updates (they need r * g)")
    outs = 0 if mode == MOMENTUM_ONLY else n
    threads = _num_threads if num_threads is None else num_threads
    extra = []
    if given is not None:
        ratios_in, norm_in = given
        dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in momentum) else jnp.float32
        extra = [jnp.asarray(ratios_in, dtype), jnp.asarray(norm_in, dtype)]
        if extra[0].shape != (n,) or extra[1].shape != ():
            raise ValueError(
                f"expected one given ratio per leaf (shape ({n},)) and a scalar global norm, "
                f"got shapes {extra[0].shape} and {extra[1].shape}"
            )
    static = _Static(
        config=config,
        decay_mask=tuple(bool(m) for m in decay_mask),
        trust_mask=tuple(bool(m) for m in trust_mask),
        mode=mode,
        num_threads=threads,
    )
    if finite is not None:
        finite = jnp.asarray(finite, jnp.bool_)
        if finite.shape != ():
            raise ValueError(f"finite must be a bool scalar, got shape {finite.shape}")
    results = _results(static, lr, params, grads, momentum, finite, extra)
    momentum_out = list(results[outs : outs + n])
    ratios = list(results[outs + n :])
    if mode != MOMENTUM_ONLY:
        return StepResult(list(results[:n]), momentum_out, ratios)
    # The reference's updates from the new momentum, in the same operations:
    # -(lr * v) (or -v with lr inside the momentum), in the param dtype.
    lr_updates = []
    for p, v in zip(params, momentum_out, strict=True):
        step = v if config.lr_inside_momentum else lr.astype(v.dtype) * v
        lr_updates.append((-step).astype(p.dtype))
    return StepResult(lr_updates, momentum_out, ratios)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The compiled-in part of one call (hashable: a custom_jvp static argument)."""

    config: LarsConfig
    decay_mask: tuple[bool, ...]
    trust_mask: tuple[bool, ...]
    mode: int  # WRITE_UPDATES, WRITE_PARAMS or MOMENTUM_ONLY
    num_threads: int  # 0: XLA's intra-op pool size


def _ffi_results(static: _Static, lr, params, grads, momentum, finite, extra) -> list[jax.Array]:
    """The custom call.

    Operands: lr, params, grads, momentum[, finite flag][, ratios, global norm].

    Results: [updates or new params,] momentum, trust ratios.
    """
    n, mode, config = len(params), static.mode, static.config
    outs = 0 if mode == MOMENTUM_ONLY else n
    out_types = (
        [] if mode == MOMENTUM_ONLY else [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
    )
    out_types += [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in momentum]
    out_types += [jax.ShapeDtypeStruct((), jnp.float32)] * n
    aliases = {1 + 2 * n + i: outs + i for i in range(n)}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if mode == WRITE_PARAMS:
            aliases[1 + i] = i
        elif mode == WRITE_UPDATES and g.dtype == p.dtype:
            aliases[1 + n + i] = i
    call = jax.ffi.ffi_call(
        TARGET,
        out_types,
        input_output_aliases=aliases,
        vmap_method="sequential",
    )
    return call(
        lr,
        *params,
        *grads,
        *momentum,
        *([] if finite is None else [finite]),
        *extra,
        momentum=_attr(config.momentum),
        weight_decay=_attr(config.weight_decay),
        trust_coefficient=_attr(config.trust_coefficient),
        eps=_attr(config.eps),
        trust_clip=_attr(config.trust_clip),
        grad_clip_norm=_attr(config.grad_clip_norm),
        grad_clip_value=_attr(config.grad_clip_value),
        nesterov=np.bool_(config.nesterov),
        lr_inside_momentum=np.bool_(config.lr_inside_momentum),
        mode=np.int32(mode),
        decay_mask=np.asarray(static.decay_mask, np.uint8),
        trust_mask=np.asarray(static.trust_mask, np.uint8),
        num_threads=np.int64(static.num_threads),
    )


def _reference_results(
    static: _Static, lr, params, grads, momentum, finite, extra
) -> list[jax.Array]:
    """What :func:`_ffi_results` computes, in the reference's plain JAX."""
    masks = dict(decay_mask=list(static.decay_mask), trust_mask=list(static.trust_mask))
    if extra:
        res = reference_update_with_ratios(
            params,
            grads,
            momentum,
            lr,
            *extra,
            config=static.config,
            write_params=static.mode == WRITE_PARAMS,
            **masks,
        )
        out = res.updates
    else:
        res = reference_step(params, grads, momentum, lr, config=static.config, **masks)
        out = res.updates
        if static.mode == WRITE_PARAMS:
            out = [(p + u).astype(p.dtype) for p, u in zip(params, out, strict=True)]
    new_momentum, ratios = list(res.momentum), list(res.trust_ratio)
    if finite is not None:  # a skipped step: nothing moves
        keep = params if static.mode == WRITE_PARAMS else [jnp.full_like(u, -0.0) for u in out]
        out = [jnp.where(finite, a, b) for a, b in zip(out, keep, strict=True)]
        new_momentum = [
            jnp.where(finite, a, b) for a, b in zip(new_momentum, momentum, strict=True)
        ]
        ratios = [jnp.where(finite, r, jnp.ones_like(r)) for r in ratios]
    head = [] if static.mode == MOMENTUM_ONLY else list(out)
    return [*head, *new_momentum, *ratios]


# Derivatives: the custom call has none of its own; its tangents are those of
# the reference step (the same function), so jax.grad and jax.jvp through a
# native step work (e.g. to differentiate a loss after an update).
_results = jax.custom_jvp(_ffi_results, nondiff_argnums=(0,))


@_results.defjvp
def _results_jvp(static, primals, tangents):
    out = _ffi_results(static, *primals)
    _, out_tangents = jax.jvp(functools.partial(_reference_results, static), primals, tangents)
    return out, out_tangents


def step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    finite: jax.Array | None = None,
) -> StepResult:
    """One LARS step over all leaves in one native call; returns updates.

    Same signature and result as ``lars._reference.reference_step``. Without
    nesterov the call writes the momentum only and the updates are ``-lr * v``
    (``-v`` with ``lr_inside_momentum``) in XLA, which fuses them into
    ``optax.apply_updates``: no buffer for the updates. With nesterov the call
    writes the updates too, over the gradients' buffers when their dtype is the
    params' (free in a training step, where the gradients are temporaries).

    Raises:
      ValueError, TypeError: for mismatched leaves or an unsupported dtype pair.
      RuntimeError: when the native library is not built.
    """
    return _call(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        mode=WRITE_UPDATES if config.nesterov else MOMENTUM_ONLY,
        finite=finite,
    )


def apply(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    finite: jax.Array | None = None,
) -> StepResult:
    """Like :func:`step`, but the first field holds the new params, not updates.

    The new params equal ``optax.apply_updates(params, updates)`` bit for bit;
    they are written over the params' buffers (donate them to ``jax.jit``).
    """
    return _call(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        mode=WRITE_PARAMS,
        finite=finite,
    )


def skips_nonfinite() -> bool:
    """True where :func:`step` and :func:`apply` take the ``finite`` flag.

    The CPU handler reads it (host memory): a step with non-finite gradients
    then changes nothing in place, so ``skip_nonfinite`` needs no copy of the
    params or momentum. The CUDA handler does not take it.
    """
    return jax.default_backend() == "cpu" and _load()["cpu"] is not None


def step_with_ratios(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    ratios: jax.Array,
    global_norm: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
) -> StepResult:
    """The update half of a step, with trust ratios the caller computed.

    For sharded params (``lars._sharded``): each shard's handler gets the ratios
    of whole layers (sums over every shard) and updates its own elements.

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask: As in
        :func:`step`, one shard's part of each leaf.
      ratios: One trust ratio per leaf (float32, float64 with float64 params).
      global_norm: The global gradient norm, used with ``grad_clip_norm``.
      write_params: Return the new params (as :func:`apply`) instead of updates.
    """
    if jax.default_backend() != "cpu":
        # The CUDA handler takes no precomputed ratios yet: the update of a
        # sharded step runs in XLA there (the norms are still whole-layer).
        return reference_update_with_ratios(
            params,
            grads,
            momentum,
            lr,
            ratios,
            global_norm,
            config=config,
            decay_mask=decay_mask,
            trust_mask=trust_mask,
            write_params=write_params,
        )
    mode = WRITE_PARAMS if write_params else WRITE_UPDATES if config.nesterov else MOMENTUM_ONLY
    return _call(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        mode=mode,
        given=(ratios, global_norm),
    )


def _require_cpu_or_cuda() -> None:
    state = _load()
    if state["cpu"] is None and state["cuda"] is None:
        raise RuntimeError(f"native backend unavailable: {state['cpu_error']}")


def bytes_per_step(params: Sequence[Any], grads: Sequence[Any]) -> int:
    """The ideal memory traffic of one in-place step: read w, g, v; write w, v."""
    total = 0
    for p, g in zip(params, grads, strict=True):
        size = math.prod(np.shape(p))
        v_bytes = np.dtype(compute_dtype(p.dtype)).itemsize
        total += size * (2 * np.dtype(p.dtype).itemsize + np.dtype(g.dtype).itemsize + 2 * v_bytes)
    return total
