"""The ``smoke`` and ``correctness`` phases of ``bench.gpu_check``, and a phase's result.

``Partial`` is a phase's result, rewritten to its JSON file as it grows
(``bench.gpu_check_phases`` runs the phases, one per process). The checks
run in order (``_run_checks``); a form whose run hangs or leaves the device
failing is quarantined at once (``bench.gpu_check_quarantine``).

* ``smoke``: one step of every backend and form in both modes on a tiny
  tree: it runs and its outputs are finite.
* ``correctness``: every form and mode against the "reference" backend on
  random trees of odd shapes, for each option set and gradient dtype, with
  device memory poisoned with NaN before every kernel run; each form
  ``LOOP_STEPS`` steps in one jitted loop against the reference's loop; then
  each form twice on the same inputs, ``LOOP_STEPS`` steps in a loop
  (bitwise equal; ResNet-50's set on a GPU).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lars
from bench import gpu_check_cases as C
from bench import gpu_check_quarantine as quarantine
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
        self._marked = False

    def running(self, case: str | None) -> None:
        """Records that a run of ``case`` is on the device now; None: that none is.

        In a file of its own beside the result (``path`` +
        ``gpu_check_quarantine.MARKER``; ``read_result`` joins them): the
        timing steps mark every timed sample, and rewriting their whole
        result twice a sample would cost seconds of their budget.
        """
        if self.path is None or (case is None and not self._marked):
            return
        marker = self.path + quarantine.MARKER
        if case is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)
        else:
            quarantine.write_text(marker, case)
        self._marked = case is not None

    def check(self, case: str, ok: bool, detail: Any = "", **extra: Any) -> None:
        """Records one check."""
        self.running(None)
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
            quarantine.write_text(self.path, json.dumps(self.result, indent=1, default=str))


RESULT = Partial()


def _lower(
    form: C.Form | None,
    kwargs: dict[str, Any],
    mode: str,
    params: Any,
    grads: Any,
    steps: int = 1,
) -> tuple[Any, Any]:
    """The init and the step (params and state donated) of a form, lowered for these arrays.

    ``steps`` > 1: that many steps on the same grads in one ``lax.fori_loop``.
    """
    backend = "reference" if form is None else form.backend
    options = None if form is None else (form.options_dict or None)

    def one(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        tx = lars.lars(C.LR, backend=backend, backend_options=options, **kwargs)
        if mode == "apply":
            return tx.apply_gradients(params, state, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        if steps == 1:
            return one(params, state, grads)
        return jax.lax.fori_loop(0, steps, lambda _, c: one(*c, grads), (params, state))

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
        RESULT.running(None)


def _runner(lowered: tuple[Any, Any]) -> Callable:
    """Compiles ``_lower``'s pair; ``run(params, grads, poison)`` runs one step on copies."""
    init, fn = lowered[0].compile(), lowered[1].compile()

    def run(params: Any, grads: Any, poison: bool) -> tuple[Any, Any]:
        state = init(params)
        # Donated: the step gets its own copies.
        p, s = jax.block_until_ready(jax.tree.map(jnp.copy, (params, state)))
        if poison:
            C.poison_device_memory(2 * C.tree_bytes(params, grads, state))
        # Only the step is timed: the copies above compile a program a new
        # shape on first use (ResNet-50's leaves have dozens of shapes).
        with _running():
            return jax.block_until_ready(fn(p, s, grads))

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
    steps: int = 1,
) -> concurrent.futures.Future:
    """Lowers here and compiles in ``pool``; the future holds the runner or the error."""
    try:
        lowered = _lower(form, kwargs, mode, params, grads, steps)
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
# the checks, in order


Check = tuple[str, Callable[[], tuple[bool, Any]]]


