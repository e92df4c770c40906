"""Mutable holders for optimizer and scheduler state.

When brainstate is in use, holders are ``brainstate`` states, so that an
optimizer or scheduler stepped inside ``brainstate.transform.jit`` (or
``for_loop``) has its state tracked like a model's; otherwise they are plain
objects with a ``.value``.
"""

from __future__ import annotations

import sys
from typing import Any


class Holder:
    """A plain mutable cell with a ``.value`` attribute."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


def make_holder(value: Any) -> Any:
    """A brainstate ``LongTermState`` if brainstate is imported, else a ``Holder``."""
    brainstate = sys.modules.get("brainstate")
    if brainstate is not None and hasattr(brainstate, "LongTermState"):
        return brainstate.LongTermState(value)
    return Holder(value)


def _has_attr(x: Any, name: str) -> bool:
    # hasattr() only swallows AttributeError; some containers (brainstate's
    # FlattedDict) raise KeyError for a missing attribute.
    try:
        return hasattr(x, name)
    except Exception:
        return False


def is_state_object(x: Any) -> bool:
    """True for state objects with a ``.value`` (brainstate.State and the like)."""
    if isinstance(x, (dict, list, tuple)) or x is None:
        return False
    if _has_attr(x, "shape") and _has_attr(x, "dtype"):
        return False
    return hasattr(type(x), "value") or _has_attr(x, "value")
