"""The native (XLA FFI) backend against the reference backend and a float64 oracle.

Every step is checked from the same state three ways: the native handler, the
pure-JAX reference step and the float64 NumPy oracle (``oracle.py``), so the
tolerances are tight (no drift) and still cover 10+ steps of every option.
Also covered: the in-place form (bitwise ``optax.apply_updates``), mixed
dtypes, determinism (runs, thread counts, instruction sets), memory (in place,
no temporaries), no recompilation when the learning rate changes, vmap, and bad
input.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest

import lars
from lars._config import LarsConfig
from lars._reference import compute_dtype, reference_step
from lars.kernels import native


@pytest.fixture(autouse=True)
def _require_native():
    reason = native.unavailable()
    if reason is not None:
        pytest.fail(f"the native backend is unavailable: {reason}")


# Odd shapes: 0-d, tiny, odd, just over a SIMD width, just over one chunk
# (65,536 elements), a conv kernel, empty leaves, zero-weight / zero-grad /
# all-zero leaves, and consecutive multi-chunk leaves.
SHAPES = {
    "scalar": (),
    "one": (1,),
    "odd": (127,),
    "mid": (4097,),
    "chunk_plus_one": (65537,),
    "conv": (3, 3, 16, 32),
    "empty": (0,),
    "empty2": (2, 0, 3),
    "zero_w": (33,),
    "zero_g": (5, 3),
    "dead": (6,),
    "three_chunks": (140001,),
    "two_chunks": (70000,),
    "bias": (32,),
}
NAMES = list(SHAPES)
ZERO_W = {"zero_w", "dead"}
ZERO_G = {"zero_g", "dead"}
STEPS = 10


def lr_at(t: int) -> float:
    """A learning rate that changes every step (exercises the lr buffer)."""
    return 0.5 * 0.9**t


def make_leaves(seed: int = 0, shapes: dict | None = None):
    """Float64 params and per-step grads: per-leaf scales spread the ratios."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    w_scales = np.geomspace(0.05, 3.0, len(shapes))
    g_scales = np.geomspace(0.3, 0.03, len(shapes))
    params, grads = [], [[] for _ in range(STEPS)]
    for (name, shape), ws, gs in zip(shapes.items(), w_scales, g_scales, strict=True):
        params.append(np.zeros(shape) if name in ZERO_W else ws * rng.standard_normal(shape))
        for t in range(STEPS):
            g = np.zeros(shape) if name in ZERO_G else gs * rng.standard_normal(shape)
            grads[t].append(g)
    return params, grads


DECAY_MASK = [i % 3 != 1 for i in range(len(SHAPES))]
TRUST_MASK = [len(s) != 1 or n == "chunk_plus_one" for n, s in SHAPES.items()]

CONFIGS = {
    "defaults": {},
    "no_momentum": {"momentum": 0.0},
    "weight_decay": {"weight_decay": 0.05},
    "nesterov": {"nesterov": True, "weight_decay": 0.01},
    "trust_clip": {"trust_clip": 0.1},
    "lr_inside_momentum": {"lr_inside_momentum": True, "eps": 0.0},
    "clip_norm_triggered": {"grad_clip_norm": 1.0, "weight_decay": 0.05},
    "clip_norm_not_triggered": {"grad_clip_norm": 1e6},
    "clip_value": {"grad_clip_value": 0.05},
    "both_clips": {"grad_clip_norm": 2.0, "grad_clip_value": 0.01, "weight_decay": 0.05},
    "large_eps": {"eps": 0.5},
    "everything": {
        "momentum": 0.8,
        "weight_decay": 0.05,
        "nesterov": True,
        "trust_clip": 0.1,
        "grad_clip_norm": 5.0,
        "grad_clip_value": 0.15,
        "eps": 1e-3,
        "lr_inside_momentum": True,
    },
}


def config_of(name: str) -> LarsConfig:
    return LarsConfig(**{"trust_coefficient": 0.02, **CONFIGS[name]})


def oracle_config(cfg: LarsConfig, lr: float) -> oracle.OracleConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LarsConfig)}
    return oracle.OracleConfig(learning_rate=lr, **fields)


