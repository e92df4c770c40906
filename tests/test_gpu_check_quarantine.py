"""Tests of the GPU check's quarantine (``bench.gpu_check_quarantine``).

A form that hangs, faults or fails smoke must not cost the other forms their
checks and figures: it is left out of the later steps (a hang: of
``sanitize`` too), the steps' processes learn it from the driver, and a step
that finds a slow run or a failing device quarantines the form at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    gpu_check,
    gpu_check_cases,
    gpu_check_correctness,
    gpu_check_phases,
    gpu_check_report,
    gpu_check_sanitize,
    gpu_check_timing,
)
from bench import gpu_check_quarantine as Q  # noqa: E402


def test_blame_reads_timeouts_deaths_smoke_failures_and_the_steps_own():
    held: dict = {}
    # Timed out while running a case: that form hung.
    Q.blame(held, "correctness", {"running": "native-fused/apply/deterministic"}, None)
    assert held["native-fused"]["kind"] == Q.HANG
    assert held["native-fused"]["step"] == "correctness"
    assert "native-fused/apply/deterministic" in held["native-fused"]["reason"]
    # A run that had begun just before the timeout (a step out of time): no one.
    late = {"running": "triton/apply/timing-model: triton:apply", "running_s": 0.4}
    Q.blame(held, "timing-model", late, None)
    assert set(held) == {"native-fused"}
    Q.blame(held, "timing-model", {**late, "running_s": 31.0}, None)
    assert (
        held["triton"]["kind"] == Q.HANG and "running for 31 s at the" in held["triton"]["reason"]
    )
    del held["triton"]
    # Died (a signal) while running a case: failed.
    Q.blame(held, "correctness", {"running": "pallas/update/fp32/defaults"}, -11)
    assert held["pallas"]["kind"] == Q.FAIL
    # Failed checks outside smoke, a plain failing exit, unavailable forms: nothing.
    result = {"checks": [{"case": "triton/apply/fp32/defaults", "ok": False, "detail": "x"}]}
    Q.blame(held, "correctness", result, 1)
    assert set(held) == {"native-fused", "pallas"}
    smoke = {
        "checks": [
            {"case": "reference/update", "ok": False, "detail": "boom"},
            {"case": "native/update", "ok": True, "detail": ""},
            {"case": "triton-2pass/apply", "ok": False, "detail": "unavailable: no GPU"},
            {"case": "triton/update", "ok": False, "detail": "non-finite output"},
        ]
    }
    Q.blame(held, "smoke", smoke, 1)
    assert set(held) == {"native-fused", "pallas", "triton"}  # never the reference
    assert held["triton"] == {
        "kind": Q.FAIL,
        "reason": "triton/update: non-finite output",
        "step": "smoke",
    }
    # The step's own quarantine; a hang replaces a failure, not the other way.
    own = {"quarantine": {"pallas": {"kind": Q.HANG, "reason": "slow", "step": "smoke"}}}
    Q.blame(held, "correctness", own, 1)
    assert held["pallas"] == {"kind": Q.HANG, "reason": "slow", "step": "smoke"}
    Q.blame(held, "timing-model", {"running": "native-fused/x"}, -6)
    assert held["native-fused"]["kind"] == Q.HANG


def test_a_quarantined_form_and_its_geometries_are_unavailable(monkeypatch):
    monkeypatch.setenv(Q.ENV, "")
    forms = {f.name: f for f in gpu_check_cases.forms(cpu=False)}
    tuned = {f.name: f for f in gpu_check_cases.tuning_forms(cpu=False)}
    assert forms["native"].unavailable() is None  # the CPU handler runs here
    assert forms["native-fused"].unavailable() is None
    held = {"native-fused": {"kind": Q.FAIL, "reason": "r", "step": "smoke"}}
    monkeypatch.setenv(Q.ENV, Q.encode(held))
    assert forms["native-fused"].unavailable() == "quarantined after smoke: r"
    assert tuned["native-fused-16384-128"].unavailable() == "quarantined after smoke: r"
    assert forms["native"].unavailable() is None
    # sanitize runs a form that failed (memcheck says where), not one that hung.
    assert forms["native-fused"].unavailable(hangs_only=True) is None
    # Last (a fault ends the sanitizer's run of the target), without the small
    # launch. (Here the Triton forms are unavailable: no GPU.)
    assert [f.name for f in gpu_check_sanitize._forms(cpu=False)] == ["native", "native-fused"]
    monkeypatch.setenv(Q.ENV, "")
    names = [f.name for f in gpu_check_sanitize._forms(cpu=False)]
    assert names == ["native", "native-fused-small", "native-fused"]
    held["native-fused"]["kind"] = Q.HANG
    monkeypatch.setenv(Q.ENV, Q.encode(held))
    assert forms["native-fused"].unavailable(hangs_only=True) is not None
    assert [f.name for f in gpu_check_sanitize._forms(cpu=False)] == ["native"]


def test_the_timing_steps_leave_a_quarantined_form_out(monkeypatch):
    names_seen = []

    def fake(w, dtype, names, settings, on_timed, deferred):
        names_seen.append(list(names))
        return []

    monkeypatch.setattr(gpu_check_timing.measure, "measure", fake)
    held = {"native": {"kind": Q.FAIL, "reason": "r", "step": "smoke"}}
    monkeypatch.setenv(Q.ENV, Q.encode(held))
    for which in ("model", "overhead", "tuning", "array"):
        gpu_check_timing.timing(False, which, 100, gpu_check_phases.Partial(), 1)
    assert names_seen and all(n for n in names_seen)
    assert not any(name.split(":")[0] == "native" for names in names_seen for name in names)
    monkeypatch.setenv(Q.ENV, "")
    names_seen.clear()
    gpu_check_timing.timing(False, "model", 100, gpu_check_phases.Partial(), 1)
    assert "native:apply" in names_seen[0]


@pytest.fixture
def result(monkeypatch, tmp_path):
    partial = gpu_check_phases.Partial()
    partial.path = str(tmp_path / "result.json")
    monkeypatch.setattr(gpu_check_correctness, "RESULT", partial)
    return partial


def test_a_slow_run_quarantines_its_form_for_the_rest_of_the_step(monkeypatch, result):
    monkeypatch.setattr(Q, "SLOW_RUN_S", 0.5)
    ran = []
    seen_running = []

    def check(case, run_s=0.01):
        def run():
            ran.append(case)
            # Compiling: no run is blamed yet.
            assert "running" not in Q.read_result(result.path)
            with gpu_check_correctness._running():
                # While it runs, what the driver reads after a timeout names it.
                seen_running.append(Q.read_result(result.path)["running"])
            assert "running" not in Q.read_result(result.path)
            gpu_check_correctness.RUN_S.append(run_s)  # as if the run had taken run_s
            return True, ""

        return case, run

    checks = [
        check("native-fused/update/fp32/defaults", run_s=9.0),
        check("native/update/fp32/defaults"),
        check("native-fused/apply/fp32/defaults"),
        check("triton/update/fp32/defaults"),
    ]
    # With --cpu (interpreted kernels) a slow run is no hang.
    assert gpu_check_correctness._run_checks(checks, "correctness", cpu=True) == {}
    assert result.result["quarantine"] == {} and len(ran) == 4
    for seen in (ran, seen_running, result.result["checks"]):
        seen.clear()
    assert gpu_check_correctness._run_checks(checks, "correctness", cpu=False) == {}
    assert ran == [checks[0][0], checks[1][0], checks[3][0]]
    assert seen_running == ran
    held = result.result["quarantine"]["native-fused"]
    assert held["kind"] == Q.HANG and held["step"] == "correctness"
    assert "one run took 9.0 s" in held["reason"]
    by_case = {c["case"]: c for c in result.result["checks"]}
    assert by_case[checks[0][0]]["ok"] and by_case[checks[0][0]]["run_s"] == 9.0
    assert not by_case[checks[2][0]]["ok"]
    assert by_case[checks[2][0]]["detail"].startswith("quarantined: ")
    assert "running" not in result.result


def test_a_failing_device_ends_the_step_and_quarantines_the_form(monkeypatch, result):
    failures = iter([None, "XlaRuntimeError: INTERNAL: an illegal memory access"])
    monkeypatch.setattr(gpu_check_cases, "device_failure", lambda: next(failures))
    ran = []

    def raising(case):
        def run():
            ran.append(case)
            raise RuntimeError("CUDA error")

        return case, run

    checks = [
        raising("pallas/update/fp32/defaults"),  # raised, the device still works
        raising("native-fused/update/fp32/defaults"),  # raised, the device failed
        raising("triton/update/fp32/defaults"),
    ]
    out = gpu_check_correctness._run_checks(checks, "correctness", cpu=False)
    assert out == {"status": "fail", "reason": f"the device failed after {checks[1][0]}"}
    assert ran == [checks[0][0], checks[1][0]]
    assert set(result.result["quarantine"]) == {"native-fused"}
    entry = result.result["quarantine"]["native-fused"]
    assert entry["kind"] == Q.FAIL and "illegal memory access" in entry["reason"]
    assert [c["ok"] for c in result.result["checks"]] == [False, False]


def test_the_device_probe_runs_here():
    assert gpu_check_cases.device_failure() is None


def test_the_driver_hands_each_step_the_quarantine_so_far(monkeypatch, tmp_path):
    """smoke fails a form, correctness times out in another's run: the steps
    after get both in their environment, and the report lists them. A timing
    step out of time in a sample that had just begun blames no one."""
    envs: dict[str, dict] = {}

    def run(cmd, log, timeout, env):
        step = cmd[cmd.index("bench.gpu_check_phases") + 1]
        envs[step] = json.loads(env[Q.ENV] or "{}")
        partial = gpu_check_phases.Partial()
        partial.path = cmd[cmd.index("--json") + 1]
        if step == "smoke":
            partial.check("native/update", False, "non-finite output")
            partial.result["status"] = "fail"
            partial.save()
            return 1, 1.0
        if step == "correctness":
            partial.check("native/apply/fp32/defaults", False, "quarantined: ...")
            partial.running("triton/apply/fp32/defaults")
            return None, timeout
        if step == "timing-model":  # out of time 0.5 s into a sample: no one hung
            partial.running("pallas/apply/timing-model: pallas:apply")
            began = time.time() + timeout - 0.5
            os.utime(partial.path + Q.MARKER, (began, began))
            return None, timeout
        partial.result["status"] = "ok"
        partial.save()
        return 0, 1.0

    monkeypatch.setattr(gpu_check, "_run", run)
    monkeypatch.setattr(gpu_check, "environment", lambda cpu: {})
    only = "smoke,correctness,timing-model,sanitize"
    assert gpu_check.main(["--out", str(tmp_path), "--only", only]) == 1
    assert envs["smoke"] == {}
    assert set(envs["correctness"]) == {"native"}
    assert set(envs["timing-model"]) == set(envs["sanitize"]) == {"native", "triton"}
    assert envs["sanitize"]["triton"]["kind"] == Q.HANG
    assert "was running for 1" in envs["sanitize"]["triton"]["reason"]  # about the timeout
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["quarantine"] == envs["sanitize"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Quarantined forms" in md
    assert "| triton | hang | correctness | triton/apply/fp32/defaults was running" in md
    short = gpu_check_report.short_table(doc)
    assert "QUARANTINED native (fail, after smoke): native/update: non-finite output" in short


def test_the_timing_steps_name_the_form_whose_calls_run(monkeypatch, tmp_path):
    """While a form's calls are on the device the timing step's result names it
    (a timeout then blames it), outside the timed interval; optax's and the
    copy's calls, and the compiles, name none."""
    from bench import steps, timing

    partial = gpu_check_phases.Partial()
    partial.path = str(tmp_path / "result.json")
    partial.save()
    seen: dict[str, str | None] = {}

    def runner(name):
        def call(x):
            seen[name] = Q.read_result(partial.path).get("running")
            return (x,)

        return steps.Runner(name, call, (np.zeros(1),), (), 0.0, 1, 0.0, 0.0)

    def fake_measure(w, dtype, names, settings, on_timed, deferred):
        assert "running" not in Q.read_result(partial.path)  # compiling
        runners = [runner(n) for n in ["optax", *names, "copy"]]
        for r in runners:
            r.run(1)  # a first call, as measure makes
        timing.time_runners(runners, warmup=0, rounds=1, min_sample_s=0.0)
        assert "running" not in Q.read_result(partial.path)
        return []

    monkeypatch.setattr(gpu_check_timing.measure, "measure", fake_measure)
    monkeypatch.setenv(Q.ENV, "")
    gpu_check_timing.timing(False, "model", 100, partial, 1)
    assert seen["optax"] is None and seen["copy"] is None and seen["reference"] is None
    assert seen["native:apply"].startswith("native/apply/timing-model: native:apply on ")
    assert seen["native-fused"].startswith("native-fused/update/timing-model: ")
    seen.clear()
    gpu_check_timing.timing(False, "tuning", 100, partial, 1)
    case = seen["native-fused-16384-128:apply"]
    assert case.startswith("native-fused/apply/timing-tuning: ")
    # What the driver blames after a timeout in that run: the family.
    held: dict = {}
    Q.blame(held, "timing-tuning", {"running": case}, None)
    assert set(held) == {"native-fused"} and held["native-fused"]["kind"] == Q.HANG


