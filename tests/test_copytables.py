"""Copy tables (eplb_pynccl.copytables): the ops of a schedule as independent byte copies.

The tables are executed here on numpy byte arrays and compared with what the ops mean
(``Copies``: each copy; ``Kernels``: rows of the index gathered to / scattered from staging),
and on real schedules with the executor's own table (split into pieces) against the plain op
semantics. The GPU runs the same tables (tests/test_gpu_rowcopy.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl import copytables as ct
from eplb_pynccl.planner import plan_rearrangement
from eplb_pynccl.schedule import STAGING, Copies, Kernels, Layout, build_schedule


def run_table(t: ct.CopyTable, mem: dict) -> None:
    """Execute a table on ``mem`` (buffer id -> uint8 array), reading everything first (the
    entries are independent, as on the GPU where they run at once)."""
    data = [mem[b][o : o + n].copy() for b, o, n in zip(t.src_buf, t.src_off, t.nbytes)]
    for b, o, n, d in zip(t.dst_buf, t.dst_off, t.nbytes, data):
        mem[b][o : o + n] = d


def _mem(rng, sizes: dict) -> dict:
    return {b: rng.integers(0, 256, n, dtype=np.uint8) for b, n in sizes.items()}


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    rb=st.sampled_from([1, 3, 8, 16, 40]),
    kind=st.sampled_from(["gather", "scatter"]),
)
def test_kernels_table_is_the_gather_or_scatter(seed, count, rb, kind):
    rng = np.random.default_rng(seed)
    rows = 6
    k = len(count)
    bufs = rng.integers(0, 2, k)
    total = sum(count)
    # scatter rows must be distinct per buffer; gather may repeat
    index = np.concatenate(
        [
            rng.choice(rows, c, replace=kind == "gather") if c <= rows else rng.integers(0, rows, c)
            for c in count
        ]
    ).astype(np.int64)
    stage = np.cumsum([0] + [c * rb for c in count[:-1]]).astype(np.int64)
    idx = np.cumsum([0] + count[:-1]).astype(np.int64)
    op = Kernels(
        kind,
        bufs.astype(np.int64),
        idx,
        np.asarray(count, dtype=np.int64),
        stage,
        np.full(k, rb, dtype=np.int64),
    )
    if kind == "scatter":
        # distinct rows across kernels of the same buffer too (one writer per row)
        seen = {}
        for q in range(k):
            for r in index[idx[q] : idx[q] + count[q]]:
                if (bufs[q], r) in seen:
                    return
                seen[(bufs[q], r)] = q
    mem = _mem(rng, {0: rows * rb, 1: rows * rb, STAGING: max(total * rb, 1)})
    want = {b: a.copy() for b, a in mem.items()}
    for q in range(k):
        w = want[int(bufs[q])].reshape(rows, rb)
        s = want[STAGING]
        for j in range(count[q]):
            r = int(index[idx[q] + j])
            at = int(stage[q]) + j * rb
            if kind == "gather":
                s[at : at + rb] = mem[int(bufs[q])].reshape(rows, rb)[r]
            else:
                w[r] = mem[STAGING][at : at + rb]
    t = ct.op_table(op, index)
    assert len(t) == total
    run_table(ct.split(t, 16), mem)
    for b in mem:
        np.testing.assert_array_equal(mem[b], want[b])


@settings(max_examples=80, deadline=None)
@given(
    n=st.lists(st.integers(0, 200), min_size=0, max_size=6),
    chunk=st.sampled_from([16, 32, 48, 64, 1 << 20]),
    so=st.integers(0, 31),
    do=st.integers(0, 31),
)
def test_split_tiles_each_copy_in_order_and_keeps_alignment(n, chunk, so, do):
    k = len(n)
    nb = np.asarray(n, dtype=np.int64)
    src_off = so + np.cumsum(np.concatenate([[0], nb[:-1]])).astype(np.int64) if k else nb
    dst_off = do + np.cumsum(np.concatenate([[0], nb[:-1]])).astype(np.int64) if k else nb
    t = ct.CopyTable(np.zeros(k, np.int64), src_off, np.ones(k, np.int64), dst_off, nb)
    s = ct.split(t, chunk)
    assert int(s.nbytes.sum()) == int(nb.sum())
    assert (s.nbytes > 0).all() and (s.nbytes <= chunk).all()
    # each piece keeps its copy's alignment relation, and the pieces tile the copy in order
    assert ((s.src_off - s.dst_off) % 16 == (so - do) % 16).all()
    rng = np.random.default_rng(k)
    mem = _mem(rng, {0: so + int(nb.sum()) + 1, 1: do + int(nb.sum()) + 1})
    want = {b: a.copy() for b, a in mem.items()}
    run_table(t, want)
    run_table(s, mem)
    np.testing.assert_array_equal(mem[1], want[1])


def test_split_refuses_a_chunk_that_breaks_alignment():
    t = ct.CopyTable(*(np.zeros(1, np.int64) for _ in range(5)))
    for bad in (0, -16, 24):
        with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
            ct.split(t, bad)


def test_resolve_gives_device_pointers():
    t = ct.CopyTable(
        np.array([0, STAGING]),
        np.array([8, 16]),
        np.array([STAGING, 1]),
        np.array([0, 32]),
        np.array([4, 5]),
    )
    out = ct.resolve(t, np.array([1000, 2000]), 9000)
    assert out.dtype == np.uint64
    assert out.tolist() == [[1008, 9000, 4], [9016, 2032, 5]]


def _content(layer, expert, i, rb):
    """Row bytes of tensor ``i`` of ``expert`` in ``layer``: distinct per (layer, expert, i)."""
    return np.full(rb, (layer * 31 + expert * 7 + i * 3) % 251, dtype=np.uint8)


def _rows_of(lay, emap, r, layer, i, slots, rowb):
    """Rank ``r``'s buffer of tensor ``i`` in ``layer`` as the map ``emap`` fills it."""
    b = lay.buf(layer, i)
    return np.concatenate(
        [_content(layer, int(emap[layer, r * slots + j]), i, rowb[b]) for j in range(slots)]
    )


