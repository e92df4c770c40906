"""The backend registry and the routing of one step: the only caller of ``Backend.run``.

Backends are registered by module path and imported on first use (a module
defines ``BACKEND``, a ``lars.contract.Backend``). :func:`run_step` decides,
for one step, everything the contract leaves to the front end: which route
(one device, a mesh, inside ``jax.shard_map``), which features to ask for,
the derivative rule, and what to run where the backend lacks a feature.

Two things no backend sees: a hyperparameter given as a schedule is asked
about as a traced value (it changes every step, so a backend that compiles
hyperparameters in must refuse it even in an eager step), and arrays whose
type carries a sharding over ``Explicit`` mesh axes reach a kernel backend
with those axes switched to ``Auto`` (``jax.sharding.auto_axes``), its results
resharded as the params and momenta were; the reference keeps the explicit
types.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lars import _reference, _sharded
from lars._autodiff import call
from lars.contract import Backend, Feature, StepInputs, StepResult, StepSpec

# name -> the module that defines its BACKEND.
_MODULES: dict[str, str] = {
    "reference": "lars._reference",
    "native": "lars.kernels.native",
    "pallas": "lars.kernels.pallas",
    "triton": "lars.kernels.triton",
}
_LOADED: dict[str, Backend] = {}

# The order "auto" tries backends in, fastest first, per platform. Each entry is
# backed by a measurement in bench/results/ (the reference is the fallback).
# GPU (bench/results/h200-2026-12-04/, one H200): on ResNet-50 fp32 native and
# pallas ran alike (in place 0.290 and 0.287 ms, updates 0.632 and 0.583;
# triton 0.34 and 0.86, the reference 0.96, optax 1.39); on a 64M-element
# array native led (0.512 and 0.634 ms against pallas' 0.539 and 0.719) and
# compiled ResNet-50's step in about 1 s against pallas' 15. Pallas needs no
# build, so it comes next where the CUDA handler was not built.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("native", "reference"),
    "gpu": ("native", "pallas", "triton", "reference"),
    "tpu": ("reference",),
}


def register(name: str, module: str) -> None:
    """Registers the backend that ``module`` (a module path) defines as ``BACKEND``.

    The module is imported when the backend is first used; a name registered
    again is replaced.
    """
    _MODULES[name] = module
    _LOADED.pop(name, None)


def get(name: str) -> Backend:
    """The registered backend ``name`` (importing its module on first use)."""
    if name not in _LOADED:
        backend = importlib.import_module(_MODULES[name]).BACKEND
        if backend.name != name:
            raise ValueError(f"{_MODULES[name]} defines backend {backend.name!r}, not {name!r}")
        _LOADED[name] = backend
    return _LOADED[name]


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    platform = jax.default_backend()
    return [name for name in _MODULES if get(name).unavailable(platform) is None]


def resolve(name: str, options: dict | None = None, platform: str | None = None) -> Backend:
    """Returns the backend to use for ``name`` on ``platform``.

    Args:
      name: "auto" or a registered backend name. "auto" takes the first of
        ``_AUTO_ORDER[platform]`` that can run here and, where the process
        has several devices, updates shard by shard (``GIVEN_RATIOS``); else
        the reference.
      options: ``backend_options``; only with an explicit name.
      platform: "cpu", "gpu" or "tpu"; the default JAX backend when None.

    Raises:
      ValueError: for an unknown name, or options with "auto".
      RuntimeError: for a backend that cannot run on this machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {name!r}")
    platform = platform or jax.default_backend()
    if name == "auto":
        if options:
            raise ValueError("backend_options need an explicit backend= name, not 'auto'")
        several = _sharded.needed()
        for candidate in _AUTO_ORDER.get(platform, ("reference",)):
            if candidate not in _MODULES or get(candidate).unavailable(platform) is not None:
                continue
            if several and Feature.GIVEN_RATIOS not in get(candidate).features(platform):
                # Sharded params would reach it whole (XLA gathers a custom
                # call's operands): on several devices only a backend that
                # updates shard by shard, else the reference (XLA partitions it).
                continue
            return get(candidate)
        return get("reference")
    if name not in _MODULES:
        known = ", ".join(["auto", *_MODULES])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}")
    backend = get(name)
    missing = backend.unavailable(platform)
    if missing is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {missing}")
    return backend


