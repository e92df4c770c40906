"""The "triton_interpret" backend: the Triton kernels in Triton's interpreter, on the host.

``BACKEND`` is the "triton" backend's step (``step.run``, same plan, entry
points, arguments and constexprs) with each launch run by :func:`launch` in
Triton's interpreter on NumPy arrays, inside a ``jax.pure_callback``: it runs
on any JAX platform, eagerly and under ``jax.jit``. Same features and options
as "triton". It is available only when ``TRITON_INTERPRET=1`` was set before
triton was first imported; tests register it with
``lars._dispatch.register("triton_interpret", "lars.kernels.triton.interpret")``.

:func:`launch` honours aliases (the output *is* the input's buffer, as on the
GPU); other outputs start as NaN (-1 for integers) unless zeroed, so an
element a kernel fails to write shows. While a launch runs, the interpreter
converts float32 <-> bfloat16 as a GPU does (:func:`bfloat16_as_on_gpu`) and
re-patches ``triton.language`` once per launch, not per call
(:func:`device_calls_without_repatching`); docs/triton.md says why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lars.contract import FLOAT32_COMPUTE_DTYPES, Backend, StepInputs, StepResult, StepSpec

from . import FEATURES, options, unsupported
from . import plan as P
from . import step as S

# The interpreter patches module and class attributes while a launch runs, so
# two launches must not overlap (XLA may run callbacks on several threads).
_ONE_LAUNCH_AT_A_TIME = threading.Lock()


def unavailable(platform: str) -> str | None:
    """None if triton is installed and was (or will be) imported in interpreter mode."""
    del platform
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    triton = sys.modules.get("triton")
    if triton is None:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    else:  # triton's own @jit functions were made in the mode of its import
        interpreting = type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"
    if not interpreting:
        return "TRITON_INTERPRET=1 was not set before triton was imported"
    return None


@functools.cache
def _tl_dtypes() -> dict[np.dtype, Any]:
    import triton.language as tl

    return {
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

    The interpreter expects torch tensors; it calls ``data_ptr()`` and reads
    ``dtype`` (all a kernel sees), and for its host copy of device tensors
    ``untyped_storage()``, ``new_empty()``, ``set_()``, ``storage_offset()``,
    ``size()`` and ``stride()``. The array already lives on the host, so that
    "copy" is the array itself and the kernel writes into it directly.

    Args:
      array: The array (C-contiguous; it is flattened, as a kernel sees it).
    """

    def __init__(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("NumpyTensor needs a C-contiguous array")
        self.array = array.reshape(-1)
        dtype = np.dtype(array.dtype)
        if dtype not in _tl_dtypes():
            raise TypeError(f"no Triton type for {dtype}")
        self.dtype = _tl_dtypes()[dtype]

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
    """The interpreter rounds float32 -> bfloat16 to nearest even and widens exactly.

    Triton 3.6's interpreter truncates and mishandles subnormals; within this
    context those two conversions use ``ml_dtypes``, as a GPU converts.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        pair = (src.dtype.scalar, dst_type.scalar)
        if pair == (tl.float32, tl.bfloat16):
            data = src.data.astype(ml_dtypes.bfloat16).view(np.uint16)
        elif pair == (tl.bfloat16, tl.float32):
            data = src.data.view(ml_dtypes.bfloat16).astype(np.float32)
        else:
            return original(self, src, dst_type)
        return interpreter.TensorHandle(data, dst_type.scalar)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = original


@contextlib.contextmanager
def device_calls_without_repatching() -> Iterator[None]:
    """Calls of ``@triton.jit`` helpers re-patch ``triton.language`` once per launch.

    The interpreter patches the ``triton.language`` modules a callee's globals
    refer to on every call from one jit function to another, and never undoes
    it; within this context only the first call for each set of modules
    patches. Speed only: the same code runs.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    cls = interpreter.InterpretedFunction
    original = cls.__call__
    patched: set[frozenset[int]] = set()

    def call(self, *args, **kwargs):
        key = frozenset(id(v) for v in self.fn.__globals__.values() if v is tl or v is tl.core)
        if key not in patched:
            interpreter._patch_lang(self.fn)
            patched.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

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
    starts as zeros, any other as NaN (-1 for integers). IEEE arithmetic
    raises no warnings (NaN gradients, 0/0 in a ratio then replaced by 1).
    """
    from . import entry

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
        kernel = entry.get_kernel(spec)
        args = [NumpyTensor(x) for x in (*inputs, *results)]
        with (
            _ONE_LAUNCH_AT_A_TIME,
            bfloat16_as_on_gpu(),
            device_calls_without_repatching(),
            np.errstate(all="ignore"),
        ):
            kernel[(grid,)](*args, **constexprs)
    return results


def launch_in_callback(spec, inputs, outputs, aliases, grid, constexprs, zeroed=()):
    """The ``step.Launcher`` of this backend: :func:`launch` in a ``jax.pure_callback``."""
    shapes = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outputs]

    def host(*arrays):
        # Looked up at each call (tests replace ``launch`` to watch the launches).
        return launch(spec, list(arrays), outputs, aliases, grid, constexprs, zeroed)

    return list(jax.pure_callback(host, shapes, *inputs))


def run(spec: StepSpec, inputs: StepInputs) -> StepResult:
    """The backend contract's step (``lars.contract``), the kernels interpreted."""
    return S.run(spec, inputs, launch_in_callback)


BACKEND = Backend(
    name="triton_interpret",
    run=run,
    unavailable=unavailable,
    unsupported=unsupported,
    features=lambda platform: FEATURES,
    dtypes=FLOAT32_COMPUTE_DTYPES,
    options=options,
)
