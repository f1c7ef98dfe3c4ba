"""The time model (pure, CPU): Cluster's checks, the model's arithmetic on hand-computed cases,
its message counts against every rank's schedule, monotonic in rates, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl import plan_rearrangement
from eplb_pynccl.cluster import Cluster, HostCost
from eplb_pynccl.estimate import (
    estimate_rearrangement,
    estimate_vllm_style,
    predict_eplb_row,
    round_messages,
)
from eplb_pynccl.schedule import Layout, build_schedule
from tests.test_schedule import eplb_maps

MiB = 1 << 20
DSV3_ROW = [4096 * 7168, 7168 * 2048, 32 * 56 * 4, 56 * 16 * 4]


def toy(gpus_per_node=4, nodes=1, *, nics=1, split=True, **kw):
    """Round numbers: NVLink 1 GB/s + 1 ms per message, NIC 0.5 GB/s + 2 ms, copies 10 GB/s
    + 0.1 ms, host 0.5 ms per round + 10 us per op + 1 us per copy, 3 ms set-up, no planning
    cost."""
    host = {
        t: HostCost(per_op=10e-6, per_copy=1e-6, per_round=0.5e-3, setup=3e-3)
        for t in ("nccl", "ipc", "torch")
    }
    args = dict(
        name="toy",
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        nvlink_bw=1e9,
        nvlink_latency=1e-3,
        copy_engines=2,
        ce_bw=0.25e9,
        ce_latency=0.2e-3,
        nics_per_node=nics,
        nic_bw=0.5e9,
        nic_latency=2e-3,
        local_bw=10e9,
        local_op=1e-4,
        host=host,
        split_channels=split,
    )
    args.update(kw)
    return Cluster(**args)


B = 2 * MiB  # one tensor per row, above the packing threshold: a message of its own


def test_one_message():
    # rank 0's only row needs expert 1, which only rank 1 holds: one transfer, staged
    # (transactional), scattered into place after the exchange
    old, new = [[0, 1]], [[1, 1]]
    c = toy(2)
    e = estimate_rearrangement(old, new, 2, [B], cluster=c)
    exch = B / 1e9 + 1e-3
    post = B / 10e9 + 1e-4  # one scatter kernel
    host = 0.5e-3 + 10e-6 * 1 + 1e-6 * 1
    assert e.rounds == 1 and e.messages == 1
    assert e.seconds == pytest.approx(3e-3 + exch + max(host, post))
    assert e.nvlink_bytes == B and e.network_bytes == 0 and e.busiest_gpu_bytes == B
    assert e.critical == ("nvlink",)
    assert e.parts["nvlink"][0] == pytest.approx(exch)


def test_one_round_channels_split_over_peers():
    # rank 0 holds experts 0, 1; rank 1 takes both (consecutive rows: one message of two rows),
    # rank 2 takes expert 0 (one message): rank 0 has two NVLink peers in the round
    old = [[0, 1, 2, 3, 4, 5]]
    new = [[0, 1, 0, 1, 0, 5]]
    e = estimate_rearrangement(old, new, 3, [B], cluster=toy(3))
    assert e.messages == 2
    # with split channels each of rank 0's pairs gets half of its rate: the two-row pair
    # takes 2 * 2B / bw + 1 ms
    assert e.parts["nvlink"][0] == pytest.approx(4 * B / 1e9 + 1e-3)
    e2 = estimate_rearrangement(old, new, 3, [B], cluster=toy(3, split=False))
    assert e2.parts["nvlink"][0] == pytest.approx(3 * B / 1e9 + 2e-3)


def test_contended_nic():
    # two nodes of two GPUs; ranks 2 and 3 (node 1) each take a row that only node 0 holds
    old = [[0, 1, 2, 3]]
    new = [[0, 1, 0, 1]]
    one = estimate_rearrangement(old, new, 4, [B], cluster=toy(2, 2, nics=1))
    assert one.network_bytes == 2 * B and one.nvlink_bytes == 0
    assert one.parts["nic"][0] == pytest.approx(2 * B / 0.5e9 + 2 * 2e-3)
    assert one.critical == ("nic",)
    assert list(one.network_bytes_per_node) == [0, 2 * B]
    two = estimate_rearrangement(old, new, 4, [B], cluster=toy(2, 2, nics=2))
    assert two.parts["nic"][0] == pytest.approx(B / 0.5e9 + 2e-3)
    # the NIC of one node serves both GPUs: named explicitly, the same as the default
    same = toy(2, 2, nics=1, nic_gpus=((0, 1),))
    assert estimate_rearrangement(old, new, 4, [B], cluster=same).seconds == one.seconds


def test_copy_engine_transport():
    old, new = [[0, 1]], [[1, 1]]
    e = estimate_rearrangement(old, new, 2, [B], cluster=toy(2), transport="ipc")
    # the receiver pulls through two engines of 0.25 GB/s: 0.5 GB/s, 0.2 ms per copy over 2
    assert e.parts["copy_engine"][0] == pytest.approx(B / 0.5e9 + 0.2e-3 / 2)
    assert e.critical == ("copy_engine",)


def test_vllm_style_one_message():
    old, new = [[0, 1]], [[1, 1]]
    c = toy(2)
    v = estimate_vllm_style(old, new, 2, [B, B], cluster=c)
    # one op per tensor each side; two copies back (one per tensor)
    host_ops = 0.5e-3 + 10e-6 * 2
    exch = 2 * B / 1e9 + 2 * 1e-3
    local = 2 * B / 10e9 + 2 * 1e-4
    assert v.seconds == pytest.approx(host_ops + exch + max(local, 2 * 1e-6))
    assert v.messages == 2


def maps(rng, layers, ep, per_rank, keep=0.3):
    return eplb_maps(rng, layers, ep, per_rank, keep=keep)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([2, 3, 4, 8]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 1 << 20, 1 << 62]),
)
def test_round_messages_match_rank_schedules(seed, ep, transactional, one_sided, thr):
    rng = np.random.default_rng(seed)
    old, new = maps(rng, 3, ep, 3)
    plan = plan_rearrangement(old, new, ep)
    rows = [[3 * MiB, 1000, 48], [2 * MiB, 2 * MiB], [64, 4 * MiB]]
    sched = build_schedule(
        plan,
        Layout.of(rows, 3),
        transactional=transactional,
        one_sided=one_sided,
        pack_threshold=thr,
        max_messages_per_round=int(rng.integers(4, 64)),
    )
    rnd, src, dst, msgs, byts = round_messages(sched)
    want = {}
    for r in range(ep):
        for k, ro in enumerate(sched.rank(r).rounds):
            for p, nb in zip(ro.sends.peer.tolist(), ro.sends.nbytes.tolist()):
                m, b = want.get((k, r, p), (0, 0))
                want[(k, r, p)] = (m + 1, b + nb)
    got = {
        (a, s, d): (m, b)
        for a, s, d, m, b in zip(
            rnd.tolist(), src.tolist(), dst.tolist(), msgs.tolist(), byts.tolist()
        )
    }
    assert got == want


def _scaled(c: Cluster, f: dict) -> Cluster:
    return dataclasses.replace(c, **{k: getattr(c, k) * v for k, v in f.items()})


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["nvlink_bw", "nic_bw", "local_bw", "ce_bw"]),
    st.floats(1.0, 8.0),
    st.sampled_from(["nccl", "ipc"]),
)
def test_monotonic_in_rates(seed, rate, factor, transport):
    rng = np.random.default_rng(seed)
    old, new = maps(rng, 2, 8, 3, keep=0.2)
    c = toy(4, 2, nics=2)
    rows = [2 * MiB, 512 * 1024, 64]
    a = estimate_rearrangement(old, new, 8, rows, cluster=c, transport=transport)
    b = estimate_rearrangement(
        old, new, 8, rows, cluster=_scaled(c, {rate: factor}), transport=transport
    )
    assert b.seconds <= a.seconds * (1 + 1e-12)
    va = estimate_vllm_style(old, new, 8, rows, cluster=c)
    vb = estimate_vllm_style(old, new, 8, rows, cluster=_scaled(c, {rate: factor}))
    assert vb.seconds <= va.seconds * (1 + 1e-12)


def test_nothing_moves():
    old = np.arange(8).reshape(1, 8)
    e = estimate_rearrangement(old, old, 4, [B], cluster=toy(4))
    assert e.seconds == 0.0 and e.rounds == 0 and e.messages == 0
    assert estimate_vllm_style(old, old, 4, [B], cluster=toy(4)).seconds == 0.0


def test_presets():
    for name in ("h100-ib400", "h200-ib400", "gb200-nvl72", "h100x4-nv18", "h200x1"):
        c = Cluster.preset(name, nodes=2)
        assert c.nodes == 2 and c.world_size == 2 * c.gpus_per_node
        assert sorted(g for grp in c.nic_gpus for g in grp) == list(range(c.gpus_per_node))
    c = Cluster.preset("h100-ib400", nodes=4)
    assert c.nic_of([0, 7, 8, 31]).tolist() == [0, 7, 8, 31]
    assert Cluster.preset("gb200-nvl72").gpus_per_node == 72
    assert "NVLink 4" in Cluster.preset.__doc__


def test_predict_eplb_row():
    rng = np.random.default_rng(0)
    old, new = maps(rng, 2, 4, 4)
    ms = predict_eplb_row(old, new, 4, DSV3_ROW, "eplb_pynccl")
    assert ms > 0
    assert predict_eplb_row(old, new, 4, DSV3_ROW, "vllm-style") > 0
    assert predict_eplb_row(old, new, 4, DSV3_ROW, "eplb_pynccl/gloo") is None


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        ({"gpus_per_node": 0}, ValueError, "gpus_per_node must be >= 1"),
        ({"nodes": True}, TypeError, "nodes must be an int, got bool"),
        ({"nvlink_bw": -1.0}, ValueError, "nvlink_bw must be > 0"),
        ({"nic_bw": float("inf")}, ValueError, "nic_bw must be finite"),
        ({"nic_latency": -1e-6}, ValueError, "nic_latency must be >= 0"),
        ({"local_op": "1"}, TypeError, "local_op must be a real number, got str"),
        ({"copy_engines": 1.5}, TypeError, "copy_engines must be an int, got float"),
        ({"nics_per_node": 3}, ValueError, "nic_gpus must be given when 3 NICs"),
        ({"nic_gpus": ((0, 1), (1, 2), (3,))}, ValueError, "nic_gpus lists 3 NICs"),
        ({"nics_per_node": 2, "nic_gpus": ((0, 1), (1, 2))}, ValueError, "exactly once"),
        ({"nics_per_node": 2, "nic_gpus": ((0, 1, 2, 3), ())}, ValueError, "at least one GPU"),
        ({"host": {}}, ValueError, "host lacks a HostCost for 'nccl'"),
        ({"host": {"nixl": None}}, ValueError, "unknown transport 'nixl'"),
        ({"split_channels": 1}, TypeError, "split_channels must be a bool"),
    ],
)
def test_cluster_bad_fields(kw, err, msg):
    with pytest.raises(err, match=msg):
        toy(**kw) if "gpus_per_node" in kw or "split" in kw else toy(4, **kw)


def test_host_cost_bad():
    with pytest.raises(ValueError, match="HostCost.per_op must be >= 0"):
        HostCost(per_op=-1.0, per_copy=0.0, per_round=0.0)
    with pytest.raises(TypeError, match="host\\['nccl'\\] must be a HostCost"):
        toy(host={"nccl": 1, "ipc": 1, "torch": 1})


def test_estimate_bad_input():
    old, new = [[0, 1]], [[1, 1]]
    c = toy(2)
    with pytest.raises(TypeError, match="cluster must be a Cluster, got str"):
        estimate_rearrangement(old, new, 2, [B], cluster="h100-ib400")
    with pytest.raises(ValueError, match="ep_size \\(4\\) is larger than the cluster's 2 GPUs"):
        estimate_rearrangement([[0, 1, 2, 3]], [[1, 1, 2, 3]], 4, [B], cluster=c)
    with pytest.raises(ValueError, match="transport must be one of nccl, ipc, got 'gloo'"):
        estimate_rearrangement(old, new, 2, [B], cluster=c, transport="gloo")
    with pytest.raises(TypeError, match="unknown option\\(s\\) \\['stagin_bytes'\\]"):
        estimate_rearrangement(old, new, 2, [B], cluster=c, stagin_bytes=1)
    with pytest.raises(ValueError, match="row_bytes must be >= 0"):
        estimate_rearrangement(old, new, 2, [-1], cluster=c)
    with pytest.raises(ValueError, match="link must be 'nccl' or 'ce'"):
        estimate_vllm_style(old, new, 2, [B], cluster=c, link="nixl")
    with pytest.raises(ValueError, match="unknown cluster preset 'dgx'"):
        Cluster.preset("dgx")
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        Cluster.preset("h100-ib400", nodes=0)


def test_calibration_against_measured_rows():
    """The model against bench/RESULTS.md's measured rows (bench/scale.py): the errors the
    report states, so a change to the model or the schedule that moves them shows here. The
    two misses are the rows whose measured cause is outside the model (bench/scale.py)."""
    from bench.scale import MEASURED, calibration_rows

    rows = calibration_rows()
    assert len(rows) == len(MEASURED) == 21
    missed = [(r["case"], r["method"], r["measured_ms"]) for r in rows if not r["within_25pct"]]
    assert missed == [
        ("qwen3 ep4 8L", "eplb_pynccl packed-2L", 34.9),
        ("dsv3-perm ep1 2L", "eplb_pynccl", 10.5),
    ]
    assert max(abs(r["error_pct"]) for r in rows) <= 40
    assert {r["cluster"] for r in rows} == {"h100x4-nv18", "h200x1"}
    # Session 7's rows with the current executor's host costs (fitted to Session 7's D9 rows),
    # the others with run F's; the current profile moved Session 7's rows into +-25%
    cur = [r for r in rows if r["host_costs"] == "current"]
    assert [r["where"] for r in cur] == [m[5] for m in MEASURED if "Session 7" in m[5]]
    assert all(abs(r["session6_error_pct"]) > 25 for r in cur)


def test_bench_model_columns():
    """The eplb part's model_ms / model_err columns (bench/eplb.py), on the clusters a run
    can be on: one host's H100s or H200s, or n/a with the reason."""
    from bench.common import make_maps
    from bench.eplb import add_model_columns, model_cluster

    c, why = model_cluster(None, 2)
    assert c is None and why.startswith("gloo on the CPU: no cluster description")
    c, why = model_cluster("NVIDIA A100-SXM4-80GB", 2)
    assert c is None and why == (
        "no cluster description for 'NVIDIA A100-SXM4-80GB' (H100 and H200 are described)"
    )
    assert model_cluster("NVIDIA H200", 1)[0].name == "h200x1"
    c, why = model_cluster("NVIDIA H100 80GB HBM3", 4)
    assert why is None and (c.name, c.gpus_per_node, c.nodes) == ("h100x4", 4, 1)
    assert c.host == Cluster.preset("h100-ib400").host  # the executor as it is now
    old, new = make_maps(0, 2, 256, 288, 4)
    layer = sum(DSV3_ROW) * 72
    rows = [
        {"method": "eplb_pynccl", "time_ms": 50.0},
        {"method": "vllm-style", "time_ms": 80.0},
        {"method": "eplb_pynccl/gloo", "time_ms": 3.0},
    ]
    add_model_columns(rows, old, new, 4, DSV3_ROW, layer, c, None)
    for row in rows[:2]:
        want = predict_eplb_row(old, new, 4, DSV3_ROW, row["method"], cluster=c, layer_bytes=layer)
        assert row["model_ms"] == want and row["model_cluster"] == "h100x4"
        assert row["model_err"] == pytest.approx(100 * (want - row["time_ms"]) / row["time_ms"])
    assert (rows[2]["model_ms"], rows[2]["model_err"]) == ("n/a", "n/a")
    assert rows[2]["model_note"] == "the model has no 'eplb_pynccl/gloo' executor"
    # more ranks than the cluster holds: n/a with the model's own message
    two, _ = model_cluster("NVIDIA H200", 2)
    r = [{"method": "eplb_pynccl", "time_ms": 1.0}]
    add_model_columns(r, old, new, 4, DSV3_ROW, layer, two, None)
    assert r[0]["model_note"].startswith("the model refused: ep_size (4) is larger than")
    r = [{"method": "eplb_pynccl", "time_ms": 1.0}]
    add_model_columns(r, old, new, 4, DSV3_ROW, layer, None, "gloo on the CPU")
    assert (r[0]["model_ms"], r[0]["model_note"]) == ("n/a", "gloo on the CPU")


