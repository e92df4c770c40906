"""``lars.schedules`` against braintools' schedulers of the same name, value by value."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from schedule_cases import SCHEDULERS

from lars import schedules

braintools = pytest.importorskip("braintools")

NAMES = list(SCHEDULERS)
# braintools evaluates its closed forms in float32 (jax.numpy); ours are float64.
RTOL = 2e-6


def _value(lr) -> float:
    return float(np.asarray(lr))


def test_every_public_scheduler_is_covered():
    public = {n for n in schedules.__all__ if n != "LRScheduler"}
    assert public == set(SCHEDULERS)


@pytest.mark.parametrize("name", NAMES)
def test_values_match_braintools(name: str):
    ours = getattr(schedules, name)(**SCHEDULERS[name])
    theirs = getattr(braintools.optim, name)(**SCHEDULERS[name])
    got, want = [], []
    for _ in range(30):
        got.append(ours.get_last_lr()[0])
        want.append(_value(theirs.get_last_lr()[0]))
        assert ours.current_lr == got[-1]
        ours.step()
        theirs.step()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12)
    assert len(set(np.round(got, 9))) > 1  # the run crosses the schedule's changes


@pytest.mark.parametrize("name", NAMES)
def test_jumps_and_start_epoch_match_braintools(name: str):
    kw = dict(SCHEDULERS[name], last_epoch=2)
    ours, theirs = getattr(schedules, name)(**kw), getattr(braintools.optim, name)(**kw)
    np.testing.assert_allclose(ours.get_last_lr()[0], _value(theirs.get_last_lr()[0]), rtol=RTOL)
    for epoch in [9, 4, 25, 0]:
        ours.step(epoch)
        theirs.step(epoch)
        assert ours.last_epoch.value == epoch
        np.testing.assert_allclose(
            ours.get_last_lr()[0], _value(theirs.get_last_lr()[0]), rtol=RTOL, atol=1e-12
        )


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


def test_state_dict_round_trip_resumes_position():
    a = schedules.WarmupCosineSchedule(base_lr=0.5, warmup_steps=3, total_steps=10)
    for _ in range(4):
        a.step()
    saved = pickle.loads(pickle.dumps(a.state_dict()))
    b = schedules.WarmupCosineSchedule(base_lr=0.5, warmup_steps=3, total_steps=10)
    b.load_state_dict(saved)
    for _ in range(5):
        assert b.get_last_lr() == a.get_last_lr()
        assert b.last_epoch.value == a.last_epoch.value
        a.step()
        b.step()
    with pytest.raises(ValueError, match="last_epoch"):
        b.load_state_dict({"base_lrs": [0.1]})


def test_state_dict_is_compatible_with_braintools():
    """A braintools scheduler's state_dict loads into ours and vice versa."""
    theirs = braintools.optim.StepLR(base_lr=0.5, step_size=2, gamma=0.5)
    for _ in range(3):
        theirs.step()
    ours = schedules.StepLR(base_lr=0.5, step_size=2, gamma=0.5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.last_epoch.value == 3
    ours.step()
    theirs.step()
    assert ours.get_last_lr()[0] == pytest.approx(_value(theirs.get_last_lr()[0]), rel=RTOL)


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
