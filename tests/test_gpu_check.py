"""Tests of the one-command GPU validation, ``bench.gpu_check`` (``make gpu-check``).

The GPU run itself needs a GPU; what is checked here is the harness: its
comparisons catch what they must (NaN where a value was expected, a wrong
value, different bits), a hanging step is killed at its timeout, ncu's CSV is
summed, the report names failures, and the whole run in ``--cpu`` mode (the
interpreted kernels at tiny sizes, in a subprocess) passes every phase and
writes its JSON and Markdown reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    gpu_check,
    gpu_check_cases,
    gpu_check_correctness,
    gpu_check_ncu,
    gpu_check_phases,
    gpu_check_report,
    gpu_check_timing,
)


def test_scaled_error_catches_unwritten_and_wrong_values():
    want = np.array([1.0, -2.0, 0.5], np.float32)
    assert gpu_check_cases.scaled_error(want, want) == 0.0
    # An element left at the poison value.
    assert gpu_check_cases.scaled_error(np.array([1.0, np.nan, 0.5]), want) == np.inf
    # A wrong value: |0.5 - 0.25| / max|want| = 0.125.
    assert gpu_check_cases.scaled_error(np.array([1.0, -2.0, 0.25]), want) == pytest.approx(0.125)
    # NaN where the reference has NaN too is agreement; an empty leaf has no error.
    nan = np.array([np.nan, 1.0], np.float32)
    assert gpu_check_cases.scaled_error(nan, nan) == 0.0
    assert gpu_check_cases.scaled_error(np.zeros((0,)), np.zeros((0,))) == 0.0


def test_bitwise_equal_tells_apart_one_ulp_and_signed_zero():
    a = {"x": jnp.array([1.0, 0.0], jnp.float32)}
    assert gpu_check_cases.bitwise_equal(a, {"x": jnp.array([1.0, 0.0], jnp.float32)})
    ulp = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert not gpu_check_cases.bitwise_equal(a, {"x": jnp.array([ulp, 0.0], jnp.float32)})
    assert not gpu_check_cases.bitwise_equal(a, {"x": jnp.array([1.0, -0.0], jnp.float32)})


def test_ncu_profiles_the_unmeasured_forms_first(monkeypatch):
    """On a GPU: native fused (never run), native and Pallas (their kernel time), Triton."""
    monkeypatch.setattr(gpu_check_cases.Form, "unavailable", lambda self: None)
    names = [f.name for f in gpu_check_ncu._ncu_forms(cpu=False)]
    assert names[:4] == ["native-fused", "native", "pallas", "triton"]
    assert sorted(names) == sorted(f.name for f in gpu_check_cases.forms(cpu=False))


def test_every_form_runs_every_option_set_dtype_and_mode_on_a_gpu():
    listed = gpu_check_correctness._correctness_cases(cpu=False)
    cases = {(f.name, m, d, c) for f, m, d, c in listed}
    forms = {f.name for f in gpu_check_cases.forms(cpu=False)}
    assert forms == {"native", "native-fused", "pallas", "triton", "triton-2pass"}
    for f in forms:
        for m in gpu_check_cases.MODES:
            assert {c for g, n, d, c in cases if (g, n, d) == (f, m, "fp32")} == set(
                gpu_check_cases.CONFIGS
            )
            assert {d for g, n, d, c in cases if (g, n, c) == (f, m, "everything")} == set(
                gpu_check_cases.DTYPES
            )
    # With --cpu every form meets every option set, and both modes.
    cpu = gpu_check_correctness._correctness_cases(cpu=True)
    for f in gpu_check_cases.forms(cpu=True):
        assert {c for g, _, _, c in cpu if g == f} == set(gpu_check_cases.CONFIGS)
        assert {m for g, m, _, _ in cpu if g == f} == set(gpu_check_cases.MODES)


def test_the_loop_checks_compare_the_steps_state_carried_over(monkeypatch):
    """native (the CPU handler) in a 3-step loop matches the reference's loop;
    against a reference loop of one step less, the same check fails."""
    import concurrent.futures

    native = [f for f in gpu_check_cases.forms(cpu=True) if f.name == "native"]
    monkeypatch.setattr(gpu_check_cases, "forms", lambda cpu: native)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        checks = gpu_check_correctness._loop_checks(True, pool)
        assert [name for name, _ in checks] == ["native/apply/fp32/3-steps"]
        ok, errs = checks[0][1]()
        assert ok, errs
        prepare = gpu_check_correctness._prepare

        def short_reference(pool, form, kwargs, mode, params, grads, steps=1):
            return prepare(pool, form, kwargs, mode, params, grads, steps - (form is None))

        monkeypatch.setattr(gpu_check_correctness, "_prepare", short_reference)
        ok, errs = gpu_check_correctness._loop_checks(True, pool)[0][1]()
        assert not ok and float(errs["params"]) > 1e-3, errs


def test_the_odd_shapes_are_there():
    sizes = {int(np.prod(s)) for s in gpu_check_cases.odd_shapes(cpu=False)}
    assert {1, 127, 4097, 65537, 0} <= sizes
    assert () in gpu_check_cases.odd_shapes(cpu=False)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    fields = gpu_check.stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the processes")
def test_a_hanging_step_is_killed_at_its_timeout_with_all_it_started(tmp_path):
    """The step's children go too, also one in a process group of its own (as ninja
    starts its compilers) and one whose own child lives in a third group."""
    pids = tmp_path / "pids"
    grandchild = (
        "import subprocess, time; "
        "s = subprocess.Popen(['sleep', '60'], process_group=0); "
        f"open({str(pids)!r}, 'a').write(f' {{s.pid}}'); time.sleep(60)"
    )
    script = f"""
