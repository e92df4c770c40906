"""The Triton kernels of the LARS step, and their NumPy references.

Three programs do the work (hand-written ``@triton.jit`` functions below):

* :func:`fused_program` (the fused pass, the default): one *item* of the tile
  table, claimed in table order: a chunk's partial sums, a chunk's update, or
  both for a single-chunk leaf. The last sums item of a leaf to finish adds
  the leaf's partials in chunk order and publishes its trust ratio (an
  acquire/release flag per leaf); update items wait for that flag. See
  ``plan.py`` for the schedule and why it cannot deadlock.

and, in the two-pass form (``plan.Tuning(fused=False)``):

* :func:`sums_program` (norm passes): one chunk of one leaf; writes the chunk's
  float32 partial sums of w**2 and u**2 (u the clipped, decayed gradient), or
  of g**2 for the global-norm pass, to its own row of a partials buffer. No
  atomics: the launcher reduces each leaf's rows in a fixed order.
* :func:`update_program` (update pass): one chunk of one leaf; writes the new
  momentum and either the update or the new param, with the operations of
  ``lars._reference.reference_step`` in the same order, in float32.

A launch serves several leaves ("slots", see ``plan.py``). Its entry point is a
``@triton.jit`` function *generated* for the number of slots, because
jax-triton passes every array as a separate, named pointer argument and Triton
has no variadic kernels. The generated code is only the signature, the
selection of the program's slot pointers (a chain of scalar selects) and a call
of the program above; see :func:`entry_source` for what it looks like.

A full chunk (``length == CHUNK``) runs without masks, so the loads of a chunk
whose first element is a multiple of ``CHUNK`` are 16-byte vector loads; a
leaf's last, shorter chunk runs the masked variant. Loops have static trip
counts (``CHUNK // BLOCK``; a short leaf's program runs its masked-off steps
without memory traffic): Triton 3.6's interpreter cannot take a loaded value
as a loop bound with NumPy 2.5 (``int()`` of a one-element array).

The kernels are created in the mode Triton is in when this module is imported
(compiled, or interpreted with ``TRITON_INTERPRET=1``); see ``interpret.py``.
"""

from __future__ import annotations

import functools
import linecache
from collections.abc import Sequence

import numpy as np
import triton
import triton.language as tl

from . import plan as P

# Whether the kernels below were created for Triton's interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# The plan's layout constants, as the constexprs a kernel may read.
_TABLE_COLUMNS = tl.constexpr(P.TABLE_COLUMNS)
_COL_SLOT = tl.constexpr(P.COL_SLOT)
_COL_CHUNK = tl.constexpr(P.COL_CHUNK)
_COL_LENGTH = tl.constexpr(P.COL_LENGTH)
_COL_DECAY = tl.constexpr(P.COL_DECAY)
_LR = tl.constexpr(P.LR)
_MOMENTUM = tl.constexpr(P.MOMENTUM)
_WEIGHT_DECAY = tl.constexpr(P.WEIGHT_DECAY)
_CLIP_DIVISOR = tl.constexpr(P.CLIP_DIVISOR)
_CLIP_FACTOR = tl.constexpr(P.CLIP_FACTOR)
_CLIP_VALUE = tl.constexpr(P.CLIP_VALUE)
_SUM_W2 = tl.constexpr(P.SUM_W2)
_SUM_U2 = tl.constexpr(P.SUM_U2)
_COL_KIND = tl.constexpr(P.COL_KIND)
_COL_TRUST = tl.constexpr(P.COL_TRUST)
_COL_FIRST_ROW = tl.constexpr(P.COL_FIRST_ROW)
_COL_CHUNKS = tl.constexpr(P.COL_CHUNKS)
_KIND_SUMS = tl.constexpr(P.KIND_SUMS)
_KIND_UPDATE = tl.constexpr(P.KIND_UPDATE)
_KIND_WHOLE = tl.constexpr(P.KIND_WHOLE)
_TRUST_COEFFICIENT = tl.constexpr(P.TRUST_COEFFICIENT)
_EPS = tl.constexpr(P.EPS)
_TRUST_CLIP = tl.constexpr(P.TRUST_CLIP)
_FINITE = tl.constexpr(P.FINITE)