@jax.jit
def _apply_updates(params, updates):
    return optax.apply_updates(params, updates)


_reference_jit = jax.jit(reference_step, static_argnames=("config", "decay_mask", "trust_mask"))


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
        kw = {"config": cfg, "decay_mask": decay_mask, "trust_mask": trust_mask}
        got = native.step(params, grads, momentum, lr, **kw)
        ref = _reference_jit(params, grads, momentum, lr, **kw)
        applied = native.apply(params, grads, momentum, lr, **kw)
        # The handler's own updates equal those step() derives from the momentum.
        written = native._call(params, grads, momentum, lr, **kw, mode=native.WRITE_UPDATES)
        _assert_bitwise(written, got)

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
            got = native.apply(
                params, grads, momentum, lr, config=cfg, decay_mask=[True] * n,
                trust_mask=[True] * n,
            )  # fmt: skip
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
    n = len(params)
    got = native.step(
        params, grads, momentum, jnp.float32(0.5), config=cfg, decay_mask=[True] * n,
        trust_mask=[True] * n,
    )  # fmt: skip
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


# --------------------------------------------------------------------------
# Determinism.


def _big_problem(seed: int = 5):
    shapes = {"a": (1_000_003,), "b": (3, 3, 64, 64), "c": (64,), "d": (300_001,), "e": ()}
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes.values()]
    grads = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in shapes.values()]
    momentum = [jnp.asarray(rng.standard_normal(s) * 0.01, jnp.float32) for s in shapes.values()]
    return params, grads, momentum


def _native_threads(threads: int, params, grads, momentum, cfg: LarsConfig):
    n = len(params)
    return native._call(
        params, grads, momentum, jnp.float32(0.1), config=cfg, decay_mask=[True] * n,
        trust_mask=[True] * n, mode=native.WRITE_PARAMS, num_threads=threads,
    )  # fmt: skip


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_bitwise_deterministic_across_runs_and_threads(name: str):
    cfg = config_of(name)
    params, grads, momentum = _big_problem()
    first = _native_threads(0, params, grads, momentum, cfg)
    _assert_bitwise(first, _native_threads(0, params, grads, momentum, cfg))
    for threads in (1, 2, 3, 8):
        _assert_bitwise(first, _native_threads(threads, params, grads, momentum, cfg))
        if jax.default_backend() == "cpu":
            assert native.last_step_threads()[0] == threads


def test_bitwise_identical_across_instruction_sets():
    """The base, AVX2 and AVX-512 loops give the same bits (fixed lanes, no FMA)."""
    cfg = config_of("everything")
    params, grads, momentum = _big_problem()
    active = native.cpu_isa()
    results = {}
    try:
        for isa in ("base", "avx2", "avx512"):
            try:
                native.set_cpu_isa(isa)
            except ValueError:
                continue
            results[isa] = _native_threads(2, params, grads, momentum, cfg)
    finally:
        native.set_cpu_isa(active)
    assert "base" in results
    for isa, result in results.items():
        if isa != "base":
            _assert_bitwise(results["base"], result)


def test_set_num_threads_validates():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            native.set_num_threads(bad)
    before = native.get_num_threads()
    native.set_num_threads(1)
    assert native.get_num_threads() == 1
    native.set_num_threads(before)


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="not available"):
        native.set_cpu_isa("avx9000")


# --------------------------------------------------------------------------
# Memory, compilation, transformations.


def _param_bytes(params) -> int:
    return sum(p.size * p.dtype.itemsize for p in params)


