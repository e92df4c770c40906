"""Complex params with ``lars.lars`` as optax users run them with ``optax.lars`` (0.2.8).

complex64 and complex128 params (real or complex gradients), with and
without weight decay and Nesterov, against ``optax.lars`` step by step;
clipping of complex gradients; a skipped complex step that keeps every bit;
complex gradients on real params refused by path; and the kernel backends
refusing complex leaves by name while the reference runs them. The shared
helpers are those of ``test_optax_dropin.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from backends import require
from test_optax_dropin import (
    DECAY,
    MASK,
    SCHEDULE,
    assert_same,
    bits,
    grads_like,
    moved,
    ours,
    real_tree,
    trajectory,
)

import lars
from lars import _dispatch
from lars.contract import LarsConfig, StepSpec


def complex_tree(seed: int = 0, dtype=jnp.complex64) -> dict:
    rng = np.random.default_rng(seed)
    c = lambda *s: jnp.asarray(rng.normal(size=s) + 1j * rng.normal(size=s), dtype)
    return {
        "conv": c(3, 3, 2, 4),
        "bias": c(4),
        "zero": jnp.zeros((2, 3), dtype),
        "real": c(5, 2).real,
    }


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2, DECAY], ids=["no_decay", "decay", "schedule"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_complex64_params_match_optax_lars(jit: bool, weight_decay, nesterov: bool):
    params = complex_tree()
    theirs = optax.lars(
        SCHEDULE,
        weight_decay=weight_decay,
        weight_decay_mask=MASK,
        trust_ratio_mask=MASK,
        nesterov=nesterov,
    )
    mine = ours(
        weight_decay=weight_decay, weight_decay_mask=MASK, trust_ratio_mask=MASK, nesterov=nesterov
    )
    want, wstate = trajectory(theirs, params, 10, jit=jit)
    got, state = trajectory(mine, params, 10, jit=jit)
    assert_same(got, want, bitwise=not jit, start=params)
    assert moved(got, params)
    # The momentum is complex, as optax.trace's (which holds -v: lr is inside).
    trace = wstate[-1].trace
    for k in params:
        assert state.momentum[k].dtype == trace[k].dtype == params[k].dtype
    np.testing.assert_allclose(
        np.asarray(state.momentum["conv"]), -np.asarray(trace["conv"]), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_complex128_params_match_optax_lars(jit: bool):
    with jax.enable_x64(True):
        params = complex_tree(dtype=jnp.complex128)
        theirs = optax.lars(SCHEDULE, weight_decay=1e-2, nesterov=True)
        mine = ours(weight_decay=1e-2, nesterov=True)
        want, _ = trajectory(theirs, params, 8, jit=jit)
        got, state = trajectory(mine, params, 8, jit=jit)
        assert_same(got, want, bitwise=not jit, start=params)
        assert state.momentum["conv"].dtype == jnp.complex128


def test_real_gradients_on_complex_params_as_optax_takes_them():
    params = complex_tree()

    def real_grads(p, t):
        return jax.tree.map(lambda g: g.real if jnp.iscomplexobj(g) else g, grads_like(p, t))

    want, _ = trajectory(
        optax.lars(SCHEDULE, weight_decay=1e-2), params, 6, jit=False, grads=real_grads
    )
    got, _ = trajectory(ours(weight_decay=1e-2), params, 6, jit=False, grads=real_grads)
    assert_same(got, want, bitwise=True, start=params)


def test_the_braintools_form_on_complex_params():
    """The default form is braintools' optax chain; complex params go through it too."""
    params = complex_tree()
    lr = 0.5
    chain = optax.chain(
        optax.add_decayed_weights(1e-2),
        optax.scale_by_trust_ratio(trust_coefficient=1e-3, eps=1e-8),
        optax.trace(decay=0.9),
        optax.scale_by_schedule(lambda count: -lr),
    )
    want, _ = trajectory(chain, params, 6, jit=False)
    got, _ = trajectory(lars.lars(lr, weight_decay=1e-2, backend="reference"), params, 6, jit=False)
    assert_same(got, want, bitwise=True, start=params)


def test_global_norm_clipping_of_complex_gradients():
    params = complex_tree()
    theirs = optax.chain(optax.clip_by_global_norm(0.3), optax.lars(SCHEDULE, weight_decay=1e-2))
    want, _ = trajectory(theirs, params, 6, jit=False)
    got, _ = trajectory(ours(weight_decay=1e-2, grad_clip_norm=0.3), params, 6, jit=False)
    assert_same(got, want, bitwise=True, start=params)


