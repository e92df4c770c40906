"""One process of the two-process runs of tests/test_multihost.py.

Started as ``python tests/multihost_worker.py PHASE BACKEND PROCESS_ID PORT DIR``
with ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, once per process; the
two processes meet at the coordinator on ``127.0.0.1:PORT`` (CPU collectives
through gloo) and see one mesh of 8 CPU devices (4 each), whose axis ``"a"``
(size 2) crosses the process boundary. Params, gradients and momentum are
global arrays sharded over that mesh; each process supplies and checks only
the shards its devices hold.

Phases:

* ``first``: 5 steps through ``lars.lars`` (then ``optax.apply_updates``)
  and through ``lars.Lars``; each process checks its shards of params and
  momentum, and the trust ratios, against the float64 NumPy oracle
  (tests/oracle.py, backend_cases' float32 tolerances) and against the same
  backend run unsharded on one local device (float32 rounding). Then K
  steps, a checkpoint saved by both processes with orbax (params and
  ``LarsState``; ``lars.Lars``'s params and state; ``lars.Lars.state_dict()``),
  the remaining steps, and each process's final shards written to ``DIR``.
* ``restore`` (a fresh pair of processes): restores each checkpoint onto the
  same shardings (``state_dict``: through ``load_state_dict``), runs the
  remaining steps, and checks its shards bit for bit against the
  uninterrupted run, and against the oracle.
* ``peer-fails``: process 1 fails, process 0 hangs (the harness's own test).

Prints ``OK <phase> <backend> <process>`` at the end. On a failure it prints
the traceback and exits with status 1 at once.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from typing import Any

import jax

PHASE, BACKEND, PROCESS, PORT, DIR = sys.argv[1:6]
PROCESS, PORT = int(PROCESS), int(PORT)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=2,
    process_id=PROCESS,
    initialization_timeout=120,
)

# Imported after jax.distributed.initialize: these look at the devices.
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import oracle  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from backend_cases import TOLERANCES, _spacing  # noqa: E402
from backends import require  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lars  # noqa: E402

assert jax.process_count() == 2 and jax.process_index() == PROCESS
assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()

STEPS, K = 5, 3  # steps in all; steps before the checkpoint
LR, DECAY, ETA, CLIP_NORM = 0.5, 1e-3, 0.02, 5.0

# Axis "a" crosses the process boundary (devices 0-3 are process 0's), "b" does not.
MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
assert {d.process_index for d in MESH.devices[0]} == {0}
assert {d.process_index for d in MESH.devices[1]} == {1}
SHAPES = {
    "rows": (64, 12),  # over all 8 devices, 8 rows each
    "cols": (6, 128),
    "both": (32, 48),  # over both axes of the 2-D mesh
    "across": (10, 6),  # over the process boundary only, replicated within a process
    "odd": (6, 7, 5),  # odd dimensions, split 3 / 3 over the two processes
    "conv": (3, 3, 8, 16),  # a conv kernel: in-channels over "a", out-channels over "b"
    "bias": (16,),
    "repl": (7, 5),  # replicated on all 8 devices
    "scalar": (),
}
SPECS = {
    "rows": P(("a", "b"), None),
    "cols": P(None, ("a", "b")),
    "both": P("a", "b"),
    "across": P("a", None),
    "odd": P("a"),
    "conv": P(None, None, "a", "b"),
    "bias": P("b"),
    "repl": P(),
    "scalar": P(),
}
SHARDINGS = {k: NamedSharding(MESH, s) for k, s in SPECS.items()}
REPLICATED = NamedSharding(MESH, P())
NAMES = sorted(SHAPES)  # jax.tree order of the dicts


def host_params() -> dict:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def host_grads(i: int) -> dict:
    rng = np.random.default_rng(100 + i)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def to_global(tree: dict) -> dict:
    """Global arrays: each process supplies the shards its devices hold."""
    return {
        k: jax.make_array_from_callback(x.shape, SHARDINGS[k], lambda idx, x=x: x[idx])
        for k, x in tree.items()
    }


def to_local(tree: dict) -> dict:
    """The whole arrays on this process's first device (the unsharded run)."""
    return {k: jax.device_put(x, jax.local_devices()[0]) for k, x in tree.items()}


