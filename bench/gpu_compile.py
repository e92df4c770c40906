"""The GPU steps compiled for an H200 on a machine without a GPU: XLA's launches.

Run with ``make gpu-compile`` (``--help`` for options). XLA compiles for a GPU
it is only described to (a "deviceless" compilation): with jax's CUDA plugin
installed, ``jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)`` gives a compile-only device, and ``jax.jit(...).lower``
on arguments placed on it runs XLA's whole GPU pipeline, Pallas' Mosaic GPU
and jax-triton's lowering included; nothing runs. The compiled HLO is the
H200's: the launches counted in it (``bench.hlo``, as ``bench.gpu_check``
counts them there) matched every count the H200 gave on 2026-12-04 (jax
0.11.2: ``jax.jit(optax.lars)`` 851 a step, the reference 552, pallas 174 and
27 in place, triton 4 in place).

The package asks JAX where it runs (``jax.default_backend()``,
``jax.devices("gpu")``) to route a step; while compiling, this tool answers as
the H200 would ("gpu", the compile-only device of compute capability 9.0),
and tells jax-triton the compute capability it would read off the device.

``make gpu-compile`` runs it in its own environment (``build/venv-gpu-compile``:
the GPU image's jax 0.11.2 with the CUDA 13 plugins, jax-triton) with the
CUDA handler built for it (``build/gpu-compile/lib``; needs nvcc). A row whose
launches exceed its bound in ``LAUNCH_BOUNDS`` fails, and so does a row that
does not compile: the exit status is 1.
"""

from __future__ import annotations

import os

# Before jax is imported: no GPU is looked for, and the plugin's check of the
# CUDA libraries (cuDNN, cuBLAS: not needed to compile) is skipped.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench import hlo, steps, workloads

