"""The native step as one XLA FFI custom call on all leaves.

:func:`run` builds the call from a ``lars.contract.StepSpec``: the
hyperparameters, masks, output mode and thread count are attributes of the
compiled call; the learning rate, the finite flag and given trust ratios are
operands. The output mode follows the spec:

* ``WRITE_PARAMS`` (``spec.write_params``): the new params, written over the
  params' buffers;
* ``WRITE_UPDATES`` (nesterov): the updates, over the gradients' buffers
  where their dtype is the params';
* ``MOMENTUM_ONLY`` (otherwise): the momentum and ratios only; the updates
  ``-(lr * v)`` (``-v`` with ``lr_inside_momentum``) are left to XLA, which
  fuses them into ``optax.apply_updates``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars import contract
from lars.kernels.native import library

# What the handler writes besides the momentum and ratios (OutputMode in lars_common.h).
WRITE_UPDATES, WRITE_PARAMS, MOMENTUM_ONLY = 0, 1, 2

# The (params dtype, grads dtype) pairs the handlers implement (SupportedPair in C++).
DTYPES = contract.dtype_pairs(
    (jnp.float32, jnp.float32),
    (jnp.float32, jnp.bfloat16),
    (jnp.float32, jnp.float16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16),
    (jnp.float64, jnp.float64),
    (jnp.float64, jnp.bfloat16),
    (jnp.float64, jnp.float16),
)


def traced_hyperparameter(config: contract.LarsConfig) -> str | None:
    """None when every hyperparameter is a concrete number, else a sentence naming one.

    The hyperparameters are attributes of the compiled call, so traced values
    (e.g. under ``optax.inject_hyperparams``) cannot reach it.
    """
    for name in contract.HYPERPARAMETERS:
        if isinstance(getattr(config, name), jax.core.Tracer):
            return (
                f"{name} is a traced value; the native backend compiles hyperparameters "
                "into the call (only the learning rate may change from step to step)"
            )
    return None


def mode_of(spec: contract.StepSpec) -> int:
    """The output mode of ``spec``'s step."""
    if spec.write_params:
        return WRITE_PARAMS
    return WRITE_UPDATES if spec.config.nesterov else MOMENTUM_ONLY


def _attr(value: Any) -> np.float64:
    return np.float64(0.0 if value is None else float(value))


def attributes(
    spec: contract.StepSpec, mode: int, num_threads: int, fused: Sequence[int] = (0, 0, 0)
) -> dict[str, Any]:
    """The call's attributes (``.Attr`` of the handlers' bindings; unset options are 0).

    ``fused``: (lookahead, chunk, blocks per SM) of the CUDA handler's fused
    launch; a lookahead of 0 runs its two launches. The CPU handler ignores it.
    """
    config = spec.config
    return {
        **{name: _attr(getattr(config, name)) for name in contract.HYPERPARAMETERS},
        "nesterov": np.bool_(config.nesterov),
        "lr_inside_momentum": np.bool_(config.lr_inside_momentum),
        "mode": np.int32(mode),
        "decay_mask": np.asarray(spec.decay_mask, np.uint8),
        "trust_mask": np.asarray(spec.trust_mask, np.uint8),
        "num_threads": np.int64(num_threads),
        "fused": np.asarray(fused, np.int64),
    }


