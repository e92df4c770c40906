"""Tests of the Triton backend (lars.kernels.triton) that run without a GPU.

* The launch plan, in pure Python: tile tables, dtype groups, launch counts
  (ResNet-50's included).
* The kernels compiled for an NVIDIA Hopper GPU (sm_90) on the CPU: Triton's
  whole pipeline down to PTX and a cubin (ptxas), for every pass and dtype group.
* The GPU launcher: the backend's step lowered for CUDA through jax-triton's
  own ``triton_call`` (jax-triton imports only with a GPU jaxlib, so its module
  is loaded with a stand-in for jaxlib's CUDA-only Triton extension: the
  lowering, the kernel specialisation and compilation are jax-triton's).
* The kernels themselves, run in Triton's interpreter: ``triton_interpret_cases.py``
  in a subprocess with ``TRITON_INTERPRET=1`` (set before triton is imported).

triton (``pip install .[test]`` installs it) is required: without it these
tests fail rather than skip. The jax-triton lowering test needs jax-triton
too (also in the test extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton  # noqa: F401  (required: a missing triton fails here, it is not skipped)
from backend_base import ALL_OPTIONS

import lars.kernels.triton as triton_backend
from lars import _dispatch
from lars._config import LarsConfig
from lars.contract import FLOAT32_COMPUTE_DTYPES, Feature, StepInputs, StepSpec
from lars.kernels.triton import BACKEND, aot, backend
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
# Compiled for Hopper on the CPU.

ALL_ON = ALL_OPTIONS
# In place and skipping a non-finite step: the select the skip adds must keep
# the vector accesses (checked below), in both forms of the first output.
IN_PLACE_SKIP = P.Flags(has_decay=True, write_params=True, skip_nonfinite=True)
KERNELS = [
    (P.KernelSpec(P.GLOBAL_NORM, 5, False), ALL_ON),
    (P.KernelSpec(P.SUMS, 5, True), ALL_ON),
    (P.KernelSpec(P.UPDATE, 5, True), ALL_ON),
    (P.KernelSpec(P.UPDATE, 5, True), IN_PLACE_SKIP),
    (P.KernelSpec(P.UPDATE, 5, False), P.Flags(skip_nonfinite=True)),
    (P.KernelSpec(P.FUSED, 5, True), ALL_ON),
    (P.KernelSpec(P.FUSED, 5, True), IN_PLACE_SKIP),
]
GROUPS = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]
GROUPS.append(("float16", "float16"))


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "_".join(g))
@pytest.mark.parametrize("kernel", range(len(KERNELS)))
def test_compiles_for_hopper(kernel, group):
    """PTX and a cubin for sm_90; full chunks use 16-byte vector accesses; no fused multiply-add."""
    spec, flags = KERNELS[kernel]
    compiled = aot.compile_kernel(spec, *group, flags)
    ptx = compiled.asm["ptx"]
    assert re.search(rf"\.visible \.entry {spec.name}\(", ptx)
    assert ".target sm_90a" in ptx
    assert len(compiled.asm["cubin"]) > 1000
    # A pointer parameter per array (Triton appends its own scratch pointers).
    assert ptx.count(".param .u64") >= len(spec.arg_names())
    # (.L1::evict_first.L2::cache_hint between: the fused update's hints)
    assert re.search(r"ld\.global(\.[\w:]+)*\.v4\.", ptx), "no vectorised loads"
    if spec.kind in (P.UPDATE, P.FUSED):
        assert re.search(r"st\.global(\.[\w:]+)*\.v4\.", ptx), "no vectorised stores"
        if "bfloat16" in group[0]:
            assert "cvt.rn.bf16" in ptx  # round to nearest even, as XLA
    assert "fma." not in ptx  # contraction off: the reference's rounding
    # Division and square root rounded as XLA rounds them (no approximations).
    assert not re.search(r"(div|sqrt|rcp)\.(approx|full)", ptx)
    if spec.kind == P.FUSED:
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx  # the trust ratio
        # The item counter, a leaf's arrivals (release the partials, acquire
        # them in the last arrival), its ready flag (release, acquire).
        assert re.search(r"atom\.global\.gpu\.relaxed\.add", ptx)
        assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)
        assert re.search(r"atom\.global\.gpu\.release\.exch", ptx)
        assert re.search(r"ld\.global\.gpu\.acquire", ptx)
        # Partials and ratios written by other SMs are read past L1.
        assert re.search(r"ld\.global\.cg", ptx)


def test_only_a_spin_limit_compiles_the_bounded_wait():
    """The debug switch's check (a relaxed exchange of the error word) is in the
    PTX with spin_limit > 0 and absent at the default 0."""
    spec = P.KernelSpec(P.FUSED, 5, True)
    exch = r"atom\.global\.gpu\.relaxed\.exch"
    default = aot.compile_kernel(spec, "float32", "float32", ALL_ON).asm["ptx"]
    bounded = aot.compile_kernel(spec, "float32", "float32", ALL_ON, P.Tuning(spin_limit=1000)).asm[
        "ptx"
    ]
    assert not re.search(exch, default)
    assert re.search(exch, bounded)


def _hinted(ptx: str, op: str) -> list[str]:
    """The global ``op`` ("ld" or "st") instructions of ``ptx`` with an L2 cache hint."""
    return re.findall(rf"{op}\.global[\w.:]*\.L2::cache_hint[\w.]*", ptx)


def test_the_fused_update_loads_and_stores_carry_the_evict_first_hint():
    """With ``evict_first`` (the default) the fused update's loads and stores
    take an ``L2::evict_first`` policy; the sums half's loads do not, and
    nothing is hinted with the option off or in the two-pass update."""
    spec = P.KernelSpec(P.FUSED, 5, True)
    hinted = aot.compile_kernel(spec, "float32", "float32", ALL_ON).asm["ptx"]
    plain = aot.compile_kernel(spec, "float32", "float32", ALL_ON, P.Tuning(evict_first=False)).asm[
        "ptx"
    ]
    assert P.Tuning().evict_first
    assert "createpolicy.fractional.L2::evict_first" in hinted
    assert _hinted(hinted, "ld") and _hinted(hinted, "st")
    assert any(".v4." in op for op in _hinted(hinted, "ld") + _hinted(hinted, "st"))
    assert re.search(r"ld\.global\.v4\.", hinted)  # the sums half: no hint
    assert not re.search(r"st\.global\.v4\.", hinted)  # every vector store is the update's
    assert "createpolicy" not in plain and "cache_hint" not in plain
    two_pass = P.KernelSpec(P.UPDATE, 5, True)
    update = aot.compile_kernel(two_pass, "float32", "float32", ALL_ON).asm["ptx"]
    assert "cache_hint" not in update and re.search(r"st\.global\.v4\.", update)


@pytest.mark.slow
def test_the_default_launch_fits_the_kernel_parameter_limit():
    """The widest kernel's parameters fit the 32 kB of CUDA 12.1+ and ptxas takes them."""
    spec = P.KernelSpec(P.FUSED, P.SLOTS_PER_LAUNCH, True)
    widest_two_pass = P.KernelSpec(P.UPDATE, P.SLOTS_PER_LAUNCH, True)
    assert len(spec.arg_names()) >= len(widest_two_pass.arg_names())
    assert 4096 < 8 * len(spec.arg_names()) <= 32764
    assert 8 * len(P.KernelSpec(P.FUSED, 64, True).arg_names()) <= 4096  # Tuning(slots=64)
    compiled = aot.compile_kernel(spec, "float32", "float32", ALL_ON)
    assert compiled.asm["ptx"].count(".param .u64") >= len(spec.arg_names())


