"""The Triton LARS kernels in Triton's interpreter, on NumPy arrays (CPU, no GPU, no torch).

``TRITON_INTERPRET=1`` makes ``@triton.jit`` return an interpreted function
that runs every program of the grid in Python, element-wise ops in NumPy
(``triton/runtime/interpreter.py``). It expects torch tensors; what it calls on
an argument is small, and :class:`NumpyTensor` provides exactly that for a
NumPy array: ``data_ptr()`` and ``dtype`` (the pointer and its element type,
the only things a kernel sees), and ``untyped_storage()``, ``new_empty()``,
``set_()``, ``storage_offset()``, ``size()``, ``stride()`` for the host copy
the interpreter makes of device tensors. The arrays already live on the host,
so that "copy" is the array itself and the kernel writes into it directly.

:func:`launch` runs one launch of the plan with the same entry points,
arguments and constexprs that ``backend.py`` hands to ``jax_triton.triton_call``;
:func:`triton_step_interpret` drives the same :func:`step.run_step` with it
(wrapped in ``jax.pure_callback``, so it runs under ``jax.jit`` too). Aliased
outputs are honoured: the output buffer *is* the input buffer, as on the GPU,
so in-place hazards would show; other outputs start as NaN, so an element a
kernel fails to write shows.

Two changes to the interpreter, both only while a launch runs. A correction:
Triton 3.6's interpreter converts float32 to bfloat16 by truncation
(``InterpreterBuilder.cast_impl`` passes no rounding mode) and mishandles
bfloat16 subnormals when widening; a GPU rounds to nearest even
(``cvt.rn.bf16.f32``) and widens exactly. Within :func:`bfloat16_as_on_gpu`
those two conversions use ``ml_dtypes``, which does what the GPU does. And a
speed-up: calls from one ``@triton.jit`` function to another re-patch
``triton.language`` once per launch instead of on every call (see
:func:`device_calls_without_repatching`). Nothing else of the interpreter is
changed.

Import this module only with ``TRITON_INTERPRET=1`` set before triton (and
``lars.kernels.triton.kernels``) is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import triton
import triton.language as tl

from lars._autodiff import finite_args, with_finite, with_reference_jvp
from lars._config import LarsConfig
from lars._reference import StepResult

from . import plan as P
from . import step as S

if not triton.knobs.runtime.interpret:
    raise ImportError(
        "lars.kernels.triton.interpret runs the kernels in Triton's interpreter: set "
        "TRITON_INTERPRET=1 in the environment before triton is imported"
    )

# After the check: the kernels are created in the mode Triton is in at import.
from triton.runtime import interpreter as _interpreter

from . import kernels

# The interpreter patches module and class attributes while a launch runs (see
# above), so two launches must not overlap: on a mesh, XLA runs the callbacks
# of several devices' shards on several threads at once.
_ONE_LAUNCH_AT_A_TIME = threading.Lock()

_TL_DTYPES = {
    np.dtype(np.float32): tl.float32,
    np.dtype(ml_dtypes.bfloat16): tl.bfloat16,
    np.dtype(np.float16): tl.float16,
    np.dtype(np.int32): tl.int32,
}


class _Storage:
    """The storage of a :class:`NumpyTensor`: its (host) array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def cpu(self) -> _Storage:
        return self  # already on the host: the interpreter works on the array itself

    def copy_(self, other: _Storage) -> None:
        if other.array is not self.array:
            np.copyto(self.array, other.array)


