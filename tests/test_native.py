"""The native (XLA FFI) backend's step against the reference backend and a float64 oracle.

Every step is checked from the same state three ways: the native step
(``lars.kernels.native.run``), the pure-JAX reference step and the float64
NumPy oracle (``oracle.py``), so the tolerances are tight (no drift) and still
cover 10+ steps of every option. Also covered: the in-place form (bitwise
``optax.apply_updates``), mixed dtypes, float64, given trust ratios,
determinism (runs, thread counts, instruction sets), no recompilation when the
learning rate changes, and vmap. The custom call, the library and the
settings are tested in test_native_ffi.py; the public API on "native" in
test_native_api.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from native_cases import (
    CONFIGS,
    DECAY_MASK,
    NAMES,
    SHAPES,
    STEPS,
    TRUST_MASK,
    assert_bitwise,
    big_problem,
    config_of,
    lr_at,
    make_leaves,
    require_native,
    spec_of,
)

from lars import _reference
from lars.contract import LarsConfig, StepInputs, compute_dtype
from lars.kernels import native
from lars.kernels.native import ffi, library


@pytest.fixture(autouse=True)
def _require_native():
    require_native()


def oracle_config(cfg: LarsConfig, lr: float) -> oracle.OracleConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LarsConfig)}
    return oracle.OracleConfig(learning_rate=lr, **fields)


@jax.jit
def _apply_updates(params, updates):
    return optax.apply_updates(params, updates)


_reference_jit = jax.jit(
    _reference.reference_step, static_argnames=("config", "decay_mask", "trust_mask")
)


def spacing(dtype: Any, values: np.ndarray) -> float:
    """The spacing of ``dtype`` at the largest magnitude in ``values``."""
    mag = float(np.max(np.abs(values))) if values.size else 0.0
    info = jnp.finfo(dtype)
    return max(mag, float(info.tiny)) * float(info.eps)


@dataclasses.dataclass(frozen=True)
class Tol:
    """Per-step error allowed, relative to each quantity's scale in the leaf."""

    reference: float  # native vs the reference step
    oracle: float  # native vs the float64 oracle
    ratio: float


# float32 compute: the native and reference steps differ only in how the two
# norms are accumulated (float64 here, float32 there), i.e. by a few float32
# ulps of the ratio; the oracle differs by float32 rounding of each operation.
F32_TOL = Tol(reference=2e-6, oracle=4e-6, ratio=2e-6)
# Low-precision params: updates are rounded to 8 (bfloat16) or 11 (float16)
# significant bits, so one rounding step apart is allowed.
LOW_TOL = {
    jnp.bfloat16: Tol(reference=2**-7, oracle=2**-7, ratio=2e-6),
    jnp.float16: Tol(reference=2**-10, oracle=2**-10, ratio=2e-6),
}


