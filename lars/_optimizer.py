"""``lars.Lars``: the braintools-compatible optimizer object."""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars._config import check_learning_rate
from lars._holder import is_state_object, make_holder
from lars._transform import LarsState, LarsUpdate, init_state, lars
from lars._trees import MaskOrFn, check_like_params, check_params
from lars.schedules import ConstantLR

_STANDARD_DICTS = (dict, collections.OrderedDict, collections.defaultdict)


def _plain_dicts(tree: Any) -> Any:
    """Rebuilds dict subclasses that JAX flattens as custom nodes as plain dicts.

    ``brainstate``'s ``model.states(...)`` is a ``FlattedDict`` (a custom pytree
    node) while ``brainstate.transform.grad`` returns a plain dict with the same
    keys; like braintools, the weights are registered as a plain dict.
    """
    if not isinstance(tree, dict):
        return tree
    if type(tree) in _STANDARD_DICTS:
        out = copy.copy(tree)
        for k in out:
            out[k] = _plain_dicts(out[k])
        return out
    return {k: _plain_dicts(v) for k, v in tree.items()}


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "get_last_lr") and hasattr(obj, "step") and hasattr(obj, "current_lrs")


class Lars:
    """LARS with the ``braintools.optim.Lars`` interface.

    A drop-in for ``braintools.optim.Lars`` (same arguments, same numbers by
    default), plus the options of :func:`lars.lars`.

    Args:
      lr: A float; a scheduler from :mod:`lars.schedules` (or braintools),
        advanced by the user's ``scheduler.step()``; or an optax-style schedule
        callable, evaluated at the step count.
      momentum: Momentum factor, in [0, 1).
      weight_decay: Coupled L2 decay, >= 0.
      trust_coefficient: eta, > 0.
      eps: Added to the gradient norm, >= 0.
      grad_clip_norm: Clip all gradients to this global norm first.
      grad_clip_value: Then clip every entry to [-v, v].
      nesterov, weight_decay_mask, trust_ratio_mask, trust_clip,
      lr_inside_momentum, skip_nonfinite, backend, backend_options: As in
        :func:`lars.lars`, whose transformation this object steps.
      donate: Give the current params and optimizer state to each step's
        buffers (``jax.jit`` donation): on backends with an in-place form
        (``native``) a step then allocates nothing for them. Off by default,
        as in braintools: with it, arrays read from the optimizer or the
        params' states before a step are deleted by the step (read them
        again afterwards), and two params must not share one array.

    Example:
      >>> import jax.numpy as jnp, lars
      >>> opt = lars.Lars(lr=0.1, momentum=0.9)
      >>> opt = opt.register_trainable_weights({"w": jnp.ones(3), "b": jnp.zeros(3)})
      >>> opt.update({"w": jnp.ones(3), "b": jnp.ones(3)})
      >>> print(opt.params["b"], opt.step_count.value)
      [-0.1 -0.1 -0.1] 1
    """

    def __init__(
        self,
        lr: float | Any | Callable[[jax.Array], jax.Array] = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        *,
        nesterov: bool = False,
        weight_decay_mask: MaskOrFn = None,
        trust_ratio_mask: MaskOrFn = None,
        trust_clip: float | None = None,
        lr_inside_momentum: bool = False,
        skip_nonfinite: bool = False,
        backend: str = "auto",
        backend_options: dict | None = None,
        donate: bool = False,
    ) -> None:
        if not isinstance(donate, bool):
            raise TypeError(f"donate must be a bool, got {donate!r}")
        self._schedule_fn: Callable | None = None
        if _is_scheduler(lr):
            self._scheduler = lr
        elif callable(lr):
            self._scheduler = None
            self._schedule_fn = lr
        else:
            check_learning_rate(lr, "lr")
            self._scheduler = ConstantLR(base_lr=lr, factor=1.0, total_iters=0)
        # The step is lars.lars's: with a schedule function as its learning
        # rate, or with the scheduler's value passed to each step.
        self._tx = lars(
            self._schedule_fn or 0.0,
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
            skip_nonfinite=skip_nonfinite,
            backend=backend,
            backend_options=backend_options,
        )
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.step_count = make_holder(0)
        self.opt_state: Any = None  # holder of a LarsState once weights are registered
        self._targets: Any = None  # the registered pytree (arrays or state objects)
        self._arrays: Any = None  # current values of plain-array leaves
        # (params, grads, state, lr) -> (params, state): donated buffers come in
        # the order of the results, so each is reused for its own result.
        self._jit_step = jax.jit(self._step_impl, donate_argnums=(0, 2) if donate else ())

    # -- learning rate -------------------------------------------------------
    @property
    def lr(self) -> Any:
        """The scheduler (or schedule function) that gives the learning rate."""
        return self._scheduler if self._schedule_fn is None else self._schedule_fn

    @property
    def lr_scheduler(self) -> Any:
        """The scheduler object (None for a schedule function)."""
        return self._scheduler

    @property
    def base_lr(self) -> float:
        """The scheduler's base learning rate."""
        if self._scheduler is None:
            return float(self._schedule_fn(0))
        return self._scheduler.base_lrs[0]

    @property
    def current_lr(self) -> Any:
        """The learning rate the next ``update`` applies."""
        if self._schedule_fn is not None:
            return self._schedule_fn(self._count())
        return self._scheduler.get_last_lr()[0]

    @current_lr.setter
    def current_lr(self, value: float) -> None:
        if self._schedule_fn is not None:
            raise TypeError("current_lr cannot be set when lr is a schedule function")
        check_learning_rate(value, "current_lr")
        lrs = list(self._scheduler.current_lrs.value)
        lrs[0] = float(value)
        self._scheduler.current_lrs.value = lrs

    def _count(self) -> jax.Array:
        return self.opt_state.value.count if self.opt_state is not None else jnp.zeros((), "int32")

    # -- weights ---------------------------------------------------------------
    def register_trainable_weights(self, params: Any) -> Lars:
        """Registers the weights to train and initialises the optimizer state.

        Args:
          params: A pytree (e.g. nested dicts) of arrays, or of state objects
            with a ``.value`` (``brainstate.ParamState``), whose values may
            themselves be pytrees of arrays.

        Returns:
          ``self``.
        """
        params = _plain_dicts(params)
        values = self._values_of(params)
        state = init_state(values)
        self._targets = params
        self._arrays = jax.tree.map(
            lambda t: None if is_state_object(t) else jnp.asarray(t),
            params,
            is_leaf=is_state_object,
        )
        self.opt_state = make_holder(state)
        return self

    @staticmethod
    def _values_of(targets: Any) -> Any:
        values = jax.tree.map(
            lambda t: t.value if is_state_object(t) else t, targets, is_leaf=is_state_object
        )
        check_params(values)
        return values

    @property
    def params(self) -> Any:
        """Current parameter values (the registered pytree with states read out)."""
        if self._targets is None:
            raise ValueError("no weights registered: call register_trainable_weights(params)")
        return jax.tree.map(
            lambda t, a: t.value if is_state_object(t) else a,
            self._targets,
            self._arrays,
            is_leaf=lambda x: is_state_object(x) or x is None,
        )

    @property
    def trust_ratios(self) -> Any:
        """Per-leaf trust ratios of the last step (1 before the first), for logging."""
        if self.opt_state is None:
            raise ValueError("no weights registered: call register_trainable_weights(params)")
        return self.opt_state.value.trust_ratio

    # -- the step ----------------------------------------------------------------
    def _step_impl(
        self, params: Any, grads: Any, state: LarsState, lr: jax.Array
    ) -> tuple[Any, LarsState]:
        if self._schedule_fn is not None:
            return self._tx.apply_gradients(params, state, grads)
        return LarsUpdate(lr, self._tx.update.spec).apply_gradients(params, state, grads)

    def step(self, grads: Any) -> None:
        """Applies one LARS step with ``grads`` (shaped like the registered values).

        Writes the new values into the registered state objects' ``.value``;
        new plain-array params are at :attr:`params`. Does not advance the
        learning-rate scheduler.

        Raises:
          ValueError: if no weights are registered, or the grads' structure or
            shapes differ from the params'.
          TypeError: if a gradient's dtype does not fit its param.
        """
        if self.opt_state is None:
            raise ValueError("register_trainable_weights(params) must be called before update")
        params = self.params
        grads = _plain_dicts(grads)
        check_like_params("grads", grads, params)
        lr = self.current_lr if self._schedule_fn is None else 0.0
        if not isinstance(lr, jax.core.Tracer):
            check_learning_rate(np.asarray(lr).item(), "lr")
        # One argument type whatever the scheduler returns (a Python float, a
        # weakly typed array, ...), so a new rate never retraces the step.
        lr = jnp.asarray(lr, jnp.float32)
        new_params, new_state = self._jit_step(params, grads, self.opt_state.value, lr)
        self._write_back(new_params)
        self.opt_state.value = new_state
        self.step_count.value = self.step_count.value + 1

    update = step

    def _write_back(self, new_params: Any) -> None:
        """Writes ``new_params`` into state objects and the plain-array store."""
        flat_targets, treedef = jax.tree.flatten(self._targets, is_leaf=is_state_object)
        subtrees = treedef.flatten_up_to(new_params)
        arrays = []
        for target, value in zip(flat_targets, subtrees, strict=True):
            if is_state_object(target):
                target.value = value
                arrays.append(None)
            else:
                arrays.append(value)
        self._arrays = treedef.unflatten(arrays)

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Momentum, trust ratios, step count, learning rate and scheduler position.

        Arrays are returned as NumPy arrays, so the dict saves with
        ``numpy.savez``-style tools, pickle or orbax.
        """
        opt_state = None
        if self.opt_state is not None:
            opt_state = jax.tree.map(np.asarray, self.opt_state.value._asdict())
        return {
            "step_count": int(self.step_count.value),
            "lr": float(np.asarray(self.current_lr)),
            "base_lr": float(self.base_lr),
            "opt_state": opt_state,
            "scheduler": None if self._scheduler is None else self._scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned; checks it first, then writes.

        Raises:
          ValueError: if weights are not registered yet, a key is missing, or the
            momentum does not match the registered params.
        """
        missing = {"step_count", "opt_state", "scheduler"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        new_state = None
        if state_dict["opt_state"] is not None:
            if self.opt_state is None:
                raise ValueError("register_trainable_weights(params) before load_state_dict")
            saved = state_dict["opt_state"]
            params = self.params
            current = self.opt_state.value
            check_like_params("state_dict momentum", saved["momentum"], params, grads=False)
            check_like_params("state_dict trust_ratio", saved["trust_ratio"], current.trust_ratio)
            new_state = LarsState(
                count=jnp.asarray(saved["count"], jnp.int32),
                momentum=jax.tree.map(
                    lambda v, ref: jnp.asarray(v, ref.dtype), saved["momentum"], current.momentum
                ),
                trust_ratio=jax.tree.map(
                    lambda v: jnp.asarray(v, jnp.float32), saved["trust_ratio"]
                ),
                skipped=jnp.asarray(saved.get("skipped", 0), jnp.int32),
            )
        if (state_dict["scheduler"] is None) != (self._scheduler is None):
            raise ValueError("state_dict's scheduler does not match this optimizer's lr")
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state_dict["scheduler"])
        if new_state is not None:
            self.opt_state.value = new_state
        self.step_count.value = int(state_dict["step_count"])
