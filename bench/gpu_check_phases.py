"""The phases of ``bench.gpu_check``, one per process.

``python -m bench.gpu_check_phases PHASE --json FILE [--cpu]`` runs one phase
and writes its result to FILE: ``{"status": "ok" | "fail" | "skipped",
"reason": ..., "checks": [...], "rows": [...]}``. ``bench.gpu_check`` starts
each phase in its own process under a timeout, so a kernel that hangs fails
its phase and the run goes on.

Phases:

* ``smoke``: one step of every backend and form (``bench.gpu_check_cases``)
  in both modes on a tiny tree: it runs and its outputs are finite.
* ``correctness``: every form and mode against the "reference" backend on
  random trees of odd shapes, for each option set and gradient dtype, with
  device memory poisoned with NaN before every kernel run; then each form
  twice on the same inputs (bitwise equal).
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
import concurrent.futures
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lars
from bench import gpu_check_cases as C
from bench import gpu_check_quarantine as quarantine
from bench import gpu_check_timing as T
from bench import workloads


class Partial:
    """The phase's result so far, rewritten to its JSON file after every check
    and row: a phase killed at its timeout keeps what it had done, and names
    the case it was running (``running``)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.result: dict[str, Any] = {
            "status": "running",
            "checks": [],
            "rows": [],
            "quarantine": {},
        }

    def running(self, case: str) -> None:
        """Records that a run of ``case`` is on the device now (until it ends, or its ``check``)."""
        self.result["running"] = case
        self.save()

    def check(self, case: str, ok: bool, detail: Any = "", **extra: Any) -> None:
        """Records one check."""
        self.result.pop("running", None)
        self.result["checks"].append({"case": case, "ok": bool(ok), "detail": detail, **extra})
        self.save()

    def quarantine(self, form: str, kind: str, reason: str, step: str) -> None:
        """Quarantines ``form`` (``bench.gpu_check_quarantine``) for this phase and the next."""
        if quarantine.add(self.result["quarantine"], form, kind, reason, step):
            self.save()

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """Records timing rows."""
        self.result["rows"] += rows
        self.save()

    def save(self) -> None:
        """Writes the result so far."""
        if self.path is not None:
            with open(self.path, "w") as f:
                json.dump(self.result, f, indent=1, default=str)


RESULT = Partial()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def _lower(
    form: C.Form | None, kwargs: dict[str, Any], mode: str, params: Any, grads: Any
) -> tuple[Any, Any]:
    """The init and the step (params and state donated) of a form, lowered for these arrays."""
    backend = "reference" if form is None else form.backend
    options = None if form is None else (form.options_dict or None)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        tx = lars.lars(C.LR, backend=backend, backend_options=options, **kwargs)
        if mode == "apply":
            return tx.apply_gradients(params, state, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    init = lars.lars(C.LR, backend=backend, backend_options=options, **kwargs).init
    state = jax.eval_shape(init, params)
    return jax.jit(init).lower(params), jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, grads
    )


# The case ``_run_checks`` runs now, and the seconds of each of its runs.
CASE: list[str] = []
RUN_S: list[float] = []


@contextlib.contextmanager
def _running() -> Iterator[None]:
    """One run of the current case: timed into ``RUN_S``, and named in the
    result (``running``) while it runs, not while it compiles: a step killed
    at its timeout then blames a run that hung, not a slow compile."""
    if CASE:
        RESULT.running(CASE[0])
    start = time.perf_counter()
    try:
        yield
    finally:
        RUN_S.append(time.perf_counter() - start)
        if RESULT.result.pop("running", None) is not None:
            RESULT.save()


def _runner(lowered: tuple[Any, Any]) -> Callable:
    """Compiles ``_lower``'s pair; ``run(params, grads, poison)`` runs one step on copies."""
    init, fn = lowered[0].compile(), lowered[1].compile()

    def run(params: Any, grads: Any, poison: bool) -> tuple[Any, Any]:
        with _running():
            state = init(params)
            # Donated: the step gets its own copies.
            p, s = jax.tree.map(jnp.copy, (params, state))
            if poison:
                C.poison_device_memory(2 * C.tree_bytes(params, grads, state))
            out = fn(p, s, grads)
            jax.block_until_ready(out)
            return out

    return run


def _compiled(
    form: C.Form | None, kwargs: dict[str, Any], mode: str, params: Any, grads: Any
) -> Callable:
    """``_runner`` of ``_lower``: compiled here."""
    return _runner(_lower(form, kwargs, mode, params, grads))


