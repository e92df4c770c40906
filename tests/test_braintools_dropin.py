"""What braintools users do with ``braintools.optim.Lars`` (0.4.0), done with ``lars.Lars``.

Each test does what a braintools user does (checkpoints through msgpack,
orbax and ``numpy.savez``, param groups, schedulers driving groups, frozen
layers) with both optimizers and compares: the same values, the same resumed
trajectory. Where braintools fails or does something else on purpose, the
test says so and checks both behaviours.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backends import BACKENDS, require
from hypothesis import given, settings
from hypothesis import strategies as st
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

KW = dict(weight_decay=1e-3, trust_coefficient=0.02, grad_clip_norm=1.0)
K, M = 4, 5  # steps before and after a checkpoint


def assert_bitwise(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


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


def snapshot(opt) -> dict:
    """Everything a load may change (and the params it must not), as NumPy values
    that keep each scalar's type (a Python float is float64, a jax rate float32)."""
    lr_of = lambda g: g["lr"].value if hasattr(g["lr"], "value") else g["lr"]
    return {
        "params": jax.tree.map(np.array, opt.params),
        "states": [jax.tree.map(np.array, h.value) for h in opt._holders()],
        "step_count": np.asarray(opt.step_count.value),
        "base_lr": np.asarray(opt.base_lr),
        "scheduler": [
            np.asarray(opt.lr.last_epoch.value),
            [np.asarray(x) for x in opt.lr.base_lrs],
            [np.asarray(x) for x in opt.lr.current_lrs.value],
        ],
        "groups": [(np.asarray(g["weight_decay"]), np.asarray(lr_of(g))) for g in opt.param_groups],
    }


def assert_same(a: dict, b: dict, keys=None) -> None:
    for key in keys or a:
        assert jax.tree.structure(a[key]) == jax.tree.structure(b[key]), key
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert x.tobytes() == y.tobytes(), (key, x, y)


def test_msgpack_checkpoint_of_the_issue_loads_and_a_bad_one_changes_nothing(tmp_path):
    """``msgpack_save(opt.state_dict())`` / ``msgpack_load``: loads (it used to fail
    half-way, leaving ``base_lr == '0'``); a bad one raises and changes nothing."""
    values = initial_values()
    grads = gradients(values)
    sched = lars.schedules.StepLR(0.5, step_size=2, gamma=0.5)
    opt = lars.Lars(sched, **KW).register_trainable_weights(make_states(values))
    _train(opt, sched, grads, range(3))
    braintools.file.msgpack_save(tmp_path / "opt.msgpack", opt.state_dict())
    loaded = braintools.file.msgpack_load(tmp_path / "opt.msgpack")
    assert loaded["scheduler"]["base_lrs"] == {"0": 0.5}  # what msgpack does to lists

    sched2 = lars.schedules.StepLR(0.5, step_size=2, gamma=0.5)
    other = lars.Lars(sched2, **KW).register_trainable_weights(make_states(values))
    other.update(grads[7])
    before = snapshot(other)
    bad = braintools.file.msgpack_load(tmp_path / "opt.msgpack")
    bad["opt_state"]["3"]["trace"]["scale"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"'scale'.*shape \(5,\)"):
        other.load_state_dict(bad)
    assert_same(snapshot(other), before)
    assert isinstance(other.base_lr, float) and sched2.base_lrs == [0.5]

    other.load_state_dict(loaded)
    assert_same(snapshot(other), snapshot(opt), keys=["states", "step_count", "base_lr"])
    assert sched2.state_dict() == sched.state_dict()


# -- a corrupted checkpoint loads as it was written, or raises and changes nothing ---


_CORRUPTIONS = ["delete", "shape", "reshape", "type", "msgpack", "orbax"]
_WRONG = ["text", None, True, [1.0, 2.0], {"x": 1.0}, 1 + 2j, object()]


