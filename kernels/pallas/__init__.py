"""The "pallas" backend: multi-tensor LARS kernels in Pallas (Mosaic GPU, Mosaic TPU).

``BACKEND.run`` (``step.run``) is the step of ``lars.contract``: a few kernel
launches for all leaves together, whatever their number, sizes, dtypes and
masks. It writes in place (``IN_PLACE``), skips a non-finite step itself
(``SKIP_NONFINITE``) and updates shards with given ratios (``GIVEN_RATIOS``);
not ``SHARD_MAP`` (inside ``jax.shard_map`` the front end runs the reference's
update: see docs/pallas.md). Importing this module loads no Pallas.

Modules: ``step`` (the step), ``elementwise`` (the per-element math and its
references), ``mosaic_gpu`` (+ ``gpu_plan``), ``mosaic_tpu`` (+
``tpu_pipeline``) and ``mosaic_tpu_fused`` (+ ``fused_plan``).

Options (``backend_options=``):

* ``kernel``: "mosaic_gpu" (NVIDIA Hopper) or "mosaic_tpu"; by default the
  platform's (Mosaic TPU on a CPU).
* ``interpret``: run the kernels in Pallas' interpreter: True, False, or the
  interpreter's parameters (``pltpu.InterpretParams`` for Mosaic TPU,
  ``plgpu.InterpretGPUParams`` for Mosaic GPU). By default on a CPU only.
* ``tile`` (Mosaic GPU): elements per block, a positive multiple of 512.
* ``block_rows``, ``block_lanes`` (Mosaic TPU): rows of a (n / 128, 128)
  block (a positive multiple of 32) and lanes of a (1, n) block (of 128).
* ``fused`` (Mosaic TPU, default True): the one-pass kernel for the layers
  that fit its VMEM ring; False: a norm and an update pass for every layer.
* ``ring_blocks`` (Mosaic TPU): the ring's slots, an int >= 2 (by default
  from the chip's VMEM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from lars.contract import FLOAT32_COMPUTE_DTYPES, Backend, Feature, lazy

KERNELS = ("mosaic_gpu", "mosaic_tpu")
# Per kernel, its block-size options and the multiple each must be of (the
# kernels' plans check the same).
_BLOCK_OPTIONS = {
    "mosaic_gpu": {"tile": 512},
    "mosaic_tpu": {"block_rows": 32, "block_lanes": 128},
}
_FUSED_OPTIONS = ("fused", "ring_blocks")
_OPTIONS = (
    "kernel",
    "interpret",
    *_FUSED_OPTIONS,
    *(k for v in _BLOCK_OPTIONS.values() for k in v),
)
# Everywhere; not SHARD_MAP (see the module docstring).
FEATURES = frozenset({Feature.IN_PLACE, Feature.SKIP_NONFINITE, Feature.GIVEN_RATIOS})


def default_kernel(platform: str) -> tuple[str, bool]:
    """(kernel, interpret) for a JAX platform ("cpu", "gpu", "tpu")."""
    if platform == "gpu":
        return "mosaic_gpu", False
    if platform == "tpu":
        return "mosaic_tpu", False
    return "mosaic_tpu", True


def unavailable(platform: str) -> str | None:
    """None if the kernels can run on ``platform`` here, else what is missing."""
    if platform in ("tpu", "cpu"):
        return None
    if platform != "gpu":
        return f"there is no Pallas kernel for the {platform!r} platform"
    capability = str(getattr(jax.devices("gpu")[0], "compute_capability", ""))
    if not capability or capability.startswith("gfx"):
        return "the Mosaic GPU kernels need an NVIDIA GPU (this is not one)"
    if int(capability.split(".")[0]) < 9:
        return (
            "the Mosaic GPU kernels need an NVIDIA Hopper (sm_90) or newer GPU; "
            f"this one has compute capability {capability}"
        )
    return None


def options(given: Mapping[str, Any], platform: str | None = None) -> dict[str, Any]:
    """``backend_options`` checked (``Backend.options``): the given ones, unchanged.

    ``platform`` (by default JAX's) picks the kernel when ``kernel`` is not given.

    Raises:
      ValueError: naming an unknown option, a bad value, or an option of the
        other kernel.
      TypeError: naming an option of the wrong type.
    """
    given = dict(given)
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown pallas backend_options {unknown}; known: {sorted(_OPTIONS)}")
    if "kernel" in given:
        kernel = given["kernel"]
    else:
        kernel = default_kernel(platform or jax.default_backend())[0]
    if kernel not in KERNELS:
        raise ValueError(f"backend_options kernel must be one of {KERNELS}, got {kernel!r}")
    _check_interpret(given.get("interpret", False), kernel)
    for name, multiple in {k: m for v in _BLOCK_OPTIONS.values() for k, m in v.items()}.items():
        if name not in given:
            continue
        if name not in _BLOCK_OPTIONS[kernel]:
            raise ValueError(f"backend_options {name} is not an option of the {kernel} kernel")
        value = given[name]
        if not _is_int(value) or value <= 0 or value % multiple:
            raise ValueError(
                f"backend_options {name} must be a positive multiple of {multiple}, got {value!r}"
            )
    fused = {k: given[k] for k in _FUSED_OPTIONS if k in given}
    if kernel != "mosaic_tpu" and (fused.get("fused") or fused.get("ring_blocks") is not None):
        raise ValueError(
            f"backend_options {sorted(fused)}: the {kernel} kernel has no fused one-pass "
            "kernel (only mosaic_tpu has one)"
        )
    if "fused" in fused and not isinstance(fused["fused"], bool):
        raise TypeError(f"backend_options fused must be a bool, got {fused['fused']!r}")
    ring = fused.get("ring_blocks")
    if ring is not None and (not _is_int(ring) or ring < 2):
        raise ValueError(f"backend_options ring_blocks must be an int >= 2, got {ring!r}")
    return given


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_interpret(value: Any, kernel: str) -> None:
    """``interpret`` is a bool or the kernel's interpreter parameters (hashable)."""
    if isinstance(value, bool):
        return
    if kernel == "mosaic_tpu":
        from jax.experimental.pallas import tpu as interpreter

        kind = interpreter.InterpretParams
    else:
        from jax.experimental.pallas import mosaic_gpu as interpreter

        kind = interpreter.InterpretGPUParams
    if not isinstance(value, kind):
        raise TypeError(
            f"backend_options interpret must be a bool or a {kind.__name__} for the {kernel} "
            f"kernel, got {value!r}"
        )


BACKEND = Backend(
    name="pallas",
    run=lazy("lars.kernels.pallas.step:run"),
    unavailable=unavailable,
    features=lambda platform: FEATURES,
    dtypes=FLOAT32_COMPUTE_DTYPES,
    options=options,
)