class NumpyTensor:
    """A contiguous NumPy array with the tensor methods Triton's interpreter calls.

    Args:
      array: The array (C-contiguous; it is flattened, as a kernel sees it).
    """

    def __init__(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("NumpyTensor needs a C-contiguous array")
        self.array = array.reshape(-1)
        dtype = np.dtype(array.dtype)
        if dtype not in _TL_DTYPES:
            raise TypeError(f"no Triton type for {dtype}")
        self.dtype = _TL_DTYPES[dtype]

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self) -> _Storage:
        return _Storage(self.array)

    def new_empty(self, *shape: Any, device: str = "cpu") -> NumpyTensor:
        del shape, device
        return NumpyTensor(self.array[:0])

    def set_(self, storage: _Storage, offset: int, size: Any, stride: Any) -> NumpyTensor:
        del size, stride
        if offset:
            raise ValueError("NumpyTensor views start at their storage's first element")
        self.array = storage.array
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self.array.shape

    def stride(self) -> tuple[int, ...]:
        return (1,)


@contextlib.contextmanager
def bfloat16_as_on_gpu() -> Iterator[None]:
    """Makes the interpreter convert float32 <-> bfloat16 as a GPU does (see module doc)."""
    builder = _interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        pair = (src.dtype.scalar, dst_type.scalar)
        if pair == (tl.float32, tl.bfloat16):
            data = src.data.astype(ml_dtypes.bfloat16).view(np.uint16)
        elif pair == (tl.bfloat16, tl.float32):
            data = src.data.view(ml_dtypes.bfloat16).astype(np.float32)
        else:
            return original(self, src, dst_type)
        return _interpreter.TensorHandle(data, dst_type.scalar)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = original


@contextlib.contextmanager
def device_calls_without_repatching() -> Iterator[None]:
    """Calls of ``@triton.jit`` helpers re-patch ``triton.language`` once per launch.

    On every call from one jit function to another, the interpreter patches
    the ``triton.language`` modules the callee's globals refer to
    (``InterpretedFunction.__call__`` runs ``_patch_lang``); that took about
    1 ms a call, most of the time here. The patches stay in force for the rest
    of the launch (the interpreter never undoes them), so within this context
    only the first call for each set of modules patches, later calls run the
    rewritten function directly. Speed only: the same code runs.
    """
    cls = _interpreter.InterpretedFunction
    original = cls.__call__
    patched: set[frozenset[int]] = set()

    def call(self, *args, **kwargs):
        key = frozenset(id(v) for v in self.fn.__globals__.values() if v is tl or v is tl.core)
        if key not in patched:
            _interpreter._patch_lang(self.fn)
            patched.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


def launch(
    spec: P.KernelSpec,
    inputs: list[np.ndarray],
    outputs: list[S.OutSpec],
    aliases: dict[int, int],
    grid: int,
    constexprs: dict[str, bool | int],
    zeroed: tuple[int, ...] = (),
) -> list[np.ndarray]:
    """Runs one launch in the interpreter (the ``step.Launcher`` for NumPy arrays).

    An aliased output is a copy of its input that the kernel reads and writes
    in place (the caller's input is left alone); an output in ``zeroed``
    starts as zeros, any other as NaN (-1 for integers).
    """
    inputs = [np.asarray(x, order="C") for x in inputs]
    results: list[np.ndarray | None] = [None] * len(outputs)
    for i, o in aliases.items():
        results[o] = inputs[i] = inputs[i].copy()
    for o, out in enumerate(outputs):
        if o in zeroed:
            results[o] = np.zeros(out.shape, out.dtype)
        elif results[o] is None:
            garbage = np.nan if np.issubdtype(out.dtype, np.floating) else -1
            results[o] = np.full(out.shape, garbage, out.dtype)
    if grid:
        kernel = kernels.get_kernel(spec)
        args = [NumpyTensor(x) for x in (*inputs, *results)]
        with _ONE_LAUNCH_AT_A_TIME, bfloat16_as_on_gpu(), device_calls_without_repatching():
            kernel[(grid,)](*args, **constexprs)
    return results


