"""``lars.Lars`` is ``braintools.optim.Lars`` (0.4.0) by default, option by option.

Both optimizers train their own copies of the same ``brainstate.ParamState``
params (plain arrays, and one state holding a ``{"weight", "bias"}`` dict as
``brainstate.nn.Linear`` does) with the same gradients; schedulers of the same
class and arguments are stepped between updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from schedule_cases import SCHEDULERS

import lars

brainstate = pytest.importorskip("brainstate")
braintools = pytest.importorskip("braintools")

STEPS = 25


def initial_values(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "conv": f32(3, 3, 4, 8),
        "dense": {"weight": f32(16, 8), "bias": jnp.zeros(8, jnp.float32)},
        "scale": jnp.ones(8, jnp.float32),
        "scalar": f32(),
        "frozen": jnp.zeros(3, jnp.float32),  # zero weights and zero grads
    }


def gradients(values: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)

    def one(path, v):
        if path[0].key == "frozen":
            return jnp.zeros_like(v)
        return jnp.asarray(0.1 * rng.standard_normal(v.shape), jnp.float32)

    return [jax.tree_util.tree_map_with_path(one, values) for _ in range(STEPS)]


def make_states(values: dict) -> dict:
    return {k: brainstate.ParamState(v) for k, v in values.items()}


def optimizer_pair(lr, **kw) -> tuple:
    """(values, grads, our states, their states, lars.Lars, braintools.optim.Lars)
    registered on the same fresh problem."""
    values = initial_values()
    grads = gradients(values)
    ours_states, theirs_states = make_states(values), make_states(values)
    ours = lars.Lars(lr, **kw).register_trainable_weights(ours_states)
    theirs = braintools.optim.Lars(lr, **kw)
    theirs.register_trainable_weights(theirs_states)
    return values, grads, ours_states, theirs_states, ours, theirs


def read(states: dict) -> dict:
    return {k: s.value for k, s in states.items()}


def assert_close(got: dict, want: dict, start: dict, what: str) -> None:
    """Few float32 ulps plus 1e-5 of each leaf's total change."""
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = np.asarray(_at(want, path), np.float64)
        x0 = np.asarray(_at(start, path), np.float64)
        a = np.asarray(a, np.float64)
        change = np.max(np.abs(b - x0), initial=0.0)
        allowed = 1e-5 * change + 4 * np.finfo(np.float32).eps * np.max(np.abs(b), initial=0.0)
        err = np.max(np.abs(a - b), initial=0.0)
        assert err <= allowed, f"{what} at {jax.tree_util.keystr(path)}: {err:.3g} > {allowed:.3g}"


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def run_both(make_ours, make_theirs, *, schedulers=(), steps: int = STEPS, jit_ours=False):
    """Steps both optimizers with the same grads; compares params after every step."""
    values = initial_values()
    grads = gradients(values)
    ours_states, theirs_states = make_states(values), make_states(values)
    ours, theirs = make_ours(), make_theirs()
    ours.register_trainable_weights(ours_states)
    theirs.register_trainable_weights(theirs_states)
    update_theirs = brainstate.transform.jit(theirs.update)
    update_ours = brainstate.transform.jit(ours.update) if jit_ours else ours.update
    for t in range(steps):
        update_theirs(grads[t])
        update_ours(grads[t])
        for s in schedulers:
            s.step()
        assert_close(read(ours_states), read(theirs_states), values, f"step {t}")
    assert int(ours.step_count.value) == int(theirs.step_count.value) == steps
    # Not a trivial run: the params moved.
    assert float(jnp.max(jnp.abs(read(ours_states)["conv"] - values["conv"]))) > 1e-4
    np.testing.assert_array_equal(np.asarray(read(ours_states)["frozen"]), np.zeros(3))
    return ours, theirs


