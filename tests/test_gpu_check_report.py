"""bench.gpu_check_report: the GPU check's Markdown report and short table."""

from __future__ import annotations

import pytest

from bench import gpu_check_report


def test_the_report_names_failures_and_timing_rows():
    doc = {
        "environment": {"device": "test"},
        "seconds": 3.0,
        "steps": {
            "smoke": {"status": "ok", "seconds": 1.0, "checks": [{"case": "a", "ok": True}]},
            "correctness": {
                "status": "fail",
                "seconds": 1.0,
                "checks": [{"case": "native/apply/fp32/defaults", "ok": False, "detail": "x"}],
            },
            "timing-model": {
                "status": "ok",
                "rows": [
                    {
                        "workload": "w",
                        "dtype": "fp32",
                        "backend": "native",
                        "median_ms": 2.0,
                        "frac_of_copy": 0.5,
                        "speedup_vs_optax": 3.0,
                        "launches": 1,
                        "note": "",
                    }
                ],
            },
            "ncu": {"status": "skipped", "reason": "ncu not found"},
        },
    }
    md = gpu_check_report.markdown(doc)
    assert "native/apply/fp32/defaults" in md and "ncu not found" in md
    table = gpu_check_report.short_table(doc)
    assert "FAILED correctness: native/apply/fp32/defaults" in table

    def x_floor(table: str) -> str:
        (line,) = [t for t in table.splitlines() if t.startswith("w ")]
        return line.split()[4]  # workload, grads, row, ms, x floor

    assert x_floor(table) == "2.00"  # 1 / frac_of_copy: twice the floor
    # Where the row has it, the floor is the faster of the copy and copy-loop.
    doc["steps"]["timing-model"]["rows"][0]["frac_of_floor"] = 0.25
    assert x_floor(gpu_check_report.short_table(doc)) == "4.00"
    assert "| 2.000 | --- | - | - | 4.00 | 3.00 |" in gpu_check_report.markdown(doc)


def test_the_report_splits_an_in_place_step_into_fixed_costs_kernels_and_the_rest():
    def row(workload, backend, ms, dtype="fp32", spc=20):
        return {
            "workload": workload,
            "dtype": dtype,
            "backend": backend,
            "median_ms": ms,
            "steps_per_call": spc,
        }

    # One-element steps: 0.01 ms a step and 2 ms a call (0.11 ms at 20 a call, 0.02 at 200).
    doc = {
        "environment": {"device": "test"},
        "seconds": 3.0,
        "steps": {
            "timing-model": {
                "status": "ok",
                "rows": [
                    row("resnet50", "optax", 1.390),
                    row("resnet50", "native", 0.632),
                    {**row("resnet50", "native:apply", 0.290), "trace_busy_ms": 0.19},
                    row("resnet50", "native:apply", 0.5, dtype="bf16-grads"),
                    row("resnet50", "pallas:apply", 0.287),
                ],
            },
            "timing-overhead": {
                "status": "ok",
                "rows": [
                    row("resnet50-1elem", "native:apply", 0.11, spc=20),
                    row("resnet50-1elem", "native:apply", 0.02, spc=200),
                    row("resnet50-1elem", "pallas:apply", 0.05, spc=20),
                ],
            },
            "ncu": {
                "status": "ok",
                "forms": {
                    "native": {"form": "native", "kernel_time_ms_per_step": 0.186},
                    "pallas": {"form": "pallas", "reason": "ncu did not finish"},
                },
            },
        },
    }
    # ncu's figures of a form with its kernels by name (the H200's for native, ns):
    # three steps, and a setup kernel launched once that is not the step's.
    profiled = {
        "form": "native",
        "steps": 3,
        "kernel_time_ms_per_step": 0.221,
        "by_kernel": {
            "UpdateKernel": {"launches": 3, "gpu__time_duration.sum": 380_000.0},
            "SumsKernel": {"launches": 3, "gpu__time_duration.sum": 178_000.0},
            "loop_broadcast_fusion_12": {"launches": 1, "gpu__time_duration.sum": 8_000.0},
        },
    }
    assert gpu_check_report.step_kernel_ms(profiled) == pytest.approx(0.186)
    assert gpu_check_report.step_kernel_ms({"kernel_time_ms_per_step": 0.2}) == 0.2
    assert gpu_check_report.step_kernel_ms({"reason": "ncu did not finish"}) is None
    split = {r["row"]: r for r in gpu_check_report.time_split(doc)}
    assert set(split) == {"native:apply", "pallas:apply"}  # in place only
    native = split["native:apply"]
    assert native["step_ms"] == 0.290 and native["spc"] == 20  # fp32's, not bf16's
    assert native["fixed_ms"] == pytest.approx(0.01) and native["call_ms"] == pytest.approx(2.0)
    assert native["kernel_ms"] == 0.186 and native["rest_ms"] == pytest.approx(0.104)
    pallas = split["pallas:apply"]  # one loop length: its time, no call cost
    assert pallas["fixed_ms"] == 0.05 and pallas["call_ms"] is None
    assert pallas["kernel_ms"] is None and pallas["rest_ms"] is None
    md = gpu_check_report.markdown(doc)
    assert native["busy_ms"] == 0.19 and split["pallas:apply"]["busy_ms"] is None
    assert "| native:apply | 20 | 0.290 | 0.186 | 0.190 | 0.104 | 0.010 | 2.000 | 0.100 |" in md
    assert "| pallas:apply | 20 | 0.287 | - | - | - | 0.050 | - | - |" in md
    table = gpu_check_report.short_table(doc).split("in place")[1]
    assert "0.104" in table and "2.000" in table and "pallas:apply" in table


