"""Kernel-level tests of the Pallas LARS kernels (lars.kernels.pallas).

Both kernels run here in interpret mode, which executes the kernel code on the
CPU: Mosaic TPU through Pallas' XLA interpreter, Mosaic GPU through its GPU
simulator (slow: its cases are few and small); those tests are marked slow.
Each kernel is compared with its ``*_reference`` (same operations, no tiling)
and with float64 NumPy (``pallas_cases.py``). The block plans are checked
exhaustively in pure Python, and every kernel is lowered for the real device
(Mosaic GPU for "cuda", Mosaic TPU for "tpu"), which runs the Pallas and Mosaic
lowering passes that can run without one. The backend's ``run`` with a
``StepSpec`` is tested in ``test_pallas_backend_run.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pallas_cases import (
    ALL_ON,
    BF16,
    F16,
    F32,
    FLAG_SETS,
    GPU_TILE,
    SCALARS,
    TPU_BLOCKS,
    aliased_operands,
    assert_close,
    bits,
    leaf_spec,
    make_leaves,
    mosaic_ops,
    mosaic_tpu_kernels,
    oracle_sums,
    oracle_update,
)

from lars.contract import Scalar
from lars.kernels.pallas import elementwise as ew
from lars.kernels.pallas import gpu_plan, mosaic_gpu, mosaic_tpu, tpu_pipeline

slow = pytest.mark.slow

# --------------------------------------------------------------------------
# Plans: every element in exactly one block, no block past a leaf's end.

SIZES = [1, 2, 127, 128, 129, 4096, 4097, 65537, 3 * 3 * 64 * 64, 1000, 4096 + 130]


@pytest.mark.parametrize("tile", [512, 4096])
def test_gpu_plan_covers_every_element_once(tile):
    sizes = [n for n in SIZES if n >= 128]
    plan = gpu_plan.plan_tiles(sizes, tile)
    covered = [np.zeros(n, np.int32) for n in sizes]
    for block, (b, start) in enumerate(plan.table):
        branch = plan.branches[b]
        first, last = plan.leaf_blocks[branch.leaf]
        assert first <= block < last
        for piece_start, size, skip in mosaic_gpu._pieces(branch, int(start)):
            piece_start = int(piece_start)
            assert 0 <= piece_start and piece_start + size <= sizes[branch.leaf]  # in bounds
            assert size % 128 == 0 and 0 <= skip < size  # whole warpgroup granules
            covered[branch.leaf][piece_start + skip : piece_start + size] += 1
    assert all(np.all(c == 1) for c in covered)
    with pytest.raises(ValueError, match="127 < 128"):
        gpu_plan.plan_tiles([4096, 127], tile)
    small = [leaf_spec(n) for n in SIZES]
    assert gpu_plan.small_leaves(small) == [i for i, n in enumerate(SIZES) if n < 128]


def test_gpu_launch_groups_respect_the_parameter_budget():
    for n, per_leaf, budget in [(161, 5, gpu_plan.PARAM_BYTES), (161, 2, 4096), (7, 5, 456)]:
        groups = gpu_plan.launch_groups(n, per_leaf, budget)
        assert [i for g in groups for i in g] == list(range(n))  # all, in order, once
        for g in groups:  # 40-byte descriptors per buffer, 256 bytes for the rest
            assert 256 + 40 * per_leaf * len(g) <= budget
    assert len(gpu_plan.launch_groups(161, 5)) == 2  # ResNet-50's update: 2 launches
    with pytest.raises(ValueError, match="no room"):
        gpu_plan.launch_groups(3, 5, 300)


@pytest.mark.parametrize("blocks", [(32, 256), (512, 8192)])
def test_tpu_plan_covers_every_element_once(blocks):
    plan = tpu_pipeline.plan_tiles(SIZES, *blocks)
    covered = [np.zeros(tpu_pipeline.leaf_view(n), np.int32) for n in SIZES]
    for b, start in plan.table:
        branch = plan.branches[b]
        start = int(start) if branch.full else branch.start
        window = tpu_pipeline.window(branch, start)
        view = covered[branch.leaf]
        index = tuple(slice(w.start, w.start + w.size) if hasattr(w, "size") else w for w in window)
        axis = 0 if branch.kind == tpu_pipeline.ROWS else 1
        assert index[axis].stop <= view.shape[axis]
        view[index] += 1
    assert all(np.all(c == 1) for c in covered)
    for view, n in zip(plan.views, SIZES, strict=True):
        assert view[0] * view[1] == n and (view[1] == 128 or view[0] == 1)


def test_plans_reject_untileable_blocks():
    with pytest.raises(ValueError, match="multiple of 512"):
        gpu_plan.plan_tiles([10], 1000)
    with pytest.raises(ValueError, match="multiple of 32"):
        tpu_pipeline.plan_tiles([10], 40, 256)
    with pytest.raises(ValueError, match="multiple of 128"):
        tpu_pipeline.plan_tiles([10], 32, 200)


# --------------------------------------------------------------------------
# The Mosaic TPU kernels (XLA interpreter).


# 0-d; one element; odd; odd spanning 16 (1, 256) blocks plus a remainder; 2 full
# (32, 128) blocks plus a remainder; a conv kernel (36 rows: one block plus 4 rows).
def check_update(leaves, flags, got, reference) -> None:
    """An update pass's outputs against the float64 oracle and the plain-JAX reference."""
    (upd, mom), (ref_upd, ref_mom) = got, reference
    oracle = oracle_update(leaves, flags)
    for j, (spec, (want_upd, want_mom)) in enumerate(zip(leaves.specs, oracle, strict=True)):
        assert upd[j].dtype == spec.param_dtype and upd[j].shape == spec.shape
        assert mom[j].dtype == F32 and mom[j].shape == spec.shape
        low = spec.param_dtype != F32
        assert_close(upd[j], want_upd, 8e-3 if low else 1e-5, f"update of leaf {j}")
        assert_close(mom[j], want_mom, 1e-5, f"momentum of leaf {j}")
        assert_close(upd[j], ref_upd[j], 8e-3 if low else 2e-6, f"update {j} vs reference")
        assert_close(mom[j], ref_mom[j], 2e-6, f"momentum {j} vs reference")