# The H200 as XLA's GPU compiler sees it (a ``stream_executor.GpuTargetConfigProto``):
# 132 SMs, 60 MiB of L2, compute capability 9.0, CUDA 13.0 (read on the H200
# on 2026-12-04: nvidia-smi, the gpu_check report); the per-SM limits are
# Hopper's. The DRAM bandwidth is the H200's data-sheet figure (4.8 TB/s).
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 62914560
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H200"
"""

# Steps per call in the loop rows: bench.gpu_check's timing loop
# (``GPU_STEPS_PER_CALL``). Every loop row's ``while`` must have this known
# trip count in the compiled HLO (``bench.hlo.loop_trip_count``): without one
# XLA's GPU runtime copies the loop's condition to the host and waits for it
# every step, and the timing would count that wait in each step.
LOOP_STEPS = 100

# Launches a step in the loop (bench.hlo.count_loop_launches) that a row may
# not exceed, from this tool's counts (jax 0.11.2, 2026-12-05); issue target:
# 4 per dtype group. A count over its bound fails the run.
LAUNCH_BOUNDS: dict[str, int] = {
    "native:apply": 3,  # the call (sums and update inside) + the count's select and add
    "native-fused:apply": 3,
    "triton:apply": 4,
    "triton-2pass:apply": 7,
    "pallas:apply": 10,  # 27 before the small leaves were summed in one reduction (2026-12-05)
}

# The forms compiled, as bench.gpu_check's (row name -> backend, options).
FORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "reference": ("reference", {}),
    "native": ("native", {}),
    "native-fused": ("native", {"fused": True}),
    "pallas": ("pallas", {"kernel": "mosaic_gpu"}),
    "triton": ("triton", {}),
    "triton-2pass": ("triton", {"fused": False}),
}


def native_library_dir() -> Path | None:
    """``LARS_GPU_COMPILE_LIB`` (the CUDA handler built for this jax), if set."""
    path = os.environ.get("LARS_GPU_COMPILE_LIB")
    return Path(path) if path else None


@contextlib.contextmanager
def h200() -> Iterator[jax.sharding.Sharding]:
    """While open, JAX and jax-triton answer as on an H200; yields the device's sharding.

    Raises:
      RuntimeError: if jax's CUDA plugin is not installed (no deviceless compilation).
    """
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=H200_TARGET, topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise RuntimeError(
            "no deviceless CUDA compilation here: jax's CUDA plugin (jax-cuda13-plugin and "
            f"jax-cuda13-pjrt of jax's version) is needed; `make gpu-compile` installs it ({e})"
        ) from e
    devices = list(topology.devices)
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    saved = jax.default_backend, jax.devices
    jax.default_backend = lambda: "gpu"
    jax.devices = lambda backend=None: devices if backend in ("gpu", "cuda") else saved[1](backend)
    triton_lib, capability = None, None
    with contextlib.suppress(ImportError):
        import jax_triton.triton_lib as triton_lib

        capability = triton_lib.triton_kernel_call_lib.get_compute_capability
        triton_lib.triton_kernel_call_lib.get_compute_capability = lambda device: 90
    try:
        yield jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    finally:
        jax.default_backend, jax.devices = saved
        if triton_lib is not None:
            triton_lib.triton_kernel_call_lib.get_compute_capability = capability


def compile_row(
    name: str,
    shapes: tuple[tuple[int, ...], ...],
    grad_dtype: Any,
    sharding: jax.sharding.Sharding,
    steps_per_call: int,
) -> dict[str, Any]:
    """Compiles the timed step of row ``name`` ("optax" or a form, ":apply" in place).

    The step is ``bench.steps``' (params and state donated; ``steps_per_call``
    > 1: that many in one ``lax.fori_loop``), on abstract arguments.
    """

    def place(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = [place(jax.ShapeDtypeStruct(s, jnp.float32)) for s in shapes]
    grads = [place(jax.ShapeDtypeStruct(s, grad_dtype)) for s in shapes]
    apply = name.endswith(steps.APPLY_SUFFIX)
    factory = steps.make_tx_factory(name.removesuffix(steps.APPLY_SUFFIX))
    state = jax.tree.map(place, jax.eval_shape(factory(steps.LEARNING_RATE).init, params))
    fn = steps.make_step(factory, apply)
    if steps_per_call > 1:
        fn = steps.looped(fn, 2, steps_per_call)
    start = time.perf_counter()
    lr = place(jax.ShapeDtypeStruct((), jnp.float32))
    compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(params, state, grads, lr).compile()
    text = compiled.as_text()
    trip_count = None
    if steps_per_call > 1:
        launches = hlo.count_loop_launches(text, steps_per_call)
        trip_count = hlo.loop_trip_count(text)
    else:
        launches = hlo.count_launches(text)
    return {
        "launches": launches,
        "trip_count": trip_count,
        "temp_mb": hlo.temp_bytes(compiled) / 1e6,
        "compile_s": time.perf_counter() - start,
        "hlo": text,
    }


def _use_native_library(path: Path | None) -> None:
    """Loads the native libraries from ``path`` (before the backend first loads them)."""
    if path is None:
        return
    from lars.kernels.native import library

    library.LIB_DIR = path


def _rows(quick: bool) -> list[str]:
    if quick:
        return ["optax", *LAUNCH_BOUNDS]
    return ["optax", *(f"{f}{mode}" for f in FORMS for mode in ("", steps.APPLY_SUFFIX))]


def _cases(quick: bool) -> list[tuple[workloads.Workload, str]]:
    resnet = next(w for w in workloads.full_workloads() if w.name == "resnet50")
    if quick:
        return [(resnet, "fp32")]
    array = workloads.sweep_workload(64 * 1024 * 1024)
    return [(resnet, "fp32"), (resnet, "bf16-grads"), (array, "fp32")]


def run(quick: bool, out: Path | None, keep_hlo: bool) -> list[dict[str, Any]]:
    """Compiles every row of every case, one step and ``LOOP_STEPS`` in a loop."""
    from bench.measure import DTYPES

    for name, variant in FORMS.items():
        steps.VARIANTS[name] = variant
    results = []
    with h200() as sharding:
        for workload, dtype in _cases(quick):
            for row in _rows(quick):
                r: dict[str, Any] = {"workload": workload.name, "grads": dtype, "row": row}
                for k in (LOOP_STEPS,) if quick else (1, LOOP_STEPS):
                    key = "loop" if k > 1 else "one_step"
                    try:
                        got = compile_row(row, workload.shapes, DTYPES[dtype], sharding, k)
                    except Exception as e:  # a row that does not compile is reported
                        r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        break
                    text = got.pop("hlo")
                    if out is not None and keep_hlo:
                        slug = f"{workload.name}-{dtype}-{row.replace(':', '-')}-{key}.hlo.txt"
                        (out / slug).write_text(text)
                    r[f"launches_{key}"] = got["launches"]
                    if k > 1:
                        r["trip_count"] = got["trip_count"]
                    r[f"temp_mb_{key}"] = round(got["temp_mb"], 1)
                    r[f"compile_s_{key}"] = round(got["compile_s"], 1)
                bound = LAUNCH_BOUNDS.get(row)
                r["bound"] = bound
                if "error" not in r and r.get("trip_count") != LOOP_STEPS:
                    r["error"] = f"the loop's trip count is not known ({r.get('trip_count')})"
                r["ok"] = "error" not in r and (bound is None or r["launches_loop"] <= bound)
                results.append(r)
                print(_line(r), flush=True)
    return results


def _line(r: dict[str, Any]) -> str:
    counts = f"{r.get('launches_one_step', '-'):>5} {r.get('launches_loop', '-'):>5}"
    bound = "" if r["bound"] is None else f"(bound {r['bound']})"
    status = "ok" if r["ok"] else "FAIL " + r.get("error", "over its bound")
    return f"{r['workload']:16s} {r['grads']:10s} {r['row']:22s} {counts} {bound:10s} {status}"


def markdown(results: list[dict[str, Any]], versions: dict[str, str]) -> str:
    """The report: launches a step per row, one step a call and in the loop."""
    lines = [
        "# Launches on an H200, compiled without a GPU",
        "",
        "Compiled by `bench/gpu_compile.py` for an H200 (compute capability 9.0, 132 SMs, "
        "60 MiB L2) with no GPU: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"Launches per step counted in the compiled HLO (`bench/hlo.py`); loop: {LOOP_STEPS} "
        "steps in one `lax.fori_loop`, as `bench.gpu_check` times them.",
        "",
        "| workload | grads | row | launches (one step) | launches (loop) | bound | temp MB "
        "| compile s | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        status = "ok" if r["ok"] else r.get("error", "over its bound").replace("|", "/")
        lines.append(
            f"| {r['workload']} | {r['grads']} | {r['row']} | {r.get('launches_one_step', '-')} "
            f"| {r.get('launches_loop', '-')} | {r['bound'] if r['bound'] is not None else ''} "
            f"| {r.get('temp_mb_loop', '-')} | {r.get('compile_s_loop', '-')} | {status} |"
        )
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-triton", "triton"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="ResNet-50 fp32 in the loop only, the rows with a launch bound and optax",
    )
    parser.add_argument("--out", type=Path, help="folder for gpu_compile.json and .md")
    parser.add_argument("--hlo", action="store_true", help="also write each row's HLO to --out")
    args = parser.parse_args(argv)
    _use_native_library(native_library_dir())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    print(f"{'workload':16s} {'grads':10s} {'row':22s} {'one':>5} {'loop':>5}", flush=True)
    results = run(args.quick, args.out, args.hlo)
    if args.out is not None:
        report = {"versions": versions, "loop_steps": LOOP_STEPS, "rows": results}
        (args.out / "gpu_compile.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu_compile.md").write_text(markdown(results, versions))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} rows ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
