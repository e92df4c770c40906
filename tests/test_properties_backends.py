"""Property-based tests of every CPU backend against the reference backend.

Hypothesis draws random pytrees (nested dicts, lists and tuples, None
subtrees, 1 to 6 array leaves), leaf shapes (0-d, size 1, zero-size, odd
sizes up to a few thousand elements, matrices, conv kernels), dtypes per leaf,
hyperparameters and masks, and finite values with exact zeros (zero-norm
leaves) and magnitudes mixed within and across leaves. For each backend:

1. ``test_matches_reference``: three jitted steps of ``lars.lars(...,
   backend=name)`` match the same steps with ``backend="reference"`` (params,
   momentum and trust ratios, per-dtype tolerances relative to the scale of
   each leaf), and every output is finite;
2. ``test_two_runs_are_bitwise_identical``: two independent runs (a new
   transform, a new jit) give the same bytes.

Bad input to the same problems (it raises, names the leaf and changes
nothing) is tested in ``test_properties_bad_input.py``.

The backends are ``tests/backends.py``'s list, and each one's dtype pairs its
``Backend.dtypes``: a backend that cannot run here fails (CI builds the native
library), it is not skipped. The Pallas kernels run in
interpret mode on a CPU, where each new tree compiles for seconds, so the
"pallas" examples are few and their leaves smaller.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import strategies
from backend_cases import TOLERANCES, Tol
from backends import KERNEL_BACKENDS, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lars
from lars import _dispatch

BACKENDS = KERNEL_BACKENDS
pytestmark = pytest.mark.slow  # hypothesis compiles a program per example
STEPS = 3

F32, BF16, F16, F64 = (np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))

# (param dtype, grad dtype) pairs each backend is exercised on: the param's own
# dtype, or bfloat16/float16 gradients on float32 (and float64) master weights,
# which is everything lars accepts (lars/_trees.py). "pallas" has no float64:
# its kernels handle float32, bfloat16 and float16 only and raise TypeError
# otherwise (checked by test_excluded_dtypes_are_rejected); float64 needs
# jax_enable_x64, so examples with float64 leaves run under jax.enable_x64.
ALL_COMBOS = [
    (F32, F32),
    (F32, BF16),
    (F32, F16),
    (BF16, BF16),
    (F16, F16),
    (F64, F64),
    (F64, BF16),
    (F64, F16),
]
COMBOS = {
    b: [c for c in ALL_COMBOS if _dispatch.get(b).dtypes is None or c in _dispatch.get(b).dtypes]
    for b in BACKENDS
}

# Per backend: examples of the comparison, of the determinism test, of the
# bad-input test (which compiles nothing), and the largest leaf of the
# comparison.
EXAMPLES = {
    "native": {"compare": 30, "determinism": 12, "bad_input": 30, "max_size": 3000},
    "pallas": {"compare": 10, "determinism": 4, "bad_input": 15, "max_size": 1200},
    "triton": {"compare": 10, "determinism": 4, "bad_input": 15, "max_size": 1200},
}

# Tolerances, keyed by the param dtype. float32 and bfloat16 params: the table
# of backend_cases (made for the float64 oracle; the reference is within a
# small fraction of it, so the same bounds hold against the reference).
# Gradients in bfloat16/float16 are exact in float32: the param dtype decides.
# float16 params: the bfloat16 entry scaled by the ratio of the two spacings,
# 2**-10 / 2**-7 = 1/8 (a one-ulp straddle of a rounding boundary moves a
# stored param by 2**-11 relative instead of 2**-8), with the same 2 ulps.
# float64: both steps compute in float64 and differ only in the order of the
# norms' sums (a few float64 ulps of each ratio, ~1e-15); 1e-12 still catches
# any computation in float32 (~1e-7).
TOLS = {
    F32: TOLERANCES["float32"],
    BF16: TOLERANCES["bf16_params"],
    F16: Tol(delta=2.5e-3, ulps=2.0, momentum=2.5e-4, ratio=2.5e-4),
    F64: Tol(delta=1e-12, ulps=8.0, momentum=1e-12, ratio=1e-12),
}

# log10 of the per-leaf scale, and of the extra per-element factor of a
# "mixed" leaf: float16 values stay far from its largest finite value (65504)
# after three steps with lr up to 2 and momentum up to 0.99.
MAGNITUDES = {F16: ((-2.0, 1.0), (-3.0, 1.0))}
DEFAULT_MAGNITUDES = ((-3.0, 2.0), (-5.0, 2.0))


def example_settings(backend: str, kind: str) -> settings:
    return settings(
        max_examples=EXAMPLES[backend][kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def spacing(dtype: Any, magnitude: float) -> float:
    """The spacing of ``dtype`` at ``magnitude``, at least its smallest normal."""
    info = jnp.finfo(dtype)
    return max(magnitude * float(info.eps), float(info.tiny))


# --------------------------------------------------------------------------
# Strategies.


@dataclasses.dataclass(frozen=True)
class Values:
    """How to fill one array: kind, log10 of the scale, mixing range, seed."""

    kind: str  # "normal", "zeros", "sparse" (about half exact zeros) or "mixed"
    log_scale: float
    mixed: tuple[float, float]
    seed: int

    def make(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        x = 10.0**self.log_scale * rng.standard_normal(shape)
        if self.kind == "zeros":
            x = np.zeros(shape)
        elif self.kind == "sparse":
            x = np.where(rng.random(shape) < 0.5, 0.0, x)
        elif self.kind == "mixed":
            x = x * 10.0 ** rng.uniform(*self.mixed, shape)
        return np.asarray(x).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a drawn pytree (not a pytree node, so a leaf to jax.tree)."""

    shape: tuple[int, ...]
    param_dtype: np.dtype
    grad_dtype: np.dtype
    param: Values
    grads: tuple[Values, ...]

    def param_array(self) -> np.ndarray:
        return self.param.make(self.shape, self.param_dtype)

    def grad_array(self, t: int) -> np.ndarray:
        return self.grads[t].make(self.shape, self.grad_dtype)


