"""Tests of the fused one-pass Mosaic TPU kernel (lars.kernels.pallas.mosaic_tpu_fused).

The kernel runs in interpret mode: through Pallas' XLA interpreter, and in the
TPU simulator, which executes each DMA either when it starts or only when it
is waited for, so a load into a ring slot that is still in use gives wrong
numbers in one mode or the other. The schedule is replayed in plain Python.
Results are compared with the kernel's reference, with the two-pass kernels,
and with float64 NumPy. Small blocks and small rings make the test leaves span
several blocks, wrap around the ring many times, and split between the fused
kernel and the two-pass kernels. The interpret-mode tests are marked slow.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu
from pallas_cases import (
    ALL_ON,
    BF16,
    F16,
    F32,
    FLAG_SETS,
    SCALARS,
    TPU_BLOCKS,
    aliased_operands,
    assert_close,
    bits,
    leaf_spec,
    make_leaves,
    mosaic_ops,
    mosaic_tpu_kernels,
    options,
    oracle_sums,
    oracle_update,
)

import lars
from lars import _reference
from lars.contract import LarsConfig, Scalar, StepInputs, StepSpec
from lars.kernels import pallas
from lars.kernels.pallas import elementwise as ew
from lars.kernels.pallas import fused_plan, mosaic_tpu
from lars.kernels.pallas import mosaic_tpu_fused as fused

# The trust scalars the fused kernel reads from the scalars vector.
TRUST_COEFFICIENT, EPS, TRUST_CLIP = (
    float(SCALARS[Scalar.TRUST_COEFFICIENT]),
    float(SCALARS[Scalar.EPS]),
    float(SCALARS[Scalar.TRUST_CLIP]),
)
slow = pytest.mark.slow

# With TPU_BLOCKS: 1 block; 1; 1; 17 (1, 256) blocks; 2 (32, 128) blocks and a
# remainder; a conv kernel of 2 blocks; 1; 5 (32, 128) blocks.
SHAPES = [(), (1,), (127,), (4097,), (80, 128), (3, 3, 16, 32), (300,), (160, 128)]
DTYPES = [
    (F32, F32),
    (F32, BF16),
    (BF16, BF16),
    (F32, F16),
    (F32, BF16),
    (BF16, BF16),
    (F32, F32),
    (F32, F32),
]


def oracle_ratios(leaves, flags, trust_clip: bool) -> np.ndarray:
    """Float64 trust ratios from the float64 sums."""
    sums = oracle_sums(leaves, flags)
    w_norm, u_norm = np.sqrt(sums[:, 0]), np.sqrt(sums[:, 1])
    r = TRUST_COEFFICIENT * w_norm / (u_norm + EPS)
    r = np.where((w_norm == 0) | (u_norm == 0), 1.0, r)
    if trust_clip:
        r = np.minimum(r, TRUST_CLIP)
    return np.where([spec.trust for spec in leaves.specs], r, 1.0)


def split(leaves, ring: int):
    """(the leaves the fused kernel takes, their indices) for a ring of ``ring`` slots."""
    fits, got_ring = fused_plan.fusable(leaves.specs, ring_blocks=ring, **TPU_BLOCKS)
    assert got_ring == ring
    idx = [i for i, fit in enumerate(fits) if fit]
    pick = lambda xs: [xs[i] for i in idx]
    part = dataclasses.replace(
        leaves,
        specs=pick(leaves.specs),
        shapes=pick(leaves.shapes),
        params=pick(leaves.params),
        grads=pick(leaves.grads),
        momentum=pick(leaves.momentum),
        ratios=leaves.ratios[idx],
    )
    return part, idx


def run_fused(leaves, flags, ring, *, interpret=True, scalars=SCALARS, **jit):
    def fn(w, g, v, s):
        return fused.fused_update(
            w,
            g,
            v,
            s,
            flags=flags,
            leaves=leaves.specs,
            ring_blocks=ring,
            interpret=interpret,
            **TPU_BLOCKS,
        )

    args = jax.tree.map(jnp.copy, (leaves.params, leaves.grads, leaves.momentum))
    return jax.jit(fn, **jit)(*args, jnp.asarray(scalars))


# --------------------------------------------------------------------------
# The schedule.


def replay(fplan: fused_plan.FusedPlan) -> None:
    """Replays the fused schedule: every block is loaded once, before the kernel
    waits for it, into a slot whose last block the kernel has used; when the
    ring holds two layers, the next layer's loads have all started before a
    layer begins."""
    ring, slot_block = fplan.ring, {}
    started, used = set(), set()

    def load(lo: int, hi: int) -> None:
        for b in range(lo, hi):
            assert b not in started, f"block {b} loaded twice"
            previous = slot_block.get(b % ring)
            assert previous is None or previous in used, f"block {b} over unused {previous}"
            slot_block[b % ring] = b
            started.add(b)

    per_leaf = [[e.first + k for e in entries for k in range(e.count)] for entries in fplan.entries]
    assert [b for blocks in per_leaf for b in blocks] == list(range(fplan.num_blocks))
    two_fit = all(len(a) + len(b) <= ring for a, b in itertools.pairwise(per_leaf))
    load(*fplan.initial)
    for j, blocks in enumerate(per_leaf):
        for b in blocks:  # the kernel waits for them: started, and still in their slot
            assert b in started and slot_block[b % ring] == b, (j, b)
        if two_fit and j + 1 < len(per_leaf):
            assert set(per_leaf[j + 1]) <= started, f"leaf {j + 1} not under way"
        used.update(blocks)
        load(*fplan.refills[j])
    assert started == used == set(range(fplan.num_blocks))


def test_fused_schedule_replays_safely():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = [int(n) for n in rng.integers(1, 40 * 128, rng.integers(1, 12))]
        blocks = [fused_plan.leaf_blocks(n, **TPU_BLOCKS) for n in sizes]
        ring = max(blocks) + int(rng.integers(0, 3 * max(blocks) + 2))
        fplan = fused_plan.plan_fused(sizes, max(ring, 2), **TPU_BLOCKS)
        for j, entries in enumerate(fplan.entries):
            assert all(e.branch.leaf == j for e in entries)
        replay(fplan)
    plan = fused_plan.plan_fused([4 * 32 * 128, 300, 128, 1], 5, **TPU_BLOCKS)  # 4, 2, 1, 1
    assert plan.initial == (0, 5) and plan.refills == ((5, 8), (8, 8), (8, 8), (8, 8))


def test_fused_schedule_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="leaf 1 has 3 blocks, more than the ring's 2 slots"):
        fused_plan.plan_fused([100, 3 * 32 * 128], 2, **TPU_BLOCKS)
    with pytest.raises(ValueError, match="at least 2 slots"):
        fused_plan.plan_fused([100], 1, **TPU_BLOCKS)


def test_fusable_and_the_default_ring():
    # (n / 128, 128) views of 3, 160 and 7813 rows: 1, 5 and 245 blocks of 32 rows.
    specs = [leaf_spec(128 * n) for n in (3, 5 * 32, 7813)]
    fits, ring = fused_plan.fusable(specs, ring_blocks=4, **TPU_BLOCKS)
    assert (fits, ring) == ([True, False, False], 4)
    # Default blocks, no TPU attached: a TPU v5e, 128 MiB of VMEM, half for the
    # ring: 64 MiB over a float32 (512, 128) block of w and one of g (256 KiB each).
    fits, ring = fused_plan.fusable(specs)
    assert ring == 128 and fits == [True, True, True]
    big = leaf_spec(129 * 512 * 128)  # 129 blocks
    assert fused_plan.fusable([big])[0] == [False]


# --------------------------------------------------------------------------
# The kernel (interpret mode).


@slow
@pytest.mark.parametrize("ring", [2, 5, 64])
@pytest.mark.parametrize("flags_name", ["plain", "all"])
def test_fused_kernel_matches_two_pass_kernels_and_float64(flags_name, ring):
    flags = FLAG_SETS[flags_name]
    leaves = make_leaves(SHAPES, DTYPES, seed=21)
    leaves.specs[6] = dataclasses.replace(leaves.specs[6], trust=False)
    leaves, idx = split(leaves, ring)
    assert 0 < len(idx) and (ring == 64) == (len(idx) == len(SHAPES))
    scalars = jnp.asarray(SCALARS)
    trust_clip = flags.trust_clip
    assert trust_clip == (flags_name == "all")
    first, momentum, ratios = run_fused(leaves, flags, ring)

    # The ratios: float64, and the two-pass kernels' (the same sums, in the same
    # order, and the same ratio operations, in XLA; equal to the rounding of the
    # interpreted arithmetic, which XLA compiles into each program anew).
    want = oracle_ratios(leaves, flags, trust_clip)
    assert_close(ratios, want, 1e-5, "ratios vs float64")
    kw = dict(flags=flags, leaves=leaves.specs, **TPU_BLOCKS)
    sums = mosaic_tpu.leaf_sums(leaves.params, leaves.grads, scalars, interpret=True, **kw)
    clip = scalars[Scalar.TRUST_CLIP] if trust_clip else None
    two_pass = ew.trust_ratio(
        sums[:, 0], sums[:, 1], scalars[Scalar.TRUST_COEFFICIENT], scalars[Scalar.EPS], clip
    )
    two_pass = jnp.where(np.asarray([s.trust for s in leaves.specs]), two_pass, 1.0)
    assert_close(ratios, two_pass, 1e-6, "ratios vs two-pass")

    # The update with those ratios: float64, the two-pass update kernel, the reference.
    leaves.ratios = np.asarray(ratios)
    upd, mom = mosaic_tpu.update(
        leaves.params, leaves.grads, leaves.momentum, ratios, scalars, interpret=True, **kw
    )
    ref = fused.fused_update_reference(leaves.params, leaves.grads, leaves.momentum, scalars, **kw)
    for j, (spec, (want_upd, want_mom)) in enumerate(
        zip(leaves.specs, oracle_update(leaves, flags), strict=True)
    ):
        assert first[j].dtype == spec.param_dtype and first[j].shape == leaves.shapes[j]
        assert momentum[j].dtype == F32 and momentum[j].shape == leaves.shapes[j]
        low = spec.param_dtype != F32
        assert_close(first[j], want_upd, 8e-3 if low else 1e-5, f"update of leaf {j}")
        assert_close(momentum[j], want_mom, 1e-5, f"momentum of leaf {j}")
        assert_close(first[j], upd[j], 8e-3 if low else 2e-6, f"update {j} vs two-pass")
        assert_close(momentum[j], mom[j], 2e-6, f"momentum {j} vs two-pass")
        assert_close(first[j], ref[0][j], 8e-3 if low else 2e-6, f"update {j} vs reference")
        assert_close(momentum[j], ref[1][j], 2e-6, f"momentum {j} vs reference")
    assert_close(ratios, ref[2], 1e-6, "ratios vs reference")


@slow
@pytest.mark.parametrize("mode", ["eager", "on_wait"])
def test_fused_kernel_in_the_tpu_simulator(mode):
    """The TPU simulator runs each DMA when it starts ("eager") or when it is
    waited for ("on_wait"): a load over a slot still in use, or a wait before
    the load, changes the numbers in one mode or the other."""
    shapes = [(5,), (300,), (70, 128), (3, 3, 16, 32), (100, 128)]
    leaves = make_leaves(shapes, DTYPES[:5], seed=3)
    leaves.specs[3] = dataclasses.replace(leaves.specs[3], trust=False)  # no norms: r = 1
    assert [fused_plan.leaf_blocks(s.size, **TPU_BLOCKS) for s in leaves.specs] == [1, 2, 3, 2, 4]
    params = pltpu.InterpretParams(dma_execution_mode=mode)
    got = run_fused(leaves, ALL_ON, 4, interpret=params)
    want = run_fused(leaves, ALL_ON, 4)  # the XLA interpreter
    for j, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert_close(a, b, 2e-6, f"output {j}")


@slow
@pytest.mark.parametrize("write_params", [False, True])
def test_fused_kernel_skips_a_nonfinite_step(write_params):
    """FINITE = 0: params and momenta bitwise as they were, updates -0.0, ratios 1."""
    leaves = make_leaves(SHAPES[:6], DTYPES[:6], seed=22)
    leaves.grads[4] = leaves.grads[4].at[0, 0].set(jnp.nan)
    leaves.grads[1] = jnp.full_like(leaves.grads[1], jnp.inf)
    flags = dataclasses.replace(ALL_ON, write_params=write_params, skip_nonfinite=True)
    scalars = SCALARS.copy()
    scalars[Scalar.FINITE] = 0.0
    first, momentum, ratios = run_fused(leaves, flags, 64, scalars=scalars)
    np.testing.assert_array_equal(np.asarray(ratios), np.ones(6, np.float32))
    for j, spec in enumerate(leaves.specs):
        keep = leaves.params[j] if write_params else jnp.full(SHAPES[j], -0.0, spec.param_dtype)
        np.testing.assert_array_equal(bits(first[j]), bits(keep))
        np.testing.assert_array_equal(bits(momentum[j]), bits(leaves.momentum[j]))


@slow
def test_fused_kernel_writes_params_as_optax_apply_updates():
    """write_params: the new params are ``optax.apply_updates(params, updates)``
    (to the rounding of the interpreted arithmetic: the two programs are
    compiled apart), the momenta and ratios are the same, donated or not."""
    leaves = make_leaves(SHAPES, DTYPES, seed=23)
    updates, momentum, ratios = run_fused(leaves, ALL_ON, 64)
    want = optax.apply_updates(leaves.params, updates)
    flags = dataclasses.replace(ALL_ON, write_params=True)
    for donate in ((), (0, 2)):
        new_params, new_momentum, new_ratios = run_fused(leaves, flags, 64, donate_argnums=donate)
        np.testing.assert_array_equal(np.asarray(new_ratios), np.asarray(ratios))
        for j, spec in enumerate(leaves.specs):
            assert new_params[j].dtype == spec.param_dtype
            low = spec.param_dtype != F32
            assert_close(new_params[j], want[j], 8e-3 if low else 1e-6, f"params {j}")
            assert_close(new_momentum[j], momentum[j], 1e-6, f"momentum {j}")
    assert all(np.any(np.asarray(u) != 0) for u in updates)


# --------------------------------------------------------------------------
# Lowered for a TPU (no TPU needed).


@pytest.mark.parametrize("write_params", [False, True])
def test_fused_kernel_lowers_for_tpu_in_place(write_params):
    """One Mosaic kernel; the momenta (and with write_params the params) aliased
    to its outputs; its VMEM limit is the ring and stream buffers plus a margin;
    it negates by multiplying (no subf: Mosaic TPU's 0 - x gives +0.0)."""
    leaves = make_leaves(
        [(64, 128), (300,), (3, 3, 16, 32)], [(F32, F32), (BF16, BF16), (F32, BF16)]
    )
    flags = dataclasses.replace(ALL_ON, clip_value=False, write_params=write_params)
    assert flags.trust_clip
    fits, ring = fused_plan.fusable(leaves.specs)

    def fn(w, g, v, s):
        return fused.fused_update(w, g, v, s, flags=flags, leaves=leaves.specs, ring_blocks=ring)

    args = (leaves.params, leaves.grads, leaves.momentum, jnp.asarray(SCALARS))
    lowered = jax.jit(fn, donate_argnums=(0, 2)).trace(*args).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    n = 3  # operands: the scalars, then n params, n gradients, n momenta
    momenta = set(range(1 + 2 * n, 1 + 3 * n))
    params = set(range(1, 1 + n)) if write_params else set()
    assert aliased_operands(text) == [momenta | params]
    (kernel,) = mosaic_tpu_kernels(text)
    ops = mosaic_ops(kernel)
    assert {"math.sqrt", "arith.divf", "tpu.enqueue_dma"} <= ops  # the ratio is in the kernel
    assert "arith.subf" not in ops
    (limit,) = re.findall(r"\\22size\\22: (\d+)", text)
    # Default blocks: (512, 128) rows; a (1, 8192) lanes block pads to 8
    # float32 (16 bfloat16) sublanes, 256 KiB. Per ring slot: w float32 rows
    # and bfloat16 lanes; g float32 rows, bfloat16 lanes and bfloat16 rows.
    rows32, rows16, lanes = 512 * 128 * 4, 512 * 128 * 2, 32 * 8192
    per_slot = rows32 + lanes + rows32 + lanes + rows16
    assert ring == 64 * 2**20 // per_slot and all(fits)
    # Streams, 2 slots each: v in, the first result, v out (rows and lanes each).
    streams = 3 * 2 * (rows32 + lanes)
    assert int(limit) == ring * per_slot + streams + fused.VMEM_MARGIN
    assert int(limit) <= 128 * 2**20  # within a v5e's VMEM


# --------------------------------------------------------------------------
# Through the backend.


@slow
def test_backend_splits_leaves_between_fused_and_two_pass():
    """With a ring of 2 slots, the (80, 128) and (4097,) leaves take the two
    passes and the rest the fused kernel; the step matches the reference with
    that split, with every leaf fused, and with none."""
    rng = np.random.default_rng(24)
    shapes = [(), (7,), (0,), (300,), (80, 128), (3, 3, 16, 32), (4097,)]
    params = [jnp.asarray(rng.standard_normal(s), F32) for s in shapes]
    grads = [
        jnp.asarray(0.1 * rng.standard_normal(s), BF16 if i % 2 else F32)
        for i, s in enumerate(shapes)
    ]
    momentum = [jnp.asarray(0.01 * rng.standard_normal(s), F32) for s in shapes]
    config = LarsConfig(weight_decay=0.01, trust_clip=0.5, nesterov=True, grad_clip_norm=2.0)
    masks = dict(decay_mask=[True] * 7, trust_mask=[True, True, True, True, False, True, True])
    spec = StepSpec.build(config, params, grads, **masks)
    lr = jnp.float32(0.3)
    want = _reference.run(spec, StepInputs(params, grads, momentum, lr))
    fits, _ = fused_plan.fusable([s for s in spec.leaves if s.size], ring_blocks=2, **TPU_BLOCKS)
    assert fits == [True, True, True, False, True, False]
    for extra in ({"ring_blocks": 2}, {"fused": False}, {}):
        got = pallas.BACKEND.run(
            spec.replace(options=options(**TPU_BLOCKS, **extra)),
            StepInputs(params, grads, momentum, lr),
        )
        for name, a, b in zip(["updates", "momentum", "trust_ratio"], got, want, strict=True):
            for j, (x, y) in enumerate(zip(a, b, strict=True)):
                assert x.shape == y.shape and x.dtype == y.dtype, (name, j)
                assert_close(x, y, 1e-5, f"{extra} {name} of leaf {j}")


def test_backend_rejects_fused_options_it_cannot_honour():
    """When the optimizer is made (``Backend.options``), and by ``run``."""
    for bad, match in [
        ({"kernel": "mosaic_gpu", "fused": True}, "mosaic_gpu kernel has no fused one-pass kernel"),
        ({"ring_blocks": 1}, "ring_blocks must be an int >= 2, got 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            lars.lars(0.1, backend="pallas", backend_options=bad)
        w = [jnp.ones((130,), F32)]
        spec = StepSpec.build(
            LarsConfig(), w, w, decay_mask=[True], trust_mask=[True], options=options(**bad)
        )
        with pytest.raises(ValueError, match=match):
            pallas.BACKEND.run(spec, StepInputs(w, w, w, jnp.float32(0.1)))


def test_resnet50_is_one_fused_launch_on_a_v5e():
    """ResNet-50's 161 float32 leaves all fit the default ring (no TPU attached:
    a v5e), so a step is one launch reading w and g once; its largest layer
    (36 blocks) and the next fit the ring together, so each layer's loads start
    before the layer before it is done."""
    from bench.workloads import resnet50_shapes

    sizes = [int(np.prod(s)) for s in resnet50_shapes()]
    specs = [leaf_spec(n) for n in sizes]
    fits, ring = fused_plan.fusable(specs)
    assert len(fits) == 161 and all(fits)
    # float32 (512, 128) row blocks and (1, 8192) lane blocks (the 64-element
    # norms), 256 KiB each, for w and g: 1 MiB per slot, 64 MiB of ring.
    assert ring == 64
    fplan = fused_plan.plan_fused(sizes, ring)
    blocks = [sum(e.count for e in entries) for entries in fplan.entries]
    assert max(blocks) == 36 and max(map(sum, itertools.pairwise(blocks))) <= ring
    replay(fplan)