def test_the_report_shows_each_traced_rows_timeline_or_why_there_is_none():
    traced = {
        "workload": "resnet50",
        "dtype": "fp32",
        "backend": "native:apply",
        "median_ms": 0.29,
        "trace_steps": 300,
        "trace_events": 3.0,
        "trace_busy_ms": 0.19,
        "trace_span_ms": 0.28,
        "trace_idle_ms": 0.09,
        "trace_long_gaps": 2,
        "trace_long_gap_ms": 0.012,
        "trace_max_gap_ms": 1.8,
        "trace_wall_ms": 0.29,
        "trace_top": "UpdateKernel 0.1300 ms x1",
    }
    untraced = {**traced, "backend": "optax", "trace_note": "not traced: 85100 launches a call"}
    for key in [k for k in traced if k.startswith("trace_")]:
        del untraced[key]
    doc = {
        "environment": {"device": "test"},
        "seconds": 3.0,
        "steps": {"timing-model": {"status": "ok", "rows": [traced, untraced]}},
    }
    md = gpu_check_report.markdown(doc)
    assert "## The device's timeline" in md
    assert (
        "| resnet50 | fp32 | native:apply | 300 | 0.290 | 0.290 | 0.280 | 0.190 | 0.090 | 2 "
        "| 0.012 | 1.800 | 3.0 | UpdateKernel 0.1300 ms x1 |"
    ) in md
    assert "| resnet50 | fp32 | optax | - | 0.290 | - |" in md and "85100 launches" in md
    traced_part = gpu_check_report.short_table(doc).split("traced (fp32)")[1]
    (line,) = [t for t in traced_part.splitlines() if "native:apply" in t]
    assert line.split()[2:] == ["0.290", "0.280", "0.190", "0.012", "2"]
    # Without traced rows, no table.
    del doc["steps"]["timing-model"]["rows"][:]
    assert "timeline" not in gpu_check_report.markdown(doc)