FIXED_SHAPES = [(), (1,), (1, 1), (0,), (0, 3), (2, 0, 3), (7,), (4, 5), (3, 3, 4, 8), (1, 1, 5, 3)]


def shapes(max_size: int) -> st.SearchStrategy[tuple[int, ...]]:
    side = lambda hi: st.integers(1, hi)
    return st.one_of(
        st.sampled_from(FIXED_SHAPES),
        st.integers(2, max_size).map(lambda n: (n,)),
        st.tuples(side(64), side(64)),
        st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]), side(8), side(16)),
    ).filter(lambda s: int(np.prod(s)) <= max_size)


@st.composite
def values(draw, dtype: np.dtype) -> Values:
    (lo, hi), mixed = MAGNITUDES.get(dtype, DEFAULT_MAGNITUDES)
    return Values(
        kind=draw(st.sampled_from(["normal", "zeros", "sparse", "mixed"])),
        log_scale=draw(st.floats(lo, hi)),
        mixed=mixed,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def leaves(draw, combos, max_size: int) -> Leaf:
    p_dtype, g_dtype = draw(st.sampled_from(combos))
    return Leaf(
        shape=draw(shapes(max_size)),
        param_dtype=p_dtype,
        grad_dtype=g_dtype,
        param=draw(values(p_dtype)),
        grads=tuple(draw(values(p_dtype)) for _ in range(STEPS)),
    )


def trees(leaf: st.SearchStrategy) -> st.SearchStrategy:
    """Pytrees of 1 to 6 leaves: a bare leaf, or nested dicts, lists, tuples, None."""
    keys = st.sampled_from(["a", "b", "conv", "w_1", "bias", "x.y"])
    tree = st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(keys, st.one_of(children, st.none()), min_size=1, max_size=4),
            st.lists(children, min_size=1, max_size=3),
            st.tuples(children, children),
        ),
        max_leaves=6,
    )
    return tree.filter(lambda t: 1 <= len(jax.tree.leaves(t)) <= 6)


hyperparameters = strategies.hyperparameters
# A constant, or an optax schedule of the step count (lr as a traced value).
learning_rates = st.one_of(
    st.just(0.0),
    st.floats(1e-4, 2.0),
    st.tuples(st.floats(1e-4, 2.0), st.floats(0.0, 2.0)).map(lambda ab: ("linear", ab[0], ab[1])),
)


def make_lr(lr: Any) -> Any:
    if isinstance(lr, tuple):
        _, start, end = lr
        return optax.linear_schedule(start, end, transition_steps=STEPS)
    return lr