def test_value_clipping_refuses_complex_leaves_as_optax_clip_does():
    params, grads = complex_tree(), grads_like(complex_tree(), 0)
    with pytest.raises(ValueError, match="complex"):
        optax.clip(0.1).update(grads, optax.EmptyState())
    opt = lars.lars(0.1, grad_clip_value=0.1)
    with pytest.raises(ValueError, match=r"grad_clip_value.*complex params leaf at \['bias'\]"):
        opt.update(grads, opt.init(params), params)


def test_complex_gradients_on_real_params_are_refused_by_path():
    params = real_tree()
    grads = {**grads_like(params, 0), "b": jnp.ones(4, jnp.complex64)}
    opt = lars.lars(0.1)
    with pytest.raises(TypeError, match=r"\['b'\] has dtype complex64.*complex gradients on real"):
        opt.update(grads, opt.init(params), params)
    cparams = complex_tree()
    cgrads = {**grads_like(cparams, 0), "conv": jnp.ones((3, 3, 2, 4), jnp.int32)}
    with pytest.raises(TypeError, match=r"\['conv'\]"):
        opt.update(cgrads, opt.init(cparams), cparams)


def test_a_skipped_complex_step_leaves_every_bit_in_place():
    params = complex_tree()
    params["bias"] = params["bias"].at[0].set(complex(-0.0, -0.0)).at[1].set(complex(1.0, -0.0))
    grads = grads_like(params, 0)
    grads["conv"] = grads["conv"].at[0, 0, 0, 0].set(complex(np.nan, 0.0))
    opt = lars.lars(0.1, weight_decay=1e-2, skip_nonfinite=True, backend="reference")
    state = opt.init(params)
    updates, new_state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    new2, _ = opt.apply_gradients(params, state, grads)
    for p, a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(new2), strict=True
    ):
        assert np.array_equal(bits(p), bits(a))
        assert np.array_equal(bits(p), bits(b))
    assert int(new_state.skipped) == 1 and int(new_state.count) == 0


def test_complex_leaves_run_on_the_reference_and_named_kernels_refuse_them():
    require("native")
    require("pallas")
    params, grads = complex_tree(), grads_like(complex_tree(), 0)
    paths = ["['bias']", "['conv']", "['real']", "['zero']"]
    spec = StepSpec.build(
        LarsConfig(),
        jax.tree.leaves(params),
        jax.tree.leaves(grads),
        decay_mask=[True] * 4,
        trust_mask=[True] * 4,
    )
    for name in ("native", "pallas", "triton"):
        reason = _dispatch.unsupported_reason(_dispatch.get(name), spec, paths)
        assert "complex64 params" in reason and "['bias']" in reason, (name, reason)
    assert _dispatch.unsupported_reason(_dispatch.get("reference"), spec, paths) is None
    for name in ("native", "pallas"):
        opt = lars.lars(0.1, backend=name)
        state = opt.init(params)
        with pytest.raises(TypeError, match=rf"backend '{name}'.*complex64.*\['bias'\]"):
            opt.update(grads, state, params)
        with pytest.raises(TypeError, match=r"\['bias'\]"):
            opt.apply_gradients(params, state, grads)
    # "auto" runs the reference: the same bits.
    got, _ = trajectory(lars.lars(SCHEDULE, weight_decay=1e-2), params, 3, jit=False)
    want, _ = trajectory(
        lars.lars(SCHEDULE, weight_decay=1e-2, backend="reference"), params, 3, jit=False
    )
    assert_same(got, want, bitwise=True, start=params)


def test_whole_layer_ratios_of_complex_leaves_are_the_references():
    """lars._sharded's ratios from sums (the sharded path) for complex leaves."""
    from lars import _sharded
    from lars._reference import reference_step

    params = jax.tree.leaves(complex_tree())
    grads = jax.tree.leaves(grads_like(complex_tree(), 0))
    config = LarsConfig(weight_decay=1e-2, grad_clip_norm=0.5)
    masks = dict(decay_mask=[True, True, False, True], trust_mask=[True, False, True, True])
    spec = StepSpec.build(config, params, grads, **masks)
    ratios, norm = _sharded._ratios(params, grads, [()] * 4, spec)
    momentum = [jnp.zeros_like(p) for p in params]
    want = reference_step(params, grads, momentum, jnp.float32(0.1), config=config, **masks)
    assert ratios.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ratios), np.stack(want.trust_ratio), rtol=2e-6)
    g64 = np.concatenate([np.asarray(g, np.complex128).ravel() for g in grads])
    np.testing.assert_allclose(float(norm), np.linalg.norm(g64), rtol=1e-6)
