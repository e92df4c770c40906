"""Tests of the benchmark harness in bench/: workloads, counting, and the quick run.

No timing is asserted: the figures depend on the machine and its load. What is
checked is what the harness claims about its inputs (shapes, bytes, launches)
and that a quick run writes every row and column it promises.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# bench/ is a folder of the source tree, not an installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lars  # noqa: E402
from bench import cli, hlo, measure, report, steps, workloads  # noqa: E402


def _bottleneck_resnet_params(blocks: list[int]) -> int:
    """Parameter count of a bottleneck ResNet, written out independently."""
    total = 7 * 7 * 3 * 64 + 2 * 64
    cin = 64
    for width, n in zip([64, 128, 256, 512], blocks, strict=True):
        for b in range(n):
            total += cin * width + 2 * width
            total += 9 * width * width + 2 * width
            total += width * 4 * width + 2 * 4 * width
            if b == 0:
                total += cin * 4 * width + 2 * 4 * width
            cin = 4 * width
    return total + 2048 * 1000 + 1000


def test_resnet50_parameter_set():
    shapes = workloads.RESNET50.shapes
    convs = [s for s in shapes if len(s) == 4]
    vectors = [s for s in shapes[:-2] if len(s) == 1]
    assert len(shapes) == 161
    assert len(convs) == 53
    assert len(vectors) == 106
    assert shapes[0] == (7, 7, 3, 64)  # HWIO
    assert (3, 3, 512, 512) in convs
    assert (1, 1, 1024, 2048) in convs  # the last stage's projection shortcut
    assert shapes[-2:] == ((2048, 1000), (1000,))
    # Each conv kernel is followed by its BatchNorm scale and offset.
    for i, s in enumerate(shapes[:-2]):
        if len(s) == 4:
            assert shapes[i + 1] == shapes[i + 2] == (s[3],)
    assert workloads.RESNET50.n_params == _bottleneck_resnet_params([3, 4, 6, 3])
    assert workloads.RESNET50.n_params == 25_557_032  # torchvision's resnet50


def test_resnet18_and_transformer_parameter_sets():
    assert workloads.RESNET18.n_arrays == 62
    assert workloads.RESNET18.n_params == 11_689_512  # torchvision's resnet18
    d, layers = 768, 12
    per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert workloads.TRANSFORMER.n_params == layers * per_layer + 2 * d
    assert workloads.TRANSFORMER.n_arrays == 12 * layers + 2


def test_sweep_and_small_workloads():
    sizes = [w.n_params for w in workloads.full_workloads() if w.group == "sweep"]
    assert min(sizes) == 1_000 and max(sizes) == 64_000_000
    small = workloads.small_arrays_workload(1000, 1000)
    assert small.n_arrays == 1000 and small.n_params == 1_000_000


def test_select_by_name_and_group():
    full = workloads.full_workloads()
    picked = workloads.select(full, "resnet50,sweep")
    assert picked[0].name == "resnet50"
    assert {w.group for w in picked[1:]} == {"sweep"}
    assert workloads.select(full, None) == full
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.select(full, "resnet51")


def test_bytes_per_param():
    # read w, g, v and write w, v: 5 x 4 B, or 4 + 2 + 4 + 4 + 4 B with bf16 grads
    assert measure.bytes_per_param("fp32") == 20
    assert measure.bytes_per_param("bf16-grads") == 18


SYNTHETIC_HLO = """\
HloModule m, entry_computation_layout={(f32[8]{0})->(f32[8]{0}, f32[])}

