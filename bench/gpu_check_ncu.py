"""The ``ncu`` phase of ``bench.gpu_check``: Nsight Compute on each form's step.

``ncu`` runs ``python -m bench.gpu_check_phases ncu-target --form NAME`` under
Nsight Compute (``--clock-control none``): three in-place steps of one form
on ResNet-50's set (fp32), every kernel of the program counted. Per form: DRAM
bytes and kernel time per step and per parameter, and per kernel name; for
the fused Triton kernel also ncu's sections (``NCU_SECTIONS``) for one launch,
as text, where time is left. ``bench.gpu_check_phases`` starts it and writes its result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import jax

import lars
from bench import gpu_check_cases as C
from bench import workloads

NCU_STEPS = 3
NCU_METRICS = "dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum"
# The fused kernel's launch, occupancy, stall and memory picture (one launch).
NCU_SECTIONS = (
    "SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "MemoryWorkloadAnalysis",
)  # fmt: skip
# Seconds for one form's profile and for the sections run: on the H200
# (2026-12-04) one form's profile took 20 to 35 s (Python, jax and the compile
# included) and the sections ran past 20 s.
NCU_FORM_S = 45.0
NCU_MIN_S = 15.0  # less is not worth starting: Python, jax and a compile come first
NCU_DETAILS_S = 50.0


# The order the forms are profiled in; the others follow as time allows. The
# native fused step has not yet run on a GPU; the native and Pallas steps in
# place took 0.290 and 0.287 ms a step on the H200 (2026-12-04) where ncu gave
# native's kernels 0.186 ms and Pallas' nothing (it ran out of time): their
# kernel time is what splits a step into kernels and the rest. The fused
# Triton step was profiled then (22.3 DRAM B/param).
NCU_ORDER = ("native-fused", "native", "pallas", "triton")


def _ncu_forms(cpu: bool) -> list[C.Form]:
    """The forms profiled, in ``NCU_ORDER``, then the others."""
    usable = [f for f in C.forms(cpu) if f.unavailable() is None]
    first = {name: i for i, name in enumerate(NCU_ORDER)}
    return sorted(usable, key=lambda f: first.get(f.name, len(first)))


def ncu_target(cpu: bool, form_name: str | None = None) -> dict[str, Any]:
    """What ncu profiles: one form's step (in place) on ResNet-50, fp32, NCU_STEPS times.

    ncu profiles every kernel of the program, so nothing but the steps runs on
    the device: the trees are made on the host, the state by ``init`` on the
    CPU, and each step's donated params and state are copied from the host.
    """
    forms = _ncu_forms(cpu)
    form = next((f for f in forms if f.name == form_name), forms[0])
    shapes = C.odd_shapes(cpu) if cpu else workloads.resnet50_shapes()
    params, grads = jax.device_get(C.make_tree(shapes, "fp32", seed=11))
    tx = lars.lars(C.LR, backend=form.backend, backend_options=form.options_dict or None)
    host = jax.devices("cpu")[0]
    state = jax.device_get(jax.jit(tx.init)(jax.device_put(params, host)))
    device = jax.devices()[0]
    grads = jax.device_put(grads, device)
    step = jax.jit(tx.apply_gradients, donate_argnums=(0, 1))
    for _ in range(NCU_STEPS):  # the first compiles; its launches are in the profile too
        p, s = jax.device_put((params, state), device)
        jax.block_until_ready(step(p, s, grads))
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    return {"form": form.name, "n_params": n, "steps": NCU_STEPS}


def find_ncu() -> str | None:
    """The ``ncu`` executable, if any."""
    found = shutil.which("ncu")
    if found:
        return found
    for root in ("/usr/local/cuda/bin", "/opt/nvidia/nsight-compute"):
        for dirpath, _, files in os.walk(root):
            if "ncu" in files:
                return os.path.join(dirpath, "ncu")
    return None


def parse_ncu_csv(text: str) -> dict[str, Any]:
    """Sums each metric of an ``ncu --csv --print-units base`` report over its kernels.

    Also ``"kernels"`` (how many launches) and ``"by_kernel"``: kernel name ->
    {"launches", and each metric summed over that name's launches}.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return {}
    totals: dict[str, Any] = {}
    kernels = set()
    by_kernel: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        value = (row.get("Metric Value") or "").replace(",", "")
        try:
            v = float(value)
        except ValueError:
            continue
        name, metric = row.get("Kernel Name") or "?", row["Metric Name"]
        totals[metric] = totals.get(metric, 0.0) + v
        kernels.add((row.get("ID"), name))
        per = by_kernel.setdefault(name[:80], {})
        per[metric] = per.get(metric, 0.0) + v
    for _, name in kernels:
        per = by_kernel[name[:80]]
        per["launches"] = per.get("launches", 0.0) + 1
    totals["kernels"] = float(len(kernels))
    totals["by_kernel"] = by_kernel
    return totals


def _ncu_run(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    # No preallocated pool: ncu saves and restores the memory a replayed kernel may touch.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, "", f"ncu did not finish in {timeout:.0f} s"
    return out.returncode, out.stdout, out.stderr


def _target(form: str, json_path: str) -> list[str]:
    """The command ncu profiles: ``ncu-target`` for ``form``, its JSON beside ``json_path``."""
    target = [sys.executable, "-m", "bench.gpu_check_phases", "ncu-target", "--form", form]
    return [*target, "--json", json_path + ".t"]


def _ncu_form(exe: str, form: str, json_path: str, timeout: float) -> dict[str, Any]:
    """DRAM bytes and kernel time per step of one form's in-place step (every kernel)."""
    cmd = [exe, "--clock-control", "none", "--csv", "--print-units", "base"]
    cmd += ["--metrics", NCU_METRICS, *_target(form, json_path)]
    rc, stdout, stderr = _ncu_run(cmd, timeout)
    totals = parse_ncu_csv(stdout)
    if rc != 0 or not totals.get("kernels"):
        tail = " | ".join((stdout + stderr).strip().splitlines()[-6:])
        return {"status": "skipped", "reason": f"ncu gave no counters (rc {rc}): {tail[:600]}"}
    with open(json_path + ".t") as f:
        got = json.load(f)
    steps, n = got["steps"], got["n_params"]
    moved = (
        totals.get("dram__bytes_read.sum", 0.0) + totals.get("dram__bytes_write.sum", 0.0)
    ) / steps
    return {
        **got,
        "status": "ok",
        "kernels_per_step": totals["kernels"] / steps,
        "dram_bytes_per_step": moved,
        "dram_bytes_per_param": moved / n,
        "kernel_time_ms_per_step": totals.get("gpu__time_duration.sum", float("nan")) / steps / 1e6,
        "by_kernel": totals["by_kernel"],
    }


def _ncu_sections(exe: str, json_path: str, timeout: float) -> str:
    """ncu's sections (``NCU_SECTIONS``) for the fused Triton kernel's second launch, as text."""
    cmd = [exe, "--clock-control", "none", "--kernel-name", "regex:^lars_"]
    cmd += ["--launch-skip", "1", "--launch-count", "1"]
    for section in NCU_SECTIONS:
        cmd += ["--section", section]
    rc, stdout, stderr = _ncu_run([*cmd, *_target("triton", json_path)], timeout)
    if rc != 0:
        return f"rc {rc}: {(stdout + stderr)[-600:]}"
    return "\n".join(x for x in stdout.splitlines() if not x.startswith("==PROF=="))[-20000:]


def ncu(cpu: bool, json_path: str, timeout: float, partial: Any) -> dict[str, Any]:
    """DRAM bytes and kernel time per step of every form's in-place step, from ncu.

    Every form on ResNet-50 (fp32), every kernel of the program (the first
    step's too: compile, warm-up; XLA's own kernels of the step included), in
    ``NCU_ORDER`` then the others, each up to ``NCU_FORM_S``; then, where time
    is left, ncu's sections (``NCU_SECTIONS``) for one launch of the fused
    Triton kernel, as text in ``"details"``. The top-level figures are the
    first form's.

    Args:
      cpu: The ``--cpu`` run: no counters; the target runs once.
      json_path: The phase's result file (the target writes beside it).
      timeout: Seconds for everything.
      partial: The phase's ``Partial`` result: each form's figures and the
        sections are saved to it as they come (a phase killed keeps them).
    """
    if cpu:
        target = ncu_target(cpu)
        return {"status": "skipped", "reason": "--cpu: no GPU counters (target ran)", **target}
    exe = find_ncu()
    if exe is None:
        return {"status": "skipped", "reason": "ncu not found"}
    start = time.perf_counter()
    forms = [f.name for f in _ncu_forms(cpu)]

    def left() -> float:
        return timeout - (time.perf_counter() - start)

    # Each form in turn, up to NCU_FORM_S; then the fused Triton kernel's
    # sections, where time is left.
    per_form: dict[str, Any] = {}
    for form in forms:
        if left() < NCU_MIN_S:
            per_form[form] = {"status": "skipped", "reason": "out of time (the ncu step's)"}
            continue
        per_form[form] = _ncu_form(exe, form, json_path, min(left(), NCU_FORM_S))
        partial.result["ncu_forms"] = per_form
        partial.save()
    first = per_form[forms[0]]
    details = ""
    if per_form.get("triton", {}).get("status") == "ok" and left() > 20:
        details = _ncu_sections(exe, json_path, min(left() - 5, NCU_DETAILS_S))
        print(details, flush=True)
        partial.result["details"] = details
        partial.save()
    if first.get("status") != "ok":
        return {"status": "skipped", "reason": first["reason"], "forms": per_form}
    return {
        **{k: v for k, v in first.items() if k != "status"},
        "note": "every kernel of the program: the first step's launches are counted too",
        "forms": per_form,
        "details": details,
    }