def test_host_profiles():
    """The presets carry the measured host costs of the executor as it is now (Session 7,
    D9's rows in bench/RESULTS.md); Session 6's and run F's executors' are kept (the
    calibration against run F's rows, and what the update moved)."""
    from eplb_pynccl.cluster import HOST_PROFILES

    cur = Cluster.preset("h200-ib400").host
    nccl, ipc = cur["nccl"], cur["ipc"]
    # host-ep1: launch 0.151 + poll 0.007 + apply 0.057 ms; IPC with graphs 0.143 + 0.289 + 0.080
    assert nccl.per_round == pytest.approx(0.215e-3)
    assert ipc.per_round == pytest.approx(0.512e-3)
    assert (nccl.per_op, nccl.per_copy, ipc.per_op) == pytest.approx((1.04e-6, 0.0, 0.0))
    # the set-up line through host-ep1 (4.84 ms, 1,148 copies) and the local permutation
    # (1.912 ms, 142 copies) ...
    assert nccl.setup + 1148 * nccl.setup_per_copy == pytest.approx(4.84e-3)
    assert nccl.setup + 142 * nccl.setup_per_copy == pytest.approx(1.912e-3)
    assert ipc.setup == nccl.setup and ipc.setup_per_copy == nccl.setup_per_copy
    # ... and the IPC host row's 1,156 message ends + 90 copies: 4.629 ms batched, 9.189 graphs
    both = nccl.setup + 90 * nccl.setup_per_copy
    assert both + 1156 * nccl.setup_per_message == pytest.approx(4.629e-3)
    assert both + 1156 * ipc.setup_per_message == pytest.approx(9.189e-3)
    s6 = Cluster.preset("h200-ib400", host="session-6").host
    assert s6["nccl"].per_round == pytest.approx(0.09e-3 + 0.20e-3 + 3 * 7e-6)
    assert (s6["nccl"].setup, s6["ipc"].per_round) == pytest.approx((5.2e-3, 0.52e-3))
    old = Cluster.preset("h100x4-nv18", host="run-f").host
    assert (old["nccl"].per_round, old["ipc"].per_round) == pytest.approx((1.3e-3, 2.2e-3))
    assert cur["torch"] == old["torch"] == s6["torch"]  # the vLLM-style baseline: unchanged
    assert set(HOST_PROFILES) == {"current", "session-6", "run-f"}
    # GPU per row copy: one kernel launch per phase (D9: 1,148 x 4 KiB in 0.052 ms at 16 CTAs);
    # the older executors and torch's copies (the baseline) keep the cluster's local_op
    assert nccl.gpu_per_copy == ipc.gpu_per_copy == pytest.approx(0.052e-3 / 1148)
    assert cur["torch"].gpu_per_copy is None and s6["nccl"].gpu_per_copy is None
    for name in ("h100-ib400", "gb200-nvl72", "h100x4-nv18", "h200x1"):
        assert Cluster.preset(name).host == cur
        assert Cluster.preset(name).local_op == pytest.approx(8e-6)
    with pytest.raises(
        ValueError, match="host must be one of 'current', 'session-6', 'run-f', got 'new'"
    ):
        Cluster.preset("h200x1", host="new")
    with pytest.raises(ValueError, match="HostCost.setup_per_copy must be >= 0"):
        HostCost(per_op=0.0, per_copy=0.0, per_round=0.0, setup_per_copy=-1.0)
    with pytest.raises(TypeError, match="HostCost.gpu_per_copy must be a real number, got str"):
        HostCost(per_op=0.0, per_copy=0.0, per_round=0.0, gpu_per_copy="1")


