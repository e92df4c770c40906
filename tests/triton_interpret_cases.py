"""The Triton kernels run in Triton's interpreter: run by test_triton.py in a subprocess.

Not collected by a plain ``pytest`` run (the name does not match
``test_*.py``): ``TRITON_INTERPRET=1`` has to be in the environment before
triton is first imported, so test_triton.py starts
``python -m pytest tests/triton_interpret_cases.py`` with it set.

What runs here is the kernel code of lars.kernels.triton, interpreted on NumPy
arrays by ``lars.kernels.triton.interpret`` with the launch plan the GPU
launcher uses:

* the shared backend suite (``backend_base.BackendTests``) through ``lars.lars``
  and ``lars.Lars`` against the float64 oracle, on the "triton_interpret"
  backend, registered in this process only;
* each pass against its NumPy reference (the update pass bit for bit), on
  mixed dtype groups split over several launches;
* ten steps of the backend's ``run`` against ``reference_step`` on odd shapes
  and mixed dtypes, and one step with a 65537-element leaf;
* NaN propagation, the in-place form against ``optax.apply_updates``, and
  errors for float64 leaves.

Every test here runs the interpreter: all are marked slow.
"""

from __future__ import annotations

import dataclasses
import functools
import os

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - a misuse, not a test
    raise RuntimeError("run with TRITON_INTERPRET=1 in the environment (test_triton.py does)")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from backend_base import ALL_OPTIONS, CASES_BY_NAME, INTERPRETED_CASES, BackendTests

import lars
from lars import _dispatch
from lars._config import LarsConfig
from lars._reference import reference_step
from lars.contract import NUM_SCALARS, LeafSpec, Scalar, StepInputs, StepSpec
from lars.kernels.triton import entry, interpret, kernels, reference
from lars.kernels.triton import plan as P
from lars.kernels.triton import step as S

pytestmark = pytest.mark.slow

# Small launch geometries: the test trees span several launches per pass (4
# leaves each) and several chunks per leaf. The interpreter's time grows with
# programs x vector steps, not with elements: the suite and the step tests run
# one vector step per chunk, the kernel-level tests four (and the 65537-element
# test the default geometry).
TUNING = {"slots": 4, "chunk": 2048, "block": 2048}
KERNEL_TUNING = P.Tuning(slots=4, chunk=1024, block=256)
BACKEND = "triton_interpret"

_dispatch.register(BACKEND, "lars.kernels.triton.interpret")

F32, BF16, F16 = np.float32, ml_dtypes.bfloat16, np.float16


def options(**tuning) -> tuple:
    """``StepSpec.options`` for these backend options, normalised as the front end does."""
    return tuple(sorted(interpret.BACKEND.options(tuning).items()))


def test_kernels_are_interpreted():
    """The kernels really run in Triton's interpreter here (not compiled, not skipped)."""
    spec = P.KernelSpec(P.SUMS, 2, True)
    assert kernels.INTERPRETED
    assert type(entry.get_kernel(spec)).__name__ == "InterpretedFunction"
    assert _dispatch.get(BACKEND) is interpret.BACKEND
    assert interpret.BACKEND.unavailable(jax.default_backend()) is None
    assert BACKEND in lars.available_backends()


# --------------------------------------------------------------------------
# The shared suite, through the public API.

SUITE_CASES = INTERPRETED_CASES


class TestTritonInterpreted(BackendTests):
    backend = BACKEND
    backend_options = TUNING
    # The largest leaf spans several chunks of TUNING; the interpreter's cost
    # grows with the number of programs, so it is smaller than the suite's
    # 65537 (which has its own one-step test below).
    big = 5000
    mid = 1500

    @pytest.mark.parametrize("name", SUITE_CASES)
    def test_transform_matches_oracle(self, name):
        super().test_transform_matches_oracle(CASES_BY_NAME[name])

    @pytest.mark.parametrize("dtype_case", ["bf16_grads", "bf16_params"])
    @pytest.mark.parametrize("name", ["everything"])
    def test_low_precision_matches_oracle(self, name, dtype_case):
        super().test_low_precision_matches_oracle(name, dtype_case)


