"""What braintools users do with ``braintools.optim.Lars`` (0.4.0), done with ``lars.Lars``.

Each test does what a braintools user does (param groups, schedulers driving
groups, frozen layers) with both optimizers and compares: the same values, the
same trajectory. Where braintools fails or does something else on purpose, the
test says so and checks both behaviours.

Checkpoints are in ``test_braintools_checkpoints.py`` and
``test_braintools_bad_checkpoints.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backends import BACKENDS, require
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


def assert_bitwise(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


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
