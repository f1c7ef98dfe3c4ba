"""Node-level dedupe on a GPU: 4 processes standing in for 2 nodes of 2 GPUs
(``ranks_per_node=2``), the two stages of ``plan_stages(node_dedupe=True)`` moved by the
shuffler over IpcTransport (copy engines; processes may share one GPU), exact bytes after
each stage and fewer rows across "nodes" than the one-stage plan."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import run_ranks

pytestmark = pytest.mark.gpu(gpus=1)

SPECS = [((64, 112), "float8_e4m3fn"), ((2, 4), "float32"), ((96, 64), "bfloat16")]


def _dedupe_job(ctx, seed):
    import torch

    import eplb_pynccl as ep
    from eplb_pynccl.planner import plan_rearrangement, plan_stages
    from tests.shuffle_util import check_weights, make_weights
    from tests.test_dedupe import coinciding_maps

    torch.cuda.set_device(ctx.device)
    t = ep.IpcTransport(
        ctx.rank, ctx.world_size, ctx.store, device=ctx.device, key=ctx.key("ipc"), timeout=60.0
    )
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    rng = np.random.default_rng(seed)  # the same maps on every rank
    old, new = coinciding_maps(rng, 3, n, 3, hot=2)
    specs = [[(shape, getattr(torch, dt)) for shape, dt in SPECS] for _ in range(3)]
    weights = make_weights(torch, specs, old, rank, n, dev)
    sh = ep.ExpertShuffler(t, weights, ranks_per_node=2)
    stages = plan_stages(old, new, n, ranks_per_node=2, node_dedupe=True)
    bad, cross = [], 0
    for a, b, plan in stages:
        sh.rearrange(a, b)
        torch.cuda.synchronize()
        bad.append(check_weights(torch, weights, b, rank, n))
        cross += int(np.sum(plan.t_src_rank // 2 != plan.t_dst_rank // 2))
    one = plan_rearrangement(old, new, n, ranks_per_node=2)
    t.close()
    return len(stages), bad, cross, int(np.sum(one.t_src_rank // 2 != one.t_dst_rank // 2))


def test_dedupe_stages_exact_over_ipc():
    import torch

    devices = [r % max(torch.cuda.device_count(), 1) for r in range(4)]
    results = run_ranks(_dedupe_job, 4, 3, timeout=240, devices=devices)
    for stages, bad, cross, one in results:
        assert stages == 2
        assert bad == [[], []], bad
        assert cross < one
