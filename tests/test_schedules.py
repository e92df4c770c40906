"""``lars.schedules`` against braintools' schedulers of the same name, bit for bit."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from schedule_cases import SCHEDULERS

from lars import Lars, schedules

braintools = pytest.importorskip("braintools")

NAMES = list(SCHEDULERS)
STEPS = 60


def _bits(lr) -> tuple:
    """A rate's dtype and bytes: braintools gives float32 0-d arrays or Python floats."""
    a = np.asarray(lr)
    return a.dtype, a.tobytes()


def _same(ours, theirs) -> None:
    got, want = ours.get_last_lr(), theirs.get_last_lr()
    assert [_bits(x) for x in got] == [_bits(x) for x in want], (got, want)


def test_every_public_scheduler_is_covered():
    public = {n for n in schedules.__all__ if n != "LRScheduler"}
    assert public == set(SCHEDULERS)


@pytest.mark.parametrize("base_lr", [0.5, [0.5, 0.037]], ids=["one", "two_groups"])
@pytest.mark.parametrize("name", NAMES)
def test_values_match_braintools_bit_for_bit(name: str, base_lr):
    kw = dict(SCHEDULERS[name], base_lr=base_lr)
    ours = getattr(schedules, name)(**kw)
    theirs = getattr(braintools.optim, name)(**kw)
    seen = set()
    for _ in range(STEPS):
        _same(ours, theirs)
        assert _bits(ours.current_lr) == _bits(theirs.get_last_lr()[0])
        seen.add(float(ours.current_lr))
        ours.step()
        theirs.step()
    assert len(seen) >= 2  # the run crosses the schedule's changes


# Epochs where Python float64 arithmetic (lars 0.1.0) rounds to another float32
# than braintools' jax.numpy float32 arithmetic; the values are braintools'.
FLOAT32_CASES = [
    ("MultiStepLR", 15, "0.013500001"),
    ("CosineAnnealingLR", 5, "0.31841063"),
    ("LinearLR", 3, "0.21874999"),
    ("PolynomialLR", 4, "0.2222222"),
    ("WarmupScheduler", 2, "0.20600002"),
    ("WarmupCosineSchedule", 13, "0.2293905"),
]


