"""Checkpoints: optimizer state saved with orbax or numpy resumes bitwise, on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from backends import BACKENDS

import lars

ocp = pytest.importorskip("orbax.checkpoint")

K, M = 3, 3  # steps before and after the restart


def _params() -> dict:
    rng = np.random.default_rng(1)
    return {
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
        "bias": jnp.zeros((4,), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=(130,)), jnp.float32),
    }


def _grads(i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _params())
    if i == 1:  # one poisoned step before the restart: the skip counter must survive it
        g["scale"] = g["scale"].at[3].set(jnp.nan)
    return g


def _opt(backend: str) -> optax.GradientTransformation:
    return lars.lars(
        optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10),
        weight_decay=1e-3,
        trust_ratio_mask=lars.exclude_bias_and_norm,
        skip_nonfinite=True,
        backend=backend,
    )


def _run(opt, p, s, steps):
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    for i in steps:
        u, s = step(_grads(i), s, p)
        p = optax.apply_updates(p, u)
    return p, s


def _assert_bitwise(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def _save_orbax(path, tree):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)


def _load_orbax(path, like):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, abstract)


def _save_npz(path, tree):
    leaves = jax.tree.leaves(tree)
    np.savez(path, *[np.asarray(x) for x in leaves])


def _load_npz(path, like):
    with np.load(path) as data:
        leaves = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


@pytest.mark.parametrize("fmt", ["orbax", "npz"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise(tmp_path, backend: str, fmt: str) -> None:
    opt = _opt(backend)
    p0 = _params()
    straight_p, straight_s = _run(opt, p0, opt.init(p0), range(K + M))

    p, s = _run(opt, p0, opt.init(p0), range(K))
    assert int(s.skipped) == 1
    save, load = (_save_orbax, _load_orbax) if fmt == "orbax" else (_save_npz, _load_npz)
    path = tmp_path / ("ckpt" if fmt == "orbax" else "ckpt.npz")
    save(path, {"params": p, "opt_state": s})
    # Restore into fresh objects built from a new optimizer, as after a restart.
    opt2 = _opt(backend)
    like = {"params": _params(), "opt_state": opt2.init(_params())}
    restored = load(path, like)
    assert isinstance(restored["opt_state"], lars.LarsState)
    resumed_p, resumed_s = _run(opt2, restored["params"], restored["opt_state"], range(K, K + M))
    _assert_bitwise(resumed_p, straight_p)
    _assert_bitwise(resumed_s, straight_s)


def test_lars_state_dict_through_orbax(tmp_path) -> None:
    sched = lars.schedules.StepLR(base_lr=0.4, step_size=2, gamma=0.5)
    opt = lars.Lars(lr=sched, weight_decay=1e-3).register_trainable_weights(_params())
    for i in range(K):
        opt.update(_grads(i + 10))
        sched.step()
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(tmp_path / "sd", {"params": opt.params, "optimizer": opt.state_dict()})
        restored = ckpt.restore(tmp_path / "sd")
    sched2 = lars.schedules.StepLR(base_lr=0.4, step_size=2, gamma=0.5)
    opt2 = lars.Lars(lr=sched2, weight_decay=1e-3)
    opt2.register_trainable_weights(jax.tree.map(jnp.asarray, restored["params"]))
    opt2.load_state_dict(restored["optimizer"])
    assert sched2.last_epoch.value == K
    for i in range(K, K + M):
        opt.update(_grads(i + 10))
        opt2.update(_grads(i + 10))
        sched.step()
        sched2.step()
    _assert_bitwise(opt2.params, opt.params)
    _assert_bitwise(opt2.opt_state.value, opt.opt_state.value)
    assert opt2.step_count.value == opt.step_count.value == K + M


def _lars_with_groups(backend: str, params=None):
    sched = lars.schedules.CosineAnnealingLR(base_lr=0.4, T_max=8)
    opt = lars.Lars(lr=sched, weight_decay=1e-3, skip_nonfinite=True, backend=backend)
    params = _params() if params is None else jax.tree.map(jnp.asarray, params)
    opt.register_trainable_weights({k: params[k] for k in ("conv", "bias")})
    opt.add_param_group({"scale": params["scale"]}, lr=0.05, weight_decay=0.0)
    return opt, sched


def _lars_run(opt, sched, steps) -> None:
    for i in steps:
        opt.update(_grads(i))
        sched.step()


@pytest.mark.parametrize("fmt", ["standard", "npz"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lars_state_dict_with_groups_resumes_bitwise(tmp_path, backend: str, fmt: str) -> None:
    """lars.Lars with two param groups: its state_dict through orbax's StandardCheckpointer
    (read back without a target: lists, dicts and None) or numpy.savez resumes bit for bit."""
    straight, sched = _lars_with_groups(backend)
    _lars_run(straight, sched, range(K + M))
    first, sched = _lars_with_groups(backend)
    _lars_run(first, sched, range(K))
    assert int(first.param_groups_opt_states[0].value.skipped) == 1
    tree = {"params": first.params, "optimizer": first.state_dict()}
    if fmt == "standard":
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp_path / "sd", tree)
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(tmp_path / "sd")
    else:
        _save_npz(tmp_path / "sd.npz", tree)
        restored = _load_npz(tmp_path / "sd.npz", tree)
    resumed, sched = _lars_with_groups(backend, restored["params"])
    resumed.load_state_dict(restored["optimizer"])
    _lars_run(resumed, sched, range(K, K + M))
    _assert_bitwise(resumed.params, straight.params)
    for a, b in zip(resumed._holders(), straight._holders(), strict=True):
        _assert_bitwise(a.value, b.value)
    assert sched.last_epoch.value == K + M