def custom_call(
    spec: contract.StepSpec,
    mode: int,
    num_threads: int,
    lr: jax.Array,
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    extra: Sequence[jax.Array] = (),
    fused: Sequence[int] = (0, 0, 0),
) -> list[jax.Array]:
    """The custom call itself, in any output mode.

    Operands: lr, params, grads, momentum[, finite flag][, ratios, global norm]
    (``extra``). Results: [updates or new params,] momentum, then one float32
    vector of the trust ratios (a vector, so that the optimizer state's
    ``trust_ratio`` is that buffer, with no XLA launch to stack scalars). The
    momentum is written over its buffers, the new params over the params' and
    the updates over the gradients' where their dtype is the params'.

    Raises:
      ValueError: for an unknown mode, MOMENTUM_ONLY with nesterov, or a
        traced hyperparameter.
    """
    if mode not in (WRITE_UPDATES, WRITE_PARAMS, MOMENTUM_ONLY):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == MOMENTUM_ONLY and spec.config.nesterov:
        raise ValueError("MOMENTUM_ONLY cannot give nesterov updates (they need r * g)")
    traced = traced_hyperparameter(spec.config)
    if traced is not None:
        raise ValueError(f"backend 'native' does not support this configuration: {traced}")
    n = len(params)
    outs = 0 if mode == MOMENTUM_ONLY else n
    out_types = [] if outs == 0 else [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
    out_types += [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in momentum]
    out_types.append(jax.ShapeDtypeStruct((n,), jnp.float32))
    aliases = {1 + 2 * n + i: outs + i for i in range(n)}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if mode == WRITE_PARAMS:
            aliases[1 + i] = i
        elif mode == WRITE_UPDATES and g.dtype == p.dtype:
            aliases[1 + n + i] = i
    call = jax.ffi.ffi_call(
        library.TARGET, out_types, input_output_aliases=aliases, vmap_method="sequential"
    )
    attrs = attributes(spec, mode, num_threads, fused)
    return call(lr, *params, *grads, *momentum, *extra, **attrs)


def _check(spec: contract.StepSpec, params, grads, momentum) -> None:
    """Refuses leaves that are not those ``spec`` describes (a direct caller's mistake)."""
    n = len(spec.leaves)
    if not (len(params) == len(grads) == len(momentum) == n):
        raise ValueError(
            f"params, grads and momentum have {len(params)}, {len(grads)} and "
            f"{len(momentum)} leaves; the spec has {n}"
        )
    for i, (leaf, p, g, v) in enumerate(zip(spec.leaves, params, grads, momentum, strict=True)):
        if not (p.shape == g.shape == v.shape == leaf.shape):
            raise ValueError(
                f"leaf {i}: params {p.shape}, grads {g.shape} and momentum {v.shape} differ "
                f"from the spec's shape {leaf.shape}"
            )
        pair = (np.dtype(p.dtype), np.dtype(g.dtype))
        if pair not in DTYPES:
            raise TypeError(
                f"leaf {i}: the native backend does not support {pair[0]} params with "
                f"{pair[1]} gradients"
            )
        if pair != (leaf.param_dtype, leaf.grad_dtype):
            raise TypeError(
                f"leaf {i}: {pair[0]} params with {pair[1]} gradients, but the spec has "
                f"{leaf.param_dtype} and {leaf.grad_dtype}"
            )
        if np.dtype(v.dtype) != leaf.momentum_dtype:
            raise TypeError(
                f"leaf {i}: momentum has dtype {v.dtype}, expected {leaf.momentum_dtype} "
                f"for {p.dtype} params"
            )


_num_threads = 0

# The CUDA handler's fused launch (option ``fused``), not yet timed on a GPU.
# Chosen with bench/native_l2_model.py (an LRU model of a 60 MB L2 over the
# launch's accesses, ResNet-50 fp32 in place, 528 resident blocks): what
# decides between 20 and 28 B/param is the blocks' chunks in flight plus the
# window of sums ahead of the updates. At 16,384 elements a chunk, 528 blocks
# hold 69 MB of w and g in flight, more than the L2: 23.1 B/param at a
# lookahead of 128 chunks, with blocks waiting for the window 37% of the time
# (20.4 and 56% at 64). At 4,096 elements and a lookahead of 512 chunks (2M
# elements), 20.0 B/param with 6% waiting. bench/gpu_check times the others.
FUSED_CHUNK = 4096  # elements per item (a multiple of 1024, at most 2**20)
FUSED_LOOKAHEAD = 512  # chunks the sums may run ahead beyond the next update's leaf
FUSED_BLOCKS_PER_SM = 0  # 0: as many as fit (4 at 64 registers); else at most this many
MAX_LOOKAHEAD = 1 << 30
MAX_CHUNK = 1 << 20


def _int_in(name: str, n: Any, low: int, high: int, multiple: int = 1) -> int:
    if (
        isinstance(n, bool)
        or not isinstance(n, int | np.integer)
        or not low <= n <= high
        or n % multiple
    ):
        of = f", a multiple of {multiple}" if multiple > 1 else ""
        raise ValueError(f"{name} must be an int in [{low}, {high}]{of}, got {n!r}")
    return int(n)


def check_fused_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``lookahead``, ``chunk`` and ``blocks_per_sm`` checked and normalised."""
    out = {}
    if "lookahead" in options:
        out["lookahead"] = _int_in("lookahead", options["lookahead"], 1, MAX_LOOKAHEAD)
    if "chunk" in options:
        out["chunk"] = _int_in("chunk", options["chunk"], 1024, MAX_CHUNK, 1024)
    if "blocks_per_sm" in options:
        out["blocks_per_sm"] = _int_in("blocks_per_sm", options["blocks_per_sm"], 0, 1 << 10)
    return out


def fused_attribute(spec: contract.StepSpec) -> tuple[int, int, int]:
    """(lookahead, chunk, blocks per SM) of the spec's options; (0, 0, 0) without ``fused``."""
    if not spec.option("fused", False):
        return (0, 0, 0)
    return (
        spec.option("lookahead", FUSED_LOOKAHEAD),
        spec.option("chunk", FUSED_CHUNK),
        spec.option("blocks_per_sm", FUSED_BLOCKS_PER_SM),
    )


def check_threads(n: Any) -> int:
    """``n`` as a thread count; raises ValueError unless a non-negative int."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"num_threads must be a non-negative int, got {n!r}")
    return int(n)


def set_num_threads(n: int) -> None:
    """Sets how many threads the CPU handler uses (0: XLA's intra-op pool size).

    The default of the ``num_threads`` option: applies to steps traced
    afterwards (the count is an attribute of the compiled call). Results do
    not depend on it.
    """
    global _num_threads
    _num_threads = check_threads(n)


def get_num_threads() -> int:
    """The thread count set by :func:`set_num_threads` (0: automatic)."""
    return _num_threads


def run(spec: contract.StepSpec, inputs: contract.StepInputs) -> contract.StepResult:
    """The contract's step (``lars.contract``) in one custom call.

    The CPU handler's thread count is the ``num_threads`` option, else
    :func:`get_num_threads` (0: XLA's intra-op pool size; results do not
    depend on it). The ``fused``, ``lookahead``, ``chunk`` and
    ``blocks_per_sm`` options choose the CUDA handler's launches. ``finite`` (CPU only) False leaves
    params and momentum in place, with -0.0 updates and ratios of 1.
    ``ratios`` and ``global_norm`` (``spec.given_ratios``, CPU only): the
    handler skips its sums and only updates.

    Raises:
      ValueError, TypeError: for leaves that do not match ``spec``.
      RuntimeError: when the native library is not built.
    """
    params, grads, momentum, lr, finite, ratios, global_norm = inputs
    library.require_any()
    params = [jnp.asarray(p) for p in params]
    grads = [jnp.asarray(g) for g in grads]
    momentum = [jnp.asarray(v) for v in momentum]
    _check(spec, params, grads, momentum)
    n = len(params)
    if n == 0:
        return contract.StepResult([], [], [])
    lr = jnp.asarray(lr, jnp.float32)
    if lr.shape != ():
        raise ValueError(f"lr must be a scalar, got shape {lr.shape}")
    extra = []
    if (finite is not None) != spec.skip_nonfinite:
        raise ValueError("a finite flag is passed exactly when spec.skip_nonfinite")
    if finite is not None:
        finite = jnp.asarray(finite, jnp.bool_)
        if finite.shape != ():
            raise ValueError(f"finite must be a bool scalar, got shape {finite.shape}")
        extra.append(finite)
    if (ratios is not None and global_norm is not None) != spec.given_ratios:
        raise ValueError("ratios and global_norm are passed exactly when spec.given_ratios")
    if ratios is not None:
        dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in momentum) else jnp.float32
        given = [jnp.asarray(ratios, dtype), jnp.asarray(global_norm, dtype)]
        if given[0].shape != (n,) or given[1].shape != ():
            raise ValueError(
                f"expected one given ratio per leaf (shape ({n},)) and a scalar global norm, "
                f"got shapes {given[0].shape} and {given[1].shape}"
            )
        extra += given
    mode = mode_of(spec)
    num_threads = spec.option("num_threads", _num_threads)
    fused = fused_attribute(spec)
    results = custom_call(spec, mode, num_threads, lr, params, grads, momentum, extra, fused)
    outs = 0 if mode == MOMENTUM_ONLY else n
    new_momentum = list(results[outs : outs + n])
    # Scalars for the contract; XLA folds the front end's stack of them back
    # into this vector (tests/test_native_api.py checks the compiled step).
    ratio_vector = results[outs + n]
    trust_ratios = [ratio_vector[i] for i in range(n)]
    if mode != MOMENTUM_ONLY:
        return contract.StepResult(list(results[:n]), new_momentum, trust_ratios)
    # The reference's updates from the new momentum, in the same operations:
    # -(lr * v) (or -v with lr inside the momentum), in the param dtype.
    updates = []
    for p, v in zip(params, new_momentum, strict=True):
        step = v if spec.config.lr_inside_momentum else lr.astype(v.dtype) * v
        u = (-step).astype(p.dtype)
        if finite is not None:  # a skipped step's updates are -0.0
            u = jnp.where(finite, u, jnp.full_like(u, -0.0))
        updates.append(u)
    return contract.StepResult(updates, new_momentum, trust_ratios)
