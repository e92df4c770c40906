"""The fused Triton kernel and whole steps in Triton's interpreter: run by test_triton.py.

Not collected by a plain ``pytest`` run, for the reason given in
``triton_interpret_cases.py`` (``TRITON_INTERPRET=1`` must be set before triton
is imported), whose backend, geometries and leaves this module shares:

* the fused one-pass kernel against its references, whatever the schedule,
  with items run in table order, a grid larger than the table, and bounded
  spin-waits that set the error word instead of hanging;
* ten steps of the backend's ``run`` against ``reference_step`` on odd shapes
  and mixed dtypes, and one step with a 65537-element leaf;
* the in-place form against ``optax.apply_updates``, errors for float64 leaves
  and for a jitted step that gives up a wait, and the public API on the
  interpreted kernels.

Every test here runs the interpreter: all are marked slow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from triton_interpret_cases import (
    BACKEND,
    BF16,
    F16,
    F32,
    FLAG_SETS,
    KERNEL_TUNING,
    SCALARS,
    SHAPES,
    TUNING,
    bits,
    make_leaves,
    options,
    plan_for,
)

import lars
from lars._config import LarsConfig
from lars._reference import reference_step
from lars.contract import Scalar, StepInputs, StepSpec
from lars.kernels.triton import interpret, reference
from lars.kernels.triton import plan as P
from lars.kernels.triton import step as S

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------
# The fused pass.


def ratio_reference(sums: np.ndarray, trust: bool, flags: P.Flags) -> np.float64:
    """The trust ratio from float64 sums, with SCALARS' coefficient, eps and clip."""
    tc, eps, clip = (
        float(SCALARS[k]) for k in (Scalar.TRUST_COEFFICIENT, Scalar.EPS, Scalar.TRUST_CLIP)
    )
    w_norm, u_norm = np.sqrt(sums)
    r = 1.0 if w_norm == 0 or u_norm == 0 else tc * w_norm / (u_norm + eps)
    if flags.trust_clip:
        r = min(r, clip)
    return r if trust else 1.0


def run_fused(flags, tuning, trust=None, seed=1):
    params, grads, momentum, decay = make_leaves(seed=seed)
    leaves = plan_for(params, grads, decay, flags, trust).leaves
    plan = P.StepPlan(leaves, flags, tuning)
    originals = [x.copy() for x in (*params, *momentum)]
    first, new_momentum, ratios = S.pass_fused(
        params, grads, momentum, SCALARS, plan=plan, launch=interpret.launch, xp=np
    )
    for x, y in zip((*params, *momentum), originals, strict=True):
        np.testing.assert_array_equal(x, y)  # aliased inputs were updated in copies
    return (params, grads, momentum, plan), (first, new_momentum, np.asarray(ratios, F32))


@pytest.mark.parametrize("flags_name", list(FLAG_SETS))
def test_fused_pass_matches_its_references(flags_name):
    """Ratios from the in-kernel reduction within float32 rounding of float64 sums;
    given those ratios, updates and momenta bit for bit as update_reference."""
    flags = FLAG_SETS[flags_name]
    trust = [i % 4 != 2 for i in range(len(SHAPES))]
    (params, grads, momentum, plan), (first, new_momentum, ratios) = run_fused(
        flags, KERNEL_TUNING, trust
    )
    decay = [leaf.decay for leaf in plan.leaves]
    sums = reference.sums_reference(params, grads, SCALARS, flags, decay)
    for i in range(len(SHAPES)):
        want = ratio_reference(sums[i], trust[i], flags)
        np.testing.assert_allclose(ratios[i], want, rtol=4e-6, err_msg=f"leaf {i}")
        if not trust[i]:
            assert ratios[i] == 1.0
    want_first, want_momentum = reference.update_reference(
        params, grads, momentum, ratios, SCALARS, flags, decay
    )
    for i in range(len(SHAPES)):
        assert first[i].dtype == params[i].dtype and first[i].shape == params[i].shape
        np.testing.assert_array_equal(bits(first[i]), bits(want_first[i]))
        np.testing.assert_array_equal(new_momentum[i].reshape(-1), want_momentum[i])