def test_in_place_apply_allocates_no_temporaries():
    """With params and momentum donated, new params/momentum reuse their buffers."""
    cfg = config_of("everything")
    params, grads, momentum = _big_problem()
    n = len(params)

    def step(params, momentum, grads, lr):
        r = native.apply(
            params, grads, momentum, lr, config=cfg, decay_mask=[True] * n, trust_mask=[True] * n
        )
        return r.updates, r.momentum

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, momentum, grads, 0.1).compile()
    stats = compiled.memory_analysis()
    param_bytes = _param_bytes(params)
    assert stats.temp_size_in_bytes < 0.01 * param_bytes, stats
    assert stats.alias_size_in_bytes >= 2 * param_bytes, stats


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_optax_step_allocates_no_temporaries(name: str, skip_nonfinite: bool):
    """lars.lars + optax.apply_updates, params and state donated (grads are not).

    Without nesterov the updates never exist as a buffer ("everything" has
    lr_inside_momentum, so they are -v). With skip_nonfinite the handler
    itself leaves params and momentum in place on a skipped step, so no copy
    of the old ones is kept.
    """
    params, grads, _ = _big_problem()
    kwargs = {k: v for k, v in CONFIGS[name].items() if k != "nesterov"}
    opt = lars.lars(0.1, backend="native", skip_nonfinite=skip_nonfinite, **kwargs)
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * _param_bytes(params), stats


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_apply_gradients_allocates_no_temporaries(skip_nonfinite: bool):
    """The public new-params step, params and state donated: in place, no temporaries."""
    params, grads, _ = _big_problem()
    opt = lars.lars(0.1, weight_decay=1e-4, skip_nonfinite=skip_nonfinite, backend="native")
    state = opt.init(params)
    step = jax.jit(opt.apply_gradients, donate_argnums=(0, 1))
    stats = step.lower(params, state, grads).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * _param_bytes(params), stats
    assert stats.alias_size_in_bytes >= 2 * _param_bytes(params), stats


def test_lars_class_donate_runs_in_place_and_changes_nothing_else():
    """lars.Lars(donate=True): params and momentum reuse their buffers; same bits as without."""
    params, grads, _ = _big_problem()
    names = [f"p{i}" for i in range(len(params))]
    g = dict(zip(names, grads, strict=True))
    results = {}
    for donate in (False, True):
        opt = lars.Lars(0.1, weight_decay=1e-4, nesterov=True, backend="native", donate=donate)
        opt.register_trainable_weights(
            {k: jnp.array(p) for k, p in zip(names, params, strict=True)}
        )
        stats = (
            opt._jit_step.lower(opt.params, g, opt.opt_state.value, jnp.float32(0.1))
            .compile()
            .memory_analysis()
        )
        if donate:
            assert stats.alias_size_in_bytes >= 2 * _param_bytes(params), stats
            before = opt.params["p0"]
        else:
            assert stats.alias_size_in_bytes == 0, stats
        for _ in range(3):
            opt.step(g)
        if donate:
            assert before.is_deleted()  # the documented cost of donating
        results[donate] = jax.tree.map(np.asarray, (opt.params, opt.opt_state.value))
    for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True]), strict=True):
        np.testing.assert_array_equal(a, b)


def _spec(backend: str, **overrides: Any) -> lars._transform.LarsSpec:
    """The step spec ``lars.Lars`` builds, for the new-params form of the step."""
    options = dict(
        momentum=0.9,
        weight_decay=1e-4,
        trust_coefficient=1e-3,
        eps=1e-8,
        nesterov=False,
        weight_decay_mask=None,
        trust_ratio_mask=None,
        trust_clip=None,
        grad_clip_norm=None,
        grad_clip_value=None,
        lr_inside_momentum=False,
        skip_nonfinite=False,
    )
    return lars._transform.make_spec(**{**options, **overrides}, backend=backend)


def test_in_place_skip_nonfinite_allocates_no_temporaries():
    """The new-params form (what lars.Lars uses) with skip_nonfinite, donated."""
    params, grads, _ = _big_problem()
    spec = _spec("native", nesterov=True, grad_clip_norm=1.0, skip_nonfinite=True)

    def step(params, state, grads):
        return lars._transform.apply_lars_to_params(grads, state, params, 0.1, spec)

    state = lars._transform.init_state(params)
    f = jax.jit(step, donate_argnums=(0, 1))
    stats = f.lower(params, state, grads).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * _param_bytes(params), stats
    # And a skipped step through it changes nothing, bit for bit.
    before = [np.asarray(p).copy() for p in params]
    bad = [g.at[(0,) * g.ndim].set(jnp.inf) if k == 1 else g for k, g in enumerate(grads)]
    state = state._replace(momentum=[jnp.full_like(v, 0.25) for v in state.momentum])
    new, new_state = f([jnp.asarray(p) for p in before], state, bad)
    for a, b in zip(new, before, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))
    for v in new_state.momentum:
        assert np.all(np.asarray(v) == 0.25)
    assert int(new_state.skipped) == 1 and int(new_state.count) == 0


