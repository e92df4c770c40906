"""What optax users do with ``optax.lars`` (0.2.8), done with ``lars.lars``.

Each test runs the same user code on ``optax.lars`` and on ``lars.lars`` in
its optax form (``lr_inside_momentum=True, eps=0.0``) and compares: extra
keyword arguments to ``update`` (``value=loss``, as ``optax.chain`` and the
other ``GradientTransformationExtraArgs`` pass them) and a weight-decay
schedule. Eager steps are compared bit for bit; jitted ones to a few float32
ulps of the params per step (the two programs are fused differently by XLA).
Complex params are in test_optax_complex.py, sharded params on meshes of
Explicit axes in test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from backends import require
from test_jit import count_compiles

import lars
from lars import _dispatch
from lars.contract import LarsConfig, StepSpec

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1.0, 3, 20)
DECAY = optax.linear_schedule(2e-2, 0.0, 8)  # reaches 0.0 within the run
MASK = lars.exclude_bias_and_norm


def ours(learning_rate=SCHEDULE, **kw) -> lars.LarsTransformation:
    """``lars.lars`` in the optax.lars form."""
    kw.setdefault("backend", "reference")
    return lars.lars(learning_rate, eps=0.0, lr_inside_momentum=True, **kw)


def real_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "s": jnp.ones((), jnp.float32),
    }


def grads_like(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(1000 + seed)

    def one(x):
        g = rng.normal(size=x.shape)
        if jnp.iscomplexobj(x):
            g = g + 1j * rng.normal(size=x.shape)
        return jnp.asarray(0.1 * g, x.dtype)

    return jax.tree.map(one, params)


def trajectory(opt, params, steps: int, *, jit: bool, seed: int = 0, grads=grads_like, **extra):
    def step(p, s, g):
        u, s = opt.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    f = jax.jit(step) if jit else step
    state, out = opt.init(params), []
    for t in range(steps):
        params, state = f(params, state, grads(params, seed + t))
        out.append(params)
    return out, state


def bits(x) -> np.ndarray:
    """The bytes of an array (0-d ones too), to compare bit for bit."""
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def assert_same(got: list, want: list, *, bitwise: bool, start) -> None:
    """Equal bit for bit, or within a few ulps plus 1e-5 of each leaf's change."""
    for t, (a_t, b_t) in enumerate(zip(got, want, strict=True)):
        leaves = zip(
            jax.tree.leaves(a_t), jax.tree.leaves(b_t), jax.tree.leaves(start), strict=True
        )
        for a, b, x0 in leaves:
            a, b, x0 = np.asarray(a), np.asarray(b), np.asarray(x0)
            assert a.dtype == b.dtype, (t, a.dtype, b.dtype)
            if bitwise:
                assert np.array_equal(bits(a), bits(b)), f"step {t}"
                continue
            eps = np.finfo(a.dtype).eps
            allowed = 1e-5 * np.max(np.abs(b - x0)) + 4 * eps * np.max(np.abs(b))
            assert np.max(np.abs(a - b)) <= allowed, f"step {t}"


def moved(trajectory_: list, start) -> bool:
    last = jax.tree.leaves(trajectory_[-1])
    return all(
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(last, jax.tree.leaves(start), strict=True)
    )


# -- extra keyword arguments -------------------------------------------------------


def test_is_a_gradient_transformation_extra_args_as_optax_lars_is():
    assert isinstance(optax.lars(0.1), optax.GradientTransformationExtraArgs)
    opt = lars.lars(0.1)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    assert isinstance(opt, lars.LarsTransformation)
    # optax's wrappers take it as it is (no with_extra_args_support wrapper).
    assert optax.with_extra_args_support(opt) is opt
    init, update = opt  # still an (init, update) pair
    assert init is opt.init and update is opt.update


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_update_ignores_extra_keyword_arguments_as_optax_lars_does(jit: bool):
    params = real_tree()
    extra = {"value": jnp.float32(3.5), "grad": None, "key": jax.random.key(0)}
    want, _ = trajectory(optax.lars(SCHEDULE, weight_decay=1e-3), params, 6, jit=jit, **extra)
    got, _ = trajectory(ours(weight_decay=1e-3), params, 6, jit=jit, **extra)
    plain, _ = trajectory(ours(weight_decay=1e-3), params, 6, jit=jit)
    assert_same(got, want, bitwise=not jit, start=params)
    assert_same(got, plain, bitwise=True, start=params)
    assert moved(got, params)


def test_apply_gradients_still_works_beside_extra_args():
    params, grads = real_tree(), grads_like(real_tree(), 0)
    opt = ours(weight_decay=1e-3)
    updates, s1 = opt.update(grads, opt.init(params), params, value=1.0)
    new, s2 = opt.apply_gradients(params, opt.init(params), grads)
    for a, b in zip(
        jax.tree.leaves(optax.apply_updates(params, updates)), jax.tree.leaves(new), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s1.count) == int(s2.count) == 1