def unsupported_reason(
    backend: Backend, spec: StepSpec, paths: Sequence[str], *, runtime: Sequence[str] = ()
) -> str | None:
    """None when ``backend`` computes ``spec``, else why not (naming the leaf for a dtype).

    Args:
      backend: The backend asked.
      spec: The step.
      paths: The leaves' paths, for the reason.
      runtime: Names of hyperparameters that change from step to step (a
        schedule's values): the backend is asked about them as traced values,
        as it sees them under ``jax.jit``, whether or not they are concrete
        in this step.
    """
    if backend.dtypes is not None:
        for path, leaf in zip(paths, spec.leaves, strict=True):
            pair = (leaf.param_dtype, leaf.grad_dtype)
            if pair not in backend.dtypes:
                return (
                    f"it does not compute {pair[0]} params with {pair[1]} gradients "
                    f"(the leaf at {path}); use backend='reference'"
                )
    platform = jax.default_backend()
    if not runtime:
        return backend.unsupported(spec, platform)
    reasons = []

    def ask(*values: jax.Array) -> tuple:
        config = dataclasses.replace(spec.config, **dict(zip(runtime, values, strict=True)))
        reasons.append(backend.unsupported(spec.replace(config=config), platform))
        return ()

    jax.eval_shape(ask, *(jax.ShapeDtypeStruct((), jnp.float32) for _ in runtime))
    return reasons[0]


def check_step(
    backend: Backend,
    spec: StepSpec,
    paths: Sequence[str],
    *,
    auto: bool,
    runtime: Sequence[str] = (),
) -> Backend:
    """The backend that runs ``spec``: ``backend``, or with ``auto`` the reference
    when ``backend`` cannot.

    ``runtime`` names the hyperparameters given as schedules (see
    :func:`unsupported_reason`).

    Raises:
      TypeError: naming the leaf, for a dtype pair the backend does not compute.
      ValueError: for a step the backend does not support.
    """
    reason = unsupported_reason(backend, spec, paths, runtime=runtime)
    if reason is None:
        return backend
    if auto:
        return get("reference")
    error = TypeError if "gradients (the leaf at" in reason else ValueError
    if runtime and error is ValueError:
        names = ", ".join(runtime)
        reason += f" ({names} is given as a schedule: its value changes every step)"
    raise error(f"backend {backend.name!r} cannot run this step: {reason}")


def run_step(
    backend: Backend, spec: StepSpec, paths: Sequence[str], inputs: StepInputs
) -> tuple[StepResult, bool, bool]:
    """One step on the leaves, routed; the only place a route is chosen.

    Args:
      backend: The resolved backend (``check_step`` passed).
      spec: The step, with ``write_params`` as the caller wants it, and
        ``skip_nonfinite`` False.
      paths: The leaves' paths, for errors.
      inputs: The leaves, the learning rate, and the all-finite flag of a
        ``skip_nonfinite`` step (else None).

    Returns:
      (result, in_place, skipped_itself): ``in_place`` says whether the first
      field holds new params (``spec.write_params`` and the backend wrote
      them); ``skipped_itself`` whether the backend took ``finite`` (else the
      caller must leave params and momentum in place on a skipped step).
    """
    platform = jax.default_backend()
    features = backend.features(platform)
    in_place = spec.write_params and Feature.IN_PLACE in features
    spec = spec.replace(write_params=in_place)
    plain = inputs._replace(finite=None)
    axes = _sharded.manual_axes(paths, inputs.params, inputs.grads)
    if axes is not None:
        # Inside shard_map: local shards, norms summed over the axes that
        # shard each leaf; a backend that cannot run there updates in XLA.
        local = backend if Feature.SHARD_MAP in features else _reference.BACKEND
        return _sharded.manual_step(local, spec, plain, axes), in_place, False
    if Feature.GIVEN_RATIOS in features and _sharded.needed():
        # Several devices: the backend runs shard by shard, its norms added
        # over the shards (one device's leaves are whole and run as below).
        step = lambda x: _sharded.sharded_step(backend, spec, x)
        return _on_auto_axes(backend, step, plain), in_place, False
    skips = inputs.finite is not None and Feature.SKIP_NONFINITE in features
    spec = spec.replace(skip_nonfinite=skips)
    step = lambda x: call(backend, spec, x)
    return _on_auto_axes(backend, step, inputs if skips else plain), in_place, skips


def _on_auto_axes(backend: Backend, step, inputs: StepInputs) -> StepResult:
    """``step(inputs)``; for a kernel backend on arrays typed as sharded over
    Explicit mesh axes, with those axes switched to Auto (the reference runs on
    the explicit types itself)."""
    if backend is _reference.BACKEND:
        return step(inputs)
    return _sharded.on_auto_axes(step, inputs)


def all_finite(leaves: Sequence[jax.Array]) -> jax.Array:
    """A bool scalar: every entry of every leaf is finite."""
    # sum(x * 0) is 0 when every entry is finite and NaN when one is not; XLA
    # fuses it into one reduction per leaf (no per-element temporary, so a step
    # with donated params stays in place), and the sum of a sharded leaf's
    # shards keeps the NaN (a cross-device max dropped it on a CPU mesh).
    flags = [jnp.isfinite(jnp.sum(x * 0)) for x in leaves]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
