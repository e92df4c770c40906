"""Sharded parameters: per-layer norms stay whole-layer norms on a device mesh.

Every backend that runs on a CPU must give the unsharded result (never
shard-local norms); the reference step also keeps the sharding.

Runs in a subprocess with 8 simulated CPU devices (the device count must be set
before JAX initialises, so it cannot share this test process).
"""

from __future__ import annotations

import textwrap

import pytest
from backends import BACKENDS, run_on_cpu_devices

_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lars

    assert jax.device_count() == 8, jax.devices()
    backend = sys.argv[1]
    rng = np.random.default_rng(0)
    shapes = {
        "rows": (64, 12), "cols": (6, 128), "both": (32, 48), "half": (8, 20), "repl": (7, 5),
        "vec": (256,), "scalar": (), "conv": (3, 3, 8, 16), "bias": (16,),
    }
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    params["zero"] = jnp.zeros((16, 4), jnp.float32)  # a zero-norm leaf, sharded
    # One mesh for the whole program (a custom-partitioned op needs that):
    # leaves sharded over all 8 devices along rows or columns, over both axes
    # of the 2-D mesh, over one axis only (replicated over the other), or
    # replicated.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    specs = {
        "rows": P(("a", "b"), None),
        "cols": P(None, ("a", "b")),
        "both": P("a", "b"),
        "half": P("b", None),
        "repl": P(),
        "vec": P(("a", "b")),
        "scalar": P(),
        "conv": P(None, None, "a", "b"),
        "bias": P("a"),
        "zero": P(None, "b"),
    }
    specs = {k: NamedSharding(mesh, v) for k, v in specs.items()}
    opt = lars.lars(
        optax.cosine_decay_schedule(0.5, 20), weight_decay=1e-3, nesterov=True,
        grad_clip_norm=5.0, trust_ratio_mask=lars.exclude_bias_and_norm, backend=backend,
    )

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run(sharded):
        p = params
        if sharded:
            p = jax.tree.map(jax.device_put, params, specs)
        s = opt.init(p)
        f = jax.jit(step)
        for i in range(10):
            g = {k: jnp.asarray(np.random.default_rng(i).normal(size=v.shape), jnp.float32)
                 for k, v in params.items()}
            if sharded:
                g = jax.tree.map(jax.device_put, g, specs)
            p, s = f(p, s, g)
        # Params and momentum keep their shardings (the fused backends run
        # shard by shard through lars._sharded).
        if sharded:
            for k in p:
                assert p[k].sharding.is_equivalent_to(specs[k], p[k].ndim), (k, p[k].sharding)
                m = s.momentum[k].sharding
                assert m.is_equivalent_to(specs[k], p[k].ndim), (k, "momentum", m)
        return jax.tree.map(np.asarray, (p, s.momentum, s.trust_ratio))

    a, b = run(False), run(True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-6)

    # The braintools-style class: its step writes new params (the in-place
    # form of the fused backends) and keeps their shardings.
    def run_class(sharded):
        p = jax.tree.map(jax.device_put, params, specs) if sharded else params
        o = lars.Lars(
            0.5, weight_decay=1e-3, grad_clip_norm=5.0,
            trust_ratio_mask=lars.exclude_bias_and_norm, backend=backend,
        )
        o.register_trainable_weights(p)
        for i in range(5):
            g = {k: jnp.asarray(np.random.default_rng(i).normal(size=v.shape), jnp.float32)
                 for k, v in params.items()}
            o.step(jax.tree.map(jax.device_put, g, specs) if sharded else g)
        if sharded:
            for k, x in o.params.items():
                assert x.sharding.is_equivalent_to(specs[k], x.ndim), (k, x.sharding)
        return jax.tree.map(np.asarray, (o.params, o.opt_state.value.momentum))

    a, b = run_class(False), run_class(True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-6)

    # A leaf that the mesh cannot split evenly (7 rows over 2 devices, as XLA
    # may shard an intermediate inside jit) is gathered for the step: whole-
    # layer norms, replicated result.
    uneven = NamedSharding(mesh, P("a"))

    def step_uneven(p, s, g):
        p = {**p, "odd": jax.lax.with_sharding_constraint(p["odd"], uneven)}
        g = {**g, "odd": jax.lax.with_sharding_constraint(g["odd"], uneven)}
        return step(p, s, g)

    p_odd = {"odd": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32), "rows": params["rows"]}
    g_odd = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p_odd)
    got, _ = jax.jit(step_uneven)(p_odd, opt.init(p_odd), g_odd)
    with jax.default_device(jax.devices()[0]):
        ref = lars.lars(
            optax.cosine_decay_schedule(0.5, 20), weight_decay=1e-3, nesterov=True,
            grad_clip_norm=5.0, trust_ratio_mask=lars.exclude_bias_and_norm,
            backend="reference",
        )
        u, _ = ref.update(g_odd, ref.init(p_odd), p_odd)
        want = optax.apply_updates(p_odd, u)
    for k in p_odd:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-6)

    # The compiled sharded step adds partial sums (all-reduce) and never
    # gathers a sharded leaf (no all-gather).
    p = jax.tree.map(jax.device_put, params, specs)
    s = opt.init(p)
    hlo = jax.jit(step).lower(p, s, p).compile().as_text()
    assert "all-gather" not in hlo, "a sharded leaf was gathered"
    assert "all-reduce" in hlo, "no cross-shard sum"
    print("OK")
    """
)


def _run_on_8_devices(script: str, backend: str) -> None:
    """Runs ``script`` with 8 simulated CPU devices; it must print OK."""
    run_on_cpu_devices(script, backend, devices=8)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_matches_unsharded(backend: str) -> None:
    _run_on_8_devices(_SCRIPT, backend)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 1e-2, "trust_clip": 0.02},
        {"grad_clip_norm": 1.0, "grad_clip_value": 0.5, "weight_decay": 1e-3},
    ],
)
def test_whole_layer_ratios_match_the_reference(options: dict) -> None:
    """The sharded path's ratios (from sums, here over one shard) are the reference's."""
    import jax.numpy as jnp
    import numpy as np

    from lars import _sharded
    from lars._reference import reference_step
    from lars.contract import LarsConfig, StepSpec

    rng = np.random.default_rng(1)
    shapes = [(), (1,), (127,), (4097,), (3, 3, 4, 8), (0,), (5, 3)]
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    params[-1] = jnp.zeros((5, 3), jnp.float32)  # zero norm: r = 1
    grads = [jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in shapes]
    momentum = [jnp.zeros(s, jnp.float32) for s in shapes]
    config = LarsConfig(**options)
    decay = [True, False, True, True, True, True, True]
    trust = [True, True, True, False, True, True, True]
    spec = StepSpec.build(config, params, grads, decay_mask=decay, trust_mask=trust)
    ratios, norm = _sharded._ratios(params, grads, [()] * len(params), spec)
    want = reference_step(
        params, grads, momentum, jnp.float32(0.1), config=config, decay_mask=decay, trust_mask=trust
    )
    np.testing.assert_allclose(np.asarray(ratios), np.stack(want.trust_ratio), rtol=2e-6)
    assert not trust[3] or float(ratios[3]) == 1.0
    if config.grad_clip_norm is not None:
        g64 = np.concatenate([np.asarray(g, np.float64).ravel() for g in grads])
        np.testing.assert_allclose(float(norm), np.linalg.norm(g64), rtol=1e-6)


_SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, PartitionSpec as P
    import lars

    backend = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    rng = np.random.default_rng(0)
    shapes = {"rows": (16, 6), "both": (8, 12), "half": (4, 20), "repl": (7, 5), "s": ()}
    specs = {"rows": P(("a", "b")), "both": P("a", "b"), "half": P(None, "b"),
             "repl": P(), "s": P()}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    opt = lars.lars(0.5, weight_decay=1e-3, grad_clip_norm=3.0, backend=backend)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state_specs = lars.LarsState(count=P(), momentum=specs, trust_ratio=P(), skipped=P())
    local = jax.jit(jax.shard_map(
        step, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs)
    ))
    whole = jax.jit(step)
    p1 = p2 = params
    s1 = s2 = opt.init(params)
    for i in range(5):
        g = {k: jnp.asarray(np.random.default_rng(i).normal(size=s), jnp.float32)
             for k, s in shapes.items()}
        p1, s1 = local(p1, s1, g)
        p2, s2 = whole(p2, s2, g)
    for k in params:
        np.testing.assert_allclose(p1[k], p2[k], rtol=2e-6, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(s1.momentum[k], s2.momentum[k], rtol=2e-6, atol=1e-6)

    # Gradients not yet averaged over a data-parallel axis: refused, by path.
    def bad(p, s, g):
        g = {**g, "repl": g["repl"] * jax.lax.axis_index("a")}
        return step(p, s, g)

    try:
        jax.jit(jax.shard_map(
            bad, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs)
        ))(params, opt.init(params), params)
    except ValueError as e:
        assert "['repl']" in str(e) and "pmean" in str(e), e
    else:
        raise AssertionError("unreduced gradients were accepted")
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_shard_map_norms_are_whole_layer(backend: str) -> None:
    """Called inside the user's shard_map, the step sums the norms over the shards."""
    _run_on_8_devices(_SHARD_MAP_SCRIPT, backend)


