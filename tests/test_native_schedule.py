"""The native CPU step's schedule and tuning settings change no bit of the result.

The CPU handler's workers claim a large leaf's chunks in shares and update
the chunks they summed; it has tuning knobs for timing (``LarsNativeCpuTune``:
the share size, the earlier schedules and the cache size the lookahead one
counts on (``set_cpu_cache_bytes``), one pass alone, how many parts of a work
item its loops read side by side); every setting but one pass
alone and the norms' number of parts must give the bits of the default step,
with every thread count and on the float32, bfloat16-gradient and float64
paths. The norms' number of parts decides which elements each partial sum
adds: another number gives other bits, still deterministic and as close to a
float64 NumPy oracle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lars.contract import LarsConfig, StepInputs
from tests.native_cases import assert_bitwise, big_problem, config_of, spec_of

native = pytest.importorskip("lars.kernels.native")
if native.BACKEND.unavailable("cpu") is not None:
    pytest.skip("the native CPU library is not built", allow_module_level=True)
if jax.default_backend() != "cpu":
    pytest.skip("the CPU handler's settings", allow_module_level=True)

from lars.kernels.native import library  # noqa: E402


@contextlib.contextmanager
def tuned(name: str, value: int):
    assert library.cpu().LarsNativeCpuTune(name.encode(), value) == 0
    try:
        yield
    finally:
        assert library.cpu().LarsNativeCpuTune(name.encode(), -1) == 0


@contextlib.contextmanager
def cache_bytes(n: int | None):
    native.set_cpu_cache_bytes(n)
    try:
        yield
    finally:
        native.set_cpu_cache_bytes(None)


@contextlib.contextmanager
def lookahead(n: int):
    """The earlier schedule (updates queued behind a lookahead), counting on n bytes of cache."""
    with tuned("schedule", 1), cache_bytes(n):
        yield


def _step(cfg: LarsConfig, problem, threads: int):
    params, grads, momentum = problem
    spec = spec_of(cfg, params, grads, write_params=True, options=(("num_threads", threads),))
    return native.run(spec, StepInputs(params, grads, momentum, jnp.float32(0.1)))


def _problems():
    params, grads, momentum = big_problem()
    yield "fp32", (params, grads, momentum)
    yield "bf16-grads", (params, [g.astype(jnp.bfloat16) for g in grads], momentum)


@pytest.mark.parametrize("name", ["weight_decay", "everything"])
def test_cache_size_and_knobs_change_no_bit(name: str):
    cfg = config_of(name)
    for _, problem in _problems():
        want = _step(cfg, problem, 1)
        settings = [
            tuned("share_chunks", 2),  # the default schedule, larger shares
            tuned("share_chunks", 3),
            tuned("share_chunks", 1000),  # a leaf in one share: one worker sums and updates it
            lookahead(0),  # the earlier order, nothing fits: updates right behind the norms
            lookahead(3 << 20),  # some layers fit
            lookahead(1 << 40),  # everything fits
            tuned("schedule", 0),  # the earliest order: one large leaf later, first chunk first
            tuned("update_streams", 1),  # the update loop over each item in one stream
            tuned("update_streams", 2),
            tuned("update_streams", 8),
        ]
        for setting in settings:
            with setting:
                for threads in (1, 2, 3):
                    assert_bitwise(want, _step(cfg, problem, threads))


def test_float64_schedule_changes_no_bit():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        shapes = [(200_003,), (64,), (70_000,)]
        params = [jnp.asarray(rng.standard_normal(s)) for s in shapes]
        grads = [jnp.asarray(rng.standard_normal(s) * 0.1) for s in shapes]
        momentum = [jnp.zeros(s, jnp.float64) for s in shapes]
        cfg = config_of("everything")
        want = _step(cfg, (params, grads, momentum), 1)
        settings = (
            tuned("share_chunks", 3),
            lookahead(0),
            lookahead(1 << 40),
            tuned("schedule", 0),
            tuned("update_streams", 1),
            tuned("update_streams", 8),
        )
        for setting in settings:
            with setting:
                assert_bitwise(want, _step(cfg, (params, grads, momentum), 2))


def _sysfs_largest_data_cache() -> int | None:
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1].upper(), 1)
        digits = size[:-1] if size[-1].isalpha() else size
        best = max(best, int(digits) * scale)
    return best or None


def test_cache_size_is_read_from_the_system_and_can_be_set():
    detected = native.cpu_cache_bytes()
    assert detected > 0
    expected = _sysfs_largest_data_cache()
    if expected is not None:
        assert detected == expected
    elif hasattr(os, "sysconf") and "SC_LEVEL3_CACHE_SIZE" in os.sysconf_names:
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if l3 > 0:
            assert detected == l3
    with cache_bytes(12345):
        assert native.cpu_cache_bytes() == 12345
    assert native.cpu_cache_bytes() == detected


@pytest.mark.parametrize("bad", [-1, 1.5, "1M", True])
def test_set_cpu_cache_bytes_rejects_bad_values(bad):
    before = native.cpu_cache_bytes()
    with pytest.raises(ValueError, match="n must be"):
        native.set_cpu_cache_bytes(bad)
    assert native.cpu_cache_bytes() == before


def test_tuning_knobs_refuse_unknown_names_and_bad_values():
    tune = library.cpu().LarsNativeCpuTune
    assert tune(b"no_such_knob", 1) == -1
    assert tune(b"phases", 0) == -1
    assert tune(b"phases", 4) == -1
    assert tune(b"schedule", 3) == -1
    assert tune(b"schedule", -2) == -1
    for bad in (0, -2):
        assert tune(b"share_chunks", bad) == -1
    assert tune(b"cache_bytes", -2) == -1
    assert tune(b"prefetch", 64) == -1  # measured, no gain, not kept
    for bad in (0, 3, 8, -2):
        assert tune(b"sum_streams", bad) == -1
    for bad in (0, 3, 16, -2):
        assert tune(b"update_streams", bad) == -1


@pytest.mark.parametrize("sum_streams", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 17, 31, 32, 33, 127, 4097, 65_536, 65_537, 200_003])
def test_sum_streams_give_the_norms_and_the_same_bits_on_every_thread_count(sum_streams, n):
    """Every number of parts: the trust ratio from exact norms (float64 oracle,
    float32 tolerance), and the same bits with 1, 2 and 3 threads."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 0.01).astype(np.float32)
    cfg = LarsConfig(weight_decay=0.0, trust_coefficient=0.001, eps=0.0)
    problem = ([jnp.asarray(w)], [jnp.asarray(g)], [jnp.zeros((n,), jnp.float32)])
    with tuned("sum_streams", sum_streams):
        got = [_step(cfg, problem, threads) for threads in (1, 2, 3)]
    for other in got[1:]:
        assert_bitwise(got[0], other)
    w_norm = np.sqrt(np.sum(w.astype(np.float64) ** 2))
    g_norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    want = 0.001 * w_norm / g_norm
    np.testing.assert_allclose(float(got[0].trust_ratio[0]), want, rtol=2e-6)