@pytest.mark.parametrize("name, epoch, value", FLOAT32_CASES)
def test_values_are_braintools_float32_values(name: str, epoch: int, value: str):
    ours = getattr(schedules, name)(**SCHEDULERS[name])
    theirs = getattr(braintools.optim, name)(**SCHEDULERS[name])
    ours.step(epoch)
    theirs.step(epoch)
    assert np.asarray(ours.current_lr) == np.float32(value)
    _same(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_jumps_and_start_epoch_match_braintools(name: str):
    kw = dict(SCHEDULERS[name], last_epoch=2)
    ours, theirs = getattr(schedules, name)(**kw), getattr(braintools.optim, name)(**kw)
    _same(ours, theirs)
    for epoch in [9, 4, 25, 0, 100]:
        ours.step(epoch)
        theirs.step(epoch)
        assert ours.last_epoch.value == epoch
        _same(ours, theirs)
    ours.step_epoch()
    theirs.step_epoch()
    _same(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_apply_matches_braintools(name: str):
    """apply(fn) recomputes the closed form and applies fn (twice does not compound)."""
    ours = getattr(schedules, name)(**SCHEDULERS[name])
    theirs = getattr(braintools.optim, name)(**SCHEDULERS[name])
    for _ in range(3):
        ours.step()
        theirs.step()
        ours.apply(lambda x: x * 0.5)
        theirs.apply(lambda x: x * 0.5)
        _same(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_traced_epoch_gives_the_host_value(name: str):
    """lr_at works on a traced epoch (inside jit) and agrees with the host value."""
    sched = getattr(schedules, name)(**SCHEDULERS[name])
    traced = jax.jit(lambda e: jnp.asarray(sched.lr_at(e, 0.5), jnp.float32))
    for epoch in [0, 3, 5, 13, 29]:
        want = sched.lr_at(epoch, 0.5)
        np.testing.assert_allclose(float(traced(epoch)), want, rtol=1e-6, atol=1e-9)


def test_multiple_base_lrs():
    ours = schedules.StepLR(base_lr=[0.1, 0.2], step_size=1, gamma=0.5)
    ours.step()
    assert ours.get_last_lr() == [0.05, 0.1]


@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_go_both_ways_with_braintools(name: str):
    """Ours loads braintools' state_dict and braintools loads ours; both continue as one."""
    theirs = getattr(braintools.optim, name)(**SCHEDULERS[name])
    for _ in range(7):
        theirs.step()
    ours = getattr(schedules, name)(**SCHEDULERS[name])
    ours.load_state_dict(theirs.state_dict())
    back = getattr(braintools.optim, name)(**SCHEDULERS[name])
    back.load_state_dict(pickle.loads(pickle.dumps(ours.state_dict())))
    for _ in range(STEPS):
        ours.step()
        theirs.step()
        back.step()
        _same(ours, theirs)
        _same(back, theirs)
    assert ours.last_epoch.value == theirs.last_epoch.value == 7 + STEPS


def test_state_dict_holds_python_numbers_and_resumes_position():
    a = schedules.WarmupCosineSchedule(base_lr=0.5, warmup_steps=3, total_steps=10)
    for _ in range(4):
        a.step()
    saved = a.state_dict()
    assert type(saved["last_epoch"]) is int
    assert all(type(x) is float for x in saved["base_lrs"] + saved["current_lrs"])
    b = schedules.WarmupCosineSchedule(base_lr=0.5, warmup_steps=3, total_steps=10)
    b.load_state_dict(pickle.loads(pickle.dumps(saved)))
    for _ in range(5):
        assert [float(x) for x in b.get_last_lr()] == [float(x) for x in a.get_last_lr()]
        assert b.last_epoch.value == a.last_epoch.value
        a.step()
        b.step()


def test_msgpack_state_dict_loads(tmp_path):
    """msgpack turns the lists into dicts keyed '0', '1', ...: they are read as lists."""
    a = schedules.StepLR(base_lr=[0.5, 0.25], step_size=2, gamma=0.5)
    for _ in range(3):
        a.step()
    braintools.file.msgpack_save(tmp_path / "s.msgpack", a.state_dict())
    loaded = braintools.file.msgpack_load(tmp_path / "s.msgpack")
    assert loaded["base_lrs"] == {"0": 0.5, "1": 0.25}
    b = schedules.StepLR(base_lr=[0.5, 0.25], step_size=2, gamma=0.5)
    b.load_state_dict(loaded)
    assert b.state_dict() == a.state_dict()
    assert b.base_lrs == [0.5, 0.25] and all(type(x) is float for x in b.base_lrs)


BAD_STATES = [
    ({"base_lrs": [0.1], "current_lrs": [0.1]}, ValueError, "last_epoch"),
    ({"last_epoch": 2, "current_lrs": [0.1]}, ValueError, "base_lrs"),
    ({"last_epoch": 2, "base_lrs": [0.1]}, ValueError, "current_lrs"),
    ({"last_epoch": "2", "base_lrs": [0.1], "current_lrs": [0.1]}, TypeError, "last_epoch"),
    ({"last_epoch": 2.0, "base_lrs": [0.1], "current_lrs": [0.1]}, TypeError, "last_epoch"),
    ({"last_epoch": -1, "base_lrs": [0.1], "current_lrs": [0.1]}, ValueError, "last_epoch"),
    ({"last_epoch": 2, "base_lrs": {"0": "0.1"}, "current_lrs": [0.1]}, TypeError, "base_lrs"),
    ({"last_epoch": 2, "base_lrs": {"1": 0.1}, "current_lrs": [0.1]}, TypeError, "base_lrs"),
    ({"last_epoch": 2, "base_lrs": 0.1, "current_lrs": [0.1]}, TypeError, "base_lrs"),
    ({"last_epoch": 2, "base_lrs": [-0.1], "current_lrs": [0.1]}, ValueError, "base_lrs"),
    ({"last_epoch": 2, "base_lrs": [0.1], "current_lrs": [float("nan")]}, ValueError, "current"),
    ({"last_epoch": 2, "base_lrs": [0.1], "current_lrs": [0.1, 0.2]}, ValueError, "one current"),
    ({"last_epoch": 2, "base_lrs": [], "current_lrs": []}, ValueError, "at least one"),
    ({"last_epoch": 2, "base_lrs": [np.ones(2)], "current_lrs": [0.1]}, TypeError, "base_lrs"),
    ([2, [0.1], [0.1]], TypeError, "dict"),
]


@pytest.mark.parametrize("state, error, match", BAD_STATES)
def test_bad_state_dict_raises_and_changes_nothing(state, error, match):
    sched = schedules.MultiStepLR(base_lr=0.5, milestones=[2], gamma=0.1)
    for _ in range(3):
        sched.step()
    before = sched.state_dict()
    with pytest.raises(error, match=match):
        sched.load_state_dict(state)
    assert sched.state_dict() == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.StepLR(base_lr=-0.1), "base_lr"),
        (lambda: schedules.StepLR(base_lr=float("nan")), "base_lr"),
        (lambda: schedules.StepLR(base_lr="0.1"), "base_lr"),
        (lambda: schedules.StepLR(step_size=0), "step_size"),
        (lambda: schedules.StepLR(step_size=2.5), "step_size"),
        (lambda: schedules.StepLR(gamma=-1.0), "gamma"),
        (lambda: schedules.MultiStepLR(milestones=[3, -1]), "milestones"),
        (lambda: schedules.CosineAnnealingLR(T_max=0), "T_max"),
        (lambda: schedules.CosineAnnealingLR(eta_min=-1.0), "eta_min"),
        (lambda: schedules.LinearLR(total_iters=-1), "total_iters"),
        (lambda: schedules.PolynomialLR(total_iters=0), "total_iters"),
        (lambda: schedules.WarmupScheduler(warmup_epochs=-2), "warmup_epochs"),
        (lambda: schedules.WarmupCosineSchedule(warmup_start_lr=-1.0), "warmup_start_lr"),
        (lambda: schedules.ConstantLR(factor=float("inf")), "factor"),
        (lambda: schedules.ExponentialLR(last_epoch=-1), "last_epoch"),
    ],
)
def test_bad_arguments_raise(make, match: str):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: s.step(-1), ValueError, "epoch"),
        (lambda s: s.step("3"), TypeError, "epoch"),
        (lambda s: s.apply(lambda x: -x), ValueError, "lr must be >= 0"),
        (lambda s: s.apply(lambda x: x * float("nan")), ValueError, "lr must be finite"),
        (lambda s: s.apply(lambda x: "fast"), TypeError, "lr"),
        (lambda s: s.attach_optimizer(object()), TypeError, "param_groups"),
    ],
)
def test_bad_step_apply_or_attach_raises_and_changes_nothing(call, error, match):
    """Checked before anything changes (braintools takes them and breaks later)."""
    sched = schedules.StepLR(base_lr=0.5, step_size=1, gamma=0.5)
    opt = Lars(sched).register_trainable_weights({"w": jnp.ones(2)})
    sched.step()
    before = (sched.state_dict(), float(opt.current_lr), sched.optimizer)
    with pytest.raises(error, match=match):
        call(sched)
    assert (sched.state_dict(), float(opt.current_lr), sched.optimizer) == before