def run_and_compare(
    cfg: LarsConfig,
    *,
    p_dtype=jnp.float32,
    g_dtype=jnp.float32,
    decay_mask=None,
    trust_mask=None,
    tol: Tol = F32_TOL,
    seed: int = 0,
) -> None:
    """Runs STEPS native steps; checks each against the reference and the oracle."""
    n = len(SHAPES)
    decay_mask = tuple([True] * n if decay_mask is None else decay_mask)
    trust_mask = tuple([True] * n if trust_mask is None else trust_mask)
    params64, grads64 = make_leaves(seed)
    params = [jnp.asarray(p, p_dtype) for p in params64]
    momentum = [jnp.zeros(p.shape, compute_dtype(p.dtype)) for p in params]
    for t in range(STEPS):
        grads = [jnp.asarray(g, g_dtype) for g in grads64[t]]
        lr = jnp.asarray(lr_at(t), jnp.float32)
        spec = spec_of(cfg, params, grads, decay_mask, trust_mask)
        got = native.run(spec, StepInputs(params, grads, momentum, lr))
        ref = _reference_jit(
            params, grads, momentum, lr, config=cfg, decay_mask=decay_mask, trust_mask=trust_mask
        )
        applied = native.run(
            spec.replace(write_params=True), StepInputs(params, grads, momentum, lr)
        )
        # The handler's own updates equal those the step derives from the momentum.
        written = ffi.custom_call(spec, ffi.WRITE_UPDATES, 0, lr, params, grads, momentum)
        assert_bitwise(written, [*got.updates, *got.momentum, jnp.stack(got.trust_ratio)])

        # The oracle's step from the same state, inputs as stored on device.
        state = oracle.OracleState(
            params=[np.asarray(p, np.float64) for p in params],
            momentum=[np.asarray(v, np.float64) for v in momentum],
            trust_ratio=[1.0] * n,
            count=0,
            momentum_scale=[0.0] * n,
        )
        want = oracle.step(
            state,
            [np.asarray(g, np.float64) for g in grads],
            oracle_config(cfg, float(lr)),
            decay_mask=decay_mask,
            trust_mask=trust_mask,
        )
        new_params = _apply_updates(params, got.updates)
        for i, name in enumerate(NAMES):
            where = f"step {t}, leaf {name}"
            u = np.asarray(got.updates[i], np.float64)
            u_ref = np.asarray(ref.updates[i], np.float64)
            u_want = want.params[i] - state.params[i]
            v = np.asarray(got.momentum[i], np.float64)
            v_ref = np.asarray(ref.momentum[i], np.float64)
            r = float(got.trust_ratio[i])
            assert got.updates[i].dtype == params[i].dtype, where
            assert got.momentum[i].dtype == momentum[i].dtype, where
            assert got.trust_ratio[i].dtype == jnp.float32 and got.trust_ratio[i].shape == ()
            assert np.all(np.isfinite(u)) and np.all(np.isfinite(v)), where
            # The in-place form is optax.apply_updates(params, updates), bit for bit.
            np.testing.assert_array_equal(
                np.asarray(applied.updates[i]), np.asarray(new_params[i]), err_msg=where
            )
            np.testing.assert_array_equal(
                np.asarray(applied.momentum[i]), np.asarray(got.momentum[i]), err_msg=where
            )
            assert float(applied.trust_ratio[i]) == r, where
            if u.size:
                # v_new = r*g + mu*v and the update lr * (v_new [+ mu*v_new]): errors
                # scale with the terms, which can cancel in the sums. (The jitted
                # reference may also fuse a multiply-add where native rounds twice.)
                v_new = float(np.max(np.abs(want.momentum[i])))
                v_scale = v_new + cfg.momentum * float(np.max(np.abs(state.momentum[i])))
                terms = v_scale + (cfg.momentum * v_new if cfg.nesterov else 0.0)
                u_scale = terms * (1.0 if cfg.lr_inside_momentum else float(lr))
                ulp = spacing(p_dtype, u_want)
                err_ref = float(np.max(np.abs(u - u_ref)))
                assert err_ref <= tol.reference * u_scale + ulp, (where, err_ref, u_scale)
                err = float(np.max(np.abs(u - u_want)))
                assert err <= tol.oracle * u_scale + ulp, (where, err, u_scale)
                v_err_ref = float(np.max(np.abs(v - v_ref)))
                assert v_err_ref <= 4e-6 * v_scale + 1e-30, (where, v_err_ref, v_scale)
                v_err = float(np.max(np.abs(v - want.momentum[i])))
                assert v_err <= 8e-6 * v_scale + 1e-30, (where, v_err, v_scale)
            assert abs(r - float(ref.trust_ratio[i])) <= tol.ratio * r, where
            assert abs(r - want.trust_ratio[i]) <= tol.ratio * want.trust_ratio[i], where
        params, momentum = new_params, got.momentum


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_option_matches_reference_and_oracle(name: str, masked: bool):
    run_and_compare(
        config_of(name),
        decay_mask=DECAY_MASK if masked else None,
        trust_mask=TRUST_MASK if masked else None,
    )


@pytest.mark.parametrize(
    "p_dtype, g_dtype",
    [
        (jnp.float32, jnp.bfloat16),
        (jnp.float32, jnp.float16),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float16),
    ],
    ids=["f32_bf16", "f32_f16", "bf16_bf16", "f16_f16"],
)
@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_mixed_dtypes(name: str, p_dtype, g_dtype):
    tol = LOW_TOL.get(p_dtype, F32_TOL)
    run_and_compare(config_of(name), p_dtype=p_dtype, g_dtype=g_dtype, tol=tol)


