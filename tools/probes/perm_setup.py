"""Probe (one GPU): where the set-up of the bench's local permutation goes (EP1, 2 layers x 72
DeepSeek-V3 fp8 experts, 142 rows moved): the shuffler's set-up timed by parts, then
cProfile of ``rearrange_async`` (planning + set-up) sorted by cumulative time."""

from __future__ import annotations

import cProfile
import pstats
import time

import numpy as np
import torch

import eplb_pynccl as ep
from bench.hostfree import DSV3


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    P, L = 72, 2
    w = [
        [torch.zeros((P, *shape), dtype=getattr(torch, dt), device=dev) for shape, dt in DSV3]
        for _ in range(L)
    ]
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=0)
    sh = ep.ExpertShuffler(ep.NcclTransport(comm), w)
    rng = np.random.default_rng(1)
    old = np.tile(np.arange(P, dtype=np.int64), (L, 1))
    new = np.stack([np.concatenate([[0], 1 + rng.permutation(P - 1)]) for _ in range(L)])
    for k in range(6):
        sh.rearrange(old, new, verify=False) if k % 2 == 0 else sh.rearrange(new, old, verify=False)
    torch.cuda.synchronize()
    setup, plan = [], []
    pr = cProfile.Profile()
    for k in range(10):
        a, b = (old, new) if k % 2 == 0 else (new, old)
        if k >= 6:
            pr.enable()
        t0 = time.perf_counter()
        h = sh.rearrange_async(a, b)
        dt = time.perf_counter() - t0
        if k >= 6:
            pr.disable()
        setup.append(h.stats.setup_seconds * 1e3)
        plan.append(h.stats.planner_seconds * 1e3)
        h.wait()
        print(f"rearrange_async {dt * 1e3:.3f} ms (set-up {setup[-1]:.3f}, planner {plan[-1]:.3f})")
    print("median set-up ms", np.median(setup[:6]), "planner ms", np.median(plan[:6]))
    pstats.Stats(pr).sort_stats("cumulative").print_stats(40)
    comm.close()


if __name__ == "__main__":
    main()
