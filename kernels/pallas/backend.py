"""The "pallas" backend: the multi-tensor LARS step on the Pallas kernels.

One step is a few kernel launches for all leaves together, whatever their
number, sizes, dtypes and masks:

1. (``grad_clip_norm`` only) a norm pass over every gradient: the global norm.
2. On a TPU (``mosaic_tpu``), the fused kernel (``mosaic_tpu_fused``): one
   launch that reads each layer's w and g once into VMEM, computes its sums
   and trust ratio there, and updates it (20 bytes per float32 parameter).
   Layers too large for its VMEM ring, and every layer with
   ``kernel_options={"fused": False}``, take the two passes below.
3. A norm pass over the leaves with an adaptive trust ratio: per leaf, the sums
   of w**2 and of u**2, u the clipped and decayed gradient. Summing u**2
   directly (rather than folding decay in as sum g**2 + 2*lambda*sum g*w +
   lambda**2 * sum w**2) keeps the norm accurate when g is close to -lambda*w.
4. The update pass: per element, the same operations as the reference.

Between the passes a few scalar operations (in XLA) turn the sums into trust
ratios (``elementwise.trust_ratio``, which the fused kernel runs on its vector
unit). The update passes write the new momenta over the momenta's buffers, and
in the in-place form (:func:`pallas_apply`) the new params over the params'
buffers: the kernel call aliases those outputs to its inputs, so donated
buffers are written over rather than copied.

The kernel is chosen by platform: Mosaic GPU on a GPU, Mosaic TPU on a TPU; on
a CPU the Mosaic TPU kernel runs in interpret mode (the Mosaic GPU one with
``kernel="mosaic_gpu"``), slowly but with the kernel's own code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lars._autodiff import finite_args, with_finite, with_reference_jvp
from lars._config import LarsConfig
from lars._reference import StepResult, compute_dtype, reference_update_with_ratios

from . import elementwise as ew

KERNELS = ("mosaic_gpu", "mosaic_tpu")
_PARAM_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def default_kernel(platform: str | None = None) -> tuple[str, bool]:
    """(kernel, interpret) for ``platform`` (the default JAX backend when None)."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        return "mosaic_gpu", False
    if platform == "tpu":
        return "mosaic_tpu", False
    return "mosaic_tpu", True


def unavailable() -> str | None:
    """None if the kernels can run here, else a sentence saying what is missing."""
    platform = jax.default_backend()
    if platform == "tpu" or platform == "cpu":
        return None
    if platform != "gpu":
        return f"there is no Pallas kernel for the {platform!r} platform"
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if not capability or capability.startswith("gfx"):
        return "the Mosaic GPU kernels need an NVIDIA GPU (this is not one)"
    major = int(capability.split(".")[0])
    if major < 9:
        return (
            "the Mosaic GPU kernels need an NVIDIA Hopper (sm_90) or newer GPU; "
            f"this one has compute capability {capability}"
        )
    return None


def unsupported(config: LarsConfig) -> str | None:
    """Every option of LarsConfig is supported."""
    del config
    return None


_FUSED_OPTIONS = ("fused", "ring_blocks")


def _fused_module(kernel: str):
    """The fused one-pass kernel's module for ``kernel``, or None where there is none."""
    if kernel == "mosaic_tpu":
        from . import mosaic_tpu_fused

        return mosaic_tpu_fused
    return None


def _split_options(kernel: str, options: tuple) -> tuple[dict, dict]:
    """(the launchers' keyword arguments, the fused pass's: ``fused``, ``ring_blocks``).

    Raises:
      ValueError: for a fused pass asked of a kernel that has none.
    """
    kw = dict(options)
    fused = {k: kw.pop(k) for k in _FUSED_OPTIONS if k in kw}
    has_fused = _fused_module(kernel) is not None
    if not has_fused and (fused.get("fused") or fused.get("ring_blocks") is not None):
        raise ValueError(
            f"kernel_options {sorted(fused)}: the {kernel} kernel has no fused one-pass "
            "kernel (only mosaic_tpu has one)"
        )
    fused["fused"] = bool(fused.get("fused", has_fused))
    ring = fused.get("ring_blocks")
    if ring is not None and (not isinstance(ring, int) or ring < 2):
        raise ValueError(f"kernel_options ring_blocks must be an int >= 2, got {ring!r}")
    return kw, fused