def transform(backend: str) -> optax.GradientTransformation:
    return lars.lars(
        optax.cosine_decay_schedule(LR, 20),
        weight_decay=DECAY,
        trust_coefficient=ETA,
        nesterov=True,
        grad_clip_norm=CLIP_NORM,
        trust_ratio_mask=lars.exclude_bias_and_norm,
        backend=backend,
    )


def oracle_config(transform: bool) -> oracle.OracleConfig:
    """The oracle's settings for :func:`transform` (True) or :func:`new_lars` (False)."""

    def cosine(t: int) -> float:  # optax.cosine_decay_schedule(LR, 20), in float64
        return LR * 0.5 * (1 + np.cos(np.pi * min(t, 20) / 20))

    return oracle.OracleConfig(
        learning_rate=cosine if transform else LR,
        weight_decay=DECAY,
        trust_coefficient=ETA,
        nesterov=transform,
        grad_clip_norm=CLIP_NORM,
    )


def want_oracle(transform: bool, steps: int) -> oracle.OracleState:
    """The float64 oracle after ``steps`` steps (float32 params, as stored)."""
    trust = [len(SHAPES[k]) > 1 for k in NAMES]  # exclude_bias_and_norm: ndim <= 1
    return oracle.run(
        [host_params()[k] for k in NAMES],
        [[host_grads(i)[k] for k in NAMES] for i in range(steps)],
        oracle_config(transform),
        trust_mask=trust,
        round_params=[oracle.rounder(np.float32)] * len(NAMES),
    )


@functools.cache
def transform_step(backend: str):
    """The transform and its jitted step, one per backend (each program compiles once)."""
    opt = transform(backend)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return opt, jax.jit(step)


def run_transform(backend: str, p: dict, s=None, steps=range(STEPS), put=to_global):
    opt, step = transform_step(backend)
    s = opt.init(p) if s is None else s
    for i in steps:
        p, s = step(p, s, put(host_grads(i)))
    return p, s


def new_lars(backend: str, p: dict) -> lars.Lars:
    o = lars.Lars(
        LR,
        weight_decay=DECAY,
        trust_coefficient=ETA,
        grad_clip_norm=CLIP_NORM,
        trust_ratio_mask=lars.exclude_bias_and_norm,
        backend=backend,
    )
    o.register_trainable_weights(p)
    return o


def run_lars(o: lars.Lars, steps=range(STEPS), put=to_global) -> lars.Lars:
    for i in steps:
        o.step(put(host_grads(i)))
    return o


def check_shardings(p: dict, s: lars.LarsState, what: str) -> None:
    for k in NAMES:
        for x in (p[k], s.momentum[k]):
            assert x.sharding.is_equivalent_to(SHARDINGS[k], x.ndim), (what, k, x.sharding)


def shards(x: Any) -> list[tuple[Any, np.ndarray]]:
    """This process's shards of ``x``: (index, values), one per distinct index."""
    if not isinstance(x, jax.Array):  # a Python number (lars.Lars's step count)
        return [((), np.asarray(x))]
    out = {}
    for sh in x.addressable_shards:
        key = tuple((i.start, i.stop) for i in sh.index)
        out.setdefault(key, (sh.index, np.asarray(sh.data)))
    return list(out.values())


def check_oracle(
    p: dict, s: lars.LarsState, want: oracle.OracleState, what: str, w0: dict | None = None
) -> None:
    """Every shard this process holds against the oracle (backend_cases' float32 tolerances).

    ``w0``: the params the run started from (default :func:`host_params`).
    """
    tol = TOLERANCES["float32"]
    w0 = host_params() if w0 is None else w0
    for n, k in enumerate(sorted(w0)):
        wp, vp = want.params[n], want.momentum[n]
        change = float(np.max(np.abs(wp - w0[k])))
        mag = float(max(np.max(np.abs(wp)), np.max(np.abs(w0[k]))))
        allowed = tol.delta * change + tol.ulps * _spacing(jnp.float32, mag)
        v_allowed = tol.momentum * want.momentum_scale[n] + _spacing(jnp.float32, 0.0)
        for idx, got in shards(p[k]):
            err = float(np.max(np.abs(got.astype(np.float64) - wp[idx])))
            assert err <= allowed, (what, k, "params", idx, err, allowed)
        for idx, got in shards(s.momentum[k]):
            err = float(np.max(np.abs(got.astype(np.float64) - vp[idx])))
            assert err <= v_allowed, (what, k, "momentum", idx, err, v_allowed)
        r = float(np.asarray(s.trust_ratio)[n])  # replicated: every process holds it
        assert abs(r - want.trust_ratio[n]) <= tol.ratio * want.trust_ratio[n], (what, k, r)