# --------------------------------------------------------------------------
# The passes against their NumPy references.

FLAGS_ALL = ALL_OPTIONS
FLAG_SETS = {
    "plain": P.Flags(),
    "decay": P.Flags(has_decay=True),
    "all": FLAGS_ALL,
    "all_write_params": dataclasses.replace(FLAGS_ALL, write_params=True),
    "decay_write_params": P.Flags(has_decay=True, write_params=True),
}
# lr, momentum, weight decay, clip divisor (||g||), clip factor (max norm), clip value,
# trust coefficient, eps, trust clip (read by the fused pass), padding.
SCALARS = np.array([0.3, 0.9, 0.05, 4.0, 1.5, 0.4, 0.02, 1e-3, 0.7], np.float32)
SCALARS = np.concatenate([SCALARS, np.zeros(NUM_SCALARS - len(SCALARS), np.float32)])
# Odd sizes, several chunks of KERNEL_TUNING, a 0-d leaf, five dtype groups:
# 9 leaves in 5 launches per pass.
SHAPES = [(), (1,), (127,), (1024,), (2500,), (3, 3, 4, 8), (257,), (6, 7), (1025,)]
DTYPES = [
    (F32, F32),
    (F32, F32),
    (BF16, BF16),
    (F32, F32),
    (F32, BF16),
    (F16, F16),
    (F32, F16),
    (BF16, BF16),
    (F32, F32),
]


