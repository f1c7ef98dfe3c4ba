"""Node-level dedupe run by the shuffler: ``planner.stage_maps`` gives the placements, the
stages run as successive rearrangements over gloo (4 processes standing in for 2 nodes of 2),
every row exact after each stage; the bytes each stage moves are the time model's, to the byte,
and the relayed experts cross the network once per node."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eplb_pynccl.cluster import Cluster
from eplb_pynccl.estimate import estimate_stages
from eplb_pynccl.planner import plan_rearrangement, plan_stages, relay_map, stage_maps
from tests.test_dedupe import coinciding_maps, follower_keys

ROW = [24, 12]  # the job's tensors: 4 x 6 fp8 and 3 fp32 per expert row
WORLD, RPN = 4, 2


def _maps(seed: int):
    return coinciding_maps(np.random.default_rng(seed), 3, WORLD, 3, hot=2)


def _job(rank, world, seed):
    import torch

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights

    old, new = _maps(seed)  # the same maps on every rank
    maps = stage_maps(old, new, world, ranks_per_node=RPN)
    specs = [[((4, 6), torch.float8_e4m3fn), ((3,), torch.float32)]] * old.shape[0]
    weights = make_weights(torch, specs, old, rank, world, "cpu")
    sh = ExpertShuffler(TorchTransport(), weights, ranks_per_node=RPN)
    out = []
    for a, b in zip(maps, maps[1:]):
        st = sh.rearrange(a, b, verify=True)
        out.append(
            (st.bytes_received, st.bytes_sent, check_weights(torch, weights, b, rank, world))
        )
    return len(maps), out


def _cluster() -> Cluster:
    c = Cluster.preset("h100-ib400", nodes=WORLD // RPN)
    return dataclasses.replace(c, gpus_per_node=RPN, nics_per_node=RPN, nic_gpus=None)


@pytest.mark.parametrize("seed", [0, 5])
def test_stage_maps_through_the_shuffler_over_gloo(seed):
    pytest.importorskip("torch")
    from tests.shuffle_util import run_gloo

    old, new = _maps(seed)
    maps = stage_maps(old, new, WORLD, ranks_per_node=RPN)
    assert len(maps) == 3 and maps[0] is old and maps[2] is new
    assert np.array_equal(maps[1], relay_map(old, new, WORLD, RPN))
    res = run_gloo(_job, WORLD, seed)
    assert [n for n, _ in res] == [3] * WORLD
    # every rank exact after each stage
    assert [[bad for _, _, bad in stages] for _, stages in res] == [[[], []]] * WORLD
    # the bytes the shuffler moved in each stage: the model's, to the byte
    c = _cluster()
    for k, (a, b) in enumerate(zip(maps, maps[1:])):
        plan = plan_rearrangement(a, b, WORLD, ranks_per_node=RPN)
        est = estimate_stages([(a, b, plan)], ROW, cluster=c)
        got = sum(stages[k][0] for _, stages in res)
        assert got == sum(stages[k][1] for _, stages in res)  # what was sent arrived
        assert got == est.nvlink_bytes + est.network_bytes
        if k == 1:  # the relays hand the experts on inside their node
            assert est.network_bytes == 0
    # over both stages the network carries one row less per follower (layer, rank, expert)
    one = estimate_stages(plan_stages(old, new, WORLD, ranks_per_node=RPN), ROW, cluster=c)
    two = estimate_stages(
        plan_stages(old, new, WORLD, ranks_per_node=RPN, node_dedupe=True), ROW, cluster=c
    )
    followers = follower_keys(old, maps[1], new, WORLD).size
    assert followers > 0
    assert two.network_bytes == one.network_bytes - followers * sum(ROW)


def test_stage_maps_one_stage_and_bad_input():
    old = np.arange(16).reshape(1, 16)
    new = old.copy()
    new[0, 8] = 0  # one GPU of node 1 only: nothing to dedupe
    assert stage_maps(old, new, 8, ranks_per_node=4) == [old, new]
    assert stage_maps(old, new, 8, ranks_per_node=4, node_dedupe=False) == [old, new]
    new[0, [10, 12]] = 0  # three GPUs of node 1 want expert 0: the relay fetches it once
    maps = stage_maps(old, new, 8, ranks_per_node=4)
    assert len(maps) == 3 and maps[1][0, 8] == 0 and maps[1][0, [10, 12]].tolist() == [10, 12]
    auto = stage_maps(
        old, new, 8, ranks_per_node=4, node_dedupe="auto", row_bytes=[64 << 20], cluster=_c8()
    )
    assert len(auto) in (2, 3) and auto[0] is old and auto[-1] is new
    with pytest.raises(TypeError, match="ranks_per_node must be an int"):
        stage_maps(old, new, 8, ranks_per_node=None)
    with pytest.raises(ValueError, match="node_dedupe must be False, True or 'auto', got 1"):
        stage_maps(old, new, 8, ranks_per_node=4, node_dedupe=1)
    with pytest.raises(ValueError, match="node_dedupe must be False, True or 'auto', got 0"):
        plan_stages(old, new, 8, ranks_per_node=4, node_dedupe=0)  # not taken for a mode
    assert len(plan_stages(old, new, 8, ranks_per_node=4, node_dedupe=np.True_)) == 2
    with pytest.raises(ValueError, match="needs cluster and row_bytes"):
        stage_maps(old, new, 8, ranks_per_node=4, node_dedupe="auto")


def _c8() -> Cluster:
    c = Cluster.preset("h100-ib400", nodes=2)
    return dataclasses.replace(c, gpus_per_node=4, nics_per_node=4, nic_gpus=None)
