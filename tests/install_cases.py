"""Runs code in a fresh interpreter as an environment without the editable install.

The test environment has jax-lars installed in editable mode (``make``):
scikit-build-core's import finder for it comes before ``sys.path`` (so before
``PYTHONPATH``), and its ``.pth`` file puts the checkout on ``sys.path``
(the finder's module name changes between scikit-build-core releases: it is
recognised by finding ``lars`` in the checkout). A
probe of another install (a ``--target`` folder, an unpacked wheel, a copy of
the source tree) given as ``PYTHONPATH`` first removes both, as an
environment that never had the editable install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WITHOUT_EDITABLE = f"""
import sys

def _editable(finder):  # an import finder (not importlib's) that finds lars in the checkout
    if getattr(finder, "__module__", "").startswith(("_frozen_importlib", "importlib")):
        return False
    try:
        spec = finder.find_spec("lars", None)
    except Exception:
        return False
    return spec is not None and (spec.origin or "").startswith({str(ROOT / "lars")!r})

sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path[:] = [p for p in sys.path if p != {str(ROOT)!r}]
"""


def run_probe(code: str, cwd: Path, pythonpath: str | Path | None = None) -> list[str]:
    """Runs ``code`` in ``cwd`` (without the editable install when given a
    ``pythonpath``); returns its output lines, failing with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
        code = WITHOUT_EDITABLE + code
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()