def make_leaves(seed: int = 0):
    """Leaves of SHAPES and DTYPES: params, grads, float32 momenta, per-leaf decay."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(p) for s, (p, _) in zip(SHAPES, DTYPES, strict=True)]
    grads = [
        (0.5 * rng.standard_normal(s)).astype(g) for s, (_, g) in zip(SHAPES, DTYPES, strict=True)
    ]
    momentum = [(0.1 * rng.standard_normal(s)).astype(F32) for s in SHAPES]
    decay = [i % 2 == 0 for i in range(len(SHAPES))]
    return params, grads, momentum, decay


def plan_for(params, grads, decay, flags, trust=None) -> P.StepPlan:
    leaves = tuple(
        LeafSpec(
            shape=np.shape(p),
            param_dtype=np.dtype(p.dtype),
            grad_dtype=np.dtype(g.dtype),
            momentum_dtype=np.dtype(F32),
            decay=decay[i] and flags.has_decay,
            trust=True if trust is None else trust[i],
        )
        for i, (p, g) in enumerate(zip(params, grads, strict=True))
    )
    return P.StepPlan(leaves, flags, KERNEL_TUNING)


RUN = dict(launch=interpret.launch, xp=np)


def bits(x) -> np.ndarray:
    """The bytes of an array (bitwise comparison, also of NaN and -0.0)."""
    return np.asarray(x).reshape(-1).view(np.uint8)


@pytest.mark.parametrize("flags_name", ["plain", "all"])
def test_sums_pass_matches_reference(flags_name):
    """Per-leaf float32 sums from chunked partials agree with float64 sums of the same terms."""
    flags = FLAG_SETS[flags_name]
    params, grads, _, decay = make_leaves()
    plan = plan_for(params, grads, decay, flags)
    # 5 dtype groups, the float32 one of 4 leaves; leaves of up to 3 chunks.
    assert len(plan.launches(P.SUMS)) == 5
    got = S.pass_sums(P.SUMS, params, grads, SCALARS, plan=plan, **RUN)
    want = reference.sums_reference(
        params, grads, SCALARS, flags, [leaf.decay for leaf in plan.leaves]
    )
    assert got.dtype == np.float32 and got.shape == (len(SHAPES), 2)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)

    got = S.pass_sums(P.GLOBAL_NORM, params, grads, SCALARS, plan=plan, **RUN)
    want = reference.sums_reference(None, grads, SCALARS, flags, [False] * len(SHAPES))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)


def test_sums_pass_skips_leaves_without_trust_ratio():
    params, grads, _, decay = make_leaves()
    trust = [i % 3 != 1 for i in range(len(SHAPES))]
    plan = plan_for(params, grads, decay, FLAG_SETS["plain"], trust)
    got = S.pass_sums(P.SUMS, params, grads, SCALARS, plan=plan, **RUN)
    want = reference.sums_reference(params, grads, SCALARS, plan.flags, [False] * len(SHAPES))
    for i, t in enumerate(trust):
        if t:
            np.testing.assert_allclose(got[i], want[i], rtol=2e-6)
        else:
            np.testing.assert_array_equal(got[i], [0.0, 0.0])


@pytest.mark.parametrize("flags_name", list(FLAG_SETS))
def test_update_pass_is_bitwise_its_reference(flags_name):
    """The update pass computes what update_reference computes, bit for bit.

    Same operations in the same order in float32 (no fused multiply-add in
    either), so every update, new param and new momentum is identical.
    """
    flags = FLAG_SETS[flags_name]
    params, grads, momentum, decay = make_leaves(seed=1)
    plan = plan_for(params, grads, decay, flags)
    ratios = np.random.default_rng(2).uniform(0.05, 1.0, len(SHAPES)).astype(F32)
    originals = [x.copy() for x in (*params, *momentum)]
    first, new_momentum = S.pass_update(params, grads, momentum, ratios, SCALARS, plan=plan, **RUN)
    want_first, want_momentum = reference.update_reference(
        params, grads, momentum, ratios, SCALARS, flags, [leaf.decay for leaf in plan.leaves]
    )
    for i in range(len(SHAPES)):
        assert first[i].dtype == params[i].dtype and first[i].shape == params[i].shape
        assert new_momentum[i].dtype == F32 and new_momentum[i].shape == SHAPES[i]
        np.testing.assert_array_equal(bits(first[i]), bits(want_first[i]))
        np.testing.assert_array_equal(new_momentum[i].reshape(-1), want_momentum[i])
    # The aliased inputs were updated in copies: the caller's arrays are unchanged.
    for x, y in zip((*params, *momentum), originals, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fused", [False, True])
def test_zero_step_is_minus_zero(fused):
    """A leaf with zero gradient and momentum takes a step of -0.0, as the
    reference's -step (a negation written 0 - x would give +0.0)."""
    params, grads, momentum, decay = make_leaves(seed=4)
    for i in (3, 7):  # float32 and bfloat16 leaves: zero step, undecayed
        grads[i] = np.zeros_like(grads[i])
        momentum[i] = np.zeros_like(momentum[i])
        decay[i] = False
    flags = FLAG_SETS["plain"]
    plan = plan_for(params, grads, decay, flags)
    ratios = np.full(len(SHAPES), 0.5, F32)
    if fused:
        first = S.pass_fused(params, grads, momentum, SCALARS, plan=plan, **RUN)[0]
    else:
        first = S.pass_update(params, grads, momentum, ratios, SCALARS, plan=plan, **RUN)[0]
    for i in (3, 7):
        assert np.all(np.signbit(first[i].astype(F32))) and not np.any(first[i]), i


def test_update_pass_differs_when_an_option_changes():
    """The comparison above can fail: each option changes the kernel's output."""
    params, grads, momentum, decay = make_leaves(seed=1)
    ratios = np.full(len(SHAPES), 0.5, F32)
    base = dataclasses.replace(FLAGS_ALL, write_params=False)
    want, _ = S.pass_update(
        params, grads, momentum, ratios, SCALARS, plan=plan_for(params, grads, decay, base), **RUN
    )
    for field in ("clip_norm", "clip_value", "has_decay", "nesterov", "lr_inside_momentum"):
        flags = dataclasses.replace(base, **{field: False})
        got, _ = S.pass_update(
            params,
            grads,
            momentum,
            ratios,
            SCALARS,
            plan=plan_for(params, grads, decay, flags),
            **RUN,
        )
        assert any(
            not np.array_equal(a.astype(F32), b.astype(F32)) for a, b in zip(got, want, strict=True)
        ), field


