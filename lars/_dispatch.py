"""Backend registry: maps a backend name to an implementation of the LARS step.

Every backend implements the same multi-tensor signature as
``lars._reference.reference_step``; the public API only resolves a name here
and calls the backend (public API -> dispatch -> backend -> kernel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from lars._config import LarsConfig
from lars._reference import reference_step


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the LARS step.

    Attributes:
      name: The name users pass as ``backend=``.
      step: The step function (signature of ``reference_step``).
      unavailable: Returns None when the backend can run here, else a sentence
        naming what is missing (no GPU, a package not installed, ...).
      unsupported: Returns None when the backend handles ``config``, else a
        sentence naming the option it lacks.
      apply: Optional. The same signature as ``step``, but the first field of
        the result holds the new params (``optax.apply_updates(params,
        updates)``, bit for bit) instead of the updates, so a backend can write
        them over the donated params' buffers; None when it has no such form.
      update_with_ratios: Optional. The update half of the step for sharded
        params (``lars._sharded``): the signature of ``step`` plus ``ratios``
        (one per leaf) and ``global_norm`` after ``lr``, and ``write_params``;
        None for a backend that XLA partitions itself (the reference) or that
        has no such form (its leaves are then gathered on every device).
      skips_nonfinite: Returns True when ``step`` and ``apply`` take a
        ``finite`` flag (a bool scalar) here and, when it is False, leave params
        and momentum in place (updates -0.0), so that ``skip_nonfinite`` needs
        no copies of them.
      dtypes: The (param dtype, grad dtype) pairs the backend computes in, or
        None for every pair the front end accepts. The front end rejects other
        leaves by path before calling the backend.
    """

    name: str
    step: Callable
    unavailable: Callable[[], str | None] = lambda: None
    unsupported: Callable[[LarsConfig], str | None] = lambda config: None
    apply: Callable | None = None
    update_with_ratios: Callable | None = None
    skips_nonfinite: Callable[[], bool] = lambda: False
    dtypes: frozenset | None = None


_REGISTRY: dict[str, Backend] = {}

# The order "auto" tries backends in, fastest first, per platform. Each entry is
# backed by a measurement in bench/results/ (the reference is the fallback).
# cpu: the native (XLA FFI) step beats the reference on the ResNet-50 parameter
# set in every form measured (kernels/native/bench_resnet50.py).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("native", "reference"),
    "gpu": ("reference",),
    "tpu": ("reference",),
}


def register(backend: Backend) -> None:
    """Adds ``backend`` to the registry (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend


register(Backend(name="reference", step=reference_step))


def _register_native() -> None:
    """Registers the XLA FFI backend (lars.kernels.native); its library loads lazily."""
    from lars.kernels import native

    register(
        Backend(
            name="native",
            step=native.step,
            unavailable=native.unavailable,
            unsupported=native.unsupported,
            apply=native.apply,
            update_with_ratios=native.step_with_ratios,
            skips_nonfinite=native.skips_nonfinite,
            dtypes=frozenset(native.SUPPORTED_DTYPES),
        )
    )


_register_native()


def _pallas_step(*args, **kwargs):
    from lars.kernels.pallas import backend

    return backend.pallas_step(*args, **kwargs)


def _pallas_apply(*args, **kwargs):
    from lars.kernels.pallas import backend

    return backend.pallas_apply(*args, **kwargs)


def _pallas_unavailable() -> str | None:
    from lars.kernels.pallas import backend

    return backend.unavailable()


def _pallas_update_with_ratios(*args, **kwargs):
    from lars.kernels.pallas import backend

    return backend.update_with_ratios(*args, **kwargs)


# float32/bfloat16/float16 params with grads of their dtype or lower precision
# (the Pallas and Triton kernels compute in float32; no float64).
_KERNEL_DTYPES = frozenset(
    (np.dtype(p), np.dtype(g))
    for p, g in [
        (jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16),
        (jnp.float32, jnp.float16),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float16),
    ]
)

# The Pallas kernels (lars.kernels.pallas): Mosaic GPU on Hopper, Mosaic TPU on
# TPU, interpret mode on a CPU. Imported on first use (Pallas is slow to import).
register(
    Backend(
        name="pallas",
        step=_pallas_step,
        unavailable=_pallas_unavailable,
        apply=_pallas_apply,
        update_with_ratios=_pallas_update_with_ratios,
        skips_nonfinite=lambda: True,
        dtypes=_KERNEL_DTYPES,
    )
)


def _triton_backend():
    from lars.kernels.triton import backend

    return backend


# The Triton kernels (lars.kernels.triton), launched by jax-triton on a CUDA
# GPU. Imported on first use; triton and jax-triton only when a step runs.
register(
    Backend(
        name="triton",
        step=lambda *a, **k: _triton_backend().triton_step(*a, **k),
        unavailable=lambda: _triton_backend().unavailable(),
        unsupported=lambda config: _triton_backend().unsupported(config),
        apply=lambda *a, **k: _triton_backend().triton_apply(*a, **k),
        skips_nonfinite=lambda: True,
        dtypes=_KERNEL_DTYPES,
    )
)


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return [name for name, b in _REGISTRY.items() if b.unavailable() is None]


def resolve(name: str, config: LarsConfig, platform: str | None = None) -> Backend:
    """Returns the backend to use for ``name`` on ``platform``.

    Args:
      name: "auto" or a registered backend name.
      config: The hyperparameters; a backend lacking one of the options raises.
      platform: "cpu", "gpu" or "tpu"; the default JAX backend when None.

    Raises:
      ValueError: for an unknown name, or a backend that lacks an option.
      RuntimeError: for a backend that cannot run on this machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {name!r}")
    if name == "auto":
        if platform is None:
            import jax

            platform = jax.default_backend()
        for candidate in _AUTO_ORDER.get(platform, ("reference",)):
            backend = _REGISTRY.get(candidate)
            if backend and backend.unavailable() is None and backend.unsupported(config) is None:
                return backend
        return _REGISTRY["reference"]
    if name not in _REGISTRY:
        known = ", ".join(["auto", *_REGISTRY])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}")
    backend = _REGISTRY[name]
    missing = backend.unavailable()
    if missing is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {missing}")
    lacking = backend.unsupported(config)
    if lacking is not None:
        raise ValueError(f"backend {name!r} does not support this configuration: {lacking}")
    return backend