%fused_a (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%body (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %f1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_a
  ROOT %f2 = f32[8]{0} fusion(%f1), kind=kLoop, calls=%fused_a
}

ENTRY %main (a: f32[8]) -> (f32[8], f32[]) {
  %a = f32[8]{0} parameter(0)
  %c = f32[] constant(1)
  %f = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_a
  %k = (f32[8]{0}, f32[]) custom-call(%f, %c), custom_call_target="kernel"
  %g = f32[8]{0} get-tuple-element(%k), index=0
  %b = f32[8]{0} bitcast(%g)
  %w = f32[8]{0} call(%b), to_apply=%body
  %s = f32[] reduce(%w, %c), dimensions={0}, to_apply=%add
  ROOT %t = (f32[8]{0}, f32[]) tuple(%w, %s)
}
"""


def test_count_launches_on_hlo_text():
    # fusion + custom-call + the called computation's 2 fusions + reduce = 5;
    # parameter, constant, get-tuple-element, bitcast and tuple launch nothing.
    assert hlo.count_launches(SYNTHETIC_HLO) == 5
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.count_launches("HloModule m\n")


def test_count_launches_on_a_compiled_program():
    compiled = jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0).lower(jnp.ones(1000)).compile()
    assert hlo.count_launches(compiled.as_text()) == 1  # one elementwise fusion


def test_copy_floor_reads_and_writes_the_buffer_once():
    nbytes = 8_000_000
    runner = steps.copy_runner(nbytes)
    (x,) = runner.carry
    assert x.nbytes == nbytes // 2
    if not math.isnan(runner.bytes_xla):
        assert runner.bytes_xla == pytest.approx(nbytes, rel=1e-3)
    assert runner.launches == 1
    runner.run(2)
    assert x.is_deleted()  # donated: written in place
    np.testing.assert_array_equal(np.asarray(runner.carry[0]), 1.0)


def test_agreement_check_measures_the_update():
    w = workloads.sweep_workload(1000)
    params0 = measure.host_arrays(w.shapes, np.float32, 0.05, 0.0)
    grads = jax.device_put(measure.host_arrays(w.shapes, np.float32, 1e-3, 0.5))
    runner = steps.lars_runner(steps.OPTAX, jax.device_put(params0), grads)
    runner.run(1)
    update = steps.first_update(runner, params0)
    assert np.max(np.abs(update[0])) > 0
    assert steps.rel_diff(runner, params0, update) == 0.0
    # An update 1.5 times optax's is off by 0.5 / 1.5 of its size.
    scaled = [1.5 * u for u in update]
    assert steps.rel_diff(runner, params0, scaled) == pytest.approx(1 / 3, rel=1e-2)


def test_looped_runs_the_step_k_times_in_one_call():
    def step(x, v, c):
        return x * c + v, v + 1.0

    x, v = jax.jit(steps.looped(step, 2, 3))(jnp.float32(2.0), jnp.float32(0.5), jnp.float32(3.0))
    want_x, want_v = 2.0, 0.5
    for _ in range(3):
        want_x, want_v = want_x * 3.0 + want_v, want_v + 1.0
    assert (float(x), float(v)) == (want_x, want_v) == (65.5, 3.5)


LOOP_HLO = """\
HloModule m

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8]{0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %k = f32[8]{0} custom-call(%x), custom_call_target="kernel"
  %y = f32[8]{0} fusion(%k), kind=kLoop, calls=%fused_a
  ROOT %r = (s32[], f32[8]{0}) tuple(%next, %y)
}