OPTIONS = {
    "defaults": {},
    "momentum_0.5": {"momentum": 0.5},
    "no_momentum": {"momentum": 0.0},
    "weight_decay": {"weight_decay": 1e-2},
    "trust_coefficient": {"trust_coefficient": 0.02},
    "eps": {"eps": 1e-1},
    "grad_clip_norm": {"grad_clip_norm": 0.5, "weight_decay": 1e-2},
    "grad_clip_value": {"grad_clip_value": 0.02},
    "all": {
        "momentum": 0.8,
        "weight_decay": 5e-3,
        "trust_coefficient": 0.01,
        "eps": 1e-4,
        "grad_clip_norm": 1.0,
        "grad_clip_value": 0.15,
    },
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_braintools(name: str):
    kw = OPTIONS[name]
    lr = 0.7
    run_both(lambda: lars.Lars(lr, **kw), lambda: braintools.optim.Lars(lr, **kw))


def test_positional_arguments_match_braintools():
    args = (0.3, 0.85, 1e-3, 0.01, 1e-6, 2.0, 0.1)
    run_both(lambda: lars.Lars(*args), lambda: braintools.optim.Lars(*args), steps=5)


KW = {"trust_coefficient": 0.02, "weight_decay": 1e-3}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_match_braintools(name: str):
    ours_s = getattr(lars.schedules, name)(**SCHEDULERS[name])
    theirs_s = getattr(braintools.optim, name)(**SCHEDULERS[name])
    run_both(
        lambda: lars.Lars(ours_s, **KW),
        lambda: braintools.optim.Lars(theirs_s, **KW),
        schedulers=(ours_s, theirs_s),
    )


def test_braintools_scheduler_object_drives_lars():
    """A braintools scheduler passed as lr is read at every update, never advanced."""
    ours_s = braintools.optim.MultiStepLR(base_lr=0.5, milestones=[2, 5], gamma=0.2)
    theirs_s = braintools.optim.MultiStepLR(base_lr=0.5, milestones=[2, 5], gamma=0.2)
    ours, _ = run_both(
        lambda: lars.Lars(ours_s, **KW),
        lambda: braintools.optim.Lars(theirs_s, **KW),
        schedulers=(ours_s, theirs_s),
        steps=8,
    )
    assert ours.lr is ours_s and ours.lr_scheduler is ours_s
    assert int(ours_s.last_epoch.value) == 8
    assert float(ours.current_lr) == pytest.approx(0.5 * 0.2**2, rel=1e-6)
    assert ours.base_lr == 0.5


def test_inside_brainstate_jit_matches_braintools():
    """lars.Lars.update traced by brainstate.transform.jit, with a scheduler."""
    ours_s = lars.schedules.CosineAnnealingLR(base_lr=0.5, T_max=10)
    theirs_s = braintools.optim.CosineAnnealingLR(base_lr=0.5, T_max=10)
    run_both(
        lambda: lars.Lars(ours_s, **KW),
        lambda: braintools.optim.Lars(theirs_s, **KW),
        schedulers=(ours_s, theirs_s),
        steps=12,
        jit_ours=True,
    )


def test_current_lr_setter_matches_braintools():
    values, grads, ours_states, theirs_states, ours, theirs = optimizer_pair(0.5, **KW)
    for t in range(6):
        if t == 3:
            ours.current_lr = 0.05
            theirs.current_lr = 0.05
        ours.update(grads[t])
        theirs.update(grads[t])
        assert float(ours.current_lr) == pytest.approx(float(theirs.current_lr))
    assert_close(read(ours_states), read(theirs_states), values, "after current_lr change")


def test_interface_attributes_match_braintools():
    kw = dict(momentum=0.8, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-6)
    kw.update(grad_clip_norm=1.0, grad_clip_value=0.5)
    ours, theirs = lars.Lars(0.25, **kw), braintools.optim.Lars(0.25, **kw)
    for name in [*kw, "base_lr"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert float(ours.current_lr) == float(theirs.current_lr) == 0.25
    assert type(ours.lr).__name__ == type(theirs.lr).__name__ == "ConstantLR"
    states = make_states(initial_values())
    assert ours.register_trainable_weights(states) is ours
    assert int(ours.step_count.value) == 0


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_applied_rates_are_braintools_bit_for_bit(name: str):
    """The rate each update applies (current_lr), scheduler by scheduler, for 30 steps."""
    ours_s = getattr(lars.schedules, name)(**SCHEDULERS[name])
    theirs_s = getattr(braintools.optim, name)(**SCHEDULERS[name])
    ours, theirs = lars.Lars(ours_s, **KW), braintools.optim.Lars(theirs_s, **KW)
    for _ in range(30):
        a, b = np.asarray(ours.current_lr), np.asarray(theirs.current_lr)
        assert (a.dtype, a.tobytes()) == (b.dtype, b.tobytes())
        assert ours.get_last_lr() == [ours.current_lr]
        ours_s.step()
        theirs_s.step()


def test_braintools_attributes_are_there():
    """The attributes braintools code reads, with braintools' values."""
    values = initial_values()
    ours, theirs = lars.Lars(0.25, **KW), braintools.optim.Lars(0.25, **KW)
    for opt in (ours, theirs):
        opt.register_trainable_weights(make_states(values))
    assert len(ours.param_groups) == len(theirs.param_groups) == 1
    assert set(ours.param_groups[0]) == set(theirs.param_groups[0])
    assert ours.param_groups[0]["lr"].value == theirs.param_groups[0]["lr"].value
    assert ours.param_groups_opt_states == theirs.param_groups_opt_states == []
    assert ours.schedulers == theirs.schedulers == []
    assert ours.get_last_lr() == [ours.current_lr] and float(ours.get_last_lr()[0]) == 0.25
    assert sorted(ours.param_states.to_dict()) == sorted(theirs.param_states.to_dict())
    ours.param_groups[0]["lr"].value = 0.125  # group 0's rate is the optimizer's
    assert float(ours.current_lr) == 0.125 == float(ours.lr.get_last_lr()[0])
