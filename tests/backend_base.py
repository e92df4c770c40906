"""The shared test suite every LARS backend must pass.

``BackendTests`` runs a backend through the public API (``lars.lars`` and
``lars.Lars`` with ``backend=self.backend``) for several steps on a pytree of
awkward shapes and compares params, momentum and trust ratios with the float64
NumPy oracle in ``oracle.py``. A backend's test module subclasses it::

    class TestMyBackend(BackendTests):
        backend = "my_backend"
        big = 4099  # optional: a smaller largest leaf for a slow backend

Each case compiles one program; the cases are chosen so that every option and
the useful combinations are covered with a few dozen compilations in all.

The cases, the pytree and the tolerances are in ``backend_cases.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from backend_cases import (
    BASE_KWARGS,
    CASES,
    CASES_BY_NAME,
    DECAY,
    DTYPES,
    LR,
    TOLERANCES,
    Case,
    as_f64_leaves,
    assert_matches_oracle,
    lars_mask,
    make_problem,
    oracle_run,
    to_device,
    warmup_cosine,
    warmup_cosine_f64,
)

import lars

# --------------------------------------------------------------------------
# The suite.

_STEP_CACHE: dict = {}  # (backend, case, jit, input signature) -> (transform, step)


class BackendTests:
    """Runs one backend through ``lars.lars`` and ``lars.Lars`` against the oracle.

    Attributes:
      backend: The backend name passed as ``backend=``.
      backend_options: The ``backend_options=`` passed with it.
      big: Size of the largest leaf (a subclass may shrink it).
      mid: Size of the mid-sized leaf.
      steps: Steps per trajectory (>= 10).
      same_bits_across_programs: Two different jitted programs that run the
        same step (the optimizer and the transform; ``apply_gradients`` and
        update then ``optax.apply_updates``) give the same bits. False for a
        backend whose kernels run in an interpreter here: XLA then compiles
        the kernel's arithmetic into each program anew, and whether it
        contracts a multiply and an add into one FMA depends on the program.
        Those results are then compared to 1e-6 of the leaf's scale.
    """

    backend: ClassVar[str] = "reference"
    backend_options: ClassVar[dict | None] = None
    big: ClassVar[int] = 65537
    mid: ClassVar[int] = 4097
    steps: ClassVar[int] = 10
    same_bits_across_programs: ClassVar[bool] = True

    def assert_same_step(self, x: Any, y: Any) -> None:
        """x and y come from the same step run by two programs (see the attributes)."""
        x, y = np.asarray(x), np.asarray(y)
        if self.same_bits_across_programs:
            np.testing.assert_array_equal(x, y)
            return
        assert x.shape == y.shape and x.dtype == y.dtype
        scale = float(np.max(np.abs(y.astype(np.float64)))) if y.size else 0.0
        err = np.abs(x.astype(np.float64) - y.astype(np.float64))
        assert not err.size or float(np.max(err)) <= 1e-6 * scale, (float(np.max(err)), scale)

    # -- helpers --------------------------------------------------------------
    def problem(self, dtype_case: str = "float32", seed: int = 0):
        """Device params, per-step device grads, float64 params, paths, shapes."""
        p_dtype, g_dtype = DTYPES[dtype_case]
        params64, grads64, paths = make_problem(self.big, self.mid, self.steps, seed)
        params = to_device(params64, p_dtype)
        grads = [to_device(g, g_dtype) for g in grads64]
        shapes = [np.shape(x) for x in jax.tree.leaves(params)]
        return params, grads, paths, shapes

    def run_transform(self, case: Case, params: Any, grads: list, *, jit: bool = True):
        """Runs ``lars.lars`` for ``len(grads)`` steps; returns (params, state).

        Jitted steps are cached per backend, case and input signature, so the
        tests that rerun a case (determinism, zero leaves, ...) in the same
        process do not compile it again (compiling dominates a slow backend).
        """
        opt, step = self._transform_step(case, params, grads[0], jit)
        state = opt.init(params)
        for g in grads:
            params, state = step(params, state, g)
        return params, state

    def transform(self, case: Case, params: Any) -> lars.LarsTransformation:
        """``lars.lars`` with ``case``'s settings on this backend."""
        return lars.lars(
            case.learning_rate(),
            weight_decay_mask=lars_mask(case.decay_mask, params),
            trust_ratio_mask=lars_mask(case.trust_mask, params),
            backend=self.backend,
            backend_options=self.backend_options,
            **case.lars_kwargs(),
        )

    def _transform_step(self, case: Case, params: Any, grads: Any, jit: bool):
        signature = (
            self.backend,
            repr(case),
            jit,
            jax.tree.structure(params),
            tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((params, grads))),
        )
        if signature in _STEP_CACHE:
            return _STEP_CACHE[signature]
        opt = self.transform(case, params)

        def step(p, s, g):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        _STEP_CACHE[signature] = (opt, jax.jit(step) if jit else step)
        return _STEP_CACHE[signature]

    def oracle_for(self, case: Case, params: Any, grads: list, paths, shapes, lr=None):
        """The oracle's trajectory for ``case`` on the same (rounded) inputs."""
        overrides = {} if lr is None else {"learning_rate": lr}
        dtypes = [x.dtype for x in jax.tree.leaves(params)]
        rounders = [oracle.rounder(d) for d in dtypes]
        return oracle_run(case, params, grads, paths, shapes, round_params=rounders, **overrides)

    def check(self, case: Case, dtype_case: str, params0, grads, paths, shapes, got, lr=None):
        got_params, got_state = got
        want = self.oracle_for(case, params0, grads, paths, shapes, lr=lr)
        assert_matches_oracle(
            got_params,
            got_state,
            want,
            as_f64_leaves(params0),
            paths,
            TOLERANCES[dtype_case],
            DTYPES[dtype_case][0],
        )

    # -- lars.lars against the oracle -------------------------------------------
    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_transform_matches_oracle(self, case: Case):
        params, grads, paths, shapes = self.problem()
        got = self.run_transform(case, params, grads)
        self.check(case, "float32", params, grads, paths, shapes, got)

    @pytest.mark.parametrize("dtype_case", ["bf16_grads", "bf16_params"])
    @pytest.mark.parametrize("name", ["defaults", "both_masks", "everything"])
    def test_low_precision_matches_oracle(self, name: str, dtype_case: str):
        case = CASES_BY_NAME[name]
        params, grads, paths, shapes = self.problem(dtype_case)
        got = self.run_transform(case, params, grads)
        p_dtype = DTYPES[dtype_case][0]
        assert all(x.dtype == p_dtype for x in jax.tree.leaves(got[0]))
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(got[1].momentum))
        self.check(case, dtype_case, params, grads, paths, shapes, got)

    def test_eager_matches_oracle(self):
        """Without jax.jit (op by op) the step computes the same numbers.

        A small tree and 3 steps: eager execution compiles every operation
        once per leaf shape.
        """
        case = CASES_BY_NAME["everything"]
        rng = np.random.default_rng(5)
        shapes = {"w": (6, 4), "b": (4,), "s": ()}
        params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        grads = [
            {k: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
            for _ in range(3)
        ]
        got = self.run_transform(case, params, grads, jit=False)
        paths = [("b",), ("s",), ("w",)]  # flattening order: sorted keys
        self.check(case, "float32", params, grads, paths, [(4,), (), (6, 4)], got)

    def test_deterministic(self):
        """Two independent runs give bitwise identical params and state."""
        case = CASES_BY_NAME["everything"]
        params, grads, _, _ = self.problem()
        a = self.run_transform(case, params, grads)
        b = self.run_transform(case, params, grads)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    @pytest.mark.parametrize("nesterov", [False, True])
    def test_derivative_through_two_steps(self, nesterov: bool):
        """jax.grad through two steps matches float64 finite differences of the oracle.

        The meta-loss depends on a scalar that scales the gradients: its
        derivative flows through the norms, the trust ratios and the momentum.
        """
        rng = np.random.default_rng(11)
        shapes = [(5, 3), (4,), (2, 2, 3)]
        params = [rng.normal(size=s) for s in shapes]
        base = [rng.normal(size=s) for s in shapes]
        kw = dict(weight_decay=1e-2, nesterov=nesterov, trust_clip=0.05)

        def meta_f64(scale: float) -> float:
            state, cfg = oracle.init(params), oracle.OracleConfig(learning_rate=0.3, **kw)
            for k in range(2):
                grads = [(k + 1) * scale * b + 0.1 * p for b, p in zip(base, params, strict=True)]
                state = oracle.step(state, grads, cfg)
            return sum(float(np.sum(p**2)) for p in state.params) + float(
                sum(np.sum(v) for v in state.momentum)
            )

        opt = lars.lars(0.3, backend=self.backend, backend_options=self.backend_options, **kw)

        def meta(scale):
            p = [jnp.asarray(x, jnp.float32) for x in params]
            state = opt.init(p)
            for k in range(2):
                grads = [
                    (k + 1) * scale * jnp.asarray(b, jnp.float32)
                    + 0.1 * jnp.asarray(x, jnp.float32)
                    for b, x in zip(base, params, strict=True)
                ]
                updates, state = opt.update(grads, state, p)
                p = optax.apply_updates(p, updates)
            return sum(jnp.sum(x**2) for x in p) + sum(jnp.sum(v) for v in state.momentum)

        h = 1e-5
        want = (meta_f64(0.7 + h) - meta_f64(0.7 - h)) / (2 * h)
        got = float(jax.jit(jax.grad(meta))(jnp.float32(0.7)))
        assert abs(want) > 1e-3
        np.testing.assert_allclose(got, want, rtol=2e-3)

    def test_apply_gradients_equals_update_then_apply_updates(self):
        """The new-params step equals update + optax.apply_updates, bit for bit (jitted)."""
        case = CASES_BY_NAME["everything"]
        params, grads, _, _ = self.problem()
        opt = self.transform(case, params)

        def two_part(p, s, g):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        a_params, a_state = params, opt.init(params)
        b_params, b_state = params, opt.init(params)
        fused, split = jax.jit(opt.apply_gradients), jax.jit(two_part)
        for g in grads[:2]:
            a_params, a_state = fused(a_params, a_state, g)
            b_params, b_state = split(b_params, b_state, g)
        for x, y in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params), strict=True):
            self.assert_same_step(x, y)
        for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state), strict=True):
            self.assert_same_step(x, y)

    def test_zero_and_empty_leaves(self):
        """Zero-norm leaves get r = 1 exactly; empty leaves stay empty; no NaN."""
        case = CASES_BY_NAME["weight_decay"]
        params, grads, paths, _ = self.problem()
        new_params, state = self.run_transform(case, params, grads)
        by_path = dict(zip(paths, jax.tree.leaves(new_params), strict=True))
        ratios = dict(zip(paths, np.asarray(state.trust_ratio), strict=True))
        momentum = dict(zip(paths, jax.tree.leaves(state.momentum), strict=True))
        for path in paths:
            assert np.all(np.isfinite(np.asarray(by_path[path]))), path
        for path in [("empty",), ("empty2",), ("dead",)]:
            assert float(ratios[path]) == 1.0, path
            assert np.all(np.asarray(momentum[path]) == 0.0), path
        assert by_path[("empty",)].shape == (0,) and by_path[("empty2",)].shape == (0, 5)
        np.testing.assert_array_equal(np.asarray(by_path[("dead",)]), np.zeros(6, np.float32))
        # The zero-grad leaf still moves under weight decay, with r = eta / decay.
        eta = BASE_KWARGS["trust_coefficient"]
        np.testing.assert_allclose(float(ratios[("zero_g",)]), eta / DECAY, rtol=1e-5)

    def test_first_step_of_zero_weight_leaf_is_unscaled(self):
        """A zero-initialised leaf takes a full lr step on step 1 (r = 1)."""
        params, grads, paths, _ = self.problem()
        new_params, state = self.run_transform(CASES_BY_NAME["defaults"], params, grads[:1])
        i = paths.index(("zero_w",))
        assert float(state.trust_ratio[i]) == 1.0
        g = np.asarray(jax.tree.leaves(grads[0])[i])
        np.testing.assert_allclose(
            np.asarray(jax.tree.leaves(new_params)[i]), -LR * g, rtol=1e-6, atol=1e-12
        )

    def test_containers_and_bare_arrays(self):
        """Tuples, lists, None subtrees and a bare 0-d array as the whole params."""
        case = CASES_BY_NAME["everything"]
        rng = np.random.default_rng(3)
        params = {
            "t": (jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), None),
            "l": [jnp.asarray(rng.standard_normal(5), jnp.float32)],
        }
        grads = [
            jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
            for _ in range(self.steps)
        ]
        got = self.run_transform(case, params, grads)
        paths = [("l",), ("t",)]  # flattening order: sorted keys
        shapes = [(5,), (3, 2)]
        self.check(case, "float32", params, grads, paths, shapes, got)
        assert got[0]["t"][1] is None

        scalar = jnp.asarray(1.5, jnp.float32)
        g_scalar = [jnp.asarray(v, jnp.float32) for v in rng.standard_normal(self.steps)]
        case = CASES_BY_NAME["weight_decay"]
        got = self.run_transform(case, scalar, g_scalar)
        self.check(case, "float32", scalar, g_scalar, [("<root>",)], [()], got)

    # -- lars.Lars against the oracle ----------------------------------------------
    def run_optimizer(self, lr: Any, case: Case, params: Any, grads: list, on_step=None):
        """Runs ``lars.Lars``; ``on_step(opt, t)`` runs after update t."""
        kwargs = case.lars_kwargs()
        opt = lars.Lars(
            lr,
            weight_decay_mask=lars_mask(case.decay_mask, params),
            trust_ratio_mask=lars_mask(case.trust_mask, params),
            backend=self.backend,
            backend_options=self.backend_options,
            **kwargs,
        )
        opt.register_trainable_weights(params)
        for t, g in enumerate(grads):
            opt.update(g)
            if on_step is not None:
                on_step(opt, t)
        assert opt.step_count.value == len(grads)
        return opt.params, opt.opt_state.value

    @pytest.mark.parametrize("name", ["package_defaults", "everything"])
    def test_optimizer_float_lr(self, name: str):
        case = CASES_BY_NAME[name]
        params, grads, paths, shapes = self.problem()
        lr = 0.3
        got = self.run_optimizer(lr, case, params, grads)
        self.check(case, "float32", params, grads, paths, shapes, got, lr=lr)

    def test_optimizer_scheduler(self):
        """A lars.schedules scheduler stepped by the user between updates."""
        case = CASES_BY_NAME["both_masks"]
        params, grads, paths, shapes = self.problem()
        sched = lars.schedules.StepLR(base_lr=0.6, step_size=3, gamma=0.5)
        got = self.run_optimizer(sched, case, params, grads, lambda opt, t: sched.step())
        lr = lambda t: 0.6 * 0.5 ** (t // 3)
        self.check(case, "float32", params, grads, paths, shapes, got, lr=lr)

    def test_optimizer_schedule_function_and_current_lr(self):
        """An optax schedule as lr; then a float lr changed through current_lr."""
        case = CASES_BY_NAME["lr_inside_momentum"]
        params, grads, paths, shapes = self.problem()
        got = self.run_optimizer(warmup_cosine, case, params, grads)
        self.check(case, "float32", params, grads, paths, shapes, got, lr=warmup_cosine_f64)

        def halve_at_4(opt, t):
            if t == 3:
                opt.current_lr = 0.15

        got = self.run_optimizer(0.3, case, params, grads, halve_at_4)
        lr = lambda t: 0.3 if t < 4 else 0.15
        self.check(case, "float32", params, grads, paths, shapes, got, lr=lr)

    def test_optimizer_and_transform_agree_bitwise(self):
        """lars.Lars(lr=f) and lars.lars(f) run the same computation."""
        case = CASES_BY_NAME["everything"]
        params, grads, _, _ = self.problem()
        a = self.run_transform(case, params, grads)
        b = self.run_optimizer(warmup_cosine, case, params, grads)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            self.assert_same_step(x, y)
