"""The API reference (``make docs``): it builds with warnings as errors and
holds every public name; every public name has a docstring.

The docstrings' examples shown there are run by ``tests/test_doctests.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import lars

ROOT = Path(__file__).resolve().parent.parent
# What `make docs` runs (docs/conf.py sets nitpicky: every reference resolves).
SPHINX = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
MODULES = [lars, lars.schedules, lars.contract]


# What users of the native backend call (its other names, BACKEND and run,
# are the contract's, which the dispatcher calls).
NATIVE_SETTINGS = [
    "cpu_cache_bytes",
    "cpu_isa",
    "get_num_threads",
    "last_step_seconds",
    "last_step_start_ns",
    "last_step_threads",
    "set_cpu_cache_bytes",
    "set_cpu_isa",
    "set_num_threads",
]


def public_names() -> list[str]:
    """Every public name, spelled as users import it."""
    names = [f"{m.__name__}.{name}" for m in MODULES for name in m.__all__]
    return names + [f"lars.kernels.native.{name}" for name in NATIVE_SETTINGS]


def resolve(dotted: str) -> object:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def documented_as(dotted: str, inventory: set[str]) -> str | None:
    """The name under which the reference documents ``dotted``, if it does.

    A name re-exported from another public module (``lars.contract.LarsConfig``
    is ``lars.LarsConfig``) is documented once, under the ``lars`` name.
    """
    if dotted in inventory:
        return dotted
    alias = f"lars.{dotted.rpartition('.')[2]}"
    if alias in inventory and resolve(alias) is resolve(dotted):
        return alias
    return None


def test_public_names_cover_the_front_doors():
    names = set(public_names())
    assert {"lars.lars", "lars.Lars", "lars.schedules", "lars.contract"} <= names
    assert {"lars.schedules.StepLR", "lars.contract.Backend"} <= names
    native = importlib.import_module("lars.kernels.native")
    assert set(NATIVE_SETTINGS) == set(native.__all__) - {"BACKEND", "run"}


@pytest.mark.slow
def test_reference_builds_and_lists_every_public_name(tmp_path: Path):
    from sphinx.util.inventory import InventoryFile

    out = tmp_path / "html"
    build = subprocess.run(
        [*SPHINX, "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"sphinx-build failed:\n{build.stdout}\n{build.stderr}"
    with open(out / "objects.inv", "rb") as f:
        by_role = InventoryFile.load(f, "", lambda base, uri: uri)  # {role: {name: entry}}
    inventory = {name for entries in by_role.values() for name in entries}
    missing = [name for name in public_names() if documented_as(name, inventory) is None]
    assert not missing, f"public names not in the API reference (docs/api.rst): {missing}"
    # The README is the guide's text, included whole.
    index = (out / "index.html").read_text()
    assert "The update rule" in index and "How implementations differ" in index


def own_members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties a class defines itself.

    A dataclass's fields (``Backend.run``, ...) are documented in its
    docstring's Attributes section instead.
    """
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return [
        (name, value)
        for name, value in vars(cls).items()
        if not name.startswith("_")
        and name not in fields
        and isinstance(value, property | types.FunctionType | classmethod | staticmethod)
    ]


# Constants (lars.contract.HYPERPARAMETERS, ...) have no docstring of their
# own: their #: comment is what the reference shows, and a constant without
# one is missing from the reference's inventory (the build test above).
DOCUMENTED_OBJECTS = [
    name
    for name in public_names()
    if isinstance(resolve(name), types.ModuleType | type | types.FunctionType)
]


def test_the_objects_checked_for_docstrings():
    constants = set(public_names()) - set(DOCUMENTED_OBJECTS)
    assert constants == {"lars.contract.HYPERPARAMETERS", "lars.contract.NUM_SCALARS"}


@pytest.mark.parametrize("dotted", DOCUMENTED_OBJECTS)
def test_public_name_has_a_docstring(dotted: str):
    obj = resolve(dotted)
    assert (inspect.getdoc(obj) or "").strip(), f"{dotted} has no docstring"
    if isinstance(obj, type):
        bare = [
            name
            for name, _ in own_members(obj)
            if not (inspect.getdoc(getattr(obj, name)) or "").strip()
        ]
        assert not bare, f"{dotted}: public members without a docstring: {bare}"


def test_readme_links_to_the_repository_become_paths():
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    readme = (ROOT / "README.md").read_text()
    content = [readme]
    conf._repository_links_as_text(None, "README.md", "index", content)
    before, after = readme.splitlines(), content[0].splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed, "the README links to bench/ and examples/"
    for a, b in changed:  # only the links changed, into their paths
        assert "](" in a and "](" not in b, (a, b)
        assert re.sub(r"\[([^\[\]]*)\]\(([^()]*)\)", r"\1", a).replace("`", "") == re.sub(
            r" \(`[^`]*`\)|`", "", b
        ), (a, b)
    # images stay (the build copies them)
    assert [line for line in before if "![" in line] == [line for line in after if "![" in line]