def _kernel_module(kernel: str):
    if kernel == "mosaic_gpu":
        from . import mosaic_gpu

        return mosaic_gpu
    if kernel == "mosaic_tpu":
        from . import mosaic_tpu

        return mosaic_tpu
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _leaf_specs(params, grads, momentum, decay_mask, trust_mask, has_decay) -> list[ew.LeafSpec]:
    specs = []
    for i, (p, g, v) in enumerate(zip(params, grads, momentum, strict=True)):
        p_dtype, g_dtype, v_dtype = np.dtype(p.dtype), np.dtype(g.dtype), np.dtype(v.dtype)
        if p_dtype not in _PARAM_DTYPES or g_dtype not in _PARAM_DTYPES:
            raise TypeError(
                f"the pallas backend handles float32, bfloat16 and float16 params and "
                f"gradients; leaf {i} has a {p_dtype} param and a {g_dtype} gradient "
                "(use backend='reference' for other dtypes)"
            )
        if v_dtype != np.dtype(compute_dtype(p_dtype)):
            raise TypeError(f"leaf {i}: momentum must be float32, got {v_dtype}")
        specs.append(
            ew.LeafSpec(
                size=int(np.prod(p.shape, dtype=np.int64)),
                param_dtype=p_dtype,
                grad_dtype=g_dtype,
                momentum_dtype=v_dtype,
                decay=bool(decay_mask[i]) and has_decay,
                trust=bool(trust_mask[i]),
            )
        )
    return specs


def pallas_step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    kernel: str | None = None,
    interpret: bool | None = None,
    kernel_options: dict | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """One LARS step over all leaves on the Pallas kernels.

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask: As in
        ``lars._reference.reference_step``.
      kernel: "mosaic_gpu" or "mosaic_tpu"; by default the platform's.
      interpret: Run the kernels in interpret mode (by default on a CPU only):
        True for the kernel's default interpreter (XLA for Mosaic TPU, the GPU
        simulator for Mosaic GPU), or the interpreter's parameters object
        (``pltpu.InterpretParams``, ``plgpu.InterpretGPUParams``).
      kernel_options: Extra keyword arguments for the kernel launchers (block
        sizes: ``tile`` for Mosaic GPU, ``block_rows``/``block_lanes`` for
        Mosaic TPU). For Mosaic TPU also ``fused`` (default True: the fused
        one-pass kernel for the layers that fit its VMEM ring; False: two
        passes for every layer) and ``ring_blocks`` (the ring's slots; by
        default from the chip's VMEM).
      finite: Optional bool scalar (``skip_nonfinite``): when False the update
        kernel leaves params and momenta as they were, writes updates of -0.0
        and the ratios are 1, so a skipped step needs no copy of them.

    Returns:
      A ``StepResult``.

    Raises:
      TypeError: for a dtype the kernels do not handle (float64).
    """
    return _run(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=False,
        kernel=kernel,
        interpret=interpret,
        kernel_options=kernel_options,
        finite=finite,
    )


