"""The ``sanitize`` step of ``bench.gpu_check``: compute-sanitizer on the kernels.

``compute-sanitizer --tool T`` runs ``python -m bench.gpu_check_phases
sanitize-target`` for each tool of ``TOOLS``, in that order, as the step's
time allows:

* ``memcheck``: out-of-bounds and misaligned global and shared accesses;
* ``synccheck``: barriers used where not every thread reaches them;
* ``racecheck``: shared-memory hazards between the threads of a block;
* ``initcheck``: reads of global memory nothing wrote.

Only this project's kernels are checked (``KERNELS``: the native handler's
``lars_native::`` kernels and the Triton kernels, all named ``lars...``;
the Pallas Mosaic GPU kernels are left out, as XLA's own; should the
sanitizer refuse ``--kernel-name``, every kernel is checked). XLA allocates
every buffer with its own ``cudaMalloc`` (``XLA_PYTHON_CLIENT_ALLOCATOR=
platform``), so that memcheck sees where each buffer ends.

The target runs each form of ``FORMS`` once in each mode (in place and
updates) and dtype (fp32, bf16 grads, bf16) on the correctness step's odd
shapes (0-d, 1, 127, 4097, 65537, a conv kernel, an empty leaf, ...), plus
the native fused launch at its smallest chunk and lookahead (many items,
updates waiting on sums): fp32 first, and no step starts after
``TARGET_SHARE`` of the tool's time, so that the sanitizer still prints its
summary. ``bench.gpu_check_phases`` starts it and writes its result; each
tool that finished is a check, passed when it reported no error. On the
CPU, ``bench.cuda_emulate`` stands in for memcheck (AddressSanitizer, the
default) and, within a block, for racecheck (``--sanitize thread``) on the
native kernels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import jax

import lars
from bench import gpu_check_cases as C

TOOLS = ("memcheck", "synccheck", "racecheck", "initcheck")
# compute-sanitizer's filter: kernels whose name holds this substring.
KERNELS = "kns=lars"
# The forms checked (those available here): the kernels this project wrote.
FORMS = ("native", "native-fused", "triton", "triton-2pass")
# The native fused launch with the most items and waits: 1024-element chunks,
# a lookahead of one chunk.
NATIVE_FUSED_SMALL = (("fused", True), ("chunk", 1024), ("lookahead", 1))
ERROR_EXIT = 86  # the sanitizer's exit status when it found errors
# A tool's first share of the step: on a GPU each run compiles the target's
# steps (one per form, mode and dtype) under the sanitizer; not yet measured.
FIRST_TOOL_S = 60.0
TARGET_SHARE = 0.6


def _forms(cpu: bool) -> list[C.Form]:
    """The forms of ``FORMS`` usable here, in that order, the small fused launch second.

    A form quarantined for a failure is checked, last (memcheck says where a
    kernel faults, and a fault ends the target's run), without the small
    fused launch; one quarantined for a hang is not checked
    (``bench.gpu_check_quarantine``).
    """
    usable = [f for f in C.forms(cpu) if f.name in FORMS and f.unavailable(hangs_only=True) is None]
    failed = {f.name for f in usable if f.unavailable() is not None}
    usable.sort(key=lambda f: (f.name in failed, FORMS.index(f.name)))
    if not cpu and any(f.name == "native-fused" for f in usable) and "native-fused" not in failed:
        usable.insert(1, C.Form("native-fused-small", "native", NATIVE_FUSED_SMALL))
    return usable


def sanitize_target(cpu: bool, seconds: float | None = None) -> dict[str, Any]:
    """What the sanitizer watches: one step of each form, mode and dtype.

    fp32 first for every form, then the other dtypes. With ``seconds``, no
    step starts after that many seconds (the sanitizer then reports on those
    that ran, before its own timeout).
    """
    start = time.perf_counter()
    shapes = C.odd_shapes(cpu)
    txs = {
        f.name: lars.lars(C.LR, backend=f.backend, backend_options=f.options_dict or None)
        for f in _forms(cpu)
    }
    ran, left_out = [], []
    for dtype in C.DTYPES:
        params, grads = C.make_tree(shapes, dtype, seed=5)
        for name, tx in txs.items():
            for mode in C.MODES:
                case = f"{name}/{dtype}/{mode}"
                if seconds is not None and time.perf_counter() - start > seconds:
                    left_out.append(case)
                    continue
                state = jax.jit(tx.init)(params)
                if mode == "apply":
                    out = jax.jit(tx.apply_gradients)(params, state, grads)
                else:
                    out = jax.jit(tx.update)(grads, state, params)
                jax.block_until_ready(out)
                ran.append(case)
    return {"steps": ran, "left_out": left_out}


def find_sanitizer() -> str | None:
    """The ``compute-sanitizer`` executable, if any."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer"):
        candidate = os.path.join(root, "compute-sanitizer")
        if os.path.exists(candidate):
            return candidate
    return None


