"""The Pallas backend's ``run`` (lars.kernels.pallas) called with a ``StepSpec``.

Its results are compared with the reference backend's for the same
``StepSpec`` (every option, masks, in place or not, given trust ratios), under
``jax.vmap``, and its refusals (float64, unknown or bad ``backend_options``)
are checked, as are registration, lazy import, determinism and that a new
learning rate or traced hyperparameters compile nothing new. The kernels run
in interpret mode here; the kernels' own tests are in ``test_pallas.py``.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pallas_cases import (
    BF16,
    F32,
    GPU_TILE,
    TPU_BLOCKS,
    assert_close,
    options,
)

import lars
from lars import _autodiff, _reference
from lars.contract import Feature, LarsConfig, StepInputs, StepSpec
from lars.kernels import pallas

slow = pytest.mark.slow

# --------------------------------------------------------------------------
# The backend: ``run`` with a StepSpec, and the options.

CLIP_CONFIG = LarsConfig(
    momentum=0.8,
    weight_decay=0.01,
    trust_coefficient=0.02,
    eps=1e-6,
    nesterov=True,
    trust_clip=0.5,
    grad_clip_norm=0.2,
    grad_clip_value=0.03,
)
MASKS = dict(
    decay_mask=[True, False, True, True, True, False, True],
    trust_mask=[True, True, True, True, False, True, True],
)
MASKS_ONE = dict(decay_mask=[True], trust_mask=[True])


def _tree_case(seed=8):
    rng = np.random.default_rng(seed)
    shapes = [(), (7,), (0,), (33,), (300,), (2, 2, 4, 8), (0, 3)]
    params = [jnp.asarray(rng.standard_normal(s), F32) for s in shapes]
    params[3] = jnp.zeros((33,), F32)  # zero weights: r = 1
    grads = [
        jnp.asarray(0.1 * rng.standard_normal(s), BF16 if i % 3 == 0 else F32)
        for i, s in enumerate(shapes)
    ]
    grads[1] = jnp.zeros((7,), grads[1].dtype)  # zero gradient
    momentum = [jnp.asarray(0.01 * rng.standard_normal(s), F32) for s in shapes]
    return params, grads, momentum


def _assert_results_close(got, want, rtol, what=""):
    for name, g, w in zip(("updates", "momentum", "trust_ratio"), got, want, strict=True):
        assert len(g) == len(w), name
        for j, (a, b) in enumerate(zip(g, w, strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, (what, name, j)
            assert_close(a, b, rtol, f"{what} {name} of leaf {j}")


@slow
@pytest.mark.parametrize("write_params", [False, True])
def test_backend_step_matches_reference_step(write_params):
    params, grads, momentum = _tree_case()
    spec = StepSpec.build(CLIP_CONFIG, params, grads, write_params=write_params, **MASKS)
    lr = jnp.asarray(0.1, jnp.float32)
    got = pallas.BACKEND.run(spec, StepInputs(params, grads, momentum, lr))
    _assert_results_close(got, _reference.run(spec, StepInputs(params, grads, momentum, lr)), 1e-5)
    assert float(got.trust_ratio[3]) == 0.5  # zero weights: r = 1, clipped to 0.5
    assert float(got.trust_ratio[2]) == 0.5  # empty leaf: the same, as in the reference


@slow
@pytest.mark.parametrize("write_params", [False, True])
def test_backend_updates_with_given_ratios_as_the_reference(write_params):
    """spec.given_ratios (the shards of a mesh): the update alone, with the
    ratios and global norm given; the ratios come back as given."""
    params, grads, momentum = _tree_case(10)
    spec = StepSpec.build(
        CLIP_CONFIG, params, grads, write_params=write_params, given_ratios=True, **MASKS
    )
    ratios = jnp.asarray(np.linspace(0.1, 0.9, len(params)), F32)
    given = dict(ratios=ratios, global_norm=jnp.float32(0.7))  # over the 0.2 clip
    lr = jnp.asarray(0.1, jnp.float32)
    got = pallas.BACKEND.run(spec, StepInputs(params, grads, momentum, lr, **given))
    want = _reference.run(spec, StepInputs(params, grads, momentum, lr, **given))
    _assert_results_close(got, want, 1e-6)
    np.testing.assert_array_equal(np.stack(got.trust_ratio), np.asarray(ratios))


VMAP_KERNELS = {
    "mosaic_tpu_fused": ("mosaic_tpu", TPU_BLOCKS),
    "mosaic_tpu_two_pass": ("mosaic_tpu", {**TPU_BLOCKS, "fused": False}),
    "mosaic_gpu": ("mosaic_gpu", {"tile": GPU_TILE}),
}


@slow
@pytest.mark.parametrize("apply", [False, True], ids=["step", "apply"])
@pytest.mark.parametrize("name", list(VMAP_KERNELS))
def test_backend_under_vmap_runs_each_problem(name, apply):
    """jit(vmap(step)) gives, per batch entry, the step of the unbatched call
    (the in-place launch must batch inside the front end's custom_jvp).

    The kernels run in interpret mode here, so their arithmetic is compiled by
    XLA into the batched program anew, which may contract a multiply-add into
    an FMA where the unbatched program does not (seen for the fused kernel on
    jax 0.11.2 and the two-pass kernel's apply form on 0.12): the results then
    agree to 1e-6 of the leaf's scale (as ``same_bits_across_programs`` has it
    in tests/backend_base.py), the trust ratios bitwise. Compiled for a device
    (not interpreted), the programs run one kernel and must agree bitwise.
    """
    kernel, kernel_options = VMAP_KERNELS[name]
    rng = np.random.default_rng(15)
    params = jnp.asarray(rng.standard_normal((3, 300)), F32)
    grads = jnp.asarray(0.1 * rng.standard_normal((3, 300)), F32)
    momentum = jnp.asarray(0.01 * rng.standard_normal((3, 300)), F32)
    bias = jnp.asarray(rng.standard_normal((3, 5)), F32)  # left to XLA on Mosaic GPU
    interpret = True  # every kernel here, on any machine (none is compiled for a device)

    def step(p, b, g, v):
        spec = StepSpec.build(
            LarsConfig(weight_decay=0.01),
            [p, b],
            [g, b],
            decay_mask=[True, False],
            trust_mask=[True, True],
            write_params=apply,
            options=options(kernel=kernel, interpret=interpret, **kernel_options),
        )
        return _autodiff.call(
            pallas.BACKEND, spec, StepInputs([p, b], [g, b], [v, b], jnp.float32(0.2))
        )

    batched = jax.jit(jax.vmap(step))(params, bias, grads, momentum)
    for k in range(3):
        one = step(params[k], bias[k], grads[k], momentum[k])
        for j, (x, y) in enumerate(zip(batched.trust_ratio, one.trust_ratio, strict=True)):
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y), f"ratio {j}")
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
            if interpret:
                assert_close(x[k], y, 1e-6, f"entry {k}")
            else:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y))


def test_backend_rejects_float64():
    """float64 leaves are not among the backend's dtypes: the front end refuses them."""
    assert (np.dtype(np.float64), np.dtype(np.float64)) not in pallas.BACKEND.dtypes
    with jax.enable_x64(True):
        params = {"w": jnp.zeros(3, jnp.float64)}
        opt = lars.lars(0.1, backend="pallas")
        with pytest.raises(TypeError, match="float64"):
            opt.update(params, opt.init(params), params)


def test_backend_is_registered_and_available_here():
    platform = jax.default_backend()
    assert "pallas" in lars.available_backends()
    assert lars._dispatch.get("pallas") is pallas.BACKEND
    assert pallas.BACKEND.unavailable(platform) is None
    w = [jnp.ones((130,), F32)]
    spec = StepSpec.build(LarsConfig(nesterov=True, trust_clip=1.0), w, w, **MASKS_ONE)
    assert pallas.BACKEND.unsupported(spec, platform) is None
    # Not SHARD_MAP: jax 0.11's Pallas interpreter rejects the kernels inside
    # shard_map (docs/pallas.md); the front end runs the reference there.
    assert pallas.BACKEND.features(platform) == {
        Feature.IN_PLACE,
        Feature.SKIP_NONFINITE,
        Feature.GIVEN_RATIOS,
    }
    assert pallas.default_kernel("gpu") == ("mosaic_gpu", False)
    assert pallas.default_kernel("tpu") == ("mosaic_tpu", False)
    assert pallas.default_kernel("cpu") == ("mosaic_tpu", True)


def test_backend_import_loads_no_pallas():
    """Importing the backend (what the registry does) leaves Pallas unloaded."""
    probe = (
        "import sys, lars.kernels.pallas as p; p.BACKEND.options({}); "
        "print(sorted(m for m in sys.modules if 'pallas' in m and not m.startswith('lars')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_backend_options_are_checked():
    from jax.experimental.pallas import tpu as pltpu

    check = pallas.BACKEND.options
    given = {"kernel": "mosaic_tpu", "block_rows": 64, "ring_blocks": 3, "fused": True}
    assert check(given) == given
    assert check({"kernel": "mosaic_gpu", "tile": 1024, "interpret": True})["tile"] == 1024
    assert check({"kernel": "mosaic_tpu", "interpret": pltpu.InterpretParams()})
    bad = [
        ({"kernel_options": {}}, ValueError, "unknown pallas backend_options"),
        ({"kernel": "cuda"}, ValueError, "kernel must be one of"),
        ({"kernel": "mosaic_tpu", "tile": 512}, ValueError, "tile is not an option of"),
        ({"kernel": "mosaic_gpu", "block_rows": 32}, ValueError, "block_rows is not an option"),
        ({"kernel": "mosaic_gpu", "tile": 1000}, ValueError, "tile must be a positive multiple"),
        ({"kernel": "mosaic_tpu", "block_rows": 40}, ValueError, "multiple of 32, got 40"),
        ({"kernel": "mosaic_tpu", "block_lanes": 0}, ValueError, "multiple of 128, got 0"),
        ({"kernel": "mosaic_tpu", "fused": 1}, TypeError, "fused must be a bool"),
        ({"kernel": "mosaic_tpu", "interpret": "yes"}, TypeError, "interpret must be a bool"),
        (
            {"kernel": "mosaic_gpu", "interpret": pltpu.InterpretParams()},
            TypeError,
            "InterpretGPUParams",
        ),
    ]
    for options_, error, match in bad:
        with pytest.raises(error, match=match):
            check(options_)
    # Through the front end, when the optimizer is made.
    with pytest.raises(ValueError, match="block_rows must be a positive multiple of 32"):
        lars.lars(0.1, backend="pallas", backend_options={"block_rows": 33})


@slow
def test_backend_deterministic_and_lr_does_not_recompile():
    params, grads, momentum = _tree_case(9)
    config = LarsConfig(weight_decay=0.01, grad_clip_norm=0.5)
    spec = StepSpec.build(config, params, grads, decay_mask=[True] * 7, trust_mask=[True] * 7)

    @jax.jit
    def step(lr):
        return pallas.BACKEND.run(spec, StepInputs(params, grads, momentum, lr))

    a = step(jnp.asarray(0.1, jnp.float32))
    b = step(jnp.asarray(0.1, jnp.float32))
    c = step(jnp.asarray(0.2, jnp.float32))
    assert step._cache_size() == 1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.updates[4]), np.asarray(c.updates[4]))


@slow
def test_backend_takes_traced_hyperparameters():
    """Hyperparameters injected as traced values (optax.inject_hyperparams) reach
    the kernels as data: a new value neither recompiles nor is ignored."""
    params = {"a": jnp.linspace(-1.0, 1.0, 300, dtype=F32), "b": jnp.ones((5,), F32)}
    grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    hyper = dict(momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, grad_clip_norm=0.05)
    opt = optax.inject_hyperparams(lars.lars, static_args=("backend",))(
        learning_rate=0.1, backend="pallas", **hyper
    )
    state = opt.init(params)
    update = jax.jit(opt.update)
    _, state = update(grads, state, params)
    changed = dict(hyper, momentum=0.5, weight_decay=0.1, trust_coefficient=0.03)
    for name, value in changed.items():
        state.hyperparams[name] = jnp.asarray(value, F32)
    got, _ = update(grads, state, params)
    assert update._cache_size() == 1
    ref = lars.lars(0.1, backend="reference", **changed)
    ref_state = ref.init(params)
    ref_state = ref_state._replace(momentum=state.inner_state.momentum)
    want, _ = ref.update(grads, ref_state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, 1e-5, "update with the injected values")
