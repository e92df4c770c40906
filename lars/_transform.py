"""``lars.lars``: LARS as an ``optax.GradientTransformation``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lars import _dispatch
from lars._config import LarsConfig, check_learning_rate
from lars._reference import compute_dtype
from lars._trees import MaskOrFn, check_like_params, check_params, resolve_mask


class LarsState(NamedTuple):
    """State of :func:`lars.lars` (and of :class:`lars.Lars`)."""

    count: jax.Array  # int32 scalar: the number of steps taken so far.
    momentum: optax.Updates  # per-leaf momentum v, float32 (float64 for float64 params).
    trust_ratio: optax.Updates  # per-leaf float32 scalar: ratio r of the last step (1 before).


@dataclasses.dataclass(frozen=True)
class LarsSpec:
    """Everything a step needs besides arrays: hyperparameters, masks, backend."""

    config: LarsConfig
    backend: _dispatch.Backend
    weight_decay_mask: MaskOrFn = None
    trust_ratio_mask: MaskOrFn = None


def make_spec(
    *,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    weight_decay_mask: MaskOrFn,
    trust_ratio_mask: MaskOrFn,
    trust_clip: float | None,
    grad_clip_norm: float | None,
    grad_clip_value: float | None,
    lr_inside_momentum: bool,
    backend: str,
) -> LarsSpec:
    """Validates every hyperparameter and resolves the backend."""
    config = LarsConfig(
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        trust_clip=trust_clip,
        grad_clip_norm=grad_clip_norm,
        grad_clip_value=grad_clip_value,
        lr_inside_momentum=lr_inside_momentum,
    )
    return LarsSpec(
        config=config,
        backend=_dispatch.resolve(backend, config),
        weight_decay_mask=weight_decay_mask,
        trust_ratio_mask=trust_ratio_mask,
    )


def init_state(params: Any) -> LarsState:
    """Zero momentum (float32 or wider), ratios of 1, count 0; checks the leaves."""
    check_params(params)
    return LarsState(
        count=jnp.zeros((), jnp.int32),
        # zeros_like keeps a sharded param's sharding for its momentum.
        momentum=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=compute_dtype(jnp.result_type(p))), params
        ),
        trust_ratio=jax.tree.map(lambda p: jnp.ones((), jnp.float32), params),
    )


def apply_lars(
    grads: Any, state: LarsState, params: Any, lr: jax.Array, spec: LarsSpec
) -> tuple[Any, LarsState]:
    """One LARS step: checks the inputs, then calls the backend on all leaves.

    Args:
      grads: Gradients, shaped like ``params``.
      state: The current ``LarsState``.
      params: The current parameters.
      lr: The learning rate of this step (a scalar).
      spec: Hyperparameters, masks and backend.

    Returns:
      (updates, new_state): ``params + updates`` are the new parameters.

    Raises:
      ValueError, TypeError: on malformed input, naming the offending leaf.
    """
    if params is None:
        raise ValueError("lars needs params: call update(grads, state, params)")
    if not isinstance(state, LarsState):
        raise TypeError(f"state must be a LarsState, got {type(state).__name__}")
    check_params(params)
    check_like_params("grads", grads, params)
    check_like_params("state.momentum", state.momentum, params, grads=False)
    decay_mask = resolve_mask(spec.weight_decay_mask, params, "weight_decay_mask")
    trust_mask = resolve_mask(spec.trust_ratio_mask, params, "trust_ratio_mask")

    p_leaves, treedef = jax.tree.flatten(params)
    result = spec.backend.step(
        [jnp.asarray(p) for p in p_leaves],
        [jnp.asarray(g) for g in treedef.flatten_up_to(grads)],
        treedef.flatten_up_to(state.momentum),
        jnp.asarray(lr, jnp.float32),
        config=spec.config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
    )
    new_state = LarsState(
        count=optax.safe_increment(state.count),
        momentum=treedef.unflatten(result.momentum),
        trust_ratio=treedef.unflatten(result.trust_ratio),
    )
    return treedef.unflatten(result.updates), new_state


def lars(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    *,
    nesterov: bool = False,
    weight_decay_mask: MaskOrFn = None,
    trust_ratio_mask: MaskOrFn = None,
    trust_clip: float | None = None,
    grad_clip_norm: float | None = None,
    grad_clip_value: float | None = None,
    lr_inside_momentum: bool = False,
    backend: str = "auto",
) -> optax.GradientTransformation:
    r"""LARS: layer-wise adaptive rate scaling, as an optax transformation.

    By default this is exactly ``braintools.optim.Lars`` (0.4.0)::

      g  <- clip_by_global_norm(g), clip(g)          (when asked for)
      g  <- g + weight_decay * w                     (coupled decay)
      r  =  trust_coefficient * ||w|| / (||g|| + eps), per array leaf
      r  =  1 where ||w|| == 0 or ||g|| == 0
      v  <- momentum * v + r * g
      w  <- w - lr_t * v

    With ``lr_inside_momentum=True`` and ``eps=0.0`` it is ``optax.lars``
    (``v <- momentum * v + lr_t * r * g; w <- w - v``).

    Args:
      learning_rate: A float, or an optax schedule (a callable of the step
        count, evaluated before the count is advanced).
      momentum: Momentum factor, in [0, 1).
      weight_decay: Coupled L2 decay added to the gradient before the trust
        ratio, >= 0.
      trust_coefficient: eta, > 0.
      eps: Added to ``||g||`` in the ratio's denominator, >= 0.
      nesterov: Step along ``r*g + momentum*v_new`` (optax/PyTorch Nesterov).
      weight_decay_mask: Pytree of bools (or a prefix of params), or a callable
        ``params -> such a pytree``; where False, no weight decay.
      trust_ratio_mask: Same form; where False, ``r = 1``.
        :func:`lars.exclude_bias_and_norm` is a ready mask for both.
      trust_clip: If set, ``r = min(r, trust_clip)`` on every leaf whose ratio
        is adaptive (``trust_clip=1.0`` is LARC clipping).
      grad_clip_norm: If set, clip all gradients to this global L2 norm first.
      grad_clip_value: If set, then clip every entry to ``[-v, v]``.
      lr_inside_momentum: The optax.lars form of momentum (see above).
      backend: "auto" or a backend name (see :func:`lars.available_backends`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`LarsState`.
      ``update(grads, state, params)`` needs ``params``.

    Raises:
      ValueError, TypeError: for a hyperparameter out of range or of the wrong
        type, or an unknown backend; RuntimeError for a backend that cannot run
        on this machine.

    Example:
      >>> import jax.numpy as jnp, optax, lars
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> opt = lars.lars(0.1, weight_decay=1e-4)
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> print(state.count, params["b"])
      1 [-0.1 -0.1 -0.1]

    References:
      You, Gitman & Ginsburg, `Large Batch Training of Convolutional Networks
      <https://arxiv.org/abs/1708.03888>`_, 2017.
    """
    if not callable(learning_rate):
        if hasattr(learning_rate, "get_lr"):
            raise TypeError(
                "learning_rate is a scheduler object; lars.lars takes a float or an optax "
                "schedule (a callable of the step count). Use lars.Lars for scheduler objects."
            )
        check_learning_rate(learning_rate)
    spec = make_spec(
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        weight_decay_mask=weight_decay_mask,
        trust_ratio_mask=trust_ratio_mask,
        trust_clip=trust_clip,
        grad_clip_norm=grad_clip_norm,
        grad_clip_value=grad_clip_value,
        lr_inside_momentum=lr_inside_momentum,
        backend=backend,
    )

    def update_fn(grads: Any, state: LarsState, params: Any = None) -> tuple[Any, LarsState]:
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        return apply_lars(grads, state, params, lr, spec)

    return optax.GradientTransformation(init_state, update_fn)
