"""The "triton" backend's step on a GPU: the kernels launched by ``jax_triton.triton_call``.

:func:`run` is ``step.run`` with :class:`TritonLaunch`: each launch is one
jax-triton custom call, its momentum (and with ``spec.write_params`` its
params) aliased to the outputs (``input_output_aliases``), the fused pass's
counters zeroed inside the call, floating-point contraction off
(``enable_fp_fusion=False``) so that each operation rounds as the
reference's does. Imported on first use: it needs triton and jax-triton.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax

from lars.contract import StepInputs, StepResult, StepSpec

from . import plan as P
from . import step as S


def _triton_call() -> Callable:
    """``jax_triton.triton_call`` (imported on first use: it needs a GPU jaxlib)."""
    import jax_triton

    return jax_triton.triton_call


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """A ``step.Launcher`` that launches with ``triton_call`` (jax-triton's signature).

    Attributes:
      triton_call: ``jax_triton.triton_call``.
      num_warps: Warps per program.
    """

    triton_call: Callable
    num_warps: int

    def __call__(self, spec, inputs, outputs, aliases, grid, constexprs, zeroed=()):
        from . import entry

        out = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outputs]
        if "out_type" in inspect.signature(self.triton_call).parameters:  # jax-triton >= 0.4
            options: dict[str, Any] = {
                "out_type": out,
                "backend_options": {"enable_fp_fusion": False},
            }
        else:
            options = {"out_shape": out, "enable_fp_fusion": False}
        results = self.triton_call(
            *inputs,
            kernel=entry.get_kernel(spec),
            grid=(grid,),
            num_warps=self.num_warps,
            input_output_aliases=aliases,
            zeroed_outputs=tuple(zeroed),  # memset inside the custom call, no extra launch
            **options,
            **constexprs,
        )
        return list(results)


def run(spec: StepSpec, inputs: StepInputs) -> StepResult:
    """The backend contract's step (``lars.contract``) on the GPU."""
    launch = TritonLaunch(_triton_call(), spec.option("num_warps", P.NUM_WARPS))
    return S.run(spec, inputs, launch)