import subprocess, sys, time
a = subprocess.Popen(['sleep', '60'])
b = subprocess.Popen(['sleep', '60'], process_group=0)
c = subprocess.Popen([sys.executable, '-c', {grandchild!r}], process_group=0)
open({str(pids)!r}, 'a').write(f' {{a.pid}} {{b.pid}} {{c.pid}}')
time.sleep(60)
"""
    with open(tmp_path / "log", "w") as log:
        start = time.perf_counter()
        rc, seconds = gpu_check._run([sys.executable, "-c", script], log, 4.0, dict(os.environ))
    assert rc is None
    assert seconds < 20 and time.perf_counter() - start < 20
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 4, started  # the three children and the grandchild's sleep
    deadline = time.perf_counter() + 10
    while any(_alive(p) for p in started) and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not [p for p in started if _alive(p)]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_session_members_are_read_from_proc():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert gpu_check._session_members(proc.pid) == [proc.pid]
        assert proc.pid not in gpu_check._session_members(os.getsid(0))
        assert os.getpid() in gpu_check._session_members(os.getsid(0))
    finally:
        proc.kill()
        proc.wait()
    assert gpu_check._session_members(proc.pid) == []


def test_a_step_that_outlives_its_kill_is_left_behind(tmp_path, monkeypatch):
    """A process stuck in the GPU driver can outlive SIGKILL: the run goes on."""
    killed = []
    monkeypatch.setattr(gpu_check, "_kill_session", killed.append)
    monkeypatch.setattr(gpu_check, "KILL_WAIT_S", 1.0)
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with open(tmp_path / "log", "w") as log:
        start = time.perf_counter()
        rc, seconds = gpu_check._run(cmd, log, timeout=1.0, env=dict(os.environ))
    try:
        assert rc is None and len(killed) == 1
        assert seconds < 15 and time.perf_counter() - start < 15
        assert "left behind" in (tmp_path / "log").read_text()
    finally:
        os.killpg(killed[0], signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(gpu_check.nvcc() is None, reason="needs nvcc to build the CUDA handler")
def test_the_build_step_builds_the_cuda_handler_alone(tmp_path):
    """What the GPU machine's second step runs, into a folder of the test's own."""
    lib = tmp_path / "lib"
    with open(tmp_path / "log", "w") as log:
        result = gpu_check._build(log, 600.0, dict(os.environ), tmp_path / "build", lib)
    assert result["status"] == "ok", (tmp_path / "log").read_text()[-4000:]
    assert sorted(os.listdir(lib)) == ["build-info.txt", "liblars_native_cuda.so"]
    assert "cpu: not built (LARS_NATIVE_CPU=OFF)" in result["build_info"]
    assert "cuda: built, architectures 90" in result["build_info"]
    # It exports the handler the native backend registers (loaded in a process of its own).
    probe = "import ctypes, sys; ctypes.CDLL(sys.argv[1]).LarsNativeStepCuda"
    subprocess.run([sys.executable, "-c", probe, str(lib / "liblars_native_cuda.so")], check=True)


def test_the_reports_are_written_after_every_step(tmp_path, monkeypatch):
    """A run cut short (the machine's call limit) leaves the steps it finished."""

    def phase(name, cpu, log, timeout, env, steps_per_call=1, held=None):
        if name == "correctness":
            raise KeyboardInterrupt  # the run is stopped during its second phase
        return {"status": "ok", "seconds": 1.0, "checks": [{"case": name, "ok": True}]}

    monkeypatch.setattr(gpu_check, "_phase", phase)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--cpu", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(doc["steps"]) == ["wheels", "build", "smoke"]
    assert doc["steps"]["smoke"]["status"] == "ok"
    assert doc["unfinished"] == f"the run had done 3 of {len(gpu_check.STEPS)} steps"
    assert "Unfinished: the run had done 3" in (tmp_path / "gpu_check.md").read_text()


NCU_CSV = """==PROF== Connected to process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python","h","lars_fused_2","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","1,000,000"
"0","1","python","h","lars_fused_2","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","400000"
"1","1","python","h","lars_fused_2","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","2000000"
"""  # noqa: E501


def test_ncu_csv_is_summed_per_metric_over_kernels():
    totals = gpu_check_ncu.parse_ncu_csv(NCU_CSV)
    assert totals["dram__bytes_read.sum"] == 3_000_000
    assert totals["dram__bytes_write.sum"] == 400_000
    assert totals["kernels"] == 2
    fused = totals["by_kernel"]["lars_fused_2"]
    assert fused == {
        "launches": 2,
        "dram__bytes_read.sum": 3_000_000,
        "dram__bytes_write.sum": 400_000,
    }
    assert gpu_check_ncu.parse_ncu_csv("==ERROR== LibraryNotLoaded\n") == {}


@pytest.mark.slow
def test_the_cpu_run_passes_every_phase_and_writes_its_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr + (tmp_path / "gpu_check.log").read_text()
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = doc["steps"]
    timed = ("timing-model", "timing-overhead", "timing-array", "timing-tuning")
    for name in ("smoke", "correctness", *timed):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["wheels"]["status"] == steps["build"]["status"] == "skipped"
    assert steps["ncu"]["status"] == "skipped" and steps["ncu"]["n_params"] > 0
    # No compute-sanitizer on a CPU: its target ran every form, dtype and mode as is.
    assert steps["sanitize"]["status"] == "skipped" and "target ran" in steps["sanitize"]["reason"]
    assert "native/bf16/apply" in steps["sanitize"]["steps"]
    forms = [f.name for f in gpu_check_cases.forms(cpu=True)]
    smoke = {c["case"] for c in steps["smoke"]["checks"]}
    assert smoke == {f"{f}/{m}" for f in ["reference", *forms] for m in gpu_check_cases.MODES}
    # Every run timed, none slow: nothing quarantined.
    assert all(c["run_s"] >= 0 for s in ("smoke", "correctness") for c in steps[s]["checks"])
    assert doc["quarantine"] == {}
    assert len(steps["correctness"]["checks"]) >= 4 * len(forms)
    looped = {f"{f}/apply/fp32/{gpu_check_correctness.LOOP_STEPS}-steps" for f in forms}
    assert looped <= {c["case"] for c in steps["correctness"]["checks"]}
    backends = {r["backend"] for s in ("timing-model", "timing-array") for r in steps[s]["rows"]}
    assert {"optax", "copy", "reference", *forms, *(f + ":apply" for f in forms)} <= backends
    assert all("median_ms" in r for s in ("timing-model", "timing-array") for r in steps[s]["rows"])
    # timing-model's rows were traced; a CPU has no device plane, and each row says so.
    assert all("no device plane" in r["trace_note"] for r in steps["timing-model"]["rows"])
    assert not any("trace_note" in r for r in steps["timing-array"]["rows"])
    # The fixed costs: every form in place on one-element leaves, fp32 only, at two
    # loop lengths.
    overhead = steps["timing-overhead"]["rows"]
    assert {r["workload"] for r in overhead} == {"tiny-1elem"}
    assert {r["dtype"] for r in overhead} == {"fp32"}
    for spc in gpu_check_timing.OVERHEAD_LOOPS_CPU:
        assert {"optax", "reference:apply", *(f + ":apply" for f in forms)} <= {
            r["backend"] for r in overhead if r.get("steps_per_call") == spc
        }
    assert all("median_ms" in r for r in overhead)
    tuning = {r["backend"]: r for r in steps["timing-tuning"]["rows"]}
    tuned = [f.name + ":apply" for f in gpu_check_cases.tuning_forms(cpu=True)]
    assert {"optax", "copy", "triton:apply", *tuned} <= set(tuning)
    assert all("median_ms" in tuning[name] for name in ["triton:apply", *tuned])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Timing" in md and "## Correctness" in md and "## Targets" in md
    assert "With `--cpu` the kernels are interpreted" in md
    assert "step           status" in out.stdout  # the short table, printed last
    # A verdict on the targets for each workload and gradient dtype timed (interpreted
    # kernels: whether they are met says nothing).
    for workload, dtype in {(r["workload"], r["dtype"]) for r in steps["timing-model"]["rows"]}:
        assert f" {workload} {dtype}: " in out.stdout
    assert doc["environment"]["platform"] == "cpu"


def test_ncu_profiles_every_form_in_order_then_the_sections_as_time_allows(tmp_path, monkeypatch):
    calls = []
    clock = [0.0]

    def form(exe, name, json_path, timeout):
        calls.append((name, timeout))
        clock[0] += 30.0  # each profile takes 30 s
        return {"status": "ok", "form": name}

    def sections(exe, json_path, timeout):
        calls.append(("sections", timeout))
        return "details"

    monkeypatch.setattr(gpu_check_ncu, "find_ncu", lambda: "ncu")
    monkeypatch.setattr(gpu_check_ncu, "_ncu_form", form)
    monkeypatch.setattr(gpu_check_ncu, "_ncu_sections", sections)
    monkeypatch.setattr(gpu_check_ncu.time, "perf_counter", lambda: clock[0])
    names = ["native-fused", "native", "pallas", "triton", "triton-2pass"]
    forms = [gpu_check_cases.Form(n, n.split("-")[0]) for n in names]
    monkeypatch.setattr(gpu_check_ncu, "_ncu_forms", lambda cpu: forms)
    result = gpu_check_ncu.ncu(False, str(tmp_path / "r.json"), 200, gpu_check_phases.Partial())
    # 200 s: four forms of 30 s at up to 45 s each, the fifth in the 80 s left (capped at
    # 45), then the sections in the 50 s left, less 5.
    assert calls == [(n, 45.0) for n in names] + [("sections", 45.0)]
    assert list(result["forms"]) == names and result["details"] == "details"
    assert result["form"] == "native-fused"  # the top-level figures are the first form's
    # 100 s: three forms (the third gets the 40 s left), then out of time; no sections.
    calls.clear()
    clock[0] = 0.0
    result = gpu_check_ncu.ncu(False, str(tmp_path / "r.json"), 100, gpu_check_phases.Partial())
    assert calls == [("native-fused", 45.0), ("native", 45.0), ("pallas", 40.0)]
    assert [result["forms"][n]["status"] for n in names] == ["ok"] * 3 + ["skipped"] * 2
    assert "out of time" in result["forms"]["triton"]["reason"] and result["details"] == ""


def test_ncu_phase_reads_counters_of_the_profiled_target(tmp_path, monkeypatch):
    # A stand-in for ncu: writes the target's JSON and prints a report.
    fake = tmp_path / "ncu"
    fake.write_text(
        "#!" + sys.executable + "\n"
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'form': 'triton', 'n_params': 1000000, 'steps': 2}, open(path, 'w'))\n"
        f"print({NCU_CSV!r})\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check_ncu, "find_ncu", lambda: str(fake))
    forms = [gpu_check_cases.Form("triton", "triton"), gpu_check_cases.Form("native", "native")]
    monkeypatch.setattr(gpu_check_ncu, "_ncu_forms", lambda cpu: forms)
    result = gpu_check_ncu.ncu(False, str(tmp_path / "r.json"), 60, gpu_check_phases.Partial())
    assert result["dram_bytes_per_step"] == pytest.approx(3_400_000 / 2)
    assert result["dram_bytes_per_param"] == pytest.approx(1.7)
    assert result["kernels_per_step"] == 1
    # Every form profiled; the fused kernel's sections run (here: the stand-in's report).
    assert set(result["forms"]) == {"triton", "native"}
    assert result["forms"]["native"]["status"] == "ok"
    assert "lars_fused_2" in result["details"]
    step = {"status": "ok", **result}
    md = gpu_check_report.markdown({"environment": {}, "seconds": 1.0, "steps": {"ncu": step}})
    assert "| native | 1.0 | 1.7 |" in md and "`lars_fused_2` | 2 |" in md
    # ncu that reads no counters: skipped, with its last words as the reason.
    fake.write_text("#!/bin/sh\necho '==ERROR== Failed to initialize the profiler'\nexit 1\n")
    result = gpu_check_ncu.ncu(False, str(tmp_path / "r.json"), 60, gpu_check_phases.Partial())
    assert result["status"] == "skipped" and "Failed to initialize" in result["reason"]