TPU_SHAPES = [(), (1,), (127,), (4097,), (80, 128), (3, 3, 16, 32)]
MIXED = [(F32, F32), (F32, BF16), (BF16, BF16), (F32, F16), (F32, BF16), (BF16, BF16)]


@slow
@pytest.mark.parametrize("flags_name", ["plain", "all"])
def test_tpu_kernels_match_references_and_float64(flags_name):
    flags = FLAG_SETS[flags_name]
    leaves = make_leaves(TPU_SHAPES, MIXED, seed=1)
    scalars = jnp.asarray(SCALARS)
    kw = dict(flags=flags, leaves=leaves.specs)
    sums = jax.jit(
        lambda w, g, s: mosaic_tpu.leaf_sums(w, g, s, interpret=True, **kw, **TPU_BLOCKS)
    )(leaves.params, leaves.grads, scalars)
    want = oracle_sums(leaves, flags)
    ref = mosaic_tpu.leaf_sums_reference(leaves.params, leaves.grads, scalars, **kw)
    for j in range(len(TPU_SHAPES)):
        assert_close(sums[j], want[j], 1e-5, f"sums of leaf {j} vs float64")
        assert_close(sums[j], ref[j], 2e-6, f"sums of leaf {j} vs reference")

    upd, mom = jax.jit(
        lambda w, g, v, r, s: mosaic_tpu.update(w, g, v, r, s, interpret=True, **kw, **TPU_BLOCKS)
    )(leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios), scalars)
    ref_upd, ref_mom = mosaic_tpu.update_reference(
        leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios), scalars, **kw
    )
    check_update(leaves, flags, (upd, mom), (ref_upd, ref_mom))


@slow
def test_tpu_global_norm_pass():
    leaves = make_leaves(TPU_SHAPES, MIXED, seed=2)
    sums = jax.jit(
        lambda g, s: mosaic_tpu.leaf_sums(
            None, g, s, flags=ew.Flags(), leaves=leaves.specs, interpret=True, **TPU_BLOCKS
        )
    )(leaves.grads, jnp.asarray(SCALARS))
    want = oracle_sums(leaves, ew.Flags(), with_params=False)
    for j in range(len(TPU_SHAPES)):
        assert_close(sums[j], want[j], 1e-5, f"sum of g**2 of leaf {j}")


