"""Checkpoints between ``braintools.optim.Lars`` (0.4.0) and ``lars.Lars``.

What braintools users do with checkpoints, done with both optimizers: a
braintools checkpoint resumes in lars and a lars one loads into braintools
(through memory, msgpack, orbax and ``numpy.savez``), the state dict has
braintools' layout, and lars's own checkpoints (two groups, a scheduler, a
skipped step) resume bit for bit through every format, including those
written by lars 0.1.0.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_braintools_dropin import KW, assert_bitwise
from test_braintools_parity import (
    assert_close,
    gradients,
    initial_values,
    make_states,
    optimizer_pair,
    read,
)

import lars

brainstate = pytest.importorskip("brainstate")
braintools = pytest.importorskip("braintools")

K, M = 4, 5  # steps before and after a checkpoint


def msgpack_round_trip(tree, path):
    braintools.file.msgpack_save(path, tree)
    return braintools.file.msgpack_load(path)


def save_orbax(path, tree) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)


def load_orbax(path, template=None):
    """Without a template: tuples come back as lists, EmptyState() as None."""
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as ckpt:
        if template is None:
            return ckpt.restore(path)
        return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))


def save_npz(path, tree) -> None:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})


def load_npz(path, template):
    """Every number comes back as a 0-d array."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    with np.load(path) as data:
        return jax.tree.unflatten(treedef, [data[jax.tree_util.keystr(p)] for p, _ in paths])


def transport(tree, via: str, tmp_path, template=None):
    """``tree`` saved and read back as a user does with each format."""
    if via == "memory":
        return tree
    if via == "pickle":
        return pickle.loads(pickle.dumps(tree))
    if via == "msgpack":
        return msgpack_round_trip(tree, tmp_path / "ckpt.msgpack")
    if via == "orbax":
        save_orbax(tmp_path / "orbax", tree)
        return load_orbax(tmp_path / "orbax")
    if via == "orbax_target":
        save_orbax(tmp_path / "orbax_t", tree)
        return load_orbax(tmp_path / "orbax_t", template)
    assert via == "npz"
    save_npz(tmp_path / "ckpt.npz", tree)
    return load_npz(tmp_path / "ckpt.npz", template)


# -- checkpoints written by braintools --------------------------------------------


def _braintools(states, steps, grads):
    sched = braintools.optim.StepLR(0.5, step_size=3, gamma=0.5)
    opt = braintools.optim.Lars(sched, **KW)
    opt.register_trainable_weights(states)
    for t in steps:
        opt.update(grads[t])
        sched.step()
    return opt, sched


