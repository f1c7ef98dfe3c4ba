"""ExpertShuffler on GPUs: NcclTransport and TorchTransport(nccl), fp8 + fp32 scales and bf16.

Exact bytes after every rearrangement, storage kept, staging bound respected.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import nccl_process_group, run_ranks
from tests.shuffle_util import GPU_SPECS, restrict_to_held, torch_specs

pytestmark = pytest.mark.gpu


def _shuffle_job(ctx, seed, kind, transactional, staging_bytes, pack_threshold, max_messages=1024):
    import torch

    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, make_weights, random_maps

    nccl_process_group(ctx)
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    if kind == "nccl":
        comm = ep.Communicator.from_store(ctx.store, rank, n, ctx.device, key=ctx.key("uid"))
        transport = ep.NcclTransport(comm)
    else:
        comm = None
        transport = ep.TorchTransport()
    specs = torch_specs(torch, GPU_SPECS)
    rng = np.random.default_rng(seed)
    P = 6
    num_logical = n * P - 3
    cur, _ = random_maps(rng, len(specs), num_logical, n, P, empty_frac=0.05)
    # written on the current stream, not synchronised: the shuffler must order after it
    weights = make_weights(torch, specs, cur, rank, n, dev)
    ptrs = [[t.data_ptr() for t in ws] for ws in weights]
    kw = {
        "transactional": transactional,
        "pack_threshold": pack_threshold,
        "max_messages_per_round": max_messages,
    }
    if staging_bytes:
        kw["staging_bytes"] = staging_bytes
    sh = ep.ExpertShuffler(transport, weights, **kw)
    out = []
    for _ in range(3):
        _, nxt = random_maps(rng, len(specs), num_logical, n, P, empty_frac=0.05)
        restrict_to_held(cur, nxt)  # nxt may only need experts cur holds
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        side = torch.cuda.Stream(dev)
        stats = sh.rearrange(cur, nxt, verify=True, stream=side)
        peak = torch.cuda.max_memory_allocated(dev) - base
        out.append(
            {
                "bad": check_weights(torch, weights, nxt, rank, n),
                "peak": peak,
                "staging": stats.peak_extra_bytes - stats.table_bytes,
                "table": stats.table_bytes,
                "bound": stats.staging_bound,
                "explicit": sh.staging_bytes if staging_bytes else None,
                "rounds": stats.rounds,
                "sent": stats.bytes_sent,
                "recv": stats.bytes_received,
            }
        )
        cur = nxt
    kept = ptrs == [[t.data_ptr() for t in ws] for ws in weights]
    if comm is not None:
        comm.close()
    return out, kept


CASES = {
    "nccl": ("nccl", True, None, 1 << 20),
    "nccl-direct": ("nccl", False, None, 1 << 20),
    # every tensor its own message, at most 24 messages per rank per round: several rounds
    "nccl-unpacked-many-rounds": ("nccl", True, None, 0, 24),
    # everything packed per peer, with room for it
    "nccl-all-packed": ("nccl", True, 1 << 22, 1 << 40),
    "torch-nccl": ("torch", True, None, 1 << 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_shuffler_exact(world_size, case):
    results = run_ranks(_shuffle_job, world_size, 11 + world_size, *CASES[case], timeout=240)
    total_sent = [0, 0, 0]
    total_recv = [0, 0, 0]
    for out, kept in results:
        assert kept, "weight tensors lost their storage"
        for i, r in enumerate(out):
            assert r["bad"] == []
            assert r["staging"] <= r["bound"]
            if r["explicit"] is not None:  # an explicit staging_bytes is a hard bound
                assert r["bound"] == r["explicit"]
            # staging plus a few small index tensors (allocator granularity: 512 B blocks)
            assert r["peak"] <= r["bound"] + r["table"] + 64 * 1024, r
            total_sent[i] += r["sent"]
            total_recv[i] += r["recv"]
        if case == "nccl-unpacked-many-rounds" and world_size > 1:  # one rank posts no messages
            # the message cap splits at least one of the three rearrangements (with few
            # transfers per layer a whole rearrangement may fit one round of 24 messages)
            assert max(r["rounds"] for r in out) >= 2, out
    assert total_sent == total_recv