def _run_round(sched_ranks, k, mems):
    """Round ``k`` on every rank: the pre ops, the messages delivered by hand, the post ops."""
    ep = len(mems)
    for r in range(ep):
        for op in sched_ranks[r].rounds[k].pre:
            run_table(ct.split(ct.op_table(op, sched_ranks[r].index), 16), mems[r])
    sent = []
    for r in range(ep):
        ro = sched_ranks[r].rounds[k]
        for q in range(len(ro.sends)):
            b, o, n = int(ro.sends.buf[q]), int(ro.sends.off[q]), int(ro.sends.nbytes[q])
            sent.append(
                (
                    r,
                    int(ro.sends.peer[q]),
                    int(ro.sends.rbuf[q]),
                    int(ro.sends.roff[q]),
                    mems[r][b][o : o + n].copy(),
                )
            )
    for _, p, b, o, d in sent:
        mems[p][b][o : o + len(d)] = d
    for r in range(ep):
        for op in sched_ranks[r].rounds[k].post:
            assert isinstance(op, (Copies, Kernels))
            run_table(ct.split(ct.op_table(op, sched_ranks[r].index), 16), mems[r])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ep=st.sampled_from([1, 2, 3, 4]))
def test_schedule_ops_as_tables_give_the_new_weights(seed, ep):
    """Every rank's local ops of a real schedule run as the executor's split tables, with the
    messages delivered by hand, give the rows the new map asks for."""
    rng = np.random.default_rng(seed)
    layers, experts, slots = 2, 5, 3
    phys = ep * slots
    old = np.stack([rng.permutation(np.arange(phys) % experts) for _ in range(layers)])
    new = np.stack([rng.permutation(np.arange(phys) % experts) for _ in range(layers)])
    rbs = ((24, 7), (16, 40))
    plan = plan_rearrangement(old, new, ep)
    lay = Layout.of(rbs, slots)
    sched = build_schedule(plan, lay, pack_threshold=int(rng.integers(0, 64)), staging_bytes=None)
    ranks = sched.linked()
    nb = lay.num_bufs
    rowb = lay.buf_row_bytes()

    mems = []
    for r in range(ep):
        m = {}
        for layer in range(layers):
            for i in range(2):
                m[lay.buf(layer, i)] = _rows_of(lay, old, r, layer, i, slots, rowb)
        m[STAGING] = np.zeros(max(ranks[r].staging_bytes, 1), dtype=np.uint8)
        mems.append(m)
    assert nb == len(mems[0]) - 1
    for k in range(len(sched.rounds)):
        _run_round(ranks, k, mems)
    for r in range(ep):
        for layer in range(layers):
            for i in range(2):
                b = lay.buf(layer, i)
                want = _rows_of(lay, new, r, layer, i, slots, rowb)
                np.testing.assert_array_equal(mems[r][b], want, err_msg=f"rank {r} buf {b}")
