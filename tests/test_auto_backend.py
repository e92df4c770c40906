"""``backend="auto"``: the order it tries backends in on each platform.

The backends' own availability checks are replaced by stand-ins, so the order
is checked on any machine; the order itself is a measurement (bench/results/).
"""

from __future__ import annotations

import types

import pytest

from lars import _dispatch, _sharded
from lars.contract import Feature

NAMES = ("reference", "native", "pallas", "triton")
# What each backend declares on a GPU (the modules' own declarations).
GPU_FEATURES = {
    "reference": frozenset({Feature.DIFFERENTIABLE}),
    "native": frozenset({Feature.IN_PLACE}),
    "pallas": frozenset({Feature.IN_PLACE, Feature.SKIP_NONFINITE, Feature.GIVEN_RATIOS}),
    "triton": frozenset({Feature.IN_PLACE, Feature.SKIP_NONFINITE}),
}


def _stand_ins(monkeypatch, missing: set[str], devices: int = 1) -> None:
    monkeypatch.setattr(_sharded, "needed", lambda: devices > 1)
    for name in NAMES:
        why = "missing here" if name in missing else None
        stand_in = types.SimpleNamespace(
            name=name,
            unavailable=lambda platform, why=why: why,
            features=lambda platform, name=name: GPU_FEATURES[name],
        )
        monkeypatch.setitem(_dispatch._LOADED, name, stand_in)


@pytest.mark.parametrize(
    "missing, want",
    [
        (set(), "native"),  # the CUDA handler built: fastest of the measured, quickest to compile
        ({"native"}, "pallas"),
        ({"native", "pallas"}, "triton"),
        ({"native", "pallas", "triton"}, "reference"),
    ],
)
def test_gpu_order(monkeypatch, missing, want):
    _stand_ins(monkeypatch, missing)
    assert _dispatch.resolve("auto", platform="gpu").name == want


def test_cpu_and_tpu_order(monkeypatch):
    _stand_ins(monkeypatch, set())
    assert _dispatch.resolve("auto", platform="cpu").name == "native"
    assert _dispatch.resolve("auto", platform="tpu").name == "reference"
    _stand_ins(monkeypatch, {"native"})
    assert _dispatch.resolve("auto", platform="cpu").name == "reference"


@pytest.mark.parametrize(
    "missing, want",
    [(set(), "pallas"), ({"pallas"}, "reference")],
)
def test_gpu_order_on_several_devices_takes_only_shard_by_shard_backends(
    monkeypatch, missing, want
):
    """Sharded params reach a backend without GIVEN_RATIOS whole (XLA gathers a
    custom call's operands), so "auto" passes over native and triton there."""
    _stand_ins(monkeypatch, missing, devices=8)
    assert _dispatch.resolve("auto", platform="gpu").name == want


def test_the_stand_ins_declare_what_the_backends_declare(monkeypatch):
    """GPU_FEATURES above are the real backends' declarations for a GPU."""
    from lars.kernels import native, pallas, triton

    assert pallas.FEATURES == GPU_FEATURES["pallas"]
    assert triton.FEATURES == GPU_FEATURES["triton"]
    assert _dispatch.get("reference").features("gpu") == GPU_FEATURES["reference"]
    # As where its CUDA handler is loaded (this machine may have none).
    monkeypatch.setattr(native.library, "unavailable", lambda platform: None)
    assert native._features("gpu") == GPU_FEATURES["native"]
