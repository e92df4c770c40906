"""The one list of backends that every cross-backend test file runs.

``BACKENDS`` is what runs on this machine's JAX platform: on a CPU the
reference, ``native`` (CI builds its library) and ``pallas`` (its kernels in
interpret mode). A listed backend that cannot run here fails its tests; it is
never skipped. ``KERNEL_BACKENDS`` are those checked against the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

import lars
from lars import _dispatch

_KERNELS = {
    "cpu": ["native", "pallas"],
    "gpu": ["native", "pallas", "triton"],
    "tpu": ["pallas"],
}

KERNEL_BACKENDS = _KERNELS.get(jax.default_backend(), [])
BACKENDS = ["reference", *KERNEL_BACKENDS]


def require(backend: str) -> None:
    """Fails (never skips) when a listed backend cannot run here."""
    if backend not in lars.available_backends():
        reason = _dispatch.get(backend).unavailable(jax.default_backend())
        pytest.fail(f"backend {backend!r} cannot run here: {reason}")


def run_on_cpu_devices(script: str, *args: str, devices: int, expect: str = "OK") -> None:
    """Runs ``script`` in a new process with ``devices`` simulated CPU devices.

    It must exit cleanly and print ``expect``.
    """
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert expect in out.stdout, out.stdout
