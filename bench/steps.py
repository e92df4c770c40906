"""The timed steps: ``jax.jit(optax.lars)``, every ``lars`` backend, and a copy.

Every step is a jitted function of (params, optimizer state, grads, lr) that
returns (new params, new state), with params and state donated and the
learning rate passed as a device scalar, compiled ahead of time so that the
compile time and XLA's statistics can be read off.

All LARS steps use the same hyperparameters and the same semantics, those of
``optax.lars``: momentum 0.9, weight decay 1e-4, trust coefficient 1e-3,
``eps=0`` and the learning rate inside the momentum buffer (``lars.lars(...,
eps=0.0, lr_inside_momentum=True)``); their first updates are compared with
optax's (``rel_diff_vs_optax``).

The copy floor is ``x * c + d`` on one float32 buffer holding half the bytes
the LARS step moves, donated so XLA writes in place, with ``c`` and ``d``
traced scalars (1 and 0) so it cannot be folded away: it reads and writes the
buffer once, the bytes of the LARS step. ``bytes_xla`` (XLA's cost analysis)
shows that it does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lars
from bench import hlo

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
TRUST_COEFFICIENT = 1e-3
LEARNING_RATE = 0.1

OPTAX = "optax"
COPY = "copy"
# A row "<backend>:apply" times the backend's new-params step,
# ``lars.lars(...).apply_gradients`` (in place where the backend can), instead
# of ``update`` followed by ``optax.apply_updates``.
APPLY_SUFFIX = ":apply"

# Row names that stand for a backend run with ``backend_options``:
# name -> (backend, options), e.g. "triton-2pass" -> ("triton", {"fused": False}).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}


def in_place_rows(backends: Sequence[str]) -> list[str]:
    """The "<backend>:apply" rows for the backends with an in-place form."""
    from lars import _dispatch
    from lars.contract import Feature

    platform = jax.default_backend()
    return [
        b + APPLY_SUFFIX
        for b in backends
        if Feature.IN_PLACE in _dispatch.get(VARIANTS.get(b, (b, {}))[0]).features(platform)
    ]


def optax_tx(lr: jax.Array) -> optax.GradientTransformation:
    """``optax.lars`` with the benchmark's hyperparameters."""
    return optax.lars(
        lr,
        weight_decay=WEIGHT_DECAY,
        trust_coefficient=TRUST_COEFFICIENT,
        eps=0.0,
        momentum=MOMENTUM,
    )


def lars_tx(
    lr: jax.Array, backend: str, options: dict[str, Any] | None = None
) -> optax.GradientTransformation:
    """``lars.lars`` on ``backend`` with optax.lars's semantics and hyperparameters."""
    return lars.lars(
        lr,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        trust_coefficient=TRUST_COEFFICIENT,
        eps=0.0,
        lr_inside_momentum=True,
        backend=backend,
        backend_options=options or None,
    )


def make_tx_factory(name: str) -> Callable[[Any], optax.GradientTransformation]:
    """The transformation for a row name: "optax", a ``lars`` backend or a ``VARIANTS`` name."""
    if name == OPTAX:
        return optax_tx
    backend, options = VARIANTS.get(name, (name, {}))
    return lambda lr: lars_tx(lr, backend, options)


def make_step(tx_factory: Callable[[Any], optax.GradientTransformation], apply: bool) -> Callable:
    """A training step's optimizer part: update, then apply the updates.

    With ``apply`` the transformation's ``apply_gradients`` does both.
    """

    def step(params: Any, state: Any, grads: Any, lr: jax.Array) -> tuple[Any, Any]:
        tx = tx_factory(lr)
        if apply:
            return tx.apply_gradients(params, state, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def copy_step(x: jax.Array, c: jax.Array, d: jax.Array) -> tuple[jax.Array]:
    """The copy floor: reads and writes ``x`` once."""
    return (x * c + d,)


@dataclasses.dataclass
class Runner:
    """A compiled step and the buffers it carries from one step to the next.

    Attributes:
      name: The row's backend name ("optax", a ``lars`` backend, or "copy").
      compiled: The compiled executable.
      carry: The donated arguments (params and state, or the copy buffer); each
        call replaces them with the step's outputs.
      fixed: The arguments that are not donated (grads and lr, or c and d).
      compile_s: Seconds to trace, lower and compile.
      launches: Kernel launches per step (``hlo.count_launches``).
      temp_bytes: Temporary memory of the compiled step.
      bytes_xla: XLA's estimate of the bytes accessed per step.
    """

    name: str
    compiled: Any
    carry: tuple
    fixed: tuple
    compile_s: float
    launches: int
    temp_bytes: float
    bytes_xla: float

    def run(self, steps: int) -> None:
        """Runs ``steps`` steps back to back and waits for the last one."""
        for _ in range(steps):
            self.carry = tuple(self.compiled(*self.carry, *self.fixed))
        jax.block_until_ready(self.carry)

    def release(self) -> None:
        """Drops the buffers."""
        self.carry = ()
        self.fixed = ()
        self.compiled = None


def _compile(fn: Callable, args: Sequence[Any], donate: tuple[int, ...]) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _runner(name: str, compiled: Any, seconds: float, carry: tuple, fixed: tuple) -> Runner:
    text = compiled.as_text()
    return Runner(
        name=name,
        compiled=compiled,
        carry=carry,
        fixed=fixed,
        compile_s=seconds,
        launches=hlo.count_launches(text) if text else -1,
        temp_bytes=hlo.temp_bytes(compiled),
        bytes_xla=hlo.cost_bytes_accessed(compiled),
    )


def lars_runner(name: str, params: list[jax.Array], grads: list[jax.Array]) -> Runner:
    """Compiles the LARS step of ``name`` ("optax" or a backend); ``params`` become its own.

    Raises:
      Whatever the backend raises for this configuration or these arrays.
    """
    apply = name.endswith(APPLY_SUFFIX)
    factory = make_tx_factory(name.removesuffix(APPLY_SUFFIX))
    # The state's structure does not depend on the learning rate.
    state = jax.jit(factory(LEARNING_RATE).init)(params)
    lr = jnp.asarray(LEARNING_RATE, jnp.float32)
    compiled, seconds = _compile(make_step(factory, apply), (params, state, grads, lr), (0, 1))
    return _runner(name, compiled, seconds, (params, state), (grads, lr))


def copy_runner(nbytes: int) -> Runner:
    """Compiles the copy floor on a float32 buffer of ``nbytes // 2`` bytes.

    Args:
      nbytes: The bytes the copy is to move (read plus write).
    """
    x = jnp.ones((max(1, nbytes // 8),), jnp.float32)
    c = jnp.asarray(1.0, jnp.float32)
    d = jnp.asarray(0.0, jnp.float32)
    compiled, seconds = _compile(copy_step, (x, c, d), (0,))
    return _runner(COPY, compiled, seconds, (x,), (c, d))


def first_update(runner: Runner, params0: list[np.ndarray]) -> list[np.ndarray]:
    """The update of the runner's first step (call right after that step), on the host."""
    return [
        np.asarray(new, np.float64) - old for new, old in zip(runner.carry[0], params0, strict=True)
    ]


def rel_diff(runner: Runner, params0: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """How far the runner's first update is from ``reference``.

    Returns:
      The largest, over the leaves, of max|update - reference| / max|reference|.
    """
    worst = 0.0
    for new, old, ref in zip(runner.carry[0], params0, reference, strict=True):
        delta = np.asarray(new, np.float64) - old
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        err = float(np.max(np.abs(delta - ref))) if ref.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst
