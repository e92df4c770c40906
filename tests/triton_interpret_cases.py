"""The Triton kernels run in Triton's interpreter: run by test_triton.py in a subprocess.

Not collected by a plain ``pytest`` run (the name does not match
``test_*.py``): ``TRITON_INTERPRET=1`` has to be in the environment before
triton is first imported, so test_triton.py starts
``python -m pytest triton_interpret_cases.py triton_interpret_steps.py`` with
it set.

What runs here is the kernel code of lars.kernels.triton, interpreted on NumPy
arrays by ``lars.kernels.triton.interpret`` with the launch plan the GPU
launcher uses:

* the shared backend suite (``backend_base.BackendTests``) through ``lars.lars``
  and ``lars.Lars`` against the float64 oracle, on the "triton_interpret"
  backend, registered in this process only;
* each pass of the two-pass form against its NumPy reference (the update
  pass bit for bit), on mixed dtype groups split over several launches;
* NaN propagation and skipped non-finite steps in the kernels.

The fused kernel and whole steps are in ``triton_interpret_steps.py``, which
shares this module's backend, geometries and leaves.

Every test here runs the interpreter: all are marked slow.
"""

from __future__ import annotations

import dataclasses
import os

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - a misuse, not a test
    raise RuntimeError("run with TRITON_INTERPRET=1 in the environment (test_triton.py does)")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from backend_base import BackendTests
from backend_cases import ALL_OPTIONS, CASES_BY_NAME, INTERPRETED_CASES

import lars
from lars import _dispatch
from lars.contract import NUM_SCALARS, LeafSpec, Scalar
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
