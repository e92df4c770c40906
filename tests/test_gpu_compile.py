"""``bench.gpu_compile``'s checks and reports, with a stand-in compiler.

The compilation itself needs jax's CUDA plugin, which this environment does not
have: ``make gpu-compile`` runs it in its own (CI runs ``--quick``). Here the
rows are given launch counts, and the run must fail exactly where a count is
over its bound or a row does not compile.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from bench import gpu_compile


def _stand_in(
    monkeypatch,
    launches: dict[str, int],
    broken: tuple[str, ...] = (),
    unknown_trips: tuple[str, ...] = (),
) -> list:
    calls = []

    @contextlib.contextmanager
    def fake_h200():
        yield "sharding"

    def fake_compile(name, shapes, grad_dtype, sharding, steps_per_call):
        calls.append((name, steps_per_call))
        assert sharding == "sharding"
        if name in broken:
            raise ValueError(f"{name} does not lower\nsecond line")
        trips = None if name in unknown_trips or steps_per_call == 1 else steps_per_call
        return {
            "launches": launches.get(name, 1),
            "trip_count": trips,
            "temp_mb": 0.5,
            "compile_s": 0.1,
            "hlo": "x",
        }

    monkeypatch.setattr(gpu_compile, "h200", fake_h200)
    monkeypatch.setattr(gpu_compile, "compile_row", fake_compile)
    return calls


def test_quick_run_within_bounds_passes_and_reports(monkeypatch, tmp_path):
    calls = _stand_in(monkeypatch, dict(gpu_compile.LAUNCH_BOUNDS))
    assert gpu_compile.main(["--quick", "--out", str(tmp_path)]) == 0
    # The quick run: optax and every bounded row, in the timing loop only.
    assert [n for n, _ in calls] == ["optax", *gpu_compile.LAUNCH_BOUNDS]
    assert {k for _, k in calls} == {gpu_compile.LOOP_STEPS}
    report = json.loads((tmp_path / "gpu_compile.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert rows["native:apply"]["launches_loop"] == gpu_compile.LAUNCH_BOUNDS["native:apply"]
    assert all(r["ok"] for r in report["rows"])
    md = (tmp_path / "gpu_compile.md").read_text()
    assert "| resnet50 | fp32 | pallas:apply |" in md


def test_a_row_over_its_bound_fails_the_run(monkeypatch, tmp_path, capsys):
    over = dict(gpu_compile.LAUNCH_BOUNDS)
    over["native:apply"] += 1
    _stand_in(monkeypatch, over)
    assert gpu_compile.main(["--quick", "--out", str(tmp_path)]) == 1
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_compile.json").read_text())["rows"]}
    assert not rows["native:apply"]["ok"]
    assert [r for r, v in rows.items() if not v["ok"]] == ["native:apply"]
    assert "FAIL over its bound" in capsys.readouterr().out


def test_a_row_that_does_not_compile_fails_with_its_error(monkeypatch, tmp_path):
    _stand_in(monkeypatch, dict(gpu_compile.LAUNCH_BOUNDS), broken=("triton:apply",))
    assert gpu_compile.main(["--quick", "--out", str(tmp_path)]) == 1
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_compile.json").read_text())["rows"]}
    assert rows["triton:apply"]["error"] == "ValueError: triton:apply does not lower"
    assert "does not lower" in (tmp_path / "gpu_compile.md").read_text()


def test_a_loop_without_a_known_trip_count_fails_its_row(monkeypatch, tmp_path):
    """Without one the GPU runtime waits on the host for the condition every step."""
    _stand_in(monkeypatch, dict(gpu_compile.LAUNCH_BOUNDS), unknown_trips=("optax",))
    assert gpu_compile.main(["--quick", "--out", str(tmp_path)]) == 1
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_compile.json").read_text())["rows"]}
    assert [r for r, v in rows.items() if not v["ok"]] == ["optax"]
    assert rows["optax"]["error"] == "the loop's trip count is not known (None)"
    assert rows["native:apply"]["trip_count"] == gpu_compile.LOOP_STEPS


def test_the_loop_is_the_gpu_checks(monkeypatch):
    from bench import gpu_check

    assert gpu_compile.LOOP_STEPS == gpu_check.GPU_STEPS_PER_CALL


def test_full_run_compiles_every_form_both_ways(monkeypatch):
    calls = _stand_in(monkeypatch, {})
    assert gpu_compile.main([]) == 0
    names = {n for n, _ in calls}
    for form in gpu_compile.FORMS:
        assert {form, form + ":apply"} <= names
    # One step a call and the loop; ResNet-50 fp32 and bf16, the 64M array.
    assert len(calls) == 2 * 3 * (1 + 2 * len(gpu_compile.FORMS))


def test_without_the_cuda_plugin_it_says_what_to_install():
    # This environment's jaxlib has no CUDA plugin: no deviceless compilation.
    with pytest.raises(RuntimeError, match="jax-cuda13-plugin"), gpu_compile.h200():
        pass
