"""Tests of the Triton backend (lars.kernels.triton) that run without a GPU.

* The launch plan, in pure Python: tile tables, dtype groups, launch counts
  (ResNet-50's included).
* The backend's options, features and refusals, named by leaf or package.
* The kernels themselves, run in Triton's interpreter: ``triton_interpret_cases.py``
  and ``triton_interpret_steps.py`` in a subprocess with ``TRITON_INTERPRET=1``
  (set before triton is imported).

The kernels compiled for sm_90 and the step lowered through jax-triton are in
test_triton_compiled.py. triton (``pip install .[test]`` installs it) is
required: without it these tests fail rather than skip.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton  # noqa: F401  (required: a missing triton fails here, it is not skipped)

import lars.kernels.triton as triton_backend
from lars import _dispatch
from lars._config import LarsConfig
from lars.contract import FLOAT32_COMPUTE_DTYPES, Feature, StepSpec
from lars.kernels.triton import BACKEND
from lars.kernels.triton import plan as P

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree
    sys.path.insert(0, str(ROOT))

from bench.workloads import resnet50_shapes  # noqa: E402

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def options(tuning: P.Tuning) -> tuple:
    """``StepSpec.options`` for a tuning, as the front end passes them (normalised)."""
    return tuple(sorted(BACKEND.options(dataclasses.asdict(tuning)).items()))


def make_spec(
    shapes, dtypes=None, *, config=None, decay=None, trust=None, tuning=None, write=False
) -> StepSpec:
    """The StepSpec of leaves of ``shapes`` and (param, grad) ``dtypes`` (no arrays)."""
    n = len(shapes)
    dtypes = dtypes or [(F32, F32)] * n
    params = [jax.ShapeDtypeStruct(s, p) for s, (p, _) in zip(shapes, dtypes, strict=True)]
    grads = [jax.ShapeDtypeStruct(s, g) for s, (_, g) in zip(shapes, dtypes, strict=True)]
    return StepSpec.build(
        config or LarsConfig(weight_decay=1e-4),
        params,
        grads,
        decay_mask=decay or [True] * n,
        trust_mask=trust or [True] * n,
        write_params=write,
        options=options(tuning or P.Tuning()),
    )


def make_plan(shapes, dtypes=None, **kw) -> P.StepPlan:
    """The StepPlan of :func:`make_spec`."""
    return P.StepPlan.of(make_spec(shapes, dtypes, **kw))


# --------------------------------------------------------------------------
# The plan.


@pytest.mark.parametrize("chunk", [256, 1024])
def test_table_covers_every_element_once(chunk):
    rng = np.random.default_rng(0)
    sizes = [1, chunk - 1, chunk, chunk + 1, 3 * chunk, 1, *rng.integers(1, 5 * chunk, 10)]
    decay = [i % 2 == 0 for i in range(len(sizes))]
    table, spans = P.make_table(sizes, decay, chunk)
    assert table.dtype == np.int32 and table.shape[1] == P.TABLE_COLUMNS
    for slot, (n, (a, b)) in enumerate(zip(sizes, spans, strict=True)):
        rows = table[a:b]
        assert (rows[:, P.COL_SLOT] == slot).all()
        assert (rows[:, P.COL_DECAY] == int(decay[slot])).all()
        covered = np.zeros(n, int)
        for c, length in rows[:, [P.COL_CHUNK, P.COL_LENGTH]]:
            assert 0 < length <= chunk
            covered[c * chunk : c * chunk + length] += 1
        np.testing.assert_array_equal(covered, 1)  # each element in exactly one program
    assert spans[-1][1] == table.shape[0]


def test_reduce_index_lines_up_each_slots_rows():
    spans = [(0, 3), (3, 4), (4, 4), (4, 6)]
    index = P.reduce_index(spans, 6)
    np.testing.assert_array_equal(index, [[0, 1, 2], [3, 6, 6], [6, 6, 6], [4, 5, 6]])


def test_launches_group_dtypes_and_cap_slots():
    dtypes = [(F32, F32), (BF16, BF16), (F32, BF16), (F32, F32), (F16, F16)] * 7
    shapes = [(i + 1,) for i in range(len(dtypes))] + [(0,)]
    dtypes.append((F32, F32))
    trust = [i % 3 != 0 for i in range(len(shapes))]
    plan = make_plan(shapes, dtypes, trust=trust, tuning=P.Tuning(slots=3))
    for kind, chosen in [
        (P.UPDATE, [i for i, s in enumerate(shapes) if s != (0,)]),
        (P.SUMS, [i for i, s in enumerate(shapes) if s != (0,) and trust[i]]),
    ]:
        launches = plan.launches(kind)
        seen = [i for launch in launches for i in launch.leaves]
        assert sorted(seen) == chosen
        for launch in launches:
            assert 1 <= len(launch.leaves) <= 3
            for i in launch.leaves:
                p, g = (np.dtype(d).name for d in dtypes[i])
                assert (launch.param_dtype, launch.grad_dtype) == (p, g)
        groups = {(la.param_dtype, la.grad_dtype) for la in launches}
        per_group = [
            sum(
                1 for i in chosen if (np.dtype(dtypes[i][0]).name, np.dtype(dtypes[i][1]).name) == g
            )
            for g in groups
        ]
        assert len(launches) == sum(-(-k // 3) for k in per_group)


def test_resnet50_takes_one_launch_per_pass():
    """The figure the backend's docstrings give: 161 float32 leaves, 192 per launch.

    The kernels issue's bound is four launches per dtype group and step.
    """
    shapes = resnet50_shapes()
    assert len(shapes) == 161
    clip = LarsConfig(weight_decay=1e-4, grad_clip_norm=1.0)
    plan = make_plan(shapes, config=clip)
    assert plan.count_launches() == {P.GLOBAL_NORM: 1, P.FUSED: 1}
    assert make_plan(shapes).count_launches() == {P.FUSED: 1}
    two_pass = P.Tuning(fused=False)
    plan = make_plan(shapes, config=clip, tuning=two_pass)
    assert plan.count_launches() == {P.SUMS: 1, P.UPDATE: 1, P.GLOBAL_NORM: 1}
    # With 64 slots (CUDA before 12.1): three per pass.
    plan = make_plan(shapes, tuning=P.Tuning(slots=64))
    assert plan.count_launches() == {P.FUSED: 3}
    plan = make_plan(shapes, tuning=P.Tuning(slots=64, fused=False))
    assert plan.count_launches() == {P.SUMS: 3, P.UPDATE: 3}
    # BatchNorm and biases excluded from the trust ratio: 54 leaves measured.
    trust = [len(s) > 1 for s in shapes]
    plan = make_plan(shapes, trust=trust, tuning=two_pass)
    assert plan.count_launches() == {P.SUMS: 1, P.UPDATE: 1}
    programs = sum(la.num_programs for la in plan.launches(P.UPDATE))
    chunks = [-(-int(np.prod(s)) // P.CHUNK) for s in shapes]
    assert programs == sum(chunks)
    # Fused: an update item per chunk, a sums item per chunk of a multi-chunk
    # leaf with a trust ratio (a single-chunk one is one item for both).
    plan = make_plan(shapes, trust=trust)
    (launch,) = plan.launches(P.FUSED)
    sums = sum(c for c, t in zip(chunks, trust, strict=True) if t and c > 1)
    assert launch.num_programs == sum(chunks) + sums


def _fused_case(chunk):
    rng = np.random.default_rng(1)
    sizes = [1, chunk, chunk + 1, 3 * chunk, 5, 7 * chunk - 3, 2 * chunk, 1, chunk - 1]
    sizes += [int(n) for n in rng.integers(1, 5 * chunk, 12)]
    decay = [i % 2 == 0 for i in range(len(sizes))]
    trust = [i % 5 != 3 for i in range(len(sizes))]
    return sizes, decay, trust


@pytest.mark.parametrize("lookahead", [0, 1, 3, 40, 10_000])
def test_fused_table_covers_and_orders_every_item(lookahead):
    """Update (or whole) items cover each element once; sums items cover each
    multi-chunk trust leaf once; every update item comes after all of its leaf's
    sums items, exactly ``lookahead`` sums/whole items later (or at the end)."""
    chunk = 64
    sizes, decay, trust = _fused_case(chunk)
    table, spans = P.make_fused_table(sizes, decay, trust, chunk, lookahead)
    assert table.dtype == np.int32 and table.shape[1] == P.TABLE_COLUMNS
    kind = table[:, P.COL_KIND]
    streaming = np.isin(kind, [P.KIND_SUMS, P.KIND_WHOLE])  # the items that count
    next_row = 0
    for slot, n in enumerate(sizes):
        mine = table[:, P.COL_SLOT] == slot
        rows = table[mine]
        chunks = -(-n // chunk)
        assert (rows[:, P.COL_DECAY] == int(decay[slot])).all()
        assert (rows[:, P.COL_TRUST] == int(trust[slot])).all()
        assert (rows[:, P.COL_CHUNKS] == chunks).all()
        covered = np.zeros(n, int)
        sums_covered = np.zeros(n, int)
        for r in rows:
            c, length = r[P.COL_CHUNK], r[P.COL_LENGTH]
            assert length == min(chunk, n - c * chunk) > 0
            target = sums_covered if r[P.COL_KIND] == P.KIND_SUMS else covered
            target[c * chunk : c * chunk + length] += 1
        np.testing.assert_array_equal(covered, 1)
        multi = trust[slot] and chunks > 1
        np.testing.assert_array_equal(sums_covered, 1 if multi else 0)
        if trust[slot] and chunks == 1:
            assert list(rows[:, P.COL_KIND]) == [P.KIND_WHOLE]
        if not trust[slot]:
            assert (rows[:, P.COL_KIND] == P.KIND_UPDATE).all()
        # Partial rows: consecutive, in slot order, one per chunk.
        assert spans[slot] == (next_row, next_row + (chunks if multi else 0))
        next_row = spans[slot][1]
        assert (rows[:, P.COL_FIRST_ROW] == spans[slot][0]).all()
        if multi:
            where = np.flatnonzero(mine)
            sums_at = where[rows[:, P.COL_KIND] == P.KIND_SUMS]
            update_at = where[rows[:, P.COL_KIND] == P.KIND_UPDATE]
            assert sums_at.max() < update_at.min()
            between = int(streaming[sums_at.max() + 1 : update_at.min()].sum())
            after = int(streaming[sums_at.max() + 1 :].sum())
            assert between == min(lookahead, after)


def test_fused_table_without_trust_ratios_is_updates_only():
    table, spans = P.make_fused_table([5, 300, 0], [True] * 3, [False] * 3, 64, 8)
    assert (table[:, P.COL_KIND] == P.KIND_UPDATE).all()
    assert table.shape[0] == 1 + 5 and spans == [(0, 0)] * 3


def test_kernel_specs_match_the_options():
    plan = make_plan([(5,)], config=LarsConfig())
    (launch,) = plan.launches(P.UPDATE)
    assert P.kernel_spec(launch, plan.flags) == P.KernelSpec(P.UPDATE, 1, False)  # w not read
    plan = make_plan([(5,)], config=LarsConfig(weight_decay=0.1))
    assert P.kernel_spec(plan.launches(P.UPDATE)[0], plan.flags).with_params
    plan = make_plan([(5,)], config=LarsConfig(), write=True)
    assert P.kernel_spec(plan.launches(P.UPDATE)[0], plan.flags).with_params
    assert P.kernel_spec(plan.launches(P.SUMS)[0], plan.flags).with_params


@pytest.mark.parametrize(
    "dtypes, match",
    [
        (
            [(jnp.float64, jnp.float64)],
            r"float64 params with float64 gradients \(the leaf at \[0\]\)",
        ),
        ([(F32, jnp.float64)], r"float32 params with float64 gradients \(the leaf at \[0\]\)"),
        ([(F32, F32), (jnp.int32, jnp.int32)], r"int32 params .*\(the leaf at \[1\]\)"),
    ],
)
def test_unhandled_dtypes_are_refused_naming_the_leaf(dtypes, match):
    """The backend's dtypes are the kernels' (float32 compute); the front end names the leaf."""
    spec = make_spec([(3,)] * len(dtypes), dtypes)
    paths = [f"[{i}]" for i in range(len(dtypes))]
    with pytest.raises(TypeError, match=match):
        _dispatch.check_step(BACKEND, spec, paths, auto=False)


def test_a_leaf_too_large_for_the_tile_table_is_unsupported():
    tuning = P.Tuning(chunk=1, block=1)
    assert BACKEND.unsupported(make_spec([(2**31 - 1,)], tuning=tuning), "gpu") is None
    spec = make_spec([(3,), (2**31,)], tuning=tuning)
    reason = BACKEND.unsupported(spec, "gpu")
    assert reason is not None and reason.startswith("leaf 1 has 2147483648 elements")
    assert BACKEND.unsupported(make_spec([(2**31,)]), "gpu") is None  # 8192-element chunks


def test_every_option_is_supported_and_the_missing_gpu_is_named():
    config = LarsConfig(
        weight_decay=0.1,
        nesterov=True,
        trust_clip=1.0,
        grad_clip_norm=1.0,
        grad_clip_value=0.1,
        lr_inside_momentum=True,
    )
    assert BACKEND.unsupported(make_spec([(3,)], config=config), "gpu") is None
    assert BACKEND.unsupported(make_spec([(3,)], config=LarsConfig()), "gpu") is None
    assert BACKEND.features("gpu") == {Feature.IN_PLACE, Feature.SKIP_NONFINITE}
    assert BACKEND.dtypes == FLOAT32_COMPUTE_DTYPES
    missing = BACKEND.unavailable(jax.default_backend())
    if jax.default_backend() != "gpu":
        assert missing is not None and missing.startswith("no GPU")
    assert BACKEND.unavailable("cpu").startswith("no GPU")


def test_backend_options_are_the_tuning_checked_by_name():
    given = {"slots": 64, "chunk": 4096, "block": 512, "num_warps": 8, "fused": False}
    given["lookahead"] = np.int64(3)
    normalised = BACKEND.options(given)
    assert normalised == {**given, "lookahead": 3} and type(normalised["lookahead"]) is int
    spec = make_spec([(3,)]).replace(options=tuple(sorted(normalised.items())))
    assert P.StepPlan.of(spec).tuning == P.Tuning(**normalised)
    assert BACKEND.options({}) == {}
    with pytest.raises(ValueError, match="unknown triton backend option 'slot'"):
        BACKEND.options({"slot": 4})
    with pytest.raises(TypeError, match="'fused' must be a bool"):
        BACKEND.options({"fused": 1})
    with pytest.raises(TypeError, match="'chunk' must be an int"):
        BACKEND.options({"chunk": 2048.0})
    with pytest.raises(TypeError, match="'slots' must be an int"):
        BACKEND.options({"slots": True})
    for name, value in [("slots", 0), ("block", 96), ("chunk", 1000), ("num_warps", 3)]:
        with pytest.raises(ValueError, match=name):
            BACKEND.options({name: value})
    with pytest.raises(ValueError, match="lookahead"):
        BACKEND.options({"lookahead": -1})
    assert BACKEND.options({"evict_first": np.bool_(False)}) == {"evict_first": False}
    with pytest.raises(TypeError, match="'evict_first' must be a bool"):
        BACKEND.options({"evict_first": 0})
    with pytest.raises(TypeError, match="evict_first must be a bool"):
        P.Tuning(evict_first="no")
    assert BACKEND.options({"pointer_table": True}) == {"pointer_table": True}
    with pytest.raises(TypeError, match="'pointer_table' must be a bool"):
        BACKEND.options({"pointer_table": 1})
    with pytest.raises(TypeError, match="pointer_table must be a bool"):
        P.Tuning(pointer_table="yes")


@pytest.mark.parametrize(
    "missing, message",
    [
        ("triton", "triton is not installed"),
        ("jax_triton", "jax-triton is not installed"),
        ("jax_triton_gpu", "jax-triton cannot be imported: needs a GPU jaxlib"),
    ],
)
def test_a_missing_package_is_named(monkeypatch, missing, message):
    if missing == "jax_triton_gpu":  # what importing jax-triton does with a CPU jaxlib
        error = ImportError("needs a GPU jaxlib")
        monkeypatch.setattr("builtins.__import__", _import_failing("jax_triton", error))
    else:
        monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError
    triton_backend._import_problem.cache_clear()
    try:
        assert triton_backend._import_problem().startswith(message)
        assert BACKEND.unavailable("gpu").startswith(message)
    finally:
        triton_backend._import_problem.cache_clear()


def _import_failing(name, error):
    real = __import__

    def fake(module, *args, **kwargs):
        if module == name:
            raise error
        return real(module, *args, **kwargs)

    return fake


# --------------------------------------------------------------------------
# The kernels in Triton's interpreter (a subprocess: TRITON_INTERPRET=1 first).


@pytest.mark.slow
def test_kernels_in_the_interpreter():
    """Runs triton_interpret_*.py; every test there must pass (none skipped)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "triton_interpret_cases.py",
        "triton_interpret_steps.py",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(
        cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30, summary
    assert not re.search(r"skipped|xfail|deselected|error", summary), summary