def pallas_apply(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    kernel: str | None = None,
    interpret: bool | None = None,
    kernel_options: dict | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """Like :func:`pallas_step`, but the first field holds the new params.

    The update kernel writes them over the params' buffers (donate the params
    to ``jax.jit``; otherwise XLA copies them first). They equal
    ``optax.apply_updates(params, updates)``: the sum is formed in float32 and
    rounded once to the param dtype.
    """
    return _run(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=True,
        kernel=kernel,
        interpret=interpret,
        kernel_options=kernel_options,
        finite=finite,
    )


def _run(
    params,
    grads,
    momentum,
    lr,
    *,
    config,
    decay_mask,
    trust_mask,
    write_params,
    kernel,
    interpret,
    kernel_options,
    finite,
) -> StepResult:
    """The step, returning updates or (``write_params``) new params."""
    kernel, interpret, flags, leaves, hyper, options = _prepare(
        params,
        grads,
        momentum,
        config,
        decay_mask,
        trust_mask,
        write_params,
        kernel,
        interpret,
        kernel_options,
        skip_nonfinite=finite is not None,
    )
    launch = dict(
        flags=flags,
        leaves=tuple(leaves),
        trust_clip=config.trust_clip is not None,
        kernel=kernel,
        interpret=interpret,
        options=options,
    )
    kernel_step = with_reference_jvp(
        lambda p, g, v, lr, *finite: _step(p, g, v, lr, with_finite(hyper, finite), **launch),
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
    )
    first, new_momentum, ratios = kernel_step(
        list(params),
        list(grads),
        list(momentum),
        jnp.asarray(lr, jnp.float32),
        *finite_args(finite),
    )
    return StepResult(first, new_momentum, ratios)


def update_with_ratios(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    ratios: jax.Array,
    global_norm: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool = False,
    kernel: str | None = None,
    interpret: bool | None = None,
    kernel_options: dict | None = None,
) -> StepResult:
    """The update pass alone, with trust ratios the caller computed.

    For sharded params (``lars._sharded``): each shard runs the update kernel
    with the ratios of whole layers. Arguments as in :func:`pallas_step`, plus
    ``ratios`` (one float32 per leaf), ``global_norm`` (the global gradient
    norm, used with ``grad_clip_norm``) and ``write_params`` (return the new
    params, written in place, as :func:`pallas_apply`).
    """
    if jax.sharding.get_abstract_mesh().manual_axes:
        # Inside the user's shard_map the update runs in XLA (the norms are
        # still whole-layer, summed over the shards by the caller): under
        # check_vma, jax 0.11's Pallas interpreter rejects the kernels'
        # mixed varying axes, and the kernels are not verified on a mesh.
        return reference_update_with_ratios(
            params,
            grads,
            momentum,
            lr,
            ratios,
            global_norm,
            config=config,
            decay_mask=decay_mask,
            trust_mask=trust_mask,
            write_params=write_params,
        )
    kernel, interpret, flags, leaves, hyper, options = _prepare(
        params,
        grads,
        momentum,
        config,
        decay_mask,
        trust_mask,
        write_params,
        kernel,
        interpret,
        kernel_options,
    )
    updates, new_momentum = _update_given(
        list(params),
        list(grads),
        list(momentum),
        jnp.asarray(lr, jnp.float32),
        hyper,
        jnp.asarray(ratios, jnp.float32),
        jnp.asarray(global_norm, jnp.float32),
        flags=flags,
        leaves=tuple(leaves),
        kernel=kernel,
        interpret=interpret,
        options=options,
    )
    ratio_vector = jnp.asarray(ratios, jnp.float32)
    return StepResult(updates, new_momentum, [ratio_vector[i] for i in range(len(params))])


def _prepare(
    params,
    grads,
    momentum,
    config,
    decay_mask,
    trust_mask,
    write_params,
    kernel,
    interpret,
    options,
    skip_nonfinite=False,
):
    """The static launch parameters and hyperparameter scalars of a step."""
    default, default_interpret = default_kernel()
    kernel = kernel or default
    interpret = default_interpret if interpret is None else interpret
    _kernel_module(kernel)  # validates the name
    _split_options(kernel, tuple(sorted((options or {}).items())))  # validates the options
    flags = ew.StepFlags(
        clip_norm=config.grad_clip_norm is not None,
        clip_value=config.grad_clip_value is not None,
        nesterov=bool(config.nesterov),
        lr_inside_momentum=bool(config.lr_inside_momentum),
        write_params=write_params,
        skip_nonfinite=skip_nonfinite,
    )
    leaves = _leaf_specs(params, grads, momentum, decay_mask, trust_mask, config.has_weight_decay)
    hyper = {
        "momentum": config.momentum,
        "weight_decay": config.weight_decay if config.has_weight_decay else 0.0,
        "trust_coefficient": config.trust_coefficient,
        "eps": config.eps,
        "trust_clip": 0.0 if config.trust_clip is None else config.trust_clip,
        "grad_clip_norm": 0.0 if config.grad_clip_norm is None else config.grad_clip_norm,
        "grad_clip_value": 0.0 if config.grad_clip_value is None else config.grad_clip_value,
    }
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
    return kernel, interpret, flags, leaves, hyper, tuple(sorted((options or {}).items()))


def _scalars(lr, hyper, g_norm=None):
    """The kernels' scalar vector; ``g_norm``: the global gradient norm (clipping).

    ``hyper["finite"]`` (float32 1 or 0), present when the step may be
    skipped, becomes the FINITE scalar.
    """
    one = jnp.ones((), jnp.float32)
    values = {
        ew.FINITE: hyper.get("finite", one),
        ew.LR: lr,
        ew.MOMENTUM: hyper["momentum"],
        ew.WEIGHT_DECAY: hyper["weight_decay"],
        ew.CLIP_DIVISOR: one,
        ew.CLIP_FACTOR: one,
        ew.CLIP_VALUE: hyper["grad_clip_value"],
    }
    if g_norm is not None:
        # optax.clip_by_global_norm: g <- g if ||g|| < c else (g / ||g||) * c.
        c = hyper["grad_clip_norm"]
        trigger = g_norm < c
        values[ew.CLIP_DIVISOR] = jnp.where(trigger, one, g_norm)
        values[ew.CLIP_FACTOR] = jnp.where(trigger, one, c)
    return jnp.stack([values.get(i, 0.0 * one) for i in range(ew.NUM_SCALARS)])


def _pick(xs, idx):
    return [xs[i] for i in idx]


def _run_update(
    params, grads, momentum, ratio_vector, scalars, *, flags, leaves, impl, kw, only=None
):
    """The update pass over the non-empty leaves (of ``only``, if given); the others pass through.

    Returns (updates, or new params with ``flags.write_params``, new momenta).
    """
    active = [i for i in (range(len(leaves)) if only is None else only) if leaves[i].size > 0]
    updates = list(params) if flags.write_params else [jnp.zeros(p.shape, p.dtype) for p in params]
    new_momentum = [v.astype(leaf.momentum_dtype) for v, leaf in zip(momentum, leaves, strict=True)]
    if active:
        upd, mom = impl.update(
            _pick(params, active),
            _pick(grads, active),
            _pick(momentum, active),
            ratio_vector[np.asarray(active, np.int32)],
            scalars,
            flags=flags,
            leaves=_pick(leaves, active),
            **kw,
        )
        for k, i in enumerate(active):
            updates[i] = upd[k]
            new_momentum[i] = mom[k]
    return updates, new_momentum


@functools.partial(
    jax.jit, static_argnames=("flags", "leaves", "trust_clip", "kernel", "interpret", "options")
)
def _step(
    params, grads, momentum, lr, hyper, *, flags, leaves, trust_clip, kernel, interpret, options
):
    """The traced step (jitted so that eager calls reuse the compiled kernels)."""
    impl = _kernel_module(kernel)
    kw, fused_options = _split_options(kernel, options)
    kw = dict(interpret=interpret, **kw)
    active = [i for i, leaf in enumerate(leaves) if leaf.size > 0]

    scalars = _scalars(lr, hyper)
    if flags.clip_norm:
        if active:
            sums = impl.leaf_sums(
                None,
                _pick(grads, active),
                scalars,
                flags=ew.StepFlags(),
                leaves=_pick(leaves, active),
                **kw,
            )
            g_norm = jnp.sqrt(jnp.sum(sums[:, ew.SUM_W2]))
        else:
            g_norm = jnp.zeros((), jnp.float32)
        scalars = _scalars(lr, hyper, g_norm)

    fused_impl = _fused_module(kernel) if fused_options["fused"] else None
    fused, ring = [], None
    if fused_impl is not None and active:
        fits, ring = fused_impl.fusable(
            _pick(leaves, active),
            ring_blocks=fused_options.get("ring_blocks"),
            **{k: kw[k] for k in ("block_rows", "block_lanes") if k in kw},
        )
        fused = [i for i, fit in zip(active, fits, strict=True) if fit]
    rest = [i for i in active if i not in fused]

    # Per leaf: r from its sums where the trust ratio applies, else 1. Empty
    # leaves have zero sums (r = 1, then trust_clip), as in the reference.
    measured = [i for i in rest if leaves[i].trust]
    sums = jnp.zeros((1, 2), jnp.float32)  # row 0: the zero sums
    if measured:
        part = impl.leaf_sums(
            _pick(params, measured),
            _pick(grads, measured),
            scalars,
            flags=flags,
            leaves=_pick(leaves, measured),
            **kw,
        )
        sums = jnp.concatenate([sums, part])
    row = {i: k + 1 for k, i in enumerate(measured)}
    sums = sums[np.asarray([row.get(i, 0) for i in range(len(leaves))], np.int32)]
    r = ew.trust_ratio(
        sums[:, ew.SUM_W2],
        sums[:, ew.SUM_U2],
        hyper["trust_coefficient"],
        hyper["eps"],
        hyper["trust_clip"] if trust_clip else None,
    )
    trust = np.asarray([leaf.trust for leaf in leaves], bool)
    ratio_vector = jnp.where(trust, r, 1.0)
    if flags.skip_nonfinite:  # a skipped step reports ratios of 1, as the reference
        ratio_vector = jnp.where(hyper["finite"] != 0, ratio_vector, 1.0)

    updates, new_momentum = _run_update(
        params,
        grads,
        momentum,
        ratio_vector,
        scalars,
        flags=flags,
        leaves=leaves,
        impl=impl,
        kw=kw,
        only=rest,
    )
    if fused:
        first, mom, fused_ratios = fused_impl.fused_update(
            _pick(params, fused),
            _pick(grads, fused),
            _pick(momentum, fused),
            scalars,
            fused_impl.trust_scalars(hyper["trust_coefficient"], hyper["eps"], hyper["trust_clip"]),
            flags=flags,
            leaves=_pick(leaves, fused),
            trust_clip=trust_clip,
            ring_blocks=ring,
            **kw,
        )
        ratio_vector = ratio_vector.at[np.asarray(fused, np.int32)].set(fused_ratios)
        for k, i in enumerate(fused):
            updates[i] = first[k]
            new_momentum[i] = mom[k]
    ratios = [ratio_vector[i] for i in range(len(leaves))]
    return updates, new_momentum, ratios


@functools.partial(jax.jit, static_argnames=("flags", "leaves", "kernel", "interpret", "options"))
def _update_given(
    params, grads, momentum, lr, hyper, ratios, g_norm, *, flags, leaves, kernel, interpret, options
):
    """The traced update pass with given ratios (see :func:`update_with_ratios`)."""
    scalars = _scalars(lr, hyper, g_norm if flags.clip_norm else None)
    return _run_update(
        params,
        grads,
        momentum,
        ratios,
        scalars,
        flags=flags,
        leaves=leaves,
        impl=_kernel_module(kernel),
        kw=dict(interpret=interpret, **_split_options(kernel, options)[0]),
    )
