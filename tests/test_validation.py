"""Bad input raises a clear ValueError/TypeError and changes nothing."""

from __future__ import annotations

import copy
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lars


def params_tree() -> dict:
    return {
        "layer": {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)},
        "scale": jnp.full((2,), 0.5, jnp.float32),
    }


def grads_tree() -> dict:
    return jax.tree.map(lambda x: jnp.full_like(x, 0.1), params_tree())


# -- hyperparameters -------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": math.nan}, ValueError, "momentum"),
    ({"momentum": "0.9"}, TypeError, "momentum"),
    ({"momentum": True}, TypeError, "momentum"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"weight_decay": math.inf}, ValueError, "weight_decay"),
    ({"trust_coefficient": 0.0}, ValueError, "trust_coefficient"),
    ({"trust_coefficient": -0.001}, ValueError, "trust_coefficient"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"eps": math.nan}, ValueError, "eps"),
    ({"grad_clip_norm": 0.0}, ValueError, "grad_clip_norm"),
    ({"grad_clip_norm": -1.0}, ValueError, "grad_clip_norm"),
    ({"grad_clip_value": 0.0}, ValueError, "grad_clip_value"),
    ({"grad_clip_value": -0.5}, ValueError, "grad_clip_value"),
    ({"trust_clip": 0.0}, ValueError, "trust_clip"),
    ({"trust_clip": -1.0}, ValueError, "trust_clip"),
    ({"trust_clip": math.inf}, ValueError, "trust_clip"),
    ({"nesterov": "yes"}, TypeError, "nesterov"),
    ({"nesterov": 1}, TypeError, "nesterov"),
    ({"nesterov": None}, TypeError, "nesterov"),
    ({"lr_inside_momentum": 1}, TypeError, "lr_inside_momentum"),
    ({"backend": "no-such-backend"}, ValueError, "no-such-backend.*reference"),
    ({"backend": 3}, TypeError, "backend"),
]


@pytest.mark.parametrize(
    "kwargs, error, match", BAD_HYPERPARAMETERS, ids=[str(k) for k, _, _ in BAD_HYPERPARAMETERS]
)
def test_bad_hyperparameters_raise(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        lars.lars(0.1, **kwargs)
    with pytest.raises(error, match=match):
        lars.Lars(0.1, **kwargs)


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf, -math.inf])
def test_bad_learning_rate_raises(lr: float):
    with pytest.raises(ValueError, match="learning_rate"):
        lars.lars(lr)
    with pytest.raises(ValueError, match="lr"):
        lars.Lars(lr)


@pytest.mark.parametrize("lr", ["0.1", None, [0.1], jnp.ones(2)])
def test_learning_rate_of_wrong_type_raises(lr):
    with pytest.raises(TypeError, match="learning_rate"):
        lars.lars(lr)


def test_zero_learning_rate_is_allowed():
    opt = lars.lars(0.0)
    p = params_tree()
    updates, _ = opt.update(grads_tree(), opt.init(p), p)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


def test_scheduler_object_given_to_lars_lars_raises():
    sched = lars.schedules.StepLR(base_lr=0.1, step_size=2)
    with pytest.raises(TypeError, match=r"scheduler object.*lars\.Lars"):
        lars.lars(sched)


# -- the optimizer object: errors leave everything as it was ----------------------


