"""Forms that hung or failed in one step of ``bench.gpu_check``, kept out of the later ones.

A form that has never run on a GPU (the native fused launch, so far) can
cost the whole run: if its blocks wait for a sum that never comes, they give
up only after 2^24 tries (``kFusedSpinLimit``, about 10 s a step by the
estimate at ``SLOW_RUN_S``), a step's hundred-step timing calls would then
run for many minutes, and a kernel that faults leaves the process's CUDA
context unusable, so every later check in that process fails too. So the
run keeps a quarantine, ``{form: {"kind", "reason", "step"}}``:

* ``kind`` "hang": one run of the form took more than ``SLOW_RUN_S`` (the
  step's call alone), or one of its runs (not a compile) had been on the
  device for more than that when its step timed out. The form is left out
  of every later step, ``sanitize`` too;
* ``kind`` "fail": it failed ``smoke``, made the device fail (a later
  one-element computation raised), or its step's process died while it ran.
  It is left out of every later step but ``sanitize``, whose memcheck says
  where a kernel faults.

The driver (``bench.gpu_check``, no JAX) adds to it after each step
(``blame``) and hands it to the next step's process in ``ENV`` as JSON;
``gpu_check_cases.Form.unavailable`` reads it there, for the form and for
the geometries timed beside it (``Form.family``). ``smoke`` and
``correctness`` also quarantine a form as soon as one of its runs is slow or
leaves the device failing, and skip its remaining checks. The reports list
the quarantine and why.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

ENV = "LARS_GPU_CHECK_QUARANTINE"
HANG, FAIL = "hang", "fail"

# A smoke or correctness run (the step's call alone: not its compile, nor the
# copies of its inputs) takes milliseconds, ResNet-50's three steps in the
# determinism checks too. A native fused step whose blocks wait for a sum
# that never comes gives up after 2^24 tries: about 10 s at about 0.6 us a
# try (three L2 round trips and a 200-ns sleep), at least 3 s were a try only
# its sleep. Not measured on a GPU. A timing step's run (a sample: calls of
# 100 steps for at least 0.1 s; the H200's slowest step, optax's, took
# about 1.4 ms on ResNet-50) lasts well under it too, so a step that ran out
# of time in a sample blames no one.
SLOW_RUN_S = 2.0


# Beside a step's result file (its path + MARKER): the case whose run is on
# the device now, while one is (``gpu_check_correctness.Partial.running``).
MARKER = ".running"


def write_text(path: str, text: str) -> None:
    """Replaces ``path``'s text at once: a process killed while writing leaves the old one."""
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def read_result(path: str, timed_out_at: float | None = None) -> dict[str, Any]:
    """The result a step left at ``path``, with ``running`` when a run was on the device.

    Args:
      path: The result's file.
      timed_out_at: When the step was killed at its timeout (``time.time()``),
        if it was: ``running_s`` is then how long the run had been on the
        device (since its marker was written).

    Raises:
      OSError, ValueError: No result, or not JSON.
    """
    with open(path) as f:
        result = json.load(f)
    if os.path.exists(path + MARKER):
        with open(path + MARKER) as f:
            result["running"] = f.read()
        if timed_out_at is not None:
            result["running_s"] = round(timed_out_at - os.path.getmtime(path + MARKER), 3)
    return result


def read(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """The quarantine handed to this process (``ENV``), ``{}`` when none."""
    text = (os.environ if environ is None else environ).get(ENV, "")
    return json.loads(text) if text else {}


def encode(quarantine: Mapping[str, Mapping[str, str]]) -> str:
    """``quarantine`` as ``ENV``'s value."""
    return json.dumps(quarantine, sort_keys=True)


def why(family: str, hangs_only: bool = False) -> str | None:
    """Why the forms of ``family`` are quarantined here; None when they are not.

    Args:
      family: A form's family (``gpu_check_cases.Form.family``).
      hangs_only: Only a "hang" counts (``sanitize`` runs the forms that failed).
    """
    entry = read().get(family)
    if entry is None or (hangs_only and entry["kind"] != HANG):
        return None
    return f"quarantined after {entry['step']}: {entry['reason']}"


def form_of(case: str) -> str:
    """The form a check's case names ("native-fused/apply/fp32/defaults" -> "native-fused")."""
    return case.split("/", 1)[0]


def add(
    quarantine: dict[str, dict[str, str]], form: str, kind: str, reason: str, step: str
) -> bool:
    """Quarantines ``form`` (a "hang" replaces a "fail", not the reverse); True if it changed.

    The reference is never quarantined: every check compares against it.
    """
    old = quarantine.get(form)
    if form == "reference" or (old is not None and (old["kind"] == HANG or kind == FAIL)):
        return False
    quarantine[form] = {"kind": kind, "reason": reason, "step": step}
    return True


def blame(
    quarantine: dict[str, dict[str, str]], step: str, result: Mapping[str, Any], rc: int | None
) -> None:
    """Adds what step ``step``'s ``result`` (exit status ``rc``, None: timed out) shows.

    * what the step quarantined itself (``result["quarantine"]``);
    * the case it was running (``result["running"]``) when it timed out,
      if that run had been on the device for over ``SLOW_RUN_S``
      (``result["running_s"]``; "hang"), or when its process died ("fail");
    * in ``smoke``, every form with a failed check (not one that was
      unavailable or already quarantined).
    """
    for form, entry in result.get("quarantine", {}).items():
        add(quarantine, form, entry["kind"], entry["reason"], entry.get("step", step))
    running = result.get("running")
    if running:
        # A run that had just begun when the step ran out of time is no hang:
        # a timing step may run out of time in any of its samples.
        running_s = result.get("running_s", math.inf)
        if rc is None:
            if running_s > SLOW_RUN_S:
                ran = "" if math.isinf(running_s) else f" for {running_s:.0f} s"
                why = f"{running} was running{ran} at the timeout"
                add(quarantine, form_of(running), HANG, why, step)
        elif rc != 0:
            add(quarantine, form_of(running), FAIL, f"the process died in {running}", step)
    if step == "smoke":
        for c in result.get("checks", []):
            detail = str(c.get("detail", ""))
            if c["ok"] or detail.startswith(("unavailable", "quarantined")):
                continue
            add(quarantine, form_of(c["case"]), FAIL, f"{c['case']}: {detail}"[:300], step)