def _property_optimizer(seed: int, base_lr: float, decay: float, head_lr: float):
    """Two groups (the second without decay), a scheduler, a skipped step."""
    values = {"w": jnp.ones((3, 4)) * 0.3, "b": jnp.linspace(0.0, 1.0, 4), "s": jnp.ones(())}
    sched = lars.schedules.StepLR(base_lr, step_size=2, gamma=0.5)
    opt = lars.Lars(sched, weight_decay=decay, grad_clip_norm=1.0, skip_nonfinite=True)
    opt.register_trainable_weights(values)
    opt.add_param_group({"h": jnp.arange(5.0)}, lr=head_lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for t in range(3 + seed):
        grads = {k: jnp.asarray(rng.standard_normal(np.shape(v)), jnp.float32) for k, v in
                 {**values, "h": jnp.arange(5.0)}.items()}  # fmt: skip
        if t == 1:
            grads["h"] = grads["h"].at[0].set(jnp.inf)
        opt.update(grads)
        sched.step()
    return opt


_SOURCE: dict = {}


def _source():
    if not _SOURCE:
        # The target differs from the source in everything a load writes.
        _SOURCE["opt"] = _property_optimizer(2, 0.4, 1e-3, 0.05)
        _SOURCE["target"] = _property_optimizer(0, 0.3, 2e-3, 0.07)
        _SOURCE["target_sd"] = _SOURCE["target"].state_dict()
    return _SOURCE["opt"], _SOURCE["target"], _SOURCE["target_sd"]


def _nodes(tree, path=()):
    """(path, value) of every node and leaf of a state dict."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _nodes(v, (*path, i))


def _replace(tree, path, fn):
    """A copy of ``tree`` with the node at ``path`` replaced by ``fn(node)`` (or deleted)."""
    if not path:
        return fn(tree)
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        out = dict(tree)
        new = _replace(tree[head], rest, fn)
        if new is _DELETE:
            del out[head]
        else:
            out[head] = new
        return out
    items = list(tree)
    new = _replace(items[head], rest, fn)
    if new is _DELETE:
        del items[head]
    else:
        items[head] = new
    if hasattr(tree, "_fields"):
        return type(tree)(*items) if len(items) == len(tree) else tuple(items)
    return type(tree)(items)


_DELETE = object()


def _orbax_form(tree):
    """What StandardCheckpointer gives back without a target: lists, dicts, None."""
    if hasattr(tree, "_fields"):
        return {f: _orbax_form(v) for f, v in zip(tree._fields, tree, strict=True)} or None
    if isinstance(tree, (list, tuple)):
        return [_orbax_form(v) for v in tree]
    if isinstance(tree, dict):
        return {k: _orbax_form(v) for k, v in tree.items()}
    return tree


def _corrupt(sd, kind: str, path, wrong):
    node = dict(_nodes(sd))[path]
    if kind == "delete":
        return _replace(sd, path, lambda _: _DELETE) if path else sd
    if kind in ("shape", "reshape"):  # a new axis of 2, or of 1 (same values)
        if not isinstance(node, (np.ndarray, float, int)):
            return sd
        if kind == "reshape":
            return _replace(sd, path, lambda x: np.asarray(x)[None])
        return _replace(sd, path, lambda x: np.zeros((*np.shape(x), 2), np.asarray(x).dtype))
    if kind == "type":
        return _replace(sd, path, lambda _: wrong)
    if kind == "msgpack":
        return _replace(sd, path, braintools.file.msgpack_to_state_dict)
    return _replace(sd, path, _orbax_form)


@settings(max_examples=300)
@given(
    corruptions=st.lists(
        st.tuples(st.sampled_from(_CORRUPTIONS), st.integers(0, 10**6), st.sampled_from(_WRONG)),
        min_size=1,
        max_size=3,
    )
)
def test_corrupted_state_dicts_load_as_written_or_change_nothing(corruptions):
    source, target, target_sd = _source()
    sd = source.state_dict()
    for kind, pick, wrong in corruptions:
        paths = [p for p, _ in _nodes(sd)]
        path = paths[pick % len(paths)]
        candidate = _corrupt(sd, kind, path, wrong)
        # Without both of lars's keys it is braintools' layout, where the scheduler
        # position and the ratios are not saved (tested against braintools above).
        if isinstance(candidate, dict) and not {"scheduler", "lars"} & set(candidate):
            continue
        sd = candidate
    target.load_state_dict(target_sd)  # back to its own state after earlier examples
    before = snapshot(target)
    try:
        target.load_state_dict(sd)
    except (TypeError, ValueError):
        assert_same(snapshot(target), before)
    else:
        after = snapshot(target)
        assert_same(after, snapshot(source), keys=["states", "step_count", "base_lr", "groups"])
        assert_same(after, snapshot(source), keys=["scheduler"])
        assert_same(after, before, keys=["params"])


def test_every_single_corruption_loads_as_written_or_changes_nothing():
    """Each corruption at each place of the state dict, one at a time (the property
    above draws combinations); both outcomes occur for every kind."""
    source, target, target_sd = _source()
    sd = source.state_dict()
    raised, loaded = set(), set()
    for kind in _CORRUPTIONS:
        for path, _ in list(_nodes(sd))[1:]:
            for wrong in _WRONG if kind == "type" else [None]:
                bad = _corrupt(sd, kind, path, wrong)
                if not {"scheduler", "lars"} & set(bad):
                    continue
                target.load_state_dict(target_sd)
                before = snapshot(target)
                try:
                    target.load_state_dict(bad)
                except (TypeError, ValueError):
                    assert_same(snapshot(target), before)
                    raised.add(kind)
                else:
                    after = snapshot(target)
                    keys = ["states", "step_count", "base_lr", "scheduler", "groups"]
                    assert_same(after, snapshot(source), keys=keys)
                    assert_same(after, before, keys=["params"])
                    loaded.add(kind)
    assert raised == {"delete", "shape", "reshape", "type"}
    assert loaded == set(_CORRUPTIONS)


# -- param groups --------------------------------------------------------------------


def _split(values: dict, head: tuple[str, ...]):
    base = {k: v for k, v in values.items() if k not in head}
    return base, {k: values[k] for k in head}


def test_param_groups_have_braintools_entries():
    values = initial_values()
    base, head = _split(values, ("conv",))
    ours, theirs = lars.Lars(0.5, **KW), braintools.optim.Lars(0.5, **KW)
    assert ours.param_groups == theirs.param_groups == []
    ours.register_trainable_weights(make_states(base))
    theirs.register_trainable_weights(make_states(base))
    for opt in (ours, theirs):
        opt.add_param_group(make_states(head), lr=0.1, name="head")
        opt.add_param_group(make_states({"x": jnp.ones(2)}), weight_decay=0.0)
    assert len(ours.param_groups) == len(theirs.param_groups) == 3
    assert len(ours.param_groups_opt_states) == len(theirs.param_groups_opt_states) == 2
    for a, b in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert set(a) == set(b) - {"tx"}
        assert set(a["params"]) == set(b["params"])
        for key in set(a) - {"params", "lr"}:
            assert a[key] == b[key], key
        # A rate given to add_param_group is kept as a number, otherwise as a state.
        assert hasattr(a["lr"], "value") == hasattr(b["lr"], "value")
        lr_a = a["lr"].value if hasattr(a["lr"], "value") else a["lr"]
        lr_b = b["lr"].value if hasattr(b["lr"], "value") else b["lr"]
        assert float(lr_a) == float(lr_b)
    assert sorted(ours.param_states.to_dict()) == sorted(theirs.param_states.to_dict())
    assert len(ours.param_states) == len(theirs.param_states) == len(values) + 1
    for (ka, a), (kb, b) in zip(
        sorted(ours.param_states.to_dict_value().items()),
        sorted(theirs.param_states.to_dict_value().items()),
        strict=True,
    ):
        assert ka == kb
        assert_bitwise(a, b)


def _braintools_per_group(groups, grads, steps, lrs_at=None):
    """One braintools.optim.Lars per group: what a group of lars.Lars is."""
    opts = []
    for states, kw in groups:
        opt = braintools.optim.Lars(**kw)
        opt.register_trainable_weights(states)
        opts.append(opt)
    for t in steps:
        for i, (opt, (states, _)) in enumerate(zip(opts, groups, strict=True)):
            if lrs_at is not None:
                opt.current_lr = lrs_at(t)[i]
            opt.update({k: grads[t][k] for k in states})
    return opts


SLOW_PALLAS = [pytest.param(b, marks=pytest.mark.slow) if b == "pallas" else b for b in BACKENDS]


@pytest.mark.parametrize("backend", SLOW_PALLAS)
def test_each_group_steps_as_its_own_braintools_lars(backend: str):
    """Groups with their own lr and weight decay train as separate braintools.optim.Lars,
    on every backend; the group clips its own gradients, as braintools' groups do."""
    require(backend)
    values = initial_values()
    grads = gradients(values)
    base, head = _split(values, ("conv", "scale"))
    steps = range(6)
    ours_base, ours_head = make_states(base), make_states(head)
    opt = lars.Lars(0.5, backend=backend, **KW).register_trainable_weights(ours_base)
    opt.add_param_group(ours_head, lr=0.2, weight_decay=0.0, trust_coefficient=0.05)
    for t in steps:
        opt.update(grads[t])
    theirs_base, theirs_head = make_states(base), make_states(head)
    _braintools_per_group(
        [
            (theirs_base, dict(lr=0.5, **KW)),
            (theirs_head, dict(lr=0.2, **{**KW, "weight_decay": 0.0, "trust_coefficient": 0.05})),
        ],
        grads,
        steps,
    )
    assert_close(read(ours_base), read(theirs_base), base, "group 0")
    assert_close(read(ours_head), read(theirs_head), head, "group 1")
    assert set(opt.params) == set(values)


def test_changing_a_group_rate_does_not_recompile():
    """Group rates (a number, a state, the scheduler's) reach the step as float32
    arguments: changing them never recompiles, and each group gets its own."""
    values = initial_values()
    grads = gradients(values)
    base, rest = _split(values, ("conv", "scale"))
    head, tail = _split(rest, ("scale",))
    sched = lars.schedules.StepLR(0.5, step_size=1, gamma=0.7)
    ours = [make_states(base), make_states(head), make_states(tail)]
    opt = lars.Lars(sched, **KW).register_trainable_weights(ours[0])
    opt.add_param_group(ours[1], lr=0.1)  # a number
    opt.add_param_group(ours[2])  # a state holding base_lr
    rates = []
    for t in range(6):
        opt.param_groups[1]["lr"] = 0.1 / (t + 1)
        opt.param_groups[2]["lr"].value = 0.3 * 0.9**t
        rates.append([float(np.float32(np.asarray(opt.current_lr))), 0.1 / (t + 1), 0.3 * 0.9**t])
        opt.update(grads[t])
        sched.step()
    assert opt._jit_step._cache_size() == 1
    theirs = [make_states(base), make_states(head), make_states(tail)]
    kws = [dict(lr=0.5, **KW), dict(lr=0.1, **KW), dict(lr=0.3, **KW)]
    per_group = _braintools_per_group(
        list(zip(theirs, kws, strict=True)), grads, range(6), lrs_at=lambda t: rates[t]
    )
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(read(a), read(b), values, f"group {i}")

    # Another hyperparameter of a group, changed, takes effect (one new compile).
    opt.param_groups[1]["trust_coefficient"] = 0.05
    replaced = braintools.optim.Lars(**{**kws[1], "trust_coefficient": 0.05})
    replaced.register_trainable_weights(theirs[1])
    replaced.load_state_dict(per_group[1].state_dict())
    replaced.current_lr = rates[-1][1]
    for t in (6, 7):
        opt.update(grads[t])
        replaced.update({k: grads[t][k] for k in theirs[1]})
    assert opt._jit_step._cache_size() == 1
    assert_close(read(ours[1]), read(theirs[1]), values, "group 1, new trust coefficient")


def test_a_scheduler_drives_the_groups_as_in_braintools():
    """Which group gets which rate, before and after scheduler.step()/lr_apply/attach."""
    values = initial_values()
    base, head = _split(values, ("conv",))
    ours_s = lars.schedules.StepLR([0.5, 0.2], step_size=1, gamma=0.5)
    theirs_s = braintools.optim.StepLR([0.5, 0.2], step_size=1, gamma=0.5)
    ours, theirs = lars.Lars(ours_s, **KW), braintools.optim.Lars(theirs_s, **KW)
    for opt in (ours, theirs):
        opt.register_trainable_weights(make_states(base))
        opt.add_param_group(make_states(head))  # no lr: starts at base_lr, then scheduled
        opt.add_param_group(make_states({"x": jnp.ones(2)}))  # beyond the base rates

    def rates(opt):
        out = [float(np.asarray(g["lr"].value)) for g in opt.param_groups]
        return [*out, float(np.asarray(opt.current_lr)), *map(float, opt.get_last_lr())]

    assert rates(ours) == rates(theirs)
    for t in range(3):
        ours_s.step()
        theirs_s.step()
        assert rates(ours) == rates(theirs), t
    ours.lr_apply(lambda x: x * 0.1)
    theirs.lr_apply(lambda x: x * 0.1)
    assert rates(ours) == rates(theirs)
    # Attached now, a one-rate scheduler repeats its rate for every group.
    ours_2, theirs_2 = lars.schedules.ExponentialLR(0.3), braintools.optim.ExponentialLR(0.3)
    ours_2.attach_optimizer(ours)
    theirs_2.attach_optimizer(theirs)
    assert ours_2.base_lrs == theirs_2.base_lrs == [0.3] * 3
    ours_2.step()
    theirs_2.step()
    group_rates = lambda opt: [float(np.asarray(g["lr"].value)) for g in opt.param_groups]
    assert group_rates(ours) == group_rates(theirs)
    # add_scheduler only records: get_last_lr reads the last one added.
    ours.add_scheduler(ours_2)
    theirs.add_scheduler(theirs_2)
    assert ours.get_last_lr() == theirs.get_last_lr() and ours.schedulers == [ours_2]


def test_a_braintools_scheduler_drives_lars_groups():
    """braintools' schedulers attach to braintools optimizers only; lars.Lars lets
    them write its groups' rates as they would braintools'."""
    base, head = _split(initial_values(), ("conv",))
    sched = braintools.optim.StepLR([0.5, 0.2], step_size=1, gamma=0.5)
    opt = lars.Lars(sched, **KW).register_trainable_weights(make_states(base))
    opt.add_param_group(make_states(head))
    sched.step()
    assert [float(g["lr"].value) for g in opt.param_groups] == [0.25, 0.1]
    assert float(opt.current_lr) == 0.25


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda o, s: o.add_param_group(s, lr=-1.0), ValueError, r"param_groups\[1\]\['lr'\]"),
        (lambda o, s: o.add_param_group(s, momentum=2.0), ValueError,
         r"param_groups\[1\].*momentum"),
        (lambda o, s: o.add_param_group({"conv": s["h"]}), ValueError, "'conv' is already in"),
        (lambda o, s: o.add_param_group({"y": o.param_groups[0]["params"]["conv"]}), ValueError,
         "state object of params is already"),
        (lambda o, s: o.add_param_group([s["h"]]), TypeError, "non-empty dict"),
        (lambda o, s: o.add_param_group(s, trust_ratio_mask={"zz": True}), ValueError,
         "trust_ratio_mask"),
    ],
)  # fmt: skip
def test_bad_param_groups_raise_and_change_nothing(call, error, match):
    opt = lars.Lars(0.5, **KW).register_trainable_weights(make_states(initial_values()))
    before = (len(opt.param_groups), len(opt.param_groups_opt_states), len(opt.param_states))
    with pytest.raises(error, match=match):
        call(opt, {"h": brainstate.ParamState(jnp.ones(3))})
    assert (
        len(opt.param_groups),
        len(opt.param_groups_opt_states),
        len(opt.param_states),
    ) == before
    with pytest.raises(ValueError, match="register_trainable_weights"):
        lars.Lars(0.5).add_param_group({"h": brainstate.ParamState(jnp.ones(3))})