def test_timing_phases_get_the_steps_per_call(monkeypatch, tmp_path):
    seen = []

    def run(cmd, log, timeout, env):
        seen.append(cmd)
        return 1, 0.0

    monkeypatch.setattr(gpu_check, "_run", run)
    with open(tmp_path / "log", "w") as log:
        gpu_check._phase("timing-model", False, log, 30.0, {}, 20)
        gpu_check._phase("correctness", False, log, 30.0, {}, 20)
    assert seen[0][-2:] == ["--steps-per-call", "20"]
    assert "--steps-per-call" not in seen[1]


def test_the_report_takes_the_environment_of_the_first_phase_that_ran():
    results = {
        "wheels": {"status": "ok"},
        "smoke": {"status": "skipped", "reason": "not in --only"},
        "timing-model": {"status": "ok", "environment": {"jax": "0.11.2"}},
        "ncu": {"status": "ok", "environment": {"jax": "other"}},
    }
    assert gpu_check._phase_environment(results) == {"jax": "0.11.2"}
    assert gpu_check._phase_environment({"wheels": {"status": "ok"}}) == {}


def test_a_phase_killed_at_its_timeout_keeps_its_checks(monkeypatch, tmp_path):
    def timed_out(cmd, log, timeout, env):
        path = cmd[cmd.index("--json") + 1]
        partial = gpu_check_phases.Partial()
        partial.path = path
        partial.check("native/update/fp32/defaults", True)
        return None, timeout

    monkeypatch.setattr(gpu_check, "_run", timed_out)
    with open(tmp_path / "log", "w") as log:
        result = gpu_check._phase("correctness", False, log, 30.0, {})
    assert result["status"] == "fail"
    assert "timed out after 30 s (1 checks done)" in result["reason"]
    assert result["checks"][0]["case"] == "native/update/fp32/defaults"


