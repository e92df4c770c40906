"""Training pieces shared by the examples: schedules, optimizers, a jitted step, checkpoints.

The training state is a plain pytree (``TrainState``) of Flax NNX states and an
optax state, so the step can be a ``jax.jit`` function that donates it, and a
checkpoint is just its leaves saved with NumPy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lars

OPTIMIZERS = ("sgd", "lars")


class TrainState(NamedTuple):
    """Everything that changes during training."""

    params: Any  # nnx.State of the nnx.Param variables
    batch_stats: Any  # nnx.State of the BatchNorm running statistics
    opt_state: Any  # the optimizer's state, step count included


def warmup_poly_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0
) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to ``peak_lr``, then polynomial decay to zero (the LARS paper's schedule).

    Step ``t`` (counting from 0) gets ``peak_lr * (t + 1) / warmup_steps`` during
    warmup, then ``peak_lr * (1 - p) ** power`` where ``p`` goes from 0 to 1 over
    the remaining steps.

    Raises:
      ValueError: for a negative learning rate or inconsistent step counts.
    """
    if not peak_lr >= 0.0:
        raise ValueError(f"peak_lr must be >= 0, got {peak_lr}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
            f"got {total_steps} and {warmup_steps}"
        )
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        warm = peak_lr * (t + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
        return jnp.where(t < warmup_steps, warm, peak_lr * (1.0 - progress) ** power)

    return schedule


def make_optimizer(
    name: str,
    learning_rate: float | Callable[[jax.Array], jax.Array],
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """SGD with momentum or LARS, with BatchNorm and biases excluded from weight decay.

    Both use the same schedule, momentum and (coupled) weight decay; LARS also
    excludes BatchNorm parameters and biases from layer-wise adaptation
    (``lars.exclude_bias_and_norm`` as both masks), as large-batch ResNet
    recipes do.

    Args:
      name: "sgd" (``optax.sgd`` after ``optax.add_decayed_weights``) or "lars"
        (``lars.lars`` with the default backend).
      learning_rate: A float or an optax schedule.
      momentum: Momentum factor.
      weight_decay: Coupled L2 weight decay on weights (not biases or BatchNorm).
      trust_coefficient: LARS's eta (ignored by SGD).

    Raises:
      ValueError: for an unknown optimizer name.
    """
    mask = lars.exclude_bias_and_norm
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=mask),
            optax.sgd(learning_rate, momentum=momentum),
        )
    if name == "lars":
        return lars.lars(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            weight_decay_mask=mask,
            trust_ratio_mask=mask,
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def split_model(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Splits a model into (train graphdef, eval graphdef, initial TrainState)."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    eval_graphdef, _, _ = nnx.split(
        nnx.view(model, use_running_average=True), nnx.Param, nnx.BatchStat
    )
    return graphdef, eval_graphdef, TrainState(params, batch_stats, tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """A jitted ``step(state, images, labels) -> (state, {"loss", "accuracy"})``.

    The state argument is donated: its buffers are reused for the new state, so
    the caller must not touch the old one after the call.
    """

    def loss_fn(params, batch_stats, images, labels):
        # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(images)
        new_stats = nnx.state(model, nnx.BatchStat)
        return cross_entropy(logits, labels), (logits, new_stats)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_stats)), grads = grad_fn(
            state.params, state.batch_stats, images, labels
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return TrainState(params, new_stats, opt_state), {"loss": loss, "accuracy": accuracy}

    return jax.jit(step, donate_argnums=(0,))


def make_eval_fn(
    eval_graphdef: nnx.GraphDef,
) -> Callable[[TrainState, jax.Array, jax.Array], dict]:
    """A jitted ``evaluate(state, images, labels) -> {"loss", "accuracy"}`` (running BN stats)."""

    @jax.jit
    def evaluate(state: TrainState, images: jax.Array, labels: jax.Array) -> dict:
        model = nnx.merge(eval_graphdef, state.params, state.batch_stats)
        logits = model(images)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return {"loss": cross_entropy(logits, labels), "accuracy": accuracy}

    return evaluate


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index arrays of the epoch's batches: a fresh permutation per (seed, epoch).

    The last incomplete batch is dropped (every step sees ``batch_size``
    examples, so the step compiles once). The order depends only on
    ``(seed, epoch)``, so a resumed run sees the same batches.

    Raises:
      ValueError: if ``batch_size`` is not in [1, n].
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def save_checkpoint(path: str | os.PathLike, state: TrainState, meta: dict) -> None:
    """Saves the state's leaves (NumPy arrays) and a JSON-able ``meta`` dict to ``path``.

    Written to a temporary file first and renamed, so an interrupted save never
    leaves a truncated checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    arrays = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict]:
    """Loads a checkpoint into the structure of ``like`` (a freshly built state).

    Returns:
      (state, meta).

    Raises:
      ValueError: if the checkpoint's leaves do not match ``like`` in number,
        shape or dtype (it was written for another model or optimizer).
    """
    like_leaves, treedef = jax.tree.flatten(like)
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        keys = sorted(k for k in data.files if k.startswith("leaf_"))
        if len(keys) != len(like_leaves):
            raise ValueError(
                f"checkpoint {path} has {len(keys)} arrays, the model and optimizer "
                f"state have {len(like_leaves)}"
            )
        leaves = []
        for i, (key, ref) in enumerate(zip(keys, like_leaves, strict=True)):
            arr = data[key]
            if arr.shape != np.shape(ref) or arr.dtype != np.asarray(ref).dtype:
                raise ValueError(
                    f"checkpoint {path}: array {i} is {arr.dtype}{list(arr.shape)}, "
                    f"expected {np.asarray(ref).dtype}{list(np.shape(ref))}"
                )
            leaves.append(jnp.asarray(arr))
    return treedef.unflatten(leaves), meta