# --------------------------------------------------------------------------
# Per-element math.


@triton.jit
def _load_f32(ptr, offs, length, MASKED: tl.constexpr):
    """Loads ``ptr[offs]`` as float32 (masked to ``offs < length`` if MASKED)."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < length, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, length, MASKED: tl.constexpr):
    """Stores ``x`` (converted to ``ptr``'s element type) to ``ptr[offs]``."""
    x = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, x, mask=offs < length)
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
# The norm passes.


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


@triton.jit
def sums_program(
    table_ptr,  # int32 (programs, TABLE_COLUMNS): the tile table
    scalars_ptr,  # float32 (NUM_SCALARS,): lr, momentum, decay, clip scalars
    w_ptr,  # this program's leaf: params (unused when GLOBAL)
    g_ptr,  # this program's leaf: gradients
    partials_ptr,  # out: float32 (programs, 2)
    GLOBAL: tl.constexpr,  # sum g**2 only (the global-norm pass)
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
    CHUNK: tl.constexpr,  # elements per program
    BLOCK: tl.constexpr,  # elements per vector step
):
    """Norm pass: writes one chunk's two float32 partial sums to its partials row."""
    row = tl.program_id(0)
    entry = table_ptr + row * _TABLE_COLUMNS
    start = tl.load(entry + _COL_CHUNK).to(tl.int64) * CHUNK
    length = tl.load(entry + _COL_LENGTH)
    decay = tl.load(entry + _COL_DECAY)
    clip_divisor, clip_factor, clip_value, weight_decay = option_scalars(
        scalars_ptr, CLIP_NORM, CLIP_VALUE, HAS_DECAY
    )
    s_w, s_u = chunk_sums(
        w_ptr + start,
        g_ptr + start,
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
        CHUNK,
        BLOCK,
    )
    tl.store(partials_ptr + row * 2 + _SUM_W2, s_w)
    tl.store(partials_ptr + row * 2 + _SUM_U2, s_u)


# --------------------------------------------------------------------------
# The update pass.


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
):
    """Updates one chunk. Every element is loaded before it is stored, so the
    outputs may alias the inputs (in place). With SKIP_NONFINITE and ``finite``
    0 it writes back the params and momenta it read (updates of -0.0), so a
    skipped step changes nothing, in place or not."""
    for start in tl.range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = _load_f32(g_ptr, offs, length, MASKED)
        v = _load_f32(v_ptr, offs, length, MASKED)
        w = tl.zeros((BLOCK,), tl.float32)
        if WRITE_PARAMS:
            w = _load_f32(w_ptr, offs, length, MASKED)
        elif HAS_DECAY:
            if decay != 0:  # uniform over the program: no reads for undecayed leaves
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
        _store(out_ptr, offs, first, length, MASKED)
        _store(v_out_ptr, offs, v_new, length, MASKED)


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
        )


@triton.jit
def finite_scalar(scalars_ptr, SKIP_NONFINITE: tl.constexpr):
    """The FINITE scalar (0 for a step to skip) if SKIP_NONFINITE, else 1."""
    finite = tl.full((), 1.0, tl.float32)
    if SKIP_NONFINITE:
        finite = tl.load(scalars_ptr + _FINITE)
    return finite