def _prepare(
    pool: concurrent.futures.Executor,
    form: C.Form | None,
    kwargs: dict[str, Any],
    mode: str,
    params: Any,
    grads: Any,
) -> concurrent.futures.Future:
    """Lowers here and compiles in ``pool``; the future holds the runner or the error."""
    try:
        lowered = _lower(form, kwargs, mode, params, grads)
    except Exception as e:
        failed: concurrent.futures.Future = concurrent.futures.Future()
        failed.set_exception(e)
        return failed
    return pool.submit(_runner, lowered)


# Programs compiled at once (lowering stays in the main thread): on the H200
# the correctness and timing steps' compiles, one after another, were most of
# their time (2026-12-04).
COMPILE_WORKERS = min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------
# smoke


Check = tuple[str, Callable[[], tuple[bool, Any]]]


def _run_checks(checks: list[Check], step: str, cpu: bool) -> dict[str, Any]:
    """Runs ``checks`` in order, each recorded, and quarantines what hangs or breaks the device.

    A form is quarantined (``bench.gpu_check_quarantine``) when one of its
    runs takes more than ``SLOW_RUN_S`` ("hang"; not with ``cpu``: the
    interpreters are slow), or when a check of it
    raised and a one-element computation fails after it ("fail"); its
    remaining checks are then recorded as failed without running. A failing
    device ends the phase: no later check could run.
    """
    held = RESULT.result["quarantine"]
    for name, run_check in checks:
        form = quarantine.form_of(name)
        if form in held:
            RESULT.check(name, False, f"quarantined: {held[form]['reason']}")
            continue
        CASE[:] = [name]
        RUN_S.clear()
        start = time.perf_counter()
        raised = False
        try:
            ok, detail = run_check()
        except Exception as e:
            ok, detail, raised = False, _error(e), True
        finally:
            CASE.clear()
        seconds, run_s = time.perf_counter() - start, max(RUN_S, default=0.0)
        RESULT.check(name, ok, detail, seconds=round(seconds, 3), run_s=round(run_s, 3))
        print(f"  {name:58s} {'ok  ' if ok else 'FAIL'} {seconds:6.1f} s {detail}", flush=True)
        if run_s > quarantine.SLOW_RUN_S and not cpu:
            why = f"{name}: one run took {run_s:.1f} s (over {quarantine.SLOW_RUN_S:g} s)"
            RESULT.quarantine(form, quarantine.HANG, why, step)
        failure = C.device_failure() if raised else None
        if failure is not None:
            why = f"{name} raised, and then the device failed: {failure}"
            RESULT.quarantine(form, quarantine.FAIL, why, step)
            return {"status": "fail", "reason": f"the device failed after {name}"}
    return {}


def smoke(cpu: bool) -> dict[str, Any]:
    """One step of every form and mode on a tiny tree."""
    params, grads = C.make_tree(((), (37,), (4, 8)), "fp32", seed=0)
    checks: list[Check] = []
    for form in [None, *C.forms(cpu)]:
        for mode in C.MODES:
            name = f"{'reference' if form is None else form.name}/{mode}"
            why = None if form is None else form.unavailable()
            if why is not None:
                checks.append((name, lambda why=why: (False, f"unavailable: {why}")))
                continue

            def check(form=form, mode=mode) -> tuple[bool, str]:
                new, _ = _compiled(form, {}, mode, params, grads)(params, grads, poison=False)
                finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
                shapes = jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
                return finite and shapes, "" if finite else "non-finite output"

            checks.append((name, check))
    return _run_checks(checks, "smoke", cpu)


# --------------------------------------------------------------------------
# correctness


def _worst(got: Any, want: Any) -> float:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max([C.scaled_error(a, b) for a, b in pairs], default=0.0)


def _compare(got: tuple[Any, Any], want: tuple[Any, Any], tol: float) -> tuple[bool, dict]:
    (gp, gs), (wp, ws) = got, want
    errs = {
        "params": _worst(gp, wp),
        "momentum": _worst(gs.momentum, ws.momentum),
        "trust_ratio": _worst(gs.trust_ratio, ws.trust_ratio),
    }
    same_counts = int(gs.count) == int(ws.count) and int(gs.skipped) == int(ws.skipped)
    return all(e <= tol for e in errs.values()) and same_counts, errs