def snapshot(opt: lars.Lars) -> dict:
    """Everything an update may change, as NumPy copies."""
    state = opt.opt_state.value
    return {
        "params": jax.tree.map(np.array, opt.params),
        "count": int(state.count),
        "momentum": jax.tree.map(np.array, state.momentum),
        "trust_ratio": jax.tree.map(np.array, state.trust_ratio),
        "step_count": int(opt.step_count.value),
        "lr": float(np.asarray(opt.current_lr)),
        "scheduler": copy.deepcopy(opt.lr_scheduler.state_dict()),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def trained() -> lars.Lars:
    """An optimizer two steps into training (non-zero momentum and ratios)."""
    opt = lars.Lars(lr=lars.schedules.StepLR(0.1, step_size=1, gamma=0.5), weight_decay=1e-3)
    opt.register_trainable_weights(params_tree())
    for _ in range(2):
        opt.update(grads_tree())
        opt.lr_scheduler.step()
    return opt


def _with(tree: dict, path: tuple, value) -> dict:
    tree = jax.tree.map(lambda x: x, tree)  # a copy of the containers
    node = tree
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


_DELETE = object()

BAD_GRADS = [
    ("missing_leaf", ("layer", "b"), _DELETE, ValueError, r"missing leaves at \['layer'\]\['b'\]"),
    (
        "extra_leaf",
        ("layer", "extra"),
        jnp.ones(2),
        ValueError,
        r"unexpected leaves at \['layer'\]\['extra'\]",
    ),
    (
        "wrong_shape",
        ("layer", "w"),
        jnp.ones((3, 2)),
        ValueError,
        r"\['layer'\]\['w'\] has shape \(3, 2\).*\(2, 3\)",
    ),
    ("int_grad", ("layer", "w"), jnp.ones((2, 3), jnp.int32), TypeError, r"\['layer'\]\['w'\]"),
    ("bool_grad", ("scale",), jnp.ones(2, bool), TypeError, r"\['scale'\]"),
    ("none_grad", ("scale",), None, (TypeError, ValueError), r"\['scale'\]"),
    ("list_grad", ("scale",), [0.1, 0.1], (TypeError, ValueError), r"\['scale'\]"),
]


@pytest.mark.parametrize(
    "path, value, error, match", [b[1:] for b in BAD_GRADS], ids=[b[0] for b in BAD_GRADS]
)
def test_bad_grads_raise_and_change_nothing(trained, path, value, error, match):
    before = snapshot(trained)
    with pytest.raises(error, match=match):
        trained.update(_with(grads_tree(), path, value))
    assert_unchanged(before, snapshot(trained))
    # And the optimizer still works afterwards.
    trained.update(grads_tree())
    assert int(trained.step_count.value) == 3


@pytest.mark.parametrize("path", [("layer", "w"), ("layer", "b"), ("scale",)])
def test_bad_grads_raise_in_lars_lars(path):
    opt = lars.lars(0.1)
    p = params_tree()
    state = opt.init(p)
    key = "".join(f"['{k}']" for k in path)
    with pytest.raises(ValueError, match=re.escape(key)):
        opt.update(_with(grads_tree(), path, jnp.ones(7)), state, p)
    with pytest.raises(TypeError, match=re.escape(key)):
        opt.update(
            _with(grads_tree(), path, jnp.ones(np.shape(_get(p, path)), jnp.int32)), state, p
        )


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_grad_dtype_rules():
    """bf16/f16 grads on f32 params are fine; wider grads on bf16 params are not."""
    p32 = params_tree()
    opt = lars.lars(0.1)
    for dt in (jnp.bfloat16, jnp.float16):
        grads = jax.tree.map(lambda x, dt=dt: x.astype(dt), grads_tree())
        updates, _ = opt.update(grads, opt.init(p32), p32)
        assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    with pytest.raises(TypeError, match=r"\['layer'\]\['b'\] has dtype float32.*bfloat16"):
        opt.update(grads_tree(), opt.init(p16), p16)
    with pytest.raises(TypeError, match="float16"):
        opt.update(jax.tree.map(lambda x: x.astype(jnp.float16), grads_tree()), opt.init(p16), p16)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, bool])
def test_integer_params_raise(dtype):
    p = _with(params_tree(), ("layer", "b"), jnp.ones(3, dtype))
    with pytest.raises(TypeError, match=r"\['layer'\]\['b'\].*floating"):
        lars.lars(0.1).init(p)
    opt = lars.Lars(0.1)
    with pytest.raises(TypeError, match=r"\['layer'\]\['b'\]"):
        opt.register_trainable_weights(p)
    assert opt.opt_state is None
    with pytest.raises(ValueError, match="register_trainable_weights"):
        opt.update(grads_tree())


BAD_MASKS = [
    ("missing_entry", {"layer": True}, ValueError, r"no mask entry for params at \['scale'\]"),
    (
        "missing_leaf",
        {"layer": {"w": True}, "scale": True},
        ValueError,
        r"no mask entry for params at \['layer'\]\['b'\]",
    ),
    (
        "extra_entry",
        {"layer": True, "scale": True, "other": False},
        ValueError,
        r"\['other'\] match no params",
    ),
    ("list_for_dict", [True, False], ValueError, "weight_decay_mask|trust_ratio_mask"),
    ("int_leaf", {"layer": 1, "scale": True}, TypeError, r"\['layer'\].*bool"),
    ("float_leaf", {"layer": True, "scale": 1.0}, TypeError, r"\['scale'\].*bool"),
    ("array_leaf", {"layer": True, "scale": jnp.ones(2, bool)}, TypeError, r"\['scale'\]"),
    ("callable_bad", lambda p: {"layer": True}, ValueError, r"\['scale'\]"),
    ("callable_int", lambda p: 0, TypeError, "bool"),
]