def test_a_timed_row_far_from_optax_fails_its_check(monkeypatch):
    """A row whose first update is not optax's is a failed check, not a timing;
    rounding (1.9e-5 seen on the GPU) and the copy rows (no update) pass."""

    def rows(w, dtype, names, settings, on_timed, deferred):
        base = {"workload": w.name, "dtype": dtype, "median_ms": 1.0, "note": ""}
        out = [
            {**base, "backend": "optax", "rel_diff_vs_optax": 0.0},
            {**base, "backend": "triton:apply", "rel_diff_vs_optax": 1.9e-5},
            {**base, "backend": "native:apply", "rel_diff_vs_optax": 0.5},
            {**base, "backend": "copy", "rel_diff_vs_optax": float("nan")},
        ]
        on_timed(out)
        return out

    monkeypatch.setattr(gpu_check_timing.measure, "measure", rows)
    result = gpu_check_phases.Partial()
    gpu_check_timing.timing(False, "array", 1, result, 1)
    assert len(result.result["rows"]) == 8  # saved as timed (on_timed)
    failed = [c for c in result.result["checks"] if not c["ok"]]
    # One row of each gradient dtype.
    assert [c["case"].split("/")[-1] for c in failed] == ["native:apply"] * 2
    assert "5.0e-01 from optax's" in failed[0]["detail"]


