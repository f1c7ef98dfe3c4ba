"""Tests of eplb_pynccl.planner (CPU only)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eplb_pynccl.planner import RankPlan, RearrangementPlan, plan_rearrangement
from eplb_pynccl.simulate import simulate_plan

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# map generators
# ---------------------------------------------------------------------------------------


def random_maps(seed, num_layers, ep, per_rank, num_experts, p_empty_old, p_empty_new, p_keep):
    """Random old/new maps with redundancy and -1 slots; new only needs what old holds."""
    rng = np.random.default_rng(seed)
    n = ep * per_rank
    old = rng.integers(0, num_experts, size=(num_layers, n))
    old[rng.random((num_layers, n)) < p_empty_old] = -1
    new = np.empty_like(old)
    for layer in range(num_layers):
        held = np.unique(old[layer][old[layer] >= 0])
        if held.size == 0:
            new[layer] = -1
            continue
        new[layer] = rng.choice(held, size=n)
        keep = rng.random(n) < p_keep
        new[layer][keep] = old[layer][keep]
        new[layer][rng.random(n) < p_empty_new] = -1
    return old.astype(np.int64), new.astype(np.int64)


@st.composite
def map_cases(draw):
    ep = draw(st.integers(1, 16))
    per_rank = draw(st.integers(1, 8))
    num_layers = draw(st.integers(1, 4))
    n = ep * per_rank
    num_experts = draw(st.integers(1, max(1, n + 2)))
    p_empty_old = draw(st.sampled_from([0.0, 0.1, 0.4]))
    p_empty_new = draw(st.sampled_from([0.0, 0.1, 0.4]))
    p_keep = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rpn = draw(st.one_of(st.none(), st.integers(1, ep)))
    old, new = random_maps(
        seed, num_layers, ep, per_rank, num_experts, p_empty_old, p_empty_new, p_keep
    )
    return old, new, ep, rpn


def permutation_maps(seed, num_layers, ep, per_rank, num_logical, num_redundant, keep):
    """Structured: every logical expert present, some replicated (an EPLB-like placement)."""
    rng = np.random.default_rng(seed)
    n = ep * per_rank
    assert n == num_logical + num_redundant

    def one():
        ids = np.concatenate([np.arange(num_logical), rng.choice(num_logical, num_redundant)])
        return rng.permutation(ids)

    old = np.stack([one() for _ in range(num_layers)])
    new = np.stack([one() for _ in range(num_layers)])
    k = rng.random(old.shape) < keep
    new[k] = old[k]
    # keeping slots can drop a logical expert from new: fine, new needs nothing more.
    return old.astype(np.int64), new.astype(np.int64)


# ---------------------------------------------------------------------------------------
# the invariant checker
# ---------------------------------------------------------------------------------------


def check_plan(plan: RearrangementPlan, old, new, ep, rpn=None):
    old = np.asarray(old, dtype=np.int64)
    new = np.asarray(new, dtype=np.int64)
    _check_layout(plan, old, new, ep)
    _check_order_and_destinations(plan, old, new, ep)
    _check_transfer_endpoints(plan, old, new, ep)
    _check_copies_and_sources(plan, old, new, ep)
    if rpn is not None:
        _check_node_preference(plan, old, ep, rpn)
    _check_rank_views(plan, ep)


_TRANSFER_FIELDS = ("layer", "src_rank", "src_row", "dst_rank", "dst_row", "expert")
_COPY_FIELDS = ("layer", "rank", "src_row", "dst_row", "expert", "src_is_new")


def _transfers(plan: RearrangementPlan):
    """The transfer arrays t_*, in the order of _TRANSFER_FIELDS."""
    return tuple(getattr(plan, "t_" + f) for f in _TRANSFER_FIELDS)


def _copies(plan: RearrangementPlan):
    """The copy arrays c_*, in the order of _COPY_FIELDS."""
    return tuple(getattr(plan, "c_" + f) for f in _COPY_FIELDS)


def _check_layout(plan: RearrangementPlan, old, new, ep):
    """Sizes, dtypes and shapes of the plan's arrays, `changed`, and the rank/row ranges."""
    L, N = old.shape
    P = N // ep
    assert (plan.num_layers, plan.num_physical, plan.ep_size, plan.slots_per_rank) == (
        L,
        N,
        ep,
        P,
    )
    for name in ("t_layer", "t_src_rank", "t_src_row", "t_dst_rank", "t_dst_row", "t_expert"):
        a = getattr(plan, name)
        assert a.dtype == np.int64 and a.shape == plan.t_layer.shape, name
    for name in ("c_layer", "c_rank", "c_src_row", "c_dst_row", "c_expert"):
        a = getattr(plan, name)
        assert a.dtype == np.int64 and a.shape == plan.c_layer.shape, name
    assert plan.c_src_is_new.dtype == np.bool_ and plan.c_src_is_new.shape == plan.c_layer.shape
    assert plan.source_needed.shape == (L, N) and plan.source_needed.dtype == np.bool_
    changed = (new != old) & (new != -1)
    np.testing.assert_array_equal(plan.changed, changed)

    for a in (plan.t_src_rank, plan.t_dst_rank):
        assert ((a >= 0) & (a < ep)).all()
    for a in (plan.t_src_row, plan.t_dst_row, plan.c_src_row, plan.c_dst_row):
        assert ((a >= 0) & (a < P)).all()


