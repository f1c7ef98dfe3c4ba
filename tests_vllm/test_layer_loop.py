"""eplb_pynccl's rearrange_expert_weights_inplace (ExpertShuffler, all layers at once) against
vLLM's own loop with its torch_nccl communicator, on the same gloo group and maps."""

from __future__ import annotations

import numpy as np
import pytest

from tests_vllm.util import (
    PER_RANK,
    TIMEOUT,
    buffer,
    clone,
    coordinator,
    differences,
    sequence,
    side_by_side,
    specs,
    weights,
)


def _our_comm_and_loop(gc, ours, our_buf, which):
    """The communicator and the loop that ``which`` names (see loop_job)."""
    import vllm.distributed.eplb.eplb_state as es
    from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator

    from eplb_pynccl.integrations import vllm as V

    if which == "foreign":
        our_comm = create_eplb_communicator(gc, "torch_nccl", ours, our_buf)
    else:
        our_comm = V.create_communicator(gc, ours, our_buf)
    if which == "patched":
        V.register()
        loop = es.rearrange_expert_weights_inplace
    else:
        loop = V.rearrange_expert_weights_inplace
    return our_comm, loop


def _same_bytes(torch, xs, ys):
    # bytes, not values: random bytes hold NaNs, which torch.equal never finds equal
    return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(xs, ys))


def _loop_steps(torch, gc, maps, ref, ours, ref_buf, our_buf, ref_comm, our_comm, loop):
    """vLLM's loop on ``ref`` and ``loop`` on ``ours`` for each pair of successive maps."""
    import vllm.distributed.eplb.rebalance_execute as rx

    from eplb_pynccl import RearrangeStats
    from tests.shuffle_util import check_weights

    ep_rank, ep_size = gc.rank_in_group, gc.world_size
    out = []
    for old, new in zip(maps, maps[1:]):
        rx.rearrange_expert_weights_inplace(
            torch.from_numpy(old), torch.from_numpy(new), ref, ref_buf, gc.device_group, ref_comm
        )
        stats = loop(
            torch.from_numpy(old), torch.from_numpy(new), ours, our_buf, gc.device_group, our_comm
        )
        out.append(
            (
                differences(torch, ref, ours, new, ep_rank, ep_size),
                check_weights(torch, ours, new, ep_rank, ep_size),
                isinstance(stats, RearrangeStats),
                stats.layers_changed if stats is not None else None,
            )
        )
    return out


def _profile_pass(torch, gc, maps, ours, our_buf, our_comm, loop):
    """vLLM's profile pass moves nothing: (its return value, whether ``ours`` is unchanged)."""
    snapshot = [t.clone() for ws in ours for t in ws]
    prof = loop(
        torch.from_numpy(maps[-1]),
        torch.from_numpy(maps[0]),
        ours,
        our_buf,
        gc.device_group,
        our_comm,
        True,
    )
    unchanged = _same_bytes(torch, snapshot, [t for ws in ours for t in ws])
    return prof, unchanged


def loop_job(ctx, seed, dtype, which):
    """``which``: "ours" (our communicator), "foreign" (vLLM's communicator: our loop falls back
    to TorchTransport(ep_group)), "patched" (vLLM's eplb_state name after register())."""
    import torch

    gc, maps, ref, ours, ref_buf, our_buf, ref_comm = side_by_side(ctx, torch, seed, dtype)
    our_comm, loop = _our_comm_and_loop(gc, ours, our_buf, which)
    ptrs = [t.data_ptr() for ws in ours for t in ws]
    before_buf = [b.clone() for b in our_buf]
    out = _loop_steps(torch, gc, maps, ref, ours, ref_buf, our_buf, ref_comm, our_comm, loop)
    profile = _profile_pass(torch, gc, maps, ours, our_buf, our_comm, loop)
    return {
        "steps": out,
        "same_storage": ptrs == [t.data_ptr() for ws in ours for t in ws],
        "buffer_untouched": _same_bytes(torch, before_buf, our_buf),
        "profile": profile,
        "changed": [
            sorted({int(x) for x in np.nonzero((o != n).any(axis=1))[0]})
            for o, n in zip(maps, maps[1:])
        ],
    }


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["ours", "foreign", "patched"])
def test_our_loop_matches_vllm_loop(pools, world, dtype, which):
    seed = 100 + 10 * world + {"float32": 0, "bfloat16": 1}[dtype]
    for res in pools(world).run(loop_job, seed, dtype, which, timeout=TIMEOUT):
        assert res["same_storage"]
        assert res["buffer_untouched"]  # vLLM's per-layer buffer is not needed
        assert res["profile"] == (None, True)
        for step, (diff, bad, is_stats, layers) in enumerate(res["steps"]):
            assert diff == {"filled": [], "empty": []}, (step, diff)
            assert bad == [], (step, bad)
            assert is_stats, step
            assert layers == res["changed"][step]


def patched_with_vllm_comm_job(ctx):
    """After register(), eplb_state's loop still is vLLM's for vLLM's own communicators."""
    import torch
    import vllm.distributed.eplb.eplb_state as es
    from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator

    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights

    V.register()
    gc = coordinator(ctx)
    maps = sequence(5, 1, 2, gc.world_size, PER_RANK)
    ws = weights(torch, specs(torch, "float32"), 2, maps[0], gc.rank_in_group, gc.world_size)
    buf = buffer(torch, ws)
    comm = create_eplb_communicator(gc, "torch_nccl", ws, buf)  # torch_gloo needs a device
    ret = es.rearrange_expert_weights_inplace(
        torch.from_numpy(maps[0]), torch.from_numpy(maps[1]), ws, buf, gc.device_group, comm
    )
    return (
        type(comm).__name__,
        ret,
        check_weights(torch, ws, maps[1], gc.rank_in_group, gc.world_size),
    )


