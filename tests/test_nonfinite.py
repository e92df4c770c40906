"""skip_nonfinite: a step with a NaN/Inf gradient changes nothing, on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from backends import BACKENDS

import lars

# Interpret-mode Pallas compiles slowly on a CPU; it gets its own small case.


def _params() -> dict:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    w[0, 0] = -0.0  # a negative zero must survive a skipped step bit for bit
    return {
        "w": jnp.asarray(w),
        "b": jnp.zeros((3,), jnp.float32),
        "s": jnp.asarray(1.5, jnp.float32),
    }


def _grads(i: int, params: dict) -> dict:
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _bits(tree) -> list[np.ndarray]:
    return [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]


def _assert_bitwise(a, b) -> None:
    for x, y in zip(_bits(a), _bits(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _poison(grads: dict, kind: str) -> dict:
    g = dict(grads)
    if kind == "nan":
        g["w"] = g["w"].at[2, 1].set(jnp.nan)
    elif kind == "inf":
        g["b"] = g["b"].at[0].set(jnp.inf)
    else:
        g["s"] = jnp.asarray(-jnp.inf, jnp.float32)
    return g


def _update_then_apply(opt):
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step)


# The two forms of a step: updates then optax.apply_updates, and the new-params
# step with params and state donated (in place where the backend has that form:
# a skipped step must then leave the very buffers it was given unchanged).
FORMS = {
    "update": _update_then_apply,
    "apply_gradients": lambda opt: jax.jit(opt.apply_gradients, donate_argnums=(0, 1)),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_steps_change_nothing(backend: str, form: str) -> None:
    opt = lars.lars(
        optax.linear_schedule(0.5, 0.1, 10),
        weight_decay=1e-3,
        nesterov=True,
        skip_nonfinite=True,
        backend=backend,
    )
    step = FORMS[form](opt)

    def run(schedule: list[str | None]):
        p = _params()
        s = opt.init(p)
        for i, bad in enumerate(schedule):
            g = _grads(i, p)
            if bad is not None:
                g = _poison(g, bad)
                p_before, s_before = jax.tree.map(jnp.copy, (p, s))  # p, s may be donated
            p, s = step(p, s, g)
            if bad is not None:
                _assert_bitwise(p, p_before)
                _assert_bitwise((s.count, s.momentum, s.trust_ratio), s_before[:3])
                assert int(s.skipped) == int(s_before.skipped) + 1
        return p, s

    # Steps with poisoned grads use the same good-grad index as the clean run,
    # so after skipping, both runs must continue identically.
    clean_p, clean_s = run([None, None, None, None])
    dirty_p, dirty_s = run([None, "nan", None, "inf", None, "neg_inf", None])
    del clean_p, clean_s
    assert int(dirty_s.skipped) == 3
    assert int(dirty_s.count) == 4
    for x in jax.tree.leaves(dirty_p):
        assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_matches_a_run_without_the_bad_steps(backend: str) -> None:
    opt = lars.lars(0.3, weight_decay=1e-3, skip_nonfinite=True, backend=backend)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    good = [_grads(i, _params()) for i in range(4)]

    def run(grads_seq):
        p = _params()
        s = opt.init(p)
        for g in grads_seq:
            u, s = step(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    p1, s1 = run(good)
    p2, s2 = run(
        [good[0], _poison(good[1], "nan"), good[1], good[2], _poison(good[3], "inf"), good[3]]
    )
    _assert_bitwise(p1, p2)
    _assert_bitwise(
        (s1.count, s1.momentum, s1.trust_ratio), (s2.count, s2.momentum, s2.trust_ratio)
    )
    assert int(s1.skipped) == 0 and int(s2.skipped) == 2


def test_without_skipping_nan_propagates() -> None:
    """The default (braintools/optax behaviour): a NaN gradient poisons its leaf."""
    opt = lars.lars(0.3)
    p = _params()
    s = opt.init(p)
    u, s = opt.update(_poison(_grads(0, p), "nan"), s, p)
    assert np.isnan(np.asarray(optax.apply_updates(p, u)["w"])).any()
    assert int(s.skipped) == 0


def test_lars_class_skips_and_checkpoints_the_counter() -> None:
    opt = lars.Lars(lr=0.2, skip_nonfinite=True).register_trainable_weights(_params())
    opt.update(_grads(0, _params()))
    before = opt.params
    opt.update(_poison(_grads(1, before), "inf"))
    _assert_bitwise(opt.params, before)
    assert int(opt.opt_state.value.skipped) == 1
    sd = opt.state_dict()
    other = lars.Lars(lr=0.2, skip_nonfinite=True).register_trainable_weights(opt.params)
    other.load_state_dict(sd)
    assert int(other.opt_state.value.skipped) == 1


def test_skip_nonfinite_must_be_bool() -> None:
    with pytest.raises(TypeError, match="skip_nonfinite"):
        lars.lars(0.1, skip_nonfinite=1)
