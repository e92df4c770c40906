"""The three programs of the Triton LARS kernels, one per pass (what an entry point calls).

* :func:`sums_program` (norm passes of the two-pass form): one chunk of one
  leaf; writes the chunk's float32 partial sums of w**2 and u**2 (or of g**2
  for the global-norm pass) to its own row of a partials buffer.
* :func:`update_program` (update pass): one chunk of one leaf; writes the new
  momentum and either the update or the new param.
* :func:`fused_sums` then :func:`fused_update` (the fused pass): one item of
  the table, claimed in table order: a chunk's partial sums, a chunk's
  update, or both for a single-chunk leaf. The last sums item of a leaf to
  finish adds the leaf's partials in chunk order and publishes its trust
  ratio; update items wait for it (the schedule and why it cannot deadlock:
  docs/triton.md). The entry point selects each half's pointers just before
  calling it (two halves: see ``entry.py``).

Each reads its row of the tile table (``plan.COL_*``) and the run-time scalars
(``lars.contract.Scalar``); its slot's pointers are selected by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lars.contract import Scalar

from . import plan as P
from .kernels import chunk_sums, chunk_update, finite_scalar, option_scalars

# The plan's layout constants and the scalars' positions, as the constexprs
# the programs read.
_TABLE_COLUMNS = tl.constexpr(P.TABLE_COLUMNS)
_COL_SLOT = tl.constexpr(P.COL_SLOT)
_COL_CHUNK = tl.constexpr(P.COL_CHUNK)
_COL_LENGTH = tl.constexpr(P.COL_LENGTH)
_COL_DECAY = tl.constexpr(P.COL_DECAY)
_COL_KIND = tl.constexpr(P.COL_KIND)
_COL_TRUST = tl.constexpr(P.COL_TRUST)
_COL_FIRST_ROW = tl.constexpr(P.COL_FIRST_ROW)
_COL_CHUNKS = tl.constexpr(P.COL_CHUNKS)
_COL_ITEMS = tl.constexpr(P.COL_ITEMS)
_KIND_SUMS = tl.constexpr(P.KIND_SUMS)
_KIND_UPDATE = tl.constexpr(P.KIND_UPDATE)
_KIND_WHOLE = tl.constexpr(P.KIND_WHOLE)
_SUM_W2 = tl.constexpr(P.SUM_W2)
_SUM_U2 = tl.constexpr(P.SUM_U2)
_LR = tl.constexpr(int(Scalar.LR))
_MOMENTUM = tl.constexpr(int(Scalar.MOMENTUM))
_TRUST_COEFFICIENT = tl.constexpr(int(Scalar.TRUST_COEFFICIENT))
_EPS = tl.constexpr(int(Scalar.EPS))
_TRUST_CLIP = tl.constexpr(int(Scalar.TRUST_CLIP))
_SYNC_ERROR = tl.constexpr(P.SYNC_ERROR)
_ERROR_SPIN = tl.constexpr(P.ERROR_SPIN)


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
        False,  # the two-pass update: no eviction hints
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
def slot_words(sync_ptr, SPIN_LIMIT: tl.constexpr):
    """The first per-slot word of the sync buffer (after the error word with a spin limit)."""
    if SPIN_LIMIT > 0:
        base = sync_ptr + 2
    else:
        base = sync_ptr + 1
    return base


@triton.jit
def publish_address(at, ptr):
    """Pointer table: stores ``ptr``'s address at int32 words ``at`` (low) and ``at + 1`` (high)."""
    address = ptr.to(tl.int64)
    tl.store(at, address.to(tl.int32))
    tl.store(at + 1, (address >> 32).to(tl.int32))


@triton.jit
def table_pointer(at, like):
    """Pointer table: the address at int32 words ``at`` and ``at + 1``, as ``like``'s type."""
    low = tl.load(at, cache_modifier=".cg").to(tl.uint32).to(tl.int64)
    high = tl.load(at + 1, cache_modifier=".cg").to(tl.int64)
    # 16-byte aligned, as every argument (jax-triton's divisibility): keeps the
    # chunk's loads and stores 16 bytes wide.
    return tl.multiple_of(((high << 32) | low).to(like.dtype), 16)


@triton.jit
def await_table(flag, sync_ptr, SPIN_LIMIT: tl.constexpr):
    """Pointer table: waits for item 0's program to publish it; 0 if a bounded wait gave up."""
    ok = tl.full((), 1, tl.int32)
    if SPIN_LIMIT > 0:  # debug: give up and flag the launch
        ready = tl.atomic_add(flag, 0, sem="acquire")
        polls = tl.full((), 1, tl.int32)
        while (ready == 0) & (polls < SPIN_LIMIT):
            ready = tl.atomic_add(flag, 0, sem="acquire")
            polls += 1
        if ready == 0:
            tl.atomic_xchg(sync_ptr + _SYNC_ERROR, _ERROR_SPIN, sem="relaxed")
            ok = tl.full((), 0, tl.int32)
    else:
        while tl.atomic_add(flag, 0, sem="acquire") == 0:
            pass
    return ok