# --------------------------------------------------------------------------
# The GPU launcher, lowered for CUDA through jax-triton on the CPU.


def load_jax_triton_lib():
    """jax_triton.triton_lib, with a stand-in for jaxlib's CUDA-only Triton extension.

    Returns (module, compiled) where ``compiled`` collects the kernels
    jax-triton compiled (name, PTX, ...) during lowering. The stand-in only
    records what jax-triton would hand to the CUDA runtime.
    """
    spec = importlib.util.find_spec("jax_triton")
    assert spec is not None, "jax-triton is not installed (it is in the test extra)"
    path = os.path.join(spec.submodule_search_locations[0], "triton_lib.py")
    cache_dir = os.environ.get("TRITON_CACHE_DIR")  # the module overwrites it
    module_spec = importlib.util.spec_from_file_location("_jax_triton_lib_on_cpu", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    compiled = []
    module.recorded_zeroed_bytes = []  # per array parameter, bytes zeroed before the launch

    class KernelCall:
        def __init__(self, kernel, grid_x, grid_y, grid_z, params):
            self.kernel, self.grid, self.params = kernel, (grid_x, grid_y, grid_z), params

        def to_proto(self, name, metadata):
            return repr((self.kernel[0], self.grid, len(self.params))).encode()

    def triton_kernel(name, num_warps, num_ctas, shared_mem, binary, ttir, capability):
        compiled.append(dict(name=name, num_warps=num_warps, ptx=binary, capability=capability))
        return (name,)

    module.triton_kernel_call_lib = types.SimpleNamespace(
        TritonKernel=triton_kernel,
        TritonKernelCall=KernelCall,
        create_array_parameter=lambda zeroed_bytes, alignment: (
            module.recorded_zeroed_bytes.append(zeroed_bytes) or ("array", alignment)
        ),
        create_scalar_parameter=lambda value, dtype: ("scalar", value, dtype),
        get_compute_capability=lambda device: 90,
    )
    return module, compiled


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("write_params", [False, True], ids=["updates", "in_place"])
def test_step_lowers_for_cuda_through_jax_triton(monkeypatch, write_params, fused):
    jt, compiled = load_jax_triton_lib()
    monkeypatch.setattr(backend, "_triton_call", lambda: jt.triton_call)
    shapes = [(), (127,), (3, 3, 4, 8), (0,), (4097,), (33,), (6, 7)]
    dtypes = [(F32, F32), (BF16, BF16), (F32, F32), (F32, F32), (F32, BF16), (F32, F32)]
    dtypes.append((BF16, BF16))
    rng = np.random.default_rng(0)
    params = [
        jnp.asarray(rng.standard_normal(s), p) for s, (p, _) in zip(shapes, dtypes, strict=True)
    ]
    grads = [
        jnp.asarray(rng.standard_normal(s), g) for s, (_, g) in zip(shapes, dtypes, strict=True)
    ]
    momentum = [jnp.zeros(s, F32) for s in shapes]
    config = LarsConfig(weight_decay=0.01, grad_clip_norm=1.0, nesterov=True)
    # The in-place form also skips a non-finite step itself.
    spec = make_spec(
        shapes, dtypes, config=config, tuning=P.Tuning(fused=fused), write=write_params
    ).replace(skip_nonfinite=write_params)

    def step(params, grads, momentum, lr, finite):
        return BACKEND.run(spec, StepInputs(params, grads, momentum, lr, finite=finite))

    def lower(lr):
        finite = jnp.bool_(True) if write_params else None
        traced = jax.jit(step, donate_argnums=(0, 2)).trace(params, grads, momentum, lr, finite)
        return traced.lower(lowering_platforms=("cuda",)).as_text()

    zeroed_bytes = jt.recorded_zeroed_bytes
    text = lower(jnp.float32(0.1))
    # 3 dtype groups x 2 passes (global norm, fused) or 3 (global norm, sums,
    # update), one custom call each.
    passes = [("global_norm", "")]
    passes += [("fused", "_w")] if fused else [("sums", "_w"), ("update", "_w")]
    calls = re.findall(r"stablehlo\.custom_call @triton_kernel_call", text)
    assert len(calls) == 3 * len(passes)
    # Groups: float32 (3 non-empty leaves), bfloat16 (2), float32 with bfloat16 grads (1).
    assert sorted(c["name"] for c in compiled) == sorted(
        f"lars_{kind}_{n}{suffix}" for kind, suffix in passes for n in (3, 2, 1)
    )
    # The fused launches' item counters and flags are zeroed inside the call.
    zeroed = [z for z in zeroed_bytes if z]
    assert zeroed == ([4 * (1 + 2 * n) for n in (3, 2, 1)] if fused else [])
    assert all(c["capability"] == 90 and ".entry lars_" in c["ptx"] for c in compiled)
    assert all(c["num_warps"] == P.NUM_WARPS for c in compiled)
    assert not any("fma." in c["ptx"] for c in compiled)  # enable_fp_fusion=False reached Triton
    # In place: every momentum (and with write_params every param) aliases an output.
    aliased = len(re.findall(r"#stablehlo\.output_operand_alias<", text))
    assert aliased == (2 if write_params else 1) * 6  # the 6 non-empty leaves
    # The learning rate is an operand, not a constant: a new one compiles nothing new.
    assert lower(jnp.float32(0.7)) == text


# --------------------------------------------------------------------------
# The kernels in Triton's interpreter (a subprocess: TRITON_INTERPRET=1 first).


@pytest.mark.slow
def test_kernels_in_the_interpreter():
    """Runs triton_interpret_cases.py; every test there must pass (none skipped)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "triton_interpret_cases.py",
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