def test_training_step_needs_no_buffer_beyond_the_gradients():
    """Nesterov in a jitted training step: the updates overwrite the gradients.

    The gradients are temporaries of any training step; the native step adds
    no other buffer (the handler writes the updates over the gradients and the
    new params and momentum reuse the donated buffers).
    """
    params, _, _ = _big_problem()
    opt = lars.lars(0.1, weight_decay=1e-4, nesterov=True, backend="native")
    state = opt.init(params)

    def loss(params, x):
        return sum(jnp.sum(p * p * x) for p in params)

    def train_step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, 0.5).compile()
    stats = compiled.memory_analysis()
    grad_bytes = _param_bytes(params)
    assert stats.temp_size_in_bytes < grad_bytes + 0.01 * _param_bytes(params), stats


def test_changing_lr_does_not_recompile():
    params, grads, momentum = _big_problem()
    cfg = config_of("everything")
    n = len(params)

    @jax.jit
    def step(params, momentum, grads, lr):
        return native.step(
            params, grads, momentum, lr, config=cfg, decay_mask=[True] * n, trust_mask=[True] * n
        )

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
    cfg = config_of("everything")
    rng = np.random.default_rng(7)
    shapes = [(3, 5), (7,), ()]
    batch = 3
    params = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    momentum = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float32) for s in shapes]
    kw = {"config": cfg, "decay_mask": (True,) * 3, "trust_mask": (True,) * 3}

    def run(fn):
        return jax.vmap(lambda p, g, v: fn(p, g, v, jnp.float32(0.3), **kw))(
            params, grads, momentum
        )

    got, want = run(native.step), run(reference_step)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_public_api_runs_native_under_jit():
    """lars.lars and lars.Lars with backend="native" match the reference backend.

    lars.Lars may take the in-place form (new params from the handler, rounded
    as ``p + (-(lr * v))`` twice) while lars.lars leaves ``p + (-(lr * v))`` to
    XLA, which may fuse it into one multiply-add: the two agree to the last bit
    or two, not necessarily bitwise.
    """
    params64, grads64 = make_leaves(3)
    params = {n: jnp.asarray(p, jnp.float32) for n, p in zip(NAMES, params64, strict=True)}
    grads = [
        {n: jnp.asarray(g, jnp.float32) for n, g in zip(NAMES, gs, strict=True)} for gs in grads64
    ]
    kwargs = {"weight_decay": 0.01, "weight_decay_mask": lars.exclude_bias_and_norm}
    results = {}
    for backend in ("native", "reference"):
        opt = lars.lars(0.3, backend=backend, **kwargs)
        state = opt.init(params)

        @jax.jit
        def step(p, s, g, opt=opt):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = params
        for g in grads:
            p, state = step(p, state, g)
        results[backend] = (p, state)
        obj = lars.Lars(0.3, backend=backend, **kwargs).register_trainable_weights(params)
        for g in grads:
            obj.update(g)
        for x, y in zip(
            jax.tree.leaves(results[backend]),
            jax.tree.leaves((obj.params, obj.opt_state.value)),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-8)
    for x, y in zip(
        jax.tree.leaves(results["native"]), jax.tree.leaves(results["reference"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Bad input and availability.


def _small():
    p = [jnp.ones((3,), jnp.float32), jnp.ones((2, 2), jnp.float32)]
    g = [jnp.full((3,), 0.1, jnp.float32), jnp.full((2, 2), 0.1, jnp.float32)]
    v = [jnp.zeros((3,), jnp.float32), jnp.zeros((2, 2), jnp.float32)]
    return p, g, v


KW = {"config": LarsConfig(), "decay_mask": [True, True], "trust_mask": [True, True]}


def test_rejects_mismatched_shapes():
    p, g, v = _small()
    g[1] = jnp.ones((4,), jnp.float32)
    with pytest.raises(ValueError, match="leaf 1"):
        native.step(p, g, v, jnp.float32(0.1), **KW)
    with pytest.raises(ValueError, match="leaves"):
        native.step(p, g[:1], v, jnp.float32(0.1), **KW)


def test_rejects_unsupported_dtypes():
    p, g, v = _small()
    with pytest.raises(TypeError, match="bfloat16 params with float32 gradients"):
        native.step([x.astype(jnp.bfloat16) for x in p], g, v, jnp.float32(0.1), **KW)
    with pytest.raises(TypeError, match="momentum"):
        native.step(p, g, [x.astype(jnp.float16) for x in v], jnp.float32(0.1), **KW)
    with pytest.raises(TypeError, match="int32"):
        native.step([x.astype(jnp.int32) for x in p], g, v, jnp.float32(0.1), **KW)


def test_rejects_bad_masks_and_lr():
    p, g, v = _small()
    with pytest.raises(ValueError, match="one bool per leaf"):
        native.step(p, g, v, jnp.float32(0.1), **{**KW, "decay_mask": [True]})
    with pytest.raises(ValueError, match="scalar"):
        native.step(p, g, v, jnp.ones(2, jnp.float32), **KW)


def test_handler_validates_its_operands():
    """A malformed direct call is refused by the C++ handler with a clear message."""
    call = jax.ffi.ffi_call(
        native.TARGET,
        [jax.ShapeDtypeStruct((3,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((), jnp.float32)],
    )
    attrs = {
        "momentum": np.float64(0.9),
        "weight_decay": np.float64(0.0),
        "trust_coefficient": np.float64(0.001),
        "eps": np.float64(1e-8),
        "trust_clip": np.float64(0.0),
        "grad_clip_norm": np.float64(0.0),
        "grad_clip_value": np.float64(0.0),
        "nesterov": np.bool_(False),
        "lr_inside_momentum": np.bool_(False),
        "mode": np.int32(native.WRITE_UPDATES),
        "decay_mask": np.ones(1, np.uint8),
        "trust_mask": np.ones(1, np.uint8),
        "num_threads": np.int64(0),
    }
    w = jnp.ones((3,), jnp.float32)
    with pytest.raises(Exception, match="lars native step: leaf 0: params, grads, momentum"):
        jax.block_until_ready(call(jnp.float32(0.1), w, jnp.ones((4,), jnp.float32), w, **attrs))
    with pytest.raises(Exception, match="lars native step: leaf 0: unsupported"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w.astype(jnp.int32), w, **attrs))
    with pytest.raises(Exception, match="lars native step: expected 3 operands"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w, **attrs))
    with pytest.raises(Exception, match="lars native step: unknown output mode 7"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w, w, **{**attrs, "mode": np.int32(7)}))


def test_modes_are_checked():
    p, g, v = _small()
    with pytest.raises(ValueError, match="unknown mode"):
        native._call(p, g, v, jnp.float32(0.1), **KW, mode=5)
    with pytest.raises(ValueError, match="nesterov"):
        native._call(
            p, g, v, jnp.float32(0.1), **{**KW, "config": LarsConfig(nesterov=True)},
            mode=native.MOMENTUM_ONLY,
        )  # fmt: skip


def test_traced_hyperparameters_are_unsupported():
    """inject_hyperparams traces the decay: "native" refuses, "auto" falls back."""
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.1)}
    opt = optax.inject_hyperparams(lars.lars, static_args=("backend",))(
        learning_rate=0.1, weight_decay=0.01, backend="native"
    )
    with pytest.raises(ValueError, match="is a traced value"):
        jax.jit(opt.update)(grads, opt.init(params), params)
    auto = optax.inject_hyperparams(lars.lars, static_args=("backend",))(
        learning_rate=0.1, weight_decay=0.01, backend="auto"
    )
    updates, _ = jax.jit(auto.update)(grads, auto.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_missing_library_is_reported_and_other_backends_still_work(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "LIB_DIR", tmp_path)
    reason = native.unavailable("cpu")
    assert reason is not None and "not built" in reason
    assert "native" not in lars.available_backends()
    assert "reference" in lars.available_backends()
    with pytest.raises(RuntimeError, match="not built"):
        lars.lars(0.1, backend="native")
    opt = lars.lars(0.1, backend="auto")
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_bytes_per_step():
    p = [jnp.zeros((10,), jnp.float32), jnp.zeros((4,), jnp.bfloat16)]
    g = [jnp.zeros((10,), jnp.bfloat16), jnp.zeros((4,), jnp.bfloat16)]
    # float32 params, bf16 grads: 4+4 + 2 + 4+4 = 18 B; bf16 params: 2+2+2+4+4 = 14 B.
    assert native.bytes_per_step(p, g) == 10 * 18 + 4 * 14
    assert math.isclose(native.bytes_per_step(p[:1], p[:1]) / 10, 20)


def test_runs_with_several_cpu_devices():
    """With a simulated device mesh, "native" runs and "auto" still picks it.

    (Sharded params are tested in test_sharding.py.)
    """
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax, lars
        assert jax.device_count() == 4
        assert "native" in lars.available_backends()
        p = {"w": jnp.arange(5.0), "b": jnp.ones(3)}
        g = jax.tree.map(lambda x: 0.5 * x + 1.0, p)
        got = lars.lars(0.1, weight_decay=1e-2, backend="auto")
        want = lars.lars(0.1, weight_decay=1e-2, backend="reference")
        u1, _ = jax.jit(got.update)(g, got.init(p), p)
        u2, _ = jax.jit(want.update)(g, want.init(p), p)
        for k in p:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6)
        print("ran")
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ran" in out.stdout


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
    lr = jnp.float32(0.3)
    full = (native.apply if write_params else native.step)(
        params, grads, momentum, lr, config=config, **masks
    )
    ratios = jnp.stack(full.trust_ratio)
    half = native.step_with_ratios(
        params,
        grads,
        momentum,
        lr,
        ratios,
        jnp.float32(0.0),
        config=config,
        write_params=write_params,
        **masks,
    )
    for a, b in zip([*full.updates, *full.momentum], [*half.updates, *half.momentum], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ratios), np.asarray(jnp.stack(half.trust_ratio)))


