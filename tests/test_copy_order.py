"""The ordering of local copies (pure, CPU): every row read before it is written, at most
``waves`` waves, a saved row in every cycle and about one per ``waves`` rows of a chain, and
the global stash estimate equal to what each rank executes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl.schedule import _cycle_heads, order_copies


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


def _run_waves(rows, copies, waves):
    """Apply copies by the CopyOrder rule the way the GPU does: the stash first, then wave by
    wave, every copy of a wave reading before any of that wave writes. Returns the rows and
    the rule's output."""
    src = np.array([s for s, _ in copies], dtype=np.int64)
    dst = np.array([d for _, d in copies], dtype=np.int64)
    wave, from_stash, stashed = order_copies(src, dst, rows, waves)
    old = np.arange(100, 100 + rows)
    cur = old.copy()
    saved = {int(r): cur[r] for r in np.flatnonzero(stashed)}  # phase A
    for w in sorted(set(wave.tolist())):
        k = np.flatnonzero(wave == w)
        vals = [saved[int(src[q])] if from_stash[q] else cur[src[q]] for q in k]
        wrote = dst[k]
        # independent within the wave: nothing it writes is read (from the row) in it
        direct = src[k][~from_stash[k]]
        assert not set(wrote.tolist()) & set(direct.tolist()), (copies, w)
        cur[wrote] = vals
    return old, cur, wave, stashed


@settings(max_examples=400, deadline=None)
@given(copy_sets(), st.integers(1, 9))
def test_waves_apply_every_copy_from_old_content(case, waves):
    rows, copies = case
    old, cur, wave, stashed = _run_waves(rows, copies, waves)
    for src, dst in copies:
        assert cur[dst] == old[src], copies
    assert wave.size == 0 or (0 <= wave.min() and wave.max() < waves)
    parent = np.full(rows, -1)
    for src, dst in copies:
        parent[dst] = src
    # every cycle keeps a saved row; no row is saved that nobody reads or nobody writes
    heads = _cycles_naive(parent.tolist())
    assert all(stashed[h] for h in heads)
    read = {s for s, _ in copies}
    assert all(r in read and parent[r] >= 0 for r in np.flatnonzero(stashed))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(1, 12))
def test_one_long_cycle_takes_ceil_len_over_waves_stashed_rows(length, waves):
    rows = length + 1  # a cycle through rows 0..length-1 (row length unused)
    copies = [(i, (i + 1) % length) for i in range(length)] if length > 1 else []
    old, cur, wave, stashed = _run_waves(rows, copies, waves)
    if length > 1:
        assert int(stashed.sum()) == -(-length // waves)
        assert len(set(wave.tolist())) == min(waves, length)
        assert cur[:length].tolist() == np.roll(old[:length], 1).tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 40), min_size=0, max_size=41))
def test_cycle_heads_match_a_naive_walk(raw):
    n = len(raw)
    parent = np.array([p if p < n else -1 for p in raw], dtype=np.int64)
    assert _cycle_heads(parent).tolist() == _cycles_naive(parent.tolist())


def test_a_swap_and_a_three_cycle_with_a_tail():
    # rows 0<->1 swap; 2 -> 3 -> 4 -> 2; row 5 copies row 3 (a reader hanging off the cycle)
    copies = [(1, 0), (0, 1), (2, 3), (3, 4), (4, 2), (3, 5)]
    old, cur, wave, stashed = _run_waves(6, copies, 8)
    assert np.flatnonzero(stashed).tolist() == [0, 2]
    assert (cur - 100).tolist() == [1, 0, 4, 2, 3, 3]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 6), st.booleans())
def test_global_stash_estimate_equals_what_each_rank_executes(seed, ep_size, slots, transactional):
    # the staging bound is computed from the global plan on every rank; each rank then orders
    # its own copies: the stash rows and copy counts must be the same numbers
    from eplb_pynccl import plan_rearrangement
    from eplb_pynccl.schedule import Layout, _layer_works, build_schedule, phase_c_copies
    from tests.shuffle_util import random_maps

    rng = np.random.default_rng(seed)
    layers = 3
    old, new = random_maps(rng, layers, max(1, ep_size * slots - 1), ep_size, slots, empty_frac=0.1)
    plan = plan_rearrangement(old, new, ep_size)
    stash_rows, count = phase_c_copies(plan, transactional)
    sched = build_schedule(plan, Layout.of([[8]] * layers, slots), transactional=transactional)
    for rank in range(ep_size):
        works = _layer_works(sched, rank, list(range(layers)))
        for layer in range(layers):
            w = works[layer]
            assert (len(w.stash_src), len(w.copies_c)) == (
                stash_rows[layer, rank],
                count[layer, rank],
            )


def test_runs_break_at_layer_peer_gap_and_unstaged_rows():
    from eplb_pynccl.schedule import message_runs

    layer = np.array([0, 0, 1, 1, 1, 1, 1])
    peer = np.array([2, 2, 2, 2, 3, 3, 3])
    src = np.array([3, 4, 5, 6, 7, 9, 10])
    staged = np.array([True, True, True, True, True, False, True])
    starts, lengths = message_runs(peer, src, staged, layer)
    # rows 3,4 (layer 0) | 5,6 (layer 1: consecutive with 4, but another layer) | 7 (peer 3)
    # | 9 (unstaged: alone) | 10
    assert starts.tolist() == [0, 2, 4, 5, 6]
    assert lengths.tolist() == [2, 2, 1, 1, 1]
    e = message_runs(peer[:0], src[:0], staged[:0], layer[:0])
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