def numpy_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    momentum: Sequence[np.ndarray],
    lr: np.ndarray,
    hyper: dict[str, np.ndarray],
    *given: np.ndarray,
    plan: P.StepPlan,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """:func:`step.run_step` on NumPy arrays with the interpreter launcher.

    With ``given`` (the trust ratios and the global gradient norm), the update
    half alone: :func:`step.run_update_given`. IEEE arithmetic raises no
    warnings (0/0 in a ratio that is then replaced by 1, NaN gradients), as on
    a GPU and in XLA.
    """
    as_np = lambda xs: [np.asarray(x) for x in xs]
    hyper = {k: np.asarray(v, np.float32) for k, v in hyper.items()}
    run = S.run_update_given if given else S.run_step
    with np.errstate(all="ignore"):
        first, new_momentum, ratios = run(
            as_np(params),
            as_np(grads),
            as_np(momentum),
            np.asarray(lr, np.float32),
            hyper,
            *(np.asarray(x, np.float32) for x in given),
            plan=plan,
            launch=launch,
            xp=np,
        )
    return (
        [np.asarray(x, p.dtype) for x, p in zip(first, params, strict=True)],
        [np.asarray(x, np.float32) for x in new_momentum],
        [np.asarray(r, np.float32) for r in ratios],
    )


def _callback(plan: P.StepPlan, hyper: dict[str, jax.Array], params, momentum, *given):
    """``numpy_step`` as a ``jax.pure_callback`` of (params, grads, momentum, lr)."""
    shapes = (
        [jax.ShapeDtypeStruct(np.shape(p), p.dtype) for p in params],
        [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in momentum],
        [jax.ShapeDtypeStruct((), jnp.float32) for _ in params],
    )
    given = [jnp.asarray(x, jnp.float32) for x in given]
    fn = functools.partial(numpy_step, plan=plan)

    def step(p, g, v, lr, *finite):
        return jax.pure_callback(fn, shapes, p, g, v, lr, with_finite(hyper, finite), *given)

    return step


def _step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
    tuning: P.Tuning | None,
    finite: jax.Array | None,
) -> StepResult:
    plan, hyper = S.prepare(
        params,
        grads,
        momentum,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
        tuning=tuning,
        xp=jnp,
        skip_nonfinite=finite is not None,
    )
    kernel_step = with_reference_jvp(
        _callback(plan, hyper, params, momentum),
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
    )
    first, new_momentum, ratios = kernel_step(
        list(params),
        list(grads),
        list(momentum),
        jnp.asarray(lr, jnp.float32),
        *finite_args(finite),
    )
    return StepResult(list(first), list(new_momentum), list(ratios))


def triton_step_interpret(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    tuning: P.Tuning | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """``backend.triton_step`` with the kernels run in Triton's interpreter on the host.

    Same arguments and result as ``lars._reference.reference_step``; works
    eagerly and under ``jax.jit`` (the kernels run in a ``jax.pure_callback``).

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask: As in
        ``reference_step``.
      tuning: The launch geometry (``plan.Tuning()`` by default).
      finite: Optional bool scalar: False skips the step in the kernels.

    Raises:
      TypeError: naming the leaf, for a dtype the kernels do not handle (float64).
    """
    return _step(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=False,
        tuning=tuning,
        finite=finite,
    )


def triton_apply_interpret(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    tuning: P.Tuning | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """Like :func:`triton_step_interpret`, but the first field holds the new params."""
    return _step(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=True,
        tuning=tuning,
        finite=finite,
    )


def triton_update_with_ratios_interpret(
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
    write_params: bool = False,
    tuning: P.Tuning | None = None,
) -> StepResult:
    """``backend.triton_update_with_ratios`` with the kernels run in the interpreter."""
    plan, hyper = S.prepare(
        params,
        grads,
        momentum,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
        tuning=tuning,
        xp=jnp,
    )
    first, new_momentum, out_ratios = _callback(plan, hyper, params, momentum, ratios, global_norm)(
        list(params), list(grads), list(momentum), jnp.asarray(lr, jnp.float32)
    )
    return StepResult(list(first), list(new_momentum), list(out_ratios))
