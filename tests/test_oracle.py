"""Checks of the oracle itself, and that every tested option matters.

The backend suite is only as good as the oracle and the cases: the oracle is
checked here against a hand-computed example and against optax.lars and
braintools.optim.Lars (third-party implementations of two of its forms), and
every case of the suite is checked to change the trajectory by far more than
the tolerance, so a backend that ignored an option would fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from backend_cases import (
    CASES,
    CASES_BY_NAME,
    CLIP,
    TOLERANCES,
    Case,
    as_f64_leaves,
    expected_mask,
    make_problem,
    oracle_run,
)


def test_hand_computed_two_steps():
    # ||w|| = 5, ||g|| = 1, eta = 0.1, eps = 0: r = 0.5, u = (0.3, 0.4), v = u,
    # w = (3, 4) - 2 * (0.3, 0.4) = (2.4, 3.2). Step 2: ||w|| = 4, r = 0.4,
    # u = (0.24, 0.32), v = 0.9 * (0.3, 0.4) + u = (0.51, 0.68), w = (1.38, 1.84).
    cfg = oracle.OracleConfig(learning_rate=2.0, momentum=0.9, trust_coefficient=0.1, eps=0.0)
    g = [np.array([0.6, 0.8])]
    s = oracle.step(oracle.init([np.array([3.0, 4.0])]), g, cfg)
    np.testing.assert_allclose(s.params[0], [2.4, 3.2], rtol=1e-15)
    assert s.trust_ratio == [pytest.approx(0.5, rel=1e-15)]
    s = oracle.step(s, g, cfg)
    np.testing.assert_allclose(s.params[0], [1.38, 1.84], rtol=1e-14)
    np.testing.assert_allclose(s.momentum[0], [0.51, 0.68], rtol=1e-14)
    assert s.count == 2


def test_hand_computed_options():
    w, g = [np.array([3.0, 4.0]), np.zeros(3)], [np.array([0.6, 0.8]), np.ones(3)]
    # Weight decay 0.1 on leaf 0 only: g = (0.9, 1.2), ||g|| = 1.5, r = 0.1 * 5 / 1.5.
    cfg = oracle.OracleConfig(learning_rate=1.0, weight_decay=0.1, trust_coefficient=0.1, eps=0.0)
    s = oracle.step(oracle.init(w), g, cfg, decay_mask=[True, False])
    assert s.trust_ratio == [pytest.approx(1 / 3, rel=1e-15), 1.0]  # zero ||w||: r = 1
    np.testing.assert_allclose(s.params[0], [3 - 0.3, 4 - 0.4], rtol=1e-15)
    np.testing.assert_allclose(s.params[1], -np.ones(3), rtol=1e-15)
    # trust_clip applies after the zero-norm rule, on adaptive leaves only.
    cfg = oracle.OracleConfig(trust_coefficient=0.1, trust_clip=0.2, eps=0.0)
    s = oracle.step(oracle.init(w), g, cfg, trust_mask=[True, True])
    assert s.trust_ratio == [0.2, 0.2]
    s = oracle.step(oracle.init(w), g, cfg, trust_mask=[True, False])
    assert s.trust_ratio == [0.2, 1.0]
    # Global-norm clip: ||(0.6, 0.8, 1, 1, 1)|| = 2 -> halved by grad_clip_norm=1.
    cfg = oracle.OracleConfig(grad_clip_norm=1.0, trust_coefficient=0.1, momentum=0.0, eps=0.0)
    s = oracle.step(oracle.init(w), g, cfg, trust_mask=[False, False])
    np.testing.assert_allclose(s.params[1], -0.5 * np.ones(3), rtol=1e-15)
    # Nesterov, lr inside: u = lr*r*g; v = u; direction = u + mu*v = 1.9 u.
    cfg = oracle.OracleConfig(
        learning_rate=0.5, nesterov=True, lr_inside_momentum=True, trust_coefficient=0.1, eps=0.0
    )
    s = oracle.step(oracle.init(w), g, cfg)
    np.testing.assert_allclose(s.params[0], [3 - 1.9 * 0.15, 4 - 1.9 * 0.2], rtol=1e-15)


def _run_case(case: Case, steps: int = 10, **overrides) -> oracle.OracleState:
    params, grads, paths = make_problem(257, 65, steps, seed=1)
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    return oracle_run(case, params, grads, paths, shapes, **overrides)


def _relative_difference(a: oracle.OracleState, b: oracle.OracleState) -> float:
    """Largest per-leaf max|a - b|, relative to the leaf's total change in ``a``."""
    params0 = as_f64_leaves(make_problem(257, 65, 1, seed=1)[0])
    out = 0.0
    for pa, pb, p0 in zip(a.params, b.params, params0, strict=True):
        if pa.size and np.any(pa != p0):
            out = max(out, float(np.max(np.abs(pa - pb)) / np.max(np.abs(pa - p0))))
    return out