def test_fused_results_do_not_depend_on_the_schedule():
    """Bitwise the same whatever the lookahead and the slots per launch: the sums
    are added in chunk order, whichever program finished last."""
    flags = FLAG_SETS["all"]
    _, want = run_fused(flags, KERNEL_TUNING)
    for tuning in (
        dataclasses.replace(KERNEL_TUNING, lookahead=0),
        dataclasses.replace(KERNEL_TUNING, lookahead=1),
        dataclasses.replace(KERNEL_TUNING, lookahead=1000, slots=2),
        dataclasses.replace(KERNEL_TUNING, slots=9),
        dataclasses.replace(KERNEL_TUNING, pointer_table=True),
        dataclasses.replace(KERNEL_TUNING, pointer_table=True, slots=2, lookahead=1),
        dataclasses.replace(KERNEL_TUNING, pointer_table=True, spin_limit=3),
    ):
        _, got = run_fused(flags, tuning)
        for a, b in zip((*got[0], *got[1], got[2]), (*want[0], *want[1], want[2]), strict=True):
            np.testing.assert_array_equal(bits(a), bits(b))


def launch_fused(launch_, flags, tuning, leaves, table=None, grid=None) -> list:
    """One fused launch through the interpreter, its sync buffer zeroed: the
    given ``table`` (default the launch's own) over ``grid`` programs (default
    one per item); returns every output, the sync buffer last."""
    params, grads, momentum = leaves
    table = launch_.table if table is None else table
    spec = P.kernel_spec(launch_, flags)
    inputs, outputs, aliases = S.update_inputs(
        launch_, spec, params, grads, momentum, [table, SCALARS], False
    )
    outputs += S.fused_outputs(launch_, tuning)
    return interpret.launch(
        spec,
        inputs,
        outputs,
        aliases,
        launch_.num_programs if grid is None else grid,
        spec.constexprs(flags, tuning),
        zeroed=(len(outputs) - 1,),
    )


