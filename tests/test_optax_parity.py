"""``lars.lars(..., lr_inside_momentum=True, eps=0.0)`` is ``optax.lars``.

Both run 60 steps of a warmup-cosine schedule on a small ResNet-like pytree
(conv kernels, BatchNorm scales and offsets, a classifier), from the same
params and gradients, with weight decay, with and without Nesterov momentum and
with and without ``exclude_bias_and_norm`` as both masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lars

STEPS = 60
SCHEDULE = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=2.0, warmup_steps=10, decay_steps=STEPS, end_value=0.01
)


def resnet_like(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    shapes = {
        "stem": {"conv": (7, 7, 3, 8), "bn": {"scale": (8,), "offset": (8,)}},
        "block": {
            "conv1": (3, 3, 8, 8),
            "bn1": {"scale": (8,), "offset": (8,)},
            "conv2": (3, 3, 8, 16),
            "bn2": {"scale": (16,), "offset": (16,)},
        },
        "fc": {"w": (16, 10), "b": (10,)},
    }
    is_shape = lambda x: isinstance(x, tuple)

    def init(shape):
        if len(shape) == 1:
            return np.zeros(shape, np.float32)  # offsets and bias start at zero
        return rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))

    params = jax.tree.map(lambda s: jnp.asarray(init(s)), shapes, is_leaf=is_shape)
    params["stem"]["bn"]["scale"] = jnp.ones(8, jnp.float32)
    grads = [
        jax.tree.map(
            lambda s: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32),
            shapes,
            is_leaf=is_shape,
        )
        for _ in range(STEPS)
    ]
    return params, grads


def run(opt: optax.GradientTransformation, params: dict, grads: list[dict]) -> list:
    @jax.jit
    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    trajectory = []
    for g in grads:
        params, state = step(params, state, g)
        trajectory.append(params)
    return trajectory


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "exclude_bias_and_norm"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_matches_optax_lars(nesterov: bool, masked: bool):
    params, grads = resnet_like()
    mask = lars.exclude_bias_and_norm if masked else True
    theirs = optax.lars(
        SCHEDULE,
        weight_decay=1e-3,
        weight_decay_mask=mask,
        trust_coefficient=0.001,
        eps=0.0,
        trust_ratio_mask=mask,
        momentum=0.9,
        nesterov=nesterov,
    )
    ours = lars.lars(
        SCHEDULE,
        momentum=0.9,
        weight_decay=1e-3,
        trust_coefficient=0.001,
        eps=0.0,
        nesterov=nesterov,
        weight_decay_mask=lars.exclude_bias_and_norm if masked else None,
        trust_ratio_mask=lars.exclude_bias_and_norm if masked else None,
        lr_inside_momentum=True,
    )
    want = run(theirs, params, grads)
    got = run(ours, params, grads)
    # fp32 tolerance: both evaluate the same float32 expressions; allow a few
    # ulps of the params plus 1e-5 of each leaf's total change, at every step.
    p0 = jax.tree.leaves(params)
    for t, (g_t, w_t) in enumerate(zip(got, want, strict=True)):
        for a, b, x0 in zip(jax.tree.leaves(g_t), jax.tree.leaves(w_t), p0, strict=True):
            a, b, x0 = (np.asarray(x, np.float64) for x in (a, b, x0))
            change = np.max(np.abs(b - x0))
            allowed = 1e-5 * change + 4 * np.finfo(np.float32).eps * np.max(np.abs(b))
            assert np.max(np.abs(a - b)) <= allowed, f"step {t}"
    # The run is not trivial: every leaf moved, masked leaves by a full lr step.
    last = jax.tree.leaves(want[-1])
    assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(last, p0, strict=True))


def test_default_form_differs_from_optax_under_a_schedule():
    """lr outside the momentum buffer (the default) is not optax.lars once lr changes."""
    params, grads = resnet_like()
    theirs = run(optax.lars(SCHEDULE, eps=0.0), params, grads[:15])[-1]
    ours = run(lars.lars(SCHEDULE, eps=0.0), params, grads[:15])[-1]
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True)
    )
    assert diff > 1e-4