def _check_order_and_destinations(plan: RearrangementPlan, old, new, ep):
    """Sorted transfers and copies; the result is the new map; each changed row written once."""
    L, N = old.shape
    P = N // ep
    tl, ts, _, td, tdr, te = _transfers(plan)
    cl, cr, _, cdr, ce, _ = _copies(plan)
    # ordering
    tkey = ((tl * ep + ts) * ep + td) * P + tdr
    assert (np.diff(tkey) > 0).all(), "transfers not sorted by (layer, src, dst, dst_row)"
    ckey = (cl * ep + cr) * P + cdr
    assert (np.diff(ckey) > 0).all(), "copies not sorted by (layer, rank, dst_row)"

    # the result is the new map
    out = simulate_plan(plan, old, new)
    np.testing.assert_array_equal(np.where(new == -1, -1, out), new)

    # destinations: exactly the changed rows, each once, with the right expert
    changed = (new != old) & (new != -1)
    t_dst_slot = td * P + tdr
    c_dst_slot = cr * P + cdr
    written = np.zeros((L, N), dtype=np.int64)
    np.add.at(written, (tl, t_dst_slot), 1)
    np.add.at(written, (cl, c_dst_slot), 1)
    np.testing.assert_array_equal(written, changed.astype(np.int64))
    np.testing.assert_array_equal(te, new[tl, t_dst_slot])
    np.testing.assert_array_equal(ce, new[cl, c_dst_slot])


def _best_row(old3, new3, layer, rank, e):
    """The preferred source row: an unchanged holder row, else the lowest holder row."""
    rows = np.flatnonzero(old3[layer, rank] == e)
    keep = rows[new3[layer, rank, rows] == e]
    return int(keep[0] if keep.size else rows[0])


def _check_transfer_endpoints(plan: RearrangementPlan, old, new, ep):
    """Each (layer, dst_rank, expert) once; sender holds it, receiver does not; best rows."""
    L, N = old.shape
    P = N // ep
    tl, ts, tsr, td, _, te = _transfers(plan)
    # no (layer, dst_rank, expert) crosses the network twice
    trip = set(zip(tl.tolist(), td.tolist(), te.tolist(), strict=True))
    assert len(trip) == tl.size

    old3 = old.reshape(L, ep, P)
    new3 = new.reshape(L, ep, P)
    # the sender held the expert; the receiver did not; no self-sends
    assert (old[tl, ts * P + tsr] == te).all()
    assert (ts != td).all()
    for layer, dst, e in trip:
        assert e not in old3[layer, dst]

    # preferred source rows: an unchanged holder row, else the lowest holder row
    for layer, src, srow, e in zip(
        tl.tolist(), ts.tolist(), tsr.tolist(), te.tolist(), strict=True
    ):
        assert srow == _best_row(old3, new3, layer, src, e)


