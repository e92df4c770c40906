"""The LARS step on the Triton kernels, independent of how a kernel is launched.

:func:`run` is the backend contract's step for both Triton backends: it
builds the plan (``plan.py``) and drives its passes through a *launcher*
(``backend.py``: ``jax_triton.triton_call`` on a GPU; ``interpret.py``:
Triton's interpreter in a ``jax.pure_callback``). Between the passes, in
XLA: each launch's per-chunk partial sums are reduced per leaf in a fixed
order, and the per-leaf sums become the global gradient norm and (in the
two-pass form) the trust ratios with the reference's formula. The pass
functions also take NumPy (``xp=numpy``) for kernel-level tests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lars.contract import Scalar, StepInputs, StepResult, StepSpec, scalars

from . import plan as P


@dataclasses.dataclass(frozen=True)
class OutSpec:
    """Shape and dtype of one kernel output."""

    shape: tuple[int, ...]
    dtype: Any


class Launcher(Protocol):
    """Runs one launch; returns its outputs (arrays of ``outputs``' shapes and dtypes).

    ``aliases`` maps input to output positions (the output is the input's
    buffer); the outputs at the positions in ``zeroed`` are zero when the
    kernel starts. A launcher is hashable (a jit-static argument).
    """

    def __call__(
        self,
        spec: P.KernelSpec,
        inputs: list[Any],
        outputs: list[OutSpec],
        aliases: dict[int, int],
        grid: int,
        constexprs: dict[str, bool | int],
        zeroed: tuple[int, ...] = (),
    ) -> list[Any]: ...


def run(spec: StepSpec, inputs: StepInputs, launch: Launcher) -> StepResult:
    """One LARS step (``lars.contract``'s ``run``) with the kernels launched by ``launch``.

    The hyperparameters reach the kernels as the ``lars.contract.scalars``
    vector, never as compiled-in constants; only the plan and the launcher
    are static.
    """
    if spec.given_ratios:
        raise ValueError("the Triton backends do not take given trust ratios")
    plan = P.StepPlan.of(spec)
    params, grads, momentum, lr, finite = inputs[:5]
    params, grads, momentum = list(params), list(grads), list(momentum)
    values = scalars(lr, spec.config, finite=finite)
    if plan.flags.clip_norm:
        # optax.clip_by_global_norm: g <- g if ||g|| < c else (g / ||g||) * c.
        g_norm = _global_norm(params, grads, values, plan=plan, launch=launch)
        values = scalars(lr, spec.config, finite=finite, global_norm=g_norm)
    first, new_momentum, ratios = _step(params, grads, momentum, values, plan=plan, launch=launch)
    return StepResult(list(first), list(new_momentum), list(ratios))


@functools.partial(jax.jit, static_argnames=("plan", "launch"))
def _global_norm(params, grads, values, *, plan: P.StepPlan, launch: Launcher) -> jax.Array:
    """The global gradient norm (float32) from the GLOBAL_NORM pass."""
    sums = pass_sums(P.GLOBAL_NORM, params, grads, values, plan=plan, launch=launch, xp=jnp)
    return jnp.sqrt(jnp.sum(sums[:, P.SUM_W2]))


@functools.partial(jax.jit, static_argnames=("plan", "launch"))
def _step(params, grads, momentum, values, *, plan: P.StepPlan, launch: Launcher):
    """Norms, trust ratios and update: (updates or new params, new momenta, ratios).

    Jitted so that eager calls reuse the compiled kernels.
    """
    f32 = np.float32
    one = jnp.ones((), f32)
    run = dict(plan=plan, launch=launch, xp=jnp)
    if plan.tuning.fused:
        # Norms, trust ratios and the update in one launch per dtype group.
        first, new_momentum, ratios = pass_fused(params, grads, momentum, values, **run)
        # Empty leaves: zero norms, so r = 1, then trust_clip, as in the reference.
        empty_ratio = one
        if plan.flags.trust_clip:
            empty_ratio = jnp.minimum(one, values[Scalar.TRUST_CLIP])
        for i, leaf in enumerate(plan.leaves):
            if leaf.size == 0:
                ratios[i] = empty_ratio if leaf.trust else one
        first = _fill_empty(first, new_momentum, params, momentum, plan)
        return first, new_momentum, _skipped_ratios(ratios, values, plan)

    # Trust ratios from the per-leaf sums (optax.scale_by_trust_ratio). Empty
    # leaves have zero sums: r = 1, then trust_clip, as in the reference.
    sums = pass_sums(P.SUMS, params, grads, values, **run)
    w_norm = jnp.sqrt(sums[:, P.SUM_W2])
    u_norm = jnp.sqrt(sums[:, P.SUM_U2])
    r = values[Scalar.TRUST_COEFFICIENT] * w_norm / (u_norm + values[Scalar.EPS])
    r = jnp.where(jnp.logical_or(w_norm == 0.0, u_norm == 0.0), one, r)
    if plan.flags.trust_clip:
        r = jnp.minimum(r, values[Scalar.TRUST_CLIP])
    trust = np.asarray([leaf.trust for leaf in plan.leaves], bool)
    ratios = jnp.where(trust, r, one).astype(f32)

    first, new_momentum = pass_update(params, grads, momentum, ratios, values, **run)
    first = _fill_empty(first, new_momentum, params, momentum, plan)
    ratios = [ratios[i] for i in range(len(plan.leaves))]
    return first, new_momentum, _skipped_ratios(ratios, values, plan)


def pass_sums(
    kind: str,
    params: Sequence[Any],
    grads: Sequence[Any],
    values: Any,
    *,
    plan: P.StepPlan,
    launch: Launcher,
    xp: Any,
) -> Any:
    """Runs a norm pass (GLOBAL_NORM or SUMS); returns per-leaf sums, (leaves, 2) float32.

    Each launch's per-chunk partial sums are reduced per leaf in table order
    (a gather and one sum: fixed order, no atomics). Leaves the pass skips
    (empty, or without a trust ratio for SUMS) get zero sums.
    """
    f32 = np.float32
    parts = [xp.zeros((1, 2), f32)]  # row 0: the zero sums
    row_of: dict[int, int] = {}
    offset = 1
    for launch_ in plan.launches(kind):
        spec = P.kernel_spec(launch_, plan.flags)
        ids = launch_.leaves
        inputs = [xp.asarray(launch_.table), values]
        if spec.with_params:
            inputs += [params[i] for i in ids]
        inputs += [grads[i] for i in ids]
        programs = launch_.num_programs
        (partials,) = launch(
            spec,
            inputs,
            [OutSpec((programs, 2), f32)],
            {},
            programs,
            spec.constexprs(plan.flags, plan.tuning),
        )
        padded = xp.concatenate([partials, xp.zeros((1, 2), f32)])
        parts.append(xp.sum(padded[P.reduce_index(launch_.spans, programs)], axis=1))
        row_of.update({i: offset + k for k, i in enumerate(ids)})
        offset += len(ids)
    sums = xp.concatenate(parts)
    return sums[np.asarray([row_of.get(i, 0) for i in range(len(plan.leaves))], np.int32)]


def update_inputs(
    launch_: P.Launch,
    spec: P.KernelSpec,
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    head: list[Any],
    write_params: bool,
) -> tuple[list[Any], list[OutSpec], dict[int, int]]:
    """Inputs, per-leaf outputs and aliases of an UPDATE or FUSED launch.

    Momentum (and the params, when they are written) are updated in place:
    each is aliased to its output.
    """
    ids = launch_.leaves
    k = len(ids)
    inputs = list(head)
    w_at = len(inputs)
    if spec.with_params:
        inputs += [params[i] for i in ids]
    inputs += [grads[i] for i in ids]
    v_at = len(inputs)
    inputs += [momentum[i] for i in ids]
    outputs = [OutSpec(tuple(np.shape(params[i])), params[i].dtype) for i in ids]
    outputs += [OutSpec(tuple(np.shape(momentum[i])), momentum[i].dtype) for i in ids]
    aliases = {v_at + j: k + j for j in range(k)}
    if write_params:
        aliases.update({w_at + j: j for j in range(k)})
    return inputs, outputs, aliases


def fused_outputs(launch_: P.Launch, tuning: P.Tuning | None = None) -> list[OutSpec]:
    """The outputs of a FUSED launch after the per-leaf ones; the last is zeroed."""
    k = len(launch_.leaves)
    rows = max(1, launch_.spans[-1][1])
    words = P.sync_words(k, tuning or P.Tuning())
    return [
        OutSpec((rows, 2), np.float32),  # per-chunk partial sums
        OutSpec((k,), np.float32),  # trust ratios
        OutSpec((words,), np.int32),  # item counter, error word, per slot arrivals and flag
    ]


def _raise_on_spin_error(word: Any) -> None:
    """Raises when a fused launch's error word says a wait gave up (``Tuning.spin_limit``)."""
    if int(np.asarray(word)) == P.ERROR_SPIN:
        raise RuntimeError(
            "triton fused pass: an update waited spin_limit polls for its trust ratio "
            "and gave up (a sums item never arrived); the results are not valid"
        )


def pass_fused(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    values: Any,
    *,
    plan: P.StepPlan,
    launch: Launcher,
    xp: Any,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Runs the fused pass; returns (updates or new params, new momenta, ratios), per leaf.

    Empty leaves are not launched: their entries are None.
    """
    n = len(plan.leaves)
    first: list[Any] = [None] * n
    new_momentum: list[Any] = [None] * n
    ratios: list[Any] = [None] * n
    for launch_ in plan.launches(P.FUSED):
        spec = P.kernel_spec(launch_, plan.flags)
        ids = launch_.leaves
        k = len(ids)
        head = [xp.asarray(launch_.table), values]
        inputs, outputs, aliases = update_inputs(
            launch_, spec, params, grads, momentum, head, plan.flags.write_params
        )
        outputs += fused_outputs(launch_, plan.tuning)
        results = launch(
            spec,
            inputs,
            outputs,
            aliases,
            launch_.num_programs,
            spec.constexprs(plan.flags, plan.tuning),
            zeroed=(len(outputs) - 1,),
        )
        if plan.tuning.spin_limit > 0:  # debug: a wait that gave up raises
            if xp is np:
                _raise_on_spin_error(results[-1][P.SYNC_ERROR])
            else:
                jax.debug.callback(_raise_on_spin_error, results[-1][P.SYNC_ERROR])
        for j, i in enumerate(ids):
            first[i], new_momentum[i] = results[j], results[k + j]
            ratios[i] = results[2 * k + 1][j]
    return first, new_momentum, ratios


def pass_update(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    ratios: Any,
    values: Any,
    *,
    plan: P.StepPlan,
    launch: Launcher,
    xp: Any,
) -> tuple[list[Any], list[Any]]:
    """Runs the update pass; returns (updates or new params, new momenta), per leaf.

    Empty leaves are not launched: their entries are None.
    """
    n = len(plan.leaves)
    first: list[Any] = [None] * n
    new_momentum: list[Any] = [None] * n
    for launch_ in plan.launches(P.UPDATE):
        spec = P.kernel_spec(launch_, plan.flags)
        ids = launch_.leaves
        k = len(ids)
        head = [xp.asarray(launch_.table), values, ratios[np.asarray(ids, np.int32)]]
        inputs, outputs, aliases = update_inputs(
            launch_, spec, params, grads, momentum, head, plan.flags.write_params
        )
        results = launch(
            spec,
            inputs,
            outputs,
            aliases,
            launch_.num_programs,
            spec.constexprs(plan.flags, plan.tuning),
        )
        for j, i in enumerate(ids):
            first[i], new_momentum[i] = results[j], results[k + j]
    return first, new_momentum


def _skipped_ratios(ratios: list[Any], values: jax.Array, plan: P.StepPlan) -> list[Any]:
    """The ratios, or 1 for every leaf on a skipped step (as the reference reports)."""
    if not plan.flags.skip_nonfinite:
        return ratios
    one = jnp.ones((), np.float32)
    return [jnp.where(values[Scalar.FINITE] != 0, r, one).astype(np.float32) for r in ratios]


def _fill_empty(
    first: list[Any],
    new_momentum: list[Any],
    params: Sequence[Any],
    momentum: Sequence[Any],
    plan: P.StepPlan,
) -> list[Any]:
    """The results of the empty leaves (not launched); fills ``new_momentum`` in place."""
    for i, leaf in enumerate(plan.leaves):
        if leaf.size == 0:
            first[i] = params[i] if plan.flags.write_params else jnp.zeros_like(params[i])
            new_momentum[i] = momentum[i]
    return first