# Params on a mesh of Explicit axes (their types carry the sharding): every
# backend's step matches the reference's on unsharded params, with and without
# jax.set_mesh, jitted and eager, update and apply_gradients, a skipped
# (non-finite) step included; params and momenta keep their sharded types.
# Kernels see the arrays with the axes switched to Auto (lars._sharded.on_auto_axes).
_EXPLICIT_SCRIPT = textwrap.dedent(
    """
    import contextlib, sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    import lars

    assert jax.device_count() == 8, jax.devices()
    backend = sys.argv[1]
    rng = np.random.default_rng(0)
    shapes = {
        "rows": (64, 12), "cols": (6, 128), "both": (32, 48), "half": (8, 20), "repl": (7, 5),
        "vec": (256,), "scalar": (), "conv": (3, 3, 8, 16), "bias": (16,), "zero": (16, 4),
    }
    specs = {
        "rows": P(("a", "b"), None), "cols": P(None, ("a", "b")), "both": P("a", "b"),
        "half": P("b", None), "repl": P(), "vec": P(("a", "b")), "scalar": P(),
        "conv": P(None, None, "a", "b"), "bias": P("a"), "zero": P(None, "b"),
    }
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    params["zero"] = jnp.zeros((16, 4), jnp.float32)
    shapes["plain"] = (5,)  # a leaf never put on the mesh: its type names no mesh
    params["plain"] = jnp.asarray(rng.normal(size=5), jnp.float32)
    grads = []
    for i in range(6):
        r = np.random.default_rng(i)
        g = {k: jnp.asarray(r.normal(size=s), jnp.float32) for k, s in shapes.items()}
        if i == 3:
            g["both"] = g["both"].at[1, 2].set(jnp.nan)  # a skipped step
        grads.append(g)
    kw = dict(weight_decay=1e-3, nesterov=True, grad_clip_norm=5.0, skip_nonfinite=True,
              trust_ratio_mask=lars.exclude_bias_and_norm)
    sched = optax.cosine_decay_schedule(0.5, 20)
    opt = lars.lars(sched, backend=backend, **kw)
    ref = lars.lars(sched, backend="reference", **kw)

    def update_step(o):
        def step(p, s, g):
            u, s = o.update(g, s, p)
            return optax.apply_updates(p, u), s
        return step

    def apply_step(o):
        return lambda p, s, g: o.apply_gradients(p, s, g)

    def put_on(mesh, tree):
        if mesh is None:
            return tree
        put = lambda k, x: jax.device_put(x, NamedSharding(mesh, specs[k])) if k in specs else x
        return {k: put(k, x) for k, x in tree.items()}

    def run(o, make_step, mesh, *, jit=True, context=False):
        put = lambda tree: put_on(mesh, tree)
        with jax.set_mesh(mesh) if context else contextlib.nullcontext():
            p = put(params)
            s = o.init(p)
            f = jax.jit(make_step(o)) if jit else make_step(o)
            for g in grads:
                p, s = f(p, s, put(g))
            if mesh is not None and set(mesh.explicit_axes) == set(mesh.axis_names):
                # On a mesh of Explicit axes, params and momenta keep their sharding,
                # in their types as on the devices.
                for k in specs:
                    want = NamedSharding(mesh, specs[k])
                    for x in (p[k], s.momentum[k]):
                        assert x.sharding.is_equivalent_to(want, x.ndim), (k, x.sharding)
                        typed = NamedSharding(mesh, jax.typeof(x).sharding.spec)
                        assert typed.is_equivalent_to(want, x.ndim), (k, typed)
            assert int(s.skipped) == 1, (s.skipped, s.count)
            return jax.tree.map(np.asarray, (p, s.momentum, s.trust_ratio))

    want = run(ref, update_step, None)
    explicit = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    mixed = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit, AxisType.Auto))
    cases = [
        (explicit, update_step, True, False), (explicit, update_step, True, True),
        (explicit, apply_step, True, True), (explicit, apply_step, False, False),
        (mixed, update_step, True, True),
    ]
    for mesh, make_step, jit, context in cases:
        got = run(opt, make_step, mesh, jit=jit, context=context)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            case = (mesh.axis_types, make_step.__name__, jit, context)
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-6, err_msg=str(case))

    # The compiled step adds partial sums and gathers no sharded leaf.
    with jax.set_mesh(explicit):
        p = put_on(explicit, params)
        hlo = jax.jit(update_step(opt)).lower(p, opt.init(p), p).compile().as_text()
    assert "all-gather" not in hlo, "a sharded leaf was gathered"
    if backend != "reference":
        assert "all-reduce" in hlo, "no cross-shard sum"

    # Complex leaves (the reference's) inside the user's shard_map: whole-layer
    # norms of |x| from the shards' sums.
    if backend == "reference":
        from jax.sharding import Mesh
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
        cshapes = {"rows": (16, 6), "both": (8, 12), "repl": (7, 5)}
        cspecs = {"rows": P(("a", "b")), "both": P("a", "b"), "repl": P()}
        cplx = lambda r, s: jnp.asarray(r.normal(size=s) + 1j * r.normal(size=s), jnp.complex64)
        cparams = {k: cplx(rng, s) for k, s in cshapes.items()}
        copt = lars.lars(0.5, weight_decay=1e-3, grad_clip_norm=3.0)
        cstep = update_step(copt)
        state_specs = lars.LarsState(count=P(), momentum=cspecs, trust_ratio=P(), skipped=P())
        in_specs, out_specs = (cspecs, state_specs, cspecs), (cspecs, state_specs)
        local = jax.jit(jax.shard_map(cstep, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
        p1 = p2 = cparams
        s1 = s2 = copt.init(cparams)
        for i in range(4):
            g = {k: cplx(np.random.default_rng(i), s) for k, s in cshapes.items()}
            p1, s1 = local(p1, s1, g)
            p2, s2 = jax.jit(cstep)(p2, s2, g)
        for k in cparams:
            np.testing.assert_allclose(p1[k], p2[k], rtol=2e-6, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(s1.momentum[k], s2.momentum[k], rtol=2e-6, atol=1e-6)
            assert np.any(np.asarray(p1[k]) != np.asarray(cparams[k]))
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_mesh_axes_match_the_reference(backend: str) -> None:
    _run_on_8_devices(_EXPLICIT_SCRIPT, backend)
