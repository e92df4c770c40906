"""Derivatives for kernel backends: the tangents of the reference step.

A custom call or a Pallas/Triton kernel has no derivative rule. The step it
computes is the reference step's function, so :func:`with_reference_jvp`
gives a kernel step a ``jax.custom_jvp`` whose tangents are the reference's:
``jax.jvp`` and ``jax.grad`` through an optimizer step (e.g. to differentiate a
loss after an update) then work, while the forward pass stays on the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lars._config import LarsConfig
from lars._reference import reference_step

# (params, grads, momentum, lr[, finite]) -> (first, momentum, ratios): first
# holds the updates, or the new params with write_params; lists in the params'
# order. ``finite`` (a bool scalar, for kernels that skip a step themselves):
# when False nothing moves (see reference_outputs).
KernelStep = Callable[..., tuple[list, list, list]]


def finite_args(finite: jax.Array | bool | None) -> list[jax.Array]:
    """The trailing ``finite`` argument of a kernel step: [] for None, else the
    flag checked to be a bool scalar."""
    if finite is None:
        return []
    flag = jnp.asarray(finite)
    if flag.shape != () or flag.dtype != jnp.bool_:
        raise ValueError(f"finite must be a bool scalar, got {flag.dtype} of shape {flag.shape}")
    return [flag]


def with_finite(hyper: dict[str, jax.Array], finite: Sequence[jax.Array]) -> dict[str, jax.Array]:
    """``hyper`` plus "finite" (float32 1 or 0) when a kernel step got the flag."""
    if not finite:
        return hyper
    return {**hyper, "finite": jnp.asarray(finite[0], jnp.float32)}


def reference_outputs(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    finite: jax.Array | None = None,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
) -> tuple[list, list, list]:
    """The reference step's (first, momentum, ratios), as a kernel step returns them.

    With ``finite`` False the step is skipped: the params and momenta are
    returned as they were (updates of -0.0), and ratios of 1.
    """
    r = reference_step(
        params, grads, momentum, lr, config=config, decay_mask=decay_mask, trust_mask=trust_mask
    )
    first, new_momentum, ratios = list(r.updates), list(r.momentum), list(r.trust_ratio)
    if write_params:
        first = [(p + u).astype(p.dtype) for p, u in zip(params, first, strict=True)]
    if finite is not None:
        keep = params if write_params else [jnp.full_like(u, -0.0) for u in first]
        first = [jnp.where(finite, a, b) for a, b in zip(first, keep, strict=True)]
        new_momentum = [
            jnp.where(finite, a, b.astype(a.dtype))
            for a, b in zip(new_momentum, momentum, strict=True)
        ]
        ratios = [jnp.where(finite, x, jnp.ones_like(x)) for x in ratios]
    return first, new_momentum, ratios


def with_reference_jvp(
    kernel_step: KernelStep,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
) -> KernelStep:
    """``kernel_step`` with the reference step's derivatives.

    Args:
      kernel_step: The kernel's step on (params, grads, momentum, lr), and
        ``finite`` after them for a kernel that skips a step itself.
      config, decay_mask, trust_mask: The step's hyperparameters and masks.
      write_params: Whether the kernel's first result holds new params.

    Returns:
      A function like ``kernel_step`` whose JVP (and so VJP) is the reference's.
    """
    statics = dict(
        config=config,
        decay_mask=list(decay_mask),
        trust_mask=list(trust_mask),
        write_params=write_params,
    )

    @jax.custom_jvp
    def step(params, grads, momentum, lr, *finite):
        return kernel_step(params, grads, momentum, lr, *finite)

    @step.defjvp
    def _jvp(primals, tangents):
        out = kernel_step(*primals)
        _, out_tangents = jax.jvp(lambda *a: reference_outputs(*a, **statics), primals, tangents)
        return out, out_tangents

    return step
