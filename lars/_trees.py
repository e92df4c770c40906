"""Pytree checks and mask resolution, with errors that name the leaf path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Gradient dtypes accepted for a parameter dtype other than the gradient's own:
# low-precision gradients on higher-precision master weights (mixed precision).
_LOW_PRECISION_GRADS = (jnp.bfloat16, jnp.float16)
# Real gradients on complex params (optax.lars takes them: the gradient is
# added to and scaled by complex numbers): the real dtype of the param's
# precision, or a low-precision one.
_REAL_PART = {
    np.dtype(jnp.complex64): np.dtype(jnp.float32),
    np.dtype(jnp.complex128): np.dtype(jnp.float64),
}

MaskOrFn = Any | Callable[[Any], Any] | None


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flattens ``tree``; returns (path strings, leaves, treedef)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def _dtype(x: Any) -> np.dtype:
    # The dtype the leaf has once on device: with x64 off, a NumPy float64 leaf
    # becomes float32, so it is compared as float32.
    dtype = jnp.result_type(x) if not hasattr(x, "dtype") else np.dtype(x.dtype)
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _describe_structure_difference(what: str, tree: Any, ref: Any, ref_name: str) -> str:
    paths, _, treedef = leaves_with_paths(tree)
    ref_paths, _, ref_treedef = leaves_with_paths(ref)
    missing = [p for p in ref_paths if p not in set(paths)]
    extra = [p for p in paths if p not in set(ref_paths)]
    parts = [f"{what} do not have the structure of {ref_name}"]
    if missing:
        parts.append(f"missing leaves at {', '.join(missing[:5])}")
    if extra:
        parts.append(f"unexpected leaves at {', '.join(extra[:5])}")
    if not missing and not extra:
        parts.append(f"{what}: {treedef}; {ref_name}: {ref_treedef}")
    return "; ".join(parts)


def _describe_mask_difference(name: str, mask: Any, params: Any) -> str:
    """Names the params no mask leaf covers and the mask leaves matching no params."""
    m_paths = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(mask)[0]]
    p_paths = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    covers = lambda m, p: p[: len(m)] == m
    uncovered = [p for p in p_paths if not any(covers(m, p) for m in m_paths)]
    unmatched = [m for m in m_paths if not any(covers(m, p) for p in p_paths)]
    if not uncovered and not unmatched:
        return _describe_structure_difference(name, mask, params, "params")
    parts = [f"{name} does not fit the structure of params"]
    if uncovered:
        keys = ", ".join(jax.tree_util.keystr(p) or "<root>" for p in uncovered[:5])
        parts.append(f"no mask entry for params at {keys}")
    if unmatched:
        keys = ", ".join(jax.tree_util.keystr(m) or "<root>" for m in unmatched[:5])
        parts.append(f"mask entries at {keys} match no params")
    return "; ".join(parts)


def is_trainable_dtype(dtype: Any) -> bool:
    """Floating-point or complex: the dtypes LARS updates (as optax.lars does)."""
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating))


def check_params(params: Any) -> tuple[list[str], list[Any], Any]:
    """Checks that every leaf of ``params`` is a floating-point or complex array.

    Returns:
      (paths, leaves, treedef) of ``params``.

    Raises:
      TypeError: naming the path of the first leaf of another dtype.
    """
    paths, leaves, treedef = leaves_with_paths(params)
    for path, leaf in zip(paths, leaves, strict=True):
        if not hasattr(leaf, "shape") and not isinstance(leaf, (int, float, complex)):
            raise TypeError(f"params leaf at {path} is a {type(leaf).__name__}, not an array")
        dtype = _dtype(leaf)
        if not is_trainable_dtype(dtype):
            raise TypeError(
                f"params leaf at {path} has dtype {dtype}; LARS updates floating-point "
                "and complex arrays only (integer and boolean leaves cannot be trained)"
            )
    return paths, leaves, treedef


def _grad_dtype_problem(dtype: np.dtype, p_dtype: np.dtype) -> str | None:
    """None when a gradient of ``dtype`` fits a param of ``p_dtype``, else the rule broken."""
    if dtype == p_dtype:
        return None
    if jnp.issubdtype(p_dtype, jnp.complexfloating):
        real = _REAL_PART[p_dtype]
        if dtype == real or dtype in _LOW_PRECISION_GRADS:
            return None
        return (
            f"gradients of complex params must have the param's dtype, or be {real}, "
            "bfloat16 or float16"
        )
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex gradients on real params (the update would lose its imaginary part)"
    wider_param = p_dtype in (np.dtype(jnp.float32), np.dtype(jnp.float64))
    if wider_param and dtype in _LOW_PRECISION_GRADS:
        return None
    return (
        "gradients must match the param dtype, or be bfloat16/float16 on float32 or float64 params"
    )


def check_like_params(what: str, tree: Any, params: Any, *, grads: bool = True) -> None:
    """Checks that ``tree`` (grads or a state tree) matches ``params`` leaf by leaf.

    Gradients must have the parameter's shape and either its dtype or, for
    float32/float64 parameters, a lower-precision float dtype (bfloat16 or
    float16 gradients on float32 master weights). Complex parameters also take
    real gradients of their precision (float32 on complex64, float64 on
    complex128) or bfloat16/float16 ones; real parameters take no complex
    gradients.

    Raises:
      ValueError: on a structure or shape mismatch, naming the path.
      TypeError: on a dtype mismatch, naming the path.
    """
    paths, leaves, treedef = leaves_with_paths(tree)
    _, p_leaves, p_treedef = leaves_with_paths(params)
    if treedef != p_treedef:
        raise ValueError(_describe_structure_difference(what, tree, params, "params"))
    for path, leaf, p_leaf in zip(paths, leaves, p_leaves, strict=True):
        if leaf is None or not (hasattr(leaf, "shape") or isinstance(leaf, (int, float, complex))):
            raise TypeError(f"{what} leaf at {path} is a {type(leaf).__name__}, not an array")
        shape, p_shape = jnp.shape(leaf), jnp.shape(p_leaf)
        if shape != p_shape:
            raise ValueError(
                f"{what} leaf at {path} has shape {shape}, but the param has {p_shape}"
            )
        if not grads:
            continue
        dtype, p_dtype = _dtype(leaf), _dtype(p_leaf)
        if not is_trainable_dtype(dtype):
            raise TypeError(f"{what} leaf at {path} has non-floating dtype {dtype}")
        problem = _grad_dtype_problem(dtype, p_dtype)
        if problem is not None:
            raise TypeError(
                f"{what} leaf at {path} has dtype {dtype}, but the param has {p_dtype} ({problem})"
            )


def _as_static_bool(value: Any, name: str, path: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        if np.shape(value) == () and np.asarray(value).dtype == np.bool_:
            return bool(value)
    raise TypeError(
        f"{name} leaf at {path} must be a Python bool (masks are static), got {value!r}"
    )


def resolve_mask(mask: MaskOrFn, params: Any, name: str) -> tuple[bool, ...]:
    """Resolves an optax-style mask to one static bool per leaf of ``params``.

    Args:
      mask: None (all True), a pytree of bools with the structure of ``params``
        (or a prefix of it), or a callable ``params -> such a pytree``.
      params: The parameter pytree.
      name: The argument name, for error messages.

    Returns:
      A tuple of bools, in the flattening order of ``params``.

    Raises:
      ValueError: if the mask's structure does not fit ``params``.
      TypeError: if a mask leaf is not a static bool.
    """
    n_leaves = len(jax.tree.leaves(params))
    if mask is None:
        return (True,) * n_leaves
    if callable(mask):
        mask = mask(params)
    m_paths, m_leaves, _ = leaves_with_paths(mask)
    for path, value in zip(m_paths, m_leaves, strict=True):
        _as_static_bool(value, name, path)
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params, is_leaf=lambda x: x is None
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            _describe_mask_difference(name, mask, params)
            + " (a mask must be a pytree of bools shaped like params, or a prefix of it)"
        ) from e
    out = [bool(v) for v in jax.tree.leaves(full)]
    if len(out) != n_leaves:
        raise ValueError(f"{name} resolves to {len(out)} leaves, params have {n_leaves}")
    return tuple(out)


def exclude_bias_and_norm(params: Any) -> Any:
    """A mask that is False for biases and normalisation scales/offsets.

    Leaves with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales and offsets,
    scalars) map to False; weight matrices and conv kernels map to True. Pass it
    as ``weight_decay_mask`` and/or ``trust_ratio_mask`` to exclude those
    leaves from decay and from layer-wise adaptation, as large-batch ResNet
    recipes do.

    Args:
      params: A pytree of arrays.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import lars
      >>> lars.exclude_bias_and_norm({"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
      {'b': False, 'w': True}
    """
    return jax.tree.map(lambda x: bool(jnp.ndim(x) > 1), params)
