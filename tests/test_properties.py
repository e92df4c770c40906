"""Property-based tests: random pytrees and hyperparameters, reference vs the oracle.

The update runs eagerly (no jax.jit): each random tree structure would
otherwise compile a new program, while eager operations are cached per leaf
shape, and the shapes come from a small fixed set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import strategies
from backend_cases import TOLERANCES, assert_matches_oracle
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lars

SHAPES = [(), (0,), (1,), (3,), (17,), (4, 5), (0, 3), (2, 3, 4)]
STEPS = 3


def _f32(x: float) -> np.ndarray:
    return np.asarray(x, np.float32)


@st.composite
def leaf(draw, magnitudes=(-3.0, 2.0), shape=None):
    """A float32 array: normal values, all zeros, or normal with some exact zeros."""
    if shape is None:
        shape = draw(st.sampled_from(SHAPES))
    kind = draw(st.sampled_from(["normal", "zeros", "sparse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    lo, hi = magnitudes
    scale = 10.0 ** draw(st.floats(lo, hi))
    x = scale * rng.standard_normal(shape)
    if kind == "zeros":
        x = np.zeros(shape)
    elif kind == "sparse":
        x = np.where(rng.random(shape) < 0.5, 0.0, x)
    return np.asarray(x, np.float32)


def trees(leaves):
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from("abcdef"), children, min_size=1, max_size=4),
            st.lists(children, min_size=1, max_size=3),
            st.tuples(children, children),
        ),
        max_leaves=6,
    )


hyperparameters = st.builds(
    lambda lr, hp: {"learning_rate": lr, **hp},
    st.one_of(st.just(0.0), st.floats(1e-4, 2.0)),
    strategies.hyperparameters,
)


@st.composite
def problems(draw, magnitudes=(-3.0, 2.0)):
    params = draw(trees(leaf(magnitudes)))
    n = len(jax.tree.leaves(params))
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    treedef = jax.tree.structure(params)
    grads = []
    for _ in range(STEPS):
        gs = [draw(leaf(magnitudes, shape)) for shape in shapes]
        grads.append(jax.tree.unflatten(treedef, gs))
    decay_mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    trust_mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return params, grads, decay_mask, trust_mask


def _run(params, grads, hp, decay_mask, trust_mask):
    treedef = jax.tree.structure(params)
    opt = lars.lars(
        weight_decay_mask=jax.tree.unflatten(treedef, decay_mask),
        trust_ratio_mask=jax.tree.unflatten(treedef, trust_mask),
        backend="reference",
        **hp,
    )
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    for g in grads:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return p, state


# Three steps that cancel ~all of a scalar w (0.0065 -> 4e-5 -> ...): the last
# trust ratio inherits w_(T-1)'s float32 error (2.7e-5 relative), which the
# ratio tolerance allows through the oracle's ratio sensitivity.
@example(
    problem=(
        ((_f32(0.1257302165031433), _f32(0.1257302165031433)), _f32(0.006502555683255196)),
        [((_f32(0.1257302165031433), _f32(0.1257302165031433)), _f32(0.1257302165031433))] * STEPS,
        [False, False, False],
        [False, False, True],
    ),
    hp={
        "learning_rate": 1.86328125,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "trust_coefficient": 0.533203125,
        "eps": 0.0,
        "nesterov": False,
        "trust_clip": None,
        "grad_clip_norm": None,
        "grad_clip_value": None,
        "lr_inside_momentum": False,
    },
)
@settings(max_examples=50, deadline=None)
@given(problem=problems(), hp=hyperparameters)
def test_reference_matches_oracle(problem, hp):
    params, grads, decay_mask, trust_mask = problem
    got_params, got_state = _run(params, grads, hp, decay_mask, trust_mask)
    n = len(decay_mask)
    want = oracle.run(
        [np.asarray(x, np.float64) for x in jax.tree.leaves(params)],
        [[np.asarray(x, np.float64) for x in jax.tree.leaves(g)] for g in grads],
        oracle.OracleConfig(**hp),
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        round_params=[oracle.rounder(np.float32)] * n,
    )
    assert_matches_oracle(
        got_params,
        got_state,
        want,
        [np.asarray(x, np.float64) for x in jax.tree.leaves(params)],
        [(str(i),) for i in range(n)],
        TOLERANCES["float32"],
        jnp.float32,
    )


@settings(max_examples=40, deadline=None)
@given(problem=problems(magnitudes=(-12.0, 12.0)), hp=hyperparameters)
def test_no_nan_or_inf_for_finite_inputs(problem, hp):
    """Values from 1e-12 to 1e12 in magnitude: every output stays finite."""
    params, grads, decay_mask, trust_mask = problem
    got_params, got_state = _run(params, grads, hp, decay_mask, trust_mask)
    for x in jax.tree.leaves((got_params, got_state)):
        assert np.all(np.isfinite(np.asarray(x)))
    assert jax.tree.structure(got_params) == jax.tree.structure(jax.tree.map(jnp.asarray, params))
    for r, tm in zip(np.asarray(got_state.trust_ratio), trust_mask, strict=True):
        if not tm:
            assert float(r) == 1.0
