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
* ``evict_first`` (bool, default True): fused launch, the update's loads and
  stores (each line's last use in the step) carry an evict-first L2 hint, so
  that the w and g the norms read stay in L2 until their update.
* ``pointer_table`` (bool, default False): fused launch, each item loads its
  leaf's pointers from a table of addresses that the program of item 0
  writes once per launch, instead of selecting them among the kernel's
  pointer arguments (a chain of predicated constant-bank loads per pointer).
* ``spin_limit`` (int >= 0, default 0): a debug switch of the fused launch;
  N > 0 bounds each wait for a trust ratio to N polls, and a wait that gives
  up makes the step raise instead of hanging (0 waits without bound).

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
import importlib.metadata
import numbers
import os
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

# The (triton, jax-triton) releases the backend is tested with: 3.6.0 / 0.3.1
# is the pair of the GPU images. jax-triton 0.4 needs triton >= 3.7 and has not
# been run. Another pair makes the backend unavailable, saying so, unless
# LARS_TRITON_UNTESTED=1 is set.
TESTED_VERSIONS: tuple[tuple[str, str], ...] = (("3.6.0", JAX_TRITON_VERSION),)
UNTESTED_ENV = "LARS_TRITON_UNTESTED"

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


def installed_versions() -> tuple[str, str] | None:
    """(triton, jax-triton) versions from the installed metadata (nothing is
    imported), or None when either is not installed."""
    try:
        return importlib.metadata.version("triton"), importlib.metadata.version("jax-triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(versions: tuple[str, str] | None) -> str | None:
    """None if ``versions`` (triton, jax-triton) is a tested pair (or unknown),
    else a sentence naming the installed and the tested pairs."""
    if versions is None:
        return None
    triton_version, jax_triton_version = (v.split("+")[0] for v in versions)
    if (triton_version, jax_triton_version) in TESTED_VERSIONS:
        return None
    tested = ", ".join(f"triton {t} with jax-triton {j}" for t, j in TESTED_VERSIONS)
    pins = " ".join(f"triton=={t} jax-triton=={j}" for t, j in TESTED_VERSIONS[:1])
    return (
        f"triton {versions[0]} with jax-triton {versions[1]} is not a tested pair "
        f"(tested: {tested}); install them with `pip install {pins}`, or set "
        f"{UNTESTED_ENV}=1 to run this pair anyway"
    )


def unavailable(platform: str) -> str | None:
    """None if the backend can run on ``platform`` here, else what is missing."""
    if platform != "gpu":
        return f"no GPU: the Triton kernels run on an NVIDIA GPU (JAX's platform is {platform!r})"
    if os.environ.get(UNTESTED_ENV) != "1":
        problem = version_problem(installed_versions())
        if problem is not None:
            return problem
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
