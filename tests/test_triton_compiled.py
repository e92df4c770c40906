"""The Triton backend compiled for an NVIDIA Hopper GPU (sm_90) on the CPU.

* The kernels: Triton's whole pipeline down to PTX and a cubin (ptxas), for
  every pass, dtype group and flag set; 16-byte vector accesses, no fused
  multiply-add, the evict-first hints of the fused update, the bounded wait
  compiled only under its debug switch, and the kernel-parameter limit.
* The GPU launcher: the backend's step lowered for CUDA through jax-triton's
  own ``triton_call`` (the lowering, the kernel specialisation and compilation
  are jax-triton's). jax-triton imports only with a GPU jaxlib, so its module
  is loaded directly, with jaxlib's CUDA Triton extension where the CUDA
  plugin is installed (``make test-jax-0.11`` installs it; no GPU needed) and a
  stand-in for it elsewhere.

The launch plan and the interpreter runs are in test_triton.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton  # noqa: F401  (required: a missing triton fails here, it is not skipped)
from backend_cases import ALL_OPTIONS
from test_triton import BF16, F32, make_spec

from lars._config import LarsConfig
from lars.contract import StepInputs
from lars.kernels.triton import BACKEND, aot, backend
from lars.kernels.triton import plan as P

# --------------------------------------------------------------------------
# Compiled for Hopper on the CPU.

ALL_ON = ALL_OPTIONS
# In place and skipping a non-finite step: the select the skip adds must keep
# the vector accesses (checked below), in both forms of the first output.
IN_PLACE_SKIP = P.Flags(has_decay=True, write_params=True, skip_nonfinite=True)
KERNELS = [
    (P.KernelSpec(P.GLOBAL_NORM, 5, False), ALL_ON),
    (P.KernelSpec(P.SUMS, 5, True), ALL_ON),
    (P.KernelSpec(P.UPDATE, 5, True), ALL_ON),
    (P.KernelSpec(P.UPDATE, 5, True), IN_PLACE_SKIP),
    (P.KernelSpec(P.UPDATE, 5, False), P.Flags(skip_nonfinite=True)),
    (P.KernelSpec(P.FUSED, 5, True), ALL_ON),
    (P.KernelSpec(P.FUSED, 5, True), IN_PLACE_SKIP),
]
GROUPS = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]
GROUPS.append(("float16", "float16"))


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "_".join(g))
@pytest.mark.parametrize("kernel", range(len(KERNELS)))
def test_compiles_for_hopper(kernel, group):
    """PTX and a cubin for sm_90; full chunks use 16-byte vector accesses; no fused multiply-add."""
    spec, flags = KERNELS[kernel]
    compiled = aot.compile_kernel(spec, *group, flags)
    ptx = compiled.asm["ptx"]
    assert re.search(rf"\.visible \.entry {spec.name}\(", ptx)
    assert ".target sm_90a" in ptx
    assert len(compiled.asm["cubin"]) > 1000
    # A pointer parameter per array (Triton appends its own scratch pointers).
    assert ptx.count(".param .u64") >= len(spec.arg_names())
    # (.L1::evict_first.L2::cache_hint between: the fused update's hints)
    assert re.search(r"ld\.global(\.[\w:]+)*\.v4\.", ptx), "no vectorised loads"
    if spec.kind in (P.UPDATE, P.FUSED):
        assert re.search(r"st\.global(\.[\w:]+)*\.v4\.", ptx), "no vectorised stores"
        if "bfloat16" in group[0]:
            assert "cvt.rn.bf16" in ptx  # round to nearest even, as XLA
    assert "fma." not in ptx  # contraction off: the reference's rounding
    # Division and square root rounded as XLA rounds them (no approximations).
    assert not re.search(r"(div|sqrt|rcp)\.(approx|full)", ptx)
    if spec.kind == P.FUSED:
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx  # the trust ratio
        # The item counter, a leaf's arrivals (release the partials, acquire
        # them in the last arrival), its ready flag (release, acquire).
        assert re.search(r"atom\.global\.gpu\.relaxed\.add", ptx)
        assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)
        assert re.search(r"atom\.global\.gpu\.release\.exch", ptx)
        assert re.search(r"ld\.global\.gpu\.acquire", ptx)
        # Partials and ratios written by other SMs are read past L1.
        assert re.search(r"ld\.global\.cg", ptx)


def test_only_a_spin_limit_compiles_the_bounded_wait():
    """The debug switch's check (a relaxed exchange of the error word) is in the
    PTX with spin_limit > 0 and absent at the default 0."""
    spec = P.KernelSpec(P.FUSED, 5, True)
    exch = r"atom\.global\.gpu\.relaxed\.exch"
    default = aot.compile_kernel(spec, "float32", "float32", ALL_ON).asm["ptx"]
    bounded = aot.compile_kernel(spec, "float32", "float32", ALL_ON, P.Tuning(spin_limit=1000)).asm[
        "ptx"
    ]
    assert not re.search(exch, default)
    assert re.search(exch, bounded)


def _hinted(ptx: str, op: str) -> list[str]:
    """The global ``op`` ("ld" or "st") instructions of ``ptx`` with an L2 cache hint."""
    return re.findall(rf"{op}\.global[\w.:]*\.L2::cache_hint[\w.]*", ptx)


def test_the_fused_update_loads_and_stores_carry_the_evict_first_hint():
    """With ``evict_first`` (the default) the fused update's loads and stores
    take an ``L2::evict_first`` policy; the sums half's loads do not, and
    nothing is hinted with the option off or in the two-pass update."""
    spec = P.KernelSpec(P.FUSED, 5, True)
    hinted = aot.compile_kernel(spec, "float32", "float32", ALL_ON).asm["ptx"]
    plain = aot.compile_kernel(spec, "float32", "float32", ALL_ON, P.Tuning(evict_first=False)).asm[
        "ptx"
    ]
    assert P.Tuning().evict_first
    assert "createpolicy.fractional.L2::evict_first" in hinted
    assert _hinted(hinted, "ld") and _hinted(hinted, "st")
    assert any(".v4." in op for op in _hinted(hinted, "ld") + _hinted(hinted, "st"))
    assert re.search(r"ld\.global\.v4\.", hinted)  # the sums half: no hint
    assert not re.search(r"st\.global\.v4\.", hinted)  # every vector store is the update's
    assert "createpolicy" not in plain and "cache_hint" not in plain
    two_pass = P.KernelSpec(P.UPDATE, 5, True)
    update = aot.compile_kernel(two_pass, "float32", "float32", ALL_ON).asm["ptx"]
    assert "cache_hint" not in update and re.search(r"st\.global\.v4\.", update)


@pytest.mark.slow
def test_the_default_launch_fits_the_kernel_parameter_limit():
    """The widest kernel's parameters fit the 32 kB of CUDA 12.1+ and ptxas takes them."""
    spec = P.KernelSpec(P.FUSED, P.SLOTS_PER_LAUNCH, True)
    widest_two_pass = P.KernelSpec(P.UPDATE, P.SLOTS_PER_LAUNCH, True)
    assert len(spec.arg_names()) >= len(widest_two_pass.arg_names())
    assert 4096 < 8 * len(spec.arg_names()) <= 32764
    assert 8 * len(P.KernelSpec(P.FUSED, 64, True).arg_names()) <= 4096  # Tuning(slots=64)
    compiled = aot.compile_kernel(spec, "float32", "float32", ALL_ON)
    assert compiled.asm["ptx"].count(".param .u64") >= len(spec.arg_names())