def _check_copies_and_sources(plan: RearrangementPlan, old, new, ep):
    """Each copy's source holds its expert (old or received); source_needed is what is read."""
    L, N = old.shape
    P = N // ep
    tl, ts, tsr, td, tdr, te = _transfers(plan)
    cl, cr, csr, cdr, ce, cn = _copies(plan)
    old3 = old.reshape(L, ep, P)
    new3 = new.reshape(L, ep, P)
    # copies: old-content sources hold e in old; new-content sources receive e by network
    recv_rows = {
        (layer, d, r): e
        for layer, d, r, e in zip(tl.tolist(), td.tolist(), tdr.tolist(), te.tolist(), strict=True)
    }
    for layer, rank, srow, drow, e, is_new in zip(
        cl.tolist(), cr.tolist(), csr.tolist(), cdr.tolist(), ce.tolist(), cn.tolist(), strict=True
    ):
        if is_new:
            assert recv_rows.get((layer, rank, srow)) == e
            assert srow < drow  # the lowest row needing e is the one that receives
            assert e not in old3[layer, rank]
        else:
            assert old3[layer, rank, srow] == e
            assert srow == _best_row(old3, new3, layer, rank, e)

    # source_needed: exactly the rows whose old content is read
    needed = np.zeros((L, N), dtype=bool)
    needed[tl, ts * P + tsr] = True
    needed[cl[~cn], cr[~cn] * P + csr[~cn]] = True
    np.testing.assert_array_equal(plan.source_needed, needed)