@triton.jit
def update_program(
    table_ptr,  # int32 (programs, TABLE_COLUMNS): the tile table
    scalars_ptr,  # float32 (NUM_SCALARS,): lr, momentum, decay, clip scalars
    ratios_ptr,  # float32 (slots,): the trust ratio of each slot's leaf
    slot,  # int32 scalar: this program's slot
    w_ptr,  # this program's leaf: params (unused unless read, see _chunk_update)
    g_ptr,  # this program's leaf: gradients
    v_ptr,  # this program's leaf: momentum
    out_ptr,  # out: updates, or new params if WRITE_PARAMS
    v_out_ptr,  # out: new momentum
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
    NESTEROV: tl.constexpr,  # Nesterov direction
    LR_INSIDE: tl.constexpr,  # the optax form of momentum
    WRITE_PARAMS: tl.constexpr,  # write new params instead of updates
    SKIP_NONFINITE: tl.constexpr,  # read the FINITE scalar (0: skip the step)
    CHUNK: tl.constexpr,  # elements per program
    BLOCK: tl.constexpr,  # elements per vector step
):
    """Update pass: one chunk of one leaf."""
    row = tl.program_id(0)
    entry = table_ptr + row * _TABLE_COLUMNS
    start = tl.load(entry + _COL_CHUNK).to(tl.int64) * CHUNK
    length = tl.load(entry + _COL_LENGTH)
    decay = tl.load(entry + _COL_DECAY)
    ratio = tl.load(ratios_ptr + slot)
    lr = tl.load(scalars_ptr + _LR)
    mu = tl.load(scalars_ptr + _MOMENTUM)
    clip_divisor, clip_factor, clip_value, weight_decay = option_scalars(
        scalars_ptr, CLIP_NORM, CLIP_VALUE, HAS_DECAY
    )
    finite = finite_scalar(scalars_ptr, SKIP_NONFINITE)
    chunk_update(
        w_ptr + start,
        g_ptr + start,
        v_ptr + start,
        out_ptr + start,
        v_out_ptr + start,
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
        CHUNK,
        BLOCK,
    )


# --------------------------------------------------------------------------
# The fused pass.


@triton.jit
def trust_ratio(
    sum_w2,  # float32 scalar: the leaf's sum of w**2
    sum_u2,  # float32 scalar: the leaf's sum of u**2
    scalars_ptr,  # float32 (NUM_SCALARS,): trust coefficient, eps, trust clip
    TRUST_CLIP: tl.constexpr,  # r = min(r, trust_clip) is on
):
    """``lars._reference.trust_ratio`` in float32: r = tc * ||w|| / (||u|| + eps),
    1 where a norm is 0, then the trust clip. Square root and division are
    rounded to nearest (``sqrt.rn``, ``div.rn``), as XLA rounds them."""
    w_norm = tl.sqrt_rn(sum_w2)
    u_norm = tl.sqrt_rn(sum_u2)
    tc = tl.load(scalars_ptr + _TRUST_COEFFICIENT)
    eps = tl.load(scalars_ptr + _EPS)
    r = tl.div_rn(tc * w_norm, u_norm + eps)
    r = tl.where((w_norm == 0.0) | (u_norm == 0.0), 1.0, r)
    if TRUST_CLIP:
        clip = tl.load(scalars_ptr + _TRUST_CLIP)
        r = tl.minimum(r, clip, propagate_nan=tl.PropagateNan.ALL)
    return r


@triton.jit
def leaf_sums(
    partials_ptr,  # float32 (rows, 2): per-chunk partial sums
    first_row,  # int32 scalar: the leaf's first row
    chunks,  # int32 scalar: the leaf's rows
    REDUCE_BLOCK: tl.constexpr,  # rows per vector step
):
    """A leaf's two sums from its chunks' partials, added in a fixed order.

    Other programs (other SMs) wrote the partials: they are loaded from L2
    (``.cg``), past this SM's L1.
    """
    acc_w = tl.zeros((REDUCE_BLOCK,), tl.float32)
    acc_u = tl.zeros((REDUCE_BLOCK,), tl.float32)
    start = chunks * 0
    while start < chunks:
        rows = start + tl.arange(0, REDUCE_BLOCK)
        mask = rows < chunks
        at = partials_ptr + (first_row + rows) * 2
        acc_w += tl.load(at + _SUM_W2, mask=mask, other=0.0, cache_modifier=".cg")
        acc_u += tl.load(at + _SUM_U2, mask=mask, other=0.0, cache_modifier=".cg")
        start += REDUCE_BLOCK
    return tl.sum(acc_w, axis=0), tl.sum(acc_u, axis=0)