def test_only_the_model_phases_fp32_rows_are_traced_and_last(monkeypatch):
    calls = []

    def fake(w, dtype, names, settings, on_timed, deferred):
        calls.append((w.name, dtype, settings.steps_per_call, settings.trace_calls))
        if settings.trace_calls:  # as measure does: the trace is left for the caller
            deferred.append(lambda: calls.append(("traced", dtype)))
        return []

    monkeypatch.setattr(gpu_check_timing.measure, "measure", fake)
    # The rows' names do not matter here: the reference's alone.
    monkeypatch.setattr(gpu_check_timing.C, "forms", lambda cpu: [])
    monkeypatch.setattr(gpu_check_timing.C, "tuning_forms", lambda cpu: [])
    gpu_check_timing.timing(False, "model", 100, gpu_check_phases.Partial(), 1)
    traced = gpu_check_timing.TRACE_CALLS
    # On a GPU fp32 is timed first (a phase out of time loses bf16's rows, not
    # fp32's) and traced last: nothing is timed in the process after the profiler.
    assert calls == [
        ("resnet50", "fp32", 100, traced),
        ("resnet50", "bf16-grads", 100, 0),
        ("traced", "fp32"),
    ]
    calls.clear()
    gpu_check_timing.timing(True, "model", 1, gpu_check_phases.Partial(), 1)
    assert calls == [("tiny-model", "fp32", 1, traced), ("traced", "fp32")]
    for which in ("array", "overhead", "tuning"):
        calls.clear()
        gpu_check_timing.timing(False, which, 100, gpu_check_phases.Partial(), 1)
        assert calls and all(c[3] == 0 for c in calls), which