def _run_checks(checks: list[Check], step: str, cpu: bool) -> dict[str, Any]:
    """Runs ``checks`` in order, each recorded, and quarantines what hangs or breaks the device.

    A form is quarantined (``bench.gpu_check_quarantine``) when one of its
    runs takes more than ``SLOW_RUN_S`` ("hang"; not with ``cpu``: the
    interpreters are slow), or when a check of it raised and a one-element
    computation fails after it ("fail"); its
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
            ok, detail, raised = False, C.error_text(e), True
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


# --------------------------------------------------------------------------
# smoke


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
    """Every form and mode against the reference, poisoned, then in a loop; then determinism.

    Every program is lowered first, in order, while up to ``COMPILE_WORKERS``
    compile; then each check runs in order as its programs are ready.
    """
    with concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS) as pool:
        checks = _correctness_checks(cpu, pool) + _loop_checks(cpu, pool)
        checks += _determinism_checks(cpu, pool)
        result = _run_checks(checks, "correctness", cpu)
        if result:  # the device failed: the compiles not yet started are cancelled
            pool.shutdown(wait=False, cancel_futures=True)
        return result


def _against_reference(
    got: concurrent.futures.Future,
    reference: concurrent.futures.Future,
    want: dict[Any, Any],
    key: Any,
    params: Any,
    grads: Any,
    poison: bool,
    tol: float,
) -> Callable[[], tuple[bool, Any]]:
    """A check: ``got``'s run against the reference's, which runs once per ``key`` (``want``)."""

    def check() -> tuple[bool, Any]:
        if key not in want:
            want[key] = reference.result()(params, grads, poison=False)
        ok, errs = _compare(got.result()(params, grads, poison), want[key], tol)
        return ok, {k: f"{v:.2e}" for k, v in errs.items()}

    return check


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
            ref, tol = reference[mode, dtype, config], C.TOLERANCE[dtype]
            check = _against_reference(got, ref, want, key, params, g, poison, tol)
            checks.append((name + suffix, check))
    return checks


# Steps of the looped checks and the determinism checks: the other checks run
# one step a call, and the timing steps 100 in a loop (the state, the fused
# launch's counters and its scratch from one step to the next).
LOOP_STEPS = 3


def _loop_checks(cpu: bool, pool: concurrent.futures.Executor) -> list[Check]:
    """Each form ``LOOP_STEPS`` steps in one jitted loop against the reference's loop (fp32)."""
    config = "decay-nesterov-trustclip-masks"  # momentum: the state carries over
    params, grads = C.make_tree(C.odd_shapes(cpu), "fp32", seed=11)
    kwargs = C.config_kwargs(config, params)
    checks: list[Check] = []
    want: dict[Any, Any] = {}
    for mode in C.MODES[1:] if cpu else C.MODES:
        reference = _prepare(pool, None, kwargs, mode, params, grads, LOOP_STEPS)
        for form in C.forms(cpu):
            name = f"{form.name}/{mode}/fp32/{LOOP_STEPS}-steps"
            why = form.unavailable()
            if why is not None:
                checks.append((name, lambda why=why: (False, f"unavailable: {why}")))
                continue
            got = _prepare(pool, form, kwargs, mode, params, grads, LOOP_STEPS)
            tol = C.TOLERANCE["fp32"]
            check = _against_reference(got, reference, want, mode, params, grads, not cpu, tol)
            checks.append((name, check))
    return checks


def _determinism_checks(cpu: bool, pool: concurrent.futures.Executor) -> list[Check]:
    """Each form twice on the same inputs, bitwise: ``LOOP_STEPS`` steps in one loop.

    On ResNet-50's set on a GPU: the first runs at that scale over several
    steps, as the timing runs them, so that a form that hangs there is
    quarantined before the timing steps.
    """
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
            program = _prepare(pool, form, kwargs, mode, params, grads, LOOP_STEPS)

            def check(program=program, p=params, g=grads) -> tuple:
                run = program.result()
                ok = C.bitwise_equal(run(p, g, poison), run(p, g, poison))
                return ok, "" if ok else "two runs differ"

            checks.append((name, check))
    return checks
