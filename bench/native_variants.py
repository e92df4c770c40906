"""Where the native CPU step's time goes: variants of it, timed side by side.

Run from the repository root with ``python -m bench.native_variants``
(``--help`` for options). On one parameter set (default ResNet-50, float32 or
bfloat16 gradients) it times, interleaved round after round so that load from
other processes hits all of them alike:

* ``copy``: XLA's in-place ``x * c + d`` on a donated buffer of half the
  bytes the step moves (the bench's copy floor, 20 B/param for fp32 grads);
* ``numpy``: ``numpy.copyto`` of the same bytes, one thread;
* ``apply`` (per thread count): the bench's ``native:apply`` step,
  ``lars.lars(..., backend="native").apply_gradients`` jitted with params
  and state donated;
* ``loop`` (per thread count): ``--loop`` such steps in one jitted
  ``lax.fori_loop``, the time a step: what the step costs inside a larger
  jitted program (a training step), where the arrays cross the jit boundary
  once for all of them;
* ``update-only``: the native call with given trust ratios (no norm pass);
* ``norms-only``: the native call with the update pass switched off
  (the library's ``phases`` tuning knob);
* variants of the library's settings (``--knobs``), e.g. ``schedule=1``
  (the earlier lookahead order; with ``cache_bytes=0`` no layer counted on
  to stay cached), ``schedule=0`` (the earliest order), ``share_chunks=2``
  (larger shares) or ``sum_streams=1,update_streams=1`` (each item's loops
  in one part, as before the parts side by side);
* with ``--optax``, ``jax.jit(optax.lars)`` (the bench's baseline).

With ``--after`` it then times the first ``apply`` step on its own right
after each of: another such step, the copy, an optax step, and an optax step
followed by a 2 ms or a 20 ms sleep; and reads from ``/proc`` (Linux) how
much CPU time the process's other threads (XLA's) spend in the 20 ms after
each. This is what showed that ``jax.jit(optax.lars)`` leaves work behind
that slows the next step (the bench's ``--settle``).

The variants run in a new random order every round, each sample after a
short sleep (``--settle``): without it a step right after ``optax.lars``
(306 MB of temporaries allocated and freed) runs measurably slower.

For each native variant it also prints the time the handler itself ran (the
library's last-step clock) so that the cost outside the handler (JAX's and
XLA's part of the call) shows, split with the handler's start time (Linux:
the clock of ``time.perf_counter_ns``) into before the handler (dispatch and
arguments) and after it (results, until ``block_until_ready`` returns); and,
once, the compiled step's temporary bytes and any
``copy`` instruction XLA put around the custom call.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lars
from bench import hlo, measure, steps, workloads
from lars import contract
from lars.kernels import native
from lars.kernels.native import library

GRAD_DTYPES = {"fp32": jnp.float32, "bf16-grads": jnp.bfloat16}


def _tune(name: str, value: int) -> None:
    if library.cpu().LarsNativeCpuTune(name.encode(), value) != 0:
        raise ValueError(f"unknown tuning knob {name!r} or bad value {value}")


class Variant:
    """A step to time: a function of its carried state, run ``k`` times."""

    def __init__(
        self,
        name: str,
        fn: Callable,
        carry: list,
        fixed: list,
        knobs: dict,
        steps_per_call: int = 1,
    ) -> None:
        self.name, self.fn, self.carry, self.fixed, self.knobs = name, fn, carry, fixed, knobs
        self.steps_per_call = steps_per_call
        self.times: list[float] = []
        self.handler: list[float] = []
        self.before: list[float] = []  # seconds from the call to the handler's start
        self.after: list[float] = []  # seconds from the handler's end to the results
        self.span_ns = (0, 0)  # perf_counter_ns at the start and the end of the last run

    def run(self, k: int) -> float:
        for name, value in self.knobs.items():
            _tune(name, value)
        start = time.perf_counter_ns()
        for _ in range(k):
            self.carry = list(self.fn(*self.carry, *self.fixed))
        jax.block_until_ready(self.carry)
        self.span_ns = (start, time.perf_counter_ns())
        seconds = (self.span_ns[1] - start) * 1e-9 / (k * self.steps_per_call)
        for name in self.knobs:
            _tune(name, -1)  # back to the default
        return seconds


def _lars_apply(params, grads, threads: int, loop: int = 0) -> tuple[Callable, list, list]:
    """The bench's ``native:apply`` step with ``threads`` threads.

    With ``loop`` > 0, that many steps in one jitted ``lax.fori_loop``.
    """

    def factory(lr):
        return lars.lars(
            lr,
            momentum=steps.MOMENTUM,
            weight_decay=steps.WEIGHT_DECAY,
            trust_coefficient=steps.TRUST_COEFFICIENT,
            eps=0.0,
            lr_inside_momentum=True,
            backend="native",
            backend_options={"num_threads": threads},
        )

    state = jax.jit(factory(steps.LEARNING_RATE).init)(params)
    lr = jnp.asarray(steps.LEARNING_RATE, jnp.float32)
    step = steps.make_step(factory, apply=True)
    run = steps.looped(step, 2, loop) if loop else step
    fn = jax.jit(run, donate_argnums=(0, 1))
    compiled = fn.lower(params, state, grads, lr).compile()
    return compiled, [params, state], [grads, lr]


def _raw_call(params, grads, threads: int, given: bool) -> tuple[Callable, list, list]:
    """The custom call alone (write_params), optionally with given ratios."""
    spec = contract.StepSpec.build(
        contract.LarsConfig(
            momentum=steps.MOMENTUM,
            weight_decay=steps.WEIGHT_DECAY,
            trust_coefficient=steps.TRUST_COEFFICIENT,
            eps=0.0,
            lr_inside_momentum=True,
        ),
        params,
        grads,
        decay_mask=[True] * len(params),
        trust_mask=[True] * len(params),
        write_params=True,
        given_ratios=given,
        options={"num_threads": threads},
    )
    n = len(params)

    def step(params, momentum, grads, lr):
        ratios = jnp.full((n,), 0.5, jnp.float32) if given else None
        norm = jnp.asarray(1.0, jnp.float32) if given else None
        r = native.run(spec, contract.StepInputs(params, grads, momentum, lr, None, ratios, norm))
        return r.updates, r.momentum

    momentum = [jnp.zeros_like(p) for p in params]
    lr = jnp.asarray(steps.LEARNING_RATE, jnp.float32)
    fn = jax.jit(step, donate_argnums=(0, 1))
    compiled = fn.lower(params, momentum, grads, lr).compile()
    return compiled, [params, momentum], [grads, lr]


def _copies_around_call(compiled: Any) -> str:
    text = compiled.as_text()
    n_copy = sum(1 for line in text.splitlines() if " copy(" in line or "copy-start" in line)
    return (
        f"{n_copy} copy ops, {hlo.count_launches(text)} launches, "
        f"temp {hlo.temp_bytes(compiled):.0f} B"
    )


def build(
    workload: workloads.Workload,
    dtype: str,
    thread_counts: list[int],
    knobs: list[str],
    with_optax: bool,
    loop: int = 0,
):
    params0 = measure.host_arrays(workload.shapes, np.float32, 0.05, 0.0)
    grads = jax.device_put(measure.host_arrays(workload.shapes, GRAD_DTYPES[dtype], 1e-3, 0.5))
    moved = workload.n_params * measure.bytes_per_param(dtype)
    variants: list[Variant] = []
    copy = steps.copy_runner(moved)
    variants.append(
        Variant("copy (XLA x*c+d)", copy.compiled, list(copy.carry), list(copy.fixed), {})
    )
    src = np.ones(moved // 8, np.float32)
    dst = np.zeros_like(src)
    variants.append(
        Variant("numpy copyto", lambda d, s: (np.copyto(d, s) or d, s), [dst, src], [], {})
    )
    if with_optax:
        r = steps.lars_runner(steps.OPTAX, jax.device_put(params0), grads)
        variants.append(
            Variant("jax.jit(optax.lars)", r.compiled, list(r.carry), list(r.fixed), {})
        )
    # The cost of dispatching a jitted step on these buffers: a no-op on the
    # params and momentum (donated, returned as they are).
    noop = jax.jit(lambda p, v, g, lr: (p, v), donate_argnums=(0, 1))
    carry = [jax.device_put(params0), [jnp.zeros(s, jnp.float32) for s in workload.shapes]]
    lr = jnp.asarray(steps.LEARNING_RATE, jnp.float32)
    variants.append(Variant("dispatch (no-op step)", noop, carry, [grads, lr], {}))
    notes = {}
    for t in thread_counts:
        c, carry, fixed = _lars_apply(jax.device_put(params0), grads, t)
        notes[f"apply t={t}"] = _copies_around_call(c)
        variants.append(Variant(f"apply t={t}", c, carry, fixed, {}))
        if loop:
            c, carry, fixed = _lars_apply(jax.device_put(params0), grads, t, loop)
            notes[f"loop t={t}"] = _copies_around_call(c)
            name = f"loop t={t} ({loop} in one jit)"
            variants.append(Variant(name, c, carry, fixed, {}, steps_per_call=loop))
        c, carry, fixed = _raw_call(jax.device_put(params0), grads, t, given=False)
        notes[f"call t={t}"] = _copies_around_call(c)
        variants.append(Variant(f"call t={t}", c, carry, fixed, {}))
        c, carry, fixed = _raw_call(jax.device_put(params0), grads, t, given=True)
        variants.append(Variant(f"update-only t={t}", c, carry, fixed, {}))
        c, carry, fixed = _raw_call(jax.device_put(params0), grads, t, given=False)
        variants.append(Variant(f"norms-only t={t}", c, carry, fixed, {"phases": 1}))
        for spec in knobs:
            kv = dict(item.split("=") for item in spec.split(","))
            c, carry, fixed = _raw_call(jax.device_put(params0), grads, t, given=False)
            variants.append(
                Variant(f"call t={t} {spec}", c, carry, fixed, {k: int(v) for k, v in kv.items()})
            )
    return variants, moved, notes


def _thread_ticks() -> dict[str, int]:
    """CPU time (user + system, in clock ticks) of each of this process's threads."""
    ticks = {}
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks[task] = int(fields[11]) + int(fields[12])
    return ticks


