"""Reading values back from a checkpoint: every check, and no writes.

A state dict comes back from ``pickle`` as it was written, but from
``braintools.file.msgpack_load`` with every list and tuple turned into a dict
keyed ``'0', '1', ...`` and every dict key into a string; from orbax's
``StandardCheckpointer`` (without a target) with tuples as lists, named tuples
as dicts and ``optax.EmptyState()`` as ``None``; and through ``numpy.savez``
with every number as a 0-d array. The functions here accept each of these
forms of a valid value and raise ``TypeError`` (wrong kind of value) or
``ValueError`` (wrong shape, range or structure) naming the entry, e.g.
``state_dict['opt_state']['3']['trace']['w']``, for anything else. They build
new values and never change their input.
"""

from __future__ import annotations

import collections
import copy
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ARRAYS = (np.ndarray, np.generic, jax.Array)
_STANDARD_DICTS = (dict, collections.OrderedDict, collections.defaultdict)


def describe(value: Any) -> str:
    """A short description of a value for an error message."""
    if isinstance(value, _ARRAYS) and not isinstance(value, jax.core.Tracer):
        return f"a {type(value).__name__} of shape {np.shape(value)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _scalar(value: Any, what: str, kinds: tuple[type, ...], expected: str) -> Any:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{what} is a traced value; load a state dict outside jit")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be {expected}, got {describe(value)}")
    if isinstance(value, _ARRAYS):
        if np.ndim(value) != 0 or not any(np.issubdtype(value.dtype, k) for k in kinds):
            raise TypeError(f"{what} must be {expected}, got {describe(value)}")
        return np.asarray(value).item()
    pythonic = numbers.Integral if kinds == (np.integer,) else numbers.Real
    if not isinstance(value, pythonic):
        raise TypeError(f"{what} must be {expected}, got {describe(value)}")
    return value


