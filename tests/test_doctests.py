"""The examples in the package's docstrings run and print what they show.

These are the examples the API reference shows (``make docs``); this test is
what runs them.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lars

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(lars.__path__, prefix="lars.")
    if not name.startswith("lars.kernels")
)


def test_modules_found():
    assert {"lars._transform", "lars._optimizer", "lars._trees", "lars.schedules"} <= set(MODULES)


@pytest.mark.parametrize("name", ["lars", *MODULES])
def test_doctests(name: str):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_there_are_examples():
    attempted = sum(
        doctest.testmod(importlib.import_module(n), report=False).attempted for n in MODULES
    )
    assert attempted >= 10
