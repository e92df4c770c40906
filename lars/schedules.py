"""Epoch-based learning-rate schedulers with braintools' API and values.

Each scheduler holds a position (``last_epoch``) that ``.step()`` advances and
a current learning rate; :class:`lars.Lars` reads the current rate at every
``update`` and never advances the scheduler itself (as in braintools and
PyTorch). Constructor arguments and the closed-form values follow
``braintools.optim`` 0.4.0. Values are computed in float64 on the host and
reach the compiled step as a device scalar, so stepping a scheduler never
recompiles.

Example:
  >>> import lars
  >>> sched = lars.schedules.StepLR(base_lr=0.1, step_size=2, gamma=0.5)
  >>> [round(sched.get_last_lr()[0], 4) for _ in range(5) if sched.step() is None]
  [0.1, 0.05, 0.05, 0.025, 0.025]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lars._config import check_in_range, check_learning_rate
from lars._holder import make_holder

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


def _traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _cos(x: Any) -> Any:
    return jnp.cos(x) if _traced(x) else math.cos(x)


def _min(a: Any, b: Any) -> Any:
    return jnp.minimum(a, b) if _traced(a) or _traced(b) else min(a, b)


def _clip(x: Any, lo: float, hi: float) -> Any:
    return jnp.clip(x, lo, hi) if _traced(x) else min(max(x, lo), hi)


def _where(cond: Any, a: Any, b: Any) -> Any:
    return jnp.where(cond, a, b) if _traced(cond) else (a if cond else b)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class LRScheduler:
    """Base class: a learning rate that is a function of the epoch counter.

    Args:
      base_lr: The base learning rate (a float, or a list for several groups).
      last_epoch: The starting position.
    """

    def __init__(self, base_lr: float | Sequence[float] = 1e-3, last_epoch: int = 0) -> None:
        lrs = list(base_lr) if isinstance(base_lr, (list, tuple)) else [base_lr]
        for lr in lrs:
            check_learning_rate(lr, "base_lr")
        _check_int("last_epoch", last_epoch, 0)
        self.base_lrs = [float(lr) for lr in lrs]
        self.last_epoch = make_holder(last_epoch)
        self.current_lrs = make_holder(list(self.get_lr()))

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        """The closed-form learning rate at ``epoch`` for ``base_lr``."""
        raise NotImplementedError

    def get_lr(self) -> list[Any]:
        """The learning rates at the current position, one per base_lr."""
        return [self.lr_at(self.last_epoch.value, b) for b in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Advances the position by one (or sets it to ``epoch``)."""
        self.last_epoch.value = self.last_epoch.value + 1 if epoch is None else epoch
        self.current_lrs.value = list(self.get_lr())

    def get_last_lr(self) -> list[Any]:
        """The most recently computed learning rates."""
        return list(self.current_lrs.value)

    @property
    def current_lr(self) -> Any:
        """The learning rate of the first group at the current position."""
        return self.current_lrs.value[0]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's position and rates (everything ``step`` changes)."""
        return {
            "last_epoch": self.last_epoch.value,
            "base_lrs": list(self.base_lrs),
            "current_lrs": list(self.current_lrs.value),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        missing = {"last_epoch", "base_lrs"} - set(state_dict)
        if missing:
            raise ValueError(f"scheduler state_dict lacks {sorted(missing)}")
        self.last_epoch.value = state_dict["last_epoch"]
        self.base_lrs = list(state_dict["base_lrs"])
        self.current_lrs.value = list(state_dict.get("current_lrs", self.get_lr()))

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
        return base_lr * _where(epoch < self.total_iters, self.factor, 1.0)


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
        return base_lr * self.gamma ** (epoch // self.step_size)


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
        if _traced(epoch):
            count = jnp.sum(epoch >= jnp.asarray(self.milestones))
            return base_lr * jnp.power(self.gamma, count)
        return base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)


class ExponentialLR(LRScheduler):
    """``base_lr * gamma ** epoch``."""

    def __init__(
        self, base_lr: float | Sequence[float] = 1e-3, gamma: float = 0.95, last_epoch: int = 0
    ) -> None:
        check_in_range("gamma", gamma, low=0.0)
        self.gamma = gamma
        super().__init__(base_lr, last_epoch)

    def lr_at(self, epoch: Any, base_lr: float) -> Any:
        return base_lr * self.gamma**epoch


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
        e = _min(epoch, self.T_max)
        factor = (1 + _cos(math.pi * e / self.T_max)) / 2
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
        t = _clip(epoch / self.total_iters, 0.0, 1.0)
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * t)


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
        return base_lr * (1 - _min(epoch, self.total_iters) / self.total_iters) ** self.power


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
        alpha = _min(epoch / self.warmup_epochs, 1.0)
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
        alpha = _clip(epoch / max(self.warmup_steps, 1), 0.0, 1.0)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = _clip((epoch - self.warmup_steps) / span, 0.0, 1.0)
        cos_factor = (1 + _cos(math.pi * progress)) / 2
        warmup_lr = self.warmup_start_lr + (base_lr - self.warmup_start_lr) * alpha
        cosine_lr = self.eta_min + (base_lr - self.eta_min) * cos_factor
        return _where(epoch < self.warmup_steps, warmup_lr, cosine_lr)