@pytest.mark.parametrize("via", ["memory", "msgpack", "orbax", "npz"])
def test_braintools_checkpoint_resumes_in_lars(tmp_path, via: str):
    """A braintools run checkpointed after K steps continues in lars.Lars as in braintools."""
    values = initial_values()
    grads = gradients(values)
    straight_states = make_states(values)
    _braintools(straight_states, range(K + M), grads)

    first_states = make_states(values)
    opt, sched = _braintools(first_states, range(K), grads)
    original = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    original["params"] = read(first_states)
    saved = transport(original, via, tmp_path, template=original)

    # braintools' own resume from the dict in memory, for reference (braintools
    # itself cannot read msgpack's lists or orbax's None back).
    theirs_states = make_states(original["params"])
    theirs, theirs_sched = _braintools(theirs_states, [], grads)
    theirs.load_state_dict(original["optimizer"])
    theirs_sched.load_state_dict(original["scheduler"])

    ours_states = make_states(jax.tree.map(jnp.asarray, saved["params"]))
    ours_sched = lars.schedules.StepLR(0.5, step_size=3, gamma=0.5)
    ours = lars.Lars(ours_sched, **KW).register_trainable_weights(ours_states)
    ours_sched.load_state_dict(saved["scheduler"])
    ours.load_state_dict(saved["optimizer"])
    assert int(ours.step_count.value) == K
    assert float(ours.current_lr) == float(theirs.current_lr) == 0.5 * 0.5
    assert ours.base_lr == theirs.base_lr == 0.5
    momentum = opt.opt_state.value[-2].trace
    ours_momentum = jax.tree.leaves(ours.opt_state.value.momentum)
    for a, b in zip(ours_momentum, jax.tree.leaves(momentum), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(ours.opt_state.value.count) == K
    for t in range(K, K + M):
        ours.update(grads[t])
        theirs.update(grads[t])
        ours_sched.step()
        theirs_sched.step()
    assert_close(read(ours_states), read(theirs_states), values, "resumed like braintools")
    assert_close(read(ours_states), read(straight_states), values, "as the run never stopped")


@pytest.mark.parametrize("via", ["memory", "msgpack"])
def test_lars_checkpoint_loads_into_braintools(tmp_path, via: str):
    """The other way: braintools.optim.Lars.load_state_dict reads lars.Lars's state_dict."""
    values = initial_values()
    grads = gradients(values)
    ours_states = make_states(values)
    ours = lars.Lars(0.3, **KW).register_trainable_weights(ours_states)
    for t in range(K):
        ours.update(grads[t])
    saved = transport({"opt": ours.state_dict(), "params": read(ours_states)}, via, tmp_path)
    theirs_states = make_states(jax.tree.map(jnp.asarray, saved["params"]))
    theirs = braintools.optim.Lars(0.3, **KW)
    theirs.register_trainable_weights(theirs_states)
    theirs.load_state_dict(saved["opt"])
    assert int(theirs.step_count.value) == K
    for t in range(K, K + M):
        ours.update(grads[t])
        theirs.update(grads[t])
    assert_close(read(ours_states), read(theirs_states), values, "braintools resumed lars")


SETTINGS = [
    {},
    {"weight_decay": 1e-3},
    {"grad_clip_norm": 1.0},
    {"grad_clip_value": 0.05},
    {"grad_clip_norm": 1.0, "grad_clip_value": 0.05, "weight_decay": 1e-3},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(kw) or "defaults")
def test_state_dict_has_braintools_layout(kw: dict):
    _, grads, _, _, ours, theirs = optimizer_pair(0.4, **kw)
    for t in range(2):
        ours.update(grads[t])
        theirs.update(grads[t])
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) | {"scheduler", "lars"}
    assert jax.tree.structure(a["opt_state"]) == jax.tree.structure(b["opt_state"])
    for x, y in zip(jax.tree.leaves(a["opt_state"]), jax.tree.leaves(b["opt_state"]), strict=True):
        assert np.shape(x) == np.shape(y) and np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert a["param_groups_opt_states"] == b["param_groups_opt_states"] == {}
    assert set(a["param_groups"]) == set(b["param_groups"]) == {"0"}
    ga, gb = a["param_groups"]["0"], b["param_groups"]["0"]
    assert set(ga) == set(gb) == {"params", "lr", "weight_decay"}
    assert ga["lr"] == float(gb["lr"]) and ga["weight_decay"] == gb["weight_decay"]
    assert jax.tree.structure(ga["params"]) == jax.tree.structure(gb["params"])
    assert a["step_count"] == b["step_count"] == 2
    assert a["lr"] == float(b["lr"]) and a["base_lr"] == b["base_lr"]


# -- lars checkpoints through every format -----------------------------------------


def _two_groups(lr, values):
    """lars.Lars over two groups: the model and a head with its own rate and no decay."""
    opt = lars.Lars(lr, skip_nonfinite=True, **KW)
    values = dict(values)
    head = values.pop("head", jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32))
    states = make_states(values)
    head = {"head": brainstate.ParamState(head)}
    opt.register_trainable_weights(states)
    opt.add_param_group(head, lr=0.05, weight_decay=0.0, name="head")
    return opt, {**states, **head}


def _group_grads(values, seed: int = 3):
    grads = gradients(values, seed)
    rng = np.random.default_rng(seed)
    for t, g in enumerate(grads):
        g["head"] = jnp.asarray(rng.standard_normal(6), jnp.float32)
        if t == 1:  # one skipped step before the checkpoint
            g["head"] = g["head"].at[2].set(jnp.nan)
    return grads


def _train(opt, sched, grads, steps):
    for t in steps:
        opt.update(grads[t])
        sched.step()


