"""MigrationAwareEplbPolicy through vLLM's policy interface, against DefaultEplbPolicy on the
same loads; its maps executed by vLLM's loop with our communicator.

Needs eplb_pynccl.placement (eplb_pynccl.rebalance): skipped, with that reason, where an
install lacks it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests_vllm.util import TIMEOUT, buffer, coordinator, specs, weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("eplb_pynccl.placement") is None,
    reason="eplb_pynccl.placement (rebalance) is not in this install",
)

L, E, SLOTS, RANKS, GROUPS = 4, 16, 20, 4, 4


def _loads(rng, drift=None):
    base = rng.lognormal(0.0, 1.2, size=(L, E))
    if drift is not None:
        base = drift * rng.lognormal(0.0, 0.1, size=(L, E))
    return base


def imbalance(loads, phy2log, ranks):
    """Per layer: max over ranks of (sum over its slots of load / replicas) / mean over ranks."""
    out = []
    for layer in range(loads.shape[0]):
        m = phy2log[layer]
        count = np.bincount(m, minlength=loads.shape[1])
        per_slot = loads[layer, m] / count[m]
        per_rank = per_slot.reshape(ranks, -1).sum(axis=1)
        out.append(per_rank.max() / per_rank.mean())
    return np.array(out)


def _policies():
    import vllm.distributed.eplb.policy as pol

    from eplb_pynccl.integrations import vllm as V

    V.register()
    return pol.EPLB_POLICIES["eplb_pynccl"], pol.EPLB_POLICIES["default"]


def test_maps_are_valid_vllm_maps():
    import torch

    ours, _ = _policies()
    rng = np.random.default_rng(0)
    loads = torch.from_numpy(_loads(rng)).round().to(torch.int64)  # vLLM passes token counts
    for nodes in (1, 2, 3):  # 3 nodes: groups do not divide, vLLM's global fallback
        m = ours.rebalance_experts(loads, SLOTS, GROUPS, nodes, RANKS)
        assert isinstance(m, torch.Tensor)
        assert (m.dtype, m.device, tuple(m.shape)) == (torch.int64, torch.device("cpu"), (L, SLOTS))
        for layer in range(L):
            assert sorted(set(m[layer].tolist())) == list(range(E))  # every expert, no -1


def test_against_default_policy_on_the_same_loads():
    import torch

    ours, default = _policies()
    rng = np.random.default_rng(1)
    first = _loads(rng)
    old = default.rebalance_experts(torch.from_numpy(first), SLOTS, GROUPS, 1, RANKS)
    drifted = _loads(rng, drift=first)
    w = torch.from_numpy(drifted)
    theirs = default.rebalance_experts(w, SLOTS, GROUPS, 1, RANKS, old)
    mine = ours.rebalance_experts(w, SLOTS, GROUPS, 1, RANKS, old)
    imb_theirs = imbalance(drifted, theirs.numpy(), RANKS)
    imb_mine = imbalance(drifted, mine.numpy(), RANKS)
    changed_theirs = int((theirs != old).sum())
    changed_mine = int((mine != old).sum())
    # balance within 1% of DeepSeek's algorithm per layer (the repair's target is the
    # imbalance of eplb_pynccl's "deepseek", vLLM's own map), fewer slots moved
    assert np.all(imb_mine <= imb_theirs * 1.01), (imb_mine, imb_theirs)
    assert changed_mine < changed_theirs, (changed_mine, changed_theirs)


def _random_case(rng, case):
    """One of 300 inputs: 1-6 layers, 1-16 GPUs, nodes dividing them, 1-16 groups; integer,
    float, Zipf, all-equal and sparse loads, and some with over 64 redundant slots."""
    L, ep = int(rng.integers(1, 7)), int(rng.integers(1, 17))
    nodes = int(rng.choice([d for d in range(1, ep + 1) if ep % d == 0]))
    G = int(rng.integers(1, 17))
    E = G * int(rng.integers(1, 5))
    P = -(-E // ep) + int(rng.integers(0, 3))
    kind = ("int", "float", "zipf", "equal", "sparse", "many")[case % 6]
    if kind == "int":
        x = rng.integers(0, 50, (L, E))
    elif kind == "float":
        x = rng.random((L, E)) * 100
    elif kind == "zipf":
        x = np.rint(1000.0 / (1 + np.stack([rng.permutation(E) for _ in range(L)])) ** 0.8)
    elif kind == "equal":
        x = np.full((L, E), 5)
    elif kind == "sparse":
        x = np.where(rng.random((L, E)) < 0.2, rng.integers(1, 100, (L, E)), 0)
    else:
        P += 70
        x = rng.integers(0, 30, (L, E))
    return x, ep * P, G, nodes, ep


def test_deepseek_is_vllms_default_policy():
    """eplb_pynccl's policy="deepseek" returns DefaultEplbPolicy's map, exactly, on 300
    random inputs (ties included) and on DeepSeek's README example."""
    import torch

    from eplb_pynccl import rebalance
    from tests.test_placement import README_LOADS, README_MAP

    _, default = _policies()
    assert default.rebalance_experts(torch.tensor(README_LOADS), 16, 4, 2, 8).tolist() == README_MAP
    rng = np.random.default_rng(23)
    differ = []
    for case in range(300):
        x, N, G, nodes, ep = _random_case(rng, case)
        theirs = default.rebalance_experts(torch.from_numpy(x), N, G, nodes, ep).numpy()
        mine = rebalance(x, N, ep, num_nodes=nodes, num_groups=G, policy="deepseek").new_map
        if not np.array_equal(theirs, mine):
            differ.append((case, x.shape, N, G, nodes, ep))
    assert differ == []


def policy_e2e_job(ctx):
    import torch
    import vllm.distributed.eplb.rebalance_execute as rx

    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights

    ours, default = _policies()
    gc = coordinator(ctx)
    rng = np.random.default_rng(2)
    first = _loads(rng)
    slots = 4 * gc.world_size
    old = default.rebalance_experts(torch.from_numpy(first[:, :6]), slots, 1, 1, gc.world_size)
    new = ours.rebalance_experts(
        torch.from_numpy(_loads(rng, drift=first)[:, :6]), slots, 1, 1, gc.world_size, old
    )
    ws = weights(torch, specs(torch, "bfloat16"), L, old.numpy(), gc.rank_in_group, gc.world_size)
    comm = V.create_communicator(gc, ws, buffer(torch, ws))
    rx.rearrange_expert_weights_inplace(old, new, ws, buffer(torch, ws), gc.device_group, comm)
    return check_weights(torch, ws, new.numpy(), gc.rank_in_group, gc.world_size)


def test_its_maps_run_through_vllms_loop(pools):
    assert pools(2).run(policy_e2e_job, timeout=TIMEOUT) == [[], []]
