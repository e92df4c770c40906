"""lars with the rest of the ecosystem: optax combinators, flax.nnx, checkpoints, logging."""

from __future__ import annotations

import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest

import lars


def params_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
        "dense": {
            "w": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
            "b": jnp.zeros(3, jnp.float32),
        },
        "scale": jnp.ones(4, jnp.float32),
    }


def grads_list(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(
            lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params_tree()
        )
        for _ in range(n)
    ]


def run(opt: optax.GradientTransformation, params: dict, grads: list[dict]):
    @jax.jit
    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# -- optax combinators -------------------------------------------------------------


def test_chain_with_clip_equals_grad_clip_value():
    grads = [jax.tree.map(lambda g: 3 * g, g) for g in grads_list(6)]
    chained = optax.chain(optax.clip(1.0), lars.lars(0.5, weight_decay=1e-3))
    built_in = lars.lars(0.5, weight_decay=1e-3, grad_clip_value=1.0)
    a, _ = run(chained, params_tree(), grads)
    b, _ = run(built_in, params_tree(), grads)
    assert_trees_close(a, b)
    c, _ = run(lars.lars(0.5, weight_decay=1e-3), params_tree(), grads)
    assert not np.allclose(np.asarray(a["dense"]["b"]), np.asarray(c["dense"]["b"]))


def test_chain_with_global_norm_clip_equals_grad_clip_norm():
    chained = optax.chain(optax.clip_by_global_norm(0.5), lars.lars(0.5, weight_decay=1e-2))
    built_in = lars.lars(0.5, weight_decay=1e-2, grad_clip_norm=0.5)
    a, _ = run(chained, params_tree(), grads_list(6))
    b, _ = run(built_in, params_tree(), grads_list(6))
    assert_trees_close(a, b)


def test_chain_after_lars_scales_updates():
    """Transforms after lars act on its updates (here: halve them)."""
    p = params_tree()
    g = grads_list(1)[0]
    opt = lars.lars(0.5)
    u, _ = opt.update(g, opt.init(p), p)
    chained = optax.chain(lars.lars(0.5), optax.scale(0.5))
    u2, _ = chained.update(g, chained.init(p), p)
    assert_trees_close(u2, jax.tree.map(lambda x: 0.5 * x, u))


def test_multi_transform_and_multisteps():
    p = params_tree()
    labels = {"conv": "lars", "dense": {"w": "lars", "b": "sgd"}, "scale": "sgd"}
    tx = optax.multi_transform({"lars": lars.lars(0.5), "sgd": optax.sgd(0.1)}, labels)
    got, _ = run(tx, p, grads_list(3))
    only_lars = {"conv": p["conv"], "w": p["dense"]["w"]}
    want, _ = run(
        lars.lars(0.5),
        only_lars,
        [{"conv": g["conv"], "w": g["dense"]["w"]} for g in grads_list(3)],
    )
    assert_trees_close(got["conv"], want["conv"])
    assert_trees_close(got["dense"]["w"], want["w"])

    # Gradient accumulation: two micro-batches of g give one step with g.
    acc = optax.MultiSteps(lars.lars(0.5), every_k_schedule=2)
    grads = grads_list(2)
    a, _ = run(acc, p, [grads[0], grads[0], grads[1], grads[1]])
    b, _ = run(lars.lars(0.5), p, grads)
    assert_trees_close(a, b)


def test_lars_needs_params_in_a_chain():
    chained = optax.chain(optax.clip(1.0), lars.lars(0.1))
    p = params_tree()
    with pytest.raises(ValueError, match="params"):
        chained.update(grads_list(1)[0], chained.init(p))


