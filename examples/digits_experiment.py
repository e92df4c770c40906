"""One training run of the digits ResNet, resumable from NumPy checkpoints, and its cache."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from examples import training
from examples.models import SmallResNet


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run (and names its checkpoint).

    Attributes:
      optimizer: "sgd" or "lars".
      batch_size: Examples per step.
      seed: Seed of the initialisation and of the data order.
      epochs: Passes over the training set.
      peak_lr: Learning rate after warmup (already scaled for ``batch_size``).
      trust_coefficient: LARS's eta (unused by SGD).
      weight_decay: Coupled L2 decay on weights (not on biases or BatchNorm).
      momentum: Momentum of both optimizers.
      warmup_epochs: Epochs of linear warmup; polynomial (power 2) decay after.
      widths: Channels of the ResNet's stages.
      tag: Free-form label kept in the checkpoint name ("tune", "final", ...).
    """

    optimizer: str
    batch_size: int
    seed: int
    epochs: int
    peak_lr: float
    trust_coefficient: float = 0.001
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 5
    widths: tuple[int, ...] = (8, 16, 32)
    tag: str = "run"

    @property
    def name(self) -> str:
        """A file-name-safe identifier of the run."""
        lr = f"{self.peak_lr:.4g}"
        eta = f"_tc{self.trust_coefficient:g}" if self.optimizer == "lars" else ""
        return f"{self.tag}_{self.optimizer}_b{self.batch_size}_lr{lr}{eta}_s{self.seed}"

    def as_meta(self) -> dict:
        """The spec as a JSON-able dict (stored in checkpoints)."""
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    def without_seed(self) -> RunSpec:
        """The spec with seed 0: runs that differ only in seed share a compiled step."""
        return dataclasses.replace(self, seed=0)


@dataclasses.dataclass
class RunResult:
    """What a run produced: per-epoch history and its final numbers."""

    spec: RunSpec
    history: dict  # lists per epoch: train_loss, train_acc, test_loss, test_acc, lr
    diverged: bool
    seconds: float  # wall clock of the run's epochs (compilation included)
    cpu_seconds: float  # CPU time of the process over the same span (all threads)

    @property
    def final_test_acc(self) -> float:
        """Test accuracy after the last epoch."""
        return self.history["test_acc"][-1]

    @property
    def final_train_loss(self) -> float:
        """Mean training loss of the last epoch."""
        return self.history["train_loss"][-1]


@dataclasses.dataclass
class _Compiled:
    tx: object
    step: object
    evaluate: object
    schedule: object