def test_a_result_is_replaced_whole_and_read_with_its_running_case(tmp_path):
    """A result file is never half written (the text goes to a side file first);
    the running case's marker says since when it ran."""

    partial = gpu_check_phases.Partial()
    partial.path = str(tmp_path / "r.json")
    partial.save()
    partial.result["status"] = "ok"
    partial.save()
    assert Q.read_result(partial.path) == partial.result
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
    partial.running("native/update/x")
    now = time.time()
    os.utime(partial.path + Q.MARKER, (now - 40.0, now - 40.0))  # written 40 s ago
    got = Q.read_result(partial.path, timed_out_at=now)
    assert got["running"] == "native/update/x" and got["running_s"] == pytest.approx(40.0, abs=1)
    assert "running_s" not in Q.read_result(partial.path)  # no timeout: not asked
    partial.running(None)
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_a_steps_process_reads_the_quarantine(tmp_path):
    """The smoke step's own process (--cpu) records the quarantined form as such, runs the rest."""
    held = {"triton": {"kind": Q.HANG, "reason": "r", "step": "correctness"}}
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRITON_INTERPRET="1")
    env[Q.ENV] = Q.encode(held)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    path = tmp_path / "smoke.json"
    cmd = [sys.executable, "-m", "bench.gpu_check_phases", "smoke", "--cpu", "--json", str(path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    result = json.loads(path.read_text())
    by_case = {c["case"]: c for c in result["checks"]}
    for mode in gpu_check_cases.MODES:
        assert not by_case[f"triton/{mode}"]["ok"]
        assert "quarantined after correctness: r" in by_case[f"triton/{mode}"]["detail"]
        assert by_case[f"triton-2pass/{mode}"]["ok"], out.stdout + out.stderr
        assert by_case[f"native/{mode}"]["ok"] and by_case[f"native/{mode}"]["run_s"] >= 0
