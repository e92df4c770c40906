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

With ``steps_per_call`` K > 1 every LARS step, optax's included, is compiled
as K steps in one jitted ``lax.fori_loop`` (``looped``), so that its arrays
cross the jit boundary once per K steps, as in a jitted training loop; the
timings are per step. The grads are the same in every step of the loop, and
XLA may hoist work on them alone out of it (XLA's CPU compiler does, for a sum
over them), which can only favour optax, whose norms of the grads are separate
fusions; every ``lars`` kernel reads the grads in the same call as the params,
which change. The copy floor stays one copy per call: inside a loop XLA's CPU
runtime runs the copy's fusion on one thread (jax 0.12.0.1, 2-core Xeon:
17.6-19.9 ms for a copy moving 234 MB in a loop, 10.9-12.6 ms alone on two
threads), which would make the floor slower than the memory allows. A
``copy-loop`` row (``COPY_LOOP``) times the copy in the same loop, so that what
the loop costs a step (on a GPU, the host issues the loop's body step by
step; its trip count is known, so it does not wait for a condition:
``bench.gpu_compile`` checks it) shows beside the floor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
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
# With ``steps_per_call`` K > 1: the copy as K copies in one jitted loop, timed
# per copy. Beside the copy alone it shows what the loop itself costs a step.
COPY_LOOP = "copy-loop"
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


# Who is told whose calls are on the device: ``watch(name)`` before a
# runner's calls, ``watch(None)`` once they are done (``watching``).
# ``bench.gpu_check``'s timing steps name the running form in their result
# with it, so a step killed at its timeout blames the form that hung there,
# not the compile or the host work around it.
_WATCHERS: list[Callable[[str | None], None]] = []
_ON_DEVICE: list[str] = []


@contextlib.contextmanager
def watching(watch: Callable[[str | None], None]) -> Iterator[None]:
    """Tells ``watch`` whose calls run on the device (``on_device``) within the block."""
    _WATCHERS.append(watch)
    try:
        yield
    finally:
        _WATCHERS.remove(watch)


