"""Hyperparameters of a LARS step and their validation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class LarsConfig:
    """The static hyperparameters of one LARS step (hashable, so jit-static).

    Attributes:
      momentum: Momentum factor mu in [0, 1).
      weight_decay: Coupled L2 decay lambda (added to the gradient before the
        trust ratio). ``lars.lars`` evaluates a weight-decay schedule at each
        step and gives the step a config holding its value.
      trust_coefficient: eta in r = eta * ||w|| / (||g|| + eps).
      eps: Added to the gradient norm in the trust ratio denominator.
      nesterov: Step along r*g + mu*v_new instead of v_new.
      trust_clip: When set, r = min(r, trust_clip) (LARC clipping at 1.0).
      grad_clip_norm: When set, rescale all gradients so their global norm is at
        most this value (optax.clip_by_global_norm).
      grad_clip_value: When set, clip every gradient entry to [-v, v].
      lr_inside_momentum: v = mu*v + lr*r*g; w = w - v (optax.lars form)
        instead of v = mu*v + r*g; w = w - lr*v (braintools / PyTorch form).
    """

    momentum: Any = 0.9
    weight_decay: Any = 0.0
    trust_coefficient: Any = 0.001
    eps: Any = 1e-8
    nesterov: bool = False
    trust_clip: Any = None
    grad_clip_norm: Any = None
    grad_clip_value: Any = None
    lr_inside_momentum: bool = False

    def __post_init__(self) -> None:
        check_in_range("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_in_range("weight_decay", self.weight_decay, low=0.0)
        check_in_range("trust_coefficient", self.trust_coefficient, low=0.0, low_open=True)
        check_in_range("eps", self.eps, low=0.0)
        for name in ("trust_clip", "grad_clip_norm", "grad_clip_value"):
            value = getattr(self, name)
            if value is not None:
                check_in_range(name, value, low=0.0, low_open=True)
        for name in ("nesterov", "lr_inside_momentum"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {value!r}")

    @property
    def has_weight_decay(self) -> bool:
        """Whether weight decay applies (off only for a Python or NumPy zero).

        A JAX array (a weight-decay schedule's value, an
        ``optax.inject_hyperparams`` value, traced or not) is a run-time value:
        the decay ``g + wd * w`` is computed whatever it holds, as
        ``optax.add_decayed_weights`` does for anything but a Python number.
        """
        if isinstance(self.weight_decay, jax.Array):
            return True
        return not (is_concrete_number(self.weight_decay) and float(self.weight_decay) == 0.0)


def is_concrete_number(value: Any) -> bool:
    """True for Python/NumPy real numbers and concrete 0-d arrays."""
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
    return False


def check_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises if a hyperparameter is not a finite real number within bounds.

    Traced values (e.g. under ``optax.inject_hyperparams``) cannot be inspected
    and are accepted as they are.

    Raises:
      TypeError: if ``value`` is not a real number.
      ValueError: if it is non-finite or out of range.
    """
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (bool, np.bool_)) or not is_concrete_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise ValueError(f"{name} must be {op} {high}, got {v}")


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
    """Raises unless ``value`` is a finite, non-negative real number."""
    check_in_range(name, value, low=0.0)
