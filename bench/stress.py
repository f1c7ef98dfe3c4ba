"""Async rearrangement beside live NCCL traffic: the stress workload (issue: no hangs).

Every rank runs a forward-like loop on its compute stream (bf16 matmuls, an all-to-all and an
all-reduce on torch.distributed's own NCCL communicator) while eplb_pynccl rearranges expert
weights asynchronously on a *separate* communicator, back to back with random maps, and each
rank sleeps a random time per step so the ranks drift out of phase. NCCL work of the
rearrangement is launched only from ``handle.step()``, called by the loop's own thread between
steps. Rearrangement k starts at step k * ``period`` on every rank (as an engine triggers
rebalancing at step counts all ranks agree on); a rank whose previous one is still in flight
then finishes it first with ``wait()`` (counted as a forced wait).

Checked: every completed rearrangement exactly (every row of every layer), and at sampled
steps that each layer is entirely old or entirely new. Measured: forward step time with and
without a rearrangement in flight, async rearrangement time, and the synchronous path's time.

Used by tests/test_gpu_async.py (the GPU stress test) and by ``make bench`` (part ``stress``).
Public API only.
"""

from __future__ import annotations

import time

import numpy as np

from bench.eplb import _check, _fill, make_maps


def _forward(torch, state):
    a, b, x, y, r = state
    for _ in range(2):
        torch.matmul(a, b, out=a)
        a.mul_(1e-3)
    torch.distributed.all_to_all_single(y, x)
    torch.distributed.all_reduce(r)


def _layer_state(torch, weights, old, new, rank, P, applied):
    """Layers that are neither entirely old nor entirely new (should be none)."""
    bad = []
    for layer in range(len(weights)):
        want = new if layer in applied else old
        if not _check(torch, [weights[layer]], want[layer : layer + 1], rank, P, first_layer=layer):
            bad.append(layer)
    return bad