@pytest.mark.parametrize("g_dtype", [jnp.float64, jnp.bfloat16])
def test_float64_params(g_dtype):
    """float64 params (with jax_enable_x64) compute in float64 throughout."""
    with jax.enable_x64(True):
        cfg = config_of("everything")
        params64, grads64 = make_leaves(1)
        params = [jnp.asarray(p, jnp.float64) for p in params64]
        momentum = [jnp.zeros(p.shape, jnp.float64) for p in params]
        n = len(params)
        state = oracle.init(params64)
        for t in range(STEPS):
            grads = [jnp.asarray(g, g_dtype) for g in grads64[t]]
            lr = jnp.asarray(lr_at(t), jnp.float32)
            spec = spec_of(cfg, params, grads, write_params=True)
            got = native.run(spec, StepInputs(params, grads, momentum, lr))
            state = oracle.step(
                state, [np.asarray(g, np.float64) for g in grads], oracle_config(cfg, float(lr))
            )
            params, momentum = got.updates, got.momentum
            assert all(p.dtype == jnp.float64 for p in params)
            for i in range(n):
                np.testing.assert_allclose(
                    np.asarray(params[i]), state.params[i], rtol=1e-12, atol=1e-12
                )
                assert abs(float(got.trust_ratio[i]) - state.trust_ratio[i]) <= (
                    1e-6 * state.trust_ratio[i]
                )


def test_zero_and_empty_leaves_exact():
    """Zero norms give r = 1 exactly; an all-zero leaf stays exactly zero."""
    cfg = config_of("weight_decay")
    params64, grads64 = make_leaves(2)
    params = [jnp.asarray(p, jnp.float32) for p in params64]
    momentum = [jnp.zeros(p.shape, jnp.float32) for p in params]
    grads = [jnp.asarray(g, jnp.float32) for g in grads64[0]]
    got = native.run(
        spec_of(cfg, params, grads), StepInputs(params, grads, momentum, jnp.float32(0.5))
    )
    ratios = dict(zip(NAMES, [float(r) for r in got.trust_ratio], strict=True))
    for name in ("empty", "empty2", "dead", "zero_w"):
        assert ratios[name] == 1.0, name
    dead = NAMES.index("dead")
    np.testing.assert_array_equal(np.asarray(got.updates[dead]), np.zeros(6, np.float32))
    # The zero-weight leaf takes a full lr step: u = -lr * g.
    zw = NAMES.index("zero_w")
    np.testing.assert_array_equal(
        np.asarray(got.updates[zw]), np.asarray(-(jnp.float32(0.5) * grads[zw]))
    )
    # The zero-grad leaf moves by decay alone, with r = eta / decay.
    np.testing.assert_allclose(ratios["zero_g"], 0.02 / 0.05, rtol=1e-6)
    assert got.updates[NAMES.index("empty2")].shape == (2, 0, 3)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("write_params", [False, True])
def test_step_with_given_ratios_equals_step(nesterov: bool, write_params: bool):
    """Given the ratios the handler computes itself, the update half gives the same bits."""
    rng = np.random.default_rng(3)
    shapes = [(), (1,), (127,), (70_000,), (3, 3, 4, 8), (0,)]
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    momentum = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    config = LarsConfig(weight_decay=1e-3, nesterov=nesterov, trust_clip=0.5)
    masks = dict(decay_mask=[True, False] * 3, trust_mask=[True, True, False] * 2)
    spec = spec_of(config, params, grads, **masks, write_params=write_params)
    lr = jnp.float32(0.3)
    full = native.run(spec, StepInputs(params, grads, momentum, lr))
    ratios = jnp.stack(full.trust_ratio)
    half = native.run(
        spec.replace(given_ratios=True),
        StepInputs(params, grads, momentum, lr, ratios=ratios, global_norm=jnp.float32(0.0)),
    )
    for a, b in zip([*full.updates, *full.momentum], [*half.updates, *half.momentum], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ratios), np.asarray(jnp.stack(half.trust_ratio)))