def after_table(variants: list[Variant], rounds: int) -> None:
    """Times the first ``apply`` step right after each kind of predecessor."""
    by_name = {v.name: v for v in variants}
    apply = next(v for v in variants if v.name.startswith("apply"))
    optax_step = by_name["jax.jit(optax.lars)"]
    copy = variants[0]

    def then_sleep(seconds: float) -> Callable[[], None]:
        return lambda: (optax_step.run(1), time.sleep(seconds))

    before = {
        f"another {apply.name} step": lambda: apply.run(1),
        "the copy": lambda: copy.run(1),
        "an optax step": lambda: optax_step.run(1),
        "an optax step, then 2 ms": then_sleep(0.002),
        "an optax step, then 20 ms": then_sleep(0.02),
    }
    has_proc = os.path.isdir(f"/proc/{os.getpid()}/task")
    main_thread = str(threading.get_native_id())
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK") if has_proc else 0.0
    steps = {name: [] for name in before}
    handler = {name: [] for name in before}
    others = {name: 0 for name in before}
    for _ in range(rounds):
        for name, run in before.items():
            run()
            steps[name].append(apply.run(1))
            handler[name].append(native.last_step_seconds())
        if has_proc:  # the other threads' CPU time in the 20 ms after each predecessor
            for name, run in before.items():
                run()
                a = _thread_ticks()
                time.sleep(0.02)
                b = _thread_ticks()
                others[name] += sum(b[t] - a.get(t, 0) for t in b if t != main_thread)
    print(f"\n# after: the {apply.name} step right after ... (medians of {rounds})")
    print(
        f"{'after':32s} {'step ms':>8s} {'handler':>8s} {'other threads ms CPU in next 20 ms':>36s}"
    )
    for name in before:
        cpu = f"{others[name] * tick_ms / rounds:36.1f}" if has_proc else f"{'-':>36s}"
        print(
            f"{name:32s} {1e3 * np.median(steps[name]):8.2f} "
            f"{1e3 * np.median(handler[name]):8.2f} {cpu}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="resnet50")
    p.add_argument("--dtype", default="fp32", choices=list(GRAD_DTYPES))
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument(
        "--steps",
        type=int,
        default=1,
        help="steps per sample (1: also the time outside the handler)",
    )
    p.add_argument(
        "--knobs",
        action="append",
        default=[],
        help="a tuning variant, e.g. update_streams=1 or schedule=1,cache_bytes=0 (repeatable)",
    )
    p.add_argument(
        "--loop",
        type=int,
        default=8,
        help="steps in one jitted loop for the loop variants (0: none; default %(default)s)",
    )
    p.add_argument("--optax", action="store_true", help="also time jax.jit(optax.lars)")
    p.add_argument(
        "--after",
        action="store_true",
        help="then time the apply step right after each kind of step (implies --optax)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.05,
        help="seconds of sleep before each sample (what a step leaves behind, e.g. optax's "
        "freed temporaries, slows the next one otherwise; default %(default)s)",
    )
    args = p.parse_args()
    (workload,) = workloads.select(
        [*workloads.full_workloads(), *workloads.quick_workloads()], args.workload
    )[:1]
    threads = [int(t) for t in args.threads.split(",")]
    variants, moved, notes = build(
        workload, args.dtype, threads, args.knobs, args.optax or args.after, args.loop
    )
    for v in variants:
        v.run(2)  # warm up
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for index in rng.permutation(len(variants)):
            v = variants[index]
            time.sleep(args.settle)
            v.times.append(v.run(args.steps))
            if v.name.startswith(("apply", "call", "update", "norms")):
                v.handler.append(native.last_step_seconds())
                start = native.last_step_start_ns()
                v.before.append((start - v.span_ns[0]) * 1e-9)
                v.after.append((v.span_ns[1] - start) * 1e-9 - v.handler[-1])
    copy_ms = 1e3 * float(np.median(variants[0].times))
    copy_min = 1e3 * float(np.min(variants[0].times))
    print(
        f"# {workload.name} {args.dtype}: {workload.n_params:,} params, {moved / 1e6:.0f} MB "
        f"moved; isa {native.cpu_isa()}; jax {jax.__version__}; loadavg "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'variant':32s} {'median':>7s} {'p25':>7s} {'p75':>7s} {'min':>7s} {'x copy':>6s} "
        f"{'min x':>6s} {'GB/s':>5s} {'handler':>7s} {'h min':>7s} {'outside':>7s} "
        f"{'before':>7s} {'after':>7s}"
    )
    for v in variants:
        t = 1e3 * np.asarray(v.times)
        med, low = float(np.median(t)), float(np.min(t))
        line = (
            f"{v.name:32s} {med:7.2f} {np.percentile(t, 25):7.2f} {np.percentile(t, 75):7.2f} "
            f"{low:7.2f} {med / copy_ms:6.2f} {low / copy_min:6.2f} {moved / med / 1e6:5.1f}"
        )
        if v.handler:
            h = 1e3 * np.asarray(v.handler)
            if args.steps == 1:
                outside = (
                    f"{np.median(t - h):7.2f} {1e3 * np.median(v.before):7.2f} "
                    f"{1e3 * np.median(v.after):7.2f}"
                )
            else:
                outside = ""
            line += f" {np.median(h):7.2f} {np.min(h):7.2f} {outside}"
        print(line)
    for k, v in notes.items():
        print(f"# {k}: {v}")
    if args.after:
        after_table(variants, args.rounds)


if __name__ == "__main__":
    main()