@slow
def test_tpu_kernel_in_the_tpu_simulator():
    """The TPU simulator (which models DMAs and semaphores) gives the same numbers.

    Up to float32 rounding: the two interpreters compile the arithmetic into
    different XLA programs, which may contract a multiply and an add into one
    fused operation in one and not the other.
    """
    from jax.experimental.pallas import tpu as pltpu

    shapes = [(5,), (300,), (70, 128)]
    leaves = make_leaves(shapes, [(F32, BF16), (F32, F32), (BF16, BF16)], seed=3)
    args = (leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios))
    kw = dict(flags=ALL_ON, leaves=leaves.specs, **TPU_BLOCKS)
    run = lambda interpret: jax.jit(
        lambda w, g, v, r, s: mosaic_tpu.update(w, g, v, r, s, interpret=interpret, **kw)
    )(*args, jnp.asarray(SCALARS))
    sim, xla = run(pltpu.InterpretParams()), run(True)
    for j, (a, b) in enumerate(zip(jax.tree.leaves(sim), jax.tree.leaves(xla), strict=True)):
        assert_close(a, b, 2e-6, f"output {j}")


# --------------------------------------------------------------------------
# The Mosaic GPU kernels (GPU simulator: about half a second per block).

# 0-d and 127 (left to XLA); 130 = a 128 piece + a window; 300 = 256 + a window;
# 3 * 515 = 1545 = 2 full 512-tiles + an end block of 521 (512 + a window).
GPU_SHAPES = [(), (127,), (130,), (300,), (3, 515)]
GPU_DTYPES = [(F32, F32), (F32, BF16), (BF16, BF16), (F32, F16), (F32, BF16)]


@slow
def test_gpu_kernels_match_references_and_float64():
    flags = ALL_ON
    leaves = make_leaves(GPU_SHAPES, GPU_DTYPES, seed=4)
    scalars = jnp.asarray(SCALARS)
    # 600 parameter bytes: the update pass takes one launch per leaf (3 launches).
    kw = dict(flags=flags, leaves=leaves.specs, tile=GPU_TILE, param_bytes=600, interpret=True)
    sums = jax.jit(lambda w, g, s: mosaic_gpu.leaf_sums(w, g, s, **kw))(
        leaves.params, leaves.grads, scalars
    )
    want = oracle_sums(leaves, flags)
    for j in range(len(GPU_SHAPES)):
        assert_close(sums[j], want[j], 1e-5, f"sums of leaf {j} vs float64")

    upd, mom = jax.jit(lambda w, g, v, r, s: mosaic_gpu.update(w, g, v, r, s, **kw))(
        leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios), scalars
    )
    ref_upd, ref_mom = mosaic_gpu.update_reference(
        leaves.params,
        leaves.grads,
        leaves.momentum,
        jnp.asarray(leaves.ratios),
        scalars,
        flags=flags,
        leaves=leaves.specs,
    )
    check_update(leaves, flags, (upd, mom), (ref_upd, ref_mom))


@slow
def test_gpu_global_norm_pass():
    leaves = make_leaves(GPU_SHAPES[1:], GPU_DTYPES[1:], seed=5)
    sums = jax.jit(
        lambda g, s: mosaic_gpu.leaf_sums(
            None, g, s, flags=ew.Flags(), leaves=leaves.specs, tile=GPU_TILE, interpret=True
        )
    )(leaves.grads, jnp.asarray(SCALARS))
    want = oracle_sums(leaves, ew.Flags(), with_params=False)
    for j in range(len(leaves.specs)):
        assert_close(sums[j], want[j], 1e-5, f"sum of g**2 of leaf {j}")


# The leaves under 128 elements, summed in XLA in one reduction per weight-decay
# setting (every 2nd leaf decays): 0-d, 1, 64 and 127 elements, mixed dtypes.
SMALL_SHAPES = [(), (1,), (64,), (127,), (2, 3, 5), (8, 8)]
SMALL_DTYPES = [(F32, F32), (F32, BF16), (BF16, BF16), (F32, F16), (F32, F32), (BF16, F32)]