class Runner:
    """Trains ``RunSpec``s on one data set, caching compiled steps across seeds.

    Args:
      x_train, y_train: Training images (N, H, W, C) and labels.
      x_eval, y_eval: The held-out images and labels the run is scored on.
      ckpt_dir: Where checkpoints go (one file per run).
      ckpt_every: Save a checkpoint every this many epochs (and at the end).
      resume: Continue from existing checkpoints (finished runs are reused).
      progress: Show a tqdm bar per run.
    """

    def __init__(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_eval: np.ndarray,
        y_eval: np.ndarray,
        *,
        ckpt_dir: str | Path,
        ckpt_every: int = 25,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        if ckpt_every < 1:
            raise ValueError(f"ckpt_every must be >= 1, got {ckpt_every}")
        self.x_train, self.y_train = jnp.asarray(x_train), jnp.asarray(y_train)
        self.x_eval, self.y_eval = jnp.asarray(x_eval), jnp.asarray(y_eval)
        self.n_train = len(x_train)
        self.ckpt_dir = Path(ckpt_dir)
        self.ckpt_every = ckpt_every
        self.resume = resume
        self.progress = progress
        self._compiled: dict[RunSpec, _Compiled] = {}
        self._eval: dict[tuple[int, ...], object] = {}

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps per epoch at ``batch_size`` (the incomplete last batch is dropped)."""
        return self.n_train // batch_size

    def build(self, spec: RunSpec) -> tuple[_Compiled, training.TrainState]:
        """A freshly initialised state for ``spec`` and its (cached) compiled functions."""
        model = SmallResNet(widths=spec.widths, rngs=nnx.Rngs(spec.seed))
        key = spec.without_seed()
        compiled = self._compiled.get(key)
        if compiled is None:
            spe = self.steps_per_epoch(spec.batch_size)
            schedule = training.warmup_poly_schedule(
                spec.peak_lr, spec.epochs * spe, min(spec.warmup_epochs, spec.epochs) * spe
            )
            tx = training.make_optimizer(
                spec.optimizer,
                schedule,
                momentum=spec.momentum,
                weight_decay=spec.weight_decay,
                trust_coefficient=spec.trust_coefficient,
            )
            graphdef, eval_graphdef, state = training.split_model(model, tx)
            evaluate = self._eval.get(spec.widths)
            if evaluate is None:
                evaluate = self._eval[spec.widths] = training.make_eval_fn(eval_graphdef)
            compiled = _Compiled(
                tx=tx,
                step=training.make_train_step(graphdef, tx),
                evaluate=evaluate,
                schedule=schedule,
            )
            self._compiled[key] = compiled
        else:
            _, _, state = training.split_model(model, compiled.tx)
        return compiled, state

    def checkpoint_path(self, spec: RunSpec) -> Path:
        """The checkpoint file of ``spec``."""
        return self.ckpt_dir / f"{spec.name}.npz"

    def run(self, spec: RunSpec) -> RunResult:
        """Trains ``spec`` (or resumes it), evaluating after every epoch.

        A run whose training loss becomes non-finite is stopped and marked
        diverged; it is scored as it stands (NaN logits count as wrong).

        Raises:
          ValueError: if a checkpoint to resume was written for another spec.
        """
        compiled, state = self.build(spec)
        history = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr")}
        start_epoch, seconds, cpu_seconds, diverged = 0, 0.0, 0.0, False
        path = self.checkpoint_path(spec)
        if self.resume and path.exists():
            state, meta = training.load_checkpoint(path, state)
            if meta["spec"] != spec.as_meta():
                raise ValueError(
                    f"checkpoint {path} was written for {meta['spec']}, not {spec.as_meta()}; "
                    "remove it or choose another checkpoint folder"
                )
            history, start_epoch = meta["history"], meta["epoch"]
            seconds, cpu_seconds = meta["seconds"], meta["cpu_seconds"]
            diverged = meta["diverged"]
        spe = self.steps_per_epoch(spec.batch_size)
        bar = tqdm(
            total=spec.epochs,
            initial=start_epoch,
            desc=f"{spec.optimizer:>4} b={spec.batch_size:<4} seed={spec.seed}",
            unit="ep",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        epoch = start_epoch
        while epoch < spec.epochs and not diverged:
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = train_epoch(
                compiled.step, state, self.x_train, self.y_train, spec.batch_size, spec.seed, epoch
            )
            scores = compiled.evaluate(state, self.x_eval, self.y_eval)
            train_loss = float(jnp.mean(jnp.stack([m["loss"] for m in metrics])))
            history["train_loss"].append(train_loss)
            history["train_acc"].append(
                float(jnp.mean(jnp.stack([m["accuracy"] for m in metrics])))
            )
            history["test_loss"].append(float(scores["loss"]))
            history["test_acc"].append(float(scores["accuracy"]))
            history["lr"].append(float(compiled.schedule(epoch * spe)))
            seconds += time.perf_counter() - t0
            cpu_seconds += time.process_time() - c0
            epoch += 1
            diverged = not math.isfinite(train_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3g}", test_acc=f"{history['test_acc'][-1]:.3f}")
            if epoch % self.ckpt_every == 0 or epoch == spec.epochs or diverged:
                meta = {
                    "spec": spec.as_meta(),
                    "epoch": epoch,
                    "history": history,
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "diverged": diverged,
                }
                training.save_checkpoint(path, state, meta)
        bar.close()
        return RunResult(spec, history, diverged, seconds=seconds, cpu_seconds=cpu_seconds)


def train_epoch(
    step,
    state: training.TrainState,
    x: jax.Array,
    y: jax.Array,
    batch_size: int,
    seed: int,
    epoch: int,
) -> tuple[training.TrainState, list[dict]]:
    """Runs one epoch of ``step`` over the batches of ``(seed, epoch)``.

    Returns:
      (new state, per-step metrics); the input state is donated and unusable.
    """
    metrics = []
    for idx in training.epoch_batches(len(x), batch_size, seed, epoch):
        state, m = step(state, x[idx], y[idx])
        metrics.append(m)
    return state, metrics
