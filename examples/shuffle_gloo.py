"""Rearrange expert weights across 2 processes on the CPU (gloo), then check every row.

    PYTHONPATH=. python examples/shuffle_gloo.py      (from the repository root)

On GPUs the same code takes ``NcclTransport(Communicator.from_store(...))`` and CUDA tensors
(see README "Expert shuffler").
"""

import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb_pynccl import ExpertShuffler, TorchTransport, plan_rearrangement

EP, SLOTS, LAYERS = 2, 4, 2  # 2 ranks x 4 slots, 2 MoE layers


def fill(weights, expert_map, rank):
    """Row r of every tensor holds its expert id (so we can check where experts went)."""
    for layer, tensors in enumerate(weights):
        for t in tensors:
            for r in range(SLOTS):
                t[r] = float(expert_map[layer, rank * SLOTS + r])


def main(rank, rendezvous):
    # a file rendezvous: no port to pick (a free port picked here could be taken before use)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=EP)
    # slot -> logical expert; slot s lives on rank s // SLOTS at row s % SLOTS; -1 = empty
    old_map = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
    new_map = np.array([[7, 6, 5, 4, 3, 2, 1, 0], [0, 0, 1, 2, 3, 4, 5, -1]])  # layer 1: 0 twice
    # [num_local_experts, ...] per tensor, e.g. w13 (bf16) and a scale (fp32)
    weights = [
        [torch.zeros(SLOTS, 16, 32, dtype=torch.bfloat16), torch.zeros(SLOTS, 4)]
        for _ in range(LAYERS)
    ]
    fill(weights, old_map, rank)
    ptrs = [t.data_ptr() for ws in weights for t in ws]

    plan = plan_rearrangement(old_map, new_map, EP)  # pure: the same on every rank
    shuffler = ExpertShuffler(TorchTransport(), weights)
    stats = shuffler.rearrange(old_map, new_map, verify=True)  # in place

    for layer, tensors in enumerate(weights):
        for t in tensors:
            for r in range(SLOTS):
                want = new_map[layer, rank * SLOTS + r]
                if want >= 0:
                    assert float(t[r].flatten()[0]) == want, (layer, r)
    assert ptrs == [t.data_ptr() for ws in weights for t in ws]  # storage kept
    print(
        f"rank {rank}: {plan.num_transfers} transfers in the plan; this rank sent "
        f"{stats.experts_sent} experts ({stats.bytes_sent} B), received {stats.experts_received}, "
        f"copied {stats.local_copies} locally, in {stats.rounds} round(s): OK"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(main, args=(os.path.join(d, "rendezvous"),), nprocs=EP)