@pytest.mark.parametrize("flags_name", list(FLAG_SETS))
def test_small_leaves_sums_in_one_reduction_match_float64(flags_name):
    flags = FLAG_SETS[flags_name]
    leaves = make_leaves(SMALL_SHAPES, SMALL_DTYPES, seed=6)
    scalars = jnp.asarray(SCALARS)
    sums = jax.jit(lambda w, g, s: mosaic_gpu.small_sums(w, g, s, flags, leaves.specs))(
        leaves.params, leaves.grads, scalars
    )
    want = oracle_sums(leaves, flags)
    assert sums.shape == (len(SMALL_SHAPES), 2)
    for j in range(len(SMALL_SHAPES)):
        assert_close(sums[j], want[j], 1e-5, f"sums of leaf {j} vs float64")
    # Without params: the global-norm pass (sum of g**2, then 0).
    g2 = jax.jit(lambda g, s: mosaic_gpu.small_sums(None, g, s, ew.Flags(), leaves.specs))(
        leaves.grads, scalars
    )
    want = oracle_sums(leaves, ew.Flags(), with_params=False)
    for j in range(len(SMALL_SHAPES)):
        assert_close(g2[j], want[j], 1e-5, f"sum of g**2 of leaf {j}")


# --------------------------------------------------------------------------
# In place: the update pass writing new params (and momenta) over the inputs.

# Per kernel: its update launcher's options and test shapes (the GPU simulator
# is slow: few blocks).
IN_PLACE = {
    "mosaic_tpu": (mosaic_tpu, dict(interpret=True, **TPU_BLOCKS), TPU_SHAPES, MIXED),
    "mosaic_gpu": (mosaic_gpu, dict(interpret=True, tile=GPU_TILE), GPU_SHAPES, GPU_DTYPES),
}


@slow
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_update_kernels_write_params_as_optax_apply_updates(name):
    """write_params gives optax.apply_updates(params, updates) bit for bit, and
    the same momenta, with params and momenta donated (written over) or not."""
    module, opts, shapes, dtypes = IN_PLACE[name]
    leaves = make_leaves(shapes, dtypes, seed=11)
    args = (leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios))
    scalars = jnp.asarray(SCALARS)

    def run(write_params, donate):
        flags = dataclasses.replace(ALL_ON, write_params=write_params)

        def fn(w, g, v, r, s):
            return module.update(w, g, v, r, s, flags=flags, leaves=leaves.specs, **opts)

        copies = jax.tree.map(jnp.copy, args)  # donation must not consume the shared inputs
        return jax.jit(fn, donate_argnums=(0, 2) if donate else ())(*copies, scalars)

    updates, momentum = run(False, False)
    want = optax.apply_updates(leaves.params, updates)
    for donate in (False, True):
        new_params, new_momentum = run(True, donate)
        for j in range(len(shapes)):
            assert new_params[j].dtype == leaves.specs[j].param_dtype
            np.testing.assert_array_equal(np.asarray(new_params[j]), np.asarray(want[j]))
            np.testing.assert_array_equal(np.asarray(new_momentum[j]), np.asarray(momentum[j]))
    assert any(not np.array_equal(np.asarray(u), 0) for u in updates)  # the step moved