def test_one_pass_alone_and_the_handler_clock():
    """phases=2 with the norms off gives ratios of 1 (the update with r = 1);
    phases=1 leaves params and momentum as they were. The handler's clock runs."""
    cfg = config_of("weight_decay")
    params, grads, momentum = big_problem()
    keep = [np.asarray(p).copy() for p in params]
    keep_v = [np.asarray(v).copy() for v in momentum]
    called = time.perf_counter_ns()
    with tuned("phases", 1):
        result = jax.block_until_ready(_step(cfg, (params, grads, momentum), 2))
    returned = time.perf_counter_ns()
    for got, want in zip(result.updates, keep, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    for got, want in zip(result.momentum, keep_v, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert native.last_step_seconds() > 0.0
    # The handler's start is on time.perf_counter_ns's clock (Linux).
    if sys.platform.startswith("linux"):
        start = native.last_step_start_ns()
        assert called < start < start + native.last_step_seconds() * 1e9 < returned
    with tuned("phases", 2):
        result = _step(cfg, (params, grads, momentum), 2)
    assert [float(r) for r in result.trust_ratio] == [1.0] * len(params)
    # The momentum with r = 1 (lr outside it), in float64 from the float32 inputs.
    assert not cfg.lr_inside_momentum
    for p, g, v, new in zip(keep, grads, keep_v, result.momentum, strict=True):
        p64, g64, v64 = (np.asarray(x, np.float64) for x in (p, g, v))
        expect = (g64 + cfg.weight_decay * p64) + cfg.momentum * v64
        np.testing.assert_allclose(np.asarray(new, np.float64), expect, rtol=1e-5, atol=1e-6)


_CONCURRENT = """
import threading
import jax, numpy as np
from lars.contract import StepInputs
from lars.kernels import native
from tests.native_cases import big_problem, config_of, spec_of
params, grads, momentum = big_problem()
cfg = config_of("everything")
def step(threads):
    spec = spec_of(cfg, params, grads, write_params=True, options=(("num_threads", threads),))
    return jax.block_until_ready(
        native.run(spec, StepInputs(params, grads, momentum, np.float32(0.1))))
want = [np.asarray(x) for x in jax.tree.leaves(step(1))]
bad = []
def worker():
    for _ in range(4):
        got = [np.asarray(x) for x in jax.tree.leaves(step(8))]
        if any(not np.array_equal(a, b) for a, b in zip(want, got)):
            bad.append(1)
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("mismatches", len(bad))
"""


def test_steps_at_once_on_a_busy_pool_finish_with_the_same_bits():
    """Four steps at once, each asking for 8 threads (more than XLA's pool has
    on a small machine): helpers start late or after their step is done, and
    workers find a layer's chunks claimed by others; no step waits for ever (a
    subprocess, so that a hang fails the test instead of stalling the run) and
    all give the bits of a one-thread step."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _CONCURRENT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mismatches 0" in proc.stdout, proc.stdout
