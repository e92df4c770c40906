"""Bad input to every CPU backend raises, names the leaf, and changes nothing.

Hypothesis draws the random problems of ``test_properties_backends.py`` and
damages one leaf: a wrong shape, a non-float or unaccepted dtype or a missing
leaf in the grads, or a wrong momentum shape in the state. Each must raise
ValueError/TypeError naming the leaf's pytree path and leave params and state
(and ``lars.Lars``) untouched, eagerly and under ``jax.jit``. A dtype pair a
backend is not exercised on is rejected with a TypeError naming the dtype.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backends import require
from hypothesis import given
from hypothesis import strategies as st
from test_properties_backends import (
    ALL_COMBOS,
    BACKENDS,
    BF16,
    COMBOS,
    F16,
    F32,
    F64,
    Problem,
    as_bytes,
    example_settings,
    leaf_paths,
    make_lr,
    problems,
)

import lars

pytestmark = pytest.mark.slow  # hypothesis compiles a program per example

# --------------------------------------------------------------------------
# Bad input raises, names the leaf, and changes nothing.

# (kind of damage, exception, what the message says before the path)
DAMAGE = {
    "shape": (ValueError, "grads leaf at"),
    "int32": (TypeError, "grads leaf at"),
    "bool": (TypeError, "grads leaf at"),
    "float_dtype": (TypeError, "grads leaf at"),  # a float dtype not accepted for the param
    "missing": (ValueError, "missing leaves at"),
    "momentum_shape": (ValueError, "state.momentum leaf at"),
}


def wrong_shape(shape: tuple[int, ...], how: int) -> tuple[int, ...]:
    if not shape:
        return (1,)
    options = [shape[:-1], (*shape, 1), (*shape[:-1], shape[-1] + 1)]
    return options[how % len(options)]


@st.composite
def bad_inputs(draw, backend: str):
    """(problem, leaf index, kind of damage, how): float64 is left out (no x64)."""
    combos = [c for c in COMBOS[backend] if c[0] != F64]
    problem = draw(problems(backend, 300, combos))
    i = draw(st.integers(0, len(problem.specs) - 1))
    kinds = sorted(DAMAGE)
    if problem.specs[i].param_dtype == F32:
        kinds.remove("float_dtype")  # every float dtype is accepted on float32 params
    return problem, i, draw(st.sampled_from(kinds)), draw(st.integers(0, 2))


def damage(leaf: jax.Array, kind: str, how: int) -> Any:
    if kind == "shape":
        return jnp.zeros(wrong_shape(leaf.shape, how), leaf.dtype)
    if kind == "int32":
        return jnp.zeros(leaf.shape, jnp.int32)
    if kind == "bool":
        return jnp.zeros(leaf.shape, bool)
    if kind == "float_dtype":  # low-precision params take only their own dtype
        others = [d for d in (F32, BF16, F16) if d != leaf.dtype]
        return jnp.zeros(leaf.shape, others[how % len(others)])
    if kind == "missing":
        return None
    raise ValueError(kind)


def replace_leaf(tree: Any, i: int, new: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves[i] = new
    return jax.tree.unflatten(treedef, leaves)


def random_state(problem: Problem, params: Any) -> lars.LarsState:
    """A state in the middle of training: nonzero momentum, ratios and counts."""
    rng = np.random.default_rng(0)
    state = problem.transform("reference").init(params)
    return lars.LarsState(
        count=jnp.asarray(5, jnp.int32),
        momentum=jax.tree.map(
            lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), state.momentum
        ),
        trust_ratio=jnp.asarray(rng.uniform(0.1, 2.0, state.trust_ratio.shape), jnp.float32),
        skipped=jnp.asarray(1, jnp.int32),
    )


def assert_names_leaf(excinfo: pytest.ExceptionInfo, prefix: str, path: str) -> None:
    message = str(excinfo.value)
    pattern = re.escape(f"{prefix} {path}") + r"(?=$|[\s,;:])"
    assert re.search(pattern, message), f"{path!r} not named in: {message}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_leaf_and_changes_nothing(backend: str):
    require(backend)

    @example_settings(backend, "bad_input")
    @given(bad=bad_inputs(backend))
    def check(bad):
        problem, i, kind, how = bad
        error, prefix = DAMAGE[kind]
        path = leaf_paths(problem.tree)[i]
        params = problem.params()
        state = random_state(problem, params)
        grads = problem.grads(0)
        if kind == "momentum_shape":
            v = jax.tree.leaves(state.momentum)[i]
            state = state._replace(
                momentum=replace_leaf(
                    state.momentum, i, jnp.zeros(wrong_shape(v.shape, how), v.dtype)
                )
            )
        else:
            grads = replace_leaf(grads, i, damage(jax.tree.leaves(grads)[i], kind, how))
        before = as_bytes((params, state))
        opt = problem.transform(backend)
        for update in (opt.update, jax.jit(opt.update)):
            with pytest.raises(error) as excinfo:
                update(grads, state, params)
            assert_names_leaf(excinfo, prefix, path)
            assert as_bytes((params, state)) == before

        # lars.Lars keeps params and state itself: a rejected update leaves them.
        if kind == "momentum_shape":
            return
        holder = lars.Lars(
            make_lr(problem.lr),
            weight_decay_mask=problem.mask(problem.decay_mask),
            trust_ratio_mask=problem.mask(problem.trust_mask),
            backend=backend,
            **problem.hp,
        )
        holder.register_trainable_weights(params)
        holder.opt_state.value = state
        before = as_bytes((holder.params, holder.opt_state.value, holder.step_count.value))
        with pytest.raises(error) as excinfo:
            holder.update(grads)
        assert_names_leaf(excinfo, prefix, path)
        after = as_bytes((holder.params, holder.opt_state.value, holder.step_count.value))
        assert after == before

    check()


# --------------------------------------------------------------------------
# The dtype table: what a backend is not exercised on, it rejects clearly.

EXCLUDED = [(b, c) for b in BACKENDS for c in ALL_COMBOS if c not in COMBOS[b]]


@pytest.mark.parametrize(
    "backend, combo", EXCLUDED, ids=[f"{b}-{c[0]}-{c[1]}" for b, c in EXCLUDED]
)
def test_excluded_dtypes_are_rejected(backend: str, combo: tuple[np.dtype, np.dtype]):
    require(backend)
    p_dtype, g_dtype = combo
    with jax.enable_x64(True):
        params = {"w": jnp.ones((3, 2), p_dtype)}
        grads = {"w": jnp.ones((3, 2), g_dtype)}
        opt = lars.lars(0.1, backend=backend)
        with pytest.raises(TypeError, match=str(p_dtype)):
            opt.update(grads, opt.init(params), params)
