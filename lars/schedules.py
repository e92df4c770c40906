"""Epoch-based learning-rate schedulers with braintools' API and values.

Each scheduler holds a position (``last_epoch``) that ``.step()`` advances and
a current learning rate; :class:`lars.Lars` reads the current rate at every
``update`` and never advances the scheduler itself (as in braintools and
PyTorch). Constructor arguments, the closed forms and the arithmetic follow
``braintools.optim`` 0.4.0 operation for operation, so the values are the
same bit for bit: ``jax.numpy`` float32 where braintools uses it (a weakly
typed 0-d array), Python float64 where braintools stays in Python (``StepLR``,
``ExponentialLR``, a ``WarmupScheduler`` without warmup). Either reaches the
compiled step as a float32 scalar argument, so stepping a scheduler never
recompiles.

As in braintools, a scheduler attached to an optimizer
(:meth:`LRScheduler.attach_optimizer`, done by :class:`lars.Lars` for the
scheduler it is given) writes its rates into the optimizer's
``param_groups``, one rate per group in order, at every ``step``/``apply``.
``state_dict()`` holds Python numbers only; ``load_state_dict`` checks
everything (msgpack's dicts keyed '0', '1', ... are read as lists) and
changes nothing when it raises.

Example:
  >>> import lars
  >>> sched = lars.schedules.StepLR(base_lr=0.1, step_size=2, gamma=0.5)
  >>> [round(sched.get_last_lr()[0], 4) for _ in range(5) if sched.step() is None]
  [0.1, 0.05, 0.05, 0.025, 0.025]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars._config import check_in_range, check_learning_rate
from lars._holder import is_state_object, make_holder
from lars._restore import as_int, as_list, as_mapping, as_real

__all__ = [
    "ConstantLR",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LinearLR",
    "MultiStepLR",
    "PolynomialLR",
    "StepLR",
    "WarmupCosineSchedule",
    "WarmupScheduler",
]

_KEYS = ("last_epoch", "base_lrs", "current_lrs")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _plain(value: Any) -> Any:
    """A concrete rate or epoch as a Python number (exact); traced values as they are."""
    if isinstance(value, jax.core.Tracer):
        return value
    return np.asarray(value).item()


def drive(optimizer: Any, lrs: list[Any]) -> None:
    """Writes ``lrs`` into ``optimizer.param_groups`` (in order) as braintools does.

    A group whose ``'lr'`` is a state object gets its ``.value`` set, any other
    group's entry is replaced (braintools fails there); the optimizer's
    ``_current_lr`` state, where it has one, gets the first rate.
    """
    for group, lr in zip(optimizer.param_groups, lrs, strict=False):
        if is_state_object(group.get("lr")):
            group["lr"].value = lr
        else:
            group["lr"] = lr
    current = getattr(optimizer, "_current_lr", None)
    if current is not None and lrs:
        current.value = lrs[0]


def check_state(state_dict: Any, what: str) -> tuple[int, list[float], list[float]]:
    """``(last_epoch, base_lrs, current_lrs)`` of a scheduler state dict, all checked.

    Raises:
      TypeError, ValueError: naming the bad entry.
    """
    state_dict = as_mapping(state_dict, what)
    missing = [k for k in _KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"{what} lacks {missing}")
    last_epoch = as_int(state_dict["last_epoch"], f"{what}['last_epoch']")
    lists = {}
    for key in ("base_lrs", "current_lrs"):
        items = as_list(state_dict[key], f"{what}[{key!r}]")
        lists[key] = [as_real(v, f"{what}[{key!r}][{i}]") for i, v in enumerate(items)]
    if not lists["base_lrs"] or len(lists["current_lrs"]) != len(lists["base_lrs"]):
        raise ValueError(
            f"{what} must hold one current rate per base rate (at least one), got "
            f"{len(lists['base_lrs'])} base rates and {len(lists['current_lrs'])} current ones"
        )
    return last_epoch, lists["base_lrs"], lists["current_lrs"]


class LRScheduler:
    """Base class: a learning rate that is a function of the epoch counter.

    Args:
      base_lr: The base learning rate (a float, or a list: one per param group).
      last_epoch: The starting position.
    """

    def __init__(self, base_lr: float | Sequence[float] = 1e-3, last_epoch: int = 0) -> None:
        lrs = list(base_lr) if isinstance(base_lr, (list, tuple)) else [base_lr]
        if not lrs:
            raise ValueError("base_lr must hold at least one learning rate")
        for lr in lrs:
            check_learning_rate(lr, "base_lr")
        _check_int("last_epoch", last_epoch, 0)
        self.optimizer: Any = None
        self.base_lrs = [float(lr) for lr in lrs]
        self.last_epoch = make_holder(last_epoch)
        self.current_lrs = make_holder(list(self.get_lr()))

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        """The closed-form learning rate at ``epoch`` for ``base_lr`` (braintools' arithmetic)."""
        raise NotImplementedError

    def get_lr(self) -> list[Any]:
        """The learning rates at the current position, one per base_lr."""
        return [self.lr_at(self.last_epoch.value, b) for b in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Advances the position by one (or sets it to ``epoch``), then applies the rates.

        Raises:
          TypeError, ValueError: if ``epoch`` is not a non-negative integer.
        """
        if epoch is not None and not isinstance(epoch, jax.core.Tracer):
            as_int(epoch, "epoch")
        self.last_epoch.value = self.last_epoch.value + 1 if epoch is None else epoch
        self.apply(lambda x: x)

    def step_epoch(self) -> None:
        """Advances the position by one epoch (braintools' name for ``step()``)."""
        self.step()

    def apply(self, apply_fn: Callable[[Any], Any]) -> None:
        """Sets the current rates to ``apply_fn`` of the closed-form rates at this position.

        As in braintools, the closed form is recomputed (applying twice does not
        compound), and an attached optimizer's param groups get the new rates.

        Raises:
          TypeError, ValueError: if a new rate is not a finite non-negative
            number (before anything changes).
        """
        values = [apply_fn(v) for v in self.get_lr()]
        for v in values:
            if not isinstance(v, jax.core.Tracer):
                check_learning_rate(np.asarray(v).item() if np.ndim(v) == 0 else v, "lr")
        self.current_lrs.value = values
        if self.optimizer is not None:
            drive(self.optimizer, values)

    def attach_optimizer(self, optimizer: Any) -> None:
        """Drives ``optimizer``'s param groups from now on (braintools' semantics).

        With more param groups than base rates, the last base rate is repeated
        for the others; the current rates are recomputed at this position.

        Raises:
          TypeError: if ``optimizer`` has no ``param_groups``.
        """
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list):
            raise TypeError(
                f"optimizer must have param_groups (lars.Lars or a braintools optimizer), "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        if len(groups) > len(self.base_lrs):
            self.base_lrs.extend([self.base_lrs[-1]] * (len(groups) - len(self.base_lrs)))
        self.current_lrs.value = list(self.get_lr())
        current = getattr(optimizer, "_current_lr", None)
        if current is not None:
            current.value = self.current_lrs.value[0]

    def get_last_lr(self) -> list[Any]:
        """The most recently computed learning rates."""
        return list(self.current_lrs.value)

    @property
    def current_lr(self) -> Any:
        """The learning rate of the first group at the current position."""
        return self.current_lrs.value[0]

    def state_dict(self) -> dict[str, Any]:
        """The position and rates (everything ``step`` changes), as Python numbers."""
        return {
            "last_epoch": _plain(self.last_epoch.value),
            "base_lrs": list(self.base_lrs),
            "current_lrs": [_plain(v) for v in self.current_lrs.value],
        }

    def checked_state(self, state_dict: Any, what: str = "scheduler state_dict") -> tuple:
        """Reads a :meth:`state_dict` (or braintools' or a msgpack-mangled one) without writing.

        Returns:
          What :meth:`restore_checked` writes.

        Raises:
          TypeError, ValueError: naming the bad entry.
        """
        return check_state(state_dict, what)

    def restore_checked(self, checked: tuple) -> None:
        """Writes what :meth:`checked_state` returned (cannot fail)."""
        last_epoch, base_lrs, current_lrs = checked
        self.last_epoch.value = last_epoch
        self.base_lrs = list(base_lrs)
        self.current_lrs.value = list(current_lrs)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned; checks it all first, then writes.

        Raises:
          TypeError, ValueError: naming the bad entry; nothing is changed then.
        """
        self.restore_checked(self.checked_state(state_dict))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(base_lrs={self.base_lrs}, last_epoch={self.last_epoch.value})"


class ConstantLR(LRScheduler):
    """``base_lr * factor`` for the first ``total_iters`` epochs, then ``base_lr``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        factor: float = 1.0 / 3,
        total_iters: int = 5,
        last_epoch: int = 0,
    ) -> None:
        check_in_range("factor", factor, low=0.0)
        _check_int("total_iters", total_iters, 0)
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        return base_lr * jnp.where(epoch < self.total_iters, self.factor, 1.0)


class StepLR(LRScheduler):
    """``base_lr * gamma ** (epoch // step_size)``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        step_size: int = 30,
        gamma: float = 0.1,
        last_epoch: int = 0,
    ) -> None:
        _check_int("step_size", step_size, 1)
        check_in_range("gamma", gamma, low=0.0)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        factor = self.gamma ** (epoch // self.step_size)
        return base_lr * factor


class MultiStepLR(LRScheduler):
    """``base_lr * gamma ** (number of milestones reached)``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
        last_epoch: int = 0,
    ) -> None:
        for m in milestones:
            _check_int("milestones[i]", m, 0)
        check_in_range("gamma", gamma, low=0.0)
        self.milestones = tuple(sorted(milestones))
        self.gamma = gamma
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        count = jnp.sum(epoch >= jnp.array(list(self.milestones)))
        return base_lr * jnp.power(self.gamma, count)


class ExponentialLR(LRScheduler):
    """``base_lr * gamma ** epoch``."""

    def __init__(
        self, base_lr: float | Sequence[float] = 1e-3, gamma: float = 0.95, last_epoch: int = 0
    ) -> None:
        check_in_range("gamma", gamma, low=0.0)
        self.gamma = gamma
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        expon = self.gamma**epoch
        return base_lr * expon


class CosineAnnealingLR(LRScheduler):
    """Cosine from ``base_lr`` to ``eta_min`` over ``T_max`` epochs, then held."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        T_max: int = 50,  # braintools' name
        eta_min: float = 0,
        last_epoch: int = 0,
    ) -> None:
        _check_int("T_max", T_max, 1)
        check_learning_rate(eta_min, "eta_min")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        e = jnp.minimum(epoch, self.T_max)
        factor = (1 + jnp.cos(jnp.pi * e / self.T_max)) / 2
        return self.eta_min + (base_lr - self.eta_min) * factor


class LinearLR(LRScheduler):
    """Linear factor from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = 0,
    ) -> None:
        check_in_range("start_factor", start_factor, low=0.0)
        check_in_range("end_factor", end_factor, low=0.0)
        _check_int("total_iters", total_iters, 0)
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        if self.total_iters == 0:
            return base_lr * self.end_factor
        t = jnp.clip(epoch / self.total_iters, 0.0, 1.0)
        factor = self.start_factor + (self.end_factor - self.start_factor) * t
        return base_lr * factor