@pytest.mark.parametrize("case", CASES[1:], ids=[c.name for c in CASES[1:]])
def test_every_case_changes_the_result(case: Case):
    """Each case moves some leaf away from the defaults' by >> the float32 tolerance."""
    diff = _relative_difference(_run_case(CASES_BY_NAME["defaults"]), _run_case(case))
    assert diff > 50 * TOLERANCES["float32"].delta


@pytest.mark.parametrize(
    "name, option, off",
    [
        ("trust_clip", "trust_clip", None),
        ("grad_clip_norm", "grad_clip_norm", None),
        ("grad_clip_value", "grad_clip_value", None),
        ("nesterov", "nesterov", False),
        ("large_eps", "eps", 1e-8),
        ("lr_inside_momentum", "lr_inside_momentum", False),
        ("weight_decay", "weight_decay", 0.0),
    ],
)
def test_each_option_matters_alone(name: str, option: str, off):
    """Turning only this option off changes the case's trajectory."""
    on = _run_case(CASES_BY_NAME[name])
    without = _run_case(CASES_BY_NAME[name], **{option: off})
    assert _relative_difference(on, without) > 50 * TOLERANCES["float32"].delta


def test_trust_clip_binds_on_some_leaves_only():
    ratios = _run_case(CASES_BY_NAME["defaults"], steps=1).trust_ratio
    assert min(ratios) < CLIP < max(r for r in ratios if r != 1.0)


def test_oracle_matches_optax_lars():
    """The lr-inside form with eps=0 is optax.lars (float32, 20 steps)."""
    params, grads, paths = make_problem(257, 65, 20, seed=2)
    sched = optax.linear_schedule(0.5, 0.1, 20)
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    opt = optax.lars(
        sched,
        weight_decay=0.01,
        weight_decay_mask=mask,
        trust_coefficient=0.02,
        trust_ratio_mask=mask,
        momentum=0.9,
        nesterov=True,
    )
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g in grads:
        p, state = step(p, state, jax.tree.map(jnp.float32, g))
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    cfg = oracle.OracleConfig(
        learning_rate=lambda t: 0.5 + (0.1 - 0.5) * min(t, 20) / 20,
        weight_decay=0.01,
        trust_coefficient=0.02,
        eps=0.0,
        nesterov=True,
        lr_inside_momentum=True,
    )
    f32 = jax.tree.map(lambda x: np.asarray(np.float32(x), np.float64), params)
    want = oracle.run(
        jax.tree.leaves(f32),
        [as_f64_leaves(jax.tree.map(np.float32, g)) for g in grads],
        cfg,
        decay_mask=expected_mask("callable", paths, shapes),
        trust_mask=expected_mask("callable", paths, shapes),
        round_params=[oracle.rounder(np.float32)] * len(paths),
    )
    for got, w, w0 in zip(as_f64_leaves(p), want.params, jax.tree.leaves(f32), strict=True):
        if got.size:
            scale = np.max(np.abs(w - w0)) + 4 * np.finfo(np.float32).eps * np.max(np.abs(w))
            np.testing.assert_array_less(np.max(np.abs(got - w)), 1e-5 * scale + 1e-30)


def test_oracle_matches_braintools_lars():
    """The default form is braintools.optim.Lars (float32, 20 steps, all options)."""
    braintools = pytest.importorskip("braintools")
    brainstate = pytest.importorskip("brainstate")
    params, grads, _ = make_problem(257, 65, 20, seed=3)
    flat = {
        "/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    states = {k: brainstate.ParamState(jnp.asarray(v, jnp.float32)) for k, v in flat.items()}
    kw = dict(momentum=0.8, weight_decay=0.01, trust_coefficient=0.02, eps=1e-3)
    opt = braintools.optim.Lars(lr=0.4, grad_clip_norm=2.0, grad_clip_value=0.2, **kw)
    opt.register_trainable_weights(states)
    keys = list(flat)
    grads_flat = [
        {k: np.float32(v) for k, v in zip(keys, jax.tree.leaves(g), strict=True)} for g in grads
    ]
    update = brainstate.transform.jit(opt.update)
    for g in grads_flat:
        update({k: jnp.asarray(v) for k, v in g.items()})
    # Flatten in the same (sorted key) order as the braintools dict.
    order = sorted(keys)
    cfg = oracle.OracleConfig(learning_rate=0.4, grad_clip_norm=2.0, grad_clip_value=0.2, **kw)
    want = oracle.run(
        [np.float64(np.float32(flat[k])) for k in order],
        [[np.float64(g[k]) for k in order] for g in grads_flat],
        cfg,
        round_params=[oracle.rounder(np.float32)] * len(order),
    )
    for k, w, w0 in zip(order, want.params, [flat[k] for k in order], strict=True):
        got = np.asarray(states[k].value, np.float64)
        if got.size:
            scale = np.max(np.abs(w - w0)) + 4 * np.finfo(np.float32).eps * np.max(np.abs(w))
            assert np.max(np.abs(got - w)) <= 1e-5 * scale, k
