"""The phases of ``bench.gpu_check``, one per process.

``python -m bench.gpu_check_phases PHASE --json FILE [--cpu]`` runs one phase
and writes its result to FILE: ``{"status": "ok" | "fail" | "skipped",
"reason": ..., "checks": [...], "rows": [...]}``. ``bench.gpu_check`` starts
each phase in its own process under a timeout, so a kernel that hangs fails
its phase and the run goes on.

Phases:

* ``smoke``, ``correctness``: ``bench.gpu_check_correctness``'s (every
  backend and form, ``bench.gpu_check_cases``, run once on a tiny tree, then
  against the reference on odd shapes, in a loop, and twice for determinism).
* ``timing-model``, ``timing-array``: ``bench.measure.measure`` (optax,
  every form, a copy of the same bytes) on ResNet-50's parameter set and one
  64M-element array, fp32 and bf16 gradients.
* ``timing-overhead``: optax, the reference and every form in place on
  ResNet-50's tree with one element a leaf (fp32), at two loop lengths: what
  a step and a call cost whatever the bytes (XLA's loop, launches, the
  handlers' host work; JAX's dispatch of a call).
* ``timing-tuning``: the fused launches at other geometries, in place, fp32.
  (The four timing phases are ``bench.gpu_check_timing``'s.)
* ``ncu``: Nsight Compute's DRAM bytes and kernel time of every form's step
  on ResNet-50, and its sections for the fused Triton kernel
  (``bench.gpu_check_ncu``; ``ncu-target`` is the program it profiles).

``--cpu`` runs the same with the interpreted kernels at tiny sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax

from bench import gpu_check_cases as C
from bench import gpu_check_timing as T
from bench.gpu_check_correctness import (
    COMPILE_WORKERS,
    RESULT,
    Partial,
    correctness,
    smoke,
)

# RESULT and Partial: the phase's result, for the other phases' modules too.
__all__ = ["PHASES", "RESULT", "Partial", "main"]


def _timing(cpu: bool, which: str, steps_per_call: int) -> dict[str, Any]:
    return T.timing(cpu, which, steps_per_call, RESULT, COMPILE_WORKERS)


def _environment() -> dict[str, str]:
    import importlib.metadata

    from bench import environment

    env = environment.collect()
    env["command"] = "python -m bench.gpu_check" + (
        " --cpu" if jax.default_backend() == "cpu" else ""
    )
    # Where jax looks for CUDA's tools (ptxas, libdevice): jax 0.11.2 gives the
    # string "None" when an nvidia.cu13 package without bin/ptxas is installed.
    try:
        from jax._src import lib as jax_lib

        env["jax cuda_path"] = repr(jax_lib.cuda_path)
    except (ImportError, AttributeError) as e:
        env["jax cuda_path"] = f"unknown ({type(e).__name__})"
    env["CUDA_ROOT"] = os.environ.get("CUDA_ROOT", "unset")
    for dist in ("triton", "jax-triton", "jax-cuda13-plugin"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = "not installed"
    return env


PHASES: dict[str, Callable[..., dict[str, Any]]] = {
    "smoke": smoke,
    "correctness": correctness,
    "timing-model": lambda cpu, spc: _timing(cpu, "model", spc),
    "timing-array": lambda cpu, spc: _timing(cpu, "array", spc),
    "timing-overhead": lambda cpu, spc: _timing(cpu, "overhead", spc),
    "timing-tuning": lambda cpu, spc: _timing(cpu, "tuning", spc),
}


def main(argv: list[str] | None = None) -> int:
    """Runs one phase; writes its JSON; 0 when it passed or was skipped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "phase", choices=[*PHASES, "ncu", "ncu-target", "sanitize", "sanitize-target"]
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="the phase's own limit")
    parser.add_argument("--steps-per-call", type=int, default=1, help="timing phases")
    parser.add_argument("--form", default=None, help="ncu-target: the form profiled")
    args = parser.parse_args(argv)
    C.register(args.cpu)
    RESULT.path = args.json
    RESULT.save()
    try:
        if args.phase in ("ncu", "ncu-target"):
            from bench import gpu_check_ncu

            if args.phase == "ncu":
                limit = max(10.0, args.timeout - 15.0)
                result = gpu_check_ncu.ncu(args.cpu, args.json, limit, RESULT)
            else:
                result = gpu_check_ncu.ncu_target(args.cpu, args.form)
        elif args.phase in ("sanitize", "sanitize-target"):
            from bench import gpu_check_sanitize as sanitizer

            if args.phase == "sanitize":
                limit = max(10.0, args.timeout - 15.0)
                result = sanitizer.sanitize(args.cpu, args.json, limit, RESULT)
            else:
                result = sanitizer.sanitize_target(args.cpu, args.timeout)
        elif args.phase.startswith("timing"):
            result = PHASES[args.phase](args.cpu, args.steps_per_call)
        else:
            result = PHASES[args.phase](args.cpu)
    except Exception as e:
        traceback.print_exc()
        result = {"status": "fail", "reason": C.error_text(e)}
    result = {**RESULT.result, **result}
    if not args.phase.endswith("-target"):  # what the phase's process saw (the report's first)
        result["environment"] = _environment()
    if result["status"] == "running":
        ok = all(c["ok"] for c in result["checks"])
        result["status"] = "ok" if ok else "fail"
    RESULT.result = result
    RESULT.save()
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
