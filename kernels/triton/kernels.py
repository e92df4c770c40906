"""The device functions of the Triton LARS kernels: per-element math, one chunk's sums and update.

``@triton.jit`` helpers the programs (``programs.py``) call: loads and stores,
the run-time scalars of the options (``lars.contract.Scalar`` positions), the
effective gradient, the momentum step, and a chunk's partial sums and update,
unmasked for a full chunk and masked for a shorter one. Float32 arithmetic in
the order of ``lars._reference.reference_step``. The functions are created in
the mode Triton is in when this module is imported (compiled, or interpreted
with ``TRITON_INTERPRET=1``): :data:`INTERPRETED` records which.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lars.contract import Scalar

# Whether the kernels were created for Triton's interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Positions of the run-time scalars these functions read.
_WEIGHT_DECAY = tl.constexpr(int(Scalar.WEIGHT_DECAY))
_CLIP_DIVISOR = tl.constexpr(int(Scalar.CLIP_DIVISOR))
_CLIP_FACTOR = tl.constexpr(int(Scalar.CLIP_FACTOR))
_CLIP_VALUE = tl.constexpr(int(Scalar.CLIP_VALUE))
_FINITE = tl.constexpr(int(Scalar.FINITE))


# --------------------------------------------------------------------------
# Per-element math.


@triton.jit
def _load_f32(ptr, offs, length, MASKED: tl.constexpr, EVICT_FIRST: tl.constexpr = False):
    """Loads ``ptr[offs]`` as float32 (masked to ``offs < length`` if MASKED).

    EVICT_FIRST marks the lines as the first to leave L2 (their last use in
    the step: ``L2::evict_first`` on sm_90).
    """
    if MASKED:
        if EVICT_FIRST:
            x = tl.load(ptr + offs, mask=offs < length, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(ptr + offs, mask=offs < length, other=0.0)
    else:
        if EVICT_FIRST:
            x = tl.load(ptr + offs, eviction_policy="evict_first")
        else:
            x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, length, MASKED: tl.constexpr, EVICT_FIRST: tl.constexpr = False):
    """Stores ``x`` (converted to ``ptr``'s element type) to ``ptr[offs]`` (EVICT_FIRST: as
    :func:`_load_f32`)."""
    x = x.to(ptr.dtype.element_ty)
    if MASKED:
        if EVICT_FIRST:
            tl.store(ptr + offs, x, mask=offs < length, eviction_policy="evict_first")
        else:
            tl.store(ptr + offs, x, mask=offs < length)
    else:
        if EVICT_FIRST:
            tl.store(ptr + offs, x, eviction_policy="evict_first")
        else:
            tl.store(ptr + offs, x)


@triton.jit
def option_scalars(
    scalars_ptr,  # float32 (NUM_SCALARS,)
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
):
    """(clip divisor, clip factor, clip value, weight decay); only the options on are read."""
    clip_divisor = 1.0
    clip_factor = 1.0
    clip_value = 0.0
    weight_decay = 0.0
    if CLIP_NORM:
        clip_divisor = tl.load(scalars_ptr + _CLIP_DIVISOR)
        clip_factor = tl.load(scalars_ptr + _CLIP_FACTOR)
    if CLIP_VALUE:
        clip_value = tl.load(scalars_ptr + _CLIP_VALUE)
    if HAS_DECAY:
        weight_decay = tl.load(scalars_ptr + _WEIGHT_DECAY)
    return clip_divisor, clip_factor, clip_value, weight_decay


@triton.jit
def effective_grad(
    g,  # float32 gradient values
    w,  # float32 param values (read only where decay applies)
    decay,  # int32 scalar: 1 if weight decay applies to this leaf
    clip_divisor,  # float32 scalar: ||g|| if the global-norm clip triggers, else 1
    clip_factor,  # float32 scalar: grad_clip_norm if it triggers, else 1
    clip_value,  # float32 scalar: the element-wise clip bound
    weight_decay,  # float32 scalar: lambda
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
):
    """Steps 1-3 of the rule: global-norm scale, value clip, weight decay.

    ``(g / clip_divisor) * clip_factor`` is optax's ``(g / ||g||) * max_norm``
    when the clip triggers and exactly ``g`` otherwise (both scalars are 1).
    The clip propagates NaN, as ``jnp.clip`` does.
    """
    if CLIP_NORM:
        g = tl.div_rn(g, clip_divisor) * clip_factor
    if CLIP_VALUE:
        g = tl.maximum(g, -clip_value, propagate_nan=tl.PropagateNan.ALL)
        g = tl.minimum(g, clip_value, propagate_nan=tl.PropagateNan.ALL)
    if HAS_DECAY:
        g = tl.where(decay != 0, g + weight_decay * w, g)
    return g


@triton.jit
def momentum_step(
    u,  # float32 effective gradient
    v,  # float32 momentum
    ratio,  # float32 scalar: the leaf's trust ratio
    lr,  # float32 scalar: the learning rate
    mu,  # float32 scalar: the momentum factor
    NESTEROV: tl.constexpr,  # Nesterov direction
    LR_INSIDE: tl.constexpr,  # the optax form: lr inside the momentum buffer
):
    """Steps 5-6: returns (step to subtract from w, new momentum), float32."""
    u = u * ratio
    if LR_INSIDE:
        u = lr * u
    v_new = u + mu * v
    if NESTEROV:
        direction = u + mu * v_new
    else:
        direction = v_new
    if LR_INSIDE:
        step = direction
    else:
        step = lr * direction
    return step, v_new


# --------------------------------------------------------------------------
# One chunk's partial sums (the norm passes).


@triton.jit
def _chunk_sums(
    w_ptr,  # the chunk's first param (unused when GLOBAL)
    g_ptr,  # the chunk's first gradient
    length,  # elements in the chunk
    decay,  # int32 scalar: weight decay applies to this leaf
    clip_divisor,  # float32 scalars, see effective_grad
    clip_factor,
    clip_value,
    weight_decay,
    GLOBAL: tl.constexpr,  # sum g**2 only (the global-norm pass)
    CLIP_NORM: tl.constexpr,
    CLIP_VALUE: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    MASKED: tl.constexpr,  # the chunk may be shorter than CHUNK
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Float32 sums of w**2 and u**2 over one chunk (g**2 and 0 when GLOBAL)."""
    acc_w = tl.zeros((BLOCK,), tl.float32)
    acc_u = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = _load_f32(g_ptr, offs, length, MASKED)
        if GLOBAL:
            acc_w += g * g
        else:
            w = _load_f32(w_ptr, offs, length, MASKED)
            u = effective_grad(
                g,
                w,
                decay,
                clip_divisor,
                clip_factor,
                clip_value,
                weight_decay,
                CLIP_NORM,
                CLIP_VALUE,
                HAS_DECAY,
            )
            if MASKED:  # a padding lane contributes nothing, whatever the scalars
                u = tl.where(offs < length, u, 0.0)
            acc_w += w * w
            acc_u += u * u
    return tl.sum(acc_w, axis=0), tl.sum(acc_u, axis=0)