def test_fused_pass_items_run_in_table_order():
    """Every program claims the next row of the item table (the atomic counter),
    whatever its program id: after the launch the counter equals the number of
    items, and each leaf's arrivals and ready flag are set."""
    flags = FLAG_SETS["decay"]
    params, grads, momentum, decay = make_leaves()
    plan = plan_for(params, grads, decay, flags)
    plan = P.StepPlan(plan.leaves, flags, KERNEL_TUNING)
    launch_ = plan.launches(P.FUSED)[-1]
    ids = launch_.leaves
    sync = launch_fused(launch_, flags, KERNEL_TUNING, (params, grads, momentum))[-1]
    assert sync[0] == launch_.num_programs
    for j, i in enumerate(ids):
        chunks = -(-plan.leaves[i].size // KERNEL_TUNING.chunk)
        many = chunks > 1
        assert (sync[1 + 2 * j], sync[2 + 2 * j]) == ((chunks, 1) if many else (0, 0))


def test_a_grid_larger_than_the_table_is_harmless():
    """A fused launch of one program more than its items: the extra program
    claims a row past the table's item count (``COL_ITEMS``) and exits. The
    table passed has one row more, a copy of an item that updates a chunk
    (run, it would update the chunk twice); the results are bitwise those of
    the exact grid."""
    flags = FLAG_SETS["decay"]
    params, grads, momentum, decay = make_leaves()
    plan = plan_for(params, grads, decay, flags)
    launch_ = plan.launches(P.FUSED)[-1]
    assert (launch_.table[:, P.COL_ITEMS] == launch_.num_programs).all()
    leaves = (params, grads, momentum)
    want = launch_fused(launch_, flags, KERNEL_TUNING, leaves)
    extra = launch_.table[launch_.table[:, P.COL_KIND] != P.KIND_SUMS][-1:]
    longer = np.concatenate([launch_.table, extra])
    got = launch_fused(
        launch_, flags, KERNEL_TUNING, leaves, table=longer, grid=launch_.num_programs + 1
    )
    assert got[-1][P.SYNC_COUNTER] == launch_.num_programs + 1
    got[-1][P.SYNC_COUNTER] -= 1  # the sync buffer's other words: as with the exact grid
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


def without_sums_of_one_leaf(table: np.ndarray) -> tuple[np.ndarray, int]:
    """``table`` without the sums items of its first multi-chunk leaf (whose
    ratio then never arrives); and that leaf's slot."""
    sums = table[:, P.COL_KIND] == P.KIND_SUMS
    if not sums.any():
        return table, -1
    slot = int(table[sums][0, P.COL_SLOT])
    kept = table[~(sums & (table[:, P.COL_SLOT] == slot))].copy()
    kept[:, P.COL_ITEMS] = len(kept)
    return kept, slot


def test_the_pointer_table_holds_every_argument_once_the_launch_ends():
    """``pointer_table``: item 0's program writes the address of every pointer
    argument (role by role, slot by slot, low word then high) and sets the
    table's flag; the addresses are those of distinct, non-empty buffers."""
    flags = FLAG_SETS["decay"]
    params, grads, momentum, decay = make_leaves()
    tuning = dataclasses.replace(KERNEL_TUNING, pointer_table=True)
    plan = P.StepPlan(plan_for(params, grads, decay, flags).leaves, flags, tuning)
    launch_ = plan.launches(P.FUSED)[0]
    k = len(launch_.leaves)
    sync = launch_fused(launch_, flags, tuning, (params, grads, momentum))[-1]
    assert len(sync) == P.sync_words(k, tuning)
    flag = 1 + 2 * k  # after the item counter and the per-slot words (no spin limit)
    assert sync[flag] == 1
    words = sync[flag + 1 :].astype(np.int64) & 0xFFFFFFFF
    addresses = words[0::2] | (words[1::2] << 32)
    assert len(addresses) == P.FUSED_ROLES * k
    assert (addresses != 0).all()
    # w, g and v of each slot are distinct inputs; out and v_out distinct outputs.
    assert len(set(addresses[: 3 * k].tolist())) == 3 * k
    assert len(set(addresses[3 * k :].tolist())) == 2 * k


def test_with_a_spin_limit_a_ratio_that_never_arrives_sets_the_error_word():
    """Debug switch (``spin_limit``): an update item whose leaf's sums never
    arrive gives up after the limit, sets the error word and writes NaN for its
    chunk; the launch returns and every other leaf is updated as usual."""
    flags = FLAG_SETS["decay"]
    params, grads, momentum, decay = make_leaves()
    tuning = dataclasses.replace(KERNEL_TUNING, spin_limit=5)
    plan = P.StepPlan(plan_for(params, grads, decay, flags).leaves, flags, tuning)
    launch_ = next(x for x in plan.launches(P.FUSED) if (x.table[:, P.COL_KIND] == 0).any())
    table, stuck = without_sums_of_one_leaf(launch_.table)
    launch_ = dataclasses.replace(launch_, table=table)
    results = launch_fused(launch_, flags, tuning, (params, grads, momentum))
    sync = results[-1]
    assert sync[P.SYNC_COUNTER] == launch_.num_programs
    assert sync[P.SYNC_ERROR] == P.ERROR_SPIN
    k = len(launch_.leaves)
    assert np.isnan(results[stuck]).all() and np.isnan(results[k + stuck]).all()
    for j in range(k):
        if j != stuck:
            assert np.isfinite(results[j]).all() and np.isfinite(results[k + j]).all()
    with pytest.raises(RuntimeError, match="spin_limit"):
        S._raise_on_spin_error(sync[P.SYNC_ERROR])


def test_a_spin_limit_changes_no_result_of_a_sound_table(monkeypatch):
    """The same bits with and without the spin limit, the error word clear; and
    with the sums of a leaf taken out of the table the pass raises, naming it."""
    flags = FLAG_SETS["all"]
    _, want = run_fused(flags, KERNEL_TUNING)
    _, got = run_fused(flags, dataclasses.replace(KERNEL_TUNING, spin_limit=3))
    for a, b in zip((*got[0], *got[1], got[2]), (*want[0], *want[1], want[2]), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))
    make_table = P.make_fused_table
    monkeypatch.setattr(
        P,
        "make_fused_table",
        lambda *a: (without_sums_of_one_leaf(make_table(*a)[0])[0], make_table(*a)[1]),
    )
    with pytest.raises(RuntimeError, match="gave up"):
        run_fused(flags, dataclasses.replace(KERNEL_TUNING, spin_limit=3))


