"""The source tree imports in every way a user runs it.

The kernels live in the top-level ``kernels/`` folder of the checkout and are
installed as ``lars.kernels``. Each test starts a fresh interpreter:

* the editable install of the test environment, from another directory;
* a regular (non-editable) install, run from the repository root, where the
  checkout's ``lars/`` comes first on ``sys.path`` and shadows the installed
  package;
* no install at all: a copy of the source tree on ``sys.path`` (what
  ``PYTHONPATH=.`` gives), where ``native`` says its library is not built
  and the rest works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
"""


def probe(cwd: Path, pythonpath: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_editable_install_from_another_directory(tmp_path: Path):
    got = probe(tmp_path)
    assert Path(got["lars"]).parent == ROOT / "lars"
    assert Path(got["kernels"]).parent == ROOT / "kernels"


@pytest.mark.slow
def test_regular_install_run_from_the_repository_root(tmp_path: Path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "lars" / "kernels" / "pallas" / "step.py").exists()
    # From the root the checkout shadows the install; its kernels come with it.
    got = probe(ROOT, pythonpath=str(target))
    assert Path(got["lars"]).parent == ROOT / "lars"
    assert Path(got["kernels"]).parent == ROOT / "kernels"
    # From elsewhere the installed package is whole on its own.
    got = probe(tmp_path, pythonpath=str(target))
    assert Path(got["lars"]).parent == target / "lars"
    assert Path(got["kernels"]).parent == target / "lars" / "kernels"


def test_source_tree_without_install(tmp_path: Path):
    tree = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "lib")  # no built native library
    for folder in ("lars", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    got = probe(tree, pythonpath=str(tree))
    assert Path(got["kernels"]).parent == tree / "kernels"
    backends = got["backends"].split(",")
    assert "reference" in backends and "native" not in backends