def test_setup_per_message_and_copy():
    # rank 0 takes expert 1 from rank 1 (one message end each) and copies its own row 0 into
    # its second slot (one local row copy); rank 1 only sends
    old, new = [[0, 2, 1, 3]], [[1, 0, 1, 3]]
    host = {
        t: HostCost(
            per_op=0.0,
            per_copy=0.0,
            per_round=0.0,
            setup=1e-3,
            plan_per_message=3e-6,
            setup_per_message=10e-6,
            setup_per_copy=100e-6,
        )
        for t in ("nccl", "ipc", "torch")
    }
    e = estimate_rearrangement(old, new, 2, [B], cluster=toy(2, host=host))
    assert e.messages == 1
    # the slowest rank sets it: rank 0 with one message end and one copy
    assert e.setup_seconds == pytest.approx(1e-3 + 13e-6 + 100e-6)
    # GPU per local copy: the cluster's local_op (1e-4 per copy or kernel) unless the
    # executor's profile says otherwise; rank 0 scatters the staged row and copies its old
    # row 0 after the exchange (2 B of bytes, two copies)
    assert e.parts["local"][0] == pytest.approx(2 * B / 10e9 + 2 * 1e-4)
    free = {t: dataclasses.replace(h, gpu_per_copy=0.0) for t, h in host.items()}
    e0 = estimate_rearrangement(old, new, 2, [B], cluster=toy(2, host=free))
    assert e0.parts["local"][0] == pytest.approx(2 * B / 10e9)