%loop (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %c = f32[8]{0} copy(%a)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]{0}) tuple(%z, %c)
  %l = (s32[], f32[8]{0}) call(%t), to_apply=%loop
  ROOT %o = f32[8]{0} get-tuple-element(%l), index=1
}
"""


def test_count_loop_launches_counts_one_step():
    # The body's counter add, custom call and fusion; not the copy before the loop.
    assert hlo.count_loop_launches(LOOP_HLO, 4) == 3
    assert hlo.count_launches(LOOP_HLO) == 2  # the copy and the call's while
    # Unrolled (no while): the ENTRY's launches over the steps, rounded up.
    assert hlo.count_loop_launches(SYNTHETIC_HLO, 2) == 3
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.count_loop_launches("HloModule m\n", 2)
    # On a compiled loop of the copy step: its fusion and the counter.
    x, c, d = jnp.ones(1000), jnp.float32(1.0), jnp.float32(0.0)
    text = jax.jit(steps.looped(steps.copy_step, 1, 4)).lower(x, c, d).compile().as_text()
    assert hlo.count_loop_launches(text, 4) == 2


def test_loop_trip_count_is_read_from_the_outer_whiles_backend_config():
    # The synthetic loop has no backend config: no known trip count.
    assert hlo.loop_trip_count(LOOP_HLO) is None
    assert hlo.loop_trip_count(SYNTHETIC_HLO) is None  # no while at all
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.loop_trip_count("HloModule m\n")
    # XLA's CPU compiler annotates a fori_loop with a static bound, as its GPU
    # compiler does (bench.gpu_compile checks the H200's).
    x, c, d = jnp.ones(1000), jnp.float32(1.0), jnp.float32(0.0)
    text = jax.jit(steps.looped(steps.copy_step, 1, 7)).lower(x, c, d).compile().as_text()
    assert hlo.loop_trip_count(text) == 7
    # A loop whose end is only known at run time has none.
    n = jnp.int32(7)
    dynamic = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, y: y * 2.0, x))
    assert hlo.loop_trip_count(dynamic.lower(x, n).compile().as_text()) is None


def test_measure_with_steps_per_call_times_each_step_of_the_loop():
    work = workloads.small_arrays_workload(3, 257)
    settings = measure.Settings(
        warmup=0, rounds=3, min_sample_s=0.0, budget_s=5.0, settle_s=0.0, steps_per_call=3
    )
    rows = {r["backend"]: r for r in measure.measure(work, "fp32", ["native:apply"], settings)}
    assert rows["optax"]["steps_per_call"] == rows["native:apply"]["steps_per_call"] == 3
    assert rows["copy"]["steps_per_call"] == 1
    # The copy in the same loop, timed per copy, beside the copy alone.
    assert rows["copy-loop"]["steps_per_call"] == 3 and rows["copy-loop"]["median_ms"] > 0
    assert rows["copy-loop"]["launches"] >= 1
    # The floor is the faster copy; every row's ratio is taken against it.
    floor_ms = min(rows["copy"]["median_ms"], rows["copy-loop"]["median_ms"])
    for r in rows.values():
        assert r["floor_ms"] == floor_ms
        assert r["frac_of_floor"] == pytest.approx(floor_ms / r["median_ms"], rel=1e-12)
    assert rows["native:apply"]["steps_per_sample"] % 3 == 0
    # Three steps' updates in the first call, against optax's three.
    assert rows["native:apply"]["rel_diff_vs_optax"] < 1e-4
    assert math.isnan(rows["native:apply"]["bytes_xla"])
    assert rows["native:apply"]["launches"] >= 1
    assert rows["native:apply"]["temp_bytes"] < 4096


def test_measure_compiles_several_at_once_with_the_same_rows():
    """compile_workers > 1: every row compiled (in threads) and timed, in the same order."""
    work = workloads.small_arrays_workload(3, 257)
    settings = measure.Settings(
        warmup=0, rounds=3, min_sample_s=0.0, budget_s=5.0, settle_s=0.0, compile_workers=3
    )
    names = ["reference", "native:apply", "no-such-backend"]
    rows = measure.measure(work, "fp32", names, settings)
    assert [r["backend"] for r in rows] == ["optax", *names, "copy"]
    by = {r["backend"]: r for r in rows}
    for name in ("optax", "reference", "native:apply", "copy"):
        assert by[name]["median_ms"] > 0 and by[name]["compile_s"] > 0, name
    assert by["reference"]["rel_diff_vs_optax"] < 1e-5
    assert by["native:apply"]["rel_diff_vs_optax"] < 1e-5
    # A backend that fails to lower is a note, not an abort.
    assert by["no-such-backend"]["note"].startswith("compile failed")
    assert "median_ms" not in by["no-such-backend"]


def test_measure_skips_by_the_compile_estimate_before_lowering(monkeypatch):
    """A backend whose estimated compile exceeds max_compile_s is never lowered."""
    from bench import steps

    lowered = []
    real = steps.lars_program

    def spy(name, *args, **kwargs):
        lowered.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(steps, "lars_program", spy)
    work = workloads.small_arrays_workload(2, 65)
    settings = measure.Settings(
        warmup=0,
        rounds=3,
        min_sample_s=0.0,
        budget_s=5.0,
        settle_s=0.0,
        compile_workers=2,
        max_compile_s=1.0,
    )
    history = measure.History(compile_ratio={"reference": 1e9})
    rows = {
        r["backend"]: r for r in measure.measure(work, "fp32", ["reference"], settings, history)
    }
    assert lowered == ["optax"]
    assert rows["reference"]["note"].startswith("skipped: compiling would take about")


def test_table_and_markdown_show_skipped_rows():
    rows = [
        {"workload": "w", "group": "model", "dtype": "fp32", "backend": "optax", "median_ms": 2.0},
        {"workload": "w", "group": "model", "dtype": "fp32", "backend": "x", "note": "skipped"},
        {"workload": "w", "group": "model", "dtype": "fp32", "backend": "copy", "median_ms": 1.0},
    ]
    text = report.format_table(rows)
    assert "skipped" in text and text.count("\n") == 4
    env = {k: "v" for k in [*report.ENV_COLUMNS, "os", "command"]}
    assert "| w | fp32 | x |" in report.format_markdown(rows, env)


def test_cli_rejects_a_loop_of_no_steps(tmp_path, capsys):
    assert cli.main(["--steps-per-call", "0", "--out", str(tmp_path), "--quick"]) == 2
    assert "--steps-per-call" in capsys.readouterr().err


def test_cli_rejects_unknown_names(tmp_path, capsys):
    assert cli.main(["--backends", "no-such-backend", "--out", str(tmp_path)]) == 2
    assert "not available" in capsys.readouterr().err
    assert cli.main(["--workloads", "no-such-workload", "--out", str(tmp_path)]) == 2
    assert cli.main(["--dtypes", "fp8", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_quick_run_writes_every_row_and_column(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        header = f.readline().strip().split(",")
    assert tuple(header) == report.COLUMNS
    rows = report.read_csv(out / "results.csv")

    backends = lars.available_backends()
    backends += steps.in_place_rows(backends)
    assert "native:apply" in backends  # the in-place step has its own row
    expected = {
        (w.name, b, d)
        for w in workloads.quick_workloads()
        for b in [steps.OPTAX, *backends, steps.COPY]
        for d in measure.DTYPES
    }
    got = [(r["workload"], r["backend"], r["dtype"]) for r in rows]
    assert len(got) == len(set(got)), "a workload x backend x dtype appears twice"
    assert set(got) == expected
    assert {r["backend"] for r in rows} >= set(backends)

    for r in rows:
        for column in report.ENV_COLUMNS:
            assert r[column], f"{column} is empty"
        assert int(r["bytes_moved"]) == int(r["n_params"]) * measure.bytes_per_param(r["dtype"])
        if r["backend"] in (steps.OPTAX, steps.COPY):  # the baselines always run
            assert float(r["median_ms"]) > 0 and int(r["samples"]) >= 1
            assert float(r["compile_s"]) > 0 and int(r["launches"]) >= 1
        if r["backend"] == steps.OPTAX:
            assert float(r["speedup_vs_optax"]) == 1.0
        if r["backend"] == steps.COPY:  # one step a call: the copy is the floor
            assert float(r["frac_of_copy"]) == float(r["frac_of_floor"]) == 1.0
        if not r["median_ms"]:
            assert r["note"], "a row without figures must say why"
    assert (out / "results.md").read_text().startswith("# LARS step benchmark")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "sweep_gbps.png").stat().st_size > 0
        assert (out / "sweep_copy_fraction.png").stat().st_size > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native CPU handler's variants")
def test_native_variants_prints_every_variant(tmp_path):
    from lars.kernels import native

    if native.BACKEND.unavailable("cpu") is not None:
        pytest.skip("the native CPU library is not built")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.native_variants",
            "--workload",
            "array-250k",
            "--threads",
            "2,1",
            "--rounds",
            "2",
            "--settle",
            "0",
            "--knobs",
            "schedule=1,cache_bytes=0",
            "--after",
            "--loop",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("  ")[0].strip(): line for line in proc.stdout.splitlines()}
    for t in (2, 1):
        for name in (
            "apply",
            "call",
            "update-only",
            "norms-only",
            "call t={t} schedule=1,cache_bytes=0",
        ):
            key = name.format(t=t) if "{t}" in name else f"{name} t={t}"
            assert key in rows, proc.stdout
            # median, p25, p75, min, x copy, min x, GB/s, handler, h min, outside,
            # before, after (the last three add up to the outside time)
            figures = [float(x) for x in rows[key][len(key) :].split()]
            assert len(figures) == 12 and figures[0] > 0 and figures[7] > 0
            assert figures[10] > 0 and figures[11] > 0
            assert abs(figures[10] + figures[11] - figures[9]) < 0.3 * figures[9] + 0.02
        # --loop 3: three steps in one jitted loop, the time a step (no handler columns)
        key = f"loop t={t} (3 in one jit)"
        assert key in rows, proc.stdout
        figures = [float(x) for x in rows[key][len(key) :].split()]
        assert len(figures) == 7 and all(x > 0 for x in figures[:4]), rows[key]
    # The loop carries params and momentum in place: no temporary of their size
    # (array-250k: 1 MB of params), at most the loop counter's copy.
    loops = [line for line in proc.stdout.splitlines() if line.startswith("# loop t=")]
    assert len(loops) == 2, proc.stdout
    for line in loops:
        assert float(line.split("temp ")[1].split()[0]) < 250_000, line
        assert int(line.split(": ")[1].split()[0]) <= 1, line
    assert "copy (XLA x*c+d)" in rows and "dispatch (no-op step)" in rows
    notes = [line for line in proc.stdout.splitlines() if line.startswith("# apply t=")]
    assert len(notes) == 2 and all(" 0 copy ops" in line for line in notes), proc.stdout
    assert "jax.jit(optax.lars)" in rows  # --after times optax too
    after = proc.stdout.split("# after: the apply t=2 step right after")[1].splitlines()[2:]
    names = [line.split("  ")[0].strip() for line in after]
    assert names == [
        "another apply t=2 step",
        "the copy",
        "an optax step",
        "an optax step, then 2 ms",
        "an optax step, then 20 ms",
    ], proc.stdout
    for line, name in zip(after, names, strict=True):
        figures = [float(x) for x in line[len(name) :].split()]  # step, handler, other threads
        assert len(figures) == 3 and figures[0] >= figures[1] > 0 and figures[2] >= 0


def test_cpu_stream_probe_builds_and_prints_every_table(tmp_path):
    """bench/cpu_stream_probe.cc builds with the command at its top; where the
    processor has AVX-512 it runs one round and prints every table."""
    import shutil

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the probe")
    exe = tmp_path / "cpu_stream_probe"
    build = subprocess.run(
        [compiler, "-O2", "-mavx512f", "-pthread", "-o", str(exe), "bench/cpu_stream_probe.cc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f" not in flags:
        return  # built; it cannot run here
    run = subprocess.run([str(exe), "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert sum("median" in line for line in lines) == 9, run.stdout
    rereads = [line for line in lines if "MiB" in line and "array" not in line]
    assert len(rereads) == 8, run.stdout
    parts = lines[lines.index(next(x for x in lines if x.startswith("threads"))) + 1 :]
    rows = [line.split() for line in parts]
    assert [(r[0], r[1]) for r in rows] == [(t, p) for t in "12" for p in "124"], run.stdout
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), run.stdout


def test_bench_readme_explains_every_column_of_results_csv():
    text = (ROOT / "bench" / "README.md").read_text()
    section = text.split("## Columns of results.csv", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])
    }
    assert set(report.COLUMNS) <= documented, set(report.COLUMNS) - documented
