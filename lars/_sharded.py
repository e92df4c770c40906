"""Fused backends on sharded parameters: local sums, one psum per mesh-axis set, local update.

A fused backend's kernel sees whole arrays. Given sharded params, XLA would
gather every leaf onto every device and return replicated results. This module
wraps a fused step in ``jax.experimental.custom_partitioning`` instead, so that
under ``jax.jit`` with sharded inputs each device:

1. sums, over its own shard of each leaf, w**2 and u**2 (u the clipped and
   decayed gradient; with ``grad_clip_norm`` first g**2 for the global norm);
2. adds the sums over the mesh axes that shard the leaf: one ``psum`` per
   distinct set of axes, over a few scalars (replicated leaves need none), so
   every norm is the norm of the whole layer, never of a shard;
3. turns the sums into trust ratios (the reference's formula) and runs the
   backend's update on its shard (``run`` with ``spec.given_ratios``),
   writing params and momentum that keep the params' sharding.

A leaf whose sharding cannot be split evenly (a dimension not divisible by its
mesh axes) is gathered for the step and comes back replicated: correct, but not
local. On one device the wrapper is not used at all.

On a mesh of Explicit axes (``jax.sharding.AxisType.Explicit``) an array's
type carries its sharding, which kernels refuse: :func:`on_auto_axes` runs a
kernel backend's step with those axes switched to Auto (the arrays keep their
layout) and types the results as the params and momenta were; the
partitioned per-device step is traced with the context mesh's Explicit axes
Auto as well (``jax.set_mesh``).

Inside ``jax.shard_map`` (a user's own per-device code) the step sees local
shards. There each leaf's varying mesh axes (what ``shard_map`` tracks with
``check_vma=True``, its default) say which axes shard it: :func:`manual_step`
adds the sums over those axes, then runs the same update. Gradients that vary
over an axis their params do not (not yet averaged over a data-parallel axis)
are refused, naming the leaf.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lars._autodiff import call
from lars._reference import clipped_grads, global_squares, leaf_squares, trust_ratio
from lars.contract import Backend, StepInputs, StepResult, StepSpec, compute_dtype, norm_dtype


def needed() -> bool:
    """True when this process has several devices (params may be sharded)."""
    return jax.device_count() > 1


def _global_grad_norm(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    axes: Sequence[tuple[str, ...]],
    dtype: Any,
) -> jax.Array:
    """||g|| over all leaves, each leaf's local sum of g**2 added over its axes."""
    local = []
    for p, g in zip(params, grads, strict=True):
        g = g.astype(compute_dtype(p.dtype))
        local.append(jnp.sum(global_squares(g)))
    total = _psum_by_axes(local, axes)
    return jnp.sqrt(sum(total, jnp.zeros((), dtype)))


def _psum_by_axes(values: list[jax.Array], axes: Sequence[tuple[str, ...]]) -> list[jax.Array]:
    """Adds each value over its mesh axes: one psum per distinct set of axes."""
    out = list(values)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, a in enumerate(axes):
        if a:
            groups.setdefault(a, []).append(i)
    for a, idx in groups.items():
        summed = jax.lax.psum(tuple(values[i] for i in idx), a)
        for i, s in zip(idx, summed, strict=True):
            out[i] = s
    return out


def _ratios(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    axes: Sequence[tuple[str, ...]],
    spec: StepSpec,
) -> tuple[jax.Array, jax.Array]:
    """Whole-layer trust ratios from local sums, and the global gradient norm.

    The arithmetic is the reference step's (``lars._reference``), in each leaf's
    compute dtype (its real dtype for the norms of complex leaves); only the
    order of the additions differs (local, then psum).
    """
    config = spec.config
    wide = any(norm_dtype(compute_dtype(p.dtype)) == jnp.float64 for p in params)
    out_dtype = jnp.float64 if wide else jnp.float32
    clip_norm = jnp.zeros((), out_dtype)
    if config.grad_clip_norm is not None:
        clip_norm = _global_grad_norm(params, grads, axes, out_dtype)
    gs = clipped_grads(params, grads, clip_norm, config) if params else []
    sums, where = [], []
    for i, (p, g) in enumerate(zip(params, gs, strict=True)):
        if not spec.leaves[i].trust:
            continue
        w = p.astype(g.dtype)
        if spec.leaves[i].decay:
            g = g + config.weight_decay * w
        sums += [jnp.sum(leaf_squares(w)), jnp.sum(leaf_squares(g))]
        where += [axes[i], axes[i]]
    sums = _psum_by_axes(sums, where)
    ratios, k = [], 0
    for i, p in enumerate(params):
        cd = norm_dtype(compute_dtype(p.dtype))
        if not spec.leaves[i].trust:
            ratios.append(jnp.ones((), out_dtype))
            continue
        r = trust_ratio(jnp.sqrt(sums[k]).astype(cd), jnp.sqrt(sums[k + 1]).astype(cd), config)
        k += 2
        ratios.append(r.astype(out_dtype))
    ratio_vector = jnp.stack(ratios) if ratios else jnp.zeros((0,), out_dtype)
    return ratio_vector, clip_norm