# -- frozen layers: gradients of weights no group holds are ignored --------------------


def _model():
    brainstate.random.seed(0)
    return brainstate.nn.Sequential(
        brainstate.nn.Linear(6, 8), brainstate.nn.Linear(8, 8), brainstate.nn.Linear(8, 3)
    )


@pytest.mark.parametrize("jit", [False, True])
def test_frozen_layers_are_ignored_as_in_braintools(jit: bool):
    """Register the last layer only and pass the grads of the whole model."""
    inputs = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
    runs = {}
    makers = {
        "ours": lambda: lars.Lars(0.5, **KW),
        "theirs": lambda: braintools.optim.Lars(0.5, **KW),
    }
    for name, make in makers.items():
        model = _model()
        every = model.states(brainstate.ParamState)
        trained = {k: s for k, s in every.items() if k[0] == "layers" and k[1] == 2}
        frozen = {k: jax.tree.map(np.array, s.value) for k, s in every.items() if k not in trained}
        before = [np.array(x) for s in trained.values() for x in jax.tree.leaves(s.value)]
        opt = make()
        opt.register_trainable_weights(trained)

        def step(model=model, every=every, opt=opt):
            grads = brainstate.transform.grad(lambda: jnp.sum(model(inputs) ** 2), every)()
            opt.update(grads)

        step = brainstate.transform.jit(step) if jit else step
        for _ in range(4):
            step()
        for k, v in frozen.items():
            assert_bitwise(every[k].value, v)
        moved = [np.array(x) for s in trained.values() for x in jax.tree.leaves(s.value)]
        assert len(moved) == 2 and np.max(np.abs(moved[0] - before[0])) > 1e-4
        runs[name] = {k: jax.tree.map(np.asarray, s.value) for k, s in every.items()}
    for k in runs["ours"]:
        ours, theirs = jax.tree.leaves(runs["ours"][k]), jax.tree.leaves(runs["theirs"][k])
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_what_still_raises_as_in_braintools():
    """A registered weight without a gradient, a gradient of another shape."""
    values = initial_values()
    grads = gradients(values)[0]
    base, head = _split(values, ("conv",))
    for groups in ([base], [base, head]):
        ours, theirs = lars.Lars(0.5, **KW), braintools.optim.Lars(0.5, **KW)
        for opt in (ours, theirs):
            opt.register_trainable_weights(make_states(groups[0]))
            for g in groups[1:]:
                opt.add_param_group(make_states(g))
        before = jax.tree.map(np.array, ours.params)
        missing = {k: v for k, v in grads.items() if k != "scale"}
        with pytest.raises(ValueError):
            theirs.update(missing)
        with pytest.raises(ValueError, match=r"missing leaves at \['scale'\]"):
            ours.update(missing)
        bad = {**grads, "scale": jnp.ones((2, 2))}
        with pytest.raises((TypeError, ValueError)):  # jax: incompatible shapes
            theirs.update(bad)
        with pytest.raises(ValueError, match=r"\['scale'\] has shape \(2, 2\)"):
            ours.update(bad)
        assert_bitwise(ours.params, before)
        assert int(ours.step_count.value) == 0


