"""The fused Triton launch's claim / arrive / ready protocol, checked by bench/fused_protocol.py.

The model runs the backend's own item tables and launch geometry (captured
from ``step.pass_fused``), so these tests hold the real schedule: no
interleaving deadlocks for any number of resident programs, and no update of
a layer with a trust ratio runs before all of its layer's partial sums. The
negative controls show that the model sees each hazard it is meant to see.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fused_protocol as F  # noqa: E402
from bench import workloads as W  # noqa: E402
from lars.kernels.triton import plan as P  # noqa: E402


def _launch(shapes, **kw) -> F.FusedLaunch:
    (launch,) = F.captured_launches(F.make_plan(shapes, **kw))
    return launch


@pytest.fixture(scope="module")
def resnet() -> F.FusedLaunch:
    return _launch(W.RESNET50.shapes)


def _expected_items(sizes, trust, chunk) -> int:
    """Items of a fused table, counted from the design: a multi-chunk trust layer has a
    sums and an update item per chunk, a one-chunk trust layer one item, any other
    layer an update item per chunk."""
    total = 0
    for n, t in zip(sizes, trust, strict=True):
        chunks = -(-n // chunk)
        total += 2 * chunks if t and chunks > 1 else chunks
    return total


def _order_holds(table: np.ndarray, finished: list[int]) -> None:
    """Every trust-layer update finished after all of its layer's sums (checked from the trace)."""
    position = {row: k for k, row in enumerate(finished)}
    assert sorted(position) == list(range(len(table))), "every item finishes exactly once"
    for slot in np.unique(table[:, P.COL_SLOT]):
        rows = table[:, P.COL_SLOT] == slot
        sums = np.flatnonzero(rows & (table[:, P.COL_KIND] == P.KIND_SUMS))
        updates = np.flatnonzero(rows & (table[:, P.COL_KIND] == P.KIND_UPDATE))
        if sums.size:
            assert min(position[u] for u in updates) > max(position[s] for s in sums)


# --------------------------------------------------------------------------
# The launch as the step issues it.


@pytest.mark.parametrize("workload", [W.RESNET50, W.TRANSFORMER], ids=lambda w: w.name)
def test_launch_grid_is_the_item_count_and_counters_are_zeroed(workload):
    sizes = [int(np.prod(s)) for s in workload.shapes]
    launches = F.captured_launches(F.make_plan(workload.shapes))
    assert len(launches) == 1
    (launch,) = launches
    assert launch.grid == launch.items == _expected_items(sizes, [True] * len(sizes), P.CHUNK)
    assert launch.sync_zeroed
    assert launch.slots == len(sizes)


def test_more_leaves_than_slots_make_launches_each_with_its_own_grid():
    shapes = [(5,), (40,), (17,), (3,), (64,)]
    plan = F.make_plan(shapes, slots=2, chunk=8, block=8, lookahead=1)
    launches = F.captured_launches(plan)
    assert [launch.slots for launch in launches] == [2, 2, 1]
    for launch, planned in zip(launches, plan.launches(P.FUSED), strict=True):
        assert launch.grid == launch.items and launch.sync_zeroed
        np.testing.assert_array_equal(launch.table, planned.table)


def test_a_spin_limit_moves_the_per_slot_words_after_the_error_word():
    launch = _launch(W.RESNET50.shapes, spin_limit=64)
    assert launch.slot_base == 2 and launch.sync_zeroed
    assert F.simulate(launch, 528).ok
    stale = F.completed_sync(launch)
    stale[0] = 0
    stale[2::2] = 0  # arrivals zeroed, ready flags left over
    assert _early_updates(F.simulate(launch, 264, sync=stale, policy="latest_row").violations)


# --------------------------------------------------------------------------
# The real tables: no schedule deadlocks, updates wait for their sums.


# latest_row scans every resident program per step: not run with the whole grid resident.
_RESIDENCY = [(p, r) for p in F.POLICIES for r in (1, 2, 3, 264, 528, None)]


@pytest.mark.parametrize("policy, resident", [c for c in _RESIDENCY if c != ("latest_row", None)])
def test_resnet50_every_policy_and_residency(resnet, policy, resident):
    resident = resnet.grid if resident is None else resident
    out = F.simulate(resnet, resident, policy=policy, seed=resident)
    assert out.ok, out.violations
    _order_holds(resnet.table, out.finished)


@pytest.mark.parametrize("lookahead", [0, 1, 64, 1024])
def test_resnet50_other_lookaheads_and_masks(lookahead):
    shapes = W.RESNET50.shapes
    mask = [len(s) > 1 for s in shapes]  # 1-D leaves without trust ratio or decay
    for launch in (
        _launch(shapes, lookahead=lookahead),
        _launch(shapes, lookahead=lookahead, trust=mask, decay=mask),
    ):
        for resident in (1, 7, 528):
            out = F.simulate(launch, resident, seed=lookahead + resident)
            assert out.ok, out.violations
            _order_holds(launch.table, out.finished)