def _correctness_cases(cpu: bool) -> list[tuple[C.Form, str, str, str]]:
    """(form, mode, dtype, option set).

    On a GPU: every option set in both modes with float32 gradients, and
    "everything" in both modes with each other dtype. With ``cpu``: every
    option set once, the modes and dtypes taking turns (interpreters are slow).
    """
    out = []
    dtypes = list(C.DTYPES)
    # Option set first, form last: a phase cut short has checked every form.
    for k, config in enumerate(C.CONFIGS):
        if cpu:
            out += [(f, C.MODES[k % 2], dtypes[k % len(dtypes)], config) for f in C.forms(cpu)]
            continue
        chosen = dtypes if config == "everything" else dtypes[:1]
        out += [(f, m, d, config) for m in C.MODES for d in chosen for f in C.forms(cpu)]
    return out


def correctness(cpu: bool) -> dict[str, Any]:
    """Every form and mode against the reference, poisoned; then determinism.

    Every program is lowered first, in order, while up to ``COMPILE_WORKERS``
    compile; then each check runs in order as its programs are ready.
    """
    with concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS) as pool:
        checks = _correctness_checks(cpu, pool) + _determinism_checks(cpu, pool)
        result = _run_checks(checks, "correctness", cpu)
        if result:  # the device failed: the compiles not yet started are cancelled
            pool.shutdown(wait=False, cancel_futures=True)
        return result


def _correctness_checks(cpu: bool, pool: concurrent.futures.Executor) -> list[Check]:
    """Each form and mode against the reference, its programs submitted to ``pool``."""
    shapes = C.odd_shapes(cpu)
    poison = not cpu
    bad = {f.name: f.unavailable() for f in C.forms(cpu)}
    # The reference's programs, by (mode, dtype, option set): the forms share
    # inputs (random, one draw per key) so the reference runs once per input.
    reference: dict[tuple[str, ...], Any] = {}
    want: dict[tuple[str, ...], Any] = {}
    checks: list[Check] = []
    for form, mode, dtype, config in _correctness_cases(cpu):
        name = f"{form.name}/{mode}/{dtype}/{config}"
        if bad[form.name] is not None:
            checks.append((name, lambda why=bad[form.name]: (False, f"unavailable: {why}")))
            continue
        seed = 100 + 10 * list(C.DTYPES).index(dtype) + list(C.CONFIGS).index(config)
        params, grads = C.make_tree(shapes, dtype, seed=seed + 1000 * C.MODES.index(mode))
        kwargs = C.config_kwargs(config, params)
        if (mode, dtype, config) not in reference:
            reference[mode, dtype, config] = _prepare(pool, None, kwargs, mode, params, grads)
        got = _prepare(pool, form, kwargs, mode, params, grads)
        variants = [("", grads)]
        if config == "skip_nonfinite":  # a NaN gradient: the step is skipped
            bad_grads = dict(grads)
            bad_grads["03"] = grads["03"].at[5].set(jnp.nan)
            variants.append(("+nan", bad_grads))
        for suffix, g in variants:
            key = (mode, dtype, config, suffix)

            def check(key=key, p=params, g=g, got=got, tol=C.TOLERANCE[dtype]) -> tuple:
                if key not in want:
                    want[key] = reference[key[:3]].result()(p, g, poison=False)
                ok, errs = _compare(got.result()(p, g, poison=poison), want[key], tol)
                return ok, {k: f"{v:.2e}" for k, v in errs.items()}

            checks.append((name + suffix, check))
    return checks


def _determinism_checks(cpu: bool, pool: concurrent.futures.Executor) -> list[Check]:
    """Each form twice on the same inputs, bitwise (ResNet-50's set on a GPU)."""
    shapes = C.odd_shapes(cpu) if cpu else workloads.resnet50_shapes()
    poison = not cpu
    params, grads = C.make_tree(shapes, "bf16-grads", seed=7)
    kwargs = C.config_kwargs("everything", params)
    checks: list[Check] = []
    for form in C.forms(cpu):
        why = form.unavailable()
        for mode in C.MODES[1:] if cpu else C.MODES:
            name = f"{form.name}/{mode}/deterministic"
            if why is not None:
                checks.append((name, lambda: (False, "unavailable")))
                continue
            program = _prepare(pool, form, kwargs, mode, params, grads)

            def check(program=program, p=params, g=grads) -> tuple:
                run = program.result()
                ok = C.bitwise_equal(run(p, g, poison), run(p, g, poison))
                return ok, "" if ok else "two runs differ"

            checks.append((name, check))
    return checks


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
        result = {"status": "fail", "reason": _error(e)}
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
