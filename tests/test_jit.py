"""Compilation: one program per configuration, whatever the learning rate does."""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lars


def params_tree() -> dict:
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3), "s": jnp.ones(())}


def grads_tree(k: int) -> dict:
    return jax.tree.map(lambda x: jnp.full_like(x, 0.1 * (k + 1)) + 0.01 * x, params_tree())


@contextlib.contextmanager
def count_compiles():
    """Collects the names of the programs XLA compiles inside the block."""
    compiled: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                compiled.append(msg.split(" ")[1])

    handler = Handler(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield compiled
    finally:
        logger.removeHandler(handler)


def test_compile_counter_sees_compiles():
    """Positive control: the counter is not blind."""
    with count_compiles() as compiled:
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(5))
    assert any("lambda" in name for name in compiled)


@pytest.mark.parametrize(
    "learning_rate",
    [0.1, optax.warmup_cosine_decay_schedule(0.0, 0.5, 2, 10)],
    ids=["float", "schedule"],
)
def test_jitted_update_compiles_once(learning_rate):
    opt = lars.lars(learning_rate, weight_decay=1e-3, nesterov=True)
    params = params_tree()
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, state = update(grads_tree(0), state, params)
    params = optax.apply_updates(params, updates)
    with count_compiles() as compiled:
        for k in range(1, 4):
            updates, state = update(grads_tree(k), state, params)
            params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1
    assert not [n for n in compiled if "update" in n], compiled
    assert int(state.count) == 4


def first_step_jitted(opt):
    """(params, state after one step of the jitted update, that update)."""
    params = params_tree()
    update = jax.jit(opt.update)
    _, state = update(grads_tree(0), opt.init(params), params)
    return params, state, update


def test_inject_hyperparams_changes_lr_without_recompiling():
    # Masks are passed through static_args: inject_hyperparams would otherwise
    # take a callable mask for a schedule of the step count.
    factory = optax.inject_hyperparams(lars.lars, static_args=("weight_decay_mask",))
    opt = factory(
        learning_rate=0.1, weight_decay=1e-2, weight_decay_mask=lars.exclude_bias_and_norm
    )
    params, state, update = first_step_jitted(opt)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05, jnp.float32)
    second, state = update(grads_tree(1), state, params)
    assert update._cache_size() == 1
    # The new rate took effect: same numbers as lars.lars with lr 0.1 then 0.05.
    direct = lars.lars(
        lambda count: jnp.where(count == 0, 0.1, 0.05),
        weight_decay=1e-2,
        weight_decay_mask=lars.exclude_bias_and_norm,
    )
    d_state = direct.init(params)
    _, d_state = direct.update(grads_tree(0), d_state, params)
    want, _ = direct.update(grads_tree(1), d_state, params)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_inject_hyperparams_other_values_are_traced_and_applied():
    """momentum injected as a traced value is applied (it is not validated then)."""
    opt = optax.inject_hyperparams(lars.lars)(learning_rate=0.1, momentum=0.9)
    params, state, update = first_step_jitted(opt)
    state.hyperparams["momentum"] = jnp.asarray(0.0, jnp.float32)
    got, state = update(grads_tree(1), state, params)
    assert update._cache_size() == 1
    ref = lars.lars(0.1, momentum=0.0)
    want, _ = ref.update(grads_tree(1), ref.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def _lars_scheduler():
    return lars.schedules.WarmupCosineSchedule(base_lr=0.5, warmup_steps=2, total_steps=6)


def _braintools_scheduler():
    braintools = pytest.importorskip("braintools")
    return braintools.optim.WarmupCosineSchedule(base_lr=0.5, warmup_steps=2, total_steps=6)


@pytest.mark.parametrize("make_scheduler", [_lars_scheduler, _braintools_scheduler])
def test_lars_object_compiles_its_step_once(make_scheduler):
    sched = make_scheduler()
    opt = lars.Lars(sched, weight_decay=1e-3)
    opt.register_trainable_weights(params_tree())
    opt.update(grads_tree(0))
    sched.step()
    with count_compiles() as compiled:
        for k in range(1, 5):
            opt.update(grads_tree(k))
            sched.step()
        opt.current_lr = 0.123
        opt.update(grads_tree(5))
        sched.step(1)
        opt.update(grads_tree(6))
    assert compiled == [], compiled
    assert int(opt.step_count.value) == 7


def test_lars_object_with_schedule_function_compiles_once():
    opt = lars.Lars(optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5))
    opt.register_trainable_weights(params_tree())
    opt.update(grads_tree(0))
    with count_compiles() as compiled:
        for k in range(1, 4):
            opt.update(grads_tree(k))
    assert compiled == [], compiled
    assert float(opt.current_lr) == pytest.approx(0.5 * 0.5**4)
