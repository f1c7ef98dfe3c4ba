"""The schedule (pure, CPU): every rank's ops, checked on the virtual cluster.

Property tests run random rearrangements at EP 1-64 through ``simulate_rearrangement``; the
DeepSeek-V3 cases use the real row sizes at EP8, EP32 and EP64; every check of the simulator
is shown to fire on a schedule with that bug planted in it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl import plan_rearrangement
from eplb_pynccl.schedule import (
    STAGING,
    Copies,
    Kernels,
    Layout,
    ScheduleError,
    build_schedule,
)
from eplb_pynccl.simulate import simulate_rearrangement, simulate_schedule

# DeepSeek-V3 fp8 experts: w13 [4096, 7168] fp8, w2 [7168, 2048] fp8, scales [32, 56] and
# [56, 16] fp32 (42.0 MiB per expert)
DSV3_ROW = [4096 * 7168, 7168 * 2048, 32 * 56 * 4, 56 * 16 * 4]


def eplb_maps(rng, layers, ep, per_rank, keep=0.3, empty=0.0):
    """Every logical expert held once plus replicas; the new map keeps some slots, may empty
    some (-1) and only needs experts the old map holds."""
    n = ep * per_rank
    num_logical = max(1, n - max(1, n // 8))
    old = np.empty((layers, n), dtype=np.int64)
    new = np.empty_like(old)
    for layer in range(layers):
        for m in (old, new):
            ids = np.concatenate(
                [np.arange(num_logical), rng.integers(0, num_logical, n - num_logical)]
            )
            m[layer] = rng.permutation(ids)[:n]
        k = rng.random(n) < keep
        new[layer, k] = old[layer, k]
        if empty:
            new[layer, rng.random(n) < empty] = -1
    return old, new


@st.composite
def cases(draw):
    ep = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32, 64]))
    per_rank = draw(st.integers(1, 6 if ep <= 8 else 3))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old, new = eplb_maps(
        rng,
        layers,
        ep,
        per_rank,
        keep=draw(st.sampled_from([0.0, 0.3, 0.8])),
        empty=draw(st.sampled_from([0.0, 0.1])),
    )
    # mixed dtypes: rows of whole words of 1, 2, 4 or 8 bytes, some below the pack threshold
    row_bytes = [
        [
            int(draw(st.sampled_from([1, 2, 4, 8])) * draw(st.integers(1, 40)))
            for _ in range(draw(st.integers(1, 4)))
        ]
        for _ in range(layers)
    ]
    opts = {
        "transactional": draw(st.booleans()),
        "pack_threshold": draw(st.sampled_from([0, 32, 1 << 20])),
        "max_messages_per_round": draw(st.sampled_from([1, 4, 1024])),
    }
    tiny = draw(st.sampled_from([None, "min", "x4"]))
    return old, new, ep, row_bytes, opts, tiny


@settings(max_examples=150, deadline=None)
@given(cases())
def test_random_rearrangements_run_exactly_on_the_virtual_cluster(case):
    old, new, ep, row_bytes, opts, tiny = case
    plan = plan_rearrangement(old, new, ep)
    layout = Layout.of(row_bytes, plan.slots_per_rank)
    if tiny is not None:
        # the smallest bound the default allows (at least what one layer needs), or 4 times it
        auto = build_schedule(plan, layout, **opts)
        opts = dict(opts, staging_bytes=auto.staging_bound * (1 if tiny == "min" else 4))
    out = simulate_rearrangement(old, new, ep, row_bytes, **opts)
    assert len(out) == ep
    assert sum(r["bytes_sent"] for r in out) == sum(r["bytes_received"] for r in out)
    assert all(r["peak_extra_bytes"] <= r["staging_bound"] for r in out)
    # a rank receives each (layer, expert) at most once; a row's bytes arrive once per transfer
    assert sum(r["experts_received"] for r in out) == plan.num_transfers
    # the same figures the executor reports: ops laid out once, the same on every call
    again = simulate_rearrangement(old, new, ep, row_bytes, **opts)
    assert again == out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 4, 8]), st.booleans())
def test_one_sided_schedules_pack_nothing_and_read_only_weight_rows(seed, ep, transactional):
    rng = np.random.default_rng(seed)
    old, new = eplb_maps(rng, 2, ep, 4, empty=0.1)
    plan = plan_rearrangement(old, new, ep)
    sched = build_schedule(
        plan, Layout.of([[64, 8, 4], [16]], 4), transactional=transactional, one_sided=True
    )
    simulate_schedule(sched, old, new)
    for rs in sched.linked():
        for ro in rs.rounds:
            # every receive names the sender's weight row it reads: no sender staging
            assert (ro.recvs.rbuf >= 0).all() and (ro.recvs.roff >= 0).all()
            assert not any(isinstance(op, Kernels) and op.what == "pack" for op in ro.pre + ro.post)


@pytest.mark.parametrize("ep, slots, layers", [(8, 288, 58), (32, 288, 58), (64, 320, 58)])
def test_deepseek_v3_rows_at_scale(ep, slots, layers):
    """Real DeepSeek-V3 row sizes (sizes, offsets and the bound at full size; contents on
    rows scaled down to 4 bytes per tensor)."""
    rng = np.random.default_rng(ep)
    old, new = eplb_maps(rng, layers, ep, slots // ep)
    t0 = time.perf_counter()
    out = simulate_rearrangement(old, new, ep, [DSV3_ROW] * layers)
    elapsed = time.perf_counter() - t0
    row = sum(DSV3_ROW)
    plan = plan_rearrangement(old, new, ep)
    assert [r["bytes_received"] for r in out] == (plan.received_per_rank() * row).tolist()
    assert [r["bytes_sent"] for r in out] == (plan.sent_per_rank() * row).tolist()
    # the default bound: one layer of local experts (16-byte aligned rows), or just above it
    # when a rank receives its whole layer (the row indices and block alignment then exceed it)
    layer_bytes = sum((b + 15) // 16 * 16 for b in DSV3_ROW) * (slots // ep)
    ends = plan.sent_per_rank() + plan.received_per_rank() + np.bincount(plan.c_rank, minlength=ep)
    slack = 16 * int(ends.max()) + 2 * 16 * ep * len(DSV3_ROW)  # index reserve, block alignment
    for r in out:
        assert r["peak_extra_bytes"] <= r["staging_bound"], r
        assert layer_bytes <= r["staging_bound"] <= layer_bytes + slack, (r, layer_bytes)
    print(
        f"EP{ep}: {layers} layers of {slots} slots simulated in {elapsed:.2f} s, "
        f"{sum(r['messages'] for r in out)} messages, {max(r['rounds'] for r in out)} rounds"
    )


def test_an_explicit_bound_below_a_layer_is_refused_before_anything():
    old, new = eplb_maps(np.random.default_rng(1), 1, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"^staging_bytes=64 is too small: layer 0 needs \d+ bytes of staging on rank \d \(transactional\); raise staging_bytes",
    ):
        simulate_rearrangement(old, new, 2, [[256]], staging_bytes=64)


def test_unknown_options_are_refused():
    old, new = eplb_maps(np.random.default_rng(1), 1, 2, 4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stagingbytes'\]"):
        simulate_rearrangement(old, new, 2, [[256]], stagingbytes=1)


# ---- planted bugs: each check of the virtual cluster fires --------------------------------


def _two_rank_case(transactional=True, **kw):
    """A 2-rank rearrangement with transfers both ways, local copies and a packed tensor."""
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[4, 0, 2, 1, 5, 3, 6, 6]])
    plan = plan_rearrangement(old, new, 2)
    sched = build_schedule(
        plan,
        Layout.of([[64, 8]], 4),
        transactional=transactional,
        pack_threshold=16,
        staging_bytes=1 << 16,
        **kw,
    )
    simulate_schedule(sched, old, new)  # the schedule as built is right
    fresh = build_schedule(
        plan,
        Layout.of([[64, 8]], 4),
        transactional=transactional,
        pack_threshold=16,
        staging_bytes=1 << 16,
        **kw,
    )
    return fresh, old, new


def _assert_refused(sched, old, new, match):
    """The virtual cluster refuses the planted schedule: a ScheduleError matching ``match``."""
    with pytest.raises(ScheduleError, match=match):
        simulate_schedule(sched, old, new)


def _replace(ro, phase, i, op):
    getattr(ro, phase)[i] = op


def test_planted_wrong_final_rows():
    sched, old, new = _two_rank_case()
    ro = sched.rank(0).rounds[0]
    ro.post = [op for op in ro.post if not (isinstance(op, Kernels) and op.what == "recv")]
    _assert_refused(
        sched,
        old,
        new,
        r"^rank 0 layer 0 tensor 0 row 0: holds layer 0 expert 0 tensor 0, new_map wants expert 4$",
    )


def test_planted_send_and_receive_sequences_that_differ():
    sched, old, new = _two_rank_case()
    m = sched.rank(0).rounds[0].sends
    m.nbytes[0] -= 64  # one row less than the receiver expects
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0: message 0 from rank 0 to rank 1 has \d+ bytes, the receive 0 on rank 1 \d+$",
    )
    sched, old, new = _two_rank_case()
    ro = sched.rank(1).rounds[0]
    keep = np.arange(len(ro.recvs)) != 0  # a receive missing: the NCCL group would hang
    ro.recvs = dataclasses.replace(
        ro.recvs, **{f.name: getattr(ro.recvs, f.name)[keep] for f in dataclasses.fields(ro.recvs)}
    )
    _assert_refused(sched, old, new, r"^round 0: \d+ sends but \d+ receives in all$")


def test_planted_messages_swapped_between_tensors():
    sched, old, new = _two_rank_case()
    m = sched.rank(0).rounds[0].sends
    i, j = 0, len(m) - 1  # a big tensor's message and a packed one trade places
    for f in ("tensor", "buf", "off", "nbytes"):
        a = getattr(m, f)
        a[i], a[j] = a[j], a[i]
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0: message 0 from rank 0 to rank 1 has \d+ bytes, the receive 0 on rank 1 \d+$",
    )


def test_planted_read_after_overwrite():
    # one rank, a chain of old-content copies 1 -> 0, 2 -> 1, 3 -> 2: three waves (each copy
    # overwrites the row the wave before read); run in the other order, a row is read after
    # it was overwritten
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[1, 2, 3, 3]])

    def waves():
        sched = build_schedule(plan_rearrangement(old, new, 1), Layout.of([[32]], 4))
        ro = sched.rank(0).rounds[0]
        return sched, ro, [op for op in ro.post if isinstance(op, Copies)]

    sched, ro, cs = waves()
    assert [c.src_off.tolist() for c in cs] == [[32], [64], [96]]  # read before write
    simulate_schedule(sched, old, new)
    sched, ro, cs = waves()
    ro.post = [op for op in ro.post if not isinstance(op, Copies)] + cs[::-1]
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0 rank 0 post wave 1 \(copies\) copy 0: reads rows \[2\] of buffer 0 after they were overwritten$",
    )
    # the three merged into one batch of independent copies depend on each other
    sched, ro, cs = waves()
    merged = Copies(
        *(
            np.concatenate([getattr(c, f) for c in cs])
            for f in ("dst_buf", "dst_off", "src_buf", "src_off", "nbytes")
        )
    )
    ro.post = [op for op in ro.post if not isinstance(op, Copies)] + [merged]
    _assert_refused(
        sched,
        old,
        new,
        r"depends on another copy of its wave|reads a row another copy of its wave writes",
    )


def test_planted_duplicate_before_its_source_arrives():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[3, 3, 2, 3]])  # rank 0 receives expert 3 once and duplicates it
    sched = build_schedule(plan_rearrangement(old, new, 2), Layout.of([[16]], 2))
    ro = sched.rank(0).rounds[0]
    dup = [op for op in ro.post if isinstance(op, Copies) and op.reads_new]
    assert len(dup) == 1
    ro.post.remove(dup[0])
    ro.post.insert(0, dup[0])  # before the staged receive is scattered into its source row
    _assert_refused(
        sched, old, new, r"reads rows \[0\] of buffer 0 as new, but they were not written yet$"
    )


def test_planted_staging_beyond_the_bound():
    sched, old, new = _two_rank_case()
    rs = sched.rank(0)
    sched.staging_bound = rs.peak_extra_bytes - 1
    _assert_refused(
        sched, old, new, r"^rank 0: staging \d+ B \+ index \d+ B exceed the bound of \d+ B$"
    )
    sched, old, new = _two_rank_case()
    m = sched.rank(1).rounds[0].recvs
    k = int(np.flatnonzero(m.buf == STAGING)[0])
    m.off[k] = sched.rank(1).staging_bytes  # past the end of the rank's staging
    _assert_refused(sched, old, new, r"outside the rank's staging of \d+ B$")


def test_planted_live_write_before_the_exchange_in_transactional_mode():
    sched, old, new = _two_rank_case()
    ro = sched.rank(0).rounds[0]
    copies = next(op for op in ro.post if isinstance(op, Copies) and not op.reads_new)
    ro.post.remove(copies)  # the old-content local copies, moved before the exchange
    ro.pre.append(copies)
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0 rank 0 pre wave \d \(copies\) copy 0: writes live rows \[\d\] of buffer 0 before the round's exchange completed \(transactional\)$",
    )


def test_planted_send_reading_bytes_a_receive_writes():
    # not transactional: rank 0 receives expert 2 straight into row 0 (its old content is
    # read by nobody) and sends row 1 to rank 1; the send moved onto row 0 races with it
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[2, 1, 1, 3]])
    sched = build_schedule(
        plan_rearrangement(old, new, 2), Layout.of([[16]], 2), transactional=False
    )
    simulate_schedule(sched, old, new)
    sched = build_schedule(
        plan_rearrangement(old, new, 2), Layout.of([[16]], 2), transactional=False
    )
    ro = sched.rank(0).rounds[0]
    assert ro.recvs.buf.tolist() == [0] and ro.recvs.off.tolist() == [0]  # straight into row 0
    assert ro.sends.off.tolist() == [16]
    ro.sends.off[0] = 0
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0: receive 0 on rank 1 expects bytes at \(0, 16\) on rank 0, which sends \(0, 0\)$",
    )  # the two ends disagree
    sched._linked = False
    sched.rank(1).rounds[0].recvs.roff[0] = 0  # both ends agree on the racing bytes
    _assert_refused(
        sched,
        old,
        new,
        r"^round 0 rank 0 send 0 to rank 1: reads bytes a receive of the same round writes$",
    )


def test_planted_misaligned_message():
    sched, old, new = _two_rank_case()
    m = sched.rank(0).rounds[0].sends
    m.off[0] += 1
    _assert_refused(sched, old, new, r"is not the start of a row$|expects bytes at|targets")