@slow
@pytest.mark.parametrize("write_params", [False, True])
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_update_kernels_skip_a_nonfinite_step(name, write_params):
    """With skip_nonfinite and FINITE = 0 (NaN and Inf in the gradients), the
    kernels leave params and momenta bitwise as they were and write updates of
    -0.0; with FINITE = 1 they give the bits of the kernel without the flag."""
    module, opts, shapes, dtypes = IN_PLACE[name]
    leaves = make_leaves(shapes, dtypes, seed=13)
    grads = list(leaves.grads)
    grads[-1] = grads[-1].reshape(-1).at[0].set(jnp.nan).reshape(grads[-1].shape)
    grads[1] = jnp.full_like(grads[1], jnp.inf)
    base = dataclasses.replace(ALL_ON, write_params=write_params)

    def run(flags, finite, g):
        scalars = jnp.asarray(SCALARS).at[Scalar.FINITE].set(finite)

        def fn(w, g, v, r):
            return module.update(w, g, v, r, scalars, flags=flags, leaves=leaves.specs, **opts)

        return jax.jit(fn)(leaves.params, g, leaves.momentum, jnp.asarray(leaves.ratios))

    skipping = dataclasses.replace(base, skip_nonfinite=True)
    first, momentum = run(skipping, 0.0, grads)
    for j, spec in enumerate(leaves.specs):
        keep = leaves.params[j] if write_params else jnp.full(shapes[j], -0.0, spec.param_dtype)
        assert first[j].dtype == spec.param_dtype
        np.testing.assert_array_equal(bits(first[j]), bits(keep))
        np.testing.assert_array_equal(bits(momentum[j]), bits(leaves.momentum[j]))
    taken = run(skipping, 1.0, leaves.grads)
    plain = run(base, 0.0, leaves.grads)  # FINITE is not read without the flag
    for a, b in zip(jax.tree.leaves(taken), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("write_params", [False, True])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_update_kernels_alias_params_and_momenta(platform, write_params):
    """Lowered for the device, the update call writes the new momenta (and with
    write_params the new params) over its inputs: an XLA alias per leaf, so
    XLA can write into donated buffers instead of allocating new ones."""
    module, first = (mosaic_tpu, 2) if platform == "tpu" else (mosaic_gpu, 3)  # scalar operands
    shapes = [(130,), (300,), (4097,), (3, 3, 16, 32)]  # >= 128 elements: all in the kernel
    leaves = make_leaves(shapes, MIXED[: len(shapes)], seed=12)
    flags = dataclasses.replace(ALL_ON, write_params=write_params, skip_nonfinite=True)

    def fn(w, g, v, r, s):
        return module.update(w, g, v, r, s, flags=flags, leaves=leaves.specs)

    args = (leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios))
    text = (
        jax.jit(fn, donate_argnums=(0, 2))
        .trace(*args, jnp.asarray(SCALARS))
        .lower(lowering_platforms=(platform,))
        .as_text()
    )
    n = len(shapes)
    momenta = set(range(first + 2 * n, first + 3 * n))
    params = set(range(first, first + n)) if write_params else set()
    assert aliased_operands(text) == [momenta | params]


# --------------------------------------------------------------------------
# Lowering for the real devices (no device needed).


def _lower_both_passes(module, platform, leaves, **kw):
    scalars = jnp.asarray(SCALARS)
    opts = dict(flags=ALL_ON, leaves=leaves.specs, **kw)
    sums = jax.jit(lambda w, g, s: module.leaf_sums(w, g, s, **opts))
    sums.trace(leaves.params, leaves.grads, scalars).lower(lowering_platforms=(platform,))
    upd = jax.jit(lambda w, g, v, r, s: module.update(w, g, v, r, s, **opts))
    lowered = upd.trace(
        leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios), scalars
    ).lower(lowering_platforms=(platform,))
    return lowered.as_text()


def test_mosaic_tpu_lowers_for_tpu():
    leaves = make_leaves(TPU_SHAPES, MIXED, seed=6)
    text = _lower_both_passes(mosaic_tpu, "tpu", leaves)
    assert text.count("tpu_custom_call") == 1


def test_mosaic_tpu_update_negates_without_subtracting():
    """The update is written ``step * -1``: Mosaic TPU lowers ``-x`` as ``0 - x``,
    which gives +0.0 for a zero step where the reference's ``-step`` gives -0.0
    (interpret mode negates in XLA, so only the kernel's MLIR can show it)."""
    leaves = make_leaves([(64, 128), (300,)], [(F32, F32), (BF16, BF16)], seed=14)
    flags = dataclasses.replace(ALL_ON, clip_value=False, skip_nonfinite=True)

    def fn(w, g, v, r, s):
        return mosaic_tpu.update(w, g, v, r, s, flags=flags, leaves=leaves.specs)

    args = (leaves.params, leaves.grads, leaves.momentum, jnp.asarray(leaves.ratios))
    text = jax.jit(fn).trace(*args, jnp.asarray(SCALARS)).lower(lowering_platforms=("tpu",))
    (kernel,) = mosaic_tpu_kernels(text.as_text())
    ops = mosaic_ops(kernel)
    assert "arith.mulf" in ops  # the parse saw the kernel's arithmetic
    assert "arith.subf" not in ops


def test_mosaic_gpu_lowers_for_cuda():
    leaves = make_leaves(TPU_SHAPES, MIXED, seed=7)
    text = _lower_both_passes(mosaic_gpu, "cuda", leaves)
    assert text.count("mosaic_gpu") >= 1
