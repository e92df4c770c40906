"""Derivatives for kernel backends: a backend's step with the reference step's tangents.

A custom call or a Pallas/Triton kernel has no derivative rule. The step it
computes is the reference step's function, so :func:`call` gives a backend's
``run`` a ``jax.custom_jvp`` whose tangents are the reference's: ``jax.jvp``
and ``jax.grad`` through an optimizer step (e.g. to differentiate a loss after
an update) then work, while the forward pass stays on the kernel.
"""

from __future__ import annotations

import jax

from lars import _reference
from lars.contract import Backend, Feature, StepInputs, StepResult, StepSpec


def call(backend: Backend, spec: StepSpec, inputs: StepInputs) -> StepResult:
    """``backend.run``, with the reference's derivatives where it has none of its own.

    A kernel has no derivative rule; the step it computes is the reference's
    function, so ``jax.grad`` and ``jax.jvp`` through a step (e.g. a loss
    after an update) differentiate the reference while the forward pass
    stays on the kernel.
    """
    if not inputs.params:
        return StepResult([], [], [])
    inputs = inputs._replace(
        params=list(inputs.params), grads=list(inputs.grads), momentum=list(inputs.momentum)
    )
    if Feature.DIFFERENTIABLE in backend.features(jax.default_backend()):
        return StepResult(*backend.run(spec, inputs))

    def kernel(inputs: StepInputs) -> tuple:
        return tuple(backend.run(spec, inputs))

    def reference(inputs: StepInputs) -> tuple:
        return tuple(_reference.run(spec, inputs))

    step = jax.custom_jvp(kernel)

    @step.defjvp
    def _jvp(primals, tangents):
        _, out_tangents = jax.jvp(reference, primals, tangents)
        return kernel(*primals), out_tangents

    return StepResult(*(list(x) for x in step(inputs)))