@triton.jit
def fused_sums(
    item,  # int32 scalar: the table row this program claimed
    table_ptr,  # int32 (items, TABLE_COLUMNS): the item table
    scalars_ptr,  # float32 (NUM_SCALARS,): decay, clip, trust scalars
    slot,  # int32 scalar: the item's slot
    w_ptr,  # the slot's leaf: params
    g_ptr,  # the slot's leaf: gradients
    partials_ptr,  # out: float32 (rows, 2): per-chunk partial sums
    ratios_out_ptr,  # out: float32 (slots,): each slot's trust ratio
    sync_ptr,  # int32 (plan.sync_words), zero at launch: [0] the item counter; then
    # (with a spin limit) the error word; then per slot, its sums items
    # finished and its ratio-ready flag
    CLIP_NORM: tl.constexpr,  # global-norm clipping is on
    CLIP_VALUE: tl.constexpr,  # element-wise clipping is on
    HAS_DECAY: tl.constexpr,  # weight decay is on for some leaf
    TRUST_CLIP: tl.constexpr,  # r = min(r, trust_clip) is on
    CHUNK: tl.constexpr,  # elements per item
    BLOCK: tl.constexpr,  # elements per vector step
    REDUCE_BLOCK: tl.constexpr,  # partial rows per vector step (leaf_sums)
    SPIN_LIMIT: tl.constexpr,  # polls of a ready flag before giving up (0: no bound)
):
    """Fused pass, first half: a SUMS or WHOLE item's chunk sums; returns them (0 for UPDATE).

    A SUMS item stores its partials and arrives; the last arrival of a leaf
    publishes the leaf's trust ratio.
    """
    entry = table_ptr + item * _TABLE_COLUMNS
    chunk = tl.load(entry + _COL_CHUNK)
    start = chunk.to(tl.int64) * CHUNK
    length = tl.load(entry + _COL_LENGTH)
    decay = tl.load(entry + _COL_DECAY)
    kind = tl.load(entry + _COL_KIND)
    clip_divisor, clip_factor, clip_value, weight_decay = option_scalars(
        scalars_ptr, CLIP_NORM, CLIP_VALUE, HAS_DECAY
    )
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
        arrivals = slot_words(sync_ptr, SPIN_LIMIT) + 2 * slot
        ready = arrivals + 1
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
    return s_w, s_u


@triton.jit
def fused_update(
    item,  # int32 scalar: the table row this program claimed
    table_ptr,  # int32 (items, TABLE_COLUMNS): the item table
    scalars_ptr,  # float32 (NUM_SCALARS,): lr, momentum, decay, clip, trust scalars
    slot,  # int32 scalar: the item's slot
    w_ptr,  # the slot's leaf: params
    g_ptr,  # the slot's leaf: gradients
    v_ptr,  # the slot's leaf: momentum
    out_ptr,  # out: updates, or new params if WRITE_PARAMS
    v_out_ptr,  # out: new momentum
    ratios_out_ptr,  # out: float32 (slots,): each slot's trust ratio
    sync_ptr,  # int32 (plan.sync_words): see fused_sums
    s_w,  # float32 scalars: the chunk's sums from fused_sums (WHOLE items)
    s_u,
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
    SPIN_LIMIT: tl.constexpr,  # polls of a ready flag before giving up (0: no bound)
    EVICT_FIRST: tl.constexpr,  # the chunk's loads and stores (its last use) leave L2 first
):
    """Fused pass, second half: an UPDATE or WHOLE item's update (nothing for SUMS)."""
    entry = table_ptr + item * _TABLE_COLUMNS
    kind = tl.load(entry + _COL_KIND)
    if kind != _KIND_SUMS:
        chunk = tl.load(entry + _COL_CHUNK)
        start = chunk.to(tl.int64) * CHUNK
        length = tl.load(entry + _COL_LENGTH)
        decay = tl.load(entry + _COL_DECAY)
        trust = tl.load(entry + _COL_TRUST)
        clip_divisor, clip_factor, clip_value, weight_decay = option_scalars(
            scalars_ptr, CLIP_NORM, CLIP_VALUE, HAS_DECAY
        )
        ratio = tl.full((), 1.0, tl.float32)
        if kind == _KIND_WHOLE:  # a single-chunk leaf: its sums are the leaf's
            ratio = trust_ratio(s_w, s_u, scalars_ptr, TRUST_CLIP)
            tl.store(ratios_out_ptr + slot, ratio)
        elif trust != 0:
            # Every sums item of this leaf was claimed before this item: wait
            # for the last of them to publish the ratio.
            ready = slot_words(sync_ptr, SPIN_LIMIT) + 2 * slot + 1
            if SPIN_LIMIT > 0:  # debug: give up, flag the launch, poison the chunk
                flag = tl.atomic_add(ready, 0, sem="acquire")
                polls = tl.full((), 1, tl.int32)
                while (flag == 0) & (polls < SPIN_LIMIT):
                    flag = tl.atomic_add(ready, 0, sem="acquire")
                    polls += 1
                ratio = tl.load(ratios_out_ptr + slot, cache_modifier=".cg")
                if flag == 0:
                    tl.atomic_xchg(sync_ptr + _SYNC_ERROR, _ERROR_SPIN, sem="relaxed")
                    ratio = tl.full((), float("nan"), tl.float32)
            else:
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
            EVICT_FIRST,
        )