def as_int(value: Any, what: str, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """An integer in [minimum, maximum]: a Python or NumPy integer or a 0-d integer array."""
    v = int(_scalar(value, what, (np.integer,), "an integer"))
    if not minimum <= v <= maximum:
        raise ValueError(f"{what} must be in [{minimum}, {maximum}], got {v}")
    return v


def as_real(value: Any, what: str, *, minimum: float = 0.0) -> float:
    """A finite real number >= minimum, as a Python float (exact for float32 values)."""
    v = float(_scalar(value, what, (np.floating, np.integer), "a real number"))
    if not np.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    if v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    return v


def as_mapping(value: Any, what: str) -> Mapping:
    """A dict (or other mapping); anything else raises."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {describe(value)}")
    return value


def as_list(value: Any, what: str) -> list:
    """A list or tuple, or msgpack's form of one (a dict keyed '0', '1', ...)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        keys = {str(k) for k in value}
        if keys == {str(i) for i in range(len(value))} and len(keys) == len(value):
            by_str = {str(k): v for k, v in value.items()}
            return [by_str[str(i)] for i in range(len(value))]
    raise TypeError(
        f"{what} must be a list (or msgpack's dict keyed '0', '1', ...), got {describe(value)}"
    )


def entry(mapping: Mapping, key: Any, what: str) -> Any:
    """``mapping[key]``, found by the key or by its string (msgpack, orbax)."""
    if key in mapping:
        return mapping[key]
    for k in mapping:
        if str(k) == str(key):
            return mapping[k]
    raise ValueError(f"{what} lacks the entry {key!r}")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_leaf(x: Any) -> bool:
    treedef = jax.tree.structure(x)
    return treedef.num_leaves == 1 and treedef.num_nodes == 1


def restore_like(template: Any, saved: Any, what: str, leaf: Callable[[Any, Any, str], Any]) -> Any:
    """Rebuilds ``saved`` with the structure of ``template``; ``leaf`` checks each leaf.

    Dict keys match by key or by their string (msgpack and orbax keep only
    strings); lists and tuples match lists, tuples or msgpack's dicts keyed
    '0', '1', ...; other pytree nodes must have the template's exact structure.

    Args:
      template: The live tree (e.g. the current momentum).
      saved: The tree read back.
      what: Its name in error messages.
      leaf: ``leaf(template_leaf, saved_leaf, path) -> value``; raises on a bad leaf.

    Raises:
      TypeError, ValueError: naming the path of the first difference.
    """
    if template is None:
        if saved is not None:
            raise TypeError(f"{what} must be None, got {describe(saved)}")
        return None
    if type(template) in _STANDARD_DICTS:
        saved = as_mapping(saved, what)
        strings, saved_strings = {str(k) for k in template}, {str(k) for k in saved}
        missing = [k for k in template if k not in saved and str(k) not in saved_strings]
        extra = [k for k in saved if k not in template and str(k) not in strings]
        if missing or extra:
            parts = [f"{what} does not have the structure of the params"]
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing[:5]))}")
            if extra:
                parts.append(f"unexpected {', '.join(map(repr, extra[:5]))}")
            raise ValueError("; ".join(parts))
        out = copy.copy(template)
        for k, v in template.items():
            out[k] = restore_like(v, entry(saved, k, what), f"{what}[{k!r}]", leaf)
        return out
    if _is_namedtuple(template):
        fields = template._fields
        if isinstance(saved, Mapping):
            if {str(k) for k in saved} != set(fields):
                raise ValueError(f"{what} must have the fields {list(fields)}, got {list(saved)}")
            items = [entry(saved, f, what) for f in fields]
        else:
            items = as_list(saved, what)
        if len(items) != len(fields):
            raise ValueError(f"{what} must have {len(fields)} entries, got {len(items)}")
        return type(template)(
            *(
                restore_like(t, s, f"{what}.{f}", leaf)
                for t, s, f in zip(template, items, fields, strict=True)
            )
        )
    if isinstance(template, (list, tuple)):
        items = as_list(saved, what)
        if len(items) != len(template):
            raise ValueError(f"{what} must have {len(template)} entries, got {len(items)}")
        out = [
            restore_like(t, s, f"{what}[{i}]", leaf)
            for i, (t, s) in enumerate(zip(template, items, strict=True))
        ]
        return type(template)(out)
    if _is_leaf(template):
        return leaf(template, saved, what)
    if jax.tree.structure(saved) != jax.tree.structure(template):
        raise ValueError(f"{what} does not have the structure {jax.tree.structure(template)}")
    return jax.tree.map(lambda t, s: leaf(t, s, what), template, saved)


def array_like(template: Any, saved: Any, what: str) -> jax.Array:
    """A saved floating-point (or, for a complex template, complex) array with the
    template's shape, in the template's dtype.

    A different dtype is accepted when the conversion is exact (a float64 copy
    of float32 values); integers, booleans and anything else raise.
    """
    if isinstance(saved, jax.core.Tracer):
        raise TypeError(f"{what} is a traced value; load a state dict outside jit")
    if isinstance(saved, (bool, np.bool_)) or not isinstance(saved, (*_ARRAYS, float, int)):
        raise TypeError(f"{what} must be an array, got {describe(saved)}")
    arr = np.asarray(saved)
    shape, dtype = tuple(np.shape(template)), np.dtype(template.dtype)
    kind = np.complexfloating if np.issubdtype(dtype, np.complexfloating) else np.floating
    if not np.issubdtype(arr.dtype, np.inexact) or isinstance(saved, int):
        raise TypeError(f"{what} must be a floating-point array, got {describe(saved)}")
    if kind is np.floating and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what} must be a real array, got {describe(saved)}")
    if arr.shape != shape:
        raise ValueError(f"{what} has shape {arr.shape}, but the param has {shape}")
    if arr.dtype != dtype:
        cast = arr.astype(dtype)
        if not np.array_equal(cast.astype(arr.dtype), arr, equal_nan=True):
            raise ValueError(
                f"{what} has dtype {arr.dtype} and does not convert to {dtype} exactly"
            )
        arr = cast
    sharding = getattr(template, "sharding", None)
    if isinstance(template, jax.Array) and sharding is not None and len(sharding.device_set) > 1:
        return jax.device_put(arr, sharding)
    return jnp.asarray(arr, dtype)