@pytest.mark.parametrize("write_params", [False, True])
@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_finite_flag_false_moves_nothing(name: str, write_params: bool):
    """finite False: params (or -0.0 updates) and momentum as they were, ratios of 1;
    True: the step without the flag, bit for bit."""
    params, grads, momentum = big_problem()
    spec = spec_of(config_of(name), params, grads, write_params=write_params)
    lr = jnp.float32(0.1)
    plain = native.run(spec, StepInputs(params, grads, momentum, lr))
    flagged = spec.replace(skip_nonfinite=True)
    taken = native.run(flagged, StepInputs(params, grads, momentum, lr, finite=jnp.bool_(True)))
    assert_bitwise(taken, plain)
    skipped = native.run(flagged, StepInputs(params, grads, momentum, lr, finite=jnp.bool_(False)))
    for i, (p, v) in enumerate(zip(params, momentum, strict=True)):
        want = np.asarray(p) if write_params else np.full(p.shape, -0.0, np.float32)
        got = np.asarray(skipped.updates[i])
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(np.asarray(skipped.momentum[i]), np.asarray(v))
        assert float(skipped.trust_ratio[i]) == 1.0


# --------------------------------------------------------------------------
# Determinism.


def _native_threads(threads: int, params, grads, momentum, cfg: LarsConfig):
    spec = spec_of(cfg, params, grads, write_params=True, options=(("num_threads", threads),))
    return native.run(spec, StepInputs(params, grads, momentum, jnp.float32(0.1)))


@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_bitwise_deterministic_across_runs_and_threads(name: str):
    cfg = config_of(name)
    params, grads, momentum = big_problem()
    first = _native_threads(0, params, grads, momentum, cfg)
    assert_bitwise(first, _native_threads(0, params, grads, momentum, cfg))
    for threads in (1, 2, 3, 8):
        assert_bitwise(first, _native_threads(threads, params, grads, momentum, cfg))
        if jax.default_backend() == "cpu":
            assert native.last_step_threads()[0] == threads


@pytest.mark.parametrize("grads_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sum_streams", [1, 2, 4])
def test_bitwise_identical_across_instruction_sets(sum_streams: int, grads_dtype):
    """The base, AVX2 and AVX-512 loops give the same bits (fixed lanes, no FMA),
    with the norms' items read as 1, 2 (the default) or 4 parts (side by side
    with AVX-512, one after the other otherwise), float32 or bfloat16 grads."""
    cfg = config_of("everything")
    params, grads, momentum = big_problem()
    grads = [g.astype(grads_dtype) for g in grads]
    active = native.cpu_isa()
    results = {}
    tune = library.cpu().LarsNativeCpuTune
    assert tune(b"sum_streams", sum_streams) == 0
    try:
        for isa in ("base", "avx2", "avx512"):
            try:
                native.set_cpu_isa(isa)
            except ValueError:
                continue
            results[isa] = _native_threads(2, params, grads, momentum, cfg)
    finally:
        native.set_cpu_isa(active)
        assert tune(b"sum_streams", -1) == 0
    assert "base" in results
    for isa, result in results.items():
        if isa != "base":
            assert_bitwise(results["base"], result)


# --------------------------------------------------------------------------
# Compilation and transformations.


def test_changing_lr_does_not_recompile():
    params, grads, momentum = big_problem()
    spec = spec_of(config_of("everything"), params, grads)

    @jax.jit
    def step(params, momentum, grads, lr):
        return native.run(spec, StepInputs(params, grads, momentum, lr))

    momentum = [jnp.zeros_like(v) for v in momentum]
    outs = [step(params, momentum, grads, jnp.float32(lr)) for lr in (0.1, 0.2, 0.3)]
    assert step._cache_size() == 1
    # The learning rate reaches the handler: with lr inside the momentum (this
    # config) and zero momentum, v_new = lr * r * g, so it doubles with lr
    # (exactly: doubling is exact in binary floating point).
    np.testing.assert_array_equal(
        np.asarray(outs[1].momentum[0]), 2 * np.asarray(outs[0].momentum[0])
    )


def test_vmap_runs_each_problem():
    """Under vmap the call runs once per batch entry; same as the reference."""
    rng = np.random.default_rng(7)
    shapes = [(3, 5), (7,), ()]
    batch = 3
    params = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    momentum = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    spec = spec_of(config_of("everything"), [p[0] for p in params], [g[0] for g in grads])

    def run(fn):
        return jax.vmap(lambda p, g, v: fn(spec, StepInputs(p, g, v, jnp.float32(0.3))))(
            params, grads, momentum
        )

    got, want = run(native.run), run(_reference.run)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
