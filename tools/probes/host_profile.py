"""Probe (one GPU): where the host time of a rearrangement goes (cProfile), at EP1 over a
1-rank communicator: the bench's host-ep1 case (4 layers x 288 rows of 4 x 4 KiB).
``--steps``: profile the rounds (launch, poll, apply) only, not the set-up."""

from __future__ import annotations

import cProfile
import pstats

import numpy as np
import torch

import eplb_pynccl as ep
from bench.common import make_maps


def main(steps_only: bool = False) -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    L, P = 4, 288
    w = [
        [torch.zeros((P, 1024), dtype=torch.float32, device=dev) for _ in range(4)]
        for _ in range(L)
    ]
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=0)
    sh = ep.ExpertShuffler(ep.NcclTransport(comm), w, pack_threshold=0)
    old, new = make_maps(0, L, 256, P, 1)
    for _ in range(5):
        sh.rearrange(old, new, verify=False)
        sh.rearrange(new, old, verify=False)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    stats = []
    for _ in range(10):
        if steps_only:
            h = sh.rearrange_async(old, new)
            pr.enable()
        else:
            pr.enable()
            h = sh.rearrange_async(old, new)
        while not h.done:
            h.step()
        pr.disable()
        h.wait()
        stats.append(h.stats)
        sh.rearrange(new, old, verify=False)
    torch.cuda.synchronize()
    st = stats[-1]
    print(
        "launch us",
        np.median([s.round_launch_us[0] for s in stats]),
        "poll us",
        np.median([s.round_poll_us[0] for s in stats]),
        "apply us",
        np.median([s.round_apply_us[0] for s in stats]),
        "setup ms",
        np.median([s.setup_seconds * 1e3 for s in stats]),
        "planner ms",
        np.median([s.planner_seconds * 1e3 for s in stats]),
        "host calls",
        st.round_host_calls,
    )
    pstats.Stats(pr).sort_stats("tottime").print_stats(35)
    comm.close()


if __name__ == "__main__":
    import sys

    main(steps_only="--steps" in sys.argv)  # --steps: the rounds only, not the set-up
