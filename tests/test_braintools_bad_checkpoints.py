"""A bad checkpoint given to ``lars.Lars.load_state_dict`` raises and changes nothing.

A state dict saved the way braintools users save one (``msgpack_save`` of
``state_dict()``) loads; one corrupted anywhere (a key deleted, a shape or
type changed, a node turned into msgpack's or orbax's form) either loads as
it was written or raises ``TypeError``/``ValueError`` and leaves the params,
the optimizer state, the groups and the scheduler as they were.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_braintools_checkpoints import _train
from test_braintools_dropin import KW
from test_braintools_parity import gradients, initial_values, make_states

import lars

braintools = pytest.importorskip("braintools")


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
        # position and the ratios are not saved (tested in test_braintools_checkpoints.py).
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
