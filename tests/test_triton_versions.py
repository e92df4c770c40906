"""The Triton backend names an untested (triton, jax-triton) pair.

The tested pair is triton 3.6.0 with jax-triton 0.3.1 (the GPU images'). On a
GPU, ``unavailable`` reads the installed versions from the package metadata
(importing neither package) and says when the pair is another one, unless
``LARS_TRITON_UNTESTED=1``; off a GPU it says that first.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from lars.kernels import triton as triton_backend
from lars.kernels.triton import BACKEND, TESTED_VERSIONS, installed_versions, version_problem


def test_the_tested_pair_is_the_test_environments():
    assert TESTED_VERSIONS == (("3.6.0", "0.3.1"),)
    installed = (importlib.metadata.version("triton"), importlib.metadata.version("jax-triton"))
    assert installed_versions() == installed == ("3.6.0", "0.3.1")
    assert version_problem(installed) is None
    assert version_problem(("3.6.0+git1234", "0.3.1")) is None  # a local build of the release
    assert version_problem(None) is None  # not installed: the import check says so


@pytest.mark.parametrize("pair", [("3.7.1", "0.4.1"), ("3.6.0", "0.4.1"), ("3.8.0", "0.3.1")])
def test_another_pair_is_named_with_the_tested_one(monkeypatch, pair):
    message = version_problem(pair)
    assert message == (
        f"triton {pair[0]} with jax-triton {pair[1]} is not a tested pair (tested: triton "
        "3.6.0 with jax-triton 0.3.1); install them with `pip install triton==3.6.0 "
        "jax-triton==0.3.1`, or set LARS_TRITON_UNTESTED=1 to run this pair anyway"
    )
    monkeypatch.delenv("LARS_TRITON_UNTESTED", raising=False)
    monkeypatch.setattr(triton_backend, "installed_versions", lambda: pair)
    assert BACKEND.unavailable("gpu") == message
    assert BACKEND.unavailable("cpu").startswith("no GPU")  # the platform comes first
    # Set, the variable lets the pair through to the import check.
    monkeypatch.setenv("LARS_TRITON_UNTESTED", "1")
    assert BACKEND.unavailable("gpu") == triton_backend._import_problem()


def test_the_module_and_the_check_import_neither_package():
    code = (
        "import sys; from lars.kernels import triton as t; "
        "print(t.version_problem(t.installed_versions()), t.unavailable('cpu')[:6], "
        "'triton' in sys.modules, 'jax_triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "no", "GPU", "False", "False"]