@dataclasses.dataclass(frozen=True)
class Problem:
    tree: Any  # a pytree whose leaves are Leaf
    hp: dict
    lr: Any
    decay_mask: Any  # None, "callable" or a list of bools (one per leaf)
    trust_mask: Any

    @property
    def specs(self) -> list[Leaf]:
        return jax.tree.leaves(self.tree)

    def context(self):
        """Float64 leaves need jax_enable_x64 (the native backend's float64 path)."""
        x64 = any(s.param_dtype == F64 for s in self.specs)
        return jax.enable_x64(True) if x64 else contextlib.nullcontext()

    def params(self) -> Any:
        return jax.tree.map(lambda s: jnp.asarray(s.param_array()), self.tree)

    def grads(self, t: int) -> Any:
        return jax.tree.map(lambda s: jnp.asarray(s.grad_array(t)), self.tree)

    def mask(self, mask: Any) -> Any:
        if mask is None:
            return None
        if mask == "callable":
            return lars.exclude_bias_and_norm
        return jax.tree.unflatten(jax.tree.structure(self.tree), mask)

    def transform(self, backend: str) -> optax.GradientTransformation:
        return lars.lars(
            make_lr(self.lr),
            weight_decay_mask=self.mask(self.decay_mask),
            trust_ratio_mask=self.mask(self.trust_mask),
            backend=backend,
            **self.hp,
        )


masks = lambda n: st.one_of(
    st.none(), st.just("callable"), st.lists(st.booleans(), min_size=n, max_size=n)
)


@st.composite
def problems(draw, backend: str, max_size: int, combos=None) -> Problem:
    tree = draw(trees(leaves(combos or COMBOS[backend], max_size)))
    n = len(jax.tree.leaves(tree))
    return Problem(
        tree=tree,
        hp=draw(hyperparameters),
        lr=draw(learning_rates),
        decay_mask=draw(masks(n)),
        trust_mask=draw(masks(n)),
    )


# --------------------------------------------------------------------------
# Running the steps.


@dataclasses.dataclass
class Run:
    """The end of a run, and per leaf the scales to judge differences by.

    Attributes:
      params, state: After the last step.
      moved: Per leaf, the largest distance an element travelled,
        ``max sum_t |w_t - w_(t-1)|``: each step's error is relative to its
        own update, and updates of successive steps can cancel in ``w_T - w_0``.
      magnitude: Per leaf, the largest ``|w|`` of any step, the initial included
        (where the stored params are rounded).
      v_scale: Per leaf, the largest ``|v|`` of any step (a last ``v`` can be
        near zero by cancellation).
    """

    params: Any
    state: lars.LarsState
    moved: list[float]
    magnitude: list[float]
    v_scale: list[float]


def run(problem: Problem, backend: str) -> Run:
    """STEPS jitted steps of ``lars.lars(..., backend=backend)``."""
    opt = problem.transform(backend)

    @jax.jit
    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    params = problem.params()
    state = opt.init(params)
    distance = [np.zeros(s.shape) for s in problem.specs]
    largest = lambda x: float(np.max(np.abs(f64(x)), initial=0.0))
    magnitude = [largest(p) for p in jax.tree.leaves(params)]
    v_scale = [0.0] * len(problem.specs)
    for t in range(STEPS):
        new_params, state = step(params, state, problem.grads(t))
        pairs = zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True)
        for i, (a, b) in enumerate(pairs):
            distance[i] += np.abs(f64(a) - f64(b))
            magnitude[i] = max(magnitude[i], largest(a))
        for i, v in enumerate(jax.tree.leaves(state.momentum)):
            v_scale[i] = max(v_scale[i], largest(v))
        params = new_params
    moved = [float(np.max(d, initial=0.0)) for d in distance]
    return Run(params, state, moved, magnitude, v_scale)


def leaf_paths(tree: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in flat]


