"""What ``bench.gpu_check`` runs: the backend forms, option sets, dtypes and trees.

A *form* is a ``lars`` backend with its ``backend_options`` under a row name
("triton-2pass" is the Triton backend with ``fused=False``). On a GPU the forms
are the GPU backends compiled for the device; with ``--cpu`` they are the same
kernels in their interpreters (Pallas' Mosaic GPU interpreter, Triton's
interpreter through the "triton_interpret" backend) and the CPU native
handler, at tiny sizes: the harness is then checked end to end, its numbers
are not measurements.

Every form is run in two modes: ``update`` (``tx.update`` then
``optax.apply_updates``) and ``apply`` (``tx.apply_gradients`` with params
and state donated: the in-place form where the backend has one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import gpu_check_quarantine as quarantine
from bench import steps


@dataclasses.dataclass(frozen=True)
class Form:
    """One backend with fixed ``backend_options``.

    Attributes:
      name: Row name in the report.
      backend: The ``lars`` backend name.
      options: Its ``backend_options``.
      family: The form whose quarantine (``bench.gpu_check_quarantine``)
        also leaves this one out: a geometry timed beside a form names it;
        "" for the form itself.
    """

    name: str
    backend: str
    options: tuple[tuple[str, Any], ...] = ()
    family: str = ""

    @property
    def options_dict(self) -> dict[str, Any]:
        """``options`` as a dict."""
        return dict(self.options)

    def unavailable(self, hangs_only: bool = False) -> str | None:
        """Why the form is not run here; None when it is.

        Args:
          hangs_only: Only a quarantine for a hang counts (``sanitize``).

        Returns:
          Its quarantine (``bench.gpu_check_quarantine.why``), else why the
          backend cannot run on JAX's platform here, else None.
        """
        from lars import _dispatch

        held = quarantine.why(self.family or self.name, hangs_only)
        return held or _dispatch.get(self.backend).unavailable(jax.default_backend())


# The learning rate of every checked and profiled step.
LR = 0.1

# Triton's interpreter runs programs one by one: small launch geometries keep a
# tiny tree to a few programs per launch and several launches per pass.
_INTERPRET_TRITON = (("block", 2048), ("chunk", 2048), ("slots", 4))


def forms(cpu: bool) -> list[Form]:
    """The forms checked and timed: every GPU backend and form (interpreted with ``cpu``)."""
    if cpu:
        return [
            Form("native", "native"),
            Form(
                "pallas", "pallas", (("interpret", True), ("kernel", "mosaic_gpu"), ("tile", 512))
            ),
            Form("triton", "triton_interpret", _INTERPRET_TRITON),
            Form("triton-2pass", "triton_interpret", (*_INTERPRET_TRITON, ("fused", False))),
        ]
    return [
        Form("native", "native"),
        Form("native-fused", "native", (("fused", True),)),
        Form("pallas", "pallas", (("kernel", "mosaic_gpu"),)),
        Form("triton", "triton"),
        Form("triton-2pass", "triton", (("fused", False),)),
    ]


# The native fused launch's timed geometries, beside its default (4096, 512).
NATIVE_FUSED_TUNING: dict[str, tuple[tuple[str, int], ...]] = {
    "16384-128": (("chunk", 16384), ("lookahead", 128)),
    "8192-256": (("chunk", 8192), ("lookahead", 256)),
    "4096-1024": (("chunk", 4096), ("lookahead", 1024)),
    "16384-128-1sm": (("chunk", 16384), ("lookahead", 128), ("blocks_per_sm", 1)),
}


def tuning_forms(cpu: bool) -> list[Form]:
    """The fused launches at other geometries, timed (in place) against the defaults.

    The default (chunk 8192, lookahead 256, evict-first hints on the update's
    loads and stores) was the fastest of the geometries timed on an H200
    (bench/results/h200-2026-12-04/), where halving the items saved more
    than the L2 model's bytes explain. These rows tell the two suspects
    apart: the earlier default and the default without hints; a lookahead
    (2048) above the about 1,200 resident programs, so that an update item
    seldom waits for its layer's sums (spinning); a larger chunk at the same
    lookahead in items, and the pointer table in place of the select chains
    (per-item work: claim, table row, pointer selection). The native CUDA
    handler's fused launch beside its default (chunks of 4096 elements,
    lookahead 512 chunks, every block that fits): larger chunks, a longer
    lookahead, and one block an SM (bench/native_l2_model.py predicts 20.0 to
    23.1 B/param for these, with the blocks waiting for the window from 1.2%
    to 37% of the time; the claims' cost, which it leaves out, grows with
    the number of chunks).
    """
    if cpu:
        return [
            Form(
                "triton-nohint",
                "triton_interpret",
                (*_INTERPRET_TRITON, ("evict_first", False)),
                "triton",
            )
        ]
    return [
        Form("triton-4096-512", "triton", (("chunk", 4096), ("lookahead", 512)), "triton"),
        Form("triton-nohint", "triton", (("evict_first", False),), "triton"),
        Form("triton-8192-2048", "triton", (("lookahead", 2048),), "triton"),
        Form("triton-16384-256", "triton", (("chunk", 16384),), "triton"),
        Form("triton-table", "triton", (("pointer_table", True),), "triton"),
        *(
            Form(f"native-fused-{name}", "native", (("fused", True), *geometry), "native-fused")
            for name, geometry in NATIVE_FUSED_TUNING.items()
        ),
    ]


def register(cpu: bool) -> None:
    """Registers what the forms need: "triton_interpret" (``cpu``) and the timing rows."""
    if cpu:
        from lars import _dispatch

        _dispatch.register("triton_interpret", "lars.kernels.triton.interpret")
    for f in [*forms(cpu), *tuning_forms(cpu)]:
        steps.VARIANTS[f.name] = (f.backend, f.options_dict)


MODES = ("update", "apply")

# (param dtype, grad dtype) by label; momentum is float32.
DTYPES: dict[str, tuple[Any, Any]] = {
    "fp32": (jnp.float32, jnp.float32),
    "bf16-grads": (jnp.float32, jnp.bfloat16),
    "bf16": (jnp.bfloat16, jnp.bfloat16),
}
# Largest |got - want| / max|want| accepted, by param dtype label.
TOLERANCE = {"fp32": 2e-5, "bf16-grads": 2e-5, "bf16": 2e-2}

# Odd shapes: 0-d, 1, 127, 4097, 65537 elements, a conv kernel, an empty leaf,
# and leaves whose params (index 7) or grads (index 8) are all zero.
ODD_SHAPES: tuple[tuple[int, ...], ...] = (
    (),
    (1,),
    (127,),
    (4097,),
    (65537,),
    (3, 3, 16, 32),
    (0,),
    (33,),
    (5, 3),
    (1000,),
)
ZERO_PARAMS, ZERO_GRADS = 7, 8


def odd_shapes(cpu: bool) -> tuple[tuple[int, ...], ...]:
    """The correctness tree's shapes (with ``cpu`` none over 5000 elements)."""
    return tuple(s for s in ODD_SHAPES if not (cpu and math.prod(s) > 5000))