def _leaf_layout(sharding: Any, ndim: int, shape: tuple[int, ...], mesh: Any) -> tuple[Any, tuple]:
    """(sharding to run the leaf with, mesh axes that shard it).

    The leaf keeps its sharding when it is a NamedSharding on ``mesh`` that
    splits every dimension evenly; otherwise it is replicated (gathered).
    """
    replicated = NamedSharding(mesh, P())
    if not isinstance(sharding, NamedSharding) or sharding.mesh.shape != mesh.shape:
        return replicated, ()
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    axes: list[str] = []
    for dim, entry in zip(shape, spec, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if dim % math.prod(mesh.shape[a] for a in names):
            return replicated, ()
        axes += names
    return NamedSharding(mesh, P(*spec)), tuple(axes)


def _whole_step(static: tuple, lr: jax.Array, *arrays: jax.Array) -> list[jax.Array]:
    """The step on whole leaves: what the partitioned step computes, unsplit."""
    backend, spec = static
    n = len(spec.leaves)
    params, grads, momentum = arrays[:n], arrays[n : 2 * n], arrays[2 * n :]
    result = call(backend, spec, StepInputs(list(params), list(grads), list(momentum), lr))
    return [*result.updates, *result.momentum, *result.trust_ratio]


def _partition(static: tuple, mesh: Any, arg_shapes: Any, result_shape: Any) -> tuple:
    """Chooses each leaf's layout and returns the per-device step."""
    del result_shape
    backend, spec = static
    n = len(spec.leaves)
    layouts = [
        _leaf_layout(s.sharding, len(s.shape), tuple(s.shape), mesh) for s in arg_shapes[1 : 1 + n]
    ]
    leaf_shardings = [sharding for sharding, _ in layouts]
    axes = [a for _, a in layouts]
    scalar = NamedSharding(mesh, P())

    def local_step(lr: jax.Array, *arrays: jax.Array) -> list[jax.Array]:
        params, grads, momentum = arrays[:n], arrays[n : 2 * n], arrays[2 * n :]
        inputs = StepInputs(list(params), list(grads), list(momentum), lr)
        # XLA calls this back while compiling, under the caller's context mesh:
        # one of Explicit axes (jax.set_mesh) would type the per-device arrays
        # as sharded, so the shard's code is traced with those axes Auto.
        with _without_explicit_axes():
            result = manual_step(backend, spec, inputs, axes)
        return [*result.updates, *result.momentum, *result.trust_ratio]

    arg_shardings = (scalar, *leaf_shardings, *leaf_shardings, *leaf_shardings)
    result_shardings = [*leaf_shardings, *leaf_shardings, *([scalar] * n)]
    return mesh, local_step, result_shardings, arg_shardings


def _without_explicit_axes() -> Any:
    """A context in which the context mesh's Explicit axes are Auto (else nothing changes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return contextlib.nullcontext()
    auto = {a: jax.sharding.AxisType.Auto for a in mesh.explicit_axes}
    return jax.sharding.use_abstract_mesh(mesh.update_axis_types(auto))


@functools.lru_cache(maxsize=64)
def _partitioned(ranks: tuple[int, ...]) -> custom_partitioning:
    """The custom-partitioned step for leaves of these ranks."""
    fn = custom_partitioning(_whole_step, static_argnums=(0,))
    # Every leaf's dimensions are independent factors shared by its param,
    # gradient, momentum and outputs; the learning rate and ratios are scalars.
    leaf = [" ".join(f"l{i}d{d}" for d in range(r)) for i, r in enumerate(ranks)]
    operands = ", ".join(["", *leaf, *leaf, *leaf])
    results = ", ".join([*leaf, *leaf, *([""] * len(ranks))])
    fn.def_partition(
        partition=_partition,
        sharding_rule=f"{operands} -> {results}",
    )
    return fn


def sharded_step(backend: Backend, spec: StepSpec, inputs: StepInputs) -> StepResult:
    """A backend's step (``Feature.GIVEN_RATIOS``) that runs shard by shard under sharding.

    Returns:
      A ``StepResult`` (the first field holds params with ``spec.write_params``).
    """
    params, grads, momentum, lr = inputs[:4]
    n = len(params)
    if n == 0:
        return StepResult([], [], [])
    fn = _partitioned(tuple(jnp.ndim(p) for p in params))
    out = fn((backend, spec), jnp.asarray(lr, jnp.float32), *params, *grads, *momentum)
    return StepResult(list(out[:n]), list(out[n : 2 * n]), list(out[2 * n :]))


def explicit_mesh(arrays: Sequence[Any]) -> Any:
    """The mesh of the first array whose type is sharded over Explicit axes, else None."""
    for x in arrays:
        sharding = getattr(jax.typeof(x), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is not None and any(entry is not None for entry in spec):
            if sharding.mesh.explicit_axes:
                return sharding.mesh
    return None


def on_auto_axes(step: Any, inputs: StepInputs) -> StepResult:
    """``step(inputs)`` with the inputs' Explicit mesh axes switched to Auto.

    Under explicit sharding (``jax.sharding.AxisType.Explicit``) an array's type
    carries its sharding, and kernels (a Pallas call, a reshape to blocks)
    refuse sharded types. Inside ``jax.sharding.auto_axes`` the arrays keep
    their layout but are typed unsharded, so the step runs as on an Auto mesh
    (shard by shard through :func:`sharded_step` for a ``GIVEN_RATIOS``
    backend); its results are resharded as the params and momenta were typed
    (replicated where a type names no mesh), the ratios replicated. Without
    explicit types, ``step(inputs)``.
    """
    params, momentum = inputs.params, inputs.momentum
    mesh = explicit_mesh([*params, *inputs.grads, *momentum])
    if mesh is None:
        return step(inputs)
    replicated = NamedSharding(mesh, P())

    def typed(x: Any) -> Any:
        sharding = jax.typeof(x).sharding
        return sharding if sharding.mesh == mesh else replicated

    out = (
        tuple(typed(p) for p in params),
        tuple(typed(v) for v in momentum),
        tuple(replicated for _ in params),
    )
    run = jax.sharding.auto_axes(
        lambda x: tuple(map(tuple, step(x))), axes=mesh.explicit_axes, out_sharding=out
    )
    return StepResult(*(list(x) for x in run(inputs)))


def varying_axes(x: Any) -> frozenset[str]:
    """The manual mesh axes over which ``x`` varies (inside shard_map), else empty."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def manual_axes(
    paths: Sequence[str], params: Sequence[jax.Array], grads: Sequence[jax.Array]
) -> list[tuple[str, ...]] | None:
    """Per leaf, the shard_map axes that shard it; None outside shard_map.

    Raises:
      ValueError: when a gradient varies over an axis its param does not,
        naming the leaf's path.
    """
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return None
    axes = []
    for path, p, g in zip(paths, params, grads, strict=True):
        p_axes, g_axes = varying_axes(p), varying_axes(g)
        extra = g_axes - p_axes
        if extra:
            raise ValueError(
                f"the gradient at {path} varies over the mesh axes {sorted(extra)} where its "
                "param does not: the gradient of a replicated param must be reduced first (e.g. "
                f"jax.lax.pmean(grads, {sorted(extra)!r}))"
            )
        axes.append(tuple(sorted(p_axes)))
    return axes


def manual_step(
    backend: Backend, spec: StepSpec, inputs: StepInputs, axes: Sequence[tuple[str, ...]]
) -> StepResult:
    """The step on local shards (inside shard_map, or one device's part of a mesh).

    Each leaf's sums are added over the mesh axes that shard it (``axes``,
    from :func:`manual_axes` or the leaf's sharding), turned into whole-layer
    trust ratios, and the backend updates its shards with them
    (``spec.given_ratios``).
    """
    params, grads, momentum, lr = inputs[:4]
    if not params:
        return StepResult([], [], [])
    ratios, global_norm = _ratios(params, grads, axes, spec)
    spec = spec.with_shapes(params).replace(given_ratios=True, skip_nonfinite=False)
    inputs = StepInputs(params, grads, momentum, lr, ratios=ratios, global_norm=global_norm)
    return call(backend, spec, inputs)