@pytest.mark.parametrize("which", ["weight_decay_mask", "trust_ratio_mask"])
@pytest.mark.parametrize(
    "mask, error, match", [m[1:] for m in BAD_MASKS], ids=[m[0] for m in BAD_MASKS]
)
def test_bad_masks_raise(which, mask, error, match):
    p = params_tree()
    opt = lars.lars(0.1, weight_decay=1e-3, **{which: mask})
    with pytest.raises(error, match=match):
        opt.update(grads_tree(), opt.init(p), p)
    with pytest.raises(error, match=which):
        opt.update(grads_tree(), opt.init(p), p)


def test_bad_mask_leaves_lars_object_untouched():
    opt = lars.Lars(0.1, weight_decay=1e-3, trust_ratio_mask={"layer": True})
    opt.register_trainable_weights(params_tree())
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\['scale'\]"):
        opt.update(grads_tree())
    assert_unchanged(before, snapshot(opt))


def test_update_before_register_raises():
    opt = lars.Lars(0.1)
    with pytest.raises(ValueError, match="register_trainable_weights"):
        opt.update(grads_tree())
    assert int(opt.step_count.value) == 0
    with pytest.raises(ValueError, match="register_trainable_weights"):
        _ = opt.params
    with pytest.raises(ValueError, match="register_trainable_weights"):
        _ = opt.trust_ratios


def test_lars_lars_needs_params_and_its_state():
    opt = lars.lars(0.1)
    p = params_tree()
    with pytest.raises(ValueError, match="params"):
        opt.update(grads_tree(), opt.init(p))
    with pytest.raises(TypeError, match="LarsState"):
        opt.update(grads_tree(), {"count": 0}, p)
    state = opt.init(p)
    bad = state._replace(momentum=_with(state.momentum, ("scale",), jnp.zeros(5)))
    with pytest.raises(ValueError, match=r"state\.momentum.*\['scale'\]"):
        opt.update(grads_tree(), bad, p)


def test_trust_ratio_state_must_be_one_float32_vector():
    """The ratios are a vector of one float32 per leaf; other forms raise, naming it."""
    opt = lars.lars(0.1)
    p = params_tree()
    state = opt.init(p)
    n = len(jax.tree.leaves(p))
    assert state.trust_ratio.shape == (n,) and state.trust_ratio.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(state.trust_ratio), np.ones(n, np.float32))
    # A tree of per-leaf scalars (the earlier layout) says how to convert it.
    old = jax.tree.map(lambda x: jnp.ones((), jnp.float32), p)
    with pytest.raises(TypeError, match=rf"state\.trust_ratio.*shape \({n},\).*jnp\.stack"):
        opt.update(grads_tree(), state._replace(trust_ratio=old), p)
    converted = state._replace(trust_ratio=jnp.stack(jax.tree.leaves(old)).astype(jnp.float32))
    _, after = opt.update(grads_tree(), converted, p)  # the conversion the message gives
    assert after.trust_ratio.shape == (n,)
    with pytest.raises(ValueError, match=rf"state\.trust_ratio must have shape \({n},\)"):
        opt.update(grads_tree(), state._replace(trust_ratio=jnp.ones(n + 1)), p)
    with pytest.raises(TypeError, match=r"state\.trust_ratio must be float32, got float16"):
        opt.update(grads_tree(), state._replace(trust_ratio=jnp.ones(n, jnp.float16)), p)
    with pytest.raises(TypeError, match=r"state\.trust_ratio.*list"):
        state._replace(trust_ratio=[1.0] * n).trust_ratio_tree()
    # trust_ratio_tree() is the vector in the params' structure, leaf for leaf.
    vector = jnp.arange(1, n + 1, dtype=jnp.float32)
    tree = state._replace(trust_ratio=vector).trust_ratio_tree()
    assert jax.tree.structure(tree) == jax.tree.structure(p)
    assert [float(x) for x in jax.tree.leaves(tree)] == list(range(1, n + 1))
    empty = opt.init({})
    assert empty.trust_ratio.shape == (0,) and empty.trust_ratio_tree() == {}


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "fast"])
def test_bad_current_lr_raises_and_changes_nothing(trained, value):
    before = snapshot(trained)
    with pytest.raises((ValueError, TypeError), match="current_lr"):
        trained.current_lr = value
    assert_unchanged(before, snapshot(trained))


