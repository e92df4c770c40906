"""The backend contract: the one agreement between the front end and every backend.

A backend is a module that defines ``BACKEND``, a :class:`Backend`, is
registered by module path in ``lars._dispatch``, imports nothing of ``lars``
but this module, and implements one function, ``Backend.run``::

    run(spec: StepSpec, inputs: StepInputs) -> StepResult

The front end (``lars.lars``, ``lars.Lars``) makes every decision before
``run`` is called:

* it checks the pytrees and masks, and flattens them into lists of leaves in
  one order, ``spec.leaves[i]`` describing leaf ``i``;
* it refuses leaves whose (param, grad) dtype pair is not in
  ``Backend.dtypes``, naming their path, and asks ``Backend.unsupported``;
* it asks for a :class:`Feature` only where ``Backend.features`` lists it:
  ``spec.write_params`` (``IN_PLACE``), a ``finite`` flag
  (``SKIP_NONFINITE``), given ``ratios`` (``GIVEN_RATIOS``, on several
  devices) and calls inside ``jax.shard_map`` (``SHARD_MAP``); where a feature
  is missing the front end does that part itself or runs the reference;
* it wraps ``run`` in the reference step's derivative rule (``custom_jvp``)
  unless the backend is ``DIFFERENTIABLE``.

What ``run`` receives in ``inputs``: ``len(spec.leaves)`` params, grads and
momenta of the shapes and dtypes in ``spec.leaves``; ``lr`` a float32 scalar;
``finite`` a bool scalar exactly when ``spec.skip_nonfinite``; ``ratios`` (one
per leaf, float32, or float64 when a leaf computes in float64 or complex128)
and the scalar ``global_norm`` exactly when ``spec.given_ratios``. Complex
leaves (complex64/complex128 params, computed in their own dtype, norms of
``|x|``) reach only backends whose ``dtypes`` list them (the reference).

What ``run`` returns: a :class:`StepResult` of ``len(spec.leaves)`` entries per
field. With ``spec.write_params`` the first field holds the new params
(``optax.apply_updates(params, updates)`` bit for bit), else the updates. With
``finite`` False nothing moves: params (or updates of -0.0) and momenta as they
were, ratios of 1. The step is the reference's (``lars._reference.run``)
up to the order of the norms' sums.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lars._config import LarsConfig

__all__ = [
    "HYPERPARAMETERS",
    "NUM_SCALARS",
    "Backend",
    "Feature",
    "LarsConfig",
    "LeafSpec",
    "Scalar",
    "StepFlags",
    "StepInputs",
    "StepResult",
    "StepSpec",
    "compute_dtype",
    "lazy",
    "norm_dtype",
    "scalars",
]

#: The hyperparameters of a step, in the order of ``LarsConfig``. The native
#: handlers take them under these names (``Hyper`` in
#: kernels/native/lars_common.h; a test holds the two lists equal).
HYPERPARAMETERS = (
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "eps",
    "trust_clip",
    "grad_clip_norm",
    "grad_clip_value",
)


class Scalar(enum.IntEnum):
    """Positions in the float32 vector of run-time scalars a kernel reads.

    Values that may change from step to step reach kernels as data, never as
    compiled-in constants, so a new learning rate does not recompile.
    """

    LR = 0  #: the learning rate of this step
    MOMENTUM = 1  #: mu
    WEIGHT_DECAY = 2  #: 0 when weight decay is off
    CLIP_DIVISOR = 3  #: ||g|| when the global-norm clip triggers, else 1
    CLIP_FACTOR = 4  #: grad_clip_norm when the clip triggers, else 1
    CLIP_VALUE = 5  #: 0 when value clipping is off
    TRUST_COEFFICIENT = 6  #: eta
    EPS = 7  #: added to ||g|| in the trust ratio
    TRUST_CLIP = 8  #: 0 when trust clipping is off
    FINITE = 9  #: 1 for a step to take, 0 for one to skip


NUM_SCALARS = 16  #: The length of the scalars vector (padded to 64 bytes).


def scalars(
    lr: jax.Array,
    config: LarsConfig,
    *,
    finite: jax.Array | None = None,
    global_norm: jax.Array | None = None,
) -> jax.Array:
    """The float32 ``(NUM_SCALARS,)`` vector laid out as :class:`Scalar`.

    Args:
      lr: The learning rate of this step.
      config: The hyperparameters (traced values are fine).
      finite: The step's finite flag, if any (FINITE is 1 without one).
      global_norm: The global gradient norm; with ``config.grad_clip_norm`` it
        sets CLIP_DIVISOR and CLIP_FACTOR as ``optax.clip_by_global_norm``
        does (``g <- g`` if ``||g|| < c`` else ``(g / ||g||) * c``).
    """
    one = jnp.ones((), jnp.float32)
    f32 = lambda x: jnp.asarray(0.0 if x is None else x, jnp.float32)
    values = {
        Scalar.LR: f32(lr),
        Scalar.MOMENTUM: f32(config.momentum),
        Scalar.WEIGHT_DECAY: f32(config.weight_decay if config.has_weight_decay else 0.0),
        Scalar.CLIP_DIVISOR: one,
        Scalar.CLIP_FACTOR: one,
        Scalar.CLIP_VALUE: f32(config.grad_clip_value),
        Scalar.TRUST_COEFFICIENT: f32(config.trust_coefficient),
        Scalar.EPS: f32(config.eps),
        Scalar.TRUST_CLIP: f32(config.trust_clip),
        Scalar.FINITE: one if finite is None else jnp.asarray(finite, jnp.float32),
    }
    if config.grad_clip_norm is not None and global_norm is not None:
        g_norm = jnp.asarray(global_norm, jnp.float32)
        trigger = g_norm < f32(config.grad_clip_norm)
        values[Scalar.CLIP_DIVISOR] = jnp.where(trigger, one, g_norm)
        values[Scalar.CLIP_FACTOR] = jnp.where(trigger, one, f32(config.grad_clip_norm))
    zero = jnp.zeros((), jnp.float32)
    return jnp.stack([values.get(i, zero) for i in range(NUM_SCALARS)])


def compute_dtype(param_dtype: Any) -> np.dtype:
    """Accumulation and momentum dtype for a param dtype: at least float32.

    float32 for bfloat16/float16/float32 params, float64 for float64; complex
    params keep their dtype (complex64, complex128), as ``optax.trace`` keeps
    a complex momentum.
    """
    return np.dtype(jnp.promote_types(param_dtype, jnp.float32))


def norm_dtype(dtype: Any) -> np.dtype:
    """The real dtype of the norms and trust ratio of a compute dtype.

    The dtype itself for a real one; float32 for complex64 and float64 for
    complex128 (``jnp.linalg.norm`` of a complex array is real).
    """
    return np.dtype(jnp.finfo(dtype).dtype)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """The static facts of one leaf.

    Attributes:
      shape: The param's (and grad's, and momentum's) shape.
      param_dtype: The param's dtype (and the updates').
      grad_dtype: The gradient's dtype (the param's or lower precision; a real
        dtype of the param's precision or lower for complex params).
      momentum_dtype: The momentum's dtype, ``compute_dtype(param_dtype)``.
      decay: Weight decay applies to this leaf (its mask is True and the
        config's weight decay is on).
      trust: The trust ratio applies (else r = 1 and no norms are needed).
    """

    shape: tuple[int, ...]
    param_dtype: np.dtype
    grad_dtype: np.dtype
    momentum_dtype: np.dtype
    decay: bool
    trust: bool

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class StepFlags:
    """The switches of a step: which options are on, not their values.

    A jit-static key for kernels (``StepSpec.flags``): the spec's config holds
    the hyperparameters' values, which may be traced.

    Attributes:
      clip_norm: Global-norm clipping is on (``Scalar.CLIP_DIVISOR``/``CLIP_FACTOR``).
      clip_value: Element-wise clipping to ``[-CLIP_VALUE, CLIP_VALUE]`` is on.
      has_decay: Weight decay applies to at least one leaf.
      nesterov: Nesterov momentum.
      lr_inside_momentum: The optax form ``v = mu*v + lr*r*g; w -= v``.
      trust_clip: ``r = min(r, TRUST_CLIP)`` is on.
      write_params: ``StepSpec.write_params``.
      skip_nonfinite: ``StepSpec.skip_nonfinite``: the update reads ``FINITE``.
    """

    clip_norm: bool = False
    clip_value: bool = False
    has_decay: bool = False
    nesterov: bool = False
    lr_inside_momentum: bool = False
    trust_clip: bool = False
    write_params: bool = False
    skip_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about one step: hashable, so a ``jax.jit`` static argument.

    Attributes:
      config: The hyperparameters.
      leaves: One :class:`LeafSpec` per leaf, in the order of the arrays.
      write_params: The first result holds the new params, written over the
        params' buffers where the backend can (``Feature.IN_PLACE``).
      skip_nonfinite: ``run`` gets a ``finite`` flag (``Feature.SKIP_NONFINITE``).
      given_ratios: ``run`` gets each leaf's trust ratio and the global
        gradient norm, computed over whole layers by the front end, and only
        updates (``Feature.GIVEN_RATIOS``: shards of sharded params).
      options: The backend's options (``backend_options=``), as sorted
        (name, value) pairs.
    """

    config: LarsConfig
    leaves: tuple[LeafSpec, ...]
    write_params: bool = False
    skip_nonfinite: bool = False
    given_ratios: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def build(
        cls,
        config: LarsConfig,
        params: Sequence[Any],
        grads: Sequence[Any],
        *,
        decay_mask: Sequence[bool],
        trust_mask: Sequence[bool],
        **fields: Any,
    ) -> StepSpec:
        """The spec of a step on these leaves (shapes and dtypes read off the arrays)."""
        leaves = tuple(
            LeafSpec(
                shape=tuple(np.shape(p)),
                param_dtype=np.dtype(p.dtype),
                grad_dtype=np.dtype(g.dtype),
                momentum_dtype=compute_dtype(p.dtype),
                decay=bool(d) and config.has_weight_decay,
                trust=bool(t),
            )
            for p, g, d, t in zip(params, grads, decay_mask, trust_mask, strict=True)
        )
        return cls(config=config, leaves=leaves, **fields)

    def replace(self, **fields: Any) -> StepSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **fields)

    def with_shapes(self, params: Sequence[Any]) -> StepSpec:
        """The same step on arrays of other shapes (a device's shards of the leaves)."""
        leaves = tuple(
            dataclasses.replace(leaf, shape=tuple(np.shape(p)))
            for leaf, p in zip(self.leaves, params, strict=True)
        )
        return dataclasses.replace(self, leaves=leaves)

    @property
    def decay_mask(self) -> list[bool]:
        """Per leaf, whether weight decay applies."""
        return [leaf.decay for leaf in self.leaves]

    @property
    def trust_mask(self) -> list[bool]:
        """Per leaf, whether the trust ratio applies."""
        return [leaf.trust for leaf in self.leaves]

    @property
    def flags(self) -> StepFlags:
        """The step's switches (hashable even when the config holds tracers)."""
        config = self.config
        return StepFlags(
            clip_norm=config.grad_clip_norm is not None,
            clip_value=config.grad_clip_value is not None,
            has_decay=any(leaf.decay for leaf in self.leaves),
            nesterov=bool(config.nesterov),
            lr_inside_momentum=bool(config.lr_inside_momentum),
            trust_clip=config.trust_clip is not None,
            write_params=self.write_params,
            skip_nonfinite=self.skip_nonfinite,
        )

    def option(self, name: str, default: Any = None) -> Any:
        """The backend option ``name``, or ``default`` when it was not given."""
        return dict(self.options).get(name, default)


