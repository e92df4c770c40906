"""The digits example: exact resume from NumPy checkpoints, and the command line end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Some packages (saiunit) install an unrelated top-level ``examples`` namespace
# package into site-packages; the repository's own must win.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if getattr(sys.modules.get("examples"), "__file__", "") is None:
    del sys.modules["examples"]

pytest.importorskip("flax")  # an optional dependency (the demo and test extras)
from flax import nnx  # noqa: E402

from examples import training  # noqa: E402
from examples.digits_experiment import Runner, RunSpec  # noqa: E402
from examples.models import SmallResNet  # noqa: E402

WIDTHS = (4, 8)


def _data(n: int = 96, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _fresh(optimizer: str, seed: int, total_steps: int):
    """A fresh model, optimizer, jitted step and state (nothing shared between calls)."""
    schedule = training.warmup_poly_schedule(2.0, total_steps, 2)
    tx = training.make_optimizer(optimizer, schedule, weight_decay=5e-4, trust_coefficient=0.01)
    model = SmallResNet(widths=WIDTHS, rngs=nnx.Rngs(seed))
    graphdef, _, state = training.split_model(model, tx)
    return training.make_train_step(graphdef, tx), state


def _steps(step, state, x, y, first: int, count: int, batch: int = 32):
    for t in range(first, first + count):
        idx = training.epoch_batches(len(x), batch, seed=0, epoch=t)[0]
        state, _ = step(state, x[idx], y[idx])
    return state


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_resume_from_checkpoint_is_bitwise_identical(optimizer, tmp_path):
    k, m = 3, 4
    x, y = _data()
    step, state = _fresh(optimizer, seed=0, total_steps=k + m)
    straight = _steps(step, state, x, y, 0, k + m)

    step, state = _fresh(optimizer, seed=0, total_steps=k + m)
    state = _steps(step, state, x, y, 0, k)
    training.save_checkpoint(tmp_path / "ckpt.npz", state, {"step": k})
    del step, state
    # Restore into fresh objects, initialised differently, so nothing carries over.
    step, template = _fresh(optimizer, seed=123, total_steps=k + m)
    restored, meta = training.load_checkpoint(tmp_path / "ckpt.npz", template)
    assert meta == {"step": k}
    resumed = _steps(step, restored, x, y, k, m)

    _assert_bitwise_equal(straight.params, resumed.params)
    _assert_bitwise_equal(straight.batch_stats, resumed.batch_stats)
    _assert_bitwise_equal(straight.opt_state, resumed.opt_state)
    # The step count travels with the optimizer state.
    assert int(optax.tree_utils.tree_get(resumed.opt_state, "count")) == k + m
    # And training did move the parameters (a resume of a no-op would pass too).
    _, initial = _fresh(optimizer, seed=0, total_steps=k + m)
    leaves = zip(jax.tree.leaves(initial.params), jax.tree.leaves(resumed.params), strict=True)
    moved = [not np.array_equal(a, b) for a, b in leaves]
    assert all(moved)


@pytest.mark.slow
def test_runner_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch):
    x, y = _data(64)
    spec = RunSpec("lars", 32, seed=1, epochs=5, peak_lr=2.0, widths=WIDTHS, warmup_epochs=1)

    def runner(folder, resume):
        return Runner(x, y, x[:32], y[:32], ckpt_dir=folder, ckpt_every=2, resume=resume,
                      progress=False)  # fmt: skip

    straight = runner(tmp_path / "a", resume=False).run(spec)

    import examples.digits_experiment as experiment

    real_epoch = experiment.train_epoch

    def interrupted(step, state, x, y, batch_size, seed, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(step, state, x, y, batch_size, seed, epoch)

    monkeypatch.setattr(experiment, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path / "b", resume=False).run(spec)
    monkeypatch.setattr(experiment, "train_epoch", real_epoch)
    _, meta = training.load_checkpoint(
        tmp_path / "b" / f"{spec.name}.npz", runner(tmp_path / "c", False).build(spec)[1]
    )
    assert meta["epoch"] == 2
    resumed = runner(tmp_path / "b", resume=True).run(spec)

    assert resumed.history == straight.history
    like = runner(tmp_path / "c", False).build(spec)[1]
    a, _ = training.load_checkpoint(tmp_path / "a" / f"{spec.name}.npz", like)
    b, _ = training.load_checkpoint(tmp_path / "b" / f"{spec.name}.npz", like)
    _assert_bitwise_equal(a, b)


@pytest.mark.slow
def test_checkpoint_for_another_model_is_refused(tmp_path):
    _, state = _fresh("lars", 0, 10)
    training.save_checkpoint(tmp_path / "c.npz", state, {})
    tx = training.make_optimizer("lars", 0.1)
    _, _, other = training.split_model(SmallResNet(widths=(4, 8, 16), rngs=nnx.Rngs(0)), tx)
    with pytest.raises(ValueError, match="arrays"):
        training.load_checkpoint(tmp_path / "c.npz", other)
    _, _, wider = training.split_model(SmallResNet(widths=(4, 12), rngs=nnx.Rngs(0)), tx)
    with pytest.raises(ValueError, match="expected"):
        training.load_checkpoint(tmp_path / "c.npz", wider)


def test_epoch_batches_are_a_reproducible_permutation():
    batches = training.epoch_batches(10, 3, seed=5, epoch=2)
    assert [len(b) for b in batches] == [3, 3, 3]  # the incomplete batch is dropped
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 9 and flat.max() < 10
    again = training.epoch_batches(10, 3, seed=5, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = training.epoch_batches(10, 3, seed=5, epoch=3)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        training.epoch_batches(10, 11, seed=0, epoch=0)


def test_schedule_warms_up_then_decays_to_zero():
    s = training.warmup_poly_schedule(4.0, total_steps=10, warmup_steps=2, power=2.0)
    lrs = np.array([float(s(t)) for t in range(11)])
    expected = [2.0, 4.0] + [4.0 * (1 - (t - 2) / 8) ** 2 for t in range(2, 11)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    with pytest.raises(ValueError):
        training.warmup_poly_schedule(1.0, total_steps=5, warmup_steps=6)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.make_optimizer("adam", 0.1)


@pytest.mark.slow
def test_command_line_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [
        sys.executable, "-m", "examples.digits", "--quick", "--epochs", "2",
        "--batch-sizes", "256", "--widths", "4,8", "--image-size", "8",
        "--out", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt"), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for opt in ("sgd", "lars"):
        assert re.search(rf"{opt} batch\s+256 seed 0: test accuracy \d+\.\d%", out), out
    assert "| 256 | 5 |" in out  # the table, printed: 1437 // 256 = 5 steps per epoch
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| batch size | steps/epoch |" in table and "| 256 | 5 |" in table
    for name in ("summary.csv", "runs.csv", "accuracy_vs_batch.png", "curves_full_batch.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(list((tmp_path / "ckpt").rglob("*.npz"))) == 2


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_command_line_help_and_bad_input():
    done = run_module("examples.digits", "--help")
    assert done.returncode == 0 and "--quick" in done.stdout and "--resume" in done.stdout
    bad = run_module("examples.digits", "--batch-sizes", "0")
    assert bad.returncode == 2 and "batch size must be >= 1" in bad.stderr


def test_resnet50_step_help_and_bad_input():
    # The benchmark itself needs minutes on a CPU even at a tiny size; its options are checked.
    done = run_module("examples.resnet50_step", "--help")
    assert done.returncode == 0 and "--image-size" in done.stdout and "--batch" in done.stdout
    bad = run_module("examples.resnet50_step", "--image-size", "16")
    assert bad.returncode == 2 and "--image-size must be >= 32" in bad.stderr
