"""The device, library versions and date recorded beside every figure."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jaxlib
import optax

import lars


def cpu_model() -> str:
    """The processor's model name, as the OS reports it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name() -> str:
    """The default device, e.g. "NVIDIA H100 80GB HBM3" or "<cpu model> (2 cores)"."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{cpu_model()} ({os.cpu_count()} cores)"
    return str(device.device_kind)


def collect(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Date (UTC), device, platform, versions, and the command (with ``argv``)."""
    argv = sys.argv[1:] if argv is None else argv
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "lars": lars.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "command": " ".join(["python -m bench", *argv]),
    }