class StepInputs(NamedTuple):
    """The arrays of one step (lists in the order of ``spec.leaves``)."""

    params: Sequence[jax.Array]  #: the params
    grads: Sequence[jax.Array]  #: the gradients
    momentum: Sequence[jax.Array]  #: the momentum buffers
    lr: jax.Array  #: a float32 scalar
    finite: jax.Array | None = None  #: bool scalar, exactly when spec.skip_nonfinite
    ratios: jax.Array | None = None  #: one per leaf, exactly when spec.given_ratios
    global_norm: jax.Array | None = None  #: scalar, exactly when spec.given_ratios


class StepResult(NamedTuple):
    """What one step produces, leaf by leaf (lists in the order of ``spec.leaves``)."""

    updates: list[jax.Array]  #: the updates, or the new params with spec.write_params
    momentum: list[jax.Array]  #: the new momentum buffers
    trust_ratio: list[jax.Array]  #: the ratio applied to each leaf (float32 scalars)


class Feature(enum.Enum):
    """What a backend can do beyond the plain step (``Backend.features``)."""

    IN_PLACE = "in_place"  #: new params over the params' buffers (spec.write_params)
    SKIP_NONFINITE = "skip_nonfinite"  #: takes ``finite`` and then moves nothing
    GIVEN_RATIOS = "given_ratios"  #: updates shards with whole-layer ratios (a mesh)
    SHARD_MAP = "shard_map"  #: GIVEN_RATIOS also inside jax.shard_map
    DIFFERENTIABLE = "differentiable"  #: JAX differentiates run itself


