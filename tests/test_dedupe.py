"""Node-level dedupe (planner.relay_map / plan_stages), checked on the virtual cluster: both
stages byte-exact at EP16-256 with 8 GPUs per node, never more network bytes than without."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl.cluster import Cluster
from eplb_pynccl.estimate import estimate_rearrangement, estimate_stages
from eplb_pynccl.planner import plan_rearrangement, plan_stages, relay_map
from eplb_pynccl.simulate import simulate_rearrangement

ROW = [3 << 20, 96, 40]  # one large tensor (own messages) and two packed ones


def network_rows(plan, rpn):
    return int(np.sum(plan.t_src_rank // rpn != plan.t_dst_rank // rpn))


def test_three_gpus_of_a_node_need_one_expert():
    # 2 nodes x 4 GPUs, 2 slots each; expert 0 only on rank 0; ranks 4, 5, 6 want it
    old = np.arange(16).reshape(1, 16)
    new = old.copy()
    new[0, [8, 10, 12]] = 0
    assert network_rows(plan_rearrangement(old, new, 8, ranks_per_node=4), 4) == 3
    mid = relay_map(old, new, 8, 4)
    want = old.copy()
    want[0, 8] = 0  # the relay (rank 4) takes it in the first stage; the others keep old rows
    assert np.array_equal(mid, want)
    (a0, b0, p0), (a1, b1, p1) = plan_stages(old, new, 8, ranks_per_node=4, node_dedupe=True)
    assert np.array_equal(b0, mid) and a1 is b0
    assert p0.t_src_rank.tolist() == [0] and p0.t_dst_rank.tolist() == [4]
    assert p1.t_src_rank.tolist() == [4, 4] and p1.t_dst_rank.tolist() == [5, 6]
    for a, b, _ in ((a0, b0, p0), (a1, b1, p1)):
        simulate_rearrangement(a, b, 8, [[64, 32]] * 1, ranks_per_node=4)


def test_nothing_to_dedupe():
    old = np.arange(16).reshape(1, 16)
    new = old.copy()
    new[0, 8] = 0  # one GPU of node 1 only
    assert relay_map(old, new, 8, 4) is None
    new[0, [10, 12]] = 9  # held by rank 4 on the receivers' node: NVLink already
    assert relay_map(old, new, 8, 4) is None
    assert relay_map(old, new, 8, 8) is None  # one node
    assert len(plan_stages(old, new, 8, ranks_per_node=4, node_dedupe=True)) == 1


def coinciding_maps(rng, layers, ep, per_rank, hot):
    """Placements where a few hot experts get many replicas (which land on GPUs of one node
    together): what makes several GPUs of a node need the same expert."""
    n = ep * per_rank
    nl = n // 2
    out = []
    for _ in range(2):
        m = np.empty((layers, n), dtype=np.int64)
        for layer in range(layers):
            hot_ids = rng.choice(nl, hot, replace=False)
            ids = np.concatenate([np.arange(nl), rng.choice(hot_ids, n - nl)])
            m[layer] = rng.permutation(ids)
        out.append(m)
    return out


def follower_keys(old, mid, new, ep):
    """(layer, rank, expert) of the rows the relays serve: where mid keeps the old row."""
    L, N = old.shape
    P = N // ep
    lay, slot = np.nonzero(mid != new)
    return np.unique((lay * ep + slot // P) * (int(new.max()) + 1) + new[lay, slot])


def check_relays_written_first(old, mid, new, stages, ep, rpn):
    """Stage 2 reads a relayed expert only from a row that stage 1 wrote with it over the
    network (the relay's write): the followers' node held it nowhere before, so every row
    stage 2 reads is one that stage 1 produced, and stage 2 runs after stage 1 ends."""
    (_, _, p1), (_, _, p2) = stages
    N = old.shape[1]
    P = N // ep
    net1 = p1.t_src_rank // rpn != p1.t_dst_rank // rpn
    relayed = set(
        zip(
            p1.t_layer[net1].tolist(),
            (p1.t_dst_rank[net1] * P + p1.t_dst_row[net1]).tolist(),
        )
    )
    for layer, src, row, e in zip(
        p2.t_layer.tolist(), p2.t_src_rank.tolist(), p2.t_src_row.tolist(), p2.t_expert.tolist()
    ):
        slot = src * P + row
        assert mid[layer, slot] == e  # stage 2 reads the intermediate placement
        assert old[layer, slot] != e  # a row stage 1 wrote ...
        assert (layer, slot) in relayed  # ... over the network: the relay's row
    # every stage-2 transfer stays inside a node: the relays' rows travel over NVLink
    assert not np.any(p2.t_src_rank // rpn != p2.t_dst_rank // rpn)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 64, 128, 256]), st.booleans())
def test_stages_exact_on_the_virtual_cluster(seed, ep, transactional):
    rng = np.random.default_rng(seed)
    per_rank = 2 if ep >= 128 else 3
    old, new = coinciding_maps(rng, 1 if ep >= 128 else 2, ep, per_rank, hot=max(2, ep // 16))
    stages = plan_stages(old, new, ep, ranks_per_node=8, node_dedupe=True)
    for a, b, _ in stages:
        # each stage is a full rearrangement; stage 2 starts from stage 1's checked result
        # (every row that is not empty in the intermediate map holds exactly its expert),
        # so it reads the relay's row only after the relay's write
        simulate_rearrangement(
            a, b, ep, [ROW] * a.shape[0], ranks_per_node=8, transactional=transactional
        )
    base_plan = plan_rearrangement(old, new, ep, ranks_per_node=8)
    base = network_rows(base_plan, 8)
    deduped = sum(network_rows(p, 8) for _, _, p in stages)
    assert deduped <= base
    # bytes, exact: the schedules' network bytes drop by one expert per follower (layer,
    # rank, expert), on the follower's node, and nothing else changes
    c = Cluster.preset("h100-ib400", nodes=ep // 8)
    one = estimate_stages([(old, new, base_plan)], ROW, cluster=c)
    if len(stages) == 1:
        return
    mid = stages[0][1]
    check_relays_written_first(old, mid, new, stages, ep, 8)
    keys = follower_keys(old, mid, new, ep)
    E = int(new.max()) + 1
    f_node = keys // E % ep // 8  # (layer * ep + rank) * E + e  ->  node of the rank
    assert deduped == base - keys.size
    two = estimate_stages(stages, ROW, cluster=c)
    row = sum(ROW)
    assert one.network_bytes == base * row
    assert two.network_bytes == (base - keys.size) * row
    want = one.network_bytes_per_node - row * np.bincount(f_node, minlength=ep // 8)
    assert two.network_bytes_per_node.tolist() == want.tolist()
    assert two.stages == 2 and two.rounds == sum(
        estimate_stages([s_], ROW, cluster=c).rounds for s_ in stages
    )


def test_auto_picks_the_faster():
    rng = np.random.default_rng(3)
    old, new = coinciding_maps(rng, 2, 32, 3, hot=3)
    c = Cluster.preset("h100-ib400", nodes=4)
    rows = [4096 * 7168, 7168 * 2048]
    t_off = estimate_rearrangement(old, new, 32, rows, cluster=c).seconds
    t_on = estimate_rearrangement(old, new, 32, rows, cluster=c, node_dedupe=True)
    t_auto = estimate_rearrangement(old, new, 32, rows, cluster=c, node_dedupe="auto").seconds
    assert t_on.stages == 2
    assert t_auto == min(t_off, t_on.seconds)


def test_bad_input():
    old = np.arange(16).reshape(1, 16)
    with pytest.raises(ValueError, match="node_dedupe must be False, True or 'auto', got 'yes'"):
        plan_stages(old, old, 8, ranks_per_node=4, node_dedupe="yes")
    with pytest.raises(ValueError, match="node_dedupe needs ranks_per_node"):
        plan_stages(old, old, 8, node_dedupe=True)
    new = old.copy()
    new[0, [8, 10, 12]] = 0
    with pytest.raises(ValueError, match="needs cluster and row_bytes"):
        plan_stages(old, new, 8, ranks_per_node=4, node_dedupe="auto")
    with pytest.raises(TypeError, match="ranks_per_node must be an int"):
        relay_map(old, new, 8, 4.0)
    with pytest.raises(ValueError, match="same shape"):
        relay_map(old, new[:, :8], 8, 4)


def _gloo_stages_job(rank, world, seed):
    import torch

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights

    rng = np.random.default_rng(seed)  # the same maps on every rank
    old, new = coinciding_maps(rng, 3, world, 3, hot=2)
    specs = [[((4, 6), torch.float8_e4m3fn), ((3,), torch.float32)]] * 3
    weights = make_weights(torch, specs, old, rank, world, "cpu")
    sh = ExpertShuffler(TorchTransport(), weights, ranks_per_node=2)
    stages = plan_stages(old, new, world, ranks_per_node=2, node_dedupe=True)
    bad = []
    for a, b, _ in stages:
        sh.rearrange(a, b, verify=True)
        bad.append(check_weights(torch, weights, b, rank, world))
    return len(stages), bad


def test_stages_through_the_shuffler_over_gloo():
    # 4 processes as 2 nodes of 2: the shuffler runs old -> mid -> new, exact after each
    pytest.importorskip("torch")
    from tests.shuffle_util import run_gloo

    for stages, bad in run_gloo(_gloo_stages_job, 4, 1):
        assert stages == 2
        assert bad == [[], []]
