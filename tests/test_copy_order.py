"""The executor's ordering of local copies (pure, CPU): every row read before it is written,
one saved row per cycle, and the global stash estimate equal to what each rank executes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl.schedule import _cycle_heads, _order_copies


def _cycles_naive(parent):
    """Smallest node of each cycle, by walking from every node."""
    heads = set()
    for v in range(len(parent)):
        seen = []
        u = v
        while u >= 0 and u not in seen:
            seen.append(u)
            u = parent[u]
        if u >= 0:  # back on the path: the cycle is seen[seen.index(u):]
            heads.add(min(seen[seen.index(u) :]))
    return sorted(heads)


@st.composite
def copy_sets(draw):
    """Copies (src, dst) over `rows` rows: every dst distinct, src != dst, sources repeat."""
    rows = draw(st.integers(1, 24))
    dsts = draw(st.lists(st.integers(0, rows - 1), unique=True, max_size=rows))
    copies = []
    for d in dsts:
        choices = [r for r in range(rows) if r != d]
        if choices:
            copies.append((draw(st.sampled_from(choices)), d))
    return rows, copies


@settings(max_examples=400, deadline=None)
@given(copy_sets())
def test_order_applies_every_copy_from_old_content(case):
    rows, copies = case
    stash, order = _order_copies(copies)
    old = np.arange(100, 100 + rows)
    cur = old.copy()
    saved = [cur[r] for r in stash]  # phase A: the stash
    for src, j, dst in order:
        cur[dst] = saved[j] if j >= 0 else cur[src]
    for src, dst in copies:
        assert cur[dst] == old[src], (copies, stash, order)
    assert sorted(d for _, _, d in order) == sorted(d for _, d in copies)
    parent = np.full(rows, -1)
    for src, dst in copies:
        parent[dst] = src
    assert stash == _cycles_naive(parent)  # one saved row per cycle, no more


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 40), min_size=0, max_size=41))
def test_cycle_heads_match_a_naive_walk(raw):
    n = len(raw)
    parent = np.array([p if p < n else -1 for p in raw], dtype=np.int64)
    assert _cycle_heads(parent).tolist() == _cycles_naive(parent.tolist())


def test_a_swap_and_a_three_cycle_with_a_tail():
    # rows 0<->1 swap; 2 -> 3 -> 4 -> 2; row 5 copies row 3 (a reader hanging off the cycle)
    copies = [(1, 0), (0, 1), (2, 3), (3, 4), (4, 2), (3, 5)]
    stash, order = _order_copies(copies)
    assert stash == [0, 2]
    old = np.arange(6) * 10
    cur = old.copy()
    saved = [cur[r] for r in stash]
    for src, j, dst in order:
        cur[dst] = saved[j] if j >= 0 else cur[src]
    assert cur.tolist() == [10, 0, 40, 20, 30, 30]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 6), st.booleans())
def test_global_stash_estimate_equals_what_each_rank_executes(seed, ep_size, slots, transactional):
    # the staging bound is computed from the global plan on every rank; each rank then orders
    # its own copies: the stash rows and copy counts must be the same numbers
    from eplb_pynccl import plan_rearrangement
    from eplb_pynccl.schedule import _phase_c_copies
    from tests.shuffle_util import random_maps

    rng = np.random.default_rng(seed)
    layers = 3
    old, new = random_maps(rng, layers, max(1, ep_size * slots - 1), ep_size, slots, empty_frac=0.1)
    plan = plan_rearrangement(old, new, ep_size)
    cycles, count = _phase_c_copies(plan, transactional)
    unsafe = (plan.changed if transactional else plan.source_needed).reshape(layers, ep_size, slots)
    for rank in range(ep_size):
        rv = plan.rank_view(rank)
        for layer in range(layers):
            m = rv.c_layer == layer
            tc = [
                (s, d)
                for s, d, is_new in zip(rv.c_src_row[m], rv.c_dst_row[m], rv.c_src_is_new[m])
                if not is_new and unsafe[layer, rank, d]
            ]
            stash, order = _order_copies([(int(s), int(d)) for s, d in tc])
            assert (len(stash), len(order)) == (cycles[layer, rank], count[layer, rank])


def test_runs_break_at_layer_peer_gap_and_unstaged_rows():
    from eplb_pynccl.schedule import _runs

    layer = np.array([0, 0, 1, 1, 1, 1, 1])
    peer = np.array([2, 2, 2, 2, 3, 3, 3])
    src = np.array([3, 4, 5, 6, 7, 9, 10])
    staged = np.array([True, True, True, True, True, False, True])
    starts, lengths = _runs(peer, src, staged, layer)
    # rows 3,4 (layer 0) | 5,6 (layer 1: consecutive with 4, but another layer) | 7 (peer 3)
    # | 9 (unstaged: alone) | 10
    assert starts.tolist() == [0, 2, 4, 5, 6]
    assert lengths.tolist() == [2, 2, 1, 1, 1]
    e = _runs(peer[:0], src[:0], staged[:0], layer[:0])
    assert e[0].tolist() == [] and e[1].tolist() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 50), max_size=60))
def test_distinct_matches_numpy_unique(raw):
    from eplb_pynccl.schedule import _distinct

    a = np.array(raw, dtype=np.int64)
    assert _distinct(a).tolist() == np.unique(a).tolist()


def test_row_copies_cover_every_tensor_of_each_row_pair():
    from eplb_pynccl import plan_rearrangement
    from eplb_pynccl.schedule import Copies, Layout, build_schedule

    # one rank, tensors with rows of 16 and 4 bytes: expert 7 (row 2) copied into rows 0 and 3,
    # rows nobody reads (not transactional: phase A, one unordered batch)
    old = np.array([[5, 6, 7, 8]])
    new = np.array([[7, 6, 7, 7]])
    plan = plan_rearrangement(old, new, 1)
    sched = build_schedule(plan, Layout.of([[16, 4]], 4), transactional=False)
    (ro,) = sched.rank(0).rounds
    copies = [op for op in ro.pre + ro.post if isinstance(op, Copies)]
    got = [
        list(
            zip(
                op.dst_buf.tolist(),
                op.dst_off.tolist(),
                op.src_buf.tolist(),
                op.src_off.tolist(),
                op.nbytes.tolist(),
            )
        )
        for op in copies
    ]
    # (dst buffer, dst byte, src buffer, src byte, bytes): row 2 -> 0, then row 2 -> 3, each
    # for the 16-byte tensor (buffer 0) and the 4-byte one (buffer 1)
    assert got == [[(0, 0, 0, 32, 16), (1, 0, 1, 8, 4), (0, 48, 0, 32, 16), (1, 12, 1, 8, 4)]]
    assert [op.ordered for op in copies] == [False]
