"""The LARS step on the Triton kernels, independent of how a kernel is launched.

:func:`run_step` drives the passes of the plan (``plan.py``) through a
*launcher*: ``backend.py`` launches with ``jax_triton.triton_call`` on device
arrays (``xp = jax.numpy``), ``interpret.py`` with Triton's interpreter on
NumPy arrays (``xp = numpy``). The launch plan, the kernels, their arguments
and the few operations between the passes are the same code for both.

Between the passes (in ``xp``): each launch's per-chunk partial sums are
reduced per leaf in a fixed order, and the per-leaf sums become the global
gradient norm and (in the two-pass form) the trust ratios with the formula of
``lars._reference.reference_step``. The fused pass computes the ratios itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lars._config import LarsConfig

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
    kernel starts.
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


HYPERPARAMETERS = (
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "eps",
    "trust_clip",
    "grad_clip_norm",
    "grad_clip_value",
)


def hyperparameters(config: LarsConfig) -> dict[str, Any]:
    """The config's numbers (possibly traced), 0 for an option that is off."""
    values = {name: getattr(config, name) for name in HYPERPARAMETERS}
    if not config.has_weight_decay:
        values["weight_decay"] = 0.0
    return {k: 0.0 if v is None else v for k, v in values.items()}


def build_plan(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
    tuning: P.Tuning,
    skip_nonfinite: bool = False,
) -> P.StepPlan:
    """The static plan of a step; raises naming the leaf the kernels cannot handle."""
    has_decay = config.has_weight_decay
    leaves = []
    for i, (p, g, v) in enumerate(zip(params, grads, momentum, strict=True)):
        shape = tuple(p.shape)
        if shape != tuple(g.shape) or shape != tuple(v.shape):
            raise ValueError(
                f"leaf {i}: param, gradient and momentum shapes differ "
                f"({shape}, {tuple(g.shape)}, {tuple(v.shape)})"
            )
        size = int(np.prod(shape, dtype=np.int64))
        P.check_leaf(i, size, p.dtype, g.dtype, v.dtype, tuning.chunk)
        leaves.append(
            P.LeafSpec(
                size=size,
                param_dtype=np.dtype(p.dtype).name,
                grad_dtype=np.dtype(g.dtype).name,
                decay=bool(decay_mask[i]) and has_decay,
                trust=bool(trust_mask[i]),
            )
        )
    flags = P.Flags(
        clip_norm=config.grad_clip_norm is not None,
        clip_value=config.grad_clip_value is not None,
        has_decay=any(leaf.decay for leaf in leaves),
        nesterov=bool(config.nesterov),
        lr_inside_momentum=bool(config.lr_inside_momentum),
        trust_clip=config.trust_clip is not None,
        write_params=write_params,
        skip_nonfinite=skip_nonfinite,
    )
    return P.StepPlan(tuple(leaves), flags, tuning)


def prepare(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
    tuning: P.Tuning | None,
    xp: Any,
    skip_nonfinite: bool = False,
) -> tuple[P.StepPlan, dict[str, Any]]:
    """The step's plan (:func:`build_plan`, ``plan.Tuning()`` by default) and
    :func:`hyperparameters` as float32 0-d ``xp`` arrays."""
    plan = build_plan(
        params,
        grads,
        momentum,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
        tuning=tuning or P.Tuning(),
        skip_nonfinite=skip_nonfinite,
    )
    hyper = {k: xp.asarray(v, np.float32) for k, v in hyperparameters(config).items()}
    return plan, hyper


