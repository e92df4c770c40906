"""The native backend through the public API (``lars.lars``, ``lars.Lars``).

Memory (in place, no temporaries, with and without skip_nonfinite), agreement
with the reference backend under jit, traced hyperparameters (refused by
"native", run by "auto"), several CPU devices, and derivatives through a
step (the reference's rule, which the front end gives every kernel backend);
the state's trust ratios are the call's own vector.
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from backends import run_on_cpu_devices
from native_cases import CONFIGS, NAMES, big_problem, make_leaves, param_bytes, require_native

import lars


@pytest.fixture(autouse=True)
def _require_native():
    require_native()


# --------------------------------------------------------------------------
# Memory.


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_optax_step_allocates_no_temporaries(name: str, skip_nonfinite: bool):
    """lars.lars + optax.apply_updates, params and state donated (grads are not).

    Without nesterov the updates never exist as a buffer ("everything" has
    lr_inside_momentum, so they are -v). With skip_nonfinite the handler
    itself leaves params and momentum in place on a skipped step, so no copy
    of the old ones is kept.
    """
    params, grads, _ = big_problem()
    kwargs = {k: v for k, v in CONFIGS[name].items() if k != "nesterov"}
    opt = lars.lars(0.1, backend="native", skip_nonfinite=skip_nonfinite, **kwargs)
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * param_bytes(params), stats


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_apply_gradients_allocates_no_temporaries(skip_nonfinite: bool):
    """The public new-params step, params and state donated: in place, no temporaries."""
    params, grads, _ = big_problem()
    opt = lars.lars(0.1, weight_decay=1e-4, skip_nonfinite=skip_nonfinite, backend="native")
    state = opt.init(params)
    step = jax.jit(opt.apply_gradients, donate_argnums=(0, 1))
    stats = step.lower(params, state, grads).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * param_bytes(params), stats
    assert stats.alias_size_in_bytes >= 2 * param_bytes(params), stats


def test_lars_class_donate_runs_in_place_and_changes_nothing_else():
    """lars.Lars(donate=True): params and momentum reuse their buffers; same bits as without."""
    params, grads, _ = big_problem()
    names = [f"p{i}" for i in range(len(params))]
    g = dict(zip(names, grads, strict=True))
    results = {}
    for donate in (False, True):
        opt = lars.Lars(0.1, weight_decay=1e-4, nesterov=True, backend="native", donate=donate)
        opt.register_trainable_weights(
            {k: jnp.array(p) for k, p in zip(names, params, strict=True)}
        )
        stats = (
            opt._jit_step.lower(opt.params, g, opt.opt_state.value, jnp.float32(0.1))
            .compile()
            .memory_analysis()
        )
        if donate:
            assert stats.alias_size_in_bytes >= 2 * param_bytes(params), stats
            before = opt.params["p0"]
        else:
            assert stats.alias_size_in_bytes == 0, stats
        for _ in range(3):
            opt.step(g)
        if donate:
            assert before.is_deleted()  # the documented cost of donating
        results[donate] = jax.tree.map(np.asarray, (opt.params, opt.opt_state.value))
    for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_in_place_skip_nonfinite_allocates_no_temporaries():
    """The new-params form (what lars.Lars uses) with skip_nonfinite, donated."""
    params, grads, _ = big_problem()
    opt = lars.lars(
        0.1, weight_decay=1e-4, nesterov=True, grad_clip_norm=1.0, skip_nonfinite=True,
        backend="native",
    )  # fmt: skip
    state = opt.init(params)
    f = jax.jit(opt.apply_gradients, donate_argnums=(0, 1))
    stats = f.lower(params, state, grads).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * param_bytes(params), stats
    # And a skipped step through it changes nothing, bit for bit.
    before = [np.asarray(p).copy() for p in params]
    bad = [g.at[(0,) * g.ndim].set(jnp.inf) if k == 1 else g for k, g in enumerate(grads)]
    state = state._replace(momentum=[jnp.full_like(v, 0.25) for v in state.momentum])
    new, new_state = f([jnp.asarray(p) for p in before], state, bad)
    for a, b in zip(new, before, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))
    for v in new_state.momentum:
        assert np.all(np.asarray(v) == 0.25)
    assert int(new_state.skipped) == 1 and int(new_state.count) == 0


def test_training_step_needs_no_buffer_beyond_the_gradients():
    """Nesterov in a jitted training step: the updates overwrite the gradients.

    The gradients are temporaries of any training step; the native step adds
    no other buffer (the handler writes the updates over the gradients and the
    new params and momentum reuse the donated buffers).
    """
    params, _, _ = big_problem()
    opt = lars.lars(0.1, weight_decay=1e-4, nesterov=True, backend="native")
    state = opt.init(params)

    def loss(params, x):
        return sum(jnp.sum(p * p * x) for p in params)

    def train_step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, 0.5).compile()
    stats = compiled.memory_analysis()
    grad_bytes = param_bytes(params)
    assert stats.temp_size_in_bytes < grad_bytes + 0.01 * param_bytes(params), stats


# --------------------------------------------------------------------------
# Agreement and refusals.


def test_public_api_runs_native_under_jit():
    """lars.lars and lars.Lars with backend="native" match the reference backend.

    lars.Lars may take the in-place form (new params from the handler, rounded
    as ``p + (-(lr * v))`` twice) while lars.lars leaves ``p + (-(lr * v))`` to
    XLA, which may fuse it into one multiply-add: the two agree to the last bit
    or two, not necessarily bitwise.
    """
    params64, grads64 = make_leaves(3)
    params = {n: jnp.asarray(p, jnp.float32) for n, p in zip(NAMES, params64, strict=True)}
    grads = [
        {n: jnp.asarray(g, jnp.float32) for n, g in zip(NAMES, gs, strict=True)} for gs in grads64
    ]
    kwargs = {"weight_decay": 0.01, "weight_decay_mask": lars.exclude_bias_and_norm}
    results = {}
    for backend in ("native", "reference"):
        opt = lars.lars(0.3, backend=backend, **kwargs)
        state = opt.init(params)

        @jax.jit
        def step(p, s, g, opt=opt):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = params
        for g in grads:
            p, state = step(p, state, g)
        results[backend] = (p, state)
        obj = lars.Lars(0.3, backend=backend, **kwargs).register_trainable_weights(params)
        for g in grads:
            obj.update(g)
        for x, y in zip(
            jax.tree.leaves(results[backend]),
            jax.tree.leaves((obj.params, obj.opt_state.value)),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-8)
    for x, y in zip(
        jax.tree.leaves(results["native"]), jax.tree.leaves(results["reference"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


def test_traced_hyperparameters_are_unsupported():
    """inject_hyperparams traces the decay: "native" refuses, "auto" falls back."""
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.1)}
    opt = optax.inject_hyperparams(lars.lars, static_args=("backend",))(
        learning_rate=0.1, weight_decay=0.01, backend="native"
    )
    with pytest.raises(ValueError, match="is a traced value"):
        jax.jit(opt.update)(grads, opt.init(params), params)
    auto = optax.inject_hyperparams(lars.lars, static_args=("backend",))(
        learning_rate=0.1, weight_decay=0.01, backend="auto"
    )
    updates, _ = jax.jit(auto.update)(grads, auto.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.slow
def test_runs_with_several_cpu_devices():
    """With a simulated device mesh, "native" runs and "auto" still picks it.

    (Sharded params are tested in test_sharding.py.)
    """
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax, lars
        assert jax.device_count() == 4
        assert "native" in lars.available_backends()
        p = {"w": jnp.arange(5.0), "b": jnp.ones(3)}
        g = jax.tree.map(lambda x: 0.5 * x + 1.0, p)
        got = lars.lars(0.1, weight_decay=1e-2, backend="auto")
        want = lars.lars(0.1, weight_decay=1e-2, backend="reference")
        u1, _ = jax.jit(got.update)(g, got.init(p), p)
        u2, _ = jax.jit(want.update)(g, want.init(p), p)
        for k in p:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6)
        print("ran")
        """
    )
    run_on_cpu_devices(script, devices=4, expect="ran")