# --------------------------------------------------------------------------
# Whole steps against reference_step.

STEP_SHAPES = [(), (1,), (127,), (3, 3, 4, 8), (0,), (4097,), (33,), (0, 5), (5, 3), (6,)]
# Zero weights (r = 1 on the first step), zero gradients, both (must stay 0).
ZERO_W, ZERO_G, DEAD = 6, 8, 9


def make_step_problem(dtypes, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = []
    for i, (shape, (p, _)) in enumerate(zip(STEP_SHAPES, dtypes, strict=True)):
        w = np.zeros(shape) if i in (ZERO_W, DEAD) else rng.standard_normal(shape)
        params.append(jnp.asarray(w, p))
    grads = [
        [
            jnp.asarray(np.zeros(s) if i in (ZERO_G, DEAD) else 0.1 * rng.standard_normal(s), g)
            for i, (s, (_, g)) in enumerate(zip(STEP_SHAPES, dtypes, strict=True))
        ]
        for _ in range(steps)
    ]
    return params, grads


STEP_CONFIGS = {
    "defaults": LarsConfig(trust_coefficient=0.02),
    "everything": LarsConfig(
        momentum=0.8,
        weight_decay=0.05,
        trust_coefficient=0.02,
        eps=1e-3,
        nesterov=True,
        trust_clip=0.1,
        grad_clip_norm=1.0,
        grad_clip_value=0.03,
        lr_inside_momentum=True,
    ),
}
MIXED = [(F32, F32), (BF16, BF16), (F32, BF16), (F16, F16), (F32, F32)] * 2


def step_spec(config, params, grads, decay, trust, **fields) -> StepSpec:
    """The StepSpec of a step on these leaves."""
    return StepSpec.build(config, params, grads, decay_mask=decay, trust_mask=trust, **fields)


FORMS = {
    "fused": dict(fused=True),
    "two_pass": dict(fused=False),
    "fused_pointer_table": dict(fused=True, pointer_table=True),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("config_name", list(STEP_CONFIGS))
def test_ten_steps_match_reference_step(config_name, form):
    """Ten jitted steps on mixed dtype groups, each against reference_step's step."""
    config = STEP_CONFIGS[config_name]
    params, grads = make_step_problem(MIXED, steps=10)
    decay = [i % 3 != 0 for i in range(len(STEP_SHAPES))]
    trust = [i % 4 != 1 for i in range(len(STEP_SHAPES))]
    kw = dict(config=config, decay_mask=decay, trust_mask=trust)
    opts = options(**TUNING, **FORMS[form])
    spec = step_spec(config, params, grads[0], decay, trust, options=opts)
    ours = jax.jit(lambda *arrays: interpret.BACKEND.run(spec, StepInputs(*arrays)))
    ref = jax.jit(functools.partial(reference_step, **kw))
    momentum = [jnp.zeros(np.shape(p), jnp.float32) for p in params]
    for t, g in enumerate(grads):
        lr = jnp.float32(0.5 / (1 + t))  # a new lr every step: data, not a constant
        got, want = ours(params, g, momentum, lr), ref(params, g, momentum, lr)
        for i in range(len(STEP_SHAPES)):
            p_dtype = params[i].dtype
            tol = (
                dict(rtol=2e-5, atol=1e-7) if p_dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-3)
            )
            assert got.updates[i].dtype == p_dtype and got.updates[i].shape == params[i].shape
            np.testing.assert_allclose(
                np.asarray(got.updates[i], F32), np.asarray(want.updates[i], F32), **tol
            )
            np.testing.assert_allclose(got.momentum[i], want.momentum[i], rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(got.trust_ratio[i], want.trust_ratio[i], rtol=2e-5)
        assert float(got.trust_ratio[DEAD]) == float(want.trust_ratio[DEAD])
        np.testing.assert_array_equal(np.asarray(got.updates[DEAD], F32), 0.0)
        # Continue both from the reference's state (the comparison is per step).
        params = [optax.apply_updates(p, u) for p, u in zip(params, want.updates, strict=True)]
        momentum = want.momentum


def test_a_jitted_step_that_gives_up_a_wait_raises(monkeypatch):
    """With ``spin_limit`` the jitted step returns and raises (the error word read
    back on the host) when a leaf's sums never arrive, instead of hanging; with
    a sound table the same step runs."""
    config = STEP_CONFIGS["defaults"]
    params, grads = make_step_problem(MIXED, steps=1)
    n = len(STEP_SHAPES)
    momentum = [jnp.zeros(np.shape(p), jnp.float32) for p in params]
    args = (params, grads[0], momentum, jnp.float32(0.1))

    def step(spin_limit):  # a new plan (a new trace) for each limit
        opts = options(**TUNING, spin_limit=spin_limit)
        spec = step_spec(config, params, grads[0], [True] * n, [True] * n, options=opts)
        run = jax.jit(lambda *arrays: interpret.BACKEND.run(spec, StepInputs(*arrays)))
        return jax.block_until_ready(run(*args))

    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in step(4).updates)
    make_table = P.make_fused_table
    monkeypatch.setattr(
        P,
        "make_fused_table",
        lambda *a: (without_sums_of_one_leaf(make_table(*a)[0])[0], make_table(*a)[1]),
    )
    with pytest.raises(Exception, match="gave up"):
        step(3)


def test_one_step_on_a_65537_element_leaf():
    """One step with the default launch geometry (the one a GPU runs)."""
    rng = np.random.default_rng(4)
    shapes = [(65537,), (3, 3, 16, 32), (1,)]
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for s in shapes]
    momentum = [jnp.asarray(0.01 * rng.standard_normal(s), jnp.float32) for s in shapes]
    kw = dict(config=STEP_CONFIGS["everything"], decay_mask=[True] * 3, trust_mask=[True] * 3)
    lr = jnp.float32(0.4)
    spec = step_spec(kw["config"], params, grads, [True] * 3, [True] * 3)
    got = interpret.BACKEND.run(spec, StepInputs(params, grads, momentum, lr))
    want = reference_step(params, grads, momentum, lr, **kw)
    for a, b in zip((*got.updates, *got.momentum), (*want.updates, *want.momentum), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got.trust_ratio, want.trust_ratio, rtol=2e-5)


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_apply_form_is_optax_apply_updates(dtype):
    """spec.write_params writes params + updates, rounded as optax.apply_updates rounds them."""
    params, grads = make_step_problem([(dtype, dtype)] * len(STEP_SHAPES), steps=1, seed=7)
    momentum = [jnp.full(np.shape(p), 0.01, jnp.float32) for p in params]
    masks = [True] * len(STEP_SHAPES)
    spec = step_spec(
        STEP_CONFIGS["everything"], params, grads[0], masks, masks, options=options(**TUNING)
    )
    lr = jnp.float32(0.3)
    step = interpret.BACKEND.run(spec, StepInputs(params, grads[0], momentum, lr))
    applied = interpret.BACKEND.run(
        spec.replace(write_params=True), StepInputs(params, grads[0], momentum, lr)
    )
    for i, p in enumerate(params):
        want = optax.apply_updates(p, step.updates[i])
        assert applied.updates[i].dtype == p.dtype
        np.testing.assert_array_equal(bits(applied.updates[i]), bits(want))
        np.testing.assert_array_equal(applied.momentum[i], step.momentum[i])


def test_float64_leaf_is_refused_by_name():
    """The backend computes float32 only: the front end refuses a float64 leaf by its path."""
    opt = lars.lars(0.1, backend=BACKEND, backend_options=TUNING)
    with jax.enable_x64(True):
        params = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}
        with pytest.raises(TypeError, match=r"float64 gradients \(the leaf at \['b'\]\)"):
            opt.update(params, opt.init(params), params)


def test_public_api_runs_the_interpreted_kernels(monkeypatch):
    """lars.lars(backend=...) reaches the interpreted kernels (the suite above is theirs)."""
    launches = []
    original = interpret.launch

    def counting(spec, *args, **kwargs):
        launches.append(spec.kind)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(interpret, "launch", counting)
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    opt = lars.lars(0.1, backend=BACKEND)
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    jax.block_until_ready(updates)
    assert launches == [P.FUSED]
