"""Async rearrangement beside live NCCL traffic (stress), and a peer dying mid-rearrangement."""

from __future__ import annotations

import time

import pytest

from tests.gpu_util import RankFailure, nccl_process_group, run_ranks
from tests.shuffle_util import check_peer_death, peer_death_job

pytestmark = pytest.mark.gpu


def _init(ctx, **comm_kw):
    import faulthandler
    import sys

    # a stuck rank prints every thread's stack (then the runner's timeout fails the test)
    faulthandler.dump_traceback_later(75, exit=False, file=sys.stderr)
    import eplb_pynccl as ep

    nccl_process_group(ctx)
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


def _nccl_for_peer_death(ctx, timeout):
    import eplb_pynccl as ep

    comm = _init(ctx, blocking=False, timeout=timeout)
    return ep.NcclTransport(comm), lambda: comm.closed, False


@pytest.mark.gpu(gpus=2)  # one rank dies, another must survive it (NCCL: one rank per GPU)
def test_peer_dies_mid_rearrangement(world_size, tmp_path):
    timeout = 5.0
    with pytest.raises(RankFailure) as info:
        run_ranks(
            peer_death_job,
            world_size,
            str(tmp_path),
            timeout,
            _nccl_for_peer_death,
            (1024, 1024),
            None,
            timeout=100,
            grace=timeout + 20,
        )
    for r in check_peer_death(info, str(tmp_path), world_size, timeout):
        assert r["pending"], r
        assert world_size - 1 in r["peers"], r