def _ndim_mask(params: dict[str, Any]) -> dict[str, bool]:
    return {k: jnp.ndim(v) > 1 for k, v in params.items()}


# Option sets (``lars.lars`` keyword arguments); "masks" adds the decay and
# trust masks (arrays with more than one dimension only).
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "decay-nesterov-trustclip-masks": dict(
        momentum=0.8, weight_decay=1e-4, trust_coefficient=0.02, nesterov=True, trust_clip=1.0
    ),
    "everything": dict(
        momentum=0.9,
        weight_decay=5e-4,
        trust_coefficient=0.01,
        eps=1e-6,
        nesterov=True,
        trust_clip=0.5,
        grad_clip_norm=1.0,
        grad_clip_value=0.02,
        lr_inside_momentum=True,
    ),
    "skip_nonfinite": dict(weight_decay=1e-4, skip_nonfinite=True),
}


def config_kwargs(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``lars.lars`` keyword arguments of option set ``name`` for ``params``."""
    kw = dict(CONFIGS[name])
    if name.endswith("-masks"):
        kw.update(weight_decay_mask=_ndim_mask(params), trust_ratio_mask=_ndim_mask(params))
    return kw


def make_tree(
    shapes: tuple[tuple[int, ...], ...], dtype: str, seed: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Fresh random (params, grads) dicts, leaf ``ZERO_PARAMS``/``ZERO_GRADS`` zero."""
    p_dtype, g_dtype = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for i, s in enumerate(shapes):
        w = rng.standard_normal(s) * (0.0 if i == ZERO_PARAMS else 0.5)
        g = rng.standard_normal(s) * (0.0 if i == ZERO_GRADS else 0.05)
        params[f"{i:02d}"] = jnp.asarray(w, p_dtype)
        grads[f"{i:02d}"] = jnp.asarray(g, g_dtype)
    return params, grads


def poison_device_memory(nbytes: int) -> None:
    """Fills ``nbytes`` of free device memory with NaN and frees it again.

    XLA's allocator hands freed blocks out again, so outputs the next program
    allocates likely start as NaN: an element a kernel fails to write shows
    as NaN (buffers written in place keep their old values, which differ from
    the new ones on random inputs, and show as a mismatch).
    """
    if nbytes <= 0:
        return
    x = jnp.full((max(1, nbytes // 4),), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def error_text(e: BaseException) -> str:
    """An exception as one line: its type and the first 400 characters of its text."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def device_failure() -> str | None:
    """None when a one-element computation runs on the default device, else its error.

    After a kernel faults, the process's CUDA context is unusable: every later
    computation raises.
    """
    try:
        jax.block_until_ready(jnp.add(jnp.ones((1,), jnp.float32), 1.0))
    except Exception as e:
        return error_text(e)
    return None


def tree_bytes(*trees: Any) -> int:
    """Bytes of every array in ``trees``."""
    return sum(int(x.size) * x.dtype.itemsize for t in trees for x in jax.tree.leaves(t))


def scaled_error(got: Any, want: Any) -> float:
    """max|got - want| / max|want| over one array (inf if ``got`` has NaN where ``want`` not)."""
    g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    w = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if not w.size:
        return 0.0
    if np.any(np.isnan(g) != np.isnan(w)):
        return math.inf
    ok = ~np.isnan(w)
    if not np.any(ok):
        return 0.0
    scale = max(float(np.max(np.abs(w[ok]))), 1e-30)
    return float(np.max(np.abs(g[ok] - w[ok]))) / scale


def bitwise_equal(a: Any, b: Any) -> bool:
    """Whether two pytrees hold the same bits."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
    )