# -- flax.nnx ------------------------------------------------------------------------


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)
    y = jnp.stack([jnp.sin(x.sum(1)), jnp.cos(x.sum(1))], 1)
    tx = lars.lars(0.1, weight_decay=1e-4, trust_coefficient=0.02, nesterov=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # Plain nested dicts of arrays (an nnx.State holds the model's live variables).
    ref_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref_state = tx.init(ref_params)

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    @jax.jit
    def ref_step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    losses = []
    for _ in range(8):
        loss, grads = train_step(model, optimizer)
        # The same step by hand with lars.lars on the nnx.State pytree.
        ref_params, ref_state = ref_step(nnx.to_pure_dict(grads), ref_state, ref_params)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    want = jax.tree.leaves(ref_params)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# -- checkpoints ----------------------------------------------------------------------


def _make_optimizer():
    sched = lars.schedules.MultiStepLR(base_lr=0.5, milestones=[3, 6], gamma=0.3)
    opt = lars.Lars(sched, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True)
    return opt, sched


def _train(opt, sched, grads):
    for g in grads:
        opt.update(g)
        sched.step()


def _flatten(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _unflatten(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


@pytest.mark.parametrize("via", ["memory", "pickle", "npz"])
def test_state_dict_round_trip_resumes_identically(via: str):
    grads = grads_list(10)
    whole, whole_sched = _make_optimizer()
    whole.register_trainable_weights(params_tree())
    _train(whole, whole_sched, grads)

    first, first_sched = _make_optimizer()
    first.register_trainable_weights(params_tree())
    _train(first, first_sched, grads[:4])
    saved, saved_params = first.state_dict(), first.params
    if via == "pickle":
        saved, saved_params = pickle.loads(pickle.dumps((saved, saved_params)))
    elif via == "npz":
        buf = io.BytesIO()
        np.savez(buf, **{"s" + k: v for k, v in _flatten((saved, saved_params)).items()})
        buf.seek(0)
        with np.load(buf) as npz:
            loaded = {k[1:]: npz[k] for k in npz.files}
        saved, saved_params = _unflatten((saved, saved_params), loaded)
        assert isinstance(saved["step_count"], np.ndarray)  # came back as 0-d arrays

    resumed, resumed_sched = _make_optimizer()
    resumed.register_trainable_weights(jax.tree.map(jnp.asarray, saved_params))
    resumed.load_state_dict(saved)
    assert int(resumed_sched.last_epoch.value) == 4
    assert int(resumed.step_count.value) == 4
    assert float(resumed.current_lr) == pytest.approx(0.5 * 0.3)
    _train(resumed, resumed_sched, grads[4:])

    assert_trees_equal(resumed.params, whole.params)
    assert_trees_equal(resumed.opt_state.value, whole.opt_state.value)
    assert int(resumed.step_count.value) == int(whole.step_count.value) == 10
    assert resumed_sched.state_dict() == whole_sched.state_dict()


def test_state_dict_contents():
    opt, sched = _make_optimizer()
    opt.register_trainable_weights(params_tree())
    _train(opt, sched, grads_list(2))
    sd = opt.state_dict()
    assert sd["step_count"] == 2 and sd["lr"] == pytest.approx(0.5)
    assert sd["base_lr"] == 0.5
    assert sd["scheduler"]["last_epoch"] == 2
    # braintools' layout: its optax chain's states, the momentum in the trace.
    assert set(sd) >= {"param_groups", "param_groups_opt_states", "scheduler", "lars"}
    momentum = sd["opt_state"][-2].trace
    assert jax.tree.structure(momentum) == jax.tree.structure(params_tree())
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(sd["opt_state"]))
    assert int(sd["opt_state"][-1].count) == 2
    assert sd["lars"]["skipped"]["0"] == 0


# -- trust ratios for logging ----------------------------------------------------------


def test_trust_ratios_are_recorded_per_leaf():
    p = params_tree()
    grads = grads_list(3)
    opt = lars.Lars(0.5, weight_decay=1e-2, trust_coefficient=0.02)
    opt.register_trainable_weights(p)
    assert all(float(r) == 1.0 for r in jax.tree.leaves(opt.trust_ratios))
    cfg = oracle.OracleConfig(learning_rate=0.5, weight_decay=1e-2, trust_coefficient=0.02)
    state = oracle.init([np.asarray(x) for x in jax.tree.leaves(p)])
    for g in grads:
        opt.update(g)
        state = oracle.step(state, [np.asarray(x) for x in jax.tree.leaves(g)], cfg)
        ratios = opt.trust_ratios
        assert jax.tree.structure(ratios) == jax.tree.structure(p)
        assert all(r.shape == () and r.dtype == jnp.float32 for r in jax.tree.leaves(ratios))
        np.testing.assert_allclose(
            [float(r) for r in jax.tree.leaves(ratios)], state.trust_ratio, rtol=1e-5
        )
    # The transform records the same ratios in its state: one float32 vector in
    # the order of the params' leaves, and as a tree through trust_ratio_tree().
    _, t_state = run(lars.lars(0.5, weight_decay=1e-2, trust_coefficient=0.02), p, grads)
    n = len(jax.tree.leaves(p))
    assert t_state.trust_ratio.shape == (n,) and t_state.trust_ratio.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(t_state.trust_ratio), state.trust_ratio, rtol=1e-5)
    assert_trees_close(t_state.trust_ratio_tree(), opt.trust_ratios)


def test_masked_leaves_record_ratio_one():
    p = params_tree()
    _, state = run(lars.lars(0.5, trust_ratio_mask=lars.exclude_bias_and_norm), p, grads_list(2))
    ratios = state.trust_ratio_tree()
    assert float(ratios["dense"]["b"]) == 1.0
    assert float(ratios["scale"]) == 1.0
    assert float(ratios["dense"]["w"]) != 1.0


# -- registering weights ------------------------------------------------------------------


def test_plain_arrays_and_state_objects_mixed():
    brainstate = pytest.importorskip("brainstate")
    p = params_tree()
    w_state = brainstate.ParamState(p["dense"]["w"])
    opt = lars.Lars(0.5, trust_coefficient=0.02)
    opt.register_trainable_weights({"conv": p["conv"], "w": w_state})
    g = grads_list(1)[0]
    opt.update({"conv": g["conv"], "w": g["dense"]["w"]})
    ref = lars.lars(0.5, trust_coefficient=0.02)
    sub = {"conv": p["conv"], "w": p["dense"]["w"]}
    u, _ = ref.update({"conv": g["conv"], "w": g["dense"]["w"]}, ref.init(sub), sub)
    want = optax.apply_updates(sub, u)
    np.testing.assert_allclose(np.asarray(w_state.value), np.asarray(want["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(opt.params["conv"]), np.asarray(want["conv"]), rtol=1e-6)
    assert opt.params["w"] is w_state.value


def test_numpy_float64_grads_are_accepted_with_x64_off():
    """With x64 off, JAX turns float64 NumPy arrays into float32 ones."""
    p = params_tree()
    g = grads_list(1)[0]
    opt = lars.lars(0.5)
    a, _ = opt.update(jax.tree.map(lambda x: np.asarray(x, np.float64), g), opt.init(p), p)
    b, _ = opt.update(g, opt.init(p), p)
    assert_trees_equal(a, b)
