"""The "pallas" backend's step: ``run`` of ``lars.contract`` on the Pallas kernels.

One step is a few launches for all leaves together:

1. (``grad_clip_norm`` only) a norm pass over every gradient: the global norm.
2. On Mosaic TPU, the fused kernel (``mosaic_tpu_fused``) for the layers that
   fit its VMEM ring: sums, trust ratio and update in one pass.
3. For the other layers with a trust ratio, a norm pass: per leaf the sums of
   w**2 and of u**2, u the clipped and decayed gradient; the ratios from them
   in XLA (``elementwise.leaf_ratios``). With ``spec.given_ratios`` the ratios
   are given and only the update runs.
4. The update pass, writing the new momenta (and with ``spec.write_params``
   the new params) over the inputs' buffers.

What the jitted step is specialised on is a :class:`Launch`, derived from the
``StepSpec`` in one place (:meth:`Launch.of`); the hyperparameters reach the
kernels as the ``contract.scalars`` vector, so they may be traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lars.contract import LeafSpec, StepInputs, StepResult, StepSpec, scalars

from . import default_kernel, options
from . import elementwise as ew


@dataclasses.dataclass(frozen=True)
class Launch:
    """The static facts of one step's launches (hashable: the jitted step's key).

    Attributes:
      flags: The step's switches (``elementwise.Flags``).
      leaves: The leaves (``contract.LeafSpec``).
      kernel: "mosaic_gpu" or "mosaic_tpu".
      interpret: False, True, or the interpreter's parameters.
      blocks: The launchers' block-size options, as (name, value) pairs.
      fused: Run the fused one-pass kernel for the layers it takes (Mosaic TPU).
      ring_blocks: The fused kernel's ring slots (None: from the chip's VMEM).
    """

    flags: ew.Flags
    leaves: tuple[LeafSpec, ...]
    kernel: str
    interpret: Any
    blocks: tuple[tuple[str, int], ...]
    fused: bool
    ring_blocks: int | None

    @classmethod
    def of(cls, spec: StepSpec, platform: str) -> Launch:
        """The launch of ``spec`` on a JAX ``platform`` (which sets the defaults)."""
        given = options(dict(spec.options), platform)
        kernel, interpret = default_kernel(platform)
        kernel = given.get("kernel", kernel)
        blocks = {k: v for k, v in given.items() if k in ("tile", "block_rows", "block_lanes")}
        return cls(
            flags=spec.flags,
            leaves=tuple(spec.leaves),
            kernel=kernel,
            interpret=given.get("interpret", interpret),
            blocks=tuple(sorted(blocks.items())),
            fused=kernel == "mosaic_tpu" and given.get("fused", True),
            ring_blocks=given.get("ring_blocks"),
        )

    @property
    def impl(self):
        """The two-pass kernels' module."""
        if self.kernel == "mosaic_gpu":
            from . import mosaic_gpu

            return mosaic_gpu
        from . import mosaic_tpu

        return mosaic_tpu

    @property
    def kw(self) -> dict[str, Any]:
        """The launchers' keyword arguments."""
        return dict(interpret=self.interpret, **dict(self.blocks))

    @property
    def active(self) -> list[int]:
        """The non-empty leaves (the kernels' only)."""
        return [i for i, leaf in enumerate(self.leaves) if leaf.size > 0]


def run(spec: StepSpec, inputs: StepInputs) -> StepResult:
    """The step of ``lars.contract`` on the Pallas kernels (see the module docstring)."""
    params, grads, momentum, lr, finite, ratios, global_norm = inputs
    launch = Launch.of(spec, jax.default_backend())
    params, grads, momentum = list(params), list(grads), list(momentum)
    values = scalars(lr, spec.config, finite=finite, global_norm=global_norm)
    if launch.flags.clip_norm and not spec.given_ratios:
        global_norm = _global_norm(grads, values, launch=launch)
        values = scalars(lr, spec.config, finite=finite, global_norm=global_norm)
    given = jnp.asarray(ratios, jnp.float32).reshape(-1) if spec.given_ratios else None
    first, new_momentum, ratio_vector = _step(params, grads, momentum, values, given, launch=launch)
    return StepResult(first, new_momentum, [ratio_vector[i] for i in range(len(params))])