def test_patched_loop_keeps_vllms_loop_for_vllms_communicators(pools):
    for name, ret, bad in pools(2).run(patched_with_vllm_comm_job, timeout=TIMEOUT):
        assert (name, ret, bad) == ("TorchDistNcclEplbCommunicator", None, [])


def _rank_mapping_maps(direction, ep_size, L):
    """rank_mapping and the old and new maps (L layers) of rank_mapping_job's ``direction``."""
    P, E = 3, 5
    rng = np.random.default_rng(11)
    if direction == "down":
        mapping = {0: 0, 1: -1, 2: 1}
        old = np.stack([rng.permutation(np.arange(ep_size * P) % E) for _ in range(L)])
        new = np.stack([rng.permutation(np.arange(2 * P) % E) for _ in range(L)])
    else:
        mapping = {0: 0, 1: 2}
        old = np.stack([rng.permutation(np.arange(2 * P) % E) for _ in range(L)])
        new = np.stack([rng.permutation(np.arange(ep_size * P) % E) for _ in range(L)])
    return mapping, old, new


def _same_layout_as_vllm(direction, old, new, laid_old, laid_new, mapping, ep_size):
    """Whether vLLM's own helpers lay the maps out the same way as ours."""
    import torch
    import vllm.distributed.eplb.rebalance_execute as rx

    if direction == "down":
        theirs = rx._map_new_expert_indices_with_rank_mapping(
            torch.from_numpy(new), mapping
        ).numpy()
        return np.array_equal(theirs, laid_new) and np.array_equal(laid_old, old)
    theirs = rx._map_old_expert_indices_with_rank_mapping(
        torch.from_numpy(old), mapping, ep_size
    ).numpy()
    return np.array_equal(theirs, laid_old) and np.array_equal(laid_new, new)


def rank_mapping_job(ctx, direction):
    """Elastic EP on 3 processes: 'down' from 3 EP ranks to 2 (rank 1 leaves), 'up' from 2 to 3
    (new rank 1 joins); vLLM's loop and ours from the same maps and rank_mapping."""
    import torch
    import vllm.distributed.eplb.rebalance_execute as rx
    from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator

    from eplb_pynccl.integrations import vllm as V
    from eplb_pynccl.integrations.vllm import _apply_rank_mapping
    from tests.shuffle_util import check_weights

    gc = coordinator(ctx)
    ep_rank, ep_size = gc.rank_in_group, gc.world_size
    L = 2
    mapping, old, new = _rank_mapping_maps(direction, ep_size, L)
    # the weights as laid out on the current EP group
    laid_old, laid_new = _apply_rank_mapping(old, new, mapping, ep_size)
    ref = weights(torch, specs(torch, "mixed"), L, laid_old, ep_rank, ep_size)
    ours = clone(ref)
    ref_buf = buffer(torch, ref)
    ref_comm = create_eplb_communicator(gc, "torch_nccl", ref, ref_buf)
    our_comm = V.create_communicator(gc, ours, buffer(torch, ours))
    rx.rearrange_expert_weights_inplace(
        torch.from_numpy(old),
        torch.from_numpy(new),
        ref,
        ref_buf,
        gc.device_group,
        ref_comm,
        rank_mapping=mapping,
    )
    V.rearrange_expert_weights_inplace(
        torch.from_numpy(old),
        torch.from_numpy(new),
        ours,
        None,
        gc.device_group,
        our_comm,
        rank_mapping=mapping,
    )
    same_layout = _same_layout_as_vllm(direction, old, new, laid_old, laid_new, mapping, ep_size)
    return (
        differences(torch, ref, ours, laid_new, ep_rank, ep_size),
        check_weights(torch, ours, laid_new, ep_rank, ep_size),
        same_layout,
    )


@pytest.mark.parametrize("direction", ["down", "up"])
def test_rank_mapping_matches_vllm(pools, direction):
    for diff, bad, same_layout in pools(3).run(rank_mapping_job, direction, timeout=TIMEOUT):
        assert same_layout
        assert diff == {"filled": [], "empty": []}
        assert bad == []


def wrong_group_job(ctx):
    """A communicator of EP group [1, 2] used with the world group as ep_group."""
    import torch

    from eplb_pynccl.integrations import vllm as V

    gc = coordinator(ctx, [[0], [1, 2]])
    world = coordinator(ctx)
    ws = [[torch.zeros(PER_RANK, 2)]]
    comm = V.create_communicator(gc, ws, buffer(torch, ws))
    m = torch.zeros(1, PER_RANK * 3, dtype=torch.int64)
    try:
        V.rearrange_expert_weights_inplace(m, m, ws, None, world.device_group, comm)
    except ValueError as e:
        return str(e)
    return None


def test_a_communicator_of_another_group_is_refused(pools):
    assert pools(3).run(wrong_group_job, timeout=TIMEOUT) == [
        "the communicator's ranks (0 of 1) are not ep_group's (0 of 3)",
        "the communicator's ranks (0 of 2) are not ep_group's (1 of 3)",
        "the communicator's ranks (1 of 2) are not ep_group's (2 of 3)",
    ]