@triton.jit
def chunk_sums(
    w_ptr,  # the chunk's first param (unused when GLOBAL)
    g_ptr,  # the chunk's first gradient
    length,  # elements in the chunk
    decay,  # int32 scalar: weight decay applies to this leaf
    clip_divisor,  # float32 scalars, see effective_grad
    clip_factor,
    clip_value,
    weight_decay,
    GLOBAL: tl.constexpr,  # sum g**2 only (the global-norm pass)
    CLIP_NORM: tl.constexpr,
    CLIP_VALUE: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """:func:`_chunk_sums` without masks for a full chunk, with them for a shorter one."""
    if length == CHUNK:
        s_w, s_u = _chunk_sums(
            w_ptr,
            g_ptr,
            length,
            decay,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            GLOBAL,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
            False,
            CHUNK,
            BLOCK,
        )
    else:
        s_w, s_u = _chunk_sums(
            w_ptr,
            g_ptr,
            length,
            decay,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            GLOBAL,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
            True,
            CHUNK,
            BLOCK,
        )
    return s_w, s_u


# --------------------------------------------------------------------------
# One chunk's update.


@triton.jit
def _chunk_update(
    w_ptr,  # the chunk's first param (read if WRITE_PARAMS, or where decay applies)
    g_ptr,  # the chunk's first gradient
    v_ptr,  # the chunk's first momentum
    out_ptr,  # out: the update, or the new param if WRITE_PARAMS
    v_out_ptr,  # out: the new momentum
    length,  # elements in the chunk
    decay,  # int32 scalar: weight decay applies to this leaf
    ratio,  # float32 scalars: trust ratio, lr, momentum, and see effective_grad
    lr,
    mu,
    clip_divisor,
    clip_factor,
    clip_value,
    weight_decay,
    finite,  # float32 scalar: 0 skips the step (read if SKIP_NONFINITE)
    CLIP_NORM: tl.constexpr,
    CLIP_VALUE: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    LR_INSIDE: tl.constexpr,
    WRITE_PARAMS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    EVICT_FIRST: tl.constexpr,  # the chunk's last use: its lines leave L2 first
):
    """Updates one chunk. Every element is loaded before it is stored, so the
    outputs may alias the inputs (in place). With SKIP_NONFINITE and ``finite``
    0 it writes back the params and momenta it read (updates of -0.0), so a
    skipped step changes nothing, in place or not."""
    for start in tl.range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = _load_f32(g_ptr, offs, length, MASKED, EVICT_FIRST)
        v = _load_f32(v_ptr, offs, length, MASKED, EVICT_FIRST)
        w = tl.zeros((BLOCK,), tl.float32)
        if WRITE_PARAMS:
            w = _load_f32(w_ptr, offs, length, MASKED, EVICT_FIRST)
        elif HAS_DECAY:
            if decay != 0:  # uniform over the program: no reads for undecayed leaves
                w = _load_f32(w_ptr, offs, length, MASKED, EVICT_FIRST)
        u = effective_grad(
            g,
            w,
            decay,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
        )
        step, v_new = momentum_step(u, v, ratio, lr, mu, NESTEROV, LR_INSIDE)
        # step * -1, not -step: Triton's unary minus is 0 - x, which turns a
        # zero step into +0.0 where the reference's -step gives -0.0.
        update = (step * -1.0).to(out_ptr.dtype.element_ty)
        if WRITE_PARAMS:
            # optax.apply_updates: the update in the param dtype, added, rounded.
            first = w + update.to(tl.float32)
            if SKIP_NONFINITE:
                first = tl.where(finite != 0.0, first, w)
        else:
            first = update
            if SKIP_NONFINITE:
                # -0.0 from its bits (tl.full(-0.0) and -tl.zeros give +0.0).
                sign_bit = tl.full((BLOCK,), -2147483648, tl.int32)
                minus_zero = sign_bit.to(tl.float32, bitcast=True)
                first = tl.where(finite != 0.0, first, minus_zero)
        if SKIP_NONFINITE:
            v_new = tl.where(finite != 0.0, v_new, v)
        _store(out_ptr, offs, first, length, MASKED, EVICT_FIRST)
        _store(v_out_ptr, offs, v_new, length, MASKED, EVICT_FIRST)


@triton.jit
def chunk_update(
    w_ptr,  # the chunk's first param, ... (as _chunk_update)
    g_ptr,
    v_ptr,
    out_ptr,
    v_out_ptr,
    length,  # elements in the chunk
    decay,  # int32 scalar: weight decay applies to this leaf
    ratio,  # float32 scalars: trust ratio, lr, momentum, and see effective_grad
    lr,
    mu,
    clip_divisor,
    clip_factor,
    clip_value,
    weight_decay,
    finite,
    CLIP_NORM: tl.constexpr,
    CLIP_VALUE: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    LR_INSIDE: tl.constexpr,
    WRITE_PARAMS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    EVICT_FIRST: tl.constexpr,  # see _chunk_update
):
    """:func:`_chunk_update` without masks for a full chunk, with them for a shorter one."""
    if length == CHUNK:
        _chunk_update(
            w_ptr,
            g_ptr,
            v_ptr,
            out_ptr,
            v_out_ptr,
            length,
            decay,
            ratio,
            lr,
            mu,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            finite,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
            NESTEROV,
            LR_INSIDE,
            WRITE_PARAMS,
            SKIP_NONFINITE,
            False,
            CHUNK,
            BLOCK,
            EVICT_FIRST,
        )
    else:
        _chunk_update(
            w_ptr,
            g_ptr,
            v_ptr,
            out_ptr,
            v_out_ptr,
            length,
            decay,
            ratio,
            lr,
            mu,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            finite,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
            NESTEROV,
            LR_INSIDE,
            WRITE_PARAMS,
            SKIP_NONFINITE,
            True,
            CHUNK,
            BLOCK,
            EVICT_FIRST,
        )


@triton.jit
def finite_scalar(scalars_ptr, SKIP_NONFINITE: tl.constexpr):
    """The FINITE scalar (0 for a step to skip) if SKIP_NONFINITE, else 1."""
    finite = tl.full((), 1.0, tl.float32)
    if SKIP_NONFINITE:
        finite = tl.load(scalars_ptr + _FINITE)
    return finite
