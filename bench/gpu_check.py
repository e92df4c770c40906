"""One command that validates the GPU backends on a bare GPU machine: ``make gpu-check``.

Run from the repository root (``python -m bench.gpu_check``); docs/gpu-check.md
says how to run it on a lent GPU machine. In order, each step in its own
process under its own timeout (a hang or crash fails that step, the run goes
on) and all of them within ``--budget`` seconds:

1. ``wheels``: installs the wheels in ``.whl/`` (``make gpu-wheels`` downloads
   them: what the GPU image lacks, e.g. jax-triton) into
   ``build/gpu-check/site`` with pip, offline, and puts it on ``PYTHONPATH``;
2. ``build``: builds the native CUDA handler, forced on, alone (CMake,
   ``LARS_NATIVE_CUDA=ON``, ``LARS_NATIVE_CPU=OFF``) against the machine's
   jaxlib, into ``kernels/native/lib/``, where the checkout loads it from;
3. the phases of ``bench.gpu_check_phases``: ``smoke``, ``correctness``,
   ``timing-model`` (ResNet-50), ``timing-overhead`` (ResNet-50's tree at
   one element a leaf, at two loop lengths: a step's and a call's fixed
   costs), ``ncu``, ``timing-tuning`` (the fused
   Triton launch at other geometries), ``timing-array`` (64M elements),
   ``sanitize`` (compute-sanitizer's memcheck, synccheck, racecheck and
   initcheck on the native and Triton kernels, ``bench.gpu_check_sanitize``;
   last, as the budget allows: ``--only wheels,build,sanitize`` runs it alone). The
   timing steps time 100 steps per jitted call (``--steps-per-call``).

A form that hangs, faults or fails ``smoke`` is quarantined
(``bench.gpu_check_quarantine``): left out of the later steps, so that it
cannot cost the others their checks and figures.

It writes ``gpu_check.json`` (everything), ``gpu_check.md`` (the report) and
``gpu_check.log`` (every step's output) to ``--out`` (default ``$OUT`` when
set, else ``bench/out/gpu-check``), the two reports anew after every step (a
run cut short keeps what it finished, marked ``unfinished``), and prints a
short table last. Exit status 0 when every step passed or was skipped with a
reason.

``--cpu`` runs the same phases on the CPU with the interpreted kernels at tiny
sizes (no wheels, no build): the harness itself, end to end, in a few minutes;
its timings are not measurements.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import gpu_check_quarantine as quarantine
from bench import gpu_check_report as report

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "build" / "gpu-check" / "site"
BUILD = ROOT / "build" / "gpu-check" / "native"
LIB = ROOT / "kernels" / "native" / "lib"  # where the checkout loads the libraries from

# (step, timeout in seconds on a GPU, with --cpu). A step gets at most what is
# left of the budget (less a reserve for the report).
STEPS: tuple[tuple[str, float, float], ...] = (
    ("wheels", 60, 0),
    ("build", 180, 0),
    ("smoke", 90, 300),
    ("correctness", 180, 900),
    ("timing-model", 210, 300),
    ("timing-overhead", 120, 300),
    ("ncu", 150, 300),
    ("timing-tuning", 90, 300),
    ("timing-array", 90, 300),
    ("sanitize", 150, 300),
)
# The whole run's default budget on a GPU. From the two runs on an H200
# (2026-12-04: correctness 144 s, the 20-step ResNet-50 timing about 80 s a
# gradient dtype, ncu 20 to 35 s a form) the steps through ``timing-tuning``
# should take about 520 s (timing-overhead about 60 s of it: compiles of the
# 161-leaf steps at two loop lengths, mostly), not yet measured in one run; one device call may
# run 600 s. A step the budget cannot fit fails "out of time", so the last
# ones go first: ``timing-array`` (its target was met on the H200) and
# ``sanitize`` get what is left (``--only wheels,build,sanitize`` runs it alone).
GPU_BUDGET_S = 540.0
RESERVE_S = 10.0
# Steps per jitted call in the timing steps on a GPU (``bench.steps.looped``):
# one step per call measured the host's dispatch of ResNet-50's 161 leaves
# (about 2 ms a call for every row, optax's too, on an H200 machine,
# 2026-12-04), not the GPU. 20 steps a call, the H200 run's, may not be
# enough: some of its one-step figures add up as if the GPU waited for each
# call's dispatch (optax 2.96 ms a call in timing-model: about 1.6 ms of
# dispatch plus its 1.39 ms of GPU time, where overlapping would give about
# 2 ms; but 2.23 ms in timing-tuning). Where it waits, that is about 0.09 ms
# a step at 20 steps a call, half of native in place's kernel time; at 100,
# under 0.02 ms. ``timing-overhead`` measures it.
GPU_STEPS_PER_CALL = 100
# How long a killed step's process group may take to go: a process stuck in the
# GPU driver can outlive SIGKILL for a while; after this the run goes on without it.
KILL_WAIT_S = 30.0


def stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, session, ...

    None where the process is gone or ``/proc`` cannot be read.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
    except (OSError, IndexError):
        return None


def _session_members(sid: int) -> list[int]:
    """The running processes of session ``sid``, read from ``/proc`` (none without it)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        fields = stat(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILLs session ``sid``: its leader's process group, then every other member.

    A process group is not enough: ninja starts each compiler in a process
    group of its own, so killing ``cmake --build``'s group left the compilers
    running (seen here: a 2-minute compile went on after its step had failed).
    """
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(3):  # a member may have forked while the list was read
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run(cmd: list[str], log: Any, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Runs ``cmd`` in a session of its own, output to ``log``; kills the session at ``timeout``.

    Returns:
      (exit status, or None after a timeout; seconds).
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        try:
            proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.write(f"(still running {KILL_WAIT_S:.0f} s after SIGKILL: left behind)\n")
            log.flush()
        rc = None
    return rc, time.perf_counter() - start


def _wheels(log: Any, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return {"status": "skipped", "reason": "no wheels in .whl/ (make gpu-wheels makes them)"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    rc, seconds = _run(cmd, log, timeout, env)
    names = [Path(w).name for w in wheels]
    if rc != 0:
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        return {"status": "fail", "reason": f"pip {why}", "seconds": seconds}
    return {"status": "ok", "seconds": seconds, "wheels": names}


def nvcc() -> str | None:
    """CUDA's compiler: on PATH, else the toolkit's default place, else None."""
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


def _tool(name: str) -> str | None:
    """``name`` on PATH, else beside the Python (pip's cmake and ninja), else None."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def _build(
    log: Any, timeout: float, env: dict[str, str], build: Path = BUILD, lib: Path = LIB
) -> dict[str, Any]:
    """Builds the CUDA handler alone (``LARS_NATIVE_CPU=OFF``) into ``lib``.

    The CPU library is not needed on the GPU, and its three instruction-set
    variants take 92 to 128 s each on one core here (g++ 12, a Xeon VM): with
    them the step ran past its 180 s on 2 cores. The CUDA handler alone: 15 s.
    """
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if cmake is None:
        return {"status": "fail", "reason": "cmake not found"}
    env = dict(env)
    compiler = nvcc()
    if "CUDACXX" not in env and compiler and not shutil.which("nvcc"):
        env["CUDACXX"] = compiler
    configure = [cmake, "-S", str(ROOT), "-B", str(build)]
    configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    configure += [f"-DPython3_EXECUTABLE={sys.executable}", f"-DLARS_NATIVE_OUTPUT_DIR={lib}"]
    configure += ["-DLARS_NATIVE_CUDA=ON", "-DLARS_NATIVE_CPU=OFF"]
    start = time.perf_counter()
    rc, _ = _run(configure, log, timeout, env)
    if rc == 0:
        left = timeout - (time.perf_counter() - start)
        jobs = str(os.cpu_count() or 4)
        rc, _ = _run([cmake, "--build", str(build), "-j", jobs], log, left, env)
    seconds = time.perf_counter() - start
    info = lib / "build-info.txt"
    built = info.read_text() if info.exists() else ""
    if rc != 0:
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        return {"status": "fail", "reason": f"cmake {why}", "seconds": seconds}
    return {"status": "ok", "seconds": seconds, "build_info": built}


def _phase(
    name: str,
    cpu: bool,
    log: Any,
    timeout: float,
    env: dict[str, str],
    steps_per_call: int = 1,
    held: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Runs phase ``name`` in a process of its own; its result.

    ``held``: the run's quarantine (``bench.gpu_check_quarantine``), handed to
    the phase and updated with what its result shows.
    """
    held = {} if held is None else held
    env = dict(env, **{quarantine.ENV: quarantine.encode(held)})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.gpu_check_phases", name, "--json", path]
        cmd += ["--timeout", f"{timeout:.0f}"]
        if name.startswith("timing"):
            cmd += ["--steps-per-call", str(steps_per_call)]
        started = time.time()
        rc, seconds = _run([*cmd, *(["--cpu"] if cpu else [])], log, timeout, env)
        try:
            at = started + timeout if rc is None else None  # when it was killed
            result = quarantine.read_result(path, at)
        except (OSError, ValueError):
            result = {"status": "fail", "reason": f"exited with {rc}, no result"}
    quarantine.blame(held, name, result, rc)
    if rc is None:  # what it had done before the timeout is kept
        done = len(result.get("checks", []))
        result.update(status="fail", reason=f"timed out after {timeout:.0f} s ({done} checks done)")
    elif result.get("status") == "running":
        result.update(status="fail", reason=f"exited with {rc} before the end")
    result["seconds"] = seconds
    return result


def environment(cpu: bool) -> dict[str, Any]:
    """Where it ran: ``bench.environment`` plus the GPU tools' versions (in a subprocess)."""
    env = {"mode": "cpu (interpreted kernels, tiny sizes)" if cpu else "gpu"}
    tools = {
        "nvidia-smi": ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        "nvcc": ["--version"],
        "ncu": ["--version"],
        "compute-sanitizer": ["--version"],
    }
    for tool, args in tools.items():
        if cpu:
            break
        try:
            out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
            env[tool] = (out.stdout.strip().splitlines() or [""])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            env[tool] = f"unavailable: {type(e).__name__}"
    return env


def _phase_environment(results: dict[str, Any]) -> dict[str, Any]:
    """What the first phase that ran saw (versions, device, date), else nothing."""
    return next((r["environment"] for r in results.values() if r.get("environment")), {})


def _write_reports(
    out: Path,
    results: dict[str, Any],
    where: dict[str, Any],
    seconds: float,
    done: bool,
    held: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes gpu_check.json and gpu_check.md for the steps so far; returns the document.

    The first phase's ``environment`` (what its process saw) joins ``where``;
    ``held`` is the run's quarantine (``bench.gpu_check_quarantine``).
    """
    steps = {n: {k: v for k, v in r.items() if k != "environment"} for n, r in results.items()}
    doc = {
        "environment": {**_phase_environment(results), **where},
        "seconds": seconds,
        "steps": steps,
        "quarantine": dict(held or {}),
    }
    if not done:
        doc["unfinished"] = f"the run had done {len(steps)} of {len(STEPS)} steps"
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "gpu_check.md").write_text(report.markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    """Runs every step; writes the reports; 0 when everything passed or was skipped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="interpreted kernels, tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench/out/gpu-check"))
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--only", default="", help="comma-separated steps (default: all)")
    parser.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiplies every step's timeout"
    )
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=None,
        help=f"steps per jitted call when timing (default {GPU_STEPS_PER_CALL}; 1 with --cpu)",
    )
    args = parser.parse_args(argv)
    spc = args.steps_per_call or (1 if args.cpu else GPU_STEPS_PER_CALL)
    budget = args.budget if args.budget is not None else (1800.0 if args.cpu else GPU_BUDGET_S)
    wanted = {s for s in args.only.split(",") if s} or {s[0] for s in STEPS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(JAX_PLATFORMS="cpu", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SITE), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    start = time.perf_counter()
    results: dict[str, Any] = {}
    held: dict[str, dict[str, str]] = {}  # the quarantine: forms left out of later steps
    where = {**environment(args.cpu), "steps per call (timing)": spc}
    with open(out / "gpu_check.log", "w") as log:
        for name, gpu_timeout, cpu_timeout in STEPS:
            left = budget - (time.perf_counter() - start) - RESERVE_S
            timeout = min((cpu_timeout if args.cpu else gpu_timeout) * args.timeout_scale, left)
            if name not in wanted:
                results[name] = {"status": "skipped", "reason": "not in --only"}
            elif args.cpu and name in ("wheels", "build"):
                results[name] = {
                    "status": "skipped",
                    "reason": "--cpu: nothing to install or build",
                }
            elif timeout < 15:
                results[name] = {"status": "fail", "reason": "out of time (--budget)"}
            else:
                log.write(f"\n===== {name} (timeout {timeout:.0f} s)\n")
                log.flush()
                if name == "wheels":
                    results[name] = _wheels(log, timeout, env)
                elif name == "build":
                    results[name] = _build(log, timeout, env)
                else:
                    results[name] = _phase(name, args.cpu, log, timeout, env, spc, held)
            r = results[name]
            seconds, reason = r.get("seconds", 0.0), r.get("reason", "")
            print(f"{name:14s} {r['status']:8s} {seconds:6.1f} s  {reason}", flush=True)
            # The reports so far: a run cut short (the machine's call limit) keeps them.
            _write_reports(out, results, where, time.perf_counter() - start, False, held)
    total = time.perf_counter() - start
    doc = _write_reports(out, results, where, total, True, held)
    print(report.short_table(doc))
    print(f"reports: {out}/gpu_check.{{json,md,log}} ({total:.0f} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