def f64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def assert_matches(problem: Problem, got: Run, want: Run, backend: str) -> None:
    """The backend's params, momentum and ratios against the reference's."""
    g_params, g_state, w_params, w_state = got.params, got.state, want.params, want.state
    specs = problem.specs
    paths = leaf_paths(problem.tree)
    # The global norm of grad_clip_norm sums the squares of float32 leaves in
    # float32 (in the reference, as in optax): its rounding, 2**-24 relative,
    # reaches the float64 leaves of a tree that mixes both.
    mixed_global_norm = problem.hp["grad_clip_norm"] is not None and any(
        s.param_dtype != F64 for s in specs
    )
    assert jax.tree.structure(g_params) == jax.tree.structure(w_params)
    assert int(g_state.count) == int(w_state.count) == STEPS
    rows = zip(
        specs,
        paths,
        jax.tree.leaves(g_params),
        jax.tree.leaves(w_params),
        jax.tree.leaves(g_state.momentum),
        jax.tree.leaves(w_state.momentum),
        np.asarray(g_state.trust_ratio),
        np.asarray(w_state.trust_ratio),
        want.moved,
        want.magnitude,
        want.v_scale,
        strict=True,
    )
    for spec, path, gp, wp, gv, wv, gr, wr, moved, mag, vs in rows:
        where = f"{backend}, leaf {path} ({spec.param_dtype}/{spec.grad_dtype}, {spec.shape})"
        tol = TOLS[spec.param_dtype]
        if spec.param_dtype == F64 and mixed_global_norm:
            tol = TOLS[F32]
        assert gp.dtype == wp.dtype == spec.param_dtype, where
        assert gv.dtype == wv.dtype, where
        assert gp.shape == wp.shape == gv.shape == spec.shape, where
        for name, x in (("params", gp), ("momentum", gv), ("trust ratio", gr)):
            assert np.all(np.isfinite(f64(x))), f"non-finite {name} at {where}"
        if gp.size:
            allowed = tol.delta * moved + tol.ulps * spacing(spec.param_dtype, mag)
            err = float(np.max(np.abs(f64(gp) - f64(wp))))
            assert err <= allowed, (
                f"params at {where}: max error {err:.3g} > {allowed:.3g} (moved {moved:.3g})"
            )
            v_err = float(np.max(np.abs(f64(gv) - f64(wv))))
            v_allowed = tol.momentum * vs + spacing(gv.dtype, 0.0)
            assert v_err <= v_allowed, (
                f"momentum at {where}: max error {v_err:.3g} > {v_allowed:.3g} (scale {vs:.3g})"
            )
        r, r_want = float(gr), float(wr)
        assert abs(r - r_want) <= tol.ratio * r_want, f"trust ratio at {where}: {r!r} vs {r_want!r}"


# --------------------------------------------------------------------------
# 1. Every backend matches the reference; finite inputs give finite outputs.


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend: str):
    require(backend)

    @example_settings(backend, "compare")
    @given(problem=problems(backend, EXAMPLES[backend]["max_size"]))
    def check(problem: Problem):
        with problem.context():
            want = run(problem, "reference")
            got = run(problem, backend)
        assert_matches(problem, got, want, backend)

    check()


# --------------------------------------------------------------------------
# 2. Two runs of the same steps give the same bits.


def determinism_problems(backend: str) -> st.SearchStrategy[Problem]:
    """The comparison's problems; for "native" sometimes with one more leaf.

    That leaf spans more than one 65,536-element chunk of the native CPU
    handler, whose norms are then summed chunk by chunk, possibly on several
    threads (the order of the sums must not depend on them).
    """
    small = problems(backend, EXAMPLES[backend]["max_size"])
    if backend != "native":
        return small

    @st.composite
    def with_big_leaf(draw) -> Problem:
        problem = draw(small)
        p_dtype, g_dtype = draw(st.sampled_from(COMBOS[backend]))
        big = Leaf(
            shape=(draw(st.integers(65_537, 140_001)),),
            param_dtype=p_dtype,
            grad_dtype=g_dtype,
            param=draw(values(p_dtype)),
            grads=tuple(draw(values(p_dtype)) for _ in range(STEPS)),
        )
        # "big" flattens first: a per-leaf mask list gains its entry in front.
        extend = lambda m: m if not isinstance(m, list) else [True, *m]
        return dataclasses.replace(
            problem,
            tree={"big": big, "rest": problem.tree},
            decay_mask=extend(problem.decay_mask),
            trust_mask=extend(problem.trust_mask),
        )

    return st.one_of(small, with_big_leaf())


def as_bytes(tree: Any) -> list[tuple[str, tuple[int, ...], bytes]]:
    arrays = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return [(str(a.dtype), a.shape, a.tobytes()) for a in arrays]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_are_bitwise_identical(backend: str):
    require(backend)

    @example_settings(backend, "determinism")
    @given(problem=determinism_problems(backend))
    def check(problem: Problem):
        with problem.context():
            a = run(problem, backend)
            b = run(problem, backend)  # a new transform and a new jit
        assert as_bytes((a.params, a.state)) == as_bytes((b.params, b.state))

    check()
