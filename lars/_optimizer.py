"""``lars.Lars``: the braintools-compatible optimizer object.

It keeps ``braintools.optim.Lars``'s attributes and their meaning
(``param_groups``, ``param_groups_opt_states``, ``opt_state``,
``step_count``, ``current_lr``, ...); each param group is stepped by its own
:func:`lars.lars` transformation, all groups in one compiled call
(:mod:`lars._groups`); checkpoints are in braintools' layout
(:mod:`lars._state_dict`). Every method checks its input before it changes
anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars import _state_dict
from lars._config import check_learning_rate
from lars._groups import (
    ParamStates,
    SchedulerLR,
    build,
    check_disjoint,
    group_lr,
    group_values,
    make_step,
    merged,
    plain_dicts,
    plain_values,
    same_options,
    split_grads,
    values_of,
)
from lars._groups import group_options as group_options_of
from lars._holder import is_state_object, make_holder
from lars._transform import init_state, lars
from lars._trees import MaskOrFn, check_like_params, resolve_mask
from lars.schedules import ConstantLR


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "get_last_lr") and hasattr(obj, "step") and hasattr(obj, "current_lrs")


class Lars:
    """LARS with the ``braintools.optim.Lars`` interface.

    A drop-in for ``braintools.optim.Lars`` (same arguments, same numbers by
    default), plus the options of :func:`lars.lars`. As in braintools:
    ``param_groups`` (``add_param_group(params, lr=..., weight_decay=...)``:
    each group is its own LARS step), ``param_states``, ``step_count``,
    ``current_lr``, ``lr_apply``, ``add_scheduler``/``get_last_lr``, and
    ``state_dict()`` / ``load_state_dict()`` in braintools' layout.
    Gradients of weights no group holds are ignored (frozen layers).

    Args:
      lr: A float; a scheduler from :mod:`lars.schedules` (or braintools),
        advanced by the user's ``scheduler.step()`` and attached to this
        optimizer (it drives the param groups' rates, in order); or an
        optax-style schedule callable, evaluated at the step count.
      momentum: Momentum factor, in [0, 1).
      weight_decay: Coupled L2 decay, >= 0.
      trust_coefficient: eta, > 0.
      eps: Added to the gradient norm, >= 0.
      grad_clip_norm: Clip all gradients (of each param group) to this global norm first.
      grad_clip_value: Then clip every entry to [-v, v].
      nesterov: As in :func:`lars.lars`, whose transformation this object steps.
      weight_decay_mask: As in :func:`lars.lars`.
      trust_ratio_mask: As in :func:`lars.lars`.
      trust_clip: As in :func:`lars.lars`.
      lr_inside_momentum: As in :func:`lars.lars`.
      skip_nonfinite: As in :func:`lars.lars`.
      backend: As in :func:`lars.lars`.
      backend_options: As in :func:`lars.lars`.
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
        self._defaults = {
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "weight_decay_mask": weight_decay_mask,
            "trust_ratio_mask": trust_ratio_mask,
            "trust_clip": trust_clip,
            "grad_clip_norm": grad_clip_norm,
            "grad_clip_value": grad_clip_value,
            "lr_inside_momentum": lr_inside_momentum,
            "skip_nonfinite": skip_nonfinite,
            "backend": backend,
            "backend_options": backend_options,
        }
        # The step is lars.lars's: with a schedule function as its learning
        # rate, or with the scheduler's value passed to each step.
        self._tx = lars(self._schedule_fn or 0.0, **self._defaults)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.step_count = make_holder(0)
        self.opt_state: Any = None  # group 0's LarsState holder once weights are registered
        self.param_groups: list[dict[str, Any]] = []
        self.param_groups_opt_states: list[Any] = []  # holders of groups 1, 2, ...
        self._values: list[Any] = []  # per group: plain-array leaves' values (None: a state)
        self._built: list[Any] = []  # per group: (options, transformation) of the last step
        self._step_fn: Any = None
        self._donate = donate
        self._schedulers: list[Any] = []
        self._current_lr = SchedulerLR(self)  # braintools' name, read by its schedulers
        self._base_lr: float | None = None  # a schedule function's is its value at 0
        if self._scheduler is not None:
            rates = getattr(self._scheduler, "base_lrs", None) or self._scheduler.get_last_lr()
            self._base_lr = float(np.asarray(rates[0]))
        if self._scheduler is not None:
            self._attach(self._scheduler)

    def _attach(self, scheduler: Any) -> None:
        """Lets the scheduler drive the param groups, as braintools' optimizers do."""
        attach = getattr(scheduler, "attach_optimizer", None)
        if attach is None:
            return
        try:
            attach(self)
        except TypeError:
            # braintools' schedulers attach to braintools' optimizers only; what
            # they do when attached works on any object with param_groups.
            if getattr(scheduler, "optimizer", None) is None:
                scheduler.optimizer = self

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
    def schedulers(self) -> list[Any]:
        """The schedulers given to :meth:`add_scheduler`."""
        return self._schedulers

    @property
    def base_lr(self) -> float:
        """The base learning rate (the scheduler's first, or a loaded state's)."""
        if self._base_lr is None:
            return float(self._schedule_fn(0))
        return self._base_lr

    @property
    def current_lr(self) -> Any:
        """The learning rate the next ``update`` applies to group 0 (settable)."""
        return self._current_lr.value

    @current_lr.setter
    def current_lr(self, value: float) -> None:
        self._current_lr.value = value

    def add_scheduler(self, scheduler: Any) -> None:
        """Records a scheduler for :meth:`get_last_lr` (braintools: it drives nothing)."""
        self._schedulers.append(scheduler)

    def get_last_lr(self) -> list[Any]:
        """The last added scheduler's rates, or ``[current_lr]``."""
        if self._schedulers:
            return self._schedulers[-1].get_last_lr()
        return [self.current_lr]

    def lr_apply(self, apply_fn: Callable[[Any], Any]) -> None:
        """Sets the scheduler's rates to ``apply_fn`` of its closed-form rates (``lr.apply``)."""
        if self._scheduler is None:
            raise TypeError("lr_apply needs a scheduler; lr is a schedule function")
        self._scheduler.apply(apply_fn)

    def _count(self) -> jax.Array:
        return self.opt_state.value.count if self.opt_state is not None else jnp.zeros((), "int32")

    # -- weights ---------------------------------------------------------------
    def register_trainable_weights(self, params: Any) -> Lars:
        """Registers the weights to train (param group 0) and initialises their state.

        Args:
          params: A pytree (e.g. nested dicts) of arrays, or of state objects
            with a ``.value`` (``brainstate.ParamState``), whose values may
            themselves be pytrees of arrays.

        Returns:
          ``self``.
        """
        params = plain_dicts(params)
        values = values_of(params)
        if len(self.param_groups) > 1:
            check_disjoint(self.param_groups, params, skip=0)
        state = init_state(values)
        arrays = plain_values(params)
        if not self.param_groups:
            group = {"params": params, "lr": self._current_lr, "weight_decay": self.weight_decay}
            self.param_groups.append(group)
            self._values.append(arrays)
            self._built.append(None)
        else:
            self.param_groups[0]["params"] = params
            self._values[0] = arrays
        self.opt_state = make_holder(state)
        return self

    def add_param_group(self, params: Any, **group_options: Any) -> None:
        """Adds weights trained with their own rate and hyperparameters.

        As in braintools: the group is ``{'params', 'lr', 'weight_decay',
        **group_options}``; without ``lr`` it starts at :attr:`base_lr` (a
        scheduler with several base rates then drives it). Unlike braintools
        (which steps added groups with Adam), a group is LARS with the
        optimizer's settings overridden by any :func:`lars.lars` option in
        ``group_options``; other keys (a ``name``) are kept and ignored.

        Args:
          params: A non-empty dict of state objects or arrays, with keys no
            other group has.
          **group_options: ``lr``, ``weight_decay`` and the options of :func:`lars.lars`.

        Raises:
          ValueError, TypeError: before any change, naming the key or option.
        """
        if self.opt_state is None:
            raise ValueError("register_trainable_weights must be called before add_param_group.")
        if "params" in group_options:
            raise TypeError("add_param_group got params twice")
        params = plain_dicts(params)
        if not isinstance(params, Mapping) or not params:
            raise TypeError(f"params must be a non-empty dict, got {type(params).__name__}")
        if not isinstance(self.param_groups[0]["params"], Mapping):
            raise TypeError("param groups need the registered weights to be a dict")
        check_disjoint(self.param_groups, params, skip=None)
        values = values_of(params)
        index = len(self.param_groups)
        if "lr" in group_options and not isinstance(group_options["lr"], jax.core.Tracer):
            check_learning_rate(
                np.asarray(group_options["lr"]).item(), f"param_groups[{index}]['lr']"
            )
        group = {
            "params": params,
            "lr": make_holder(self.base_lr),
            "weight_decay": group_options.get("weight_decay", self.weight_decay),
        }
        group.update(group_options)
        options = group_options_of(self._defaults, group)
        tx = build(index, options, 0.0)
        for name in ("weight_decay_mask", "trust_ratio_mask"):
            try:
                resolve_mask(options[name], values, name)
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[{index}]: {e}") from e
        state = tx.init(values)
        self.param_groups.append(group)
        self.param_groups_opt_states.append(make_holder(state))
        self._values.append(plain_values(params))
        self._built.append((options, tx))
        self._step_fn = None

    def _group_values(self, index: int) -> Any:
        return group_values(self.param_groups[index]["params"], self._values[index])

    def _holders(self) -> list[Any]:
        return [] if self.opt_state is None else [self.opt_state, *self.param_groups_opt_states]

    def _registered(self) -> None:
        if self.opt_state is None:
            raise ValueError("no weights registered: call register_trainable_weights(params)")

    @property
    def params(self) -> Any:
        """Current parameter values (the groups' params with states read out; one dict
        for several groups)."""
        self._registered()
        return merged([self._group_values(i) for i in range(len(self.param_groups))])

    @property
    def param_states(self) -> ParamStates:
        """The registered weights of all groups (braintools' ``param_states`` reads)."""
        self._registered()
        trees = [
            group_values(g["params"], v, states=True)
            for g, v in zip(self.param_groups, self._values, strict=True)
        ]
        return ParamStates(merged(trees))

    @property
    def trust_ratios(self) -> Any:
        """Per-leaf trust ratios of the last step (1 before the first), for logging."""
        self._registered()
        return merged([h.value.trust_ratio_tree() for h in self._holders()])

    # -- the step ----------------------------------------------------------------
    def _transformations(self) -> list[Any]:
        """Each group's (options, transformation), rebuilt where its options changed."""
        built = list(self._built)
        for i, group in enumerate(self.param_groups):
            options = group_options_of(self._defaults, group)
            if built[i] is not None and same_options(built[i][0], options):
                continue
            if same_options(options, self._defaults):
                tx = self._tx  # built with group 0's rate; other groups pass theirs
            else:
                scheduled = i == 0 and self._schedule_fn is not None
                tx = build(i, options, self._schedule_fn if scheduled else 0.0)
            built[i] = (options, tx)
        if any(a is not b for a, b in zip(built, self._built, strict=True)):
            self._built, self._step_fn = built, None
        return built

    @property
    def _jit_step(self) -> Any:
        """The compiled step of all groups (see :func:`lars._groups.make_step`)."""
        built = self._transformations()
        if self._step_fn is None:
            updates = tuple(tx.update for _, tx in built)
            self._step_fn = make_step(updates, self._schedule_fn is not None, self._donate)
        return self._step_fn

    def _lr_argument(self, index: int) -> jax.Array:
        if index == 0:
            lr, name = (self.current_lr if self._schedule_fn is None else 0.0), "lr"
        else:
            lr, name = group_lr(self.param_groups[index]), f"param_groups[{index}]['lr']"
        if not isinstance(lr, jax.core.Tracer):
            check_learning_rate(np.asarray(lr).item(), name)
        # One argument type whatever the scheduler returns (a Python float, a
        # weakly typed array, ...), so a new rate never retraces the step.
        return jnp.asarray(lr, jnp.float32)

    def step(self, grads: Any, **extra_args: Any) -> None:
        """Applies one LARS step to every param group.

        Each group takes the gradients of its keys; gradients no group holds
        are ignored (frozen layers). Writes the new values into the registered
        state objects' ``.value``; new plain-array params are at
        :attr:`params`. Does not advance the learning-rate scheduler.

        Keyword arguments (braintools passes them on to optax, e.g. ``value=loss``)
        are accepted and ignored, as LARS has no use for them.

        Raises:
          ValueError: if no weights are registered, a registered weight has no
            gradient, or a gradient's structure or shape differs from its param's.
          TypeError: if a gradient's dtype does not fit its param.
        """
        if self.opt_state is None:
            raise ValueError("register_trainable_weights(params) must be called before update")
        n = len(self.param_groups)
        if len(self.param_groups_opt_states) != n - 1:
            raise ValueError(f"param_groups has {n} groups: add groups with add_param_group")
        parts = split_grads([g["params"] for g in self.param_groups], plain_dicts(grads))
        params = [self._group_values(i) for i in range(n)]
        for i in range(n):
            check_like_params(
                "grads" if n == 1 else f"grads of param_groups[{i}]", parts[i], params[i]
            )
        lrs = [self._lr_argument(i) for i in range(n)]
        holders = self._holders()
        states = [h.value for h in holders]
        if n == 1:
            new_params, new_states = self._jit_step(params[0], parts[0], states[0], lrs[0])
            new_params, new_states = [new_params], [new_states]
        else:
            new_params, new_states = self._jit_step(*map(tuple, (params, parts, states, lrs)))
        for i in range(n):
            self._write_back(i, new_params[i])
            holders[i].value = new_states[i]
        self.step_count.value = self.step_count.value + 1

    update = step

    def _write_back(self, index: int, new_params: Any) -> None:
        """Writes ``new_params`` into a group's state objects and plain-array store."""
        targets = self.param_groups[index]["params"]
        flat_targets, treedef = jax.tree.flatten(targets, is_leaf=is_state_object)
        subtrees = treedef.flatten_up_to(new_params)
        arrays = []
        for target, value in zip(flat_targets, subtrees, strict=True):
            if is_state_object(target):
                target.value = value
                arrays.append(None)
            else:
                arrays.append(value)
        self._values[index] = treedef.unflatten(arrays)

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in ``braintools.optim.Lars``'s layout.

        NumPy arrays and Python numbers, for msgpack, orbax, pickle or
        ``numpy.savez``; the README's "Checkpoints" lists the entries.
        """
        return _state_dict.state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a state of this layout, braintools' or lars 0.1.0's.

        Checks everything first, then writes: a load that raises leaves params,
        optimizer states, step count, scheduler and rates as they were.

        Raises:
          TypeError, ValueError: naming the bad entry.
        """
        _state_dict.prepare_load(self, state_dict)()