WRAPPERS = {
    # reduce_on_plateau needs value=: chain passes it to every member.
    "chain_reduce_on_plateau": lambda tx: optax.chain(
        tx, optax.contrib.reduce_on_plateau(patience=1, cooldown=0, factor=0.5)
    ),
    "named_chain": lambda tx: optax.named_chain(
        ("lars", tx), ("plateau", optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    ),
    "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    "masked": lambda tx: optax.masked(tx, {"w": True, "b": False, "s": True}),
    "partition": lambda tx: optax.partition(
        {"lars": tx, "sgd": optax.sgd(0.1)}, {"w": "lars", "b": "sgd", "s": "lars"}
    ),
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, 3),
    "conditionally_transform": lambda tx: optax.conditionally_transform(tx, lambda n: n % 2 == 0),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS), ids=list(WRAPPERS))
def test_optax_wrappers_pass_extra_args_through(wrap: str):
    """The same wrapped optimizer, updated with value=loss each step, as optax's."""
    params = real_tree()
    losses = [3.0, 2.0] + [2.0] * 6  # a plateau: reduce_on_plateau scales the updates down

    def run(tx):
        opt = WRAPPERS[wrap](tx)

        @jax.jit
        def step(p, s, g, loss):
            u, s = opt.update(g, s, p, value=loss)
            return optax.apply_updates(p, u), s

        p, s, out = params, opt.init(params), []
        for t, loss in enumerate(losses):
            p, s = step(p, s, grads_like(p, t), jnp.float32(loss))
            out.append(p)
        return out

    want = run(optax.lars(SCHEDULE, weight_decay=1e-3))
    got = run(ours(weight_decay=1e-3))
    assert_same(got, want, bitwise=False, start=params)
    assert moved(want, params)


def test_inject_hyperparams_passes_extra_args_as_for_optax_lars():
    params = real_tree()
    theirs = optax.inject_hyperparams(optax.lars)(learning_rate=SCHEDULE, weight_decay=DECAY)
    mine = optax.inject_hyperparams(lars.lars)(
        learning_rate=SCHEDULE,
        weight_decay=DECAY,
        eps=0.0,
        lr_inside_momentum=True,
        backend="reference",
    )
    want, _ = trajectory(theirs, params, 8, jit=True, value=jnp.float32(1.0))
    got, _ = trajectory(mine, params, 8, jit=True, value=jnp.float32(1.0))
    assert_same(got, want, bitwise=False, start=params)
    assert moved(got, params)


# -- weight decay schedules --------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["all", "exclude_bias_and_norm"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_weight_decay_schedule_matches_optax_lars(jit: bool, masked: bool):
    params = real_tree()
    mask = MASK if masked else True
    theirs = optax.lars(SCHEDULE, weight_decay=DECAY, weight_decay_mask=mask, trust_ratio_mask=mask)
    mask = MASK if masked else None
    mine = ours(weight_decay=DECAY, weight_decay_mask=mask, trust_ratio_mask=mask)
    want, _ = trajectory(theirs, params, 12, jit=jit)
    got, state = trajectory(mine, params, 12, jit=jit)
    assert_same(got, want, bitwise=not jit, start=params)
    # The schedule matters: a constant decay of its first value differs.
    const, _ = trajectory(ours(weight_decay=2e-2, weight_decay_mask=mask), params, 12, jit=jit)
    assert not np.allclose(np.asarray(const[-1]["w"]), np.asarray(got[-1]["w"]))
    assert int(state.count) == 12


def test_weight_decay_schedule_follows_the_steps_taken_with_skip_nonfinite():
    """Skipped steps do not advance the schedule: as optax.apply_if_finite(optax.lars)."""
    params = real_tree()
    bad = {5, 6}

    def grads(p, t):
        g = grads_like(p, t)
        return {**g, "w": g["w"].at[0, 0].set(jnp.nan)} if t in bad else g

    theirs = optax.apply_if_finite(optax.lars(SCHEDULE, weight_decay=DECAY), 10)
    mine = ours(weight_decay=DECAY, skip_nonfinite=True)
    want, _ = trajectory(theirs, params, 12, jit=False, grads=grads)
    got, state = trajectory(mine, params, 12, jit=False, grads=grads)
    # Not bit for bit: apply_if_finite's own arithmetic is not optax.lars's
    # to the last bit (from the same inner state they differ by an ulp).
    assert_same(got, want, bitwise=False, start=params)
    assert int(state.count) == 10 and int(state.skipped) == 2


def test_a_weight_decay_schedule_recompiles_nothing():
    params = real_tree()
    for backend in ("reference", "auto"):
        opt = lars.lars(0.1, weight_decay=DECAY, backend=backend)
        update = jax.jit(opt.update)
        state = opt.init(params)
        for jit_step in (update, opt.update):
            _, state = jit_step(grads_like(params, 0), state, params)
            _, state = jit_step(grads_like(params, 1), state, params)
            with count_compiles() as compiled:
                for t in range(2, 6):
                    _, state = jit_step(grads_like(params, t), state, params)
            assert not compiled, (backend, compiled)
        assert update._cache_size() == 1