def check_unsharded(p: dict, s: lars.LarsState, p1: dict, s1: lars.LarsState, what: str) -> None:
    """Every shard this process holds against the unsharded run (float32 rounding)."""
    for k in NAMES:
        for x, whole in ((p[k], p1[k]), (s.momentum[k], s1.momentum[k])):
            whole = np.asarray(whole)
            for idx, got in shards(x):
                np.testing.assert_allclose(got, whole[idx], rtol=2e-6, atol=1e-6, err_msg=what)


def check_uneven(backend: str) -> None:
    """A leaf that XLA shards unevenly inside the step (7 rows over the two
    processes) is gathered across them for the step: whole-layer norms."""
    uneven = NamedSharding(MESH, P("a"))
    opt, _ = transform_step(backend)

    def step(p, s, g):
        p = {"odd7": jax.lax.with_sharding_constraint(p["odd7"], uneven)}
        g = {"odd7": jax.lax.with_sharding_constraint(g["odd7"], uneven)}
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(7)
    w, g = (rng.normal(size=(7, 5)).astype(np.float32) for _ in range(2))
    put = lambda x: {"odd7": jax.make_array_from_callback(x.shape, REPLICATED, lambda i: x[i])}
    p = put(w)
    got, s = jax.jit(step)(p, opt.init(p), put(g))
    want = oracle.run([w], [[g]], oracle_config(True), round_params=[oracle.rounder(np.float32)])
    check_oracle(got, s, want, f"{backend} uneven", w0={"odd7": w})


def phase_steps(backend: str) -> None:
    check_uneven(backend)
    p, s = run_transform(backend, to_global(host_params()))
    check_shardings(p, s, f"{backend} lars.lars")
    check_oracle(p, s, want_oracle(True, STEPS), f"{backend} lars.lars")
    with jax.default_device(jax.local_devices()[0]):
        p1, s1 = run_transform(backend, to_local(host_params()), put=to_local)
    check_unsharded(p, s, p1, s1, f"{backend} lars.lars")

    o = run_lars(new_lars(backend, to_global(host_params())))
    so = o.opt_state.value
    check_shardings(o.params, so, f"{backend} lars.Lars")
    check_oracle(o.params, so, want_oracle(False, STEPS), f"{backend} lars.Lars")
    with jax.default_device(jax.local_devices()[0]):
        o1 = run_lars(new_lars(backend, to_local(host_params())), put=to_local)
    check_unsharded(o.params, so, o1.params, o1.opt_state.value, f"{backend} lars.Lars")


def target(tree: dict) -> dict:
    """Where to restore ``tree``: params and momentum on their shardings, the rest replicated."""

    def where(path, x):
        if not isinstance(x, jax.Array):
            return x  # a Python number
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        sharding = SHARDINGS[keys[-1]] if {"params", "momentum"} & set(keys) else REPLICATED
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(where, tree)


def save(path: str, tree: dict) -> None:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)


def restore(path: str, tree: dict) -> dict:
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, target(tree))
    for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target(tree)), strict=True):
        if isinstance(t, jax.ShapeDtypeStruct):
            assert x.sharding.is_equivalent_to(t.sharding, x.ndim), (path, x.sharding)
    return restored