@triton.jit
def fused_program(
    item,  # int32 scalar: the table row this program claimed
    table_ptr,  # int32 (items, TABLE_COLUMNS): the item table
    scalars_ptr,  # float32 (NUM_SCALARS,): lr, momentum, decay, clip, trust scalars
    slot,  # int32 scalar: the item's slot
    w_ptr,  # the slot's leaf: params
    g_ptr,  # the slot's leaf: gradients
    v_ptr,  # the slot's leaf: momentum
    out_ptr,  # out: updates, or new params if WRITE_PARAMS
    v_out_ptr,  # out: new momentum
    partials_ptr,  # out: float32 (rows, 2): per-chunk partial sums
    ratios_out_ptr,  # out: float32 (slots,): each slot's trust ratio
    sync_ptr,  # int32 (1 + 2 * slots), zero at launch: [0] the item counter; then
    # per slot, its sums items finished and its ratio-ready flag
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
    NESTEROV: tl.constexpr,  # Nesterov direction
    LR_INSIDE: tl.constexpr,  # the optax form of momentum
    WRITE_PARAMS: tl.constexpr,  # write new params instead of updates
    SKIP_NONFINITE: tl.constexpr,  # read the FINITE scalar (0: skip the step)
    TRUST_CLIP: tl.constexpr,  # r = min(r, trust_clip) is on
    CHUNK: tl.constexpr,  # elements per item
    BLOCK: tl.constexpr,  # elements per vector step
    REDUCE_BLOCK: tl.constexpr,  # partial rows per vector step (leaf_sums)
):
    """Fused pass: one item (a chunk's sums, a chunk's update, or both)."""
    entry = table_ptr + item * _TABLE_COLUMNS
    chunk = tl.load(entry + _COL_CHUNK)
    start = chunk.to(tl.int64) * CHUNK
    length = tl.load(entry + _COL_LENGTH)
    decay = tl.load(entry + _COL_DECAY)
    kind = tl.load(entry + _COL_KIND)
    trust = tl.load(entry + _COL_TRUST)
    clip_divisor, clip_factor, clip_value, weight_decay = option_scalars(
        scalars_ptr, CLIP_NORM, CLIP_VALUE, HAS_DECAY
    )
    arrivals = sync_ptr + 1 + 2 * slot
    ready = arrivals + 1
    s_w = tl.zeros((), tl.float32)
    s_u = tl.zeros((), tl.float32)
    if kind != _KIND_UPDATE:
        s_w, s_u = chunk_sums(
            w_ptr + start,
            g_ptr + start,
            length,
            decay,
            clip_divisor,
            clip_factor,
            clip_value,
            weight_decay,
            False,
            CLIP_NORM,
            CLIP_VALUE,
            HAS_DECAY,
            CHUNK,
            BLOCK,
        )
    if kind == _KIND_SUMS:
        first_row = tl.load(entry + _COL_FIRST_ROW)
        chunks = tl.load(entry + _COL_CHUNKS)
        row = partials_ptr + (first_row + chunk) * 2
        tl.store(row + _SUM_W2, s_w)
        tl.store(row + _SUM_U2, s_u)
        # acq_rel: releases this chunk's partials; the last arrival acquires all.
        if tl.atomic_add(arrivals, 1, sem="acq_rel") == chunks - 1:
            sum_w2, sum_u2 = leaf_sums(partials_ptr, first_row, chunks, REDUCE_BLOCK)
            tl.store(ratios_out_ptr + slot, trust_ratio(sum_w2, sum_u2, scalars_ptr, TRUST_CLIP))
            tl.atomic_xchg(ready, 1, sem="release")
    else:
        ratio = tl.full((), 1.0, tl.float32)
        if kind == _KIND_WHOLE:  # a single-chunk leaf: its sums are the leaf's
            ratio = trust_ratio(s_w, s_u, scalars_ptr, TRUST_CLIP)
            tl.store(ratios_out_ptr + slot, ratio)
        elif trust != 0:
            # Every sums item of this leaf was claimed before this item: wait
            # for the last of them to publish the ratio.
            while tl.atomic_add(ready, 0, sem="acquire") == 0:
                pass
            ratio = tl.load(ratios_out_ptr + slot, cache_modifier=".cg")
        elif chunk == 0:
            tl.store(ratios_out_ptr + slot, ratio)
        lr = tl.load(scalars_ptr + _LR)
        mu = tl.load(scalars_ptr + _MOMENTUM)
        finite = finite_scalar(scalars_ptr, SKIP_NONFINITE)
        chunk_update(
            w_ptr + start,
            g_ptr + start,
            v_ptr + start,
            out_ptr + start,
            v_out_ptr + start,
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
            CHUNK,
            BLOCK,
        )


# --------------------------------------------------------------------------
# The generated entry points: one per (pass, number of slots, params passed).

