"""NumPy references of the Triton kernels' passes (whole leaves, no chunks, no slots).

Each computes what a pass computes, with the kernels' float32 operations in
the same order: the update pass's reference is bitwise the kernels' result;
the norm passes' sums are accumulated in float64, so a kernel's float32 sums
can be judged by their own rounding only. Scalars are read at the
``lars.contract.Scalar`` positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lars.contract import Scalar

from . import plan as P


def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32).reshape(-1)


def effective_grad_reference(g, w, decay: bool, scalars, flags: P.Flags) -> np.ndarray:
    """What :func:`effective_grad` computes, in float32 NumPy (same operations)."""
    s = np.asarray(scalars, np.float32)
    if flags.clip_norm:
        g = (g / s[Scalar.CLIP_DIVISOR]) * s[Scalar.CLIP_FACTOR]
    if flags.clip_value:
        g = np.minimum(np.maximum(g, -s[Scalar.CLIP_VALUE]), s[Scalar.CLIP_VALUE])
    if flags.has_decay and decay:
        g = g + s[Scalar.WEIGHT_DECAY] * w
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
    lr, mu = s[Scalar.LR], s[Scalar.MOMENTUM]
    if flags.skip_nonfinite and s[Scalar.FINITE] == 0:
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