@contextlib.contextmanager
def on_device(name: str) -> Iterator[None]:
    """Runner ``name``'s calls run within the block: the watchers are told.

    Nested blocks tell them once, at the outermost: a caller that times a run
    (``bench.timing.clock``) opens one outside its timed interval, so the
    watchers' work is not in the time.
    """
    outer = not _ON_DEVICE
    _ON_DEVICE.append(name)
    try:
        if outer:
            for watch in _WATCHERS:
                watch(name)
        yield
    finally:
        _ON_DEVICE.pop()
        if outer:
            for watch in _WATCHERS:
                watch(None)


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
      launches: Kernel launches per step (``hlo.count_launches``, or
        ``hlo.count_loop_launches`` for a loop).
      temp_bytes: Temporary memory of the compiled step.
      bytes_xla: XLA's estimate of the bytes accessed per step (NaN with
        ``steps_per_call`` > 1: XLA's cost analysis of a loop does not give
        the bytes of one step).
      steps_per_call: Steps per call of ``compiled`` (``looped``).
    """

    name: str
    compiled: Any
    carry: tuple
    fixed: tuple
    compile_s: float
    launches: int
    temp_bytes: float
    bytes_xla: float
    steps_per_call: int = 1

    def run(self, calls: int) -> float:
        """Runs ``calls`` calls back to back and waits for the last one.

        Returns the seconds until the last call had returned (before the
        wait): the calling thread's part, JAX's dispatch of the arguments
        included. Where it is about the whole time, that thread set the pace,
        not the device. Work XLA's runtime does on threads of its own (where
        it enqueues a step's kernels there) is not in it. The watchers
        (``watching``) are told while the calls run.
        """
        with on_device(self.name):
            start = time.perf_counter()
            for _ in range(calls):
                self.carry = tuple(self.compiled(*self.carry, *self.fixed))
            issued = time.perf_counter() - start
            jax.block_until_ready(self.carry)
        return issued

    def release(self) -> None:
        """Drops the buffers."""
        self.carry = ()
        self.fixed = ()
        self.compiled = None


def looped(fn: Callable, n_carry: int, steps_per_call: int) -> Callable:
    """``fn`` run ``steps_per_call`` times in one ``lax.fori_loop``.

    Args:
      fn: A step ``fn(*carry, *fixed) -> tuple`` of ``n_carry`` new carried values.
      n_carry: How many leading arguments are carried from step to step.
      steps_per_call: The loop's trip count.

    Returns:
      A function of the same arguments and results as ``fn``.
    """

    def run(*args: Any) -> tuple:
        carry, fixed = tuple(args[:n_carry]), args[n_carry:]

        def body(_: jax.Array, carry: tuple) -> tuple:
            return tuple(fn(*carry, *fixed))

        return jax.lax.fori_loop(0, steps_per_call, body, carry)

    return run


@dataclasses.dataclass
class Program:
    """A lowered step, not yet compiled, and the buffers its runner will carry.

    Lowering runs in the calling thread (it traces Python); ``compile`` can run
    in another (XLA compiles without holding the GIL), so that
    ``bench.measure`` compiles several programs at once.

    Attributes:
      name: The row's name.
      lowered: ``jax.jit(...).lower(...)`` of the step (or of ``looped`` steps).
      carry: As ``Runner.carry``.
      fixed: As ``Runner.fixed``.
      steps_per_call: As ``Runner.steps_per_call``.
      lower_s: Seconds to trace and lower.
    """

    name: str
    lowered: Any
    carry: tuple
    fixed: tuple
    steps_per_call: int
    lower_s: float

    def compile(self) -> Runner:
        """Compiles the program; ``compile_s`` is the lowering's and the compile's seconds.

        Compiled beside others its compile takes longer than alone.
        """
        start = time.perf_counter()
        compiled = self.lowered.compile()
        seconds = self.lower_s + time.perf_counter() - start
        self.lowered = None
        return _runner(self.name, compiled, seconds, self.carry, self.fixed, self.steps_per_call)


def _lower(name: str, fn: Callable, carry: tuple, fixed: tuple, steps_per_call: int) -> Program:
    if steps_per_call > 1:
        fn = looped(fn, len(carry), steps_per_call)
    start = time.perf_counter()
    donate = tuple(range(len(carry)))
    lowered = jax.jit(fn, donate_argnums=donate).lower(*carry, *fixed)
    return Program(name, lowered, carry, fixed, steps_per_call, time.perf_counter() - start)


def _runner(
    name: str, compiled: Any, seconds: float, carry: tuple, fixed: tuple, steps_per_call: int
) -> Runner:
    text = compiled.as_text()
    if steps_per_call > 1:
        launches = hlo.count_loop_launches(text, steps_per_call) if text else -1
        bytes_xla = float("nan")
    else:
        launches = hlo.count_launches(text) if text else -1
        bytes_xla = hlo.cost_bytes_accessed(compiled)
    return Runner(
        name=name,
        compiled=compiled,
        carry=carry,
        fixed=fixed,
        compile_s=seconds,
        launches=launches,
        temp_bytes=hlo.temp_bytes(compiled),
        bytes_xla=bytes_xla,
        steps_per_call=steps_per_call,
    )


def lars_program(
    name: str, params: list[jax.Array], grads: list[jax.Array], steps_per_call: int = 1
) -> Program:
    """Lowers the LARS step of ``name`` ("optax" or a backend); ``params`` become its own.

    ``steps_per_call`` > 1: that many steps in one call (``looped``).

    Raises:
      Whatever the backend raises for this configuration or these arrays.
    """
    apply = name.endswith(APPLY_SUFFIX)
    factory = make_tx_factory(name.removesuffix(APPLY_SUFFIX))
    # The state's structure does not depend on the learning rate.
    state = jax.jit(factory(LEARNING_RATE).init)(params)
    lr = jnp.asarray(LEARNING_RATE, jnp.float32)
    step = make_step(factory, apply)
    return _lower(name, step, (params, state), (grads, lr), steps_per_call)


def lars_runner(
    name: str, params: list[jax.Array], grads: list[jax.Array], steps_per_call: int = 1
) -> Runner:
    """``lars_program`` compiled."""
    return lars_program(name, params, grads, steps_per_call).compile()


def copy_program(nbytes: int, steps_per_call: int = 1) -> Program:
    """Lowers the copy floor on a float32 buffer of ``nbytes // 2`` bytes.

    Args:
      nbytes: The bytes the copy is to move (read plus write).
      steps_per_call: > 1: that many copies in one call (``looped``), the
        ``COPY_LOOP`` row.
    """
    x = jnp.ones((max(1, nbytes // 8),), jnp.float32)
    c = jnp.asarray(1.0, jnp.float32)
    d = jnp.asarray(0.0, jnp.float32)
    name = COPY if steps_per_call == 1 else COPY_LOOP
    return _lower(name, copy_step, (x,), (c, d), steps_per_call)


def copy_runner(nbytes: int, steps_per_call: int = 1) -> Runner:
    """``copy_program`` compiled."""
    return copy_program(nbytes, steps_per_call).compile()


def first_update(runner: Runner, params0: list[np.ndarray]) -> list[np.ndarray]:
    """The update of the runner's first call (call right after it), on the host.

    With ``steps_per_call`` > 1 that is the sum of the call's steps' updates.
    """
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
