"""The distribution ``jax-lars``: its version, its jax range and the wheel pip builds.

* ``lars.__version__`` is the installed metadata's version: lars/__init__.py
  holds it and the build backend reads it from there (pyproject.toml).
* The native library is compiled against the XLA FFI headers of the oldest
  supported jaxlib (the build requirement): XLA refuses a handler built with
  newer headers than its own, so the build requirement must be the lower
  bound of the runtime range, and the library the tests load must have been
  built that way.
* ``pip wheel`` (the build backend, CMakeLists.txt) gives a wheel with the
  package, ``lars.kernels``, ``py.typed``, the native library and a note of
  what was built; installed on its own, ``native`` runs and "auto" picks it;
  installing it keeps the environment's jax.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from install_cases import ROOT, run_probe

import lars

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEADERS = "headers: XLA FFI API 0.4, jaxlib 0.11.2"


def _requirement(requirements: list[str], name: str) -> str:
    (found,) = [r for r in requirements if re.match(rf"{name}\b(?!-)", r)]
    return found


def _source_version() -> str:
    text = (ROOT / "lars" / "__init__.py").read_text()
    (version,) = re.findall(r'^__version__ = "([^"]+)"$', text, re.M)
    return version


def test_version_is_the_installed_metadata():
    assert lars.__version__ == _source_version()
    installed = importlib.metadata.version("jax-lars")
    assert installed == lars.__version__, (
        f"the installed jax-lars is {installed}, lars/__init__.py says {lars.__version__}: "
        "reinstall (pip install -e .)"
    )


def test_the_build_uses_the_oldest_supported_jaxlib():
    build = _requirement(PYPROJECT["build-system"]["requires"], "jaxlib")
    oldest = build.removeprefix("jaxlib==")
    assert build == f"jaxlib=={oldest}" and HEADERS.endswith(f"jaxlib {oldest}")
    for name in ("jax", "jaxlib"):
        runtime = _requirement(PYPROJECT["project"]["dependencies"], name)
        assert runtime == f"{name}>={oldest},<0.13", runtime
    # The library the tests load (built by `make`, i.e. `pip install -e .`).
    info = (ROOT / "kernels" / "native" / "lib" / "build-info.txt").read_text()
    assert HEADERS in info, info


def test_the_package_declares_its_types():
    assert (ROOT / "lars" / "py.typed").exists()


PROBE = """
import jax, jax.numpy as jnp, lars, lars.kernels.native
opt = lars.lars(0.1)
params = {"w": jnp.ones(8)}
text = jax.jit(opt.update).lower(params, opt.init(params), params).as_text()
print(lars.__file__)
print(lars.kernels.native.library.LIB_DIR)
print(",".join(lars.available_backends()))
print(lars._dispatch.resolve("auto").name, "lars_native_step" in text)
"""


@pytest.mark.slow
def test_pip_wheel_builds_the_native_library_into_the_package(tmp_path: Path):
    env = {**os.environ, "LARS_NATIVE_CUDA": "OFF"}  # the build's switch, as an env var
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("jax_lars-*.whl")
    version = lars.__version__
    assert wheel.name == f"jax_lars-{version}-py3-none-linux_{os.uname().machine}.whl"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = zf.read("lars/kernels/native/lib/build-info.txt").decode()
        meta = email.message_from_bytes(zf.read(f"jax_lars-{version}.dist-info/METADATA"))
    sources = {f"lars/{p.relative_to(ROOT / 'lars')}" for p in (ROOT / "lars").glob("*.py")}
    sources |= {
        f"lars/kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels").rglob("*.py")
    }
    assert sources <= names, sources - names
    lib = "lars/kernels/native/lib/"
    assert {"lars/py.typed", f"{lib}liblars_native_cpu.so", f"{lib}build-info.txt"} <= names
    assert f"{lib}liblars_native_cuda.so" not in names
    assert not [n for n in names if n.startswith(("kernels/", "tests/", "bench/", "examples/"))]
    assert not [n for n in names if n.endswith((".cc", ".h", ".cu", ".cuh"))]
    assert HEADERS in info and "cuda: not built (LARS_NATIVE_CUDA=OFF)" in info, info

    assert (meta["Name"], meta["Version"]) == ("jax-lars", version)
    assert meta["Requires-Python"] == ">=3.12" and meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    assert {"jax<0.13,>=0.11.2", "jaxlib<0.13,>=0.11.2"} <= set(requires), requires
    assert "Typing :: Typed" in meta.get_all("Classifier")

    # Installed on its own and run from elsewhere: native runs, "auto" picks it.
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    where, library, backends, auto = run_probe(PROBE, tmp_path, pythonpath=target)
    assert Path(where) == target / "lars" / "__init__.py"
    assert Path(library) == target / "lars" / "kernels" / "native" / "lib"
    assert "native" in backends.split(",") and auto == "native True"

    # Installing it into this environment would keep its jax and jaxlib.
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q"]
    dry = subprocess.run(
        [*pip, "--report", "-", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    installs = [item["metadata"]["name"] for item in json.loads(dry.stdout)["install"]]
    assert set(installs) <= {"jax-lars"}, installs


@pytest.mark.parametrize(
    "defines, message",
    [
        (["-DLARS_NATIVE_CUDA=maybe"], "LARS_NATIVE_CUDA must be AUTO, ON or OFF, not 'MAYBE'"),
        (
            ["-DLARS_NATIVE_CPU=OFF", "-DLARS_NATIVE_CUDA=OFF"],
            "nothing to build: LARS_NATIVE_CPU=OFF and cuda: not built (LARS_NATIVE_CUDA=OFF)",
        ),
    ],
)
def test_cmake_refuses_bad_settings_by_name_and_writes_nothing(
    tmp_path: Path, defines: list[str], message: str
):
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        pytest.skip("no cmake on PATH or beside the Python")
    lib = tmp_path / "lib"
    configure = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build")]
    configure += [f"-DPython3_EXECUTABLE={sys.executable}", f"-DLARS_NATIVE_OUTPUT_DIR={lib}"]
    done = subprocess.run([*configure, *defines], capture_output=True, text=True)
    assert done.returncode != 0
    assert message in " ".join((done.stdout + done.stderr).split())  # CMake wraps its messages
    assert not lib.exists()