def test_given_ratios_must_match_the_leaves():
    p = [jnp.ones(4, jnp.float32), jnp.ones(2, jnp.float32)]
    with pytest.raises(ValueError, match="one given ratio per leaf"):
        jax.block_until_ready(
            native.step_with_ratios(
                p,
                p,
                p,
                jnp.float32(0.1),
                jnp.ones(3, jnp.float32),
                jnp.float32(0.0),
                config=LarsConfig(),
                decay_mask=[True, True],
                trust_mask=[True, True],
                write_params=False,
            ).momentum
        )


@pytest.mark.parametrize("write_params", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_differentiable_like_the_reference(nesterov: bool, write_params: bool):
    """Derivatives through a native step are the reference step's (meta-gradients).

    ``write_params`` takes the in-place form (the one ``lars.Lars`` uses).
    """
    rng = np.random.default_rng(5)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }

    def meta(scale, backend):
        spec = _spec(backend, weight_decay=1e-3, nesterov=nesterov)
        grads = jax.tree.map(lambda x: scale * x + 0.1, params)
        state = lars._transform.init_state(params)
        if write_params:
            new, state = lars._transform.apply_lars_to_params(grads, state, params, 0.1, spec)
        else:
            updates, state = lars._transform.apply_lars(grads, state, params, 0.1, spec)
            new = optax.apply_updates(params, updates)
        ratio = sum(jax.tree.leaves(state.trust_ratio))
        return jnp.sum(new["w"] ** 2) + jnp.sum(state.momentum["b"]) + ratio

    want = jax.grad(meta)(0.5, "reference")
    got = jax.grad(meta)(0.5, "native")
    got_jit = jax.jit(jax.grad(meta), static_argnums=1)(0.5, "native")
    assert float(want) != 0.0
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(got_jit), float(want), rtol=1e-4)
    _, tangent = jax.jvp(lambda s: meta(s, "native"), (0.5,), (1.0,))
    np.testing.assert_allclose(float(tangent), float(want), rtol=1e-5)
