"""Async rearrangement beside live NCCL traffic (stress), and a peer dying mid-rearrangement."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests.gpu_util import RankFailure, run_ranks

pytestmark = pytest.mark.gpu


def _init(ctx, **comm_kw):
    import faulthandler
    import sys

    import torch

    # a stuck rank prints every thread's stack (then the runner's timeout fails the test)
    faulthandler.dump_traceback_later(75, exit=False, file=sys.stderr)
    import torch.distributed as dist

    import eplb_pynccl as ep

    torch.cuda.set_device(ctx.device)
    dist.init_process_group(
        "nccl",
        store=dist.PrefixStore("pg", ctx.store),
        rank=ctx.rank,
        world_size=ctx.world_size,
        device_id=torch.device("cuda", ctx.device),
    )
    comm = ep.Communicator.from_store(
        ctx.store, ctx.rank, ctx.world_size, ctx.device, key=ctx.key("uid"), **comm_kw
    )
    comm.connect_peers()
    return comm


def _stress_job(ctx, steps, variant):
    from bench.stress import stress_rank, variant_settings

    cfg = variant_settings(variant)
    comm = _init(ctx, blocking=False, max_ctas=8, timeout=60)
    res = stress_rank(
        ctx.rank,
        ctx.world_size,
        comm,
        steps=steps,
        seed=5,
        lockstep=cfg["lockstep"],
        step_before_read=cfg["step_before_read"],
        transport=cfg["transport"],
        log=lambda m: print(f"[rank {ctx.rank}] {m}", flush=True),
    )
    comm.close()
    return res


@pytest.mark.parametrize(
    "variant", ["default", "lockstep", "step-after-read", "ipc", "ipc-after-read"]
)
def test_async_stress_beside_live_nccl(world_size, variant):
    """default: free-running step() between enqueueing a forward step and reading its
    result; lockstep: step(wait=True) there; step-after-read: free-running, after the read."""
    from bench.stress import summarize

    t0 = time.monotonic()
    results = run_ranks(_stress_job, world_size, 500, variant, timeout=110)
    for r in results:
        assert r["mismatches"] == [], r
        assert r["half_layers"] == [], r
        assert r["steps"] >= 500 and r["rearrangements"] >= 20, r
    row = summarize(results)
    print(
        f"\nstress ws{world_size} {variant}: {row['steps']} steps, "
        f"{row['rearrangements']} rearrangements in {time.monotonic() - t0:.0f} s; step "
        f"{row['base_step_ms']:.3f} ms idle vs {row['busy_step_ms']:.3f} ms while rearranging "
        f"({row['slowdown_pct']:+.1f}%); step() {row['step_host_us']:.0f} us, host "
        f"{row['host_per_step_us']:.0f} us per step; "
        f"async {row['async_ms']:.1f} ms vs sync {row['sync_ms']:.1f} ms"
    )


def _peer_failure_job(ctx, outdir, timeout):
    import torch

    import eplb_pynccl as ep

    comm = _init(ctx, blocking=False, timeout=timeout)
    n, rank = ctx.world_size, ctx.rank
    layers, P = 6, 8
    from bench.common import check as _check
    from bench.common import fill as _fill
    from bench.common import make_maps

    old, new = make_maps(3, layers, 8 * n - n, 8 * n, n)
    dev = torch.device("cuda", ctx.device)
    weights = [
        [torch.empty((P, 1024, 1024), dtype=torch.bfloat16, device=dev)] for _ in range(layers)
    ]
    _fill(torch, weights, old, rank, P)
    torch.cuda.synchronize()
    sh = ep.ExpertShuffler(ep.NcclTransport(comm), weights)
    victim = n - 1
    h = sh.rearrange_async(old, new)
    if rank == victim:
        h.step()  # launches round 0, then the process dies mid-rearrangement
        os._exit(3)
    t0 = time.monotonic()
    err = None
    try:
        h.wait()
    except ep.RearrangeError as e:
        err = e
    elapsed = time.monotonic() - t0
    state = {}
    for layer in range(layers):
        is_new = _check(torch, [weights[layer]], new[layer : layer + 1], rank, P, first_layer=layer)
        is_old = _check(torch, [weights[layer]], old[layer : layer + 1], rank, P, first_layer=layer)
        state[layer] = "new" if is_new else "old" if is_old else "mixed"
    try:
        again = None
        h.step()
    except ep.RearrangeError as e2:
        again = str(e2) == str(err)
    res = {
        "rank": rank,
        "elapsed": elapsed,
        "error": None if err is None else str(err),
        "completed": None if err is None else err.completed_layers,
        "pending": None if err is None else err.pending_layers,
        "peers": None if err is None else err.peers,
        "state": state,
        "again": again,
        "comm_closed": comm.closed,
        "unchanged_here": [
            l
            for l in range(layers)
            if np.array_equal(old[l, rank * P : (rank + 1) * P], new[l, rank * P : (rank + 1) * P])
        ],
    }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    return res


@pytest.mark.gpu(gpus=2)  # one rank dies, another must survive it (NCCL: one rank per GPU)
def test_peer_dies_mid_rearrangement(world_size, tmp_path):
    timeout = 5.0
    with pytest.raises(RankFailure) as info:
        run_ranks(
            _peer_failure_job, world_size, str(tmp_path), timeout, timeout=100, grace=timeout + 20
        )
    msg = str(info.value)
    victim = world_size - 1
    assert f"1 of {world_size} ranks failed" in msg
    assert f"rank {victim} exited (exit code 3)" in msg
    for rank in range(world_size - 1):
        with open(tmp_path / f"rank{rank}.json") as fh:
            r = json.load(fh)
        assert r["error"] is not None, r
        assert r["elapsed"] <= timeout + 5, r
        assert "mixed" not in r["state"].values(), r
        assert r["completed"] is not None and r["pending"], r
        for layer in r["completed"]:
            assert r["state"][str(layer)] == "new", r
        for layer in r["pending"]:
            assert r["state"][str(layer)] == "old" or layer in r["unchanged_here"], r
        assert not (set(r["completed"]) & set(r["pending"]))
        assert victim in r["peers"], r
        assert r["again"] is True, r  # step() after the error raises the same error
        assert r["comm_closed"], r  # the communicator was aborted
