"""``backend="auto"``: the order it tries backends in on each platform.

The backends' own availability checks are replaced by stand-ins, so the order
is checked on any machine; the order itself is a measurement (bench/results/).
"""

from __future__ import annotations

import types

import pytest

from lars import _dispatch

NAMES = ("reference", "native", "pallas", "triton")


def _stand_ins(monkeypatch, missing: set[str]) -> None:
    for name in NAMES:
        why = "missing here" if name in missing else None
        stand_in = types.SimpleNamespace(name=name, unavailable=lambda platform, why=why: why)
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