_ARG_COMMENTS = {
    "table_ptr": "int32 (programs, TABLE_COLUMNS): slot, chunk, length, decay",
    "scalars_ptr": "float32 (NUM_SCALARS,): lr, momentum, decay, clip scalars",
    "ratios_ptr": "float32 (slots,): trust ratios",
    "partials_ptr": "out: float32 (rows, 2) partial sums",
    "ratios_out_ptr": "out: float32 (slots,) trust ratios",
    "sync_ptr": "out: int32 (1 + 2 * slots), zeroed: item counter, arrivals, flags",
    "w": "params",
    "g": "gradients",
    "v": "momentum",
    "out": "out: updates, or new params if WRITE_PARAMS",
    "v_out": "out: new momentum",
}


def entry_source(spec: P.KernelSpec) -> str:
    """The Python source of the ``@triton.jit`` entry point for ``spec``.

    For ``KernelSpec(SUMS, 2, with_params=True)`` it reads::

        @triton.jit
        def lars_sums_2_w(
            table_ptr,  # int32 (programs, TABLE_COLUMNS): slot, chunk, length, decay
            scalars_ptr,  # float32 (NUM_SCALARS,): ...
            w_0, w_1,  # params
            g_0, g_1,  # gradients
            partials_ptr,  # out: float32 (programs, 2) partial sums
            GLOBAL: tl.constexpr,
            ...
        ):
            row = tl.program_id(0)  # a FUSED entry claims its row: tl.atomic_add(sync_ptr, 1)
            slot = tl.load(table_ptr + row * _TABLE_COLUMNS + _COL_SLOT)
            is_1 = slot == 1
            w_ptr = w_0
            w_ptr = tl.where(is_1, w_1, w_ptr)
            g_ptr = g_0
            g_ptr = tl.where(is_1, g_1, g_ptr)
            sums_program(table_ptr, scalars_ptr, w_ptr, g_ptr, partials_ptr, GLOBAL, ...)
    """
    lines = ["@triton.jit", f"def {spec.name}("]
    for arg in spec.scalar_args():
        lines.append(f"    {arg},  # {_ARG_COMMENTS[arg]}")
    for role in spec.pointer_roles():
        names = ", ".join(f"{role}_{k}" for k in range(spec.slots))
        lines.append(f"    {names},  # {_ARG_COMMENTS[role]}")
    for arg in spec.output_args():
        lines.append(f"    {arg},  # {_ARG_COMMENTS[arg]}")
    for name in spec.constexpr_names():
        lines.append(f"    {name}: tl.constexpr,")
    lines.append("):")
    if spec.kind == P.FUSED:  # items start in table order, whichever program runs first
        lines.append("    row = tl.atomic_add(sync_ptr, 1, sem='relaxed')")
    else:
        lines.append("    row = tl.program_id(0)")
    lines.append("    slot = tl.load(table_ptr + row * _TABLE_COLUMNS + _COL_SLOT)")
    for k in range(1, spec.slots):
        lines.append(f"    is_{k} = slot == {k}")
    for role in spec.pointer_roles():
        lines.append(f"    {role}_ptr = {role}_0")
        for k in range(1, spec.slots):
            lines.append(f"    {role}_ptr = tl.where(is_{k}, {role}_{k}, {role}_ptr)")
    if not spec.with_params:
        lines.append("    w_ptr = g_ptr  # not read")
    constexprs = ", ".join(spec.constexpr_names())
    if spec.kind == P.UPDATE:
        lines.append(
            "    update_program(table_ptr, scalars_ptr, ratios_ptr, slot, w_ptr, g_ptr, v_ptr, "
            f"out_ptr, v_out_ptr, {constexprs})"
        )
    elif spec.kind == P.FUSED:
        lines.append(
            "    fused_program(row, table_ptr, scalars_ptr, slot, w_ptr, g_ptr, v_ptr, out_ptr, "
            f"v_out_ptr, partials_ptr, ratios_out_ptr, sync_ptr, {constexprs})"
        )
    else:
        lines.append(
            f"    sums_program(table_ptr, scalars_ptr, w_ptr, g_ptr, partials_ptr, {constexprs})"
        )
    return "\n".join(lines) + "\n"