Run = Callable[[StepSpec, StepInputs], StepResult]


def lazy(target: str) -> Run:
    """A ``run`` that imports ``"package.module:function"`` on its first call.

    A backend's ``BACKEND`` is cheap to import; its toolchain (Pallas, Triton,
    a shared library) loads when a step first runs.
    """
    module, _, name = target.partition(":")

    @functools.cache
    def load() -> Run:
        return getattr(importlib.import_module(module), name)

    def run(spec: StepSpec, inputs: StepInputs) -> StepResult:
        return load()(spec, inputs)

    run.__qualname__ = run.__name__ = f"lazy({target})"
    return run


def _no_reason(*args: Any) -> None:
    del args


def _no_options(options: Mapping[str, Any]) -> dict[str, Any]:
    if options:
        raise ValueError(f"this backend takes no backend_options, got {sorted(options)}")
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """One implementation of the LARS step.

    Attributes:
      name: The name users pass as ``backend=``.
      run: The step (see the module docstring for its signature and contract).
      unavailable: ``platform -> None`` when the backend can run on that JAX
        platform ("cpu", "gpu", "tpu") here, else a sentence naming what is
        missing (no GPU, a package or library not installed, ...).
      unsupported: ``(spec, platform) -> None`` when the backend computes that
        step, else a sentence naming what it lacks (an option, a traced
        hyperparameter, ...). Dtypes are checked against ``dtypes`` first.
      features: ``platform -> the Features the backend has there``.
      dtypes: The (param dtype, grad dtype) pairs the backend computes, or
        None for every pair the front end accepts.
      options: Validates the ``backend_options`` a user passed and returns
        them normalised (the default accepts none); raises ValueError or
        TypeError naming the option.
    """

    name: str
    run: Run
    unavailable: Callable[[str], str | None] = _no_reason
    unsupported: Callable[[StepSpec, str], str | None] = _no_reason
    features: Callable[[str], frozenset[Feature]] = lambda platform: frozenset()
    dtypes: frozenset[tuple[np.dtype, np.dtype]] | None = None
    options: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_options


def dtype_pairs(*pairs: tuple[Any, Any]) -> frozenset[tuple[np.dtype, np.dtype]]:
    """A ``Backend.dtypes`` set from (param dtype, grad dtype) pairs."""
    return frozenset((np.dtype(p), np.dtype(g)) for p, g in pairs)


# float32/bfloat16/float16 params with grads of their dtype or lower precision,
# computed in float32: the pairs of the GPU/TPU kernels.
FLOAT32_COMPUTE_DTYPES = dtype_pairs(
    (jnp.float32, jnp.float32),
    (jnp.float32, jnp.bfloat16),
    (jnp.float32, jnp.float16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16),
)