# --------------------------------------------------------------------------
# The GPU launcher, lowered for CUDA through jax-triton on the CPU.


# Set to 1 to fail, not fall back to the stand-in, where jaxlib's CUDA Triton
# extension is missing (`make test-jax-0.11` sets it).
REQUIRE_EXTENSION = "LARS_REQUIRE_CUDA_TRITON_EXTENSION"


def cuda_triton_extension():
    """jaxlib's CUDA Triton extension where a CUDA plugin provides it, else None.

    ``jax-cuda13-plugin`` provides it (and jax-triton imports) on a machine
    without a GPU too: only the compute capability needs a device.
    """
    from jax._src.lib import gpu_triton

    return gpu_triton if hasattr(gpu_triton, "TritonKernel") else None


def load_jax_triton_lib():
    """jax_triton.triton_lib with jaxlib's CUDA Triton extension wrapped to record its inputs.

    Returns (module, compiled) where ``compiled`` collects the kernels
    jax-triton compiled (name, PTX, ...) during lowering, and
    ``module.recorded_zeroed_bytes`` the bytes zeroed before the launch per
    array parameter. Where jaxlib has its CUDA plugin the kernels, parameters
    and kernel calls are the extension's own (it checks their types and
    serialises the call into the custom call's backend config); elsewhere a
    stand-in records them. The compute capability is 90 either way.
    """
    extension = cuda_triton_extension()
    if extension is None and os.environ.get(REQUIRE_EXTENSION) == "1":
        raise AssertionError(
            f"{REQUIRE_EXTENSION}=1 but jaxlib has no CUDA Triton extension: install its plugin, "
            f"pip install --no-deps jax-cuda13-plugin=={jax.lib.__version__}"
        )
    spec = importlib.util.find_spec("jax_triton")
    assert spec is not None, "jax-triton is not installed (it is in the test extra)"
    path = os.path.join(spec.submodule_search_locations[0], "triton_lib.py")
    cache_dir = os.environ.get("TRITON_CACHE_DIR")  # the module overwrites it
    module_spec = importlib.util.spec_from_file_location("_jax_triton_lib_on_cpu", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    compiled = []
    module.recorded_zeroed_bytes = []  # per array parameter, bytes zeroed before the launch
    module.uses_extension = extension is not None

    class KernelCall:
        def __init__(self, kernel, grid_x, grid_y, grid_z, params):
            self.kernel, self.grid, self.params = kernel, (grid_x, grid_y, grid_z), params

        def to_proto(self, name, metadata):
            return repr((self.kernel[0], self.grid, len(self.params))).encode()

    stand_in = types.SimpleNamespace(
        TritonKernel=lambda name, *rest: (name,),
        TritonKernelCall=KernelCall,
        create_array_parameter=lambda zeroed_bytes, alignment: ("array", alignment),
        create_scalar_parameter=lambda value, dtype: ("scalar", value, dtype),
    )
    target = extension or stand_in

    def triton_kernel(name, num_warps, num_ctas, shared_mem, binary, ttir, capability):
        compiled.append(dict(name=name, num_warps=num_warps, ptx=binary, capability=capability))
        return target.TritonKernel(name, num_warps, num_ctas, shared_mem, binary, ttir, capability)

    def array_parameter(zeroed_bytes, alignment):
        module.recorded_zeroed_bytes.append(zeroed_bytes)
        return target.create_array_parameter(zeroed_bytes, alignment)

    module.triton_kernel_call_lib = types.SimpleNamespace(
        TritonKernel=triton_kernel,
        TritonKernelCall=target.TritonKernelCall,
        create_array_parameter=array_parameter,
        create_scalar_parameter=target.create_scalar_parameter,
        get_compute_capability=lambda device: 90,
    )
    return module, compiled


def mlir_bytes(string: str) -> bytes:
    """The bytes of an MLIR string attribute as printed: a backslash doubled,
    an unprintable byte or a quote as a backslash and two hex digits."""
    return re.sub(
        rb"\\(\\|[0-9A-Fa-f]{2})",
        lambda m: m[1] if m[1] == b"\\" else bytes.fromhex(m[1].decode()),
        string.encode(),
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("write_params", [False, True], ids=["updates", "in_place"])
def test_step_lowers_for_cuda_through_jax_triton(monkeypatch, write_params, fused):
    jt, compiled = load_jax_triton_lib()
    monkeypatch.setattr(backend, "_triton_call", lambda: jt.triton_call)
    shapes = [(), (127,), (3, 3, 4, 8), (0,), (4097,), (33,), (6, 7)]
    dtypes = [(F32, F32), (BF16, BF16), (F32, F32), (F32, F32), (F32, BF16), (F32, F32)]
    dtypes.append((BF16, BF16))
    rng = np.random.default_rng(0)
    params = [
        jnp.asarray(rng.standard_normal(s), p) for s, (p, _) in zip(shapes, dtypes, strict=True)
    ]
    grads = [
        jnp.asarray(rng.standard_normal(s), g) for s, (_, g) in zip(shapes, dtypes, strict=True)
    ]
    momentum = [jnp.zeros(s, F32) for s in shapes]
    config = LarsConfig(weight_decay=0.01, grad_clip_norm=1.0, nesterov=True)
    # The in-place form also skips a non-finite step itself.
    spec = make_spec(
        shapes, dtypes, config=config, tuning=P.Tuning(fused=fused), write=write_params
    ).replace(skip_nonfinite=write_params)

    def step(params, grads, momentum, lr, finite):
        return BACKEND.run(spec, StepInputs(params, grads, momentum, lr, finite=finite))

    def lower(lr):
        finite = jnp.bool_(True) if write_params else None
        traced = jax.jit(step, donate_argnums=(0, 2)).trace(params, grads, momentum, lr, finite)
        return traced.lower(lowering_platforms=("cuda",)).as_text()

    zeroed_bytes = jt.recorded_zeroed_bytes
    text = lower(jnp.float32(0.1))
    # 3 dtype groups x 2 passes (global norm, fused) or 3 (global norm, sums,
    # update), one custom call each.
    passes = [("global_norm", "")]
    passes += [("fused", "_w")] if fused else [("sums", "_w"), ("update", "_w")]
    calls = re.findall(r"stablehlo\.custom_call @triton_kernel_call", text)
    assert len(calls) == 3 * len(passes)
    # Groups: float32 (3 non-empty leaves), bfloat16 (2), float32 with bfloat16 grads (1).
    assert sorted(c["name"] for c in compiled) == sorted(
        f"lars_{kind}_{n}{suffix}" for kind, suffix in passes for n in (3, 2, 1)
    )
    # The fused launches' item counters and flags are zeroed inside the call.
    zeroed = [z for z in zeroed_bytes if z]
    assert zeroed == ([4 * (1 + 2 * n) for n in (3, 2, 1)] if fused else [])
    assert all(c["capability"] == 90 and ".entry lars_" in c["ptx"] for c in compiled)
    assert all(c["num_warps"] == P.NUM_WARPS for c in compiled)
    assert not any("fma." in c["ptx"] for c in compiled)  # enable_fp_fusion=False reached Triton
    # In place: every momentum (and with write_params every param) aliases an output.
    aliased = len(re.findall(r"#stablehlo\.output_operand_alias<", text))
    assert aliased == (2 if write_params else 1) * 6  # the 6 non-empty leaves
    # Each call's backend config is the serialised kernel call, zlib-compressed:
    # the extension's carries the kernel's PTX.
    configs = re.findall(r'backend_config = "([^"]*)"', text)
    configs = [zlib.decompress(mlir_bytes(config)) for config in configs]
    assert len(configs) == len(calls)
    names = {c["name"].encode() for c in compiled}
    assert all(any(name in config for name in names) for config in configs)
    if jt.uses_extension:
        assert all(b".entry lars_" in config for config in configs)
    # The learning rate is an operand, not a constant: a new one compiles nothing new.
    assert lower(jnp.float32(0.7)) == text