def test_current_lr_cannot_be_set_for_a_schedule_function():
    opt = lars.Lars(lambda count: 0.1 * 0.9**count)
    with pytest.raises(TypeError, match="schedule function"):
        opt.current_lr = 0.2


class _BrokenScheduler:
    """A duck-typed scheduler whose rate went bad (NaN)."""

    def __init__(self):
        self.base_lrs = [0.1]
        self.current_lrs = lars._holder.Holder([0.1])

    def get_last_lr(self):
        return list(self.current_lrs.value)

    def step(self):
        self.current_lrs.value = [math.nan]

    def state_dict(self):
        return {"current_lrs": list(self.current_lrs.value)}


def test_non_finite_scheduled_lr_raises_at_update_and_changes_nothing():
    sched = _BrokenScheduler()
    opt = lars.Lars(sched)
    opt.register_trainable_weights(params_tree())
    opt.update(grads_tree())
    sched.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.update(grads_tree())
    assert_unchanged(before, snapshot(opt))  # (NaN compares equal to NaN here)


def _with_momentum(saved: dict, path: tuple, value) -> dict:
    """``saved`` with a momentum leaf replaced (braintools' chain: trace is entry -2)."""
    chain = list(saved["opt_state"])
    chain[-2] = chain[-2]._replace(trace=_with(chain[-2].trace, path, value))
    return {**saved, "opt_state": tuple(chain)}


BAD_STATE_DICTS = [
    (
        lambda sd: _with_momentum(sd, ("scale",), np.zeros(5, np.float32)),
        ValueError,
        r"\['scale'\] has shape \(5,\)",
    ),
    (
        lambda sd: _with_momentum(sd, ("scale",), np.zeros((1, 2), np.float32)),
        ValueError,
        r"\['scale'\] has shape \(1, 2\)",
    ),
    (
        lambda sd: _with_momentum(sd, ("scale",), np.zeros(2, np.int32)),
        TypeError,
        r"\['scale'\] must be a floating-point array",
    ),
    (lambda sd: _with_momentum(sd, ("layer", "w"), _DELETE), ValueError, r"missing 'w'"),
    (
        lambda sd: _with_momentum(sd, ("extra",), np.zeros(2, np.float32)),
        ValueError,
        "unexpected 'extra'",
    ),
    (lambda sd: {**sd, "opt_state": sd["opt_state"][1:]}, ValueError, "has 3 entries"),
    (lambda sd: {**sd, "step_count": "3"}, TypeError, r"\['step_count'\] must be an integer"),
    (lambda sd: {**sd, "base_lr": "0"}, TypeError, r"\['base_lr'\] must be a real number"),
    (lambda sd: {**sd, "lr": float("nan")}, ValueError, r"\['lr'\] must be finite"),
    (
        lambda sd: {**sd, "scheduler": {**sd["scheduler"], "base_lrs": {"0": "0"}}},
        TypeError,
        r"\['scheduler'\]\['base_lrs'\]\[0\]",
    ),
    (lambda sd: {**sd, "scheduler": None}, ValueError, "scheduler does not match"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lars"}, ValueError, r"lacks \['lars'\]"),
    (lambda sd: {"step_count": 3, "scheduler": None}, ValueError, "opt_state"),
    (lambda sd: [sd], TypeError, "state_dict must be a dict"),
]


@pytest.mark.parametrize("corrupt, error, match", BAD_STATE_DICTS)
def test_bad_state_dict_raises_and_changes_nothing(trained, corrupt, error, match):
    saved = trained.state_dict()
    before = snapshot(trained)
    with pytest.raises(error, match=match):
        trained.load_state_dict(corrupt(saved))
    assert_unchanged(before, snapshot(trained))
    assert trained.base_lr == 0.1 and trained.lr_scheduler.base_lrs == [0.1]
    trained.load_state_dict(saved)  # the uncorrupted one loads
    assert_unchanged(before, snapshot(trained))


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_kernel_backend_rejects_float64_by_path(backend: str):
    """A dtype pair a backend does not compute is refused by path before dispatch."""
    from lars import _dispatch, _transform

    # The backend need not run here: the check comes before any call to it.
    spec = _transform.LarsSpec(config=lars.LarsConfig(), backend=_dispatch.get(backend))
    with jax.enable_x64(True):
        params = {"a": jnp.ones(2, jnp.float32), "b": {"w": jnp.ones((3, 2), jnp.float64)}}
        state = _transform.init_state(params)
        with pytest.raises(
            TypeError, match=re.escape("float64 gradients (the leaf at ['b']['w'])")
        ):
            _transform.LarsUpdate(0.1, spec)(params, state, params)
