"""The source tree imports in every way a user runs it.

The kernels live in the top-level ``kernels/`` folder of the checkout and are
installed as ``lars.kernels``. Each test starts a fresh interpreter:

* the editable install of the test environment, from another directory;
* a regular (non-editable) install, built by pip through the build backend
  (the native library compiled by CMakeLists.txt into the package), run from
  the repository root, where the checkout's ``lars/`` comes first on
  ``sys.path`` and shadows the installed package, and from elsewhere, where
  the installed package and its own library are used;
* no install at all: a copy of the source tree on ``sys.path`` (what
  ``PYTHONPATH=.`` gives), where ``native`` says its library is not built
  and the rest works.

The last two run as an environment without the editable install
(tests/install_cases.py): its import finder would otherwise win over
``PYTHONPATH``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from install_cases import ROOT, run_probe

# Imports every backend package, runs one step on "auto" and prints what loaded from where.
PROBE = """
import jax.numpy as jnp, lars
import lars.kernels.native, lars.kernels.pallas, lars.kernels.triton
import lars.kernels.pallas.step
opt = lars.lars(0.1)
params = {"w": jnp.ones(3)}
updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
assert float(updates["w"][0]) < 0
print("lars", lars.__file__)
print("kernels", lars.kernels.__file__)
print("backends", ",".join(lars.available_backends()))
print("library", lars.kernels.native.library.LIB_DIR)
print("auto", lars._dispatch.resolve("auto").name)
"""


def probe(cwd: Path, pythonpath: str | None = None) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in run_probe(PROBE, cwd, pythonpath))


def test_editable_install_from_another_directory(tmp_path: Path):
    got = probe(tmp_path)
    assert Path(got["lars"]).parent == ROOT / "lars"
    assert Path(got["kernels"]).parent == ROOT / "kernels"
    # The editable install (make) builds the library into the source tree.
    assert Path(got["library"]) == ROOT / "kernels" / "native" / "lib"
    assert "native" in got["backends"].split(",") and got["auto"] == "native"


@pytest.mark.slow
def test_regular_install_run_from_the_repository_root(tmp_path: Path):
    target = tmp_path / "site"
    # The CUDA handler is turned off through the build backend's config
    # settings (it is not needed here and costs a minute of nvcc).
    cuda_off = "--config-settings=cmake.define.LARS_NATIVE_CUDA=OFF"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", cuda_off]
    build = subprocess.run(
        [*command, "--target", target, ROOT], capture_output=True, text=True, timeout=900
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "lars" / "kernels" / "pallas" / "step.py").exists()
    lib = target / "lars" / "kernels" / "native" / "lib"
    assert (lib / "liblars_native_cpu.so").exists()
    assert not (lib / "liblars_native_cuda.so").exists()
    assert "cuda: not built (LARS_NATIVE_CUDA=OFF)" in (lib / "build-info.txt").read_text()
    # From the root the checkout shadows the install; its kernels come with it.
    got = probe(ROOT, pythonpath=str(target))
    assert Path(got["lars"]).parent == ROOT / "lars"
    assert Path(got["kernels"]).parent == ROOT / "kernels"
    assert Path(got["library"]) == ROOT / "kernels" / "native" / "lib"
    # From elsewhere the installed package is whole on its own, native included.
    got = probe(tmp_path, pythonpath=str(target))
    assert Path(got["lars"]).parent == target / "lars"
    assert Path(got["kernels"]).parent == target / "lars" / "kernels"
    assert Path(got["library"]) == lib
    assert "native" in got["backends"].split(",") and got["auto"] == "native"


def test_source_tree_without_install(tmp_path: Path):
    tree = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "lib")  # no built native library
    for folder in ("lars", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    got = probe(tree, pythonpath=str(tree))
    assert Path(got["kernels"]).parent == tree / "kernels"
    backends = got["backends"].split(",")
    assert "reference" in backends and "native" not in backends
    assert got["auto"] == "reference"