VIAS = ["memory", "pickle", "msgpack", "orbax", "orbax_target", "npz"]


@pytest.mark.parametrize("via", VIAS)
def test_lars_checkpoint_resumes_bitwise(tmp_path, via: str):
    """Two groups, a scheduler and a skipped step: saved, read back, resumed bit for bit."""
    values = initial_values()
    grads = _group_grads(values)
    sched = lars.schedules.MultiStepLR(0.5, milestones=[2, 6], gamma=0.3)
    whole, whole_states = _two_groups(sched, values)
    _train(whole, sched, grads, range(K + M))

    sched = lars.schedules.MultiStepLR(0.5, milestones=[2, 6], gamma=0.3)
    first, first_states = _two_groups(sched, values)
    _train(first, sched, grads, range(K))
    assert int(first.opt_state.value.skipped) == 0
    assert int(first.param_groups_opt_states[0].value.skipped) == 1
    saved = {"optimizer": first.state_dict(), "params": read(first_states)}
    saved = transport(saved, via, tmp_path, template=saved)

    sched2 = lars.schedules.MultiStepLR(0.5, milestones=[2, 6], gamma=0.3)
    resumed, states = _two_groups(sched2, jax.tree.map(jnp.asarray, saved["params"]))
    resumed.load_state_dict(saved["optimizer"])
    assert sched2.last_epoch.value == K and int(resumed.step_count.value) == K
    _train(resumed, sched2, grads, range(K, K + M))
    assert_bitwise(read(states), read(whole_states))
    assert_bitwise(resumed.opt_state.value, whole.opt_state.value)
    assert_bitwise(resumed.param_groups_opt_states[0].value, whole.param_groups_opt_states[0].value)
    assert int(resumed.step_count.value) == K + M
    assert resumed.lr.state_dict() == whole.lr.state_dict()


def _state_dict_010(opt, ratios: str = "tree") -> dict:
    """The body of lars 0.1.0's ``Lars.state_dict`` (the layout it wrote: the
    state as a dict, its trust ratios a tree of per-leaf scalars); with
    ``ratios="vector"`` the state as the current LarsState holds it."""
    state = opt.opt_state.value
    if ratios == "tree":
        state = state._replace(trust_ratio=state.trust_ratio_tree())
    opt_state = jax.tree.map(np.asarray, state._asdict())
    return {
        "step_count": int(opt.step_count.value),
        "lr": float(np.asarray(opt.current_lr)),
        "base_lr": float(opt.base_lr),
        "opt_state": opt_state,
        "scheduler": {
            "last_epoch": opt.lr.last_epoch.value,
            "base_lrs": list(opt.lr.base_lrs),
            "current_lrs": [float(x) for x in opt.lr.current_lrs.value],
        },
    }


@pytest.mark.parametrize("ratios", ["tree", "vector"])
@pytest.mark.parametrize("via", ["memory", "msgpack", "npz"])
def test_lars_010_checkpoint_still_loads(tmp_path, via: str, ratios: str):
    values = initial_values()
    grads = gradients(values)
    kw = dict(skip_nonfinite=True, nesterov=True, **KW)
    sched = lars.schedules.ExponentialLR(0.5, gamma=0.9)
    whole = lars.Lars(sched, **kw).register_trainable_weights(values)
    _train(whole, sched, grads, range(K + M))
    sched = lars.schedules.ExponentialLR(0.5, gamma=0.9)
    first = lars.Lars(sched, **kw).register_trainable_weights(values)
    _train(first, sched, grads, range(K))
    saved = {"opt": _state_dict_010(first, ratios), "params": first.params}
    saved = transport(saved, via, tmp_path, template=saved)
    sched = lars.schedules.ExponentialLR(0.5, gamma=0.9)
    resumed = lars.Lars(sched, **kw)
    resumed.register_trainable_weights(jax.tree.map(jnp.asarray, saved["params"]))
    resumed.load_state_dict(saved["opt"])
    _train(resumed, sched, grads, range(K, K + M))
    assert_bitwise(resumed.params, whole.params)
    assert_bitwise(resumed.opt_state.value, whole.opt_state.value)