def stress_rank(
    rank: int,
    world: int,
    comm,
    *,
    steps: int = 500,
    min_rearrangements: int = 20,
    seed: int = 0,
    layers: int = 4,
    num_logical: int = 24,
    redundant_per_rank: int = 2,
    row_shape=(256, 1024),
    max_delay_ms: float = 2.0,
    check_every: int = 10,
    period: int = 12,
    log=None,
) -> dict:
    import torch

    import eplb_pynccl as ep

    dev = torch.device("cuda", torch.cuda.current_device())
    num_physical = num_logical + redundant_per_rank * world
    num_physical += (-num_physical) % world
    P = num_physical // world
    weights = [
        [torch.empty((P, *row_shape), dtype=torch.bfloat16, device=dev),
         torch.empty((P, 8), dtype=torch.float32, device=dev)]
        for _ in range(layers)
    ]
    shuffler = ep.ExpertShuffler(ep.NcclTransport(comm), weights)
    n = 4096
    fwd = (
        torch.randn(n, n, device=dev, dtype=torch.bfloat16),
        torch.randn(n, n, device=dev, dtype=torch.bfloat16),
        torch.randn(world * (1 << 20), device=dev, dtype=torch.float32),
        torch.empty(world * (1 << 20), device=dev, dtype=torch.float32),
        torch.randn(1 << 20, device=dev, dtype=torch.float32),
    )
    delays = np.random.default_rng([seed, rank, 99])

    def maps(k):
        return make_maps(seed * 1000 + k, layers, num_logical, num_physical, world)

    cur = maps(0)[0]
    _fill(torch, weights, cur, rank, P)
    torch.cuda.synchronize()

    def loop_time(nsteps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(nsteps):
            _forward(torch, fwd)
            time.sleep(delays.random() * max_delay_ms * 1e-3)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / nsteps

    say = log or (lambda m: None)
    loop_time(10)  # warm-up
    base_step = loop_time(min(steps, 200))
    say(f"forward step alone {base_step * 1e3:.3f} ms")

    # the synchronous path, same sizes
    sync_times = []
    for k in range(1, 4):
        nxt = maps(k)[1]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        shuffler.rearrange(cur, nxt)
        sync_times.append(time.perf_counter() - t0)
        if not _check(torch, weights, nxt, rank, P):
            raise AssertionError(f"rank {rank}: sync rearrangement {k} wrong")
        cur = nxt

    say(f"sync rearrangements {[round(t * 1e3, 1) for t in sync_times]} ms")
    done = 0
    forced = 0
    mismatches = []
    half = []
    async_times = []
    busy_time = 0.0
    busy_steps = 0
    handle = None
    started = 0.0
    target = None
    k = 10

    def finish():
        nonlocal cur, handle, done
        torch.cuda.synchronize()
        async_times.append(time.perf_counter() - started)
        if not _check(torch, weights, target, rank, P):
            mismatches.append(k)
        cur, handle = target, None
        done += 1

    step = 0
    torch.cuda.synchronize()
    t_loop = time.perf_counter()
    total = max(steps, min_rearrangements * period + 1)
    while step < total:
        t0 = time.perf_counter()
        _forward(torch, fwd)
        time.sleep(delays.random() * max_delay_ms * 1e-3)
        if step % period == 0:
            if handle is not None:  # same step on every rank: finish the previous one
                handle.wait()
                forced += 1
                finish()
            k += 1
            target = maps(k)[1]
            handle = shuffler.rearrange_async(cur, target)
            started = time.perf_counter()
        elif handle is not None:
            handle.step()
            if handle.done:
                finish()
            elif check_every and step % check_every == 0:
                bad = _layer_state(torch, weights, cur, target, rank, P, set(handle.applied_layers))
                if bad:
                    half.append((k, bad))
        if handle is not None:
            busy_time += time.perf_counter() - t0
            busy_steps += 1
        step += 1
        if step % 100 == 0:
            say(f"step {step}: {done} rearrangements done ({forced} forced waits)")
    if handle is not None:
        handle.wait()
        finish()
    torch.cuda.synchronize()
    loop_s = time.perf_counter() - t_loop
    after_step = loop_time(min(steps, 200))
    return {
        "rank": rank,
        "steps": step,
        "rearrangements": done,
        "forced_waits": forced,
        "mismatches": mismatches,
        "half_layers": half,
        "base_step_ms": base_step * 1e3,
        "base_step_after_ms": after_step * 1e3,
        "loop_step_ms": loop_s / step * 1e3,
        "busy_step_ms": (busy_time / busy_steps * 1e3) if busy_steps else 0.0,
        "sync_ms": float(np.median(sync_times)) * 1e3,
        "async_ms": float(np.median(async_times)) * 1e3 if async_times else 0.0,
        "layer_mib": sum(t[0].nbytes for t in weights[0]) * P / 2**20,
    }


def run_stress(ctx):
    """bench part ``stress`` (GPU): the workload above on this run's ranks, summarised."""
    import eplb_pynccl as ep
    from bench.harness import PartSkipped

    if not ctx.is_gpu or ctx.world_size < 2:
        raise PartSkipped("stress needs 2+ GPUs")
    comm = ep.Communicator.from_store(
        ctx.store, ctx.rank, ctx.world_size, ctx.device.index, key="bench/stress/uid",
        blocking=False, max_ctas=8, timeout=120,
    )
    try:
        comm.connect_peers()
        res = stress_rank(ctx.rank, ctx.world_size, comm, seed=ctx.args.seed)
    finally:
        comm.close()
    every = ctx.allgather(res)
    base = max(r["base_step_ms"] for r in every)
    busy = max(r["busy_step_ms"] for r in every)
    return [{
        "world_size": ctx.world_size,
        "steps": min(r["steps"] for r in every),
        "rearrangements": min(r["rearrangements"] for r in every),
        "forced_waits": max(r["forced_waits"] for r in every),
        "mismatches": sum(len(r["mismatches"]) for r in every),
        "half_layers_seen": sum(len(r["half_layers"]) for r in every),
        "base_step_ms": round(base, 3),
        "busy_step_ms": round(busy, 3),
        "slowdown_pct": round((busy / base - 1) * 100, 1),
        "async_ms": round(max(r["async_ms"] for r in every), 2),
        "sync_ms": round(max(r["sync_ms"] for r in every), 2),
        "layer_mib": round(every[0]["layer_mib"], 1),
    }]