def test_the_targets_say_which_rows_met_them_and_what_the_nearest_missed_by():
    """bench.gpu_check_targets on made-up rows, the figures worked by hand."""
    from bench import gpu_check_targets as T

    def row(backend, dtype="fp32", workload="resnet50", group="model", **figures):
        return {"workload": workload, "group": group, "dtype": dtype, "backend": backend,
                "median_ms": 1.0, **figures}  # fmt: skip

    model = [
        row("optax", launches=851, speedup_vs_optax=1.0, frac_of_floor=0.1),
        row("reference:apply", launches=3, speedup_vs_optax=9.0, frac_of_floor=0.9),
        # The loop's own launches: copy-loop's 3 less copy's 1.
        row("copy", launches=1, frac_of_floor=1.0),
        row("copy-loop", launches=3, frac_of_floor=1.0),
        # 5 launches less the loop's 2; 1 / 0.85 = 1.18x the floor.
        row("native-fused:apply", launches=5, speedup_vs_optax=4.8, frac_of_floor=0.85),
        # 7 - 2 = 5 launches: one too many.
        row("triton-2pass:apply", launches=7, speedup_vs_optax=5.0, frac_of_floor=0.9),
        row("native", launches=166, speedup_vs_optax=2.2, frac_of_floor=0.2),
        {**row("pallas:apply"), "median_ms": None, "note": "run failed"},  # not timed
        # bf16: nothing meets them; the nearest the floor is 1 / 0.5 = 2x.
        row("native:apply", "bf16-grads", launches=3, speedup_vs_optax=3.5, frac_of_floor=0.5),
        row("triton:apply", "bf16-grads", launches=4, speedup_vs_optax=2.9, frac_of_floor=0.4),
    ]
    # The array: on the 28 bytes (fp32 grads) or 24 (bf16) a step must move, not the
    # floor's 20 or 18: 0.67 * 28 / 20 = 93.8%, 0.6 * 28 / 20 = 84%, 0.66 * 24 / 18 = 88%.
    array = [
        row("native:apply", workload="array-64M", group="sweep", launches=9, frac_of_floor=0.6),
        row("triton-2pass:apply", workload="array-64M", group="sweep", frac_of_floor=0.67),
        row("triton-2pass:apply", "bf16-grads", "array-64M", "sweep", frac_of_floor=0.66),
    ]
    doc = {
        "environment": {"device": "test"},
        "seconds": 1.0,
        "steps": {
            "timing-model": {"status": "ok", "rows": model},
            "timing-array": {"status": "ok", "rows": array},
        },
    }
    got = {(t["dtype"], t["row"]): t for t in T.targets(doc) if t["workload"] == "resnet50"}
    assert set(got) == {
        ("fp32", "native-fused:apply"),
        ("fp32", "triton-2pass:apply"),
        ("fp32", "native"),
        ("bf16-grads", "native:apply"),
        ("bf16-grads", "triton:apply"),
    }
    fused = got[("fp32", "native-fused:apply")]
    assert fused["launches"] == 3 and fused["x_floor"] == pytest.approx(1 / 0.85)
    assert fused["met"] and fused["bandwidth"] is None
    two = got[("fp32", "triton-2pass:apply")]
    assert (two["speedup"], two["floor"], two["launch"], two["met"]) == (True, True, False, False)
    assert got[("bf16-grads", "native:apply")]["launches"] == 3  # no copy-loop row for bf16
    verdicts = T.verdicts(doc)
    assert verdicts == [
        "MET resnet50 fp32: native-fused:apply: 4.80x optax (target 3), 1.18x the floor "
        "(target 1.25), 3 launches (target 4)",
        "MISSED resnet50 bf16-grads: nearest the floor native:apply: 3.50x optax (target 3), "
        "2.00x the floor (target 1.25), 3 launches (target 4)",
        "MET array-64M fp32: triton-2pass:apply: 94% of the copy's bandwidth on the 28 "
        "bytes a parameter it must move (target 90%; 1.49x the floor)",
        "MISSED array-64M bf16-grads: nearest the floor triton-2pass:apply: 88% of the "
        "copy's bandwidth on the 24 bytes a parameter it must move (target 90%; 1.52x the floor)",
    ]
    assert T.must_move("fp32") == (20, 28) and T.must_move("bf16-grads") == (18, 24)
    md = gpu_check_report.markdown(doc)
    assert "## Targets" in md
    line = "| timing-model | resnet50 | fp32 | triton-2pass:apply | 5.00x yes | 1.11x yes | 5 NO"
    assert line + " | - | NO |" in md
    line = "| timing-array | array-64M | fp32 | native:apply | - | 1.67x | 9 | 84% NO | NO |"
    assert line in md
    short = gpu_check_report.short_table(doc)
    assert all(v in short for v in verdicts)
    assert T.table({"steps": {}}) == [] and T.verdicts({"steps": {}}) == []
