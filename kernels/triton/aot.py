"""Compiles the Triton LARS kernels for a GPU target without a GPU (PTX and cubin).

``triton.compile`` runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and
``ptxas`` for the cubin) on the host; only loading the binary needs a device.
The kernels are specialised as jax-triton specialises them: every pointer is
assumed 16-byte aligned (``tt.divisibility = 16``), the options are
constexprs, and floating-point contraction is off.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import entry
from . import plan as P

# Hopper (sm_90), the GPU this backend is written for; 32 threads per warp.
HOPPER = GPUTarget("cuda", 90, 32)

_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def signature(spec: P.KernelSpec, param_dtype: str, grad_dtype: str) -> dict[str, str]:
    """Triton types of ``spec``'s runtime arguments, for leaves of the given dtypes."""
    role_types = {
        "w": _TRITON_TYPES[param_dtype],
        "g": _TRITON_TYPES[grad_dtype],
        "v": "fp32",
        "out": _TRITON_TYPES[param_dtype],
        "v_out": "fp32",
    }
    fixed = {
        "table_ptr": "*i32",
        "scalars_ptr": "*fp32",
        "ratios_ptr": "*fp32",
        "partials_ptr": "*fp32",
        "ratios_out_ptr": "*fp32",
        "sync_ptr": "*i32",
    }
    return {
        name: fixed.get(name) or "*" + role_types[name.rsplit("_", 1)[0]]
        for name in spec.arg_names()
    }


def compile_kernel(
    spec: P.KernelSpec,
    param_dtype: str,
    grad_dtype: str,
    flags: P.Flags,
    tuning: P.Tuning | None = None,
    target: GPUTarget = HOPPER,
):
    """Compiles one entry point; returns Triton's ``CompiledKernel`` (``.asm["ptx"]``, ...).

    Args:
      spec: The entry point.
      param_dtype, grad_dtype: The launch's dtype group ("float32", ...).
      flags: The step's options (they select the constexprs).
      tuning: The launch geometry (``plan.Tuning()`` by default).
      target: The GPU to compile for.
    """
    tuning = tuning or P.Tuning()
    types = signature(spec, param_dtype, grad_dtype)
    constexprs = spec.constexprs(flags, tuning)
    source = ASTSource(
        entry.get_kernel(spec),
        {**types, **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in range(len(types))},
    )
    options = {"num_warps": tuning.num_warps, "enable_fp_fusion": False}
    return triton.compile(source, target=target, options=options)
