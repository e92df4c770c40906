"""The static kernel report (bench/kernel_report.py): its parsing, and the limits it holds.

The GPU kernels are compiled for sm_90 on the host (Triton's pipeline and its
bundled ptxas; nvcc for the CUDA handler): every default Triton kernel tested
here must use at most 128 registers per thread, spill nothing and use no
stack or local memory. The full matrix (every form, dtype group and flag set)
is ``python -m bench.kernel_report``; the test compiles the fused kernel of
every dtype group and the two-pass kernels of one, with every option on.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree
    sys.path.insert(0, str(ROOT))

from bench import kernel_report as K  # noqa: E402
from lars.kernels.triton import plan as P  # noqa: E402

# ptxas -v output, as nvcc prints it (stderr) for two functions.
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'bar' for 'sm_90'
ptxas info    : Function properties for bar
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 8264 bytes cmem[0]
"""


def test_ptxas_log_is_read_per_function():
    stats = K.parse_ptxas_log(PTXAS_LOG)
    assert stats["_Z3fooPf"] == {
        "stack_bytes": 16,
        "spill_store_bytes": 8,
        "spill_load_bytes": 12,
        "registers": 255,
        "shared_bytes": 2048,
    }
    assert stats["bar"]["registers"] == 40 and stats["bar"]["shared_bytes"] == 0
    assert stats["bar"]["spill_store_bytes"] == stats["bar"]["spill_load_bytes"] == 0


def test_ptx_parameter_bytes_count_pointers_scalars_and_structs():
    ptx = (
        ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
        "\t.param .u32 k_param_1,\n\t.param .align 8 .b8 k_param_2[1552]\n)\n"
    )
    assert K.ptx_params_bytes(ptx, "k") == 8 + 4 + 1552
    with pytest.raises(ValueError, match="entry j"):
        K.ptx_params_bytes(ptx, "j")


def test_violations_name_spills_local_memory_and_registers():
    row = dict(
        registers=128,
        spill_store_bytes=0,
        spill_load_bytes=0,
        stack_bytes=0,
        local_bytes=0,
    )
    assert K.violations(row) == []
    assert K.violations({**row, "registers": 129}) == ["129 registers > 128"]
    assert "spills 4/0 B" in K.violations({**row, "spill_store_bytes": 4})
    assert K.violations({**row, "local_bytes": 8}) == ["stack 0 B, local 8 B"]


def test_the_cases_are_the_plans_launches():
    cases = K.triton_cases()
    names = {c.name for c in cases}
    assert len(names) == len(cases)
    slots = P.SLOTS_PER_LAUNCH
    for group in K.GROUPS:
        tag = "/".join(group)
        for flags in K.FLAG_SETS:
            assert f"lars_fused_{slots}_w[{tag},{flags}]" in names
        for flags in ("apply", "apply_decay", "all"):  # in place: apply_decay's sums
            assert f"lars_sums_{slots}_w[{tag},{flags}]" in names
        assert f"lars_sums_{slots}_w[{tag},step_in_place]" not in names
        assert f"lars_update_{slots}[{tag},apply]" in names  # no params read
        assert f"lars_update_{slots}_w[{tag},step_in_place]" in names
        assert f"lars_global_norm_{slots}[{tag},all]" in names  # grad_clip_norm only
    assert all(c.spec.slots == slots for c in cases)


def assert_within_limits(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        assert row["registers"] > 0, row
        assert K.violations(row) == [], (row["kernel"], K.violations(row))


@pytest.mark.slow
def test_default_triton_kernels_fit_the_limits(tmp_path):
    """Every option on: the fused kernel of every dtype group (through the command
    line, JSON out), the two-pass kernels of float32; 16-byte loads in each."""
    out = tmp_path / "report.json"
    argv = ["--forms", "fused", "--flags", "all", "--no-cuda", "--jobs", "2", "--json", str(out)]
    assert K.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["group"] for r in rows} == {"/".join(g) for g in K.GROUPS}
    assert {r["pass"] for r in rows} == {P.FUSED, P.GLOBAL_NORM}  # grad_clip_norm is on
    cases = K.triton_cases(["two_pass"], [("float32", "float32")], ["all"])
    cases = [c for c in cases if c.spec.kind != P.GLOBAL_NORM]  # compiled above
    two_pass, errors = K.report(cases, cuda=False, jobs=2)
    assert not errors
    assert {r["pass"] for r in two_pass} == {P.SUMS, P.UPDATE}
    rows += two_pass
    assert_within_limits(rows)
    for row in rows:
        assert row["vector_loads"] and row["ldg128"] > 0, row["kernel"]
        # The SASS is counted: each program reads its slot's pointers from the
        # constant bank (the kernel parameters).
        assert row["sass_instructions"] > row["const_loads"] > 0, row["kernel"]
        if row["pass"] in (P.FUSED, P.UPDATE):  # 16-byte stores, hinted or not
            assert row["stg128"] > 0, row["kernel"]
        assert row["param_bytes"] >= 8 * P.SLOTS_PER_LAUNCH  # a pointer per leaf at least
        assert row["param_bytes"] <= 32764  # CUDA 12.1+'s kernel parameter space


@pytest.mark.slow
@pytest.mark.parametrize("flags_name", ["apply", "all"])
def test_the_pointer_table_variant_fits_the_limits(flags_name):
    """``pointer_table``: the fused kernel with the table (a pointer from two
    loaded words, aligned as the arguments are) keeps its 16-byte accesses and
    the limits; the select chains are gone from the item's path: beside the
    publishing's constant-bank loads (ptxas reads each 64-bit argument as two
    words for each of the two words it stores: 4 per address, 3,840 at 192
    slots with Triton 3.6.0), fewer than a tenth of the chain's are left."""
    tuning = P.Tuning(pointer_table=True)
    (case,) = [
        c
        for c in K.triton_cases(["fused"], [("float32", "float32")], [flags_name], tuning)
        if c.spec.kind == P.FUSED
    ]
    row = K.compile_triton(case, tuning)
    assert_within_limits([row])
    assert row["ldg128"] > 0 and row["stg128"] > 0
    chain = K.compile_triton(case)
    publishing = 4 * P.FUSED_ROLES * case.spec.slots
    assert row["const_loads"] - publishing < chain["const_loads"] / 10


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_cuda_handler_fits_the_limits():
    rows = K.compile_cuda()
    assert len(rows) >= 2
    assert all(r["source"] == "cuda" for r in rows)
    assert_within_limits(rows)