class PolynomialLR(LRScheduler):
    """``base_lr * (1 - min(epoch, total_iters) / total_iters) ** power``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        total_iters: int = 5,
        power: float = 1.0,
        last_epoch: int = 0,
    ) -> None:
        _check_int("total_iters", total_iters, 1)
        check_in_range("power", power, low=0.0)
        self.total_iters = total_iters
        self.power = power
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        decay = (1 - jnp.minimum(epoch, self.total_iters) / self.total_iters) ** self.power
        return base_lr * decay


class WarmupScheduler(LRScheduler):
    """Linear warmup from ``warmup_start_lr`` to ``base_lr`` over ``warmup_epochs``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        warmup_epochs: int = 5,
        warmup_start_lr: float = 0.0,
        last_epoch: int = 0,
    ) -> None:
        _check_int("warmup_epochs", warmup_epochs, 0)
        check_learning_rate(warmup_start_lr, "warmup_start_lr")
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = warmup_start_lr
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        if self.warmup_epochs == 0:
            return base_lr
        alpha = jnp.minimum(epoch / self.warmup_epochs, 1.0)
        return self.warmup_start_lr + (base_lr - self.warmup_start_lr) * alpha


class WarmupCosineSchedule(LRScheduler):
    """Linear warmup over ``warmup_steps``, then cosine to ``eta_min`` at ``total_steps``."""

    def __init__(
        self,
        base_lr: float | Sequence[float] = 1e-3,
        warmup_steps: int = 1000,
        total_steps: int = 10000,
        warmup_start_lr: float = 0.0,
        eta_min: float = 0.0,
        last_epoch: int = 0,
    ) -> None:
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("total_steps", total_steps, 0)
        check_learning_rate(warmup_start_lr, "warmup_start_lr")
        check_learning_rate(eta_min, "eta_min")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.warmup_start_lr = warmup_start_lr
        self.eta_min = eta_min
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        alpha = jnp.clip(epoch / jnp.maximum(self.warmup_steps, 1), 0.0, 1.0)
        span = jnp.maximum(self.total_steps - self.warmup_steps, 1)
        progress = jnp.clip((epoch - self.warmup_steps) / span, 0.0, 1.0)
        cos_factor = (1 + jnp.cos(jnp.pi * progress)) / 2
        base_lr = jnp.asarray(base_lr)
        warmup_lr = self.warmup_start_lr + (base_lr - self.warmup_start_lr) * alpha
        cosine_lr = self.eta_min + (base_lr - self.eta_min) * cos_factor
        return jnp.where(epoch < self.warmup_steps, warmup_lr, cosine_lr)