def save_shards(name: str, tree: dict) -> None:
    """The shards of ``tree`` this process holds, by path and index."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        for idx, data in shards(x):
            out[f"{jax.tree_util.keystr(path)}{idx}"] = data
    np.savez(os.path.join(DIR, f"{name}-{PROCESS}.npz"), **out)


def check_same_shards(name: str, tree: dict) -> None:
    """Bit for bit the shards :func:`save_shards` wrote for the uninterrupted run."""
    with np.load(os.path.join(DIR, f"{name}-{PROCESS}.npz")) as want:
        got = {}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            for idx, data in shards(x):
                got[f"{jax.tree_util.keystr(path)}{idx}"] = data
        assert sorted(got) == sorted(want.files), (name, sorted(got), want.files)
        for key, data in got.items():
            assert data.dtype == want[key].dtype, (name, key)
            np.testing.assert_array_equal(data, want[key], err_msg=f"{name} {key}")


def lars_tree(o: lars.Lars) -> dict:
    return {"params": o.params, "opt_state": o.opt_state.value, "step_count": o.step_count.value}


def phase_save(backend: str) -> None:
    """K steps, a checkpoint written by both processes, then the remaining steps."""
    p, s = run_transform(backend, to_global(host_params()), steps=range(K))
    save(os.path.join(DIR, f"{backend}-transform"), {"params": p, "opt_state": s})
    p, s = run_transform(backend, p, s, steps=range(K, STEPS))
    save_shards(f"{backend}-transform", {"params": p, "opt_state": s})

    o = run_lars(new_lars(backend, to_global(host_params())), steps=range(K))
    save(os.path.join(DIR, f"{backend}-lars"), lars_tree(o))
    # lars.Lars.state_dict(): braintools' layout of whole NumPy arrays, each
    # gathered from both processes (a collective: every process calls it).
    sd = o.state_dict()
    whole = lars.LarsState(
        count=K,
        momentum=sd["opt_state"][-2].trace,
        trust_ratio=np.stack(jax.tree.leaves(sd["lars"]["trust_ratio"]["0"])),
        skipped=0,
    )
    params = sd["param_groups"]["0"]["params"]
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves((params, whole.momentum)))
    check_oracle(params, whole, want_oracle(False, K), f"{backend} state_dict")
    save(os.path.join(DIR, f"{backend}-state-dict"), sd)
    run_lars(o, steps=range(K, STEPS))
    save_shards(f"{backend}-lars", lars_tree(o))


def phase_restore(backend: str) -> None:
    """A fresh pair: restore onto the same shardings, run the remaining steps."""
    p0 = to_global(host_params())
    like = {"params": p0, "opt_state": transform(backend).init(p0)}
    r = restore(os.path.join(DIR, f"{backend}-transform"), like)
    assert int(r["opt_state"].count) == K
    p, s = run_transform(backend, r["params"], r["opt_state"], steps=range(K, STEPS))
    check_shardings(p, s, f"{backend} lars.lars restored")
    check_same_shards(f"{backend}-transform", {"params": p, "opt_state": s})
    check_oracle(p, s, want_oracle(True, STEPS), f"{backend} lars.lars restored")

    r = restore(os.path.join(DIR, f"{backend}-lars"), lars_tree(new_lars(backend, p0)))
    o = new_lars(backend, r["params"])
    o.opt_state.value = r["opt_state"]
    o.step_count.value = r["step_count"]
    run_lars(o, steps=range(K, STEPS))
    check_shardings(o.params, o.opt_state.value, f"{backend} lars.Lars restored")
    check_same_shards(f"{backend}-lars", lars_tree(o))
    check_oracle(o.params, o.opt_state.value, want_oracle(False, STEPS), f"{backend} restored")

    # The state_dict path: read back without a target (NumPy arrays, lists and
    # dicts), a new lars.Lars on the saved params, load_state_dict.
    with ocp.StandardCheckpointer() as ckpt:
        sd = ckpt.restore(os.path.join(DIR, f"{backend}-state-dict"))
    saved = {k: np.asarray(x, np.float32) for k, x in sd["param_groups"]["0"]["params"].items()}
    o = new_lars(backend, to_global(saved))
    o.load_state_dict(sd)
    assert int(o.step_count.value) == K
    run_lars(o, steps=range(K, STEPS))
    check_shardings(o.params, o.opt_state.value, f"{backend} lars.Lars state_dict")
    check_same_shards(f"{backend}-lars", lars_tree(o))


def main() -> None:
    require(BACKEND)
    if PHASE == "first":  # one start of the pair for both: starting JAX takes seconds
        phase_steps(BACKEND)
        phase_save(BACKEND)
    elif PHASE == "restore":
        phase_restore(BACKEND)
    elif PHASE == "peer-fails":  # for the harness's own test
        if PROCESS == 1:
            raise RuntimeError("process 1 fails on purpose")
        time.sleep(600)  # process 0 hangs, as one waiting for a dead peer can
    else:
        raise ValueError(f"unknown phase {PHASE!r}")
    print(f"OK {PHASE} {BACKEND} {PROCESS}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit at once: a normal exit would wait for the peer at jax.distributed's
        # shutdown barrier, and the harness kills the peer when this one fails.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    jax.distributed.shutdown()