def parse_errors(text: str) -> int | None:
    """The errors a compute-sanitizer run reported (None: no summary line)."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    found += re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)
    return max(int(n) for n in found) if found else None


def findings(text: str, limit: int = 12) -> list[str]:
    """The sanitizer's first report lines (``========= `` prefixed, not summaries)."""
    said = [
        x.removeprefix("=========").strip() for x in text.splitlines() if x.startswith("=========")
    ]
    keep = [x for x in said if x and "SUMMARY" not in x and x != "COMPUTE-SANITIZER"]
    return keep[:limit]


def _tool(
    exe: str, tool: str, json_path: str, timeout: float, only_ours: bool = True
) -> dict[str, Any]:
    cmd = [exe, "--tool", tool, "--error-exitcode", str(ERROR_EXIT), "--print-limit", "20"]
    cmd += ["--kernel-name", KERNELS] if only_ours else []
    cmd += [sys.executable, "-m", "bench.gpu_check_phases", "sanitize-target"]
    # The target stops starting steps at TARGET_SHARE of the time, so that the
    # sanitizer can still print its summary.
    cmd += ["--json", json_path + f".{tool}", "--timeout", f"{TARGET_SHARE * timeout:.0f}"]
    env = dict(
        os.environ, XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false"
    )
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"did not finish in {timeout:.0f} s"}
    text = out.stdout + out.stderr
    errors = parse_errors(text)
    result = {
        "rc": out.returncode,
        "errors": errors,
        "seconds": time.perf_counter() - start,
        "findings": findings(text),
    }
    if errors is None or out.returncode not in (0, ERROR_EXIT):
        tail = " | ".join(text.strip().splitlines()[-6:])
        result["option_refused"] = "option" in text.lower()
        return {**result, "status": "error", "reason": f"rc {out.returncode}: {tail[:600]}"}
    try:
        with open(json_path + f".{tool}") as f:
            target = json.load(f)
        result["steps"] = len(target.get("steps", []))
        result["left_out"] = len(target.get("left_out", []))
    except (OSError, ValueError):
        pass
    return {**result, "status": "ok" if errors == 0 else "found"}


def sanitize(cpu: bool, json_path: str, timeout: float, partial: Any) -> dict[str, Any]:
    """Runs each tool of ``TOOLS`` on the target; a check per tool that finished.

    Args:
      cpu: The ``--cpu`` run: no sanitizer; the target runs once, as is.
      json_path: The phase's result file (the target writes beside it).
      timeout: Seconds for everything.
      partial: The phase's ``Partial`` result: each tool's check is saved as
        it comes (a phase killed keeps them).
    """
    if cpu:
        target = sanitize_target(cpu)
        return {"status": "skipped", "reason": "--cpu: no compute-sanitizer (target ran)", **target}
    exe = find_sanitizer()
    if exe is None:
        return {"status": "skipped", "reason": "compute-sanitizer not found"}
    start = time.perf_counter()
    tools: dict[str, Any] = {}
    only_ours = True
    for i, tool in enumerate(TOOLS):
        left = timeout - (time.perf_counter() - start)
        share = min(left, FIRST_TOOL_S) if i == 0 else left / (len(TOOLS) - i)
        if share < 15:
            tools[tool] = {"status": "skipped", "reason": "out of time (the sanitize step's)"}
            continue
        tools[tool] = r = _tool(exe, tool, json_path, share, only_ours)
        if r["status"] == "error" and r.get("option_refused") and only_ours:
            # This sanitizer takes no --kernel-name filter: every kernel is checked.
            only_ours = False
            left = timeout - (time.perf_counter() - start)
            tools[tool] = r = _tool(exe, tool, json_path, min(left, share), only_ours)
            r["note"] = "without the kernel filter (refused): every kernel checked"
        print(f"{tool}: {r['status']} {r.get('errors')} {r.get('reason', '')}", flush=True)
        if r["status"] in ("ok", "found"):
            detail = f"{r['errors']} errors in {r.get('steps', '?')} steps"
            detail += f" ({r['left_out']} left out for time)" if r.get("left_out") else ""
            detail += f": {r['findings'][:4]}" if r["errors"] else ""
            partial.check(tool, r["errors"] == 0, detail)
        partial.result["tools"] = tools
        partial.save()
    if not partial.result.get("checks"):
        reasons = "; ".join(f"{t}: {r.get('reason', r['status'])}" for t, r in tools.items())
        return {"status": "skipped", "reason": f"no tool finished ({reasons})"[:800]}
    return {"status": "running", "tools": tools}