def test_transformer_table():
    launch = _launch(W.TRANSFORMER.shapes, grad_dtype="bfloat16")
    for resident, policy in ((1, "round_robin"), (528, "random"), (2112, "round_robin")):
        out = F.simulate(launch, resident, policy=policy)
        assert out.ok, out.violations
        _order_holds(launch.table, out.finished)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=10),
    data=st.data(),
    chunk=st.sampled_from([1, 2, 4, 8]),
    lookahead=st.integers(0, 12),
    slots=st.integers(1, 12),
    policy=st.sampled_from(F.POLICIES),
    seed=st.integers(0, 2**16),
)
def test_random_trees(sizes, data, chunk, lookahead, slots, policy, seed):
    trust = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    plan = F.make_plan(
        [(n,) for n in sizes], trust=trust, chunk=chunk, block=1, lookahead=lookahead, slots=slots
    )
    launches = F.captured_launches(plan)
    nonempty = [(n, t) for n, t in zip(sizes, trust, strict=True) if n]
    assert sum(launch.items for launch in launches) == _expected_items(
        [n for n, _ in nonempty], [t for _, t in nonempty], chunk
    )
    for launch in launches:
        assert launch.grid == launch.items and launch.sync_zeroed
        resident = data.draw(st.integers(1, launch.grid + 1))
        out = F.simulate(launch, resident, policy=policy, seed=seed)
        assert out.ok, out.violations
        _order_holds(launch.table, out.finished)


@pytest.mark.parametrize(
    "shapes, trust, lookahead",
    [
        ([(3,), (1,), (2,)], None, 0),
        ([(3,), (1,), (2,)], None, 3),
        ([(2,), (2,), (1,)], [True, False, True], 1),
        ([(4,), (3,)], None, 1),
    ],
)
def test_every_schedule_of_small_launches(shapes, trust, lookahead):
    launch = _launch(shapes, trust=trust, chunk=1, block=1, lookahead=lookahead)
    for resident in range(1, 5):
        out, states = F.explore(launch, resident)
        assert out.ok, (resident, out.violations)
        assert states > launch.items


# --------------------------------------------------------------------------
# Negative controls: each hazard is caught.


def _early_updates(violations: list[str]) -> list[str]:
    """The violations that report an update run before all of its layer's sums."""
    found = (re.search(r"ran with (\d+) of (\d+) sums done", v) for v in violations)
    return [m.group(0) for m in found if m and int(m.group(1)) < int(m.group(2))]


def test_counters_not_zeroed_are_caught(resnet):
    stale = F.completed_sync(resnet)
    out = F.simulate(resnet, 264, sync=stale)  # every claim is past the item count: all exit
    assert any(f"{resnet.items} items never ran" in v for v in out.violations)
    out = F.simulate(resnet, 264, sync=stale, guard=False)
    assert any("read past its table" in v for v in out.violations)
    flags_only = stale.copy()
    flags_only[0] = 0  # the item counter zeroed, the arrivals and ready flags left over
    out = F.simulate(resnet, 1, sync=flags_only)
    assert any("ratio not published" in v for v in out.violations)
    ready_only = stale.copy()
    ready_only[0] = 0
    ready_only[1::2] = 0  # arrivals zeroed, ready flags stale: updates overtake their sums
    out = F.simulate(resnet, 264, sync=ready_only, policy="latest_row")
    assert _early_updates(out.violations)
    arrivals_only = stale.copy()
    arrivals_only[0] = 0
    arrivals_only[2::2] = 0  # the last arrival is never seen: no ratio is published
    assert F.simulate(resnet, 264, sync=arrivals_only).deadlock


def test_counters_not_zeroed_caught_in_every_schedule_search():
    launch = _launch([(3,), (1,), (2,)], chunk=1, block=1, lookahead=1)
    out, _ = F.explore(launch, 2, sync=F.completed_sync(launch))
    assert not out.ok
    ready_only = F.completed_sync(launch)
    ready_only[0] = 0
    ready_only[1::2] = 0
    out, _ = F.explore(launch, 2, sync=ready_only)
    assert any("update of slot" in v for v in out.violations)  # before its ratio


def test_a_larger_grid_is_harmless_with_the_guard_and_a_smaller_one_is_caught(resnet):
    assert (resnet.table[:, P.COL_ITEMS] == resnet.items).all()
    out = F.simulate(resnet, 264, grid=resnet.grid + 3)  # the extra programs exit
    assert out.ok and not out.violations
    out = F.simulate(resnet, 264, grid=resnet.grid + 1, guard=False)
    assert any("read past its table" in v for v in out.violations)
    out = F.simulate(resnet, 264, grid=resnet.grid - 1)
    assert any("never ran" in v for v in out.violations)
    small = _launch([(3,), (1,), (2,)], chunk=1, block=1, lookahead=1)
    out, _ = F.explore(small, 2, grid=small.grid + 2)
    assert out.ok
    out, _ = F.explore(small, 2, grid=small.grid + 1, guard=False)
    assert not out.ok


def test_reordered_table_is_caught(resnet):
    table = F.update_before_sums(resnet.table)
    out = F.simulate(resnet, 1, table=table)
    assert out.deadlock
    small = _launch([(3,), (2,)], chunk=1, block=1, lookahead=0)
    out, _ = F.explore(small, 1, table=F.update_before_sums(small.table))
    assert out.deadlock


def test_claiming_by_program_id_can_deadlock(resnet):
    """Why rows are claimed with an atomic counter: programs need not start in id order."""
    backwards = list(range(resnet.grid))[::-1]
    out = F.simulate(resnet, 264, claim="program_id", start_order=backwards)
    assert out.deadlock
    assert F.simulate(resnet, 264, claim="program_id").ok  # in id order it happens to work


def test_bad_arguments_are_rejected(resnet):
    with pytest.raises(ValueError, match="resident"):
        F.simulate(resnet, 0)
    with pytest.raises(ValueError, match="policy"):
        F.simulate(resnet, 1, policy="fastest")
    with pytest.raises(ValueError, match="claim"):
        F.simulate(resnet, 1, claim="guess")
    with pytest.raises(ValueError, match="start_order"):
        F.simulate(resnet, 1, claim="program_id", start_order=[0, 0])
