"""The "triton" backend: the multi-tensor LARS step on Triton kernels, launched by jax-triton.

A step is one fused launch per (param dtype, grad dtype) group of up to
``slots`` leaves (norms, trust ratios and update; plus a global-norm launch
with ``grad_clip_norm``), on an NVIDIA GPU with triton and jax-triton
installed. It writes in place (``Feature.IN_PLACE``) and skips a non-finite
step in the kernels (``Feature.SKIP_NONFINITE``); float32, bfloat16 and
float16 params, computed in float32. Nothing here imports triton or
jax-triton until a step runs. Design and status: docs/triton.md.

Backend options (``backend_options=``), the launch geometry (``plan.Tuning``):

* ``slots`` (int >= 1, default 192): leaves per launch (64 fits the 4 kB of
  kernel parameters of CUDA before 12.1).
* ``chunk`` (int, a multiple of ``block``, default 8192): elements per program.
* ``block`` (int, a power of two, default 1024): elements per vector step.
* ``num_warps`` (int, a power of two, default 4): warps per program.
* ``fused`` (bool, default True): one fused launch per dtype group; False
  runs a norm launch, then an update launch.
* ``lookahead`` (int >= 0, default 256): fused launch, items between a
  layer's partial sums and its update.

Modules: ``plan`` (the launch plan, plain Python), ``kernels`` and
``programs`` (the ``@triton.jit`` code), ``entry`` (the generated entry
points), ``reference`` (NumPy references of the passes), ``step`` (the step,
whatever the launcher), ``backend`` (the jax-triton launcher), ``interpret``
(the "triton_interpret" backend: Triton's interpreter, for tests), ``aot``
(compiling for a GPU target without a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from lars.contract import (
    FLOAT32_COMPUTE_DTYPES,
    Backend,
    Feature,
    StepSpec,
    lazy,
)

from . import plan

# The jax-triton release this backend is written and checked against.
JAX_TRITON_VERSION = "0.3.1"

FEATURES = frozenset({Feature.IN_PLACE, Feature.SKIP_NONFINITE})


@functools.cache
def _import_problem() -> str | None:
    """None if triton and jax-triton import, else a sentence naming what is missing."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    try:
        import jax_triton  # noqa: F401
    except ModuleNotFoundError:
        return f"jax-triton is not installed (pip install jax-triton=={JAX_TRITON_VERSION})"
    except ImportError as e:  # jax-triton needs a jaxlib with GPU support
        return f"jax-triton cannot be imported: {e}"
    return None


def unavailable(platform: str) -> str | None:
    """None if the backend can run on ``platform`` here, else what is missing."""
    if platform != "gpu":
        return f"no GPU: the Triton kernels run on an NVIDIA GPU (JAX's platform is {platform!r})"
    return _import_problem()


def unsupported(spec: StepSpec, platform: str) -> str | None:
    """None (every option of the step is supported) unless a leaf is too large for the tables."""
    del platform
    return plan.too_large(spec)


def options(given: Mapping[str, Any]) -> dict[str, Any]:
    """Checks ``backend_options`` (the fields of ``plan.Tuning``); returns them normalised.

    Raises:
      ValueError: for an unknown option or a value out of range.
      TypeError: for a value of the wrong type.
    """
    fields = {f.name: f.type for f in dataclasses.fields(plan.Tuning)}
    normalised: dict[str, Any] = {}
    for name, value in given.items():
        if name not in fields:
            known = ", ".join(fields)
            raise ValueError(f"unknown triton backend option {name!r}; known: {known}")
        want_bool = fields[name] in (bool, "bool")
        is_bool = isinstance(value, (bool, np.bool_))
        if is_bool != want_bool or not (is_bool or isinstance(value, numbers.Integral)):
            kind = "a bool" if want_bool else "an int"
            raise TypeError(f"triton backend option {name!r} must be {kind}, got {value!r}")
        normalised[name] = bool(value) if want_bool else int(value)
    plan.Tuning(**normalised)  # the ranges, naming the option
    return normalised


BACKEND = Backend(
    name="triton",
    run=lazy("lars.kernels.triton.backend:run"),
    unavailable=unavailable,
    unsupported=unsupported,
    features=lambda platform: FEATURES,
    dtypes=FLOAT32_COMPUTE_DTYPES,
    options=options,
)