@functools.cache
def get_kernel(spec: P.KernelSpec):
    """The ``@triton.jit`` entry point for ``spec`` (generated once per process).

    The source is registered with ``linecache`` so that Triton (compiler and
    interpreter alike) can read it back as it reads any kernel's source.
    """
    if bool(triton.knobs.runtime.interpret) != INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET changed after lars.kernels.triton.kernels was imported; "
            "the kernels exist in one mode per process"
        )
    source = entry_source(spec)
    filename = f"<lars.kernels.triton: {spec.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {
        "triton": triton,
        "tl": tl,
        "sums_program": sums_program,
        "update_program": update_program,
        "fused_program": fused_program,
        "_TABLE_COLUMNS": _TABLE_COLUMNS,
        "_COL_SLOT": _COL_SLOT,
    }
    exec(compile(source, filename, "exec"), namespace)
    return namespace[spec.name]


# --------------------------------------------------------------------------
# NumPy references of the passes (whole leaves, no chunks, no slots).


def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32).reshape(-1)


def effective_grad_reference(g, w, decay: bool, scalars, flags: P.Flags) -> np.ndarray:
    """What :func:`effective_grad` computes, in float32 NumPy (same operations)."""
    s = np.asarray(scalars, np.float32)
    if flags.clip_norm:
        g = (g / s[P.CLIP_DIVISOR]) * s[P.CLIP_FACTOR]
    if flags.clip_value:
        g = np.minimum(np.maximum(g, -s[P.CLIP_VALUE]), s[P.CLIP_VALUE])
    if flags.has_decay and decay:
        g = g + s[P.WEIGHT_DECAY] * w
    return g


def sums_reference(
    params: Sequence | None,
    grads: Sequence,
    scalars,
    flags: P.Flags,
    decay: Sequence[bool],
) -> np.ndarray:
    """What a norm pass computes, per leaf, as a (leaves, 2) float64 array.

    The float32 squares are summed in float64, so a kernel's float32 partial
    sums can be judged by their own rounding only. ``params`` None is the
    global-norm pass (sum of g**2, 0).
    """
    rows = []
    for i, g in enumerate(grads):
        g = _f32(g)
        if params is None:
            rows.append((np.sum((g * g).astype(np.float64)), 0.0))
            continue
        w = _f32(params[i])
        u = effective_grad_reference(g, w, decay[i], scalars, flags)
        rows.append((np.sum((w * w).astype(np.float64)), np.sum((u * u).astype(np.float64))))
    return np.asarray(rows, np.float64).reshape(-1, 2)


def update_reference(
    params: Sequence,
    grads: Sequence,
    momentum: Sequence,
    ratios,
    scalars,
    flags: P.Flags,
    decay: Sequence[bool],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What the update pass computes, in float32 NumPy with the kernel's operations.

    Returns (updates or new params in the params' dtypes, new momenta), flat.
    A skipped step (``flags.skip_nonfinite`` and the FINITE scalar 0) returns
    the params (or updates of -0.0) and the momenta as they were.
    """
    s = np.asarray(scalars, np.float32)
    lr, mu = s[P.LR], s[P.MOMENTUM]
    if flags.skip_nonfinite and s[P.FINITE] == 0:
        first = [
            np.asarray(p).reshape(-1).copy()
            if flags.write_params
            else np.full(np.size(p), -0.0, np.asarray(p).dtype)
            for p in params
        ]
        return first, [_f32(v) for v in momentum]
    first, new_momentum = [], []
    for i, (p, g, v) in enumerate(zip(params, grads, momentum, strict=True)):
        p = np.asarray(p)
        w = _f32(p)
        u = effective_grad_reference(_f32(g), w, decay[i], scalars, flags) * np.float32(ratios[i])
        if flags.lr_inside_momentum:
            u = lr * u
        v_new = u + mu * _f32(v)
        direction = u + mu * v_new if flags.nesterov else v_new
        step = direction if flags.lr_inside_momentum else lr * direction
        update = (-step).astype(p.dtype)
        if flags.write_params:
            first.append((w + update.astype(np.float32)).astype(p.dtype))
        else:
            first.append(update)
        new_momentum.append(v_new)
    return first, new_momentum
