"""Several hosts: two JAX processes of 4 CPU devices each, one mesh of 8 devices.

Each backend that runs on a CPU is run by a pair of processes started as the
README's "Several hosts" section says (``jax.distributed.initialize`` with
the coordinator on 127.0.0.1, CPU collectives through gloo). Params and
momentum are sharded over the process boundary; each process checks the
shards it holds against the float64 oracle and against the same backend run
unsharded, through ``lars.lars`` and ``lars.Lars``. Both processes then save
an orbax checkpoint, and a fresh pair restores it onto the same shardings and
continues bit for bit as the uninterrupted run (see tests/multihost_worker.py).

The pair runs in its own process groups under a time limit: when one process
fails, or the limit passes, both are killed (a process left alone would wait
for its peer at the next collective), and the checkpoint directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from backends import BACKENDS

import lars

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 420  # seconds for one pair (the slowest, pallas in interpret mode, takes 1-2 minutes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = env.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
    # The workers import the same lars as this process.
    root = str(Path(lars.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _kill(proc: subprocess.Popen) -> None:
    """Kills the process group of ``proc`` (the worker and anything it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_pair(phase: str, backend: str, workdir: str, timeout: float = TIMEOUT) -> float:
    """Runs the two processes of ``phase``; both must print OK. Returns the wall time."""
    port, env = _free_port(), _env()
    logs = [Path(workdir, f"{phase}-{i}.log") for i in range(2)]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                args = [sys.executable, str(WORKER), phase, backend, str(i), str(port), workdir]
                procs.append(
                    subprocess.Popen(
                        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        failed, timed_out = None, False
        while any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            if failed is not None:
                break  # its peer would wait for it at the next collective
            if time.monotonic() - start > timeout:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    wall = time.monotonic() - start
    out = [log.read_text() for log in logs]
    report = "\n".join(
        f"--- process {i} (rc {p.returncode}):\n{out[i][-6000:]}" for i, p in enumerate(procs)
    )
    assert not timed_out, f"{phase} {backend}: over {timeout} s\n{report}"
    assert failed is None and all(p.returncode == 0 for p in procs), report
    for i in range(2):
        assert f"OK {phase} {backend} {i}" in out[i], report
    return wall


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_match_one_and_resume_from_checkpoint(backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="lars-multihost-") as workdir:
        first = run_pair("first", backend, workdir)
        second = run_pair("restore", backend, workdir)
    print(f"{backend}: steps and save {first:.1f} s, restore {second:.1f} s")


def test_a_failing_process_stops_its_peer() -> None:
    """When one process fails, its peer (waiting for it at a barrier) is killed at once."""
    with tempfile.TemporaryDirectory(prefix="lars-multihost-") as workdir:
        start = time.monotonic()
        with pytest.raises(AssertionError, match="fails on purpose") as failure:
            run_pair("peer-fails", "reference", workdir, timeout=120)
        assert time.monotonic() - start < 60  # the time limit (120 s) was not reached
    assert f"process 0 (rc {-signal.SIGKILL})" in str(failure.value)
    assert "process 1 (rc 1)" in str(failure.value)