def test_native_refuses_a_weight_decay_schedule_and_auto_falls_back():
    """native compiles hyperparameters in: a schedule's values are refused,
    eagerly as under jit; "auto" (native on a CPU) runs the reference."""
    require("native")
    params, grads = real_tree(), grads_like(real_tree(), 0)
    opt = lars.lars(0.1, weight_decay=DECAY, backend="native")
    state = opt.init(params)
    for update in (opt.update, jax.jit(opt.update)):
        with pytest.raises(ValueError, match="weight_decay is given as a schedule"):
            update(grads, state, params)
    native = _dispatch.get("native")
    spec = StepSpec.build(
        LarsConfig(weight_decay=jnp.float32(0.01)),
        jax.tree.leaves(params),
        jax.tree.leaves(grads),
        decay_mask=[True] * 3,
        trust_mask=[True] * 3,
    )
    paths = ["['b']", "['s']", "['w']"]
    assert _dispatch.unsupported_reason(native, spec, paths) is None  # a constant: fine
    reason = _dispatch.unsupported_reason(native, spec, paths, runtime=("weight_decay",))
    assert "weight_decay" in reason
    auto = lars.lars(0.1, weight_decay=DECAY)
    ref = lars.lars(0.1, weight_decay=DECAY, backend="reference")
    assert auto.update.spec.backend is native  # "auto" picked native for constant steps
    got, _ = trajectory(auto, params, 4, jit=False)
    want, _ = trajectory(ref, params, 4, jit=False)
    assert_same(got, want, bitwise=True, start=params)


@pytest.mark.slow
def test_pallas_takes_a_weight_decay_schedule_as_data():
    require("pallas")
    params = real_tree()
    mine = lars.lars(SCHEDULE, weight_decay=DECAY, backend="pallas")
    ref = lars.lars(SCHEDULE, weight_decay=DECAY, backend="reference")
    got, state = trajectory(mine, params, 6, jit=True)
    want, _ = trajectory(ref, params, 6, jit=True)
    for a, b in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(want[-1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6)
    update = jax.jit(mine.update)
    _, state = update(grads_like(params, 0), mine.init(params), params)
    with count_compiles() as compiled:
        for t in range(1, 4):
            _, state = update(grads_like(params, t), state, params)
    assert not compiled and update._cache_size() == 1


@pytest.mark.parametrize(
    "weight_decay",
    [0.0, optax.constant_schedule(0.0), jnp.float32(0.0)],
    ids=["python_zero", "schedule_of_zeros", "array_zero"],
)
def test_a_zero_weight_decay_is_skipped_only_as_a_python_number_as_in_optax(weight_decay):
    """optax adds 0 * w (NaN for an infinite weight) unless the decay is a Python 0."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.asarray([jnp.inf, 1.0, -2.0])}
    mask = {"w": True, "b": False}
    theirs = optax.lars(0.1, weight_decay=weight_decay, trust_ratio_mask=mask)
    mine = ours(0.1, weight_decay=weight_decay, trust_ratio_mask=mask)
    want, _ = trajectory(theirs, params, 2, jit=False)
    got, _ = trajectory(mine, params, 2, jit=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isnan(got[-1]["b"][0]) == (not isinstance(weight_decay, float))


@pytest.mark.parametrize(
    "weight_decay, error, match",
    [
        (-1e-3, ValueError, "weight_decay must be >= 0"),
        ("0.1", TypeError, "weight_decay must be a real number"),
        (None, TypeError, "weight_decay must be a real number"),
        (
            lars.schedules.ConstantLR(base_lr=0.1, factor=1.0, total_iters=0),
            TypeError,
            "weight_decay is a scheduler object",
        ),
    ],
)
def test_bad_weight_decay_is_refused_at_construction(weight_decay, error, match):
    with pytest.raises(error, match=match):
        lars.lars(0.1, weight_decay=weight_decay)


def test_scheduler_objects_are_refused_as_learning_rate_even_when_callable():
    """braintools' schedulers are callable but return -lr (for optax.scale_by_schedule)."""
    braintools = pytest.importorskip("braintools")
    scheduler = braintools.optim.StepLR(base_lr=0.1, step_size=2)
    assert callable(scheduler) and float(scheduler(0)) == pytest.approx(-0.1)
    for lr in (scheduler, lars.schedules.ConstantLR(base_lr=0.1, factor=1.0, total_iters=0)):
        with pytest.raises(TypeError, match=r"learning_rate is a scheduler object.*lars\.Lars"):
            lars.lars(lr)


@pytest.mark.parametrize(
    "schedule, error, match",
    [
        (lambda count: jnp.full(3, 1e-3), TypeError, r"must return a real scalar.*shape \(3,\)"),
        (lambda count: jnp.asarray(1e-3 + 0j), TypeError, "must return a real scalar"),
        (
            lambda count: -1e-3 * (count + 1),
            ValueError,
            "value at step 0: weight_decay must be >= 0",
        ),
    ],
)
def test_a_bad_schedule_value_raises_and_changes_nothing(schedule, error, match):
    params, grads = real_tree(), grads_like(real_tree(), 0)
    opt = lars.lars(0.1, weight_decay=schedule, backend="reference")
    state = opt.init(params)
    before = jax.tree.map(np.array, (params, state))
    with pytest.raises(error, match=match):
        opt.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, state)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