def _pick(xs, idx):
    return [xs[i] for i in idx]


@functools.partial(jax.jit, static_argnames=("launch",))
def _global_norm(grads, values, *, launch: Launch) -> jax.Array:
    """The global gradient norm, from a norm pass over every gradient."""
    active = launch.active
    if not active:
        return jnp.zeros((), jnp.float32)
    sums = launch.impl.leaf_sums(
        None,
        _pick(grads, active),
        values,
        flags=ew.Flags(),
        leaves=_pick(launch.leaves, active),
        **launch.kw,
    )
    return jnp.sqrt(jnp.sum(sums[:, ew.SUM_W2]))


@functools.partial(jax.jit, static_argnames=("launch",))
def _step(params, grads, momentum, values, given, *, launch: Launch):
    """(updates or new params, new momenta, ratios (leaves,)): the traced step.

    Jitted, so that eager calls reuse the compiled kernels.
    """
    leaves, flags, impl, kw = launch.leaves, launch.flags, launch.impl, launch.kw
    active = launch.active
    fused, ring = [], None
    if launch.fused and given is None and active:
        from . import fused_plan

        blocks = {k: v for k, v in kw.items() if k != "interpret"}
        fits, ring = fused_plan.fusable(
            _pick(leaves, active), ring_blocks=launch.ring_blocks, **blocks
        )
        fused = [i for i, fit in zip(active, fits, strict=True) if fit]
    rest = [i for i in active if i not in fused]

    if given is None:
        # Per leaf: r from its sums where the trust ratio applies. Empty and
        # unmeasured leaves have zero sums (r = 1, then trust_clip), as in the
        # reference; the fused leaves' ratios come from their kernel.
        measured = [i for i in rest if leaves[i].trust]
        sums = jnp.zeros((len(leaves), 2), jnp.float32)
        if measured:
            part = impl.leaf_sums(
                _pick(params, measured),
                _pick(grads, measured),
                values,
                flags=flags,
                leaves=_pick(leaves, measured),
                **kw,
            )
            # Every leaf measured, in order (the usual case): the sums as they
            # are, no zeros and scatter (two launches fewer on a GPU).
            if measured == list(range(len(leaves))):
                sums = part
            else:
                sums = sums.at[np.asarray(measured, np.int32)].set(part)
        ratio_vector = ew.leaf_ratios(sums, values, flags, leaves)
    else:
        ratio_vector = ew.skipped_ratios(given, values, flags)

    # The leaves no kernel takes pass through: the params (or zero updates)
    # and the momenta.
    first = list(params) if flags.write_params else [jnp.zeros(p.shape, p.dtype) for p in params]
    new_momentum = [v.astype(leaf.momentum_dtype) for v, leaf in zip(momentum, leaves, strict=True)]
    if rest:
        upd, mom = impl.update(
            _pick(params, rest),
            _pick(grads, rest),
            _pick(momentum, rest),
            # All leaves, in order: the vector itself, no gather (a launch on a GPU).
            ratio_vector
            if rest == list(range(len(leaves)))
            else ratio_vector[np.asarray(rest, np.int32)],
            values,
            flags=flags,
            leaves=_pick(leaves, rest),
            **kw,
        )
        for k, i in enumerate(rest):
            first[i], new_momentum[i] = upd[k], mom[k]
    if fused:
        from . import mosaic_tpu_fused

        upd, mom, fused_ratios = mosaic_tpu_fused.fused_update(
            _pick(params, fused),
            _pick(grads, fused),
            _pick(momentum, fused),
            values,
            flags=flags,
            leaves=_pick(leaves, fused),
            ring_blocks=ring,
            **kw,
        )
        ratio_vector = ratio_vector.at[np.asarray(fused, np.int32)].set(fused_ratios)
        for k, i in enumerate(fused):
            first[i], new_momentum[i] = upd[k], mom[k]
    return first, new_momentum, ratio_vector