# --------------------------------------------------------------------------
# Derivatives.


@pytest.mark.parametrize("write_params", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_differentiable_like_the_reference(nesterov: bool, write_params: bool):
    """Derivatives through a native step are the reference step's (meta-gradients).

    ``write_params`` takes the in-place form (``apply_gradients``, the one
    ``lars.Lars`` uses).
    """
    rng = np.random.default_rng(5)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }

    def meta(scale, backend):
        opt = lars.lars(0.1, weight_decay=1e-3, nesterov=nesterov, backend=backend)
        grads = jax.tree.map(lambda x: scale * x + 0.1, params)
        state = opt.init(params)
        if write_params:
            new, state = opt.apply_gradients(params, state, grads)
        else:
            updates, state = opt.update(grads, state, params)
            new = optax.apply_updates(params, updates)
        ratio = jnp.sum(state.trust_ratio)
        return jnp.sum(new["w"] ** 2) + jnp.sum(state.momentum["b"]) + ratio

    want = jax.grad(meta)(0.5, "reference")
    got = jax.grad(meta)(0.5, "native")
    got_jit = jax.jit(jax.grad(meta), static_argnums=1)(0.5, "native")
    assert float(want) != 0.0
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(got_jit), float(want), rtol=1e-4)
    _, tangent = jax.jvp(lambda s: meta(s, "native"), (0.5,), (1.0,))
    np.testing.assert_allclose(float(tangent), float(want), rtol=1e-5)


# --------------------------------------------------------------------------
# The state's trust ratios.


@pytest.mark.parametrize("apply", [True, False])
def test_state_ratios_are_the_calls_vector(apply: bool):
    """The step's ``state.trust_ratio`` is the call's ratio vector: no concatenate.

    Stacking per-leaf scalars cost one XLA launch per step on a GPU (two on
    ResNet-50's 161 leaves); the handler writes one vector, and XLA folds the
    front end's slices and stack back into it.
    """
    params = {"w": jnp.ones((3, 5)), "b": jnp.ones((5,)), "k": jnp.ones((2, 2, 3, 4))}
    grads = jax.tree.map(lambda p: p * 0.5, params)
    tx = lars.lars(0.1, weight_decay=1e-4, trust_coefficient=1e-3, backend="native")
    state = tx.init(params)

    def step(params, state, grads):
        if apply:
            return tx.apply_gradients(params, state, grads)
        updates, state = tx.update(grads, state, params)
        return updates, state

    text = jax.jit(step).lower(params, state, grads).compile().as_text()
    assert "lars_native_step" in text
    assert "concatenate(" not in text
    got = jax.jit(step)(params, state, grads)[1].trust_ratio
    ref = lars.lars(0.1, weight_decay=1e-4, trust_coefficient=1e-3, backend="reference")
    _, ref_state = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref_state.trust_ratio), rtol=1e-6)