def _check_node_preference(plan: RearrangementPlan, old, ep, rpn):
    """A transfer comes from the receiver's node whenever a rank of that node holds the expert."""
    L, N = old.shape
    old3 = old.reshape(L, ep, N // ep)
    for layer, src, dst, e in zip(
        plan.t_layer.tolist(),
        plan.t_src_rank.tolist(),
        plan.t_dst_rank.tolist(),
        plan.t_expert.tolist(),
        strict=True,
    ):
        holders = np.flatnonzero((old3[layer] == e).any(axis=1))
        if (holders // rpn == dst // rpn).any():
            assert src // rpn == dst // rpn


def _check_rank_views(plan: RearrangementPlan, ep):
    """Per-rank views agree with the plan and with each other (each send is a peer's recv)."""
    P = plan.slots_per_rank
    tl, ts, td, cl, cr = plan.t_layer, plan.t_src_rank, plan.t_dst_rank, plan.c_layer, plan.c_rank
    views = [plan.rank_view(r) for r in range(ep)]
    assert sum(v.num_sends for v in views) == plan.num_transfers
    assert sum(v.num_recvs for v in views) == plan.num_transfers
    assert sum(v.num_copies for v in views) == plan.num_copies
    np.testing.assert_array_equal(plan.sent_per_rank(), [v.num_sends for v in views])
    np.testing.assert_array_equal(plan.received_per_rank(), [v.num_recvs for v in views])
    for a in views:
        assert isinstance(a, RankPlan)
        skey = (a.s_layer * ep + a.s_peer) * P + a.s_dst_row
        assert (np.diff(skey) > 0).all()
        rkey = (a.r_layer * ep + a.r_peer) * P + a.r_dst_row
        assert (np.diff(rkey) > 0).all()
        assert (np.diff(a.c_layer * P + a.c_dst_row) > 0).all()
        for b in views:
            sm = a.s_peer == b.rank
            rm = b.r_peer == a.rank
            for x, y in (
                (a.s_layer[sm], b.r_layer[rm]),
                (a.s_src_row[sm], b.r_src_row[rm]),
                (a.s_dst_row[sm], b.r_dst_row[rm]),
                (a.s_expert[sm], b.r_expert[rm]),
            ):
                np.testing.assert_array_equal(x, y)
    for layer in range(plan.num_layers):
        inv = plan.layer_ranks_involved(layer)
        expect = set(ts[tl == layer].tolist()) | set(td[tl == layer].tolist())
        expect |= set(cr[cl == layer].tolist())
        assert inv.tolist() == sorted(expect)


# ---------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------


@SETTINGS
@given(map_cases())
def test_random_maps(case):
    old, new, ep, rpn = case
    plan = plan_rearrangement(old, new, ep, ranks_per_node=rpn)
    check_plan(plan, old, new, ep, rpn)
    # deterministic
    assert plan.equals(plan_rearrangement(old, new, ep, ranks_per_node=rpn))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ep=st.sampled_from([1, 2, 4, 8, 16]),
    num_layers=st.integers(1, 4),
    keep=st.sampled_from([0.0, 0.33, 0.9]),
    rpn=st.sampled_from([None, 2, 4]),
)
def test_eplb_like_maps(seed, ep, num_layers, keep, rpn):
    assume(rpn is None or rpn <= ep)  # more ranks per node than ranks is refused (tested below)
    per_rank = 5
    n = ep * per_rank
    num_redundant = max(1, n // 5)
    old, new = permutation_maps(
        seed, num_layers, ep, per_rank, n - num_redundant, num_redundant, keep
    )
    plan = plan_rearrangement(old, new, ep, ranks_per_node=rpn, num_logical=n - num_redundant)
    check_plan(plan, old, new, ep, rpn)


@settings(max_examples=50, deadline=None)
@given(case=map_cases(), seed=st.integers(0, 2**32 - 1))
def test_relabelling_ids_changes_only_the_ids(case, seed):
    """Plans depend on where experts sit, not on their ids (also covers huge, sparse ids)."""
    old, new, ep, rpn = case
    rng = np.random.default_rng(seed)
    top = int(max(old.max(), new.max())) + 1
    labels = rng.choice(2**62, size=top, replace=False).astype(np.int64)
    relabel = np.concatenate([labels, [-1]])  # index -1 -> -1
    old2, new2 = relabel[old], relabel[new]
    a = plan_rearrangement(old, new, ep, ranks_per_node=rpn)
    b = plan_rearrangement(old2, new2, ep, ranks_per_node=rpn)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("t_expert", "c_expert"):
            np.testing.assert_array_equal(relabel[x], y)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y
    check_plan(b, old2, new2, ep, rpn)


# ---------------------------------------------------------------------------------------
# worked examples
# ---------------------------------------------------------------------------------------


def test_worked_example():
    # rank 0 rows | rank 1 rows
    old = [[0, 1, 2, 3, 4, 0]]
    new = [[3, 1, 3, 0, 2, 2]]
    plan = plan_rearrangement(old, new, 2)
    # expert 2 (rank 0 row 2) -> rank 1 row 1; expert 3 (rank 1 row 0) -> rank 0 row 0
    assert plan.t_layer.tolist() == [0, 0]
    assert plan.t_src_rank.tolist() == [0, 1]
    assert plan.t_src_row.tolist() == [2, 0]
    assert plan.t_dst_rank.tolist() == [1, 0]
    assert plan.t_dst_row.tolist() == [1, 0]
    assert plan.t_expert.tolist() == [2, 3]
    # rank 0 row 2 duplicates row 0's new 3; rank 1 row 0 copies old row 2 (expert 0);
    # rank 1 row 2 duplicates row 1's new 2
    assert plan.c_rank.tolist() == [0, 1, 1]
    assert plan.c_src_row.tolist() == [0, 2, 1]
    assert plan.c_dst_row.tolist() == [2, 0, 2]
    assert plan.c_expert.tolist() == [3, 0, 2]
    assert plan.c_src_is_new.tolist() == [True, False, True]
    assert plan.source_needed.tolist() == [[False, False, True, True, False, True]]
    assert plan.changed.tolist() == [[True, False, True, True, True, True]]
    check_plan(plan, old, new, 2)
    r1 = plan.rank_view(1)
    assert (r1.s_peer.tolist(), r1.s_src_row.tolist(), r1.s_dst_row.tolist()) == ([0], [0], [0])
    assert (r1.r_peer.tolist(), r1.r_src_row.tolist(), r1.r_dst_row.tolist()) == ([0], [2], [1])
    assert r1.c_src_row.tolist() == [2, 1] and r1.c_src_is_new.tolist() == [False, True]
    assert plan.layer_ranks_involved(0).tolist() == [0, 1]
    assert "transfers=2" in repr(plan) and "copies=3" in repr(plan)


def test_local_copy_prefers_unchanged_row_then_lowest():
    # one rank: rows 1 and 3 hold 7; row 1 changes, row 3 keeps 7 -> rows needing 7 copy row 3
    old = [[5, 7, 6, 7]]
    new = [[7, 6, 7, 7]]
    plan = plan_rearrangement(old, new, 1)
    assert plan.num_transfers == 0
    by_dst = dict(zip(plan.c_dst_row.tolist(), plan.c_src_row.tolist(), strict=True))
    assert by_dst[0] == 3 and by_dst[2] == 3
    assert by_dst[1] == 2  # expert 6 is at row 2 only
    check_plan(plan, old, new, 1)
    # no unchanged holder: lowest holder row
    old = [[5, 7, 6, 7]]
    new = [[7, 6, 5, 6]]
    plan = plan_rearrangement(old, new, 1)
    by_dst = dict(zip(plan.c_dst_row.tolist(), plan.c_src_row.tolist(), strict=True))
    assert by_dst == {0: 1, 1: 2, 2: 0, 3: 2}
    assert not plan.c_src_is_new.any()
    check_plan(plan, old, new, 1)


def test_swaps_read_old_content():
    # rows swap on one rank and across ranks: every read must see the old state
    old = [[1, 2, 3, 4]]
    new = [[2, 1, 4, 3]]
    for ep in (1, 2, 4):
        plan = plan_rearrangement(old, new, ep)
        check_plan(plan, old, new, ep)
        assert plan.source_needed.all()


def test_network_once_per_rank_and_lowest_row_receives():
    old = [[9, 0, 0, 0, 1, 1, 1, 1]]
    new = [[9, 0, 0, 0, 9, 1, 9, 9]]
    plan = plan_rearrangement(old, new, 2)
    assert plan.num_transfers == 1
    assert (plan.t_dst_rank.tolist(), plan.t_dst_row.tolist()) == ([1], [0])
    assert plan.c_src_row.tolist() == [0, 0] and plan.c_src_is_new.all()
    check_plan(plan, old, new, 2)


def test_no_change_gives_empty_plan():
    rng = np.random.default_rng(0)
    m = rng.integers(-1, 20, size=(3, 24))
    for ep in (1, 3, 8, 24):
        plan = plan_rearrangement(m, m.copy(), ep)
        assert plan.is_empty and plan.num_transfers == 0 and plan.num_copies == 0
        assert not plan.source_needed.any() and not plan.changed.any()
        assert plan.sent_per_rank().tolist() == [0] * ep
        for r in range(ep):
            v = plan.rank_view(r)
            assert v.num_sends == v.num_recvs == v.num_copies == 0
    # new all -1: nothing is needed
    plan = plan_rearrangement(m, np.full_like(m, -1), 4)
    assert plan.is_empty
    # zero layers
    plan = plan_rearrangement(np.zeros((0, 8), np.int64), np.zeros((0, 8), np.int64), 2)
    assert plan.is_empty and plan.changed.shape == (0, 8)


def test_plan_arrays_are_read_only():
    plan = plan_rearrangement([[0, 1]], [[1, 0]], 2)
    with pytest.raises(ValueError):
        plan.t_layer[0] = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.ep_size = 3


# ---------------------------------------------------------------------------------------
# sender choice: balance and node preference
# ---------------------------------------------------------------------------------------


def fan_out_case(ep, holders, requesters, num_layers):
    """Expert 0 is held on `holders` and needed by `requesters` (row 1) in every layer.

    Every other slot holds a distinct filler expert that never moves.
    """
    P = 2
    old = np.arange(1, 1 + num_layers * ep * P, dtype=np.int64).reshape(num_layers, ep * P)
    for r in holders:
        old[:, r * P] = 0
    new = old.copy()
    for r in requesters:
        new[:, r * P + 1] = 0
    return old, new


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_balance_matches_ideal(data):
    ep = data.draw(st.integers(3, 16))
    k = data.draw(st.integers(2, ep - 1))
    ranks = data.draw(st.permutations(range(ep)))
    holders, others = sorted(ranks[:k]), ranks[k:]
    m = data.draw(st.integers(1, len(others)))
    requesters = sorted(others[:m])
    num_layers = data.draw(st.integers(1, 4))
    old, new = fan_out_case(ep, holders, requesters, num_layers)
    plan = plan_rearrangement(old, new, ep)
    check_plan(plan, old, new, ep)
    sent = plan.sent_per_rank()
    total = m * num_layers
    assert sent.sum() == total
    # ideal: the total spread over the k holders as evenly as possible (cumulative over layers)
    assert sorted(sent[holders].tolist()) == sorted(
        [total // k + (i < total % k) for i in range(k)]
    )
    assert sent[[r for r in range(ep) if r not in holders]].sum() == 0
    # tie-break goes to the lower rank
    assert sent[holders].tolist() == sorted(sent[holders].tolist(), reverse=True)


def test_balance_is_cumulative_over_layers():
    # 3 holders, 4 requests per layer, 3 layers: 12 sends -> 4 each (per-layer greedy with
    # a fixed tie-break would give rank 0 two per layer)
    old, new = fan_out_case(8, [0, 1, 2], [3, 4, 5, 6], 3)
    plan = plan_rearrangement(old, new, 8)
    assert plan.sent_per_rank()[:3].tolist() == [4, 4, 4]


def test_balance_accounts_for_forced_sends():
    # rank 0 must send expert 1 to ranks 2 and 3 (only holder); expert 0 is held on ranks 0
    # and 1 and needed by ranks 2 and 3: both should come from rank 1
    old = np.array([[0, 1, 0, 10, 11, 12, 13, 14]])
    new = np.array([[0, 1, 0, 10, 1, 0, 1, 0]])
    plan = plan_rearrangement(old, new, 4)
    check_plan(plan, old, new, 4)
    assert plan.sent_per_rank().tolist() == [2, 2, 0, 0]


def test_fewest_candidates_first():
    # expert 0 on ranks 0, 1, 2; expert 1 on ranks 0, 1. Rank 3 wants 0, ranks 4 and 5 want 1.
    # In slot order rank 0 would send twice; placing the constrained requests (expert 1)
    # first gives one send per holder.
    old = np.array([[0, 1, 0, 1, 0, 20, 21, 22, 23, 24, 25, 26]])
    new = np.array([[0, 1, 0, 1, 0, 20, 0, 22, 1, 24, 1, 26]])
    plan = plan_rearrangement(old, new, 6)
    check_plan(plan, old, new, 6)
    assert plan.sent_per_rank().tolist() == [1, 1, 1, 0, 0, 0]


def test_ranks_per_node_preference():
    # expert 0 on ranks 0 (node 0) and 5 (node 1); requested only by node 0's ranks 1, 2, 3
    old, new = fan_out_case(8, [0, 5], [1, 2, 3], 1)
    balanced = plan_rearrangement(old, new, 8)
    assert balanced.sent_per_rank()[[0, 5]].tolist() == [2, 1]
    near = plan_rearrangement(old, new, 8, ranks_per_node=4)
    assert near.sent_per_rank()[[0, 5]].tolist() == [3, 0]
    check_plan(near, old, new, 8, rpn=4)
    # requesters on both nodes: each node serves its own
    old, new = fan_out_case(8, [0, 5], [1, 2, 4, 6, 7], 1)
    plan = plan_rearrangement(old, new, 8, ranks_per_node=4)
    pairs = sorted(zip(plan.t_src_rank.tolist(), plan.t_dst_rank.tolist(), strict=True))
    assert pairs == [(0, 1), (0, 2), (5, 4), (5, 6), (5, 7)]
    # no holder on the receiver's node: fall back to balance over all holders
    old, new = fan_out_case(8, [0, 1], [4, 5, 6, 7], 1)
    plan = plan_rearrangement(old, new, 8, ranks_per_node=4)
    assert plan.sent_per_rank()[[0, 1]].tolist() == [2, 2]
    check_plan(plan, old, new, 8, rpn=4)
    # several holders on the node: balance among those
    old, new = fan_out_case(8, [0, 1, 4], [2, 3], 1)
    plan = plan_rearrangement(old, new, 8, ranks_per_node=4)
    assert plan.sent_per_rank()[[0, 1, 4]].tolist() == [1, 1, 0]


# ---------------------------------------------------------------------------------------
# determinism and input types
# ---------------------------------------------------------------------------------------


def test_same_plan_from_lists_numpy_and_torch():
    torch = pytest.importorskip("torch")
    old, new = permutation_maps(3, 4, 4, 6, 20, 4, 0.3)
    ref = plan_rearrangement(old, new, 4, ranks_per_node=2)
    check_plan(ref, old, new, 4, rpn=2)
    variants = [
        (old.tolist(), new.tolist()),
        (old.astype(np.int32), new.astype(np.int16)),
        (torch.from_numpy(old), torch.from_numpy(new)),
        (torch.from_numpy(old).to(torch.int32), new.tolist()),
        (np.asfortranarray(old), new[:, ::1].copy()),
    ]
    for a, b in variants:
        assert ref.equals(plan_rearrangement(a, b, 4, ranks_per_node=2))
    assert ref.equals(plan_rearrangement(old, new, np.int64(4), ranks_per_node=np.int32(2)))
    assert not ref.equals(plan_rearrangement(old, new, 2))
    assert not ref.equals("plan")


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

GOOD = np.arange(8).reshape(2, 4)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        (
            dict(old_map=GOOD.astype(float)),
            TypeError,
            "old_map must be an integer array, got float64",
        ),
        (dict(new_map=GOOD > 3), TypeError, "new_map must be an integer array, got bool"),
        (dict(old_map=[[0, "a"]]), TypeError, "old_map must be an integer array, got <U"),
        (
            dict(new_map=np.arange(4)),
            ValueError,
            "new_map must be 2-D [num_layers, num_physical], got shape (4,)",
        ),
        (
            dict(old_map=np.zeros((1, 2, 4), int)),
            ValueError,
            "old_map must be 2-D [num_layers, num_physical], got shape (1, 2, 4)",
        ),
        (dict(old_map=[[0, 1], [2]]), ValueError, "old_map must be a 2-D integer array"),
        (
            dict(new_map=GOOD[:, :2]),
            ValueError,
            "old_map and new_map must have the same shape, got (2, 4) and (2, 2)",
        ),
        (dict(ep_size=3), ValueError, "num_physical (4) is not divisible by ep_size (3)"),
        (dict(ep_size=0), ValueError, "ep_size must be >= 1, got 0"),
        (dict(ep_size=-2), ValueError, "ep_size must be >= 1, got -2"),
        (dict(ep_size=2.0), TypeError, "ep_size must be an int, got float"),
        (dict(ep_size=True), TypeError, "ep_size must be an int, got bool"),
        (dict(ranks_per_node=0), ValueError, "ranks_per_node must be >= 1, got 0"),
        (dict(ranks_per_node="2"), TypeError, "ranks_per_node must be an int, got str"),
        (
            dict(ranks_per_node=3),
            ValueError,
            "ranks_per_node counts EP ranks per node, at most ep_size (2); got 3",
        ),
        (dict(num_logical=0), ValueError, "num_logical must be >= 1, got 0"),
        (
            dict(old_map=[[0, 1, 2, 3], [4, 5, -2, 7]]),
            ValueError,
            "old_map: layer 1, slot 2 holds expert id -2; ids must be >= -1 (-1 = empty slot)",
        ),
        (
            dict(new_map=[[0, 1, 2, 3], [4, 5, 6, -5]]),
            ValueError,
            "new_map: layer 1, slot 3 holds expert id -5; ids must be >= -1",
        ),
        (
            dict(num_logical=7),
            ValueError,
            "old_map: layer 1, slot 3 holds expert id 7, which is >= num_logical (7)",
        ),
        (
            dict(old_map=GOOD % 6, new_map=[[0, 1, 2, 3], [4, 5, 6, 0]], num_logical=6),
            ValueError,
            "new_map: layer 1, slot 2 holds expert id 6, which is >= num_logical (6)",
        ),
        (
            dict(new_map=[[0, 1, 2, 3], [4, 5, 1, 7]]),
            ValueError,
            "layer 1: new_map needs expert 1, which old_map holds nowhere",
        ),
        (
            dict(old_map=np.zeros((2, 0), int), new_map=np.zeros((2, 0), int)),
            ValueError,
            "num_physical must be >= 1, got 0",
        ),
        (
            dict(old_map=np.array([[2**63, 0, 0, 0]], np.uint64), new_map=[[0] * 4]),
            ValueError,
            "old_map: layer 0, slot 0 holds expert id 9223372036854775808, which does not fit in int64",
        ),
    ],
)
def test_validation_errors(kwargs, exc, msg):
    args = dict(old_map=GOOD, new_map=GOOD, ep_size=2)
    args.update(kwargs)
    old, new, ep = args.pop("old_map"), args.pop("new_map"), args.pop("ep_size")
    with pytest.raises(exc, match=re.escape(msg)):
        plan_rearrangement(old, new, ep, **args)


def test_missing_expert_message_names_first_layer_and_expert():
    old = np.array([[0, 1, 2, 3]] * 5)
    new = old.copy()
    new[3, 1] = 17
    new[4, 0] = 99
    with pytest.raises(
        ValueError, match=re.escape("layer 3: new_map needs expert 17, which old_map holds nowhere")
    ):
        plan_rearrangement(old, new, 2)
    # a -1 slot in old holds nothing
    with pytest.raises(ValueError, match=re.escape("layer 0: new_map needs expert 5")):
        plan_rearrangement([[-1, 0]], [[5, 0]], 1, num_logical=6)


def test_unsigned_and_empty_inputs_accepted():
    plan = plan_rearrangement(np.array([[0, 1]], np.uint8), np.array([[1, 0]], np.uint16), 1)
    assert plan.num_copies == 2
    plan = plan_rearrangement(np.empty((0, 4)), np.empty((0, 4)), 2)  # float64 but empty
    assert plan.is_empty


def test_rank_view_and_layer_argument_checks():
    plan = plan_rearrangement([[0, 1]], [[1, 0]], 2)
    with pytest.raises(ValueError, match=re.escape("rank must be in [0, 2), got 2")):
        plan.rank_view(2)
    with pytest.raises(TypeError, match="rank must be an int, got float"):
        plan.rank_view(1.0)
    with pytest.raises(ValueError, match=re.escape("layer must be in [0, 1), got 1")):
        plan.layer_ranks_involved(1)


# ---------------------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------------------


def test_simulate_hazard_model():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[1, 0, 0, 2]])
    plan = plan_rearrangement(old, new, 2)
    out = simulate_plan(plan, old, new)
    np.testing.assert_array_equal(out, new)
    # untouched -1 targets keep their old content
    plan = plan_rearrangement(old, [[1, -1, 2, 3]], 2)
    np.testing.assert_array_equal(simulate_plan(plan, old, [[1, -1, 2, 3]]), [[1, 1, 2, 3]])


def test_simulate_rejects_ill_formed_plans():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[3, 3, 1, 1]])
    plan = plan_rearrangement(old, new, 2)
    check_plan(plan, old, new, 2)
    # write the same row twice
    bad = dataclasses.replace(plan, c_dst_row=np.zeros_like(plan.c_dst_row))
    with pytest.raises(ValueError, match="more than once"):
        simulate_plan(bad, old, new)
    # src_is_new copy reading a row nothing writes
    bad = dataclasses.replace(plan, c_src_row=np.full_like(plan.c_src_row, 1))
    with pytest.raises(ValueError, match="src_is_new"):
        simulate_plan(bad, old, new)
    with pytest.raises(ValueError, match="plan's shape"):
        simulate_plan(plan, old[:, :2], new[:, :2])