def test_nan_gradients_propagate():
    """NaN in a gradient reaches the update and momentum, also through value clipping."""
    params, grads, momentum, decay = make_leaves()
    grads[4] = grads[4].copy()
    grads[4][17] = np.nan
    flags = FLAG_SETS["all"]
    plan = plan_for(params, grads, decay, flags)
    ratios = np.full(len(SHAPES), 0.5, F32)
    first, new_momentum = S.pass_update(params, grads, momentum, ratios, SCALARS, plan=plan, **RUN)
    assert np.isnan(first[4][17]) and np.isnan(new_momentum[4][17])
    assert np.isfinite(np.delete(first[4].astype(F32), 17)).all()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("write_params", [False, True])
def test_skipped_step_leaves_everything_in_place(write_params, fused):
    """With skip_nonfinite and FINITE = 0 (NaN and Inf in the gradients) both
    forms write back the params (or updates of -0.0) and the momenta, bit for
    bit; with FINITE = 1 they write what the kernel without the flag writes."""
    params, grads, momentum, decay = make_leaves(seed=3)
    bad = [g.copy() for g in grads]
    bad[4][17] = np.nan
    bad[2][:] = np.inf
    base = dataclasses.replace(FLAGS_ALL, write_params=write_params)
    ratios = np.full(len(SHAPES), 0.5, F32)

    def run(flags, finite, g):
        scalars = SCALARS.copy()
        scalars[Scalar.FINITE] = finite
        plan = plan_for(params, g, decay, flags)
        if fused:
            return S.pass_fused(params, g, momentum, scalars, plan=plan, **RUN)[:2]
        return S.pass_update(params, g, momentum, ratios, scalars, plan=plan, **RUN)

    skipping = dataclasses.replace(base, skip_nonfinite=True)
    first, new_momentum = run(skipping, 0.0, bad)
    for i, p in enumerate(params):
        keep = p if write_params else np.full(np.shape(p), -0.0, p.dtype)
        assert first[i].dtype == p.dtype
        np.testing.assert_array_equal(bits(first[i]), bits(keep))
        np.testing.assert_array_equal(bits(new_momentum[i]), bits(momentum[i]))
    taken, plain = run(skipping, 1.0, grads), run(base, 0.0, grads)
    for a, b in zip((*taken[0], *taken[1]), (*plain[0], *plain[1]), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_public_step_skips_nonfinite_in_the_kernels(monkeypatch):
    """lars.lars(skip_nonfinite=True).apply_gradients, params and state donated:
    the kernels get the flag (no copies in XLA) and a NaN step changes nothing."""
    seen = []
    original = interpret.launch

    def recording(spec, inputs, outputs, aliases, grid, constexprs, zeroed=()):
        # The kernel reads the flag (a constexpr) and the FINITE scalar.
        seen.append((constexprs["SKIP_NONFINITE"], float(inputs[1][Scalar.FINITE])))
        return original(spec, inputs, outputs, aliases, grid, constexprs, zeroed)

    monkeypatch.setattr(interpret, "launch", recording)
    opt = lars.lars(0.1, weight_decay=1e-3, skip_nonfinite=True, backend=BACKEND)
    step = jax.jit(opt.apply_gradients, donate_argnums=(0, 1))
    params = {"w": jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3), jnp.float32)}
    params, state = step(params, opt.init(params), {"w": jnp.ones((4, 3))})
    before = jax.tree.map(np.array, (params, state.momentum))
    params, state = step(params, state, {"w": jnp.full((4, 3), jnp.nan)})
    for a, b in zip(
        jax.tree.leaves((params, state.momentum)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert int(state.skipped) == 1 and seen == [(True, 1.0), (True, 0.0)]


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


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("config_name", list(STEP_CONFIGS))
def test_ten_steps_match_reference_step(config_name, fused):
    """Ten jitted steps on mixed dtype groups, each against reference_step's step."""
    config = STEP_CONFIGS[config_name]
    params, grads = make_step_problem(MIXED, steps=10)
    decay = [i % 3 != 0 for i in range(len(STEP_SHAPES))]
    trust = [i % 4 != 1 for i in range(len(STEP_SHAPES))]
    kw = dict(config=config, decay_mask=decay, trust_mask=trust)
    spec = step_spec(config, params, grads[0], decay, trust, options=options(**TUNING, fused=fused))
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