def pass_sums(
    kind: str,
    params: Sequence[Any],
    grads: Sequence[Any],
    scalars: Any,
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
        inputs = [xp.asarray(launch_.table), scalars]
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


def _update_inputs(
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


def fused_outputs(launch_: P.Launch) -> list[OutSpec]:
    """The outputs of a FUSED launch after the per-leaf ones; the last is zeroed."""
    k = len(launch_.leaves)
    rows = max(1, launch_.spans[-1][1])
    return [
        OutSpec((rows, 2), np.float32),  # per-chunk partial sums
        OutSpec((k,), np.float32),  # trust ratios
        OutSpec((1 + 2 * k,), np.int32),  # item counter; per slot, arrivals and ready flag
    ]


def pass_fused(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    scalars: Any,
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
        head = [xp.asarray(launch_.table), scalars]
        inputs, outputs, aliases = _update_inputs(
            launch_, spec, params, grads, momentum, head, plan.flags.write_params
        )
        outputs += fused_outputs(launch_)
        results = launch(
            spec,
            inputs,
            outputs,
            aliases,
            launch_.num_programs,
            spec.constexprs(plan.flags, plan.tuning),
            zeroed=(len(outputs) - 1,),
        )
        for j, i in enumerate(ids):
            first[i], new_momentum[i] = results[j], results[k + j]
            ratios[i] = results[2 * k + 1][j]
    return first, new_momentum, ratios


def pass_update(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    ratios: Any,
    scalars: Any,
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
        head = [xp.asarray(launch_.table), scalars, ratios[np.asarray(ids, np.int32)]]
        inputs, outputs, aliases = _update_inputs(
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


def run_step(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    lr: Any,
    hyper: dict[str, Any],
    *,
    plan: P.StepPlan,
    launch: Launcher,
    xp: Any,
) -> tuple[list[Any], list[Any], list[Any]]:
    """One LARS step: returns (updates or new params, new momenta, trust ratios).

    Args:
      params, grads, momentum: The leaves (``xp`` arrays).
      lr: The learning rate, a float32 0-d array.
      hyper: :func:`hyperparameters` as float32 0-d ``xp`` arrays, and with
        ``plan.flags.skip_nonfinite`` "finite": 1 to take the step, 0 to skip
        it (params and momenta stay as they were, the ratios are 1).
      plan: The step's plan (its leaves must match the arrays).
      launch: Runs a launch (see :class:`Launcher`).
      xp: ``jax.numpy`` or ``numpy``: the array namespace of the arrays.
    """
    f32 = np.float32
    one = xp.ones((), f32)
    values = _scalar_values(lr, hyper, xp)
    run = dict(plan=plan, launch=launch, xp=xp)
    # 1. grad_clip_norm (optax.clip_by_global_norm): g <- g if ||g|| < c else (g / ||g||) * c.
    if plan.flags.clip_norm:
        sums = pass_sums(P.GLOBAL_NORM, params, grads, _stack(values, xp), **run)
        _set_clip(values, xp.sqrt(xp.sum(sums[:, P.SUM_W2])), hyper, xp)
    scalars_now = _stack(values, xp)
    trust = np.asarray([leaf.trust for leaf in plan.leaves], bool)

    if plan.tuning.fused:
        # 2-3. Norms, trust ratios and the update in one launch per dtype group.
        first, new_momentum, ratios = pass_fused(params, grads, momentum, scalars_now, **run)
        # Empty leaves: zero norms, so r = 1, then trust_clip, as in the reference.
        empty_ratio = one
        if plan.flags.trust_clip:
            empty_ratio = xp.minimum(one, hyper["trust_clip"])
        for i, leaf in enumerate(plan.leaves):
            if leaf.size == 0:
                ratios[i] = empty_ratio if leaf.trust else one
        first = _fill_empty(first, new_momentum, params, momentum, plan, xp)
        return first, new_momentum, _skipped_ratios(ratios, hyper, plan, xp)

    # 2. Trust ratios from the per-leaf sums (optax.scale_by_trust_ratio). Empty
    # leaves have zero sums: r = 1, then trust_clip, as in the reference.
    sums = pass_sums(P.SUMS, params, grads, scalars_now, **run)
    w_norm = xp.sqrt(sums[:, P.SUM_W2])
    u_norm = xp.sqrt(sums[:, P.SUM_U2])
    r = hyper["trust_coefficient"] * w_norm / (u_norm + hyper["eps"])
    r = xp.where(xp.logical_or(w_norm == 0.0, u_norm == 0.0), one, r)
    if plan.flags.trust_clip:
        r = xp.minimum(r, hyper["trust_clip"])
    ratios = xp.where(trust, r, one).astype(f32)

    # 3. The update pass.
    first, new_momentum = pass_update(params, grads, momentum, ratios, scalars_now, **run)
    first = _fill_empty(first, new_momentum, params, momentum, plan, xp)
    ratios = [ratios[i] for i in range(len(plan.leaves))]
    return first, new_momentum, _skipped_ratios(ratios, hyper, plan, xp)


def _skipped_ratios(ratios: list[Any], hyper: dict[str, Any], plan: P.StepPlan, xp: Any):
    """The ratios, or 1 for every leaf on a skipped step (as the reference reports)."""
    if not plan.flags.skip_nonfinite:
        return ratios
    one = xp.ones((), np.float32)
    return [xp.where(hyper["finite"] != 0, r, one).astype(np.float32) for r in ratios]


def run_update_given(
    params: Sequence[Any],
    grads: Sequence[Any],
    momentum: Sequence[Any],
    lr: Any,
    hyper: dict[str, Any],
    ratios: Any,
    global_norm: Any,
    *,
    plan: P.StepPlan,
    launch: Launcher,
    xp: Any,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The update half of a step, with the trust ratios and global norm given.

    For sharded params (``lars._sharded``): the ratios are those of whole
    layers, summed over every shard by the caller; the update pass runs alone.
    Arguments as in :func:`run_step`, plus ``ratios`` (one float32 per leaf)
    and ``global_norm`` (the global gradient norm, used with ``grad_clip_norm``).
    """
    values = _scalar_values(lr, hyper, xp)
    if plan.flags.clip_norm:
        _set_clip(values, xp.asarray(global_norm).astype(np.float32), hyper, xp)
    ratios = xp.asarray(ratios).astype(np.float32)
    run = dict(plan=plan, launch=launch, xp=xp)
    first, new_momentum = pass_update(params, grads, momentum, ratios, _stack(values, xp), **run)
    first = _fill_empty(first, new_momentum, params, momentum, plan, xp)
    return first, new_momentum, [ratios[i] for i in range(len(plan.leaves))]


def _scalar_values(lr: Any, hyper: dict[str, Any], xp: Any) -> dict[int, Any]:
    """The ``scalars`` vector's entries (position -> 0-d float32), clipping off."""
    one = xp.ones((), np.float32)
    return {
        P.LR: xp.asarray(lr).astype(np.float32),
        P.MOMENTUM: hyper["momentum"],
        P.WEIGHT_DECAY: hyper["weight_decay"],
        P.CLIP_DIVISOR: one,
        P.CLIP_FACTOR: one,
        P.CLIP_VALUE: hyper["grad_clip_value"],
        P.TRUST_COEFFICIENT: hyper["trust_coefficient"],
        P.EPS: hyper["eps"],
        P.TRUST_CLIP: hyper["trust_clip"],
        P.FINITE: hyper.get("finite", one),
    }


def _set_clip(values: dict[int, Any], g_norm: Any, hyper: dict[str, Any], xp: Any) -> None:
    """The clip scalars for the global gradient norm ``g_norm`` (1 and 1 below the bound)."""
    one = xp.ones((), np.float32)
    trigger = g_norm < hyper["grad_clip_norm"]
    values[P.CLIP_DIVISOR] = xp.where(trigger, one, g_norm)
    values[P.CLIP_FACTOR] = xp.where(trigger, one, hyper["grad_clip_norm"])


def _stack(values: dict[int, Any], xp: Any) -> Any:
    """The float32 ``scalars`` vector (unset positions 0)."""
    zero = xp.zeros((), np.float32)
    return xp.stack([values.get(k, zero) for k in range(P.NUM_SCALARS)]).astype(np.float32)


def _fill_empty(
    first: list[Any],
    new_momentum: list[Any],
    params: Sequence[Any],
    momentum: Sequence[Any],
    plan: P.StepPlan,
    xp: Any,
) -> list[Any]:
    """The results of the empty leaves (not launched); fills ``new_momentum`` in place."""
    for i, leaf in enumerate(plan.leaves):
        if leaf.size == 0:
            first[i] = params[i] if plan.flags.write_params else xp.zeros_like(params[i])
            new_momentum[i] = momentum[i]
    return first