def test_a_broadcastable_gradient_shape_raises_where_braintools_reshapes_the_param():
    """braintools broadcasts a (1, n) gradient into an (n,) param and changes its shape;
    lars.Lars refuses it naming the leaf."""
    theirs_states = make_states({"w": jnp.ones(4)})
    theirs = braintools.optim.Lars(0.5)
    theirs.register_trainable_weights(theirs_states)
    theirs.update({"w": jnp.ones((1, 4))})
    assert theirs_states["w"].value.shape == (1, 4)
    ours = lars.Lars(0.5).register_trainable_weights(make_states({"w": jnp.ones(4)}))
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(1, 4\), but the param has \(4,\)"):
        ours.update({"w": jnp.ones((1, 4))})


def test_update_takes_braintools_extra_keyword_arguments():
    """braintools' update(grads, **extra_args) passes them to optax; LARS ignores them."""
    values, grads, ours_states, theirs_states, ours, theirs = optimizer_pair(0.5, **KW)
    for t in range(3):
        ours.update(grads[t], value=jnp.float32(1.5))
        theirs.update(grads[t], value=jnp.float32(1.5))
    assert_close(read(ours_states), read(theirs_states), values, "with value=loss")


def test_plain_array_groups_and_merged_views():
    """Groups of plain arrays (lars only): new values at params, one dict for all groups."""
    values = initial_values()
    grads = gradients(values)
    base, head = _split(values, ("conv",))
    opt = lars.Lars(0.5, **KW).register_trainable_weights(base)
    opt.add_param_group(head, lr=0.1)
    opt.update(grads[0])
    assert set(opt.params) == set(opt.trust_ratios) == set(values)
    assert set(opt.param_states.to_pytree()) == set(values)
    ref = lars.Lars(0.1, **KW).register_trainable_weights(head)
    ref.update({"conv": grads[0]["conv"]})
    assert_bitwise(opt.params["conv"], ref.params["conv"])
