"""Async rearrangement beside live NCCL traffic: the stress workload (issue: no hangs).

Every rank runs a forward-like loop on its compute stream (four bf16 8192² matmuls, an
all-to-all and an all-reduce of 16 MiB on torch.distributed's own NCCL communicator, then the
host reads one value of the result, as an engine reads its sampled tokens) while eplb_pynccl rearranges expert
weights asynchronously on a *separate* communicator, back to back with random maps: a rank
starts the next rearrangement at the step after its previous one completed. Each rank sleeps a
random time per step so the ranks drift out of phase. NCCL work of the rearrangement is
launched only from ``handle.step()``, called by the loop's own thread between steps: by
default right after the step's forward work is enqueued and before the host reads its result
(the placement the README recommends: the host work of ``step()`` then runs while the GPU
computes), in variant ``step-after-read`` after the read (the host work adds to the step).

Variants (``VARIANTS``) switch the safety measures one at a time: non-blocking communicator,
``max_ctas``, peers connected at set-up, lockstep ``step(wait=True)``, and a small forward step
(host-bound), or no host read per step (the host runs ahead of the GPU by several steps, so a
free-running ``step()`` sees each round complete only that much later). ``NCCL_LAUNCH_ORDER_IMPLICIT`` is an environment setting of the whole process;
``make bench`` runs it as a separate invocation (the row records the setting).

Checked: every completed rearrangement exactly (every row of every layer), and every
``check_every`` steps that each layer is entirely old or entirely new. Timed: the loop's wall
time per step while rearranging, *excluding* those checks (the GPU is synchronised before a
check, so the work queued before it is counted), against the same loop without
rearrangements; the host time spent inside ``step()`` (per call, and with
``rearrange_async()`` per forward step); the async rearrangement time (start to
done) against the synchronous path's.

Used by tests/test_gpu_async.py (the GPU stress test) and by ``make bench`` (part ``stress``).
Public API only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from bench.common import check, fill, make_maps

# name -> communicator settings and loop settings (the default variant is what the test runs)
VARIANTS = {
    "default": {},
    "lockstep": {"lockstep": True},
    "no-max-ctas": {"max_ctas": None},
    "max-ctas-2": {"max_ctas": 2},
    "blocking": {"blocking": True},
    "lazy-connect": {"connect": False},
    "small-forward": {"matmul": 4096},
    "no-host-sync": {"host_sync": False},
    "step-after-read": {"step_before_read": False},
    "lockstep-after-read": {"lockstep": True, "step_before_read": False},
    # the copy-engine transport (IpcTransport, set up over the communicator), step() both ways
    "ipc": {"transport": "ipc"},
    "ipc-after-read": {"transport": "ipc", "step_before_read": False},
}
DEFAULTS = {
    "blocking": False,
    "max_ctas": 8,
    "connect": True,
    "lockstep": False,
    "matmul": 8192,
    "host_sync": True,
    "step_before_read": True,
    "transport": "nccl",
}


def variant_settings(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown stress variant {name!r}; known: {', '.join(VARIANTS)}")
    return {**DEFAULTS, **VARIANTS[name]}


def _forward(torch, state):
    """Enqueue one forward step (returns before the GPU has run it)."""
    a, b, c, x, y, r = state
    for _ in range(2):
        torch.matmul(a, b, out=c)
        torch.matmul(c, b, out=a)
        a.mul_(1e-4)
    torch.distributed.all_to_all_single(y, x)
    torch.distributed.all_reduce(r)


def _read(state, host_sync: bool):
    if host_sync:  # the host reads a small result (as an engine reads the sampled tokens)
        float(state[5][0])


def _layer_state(torch, weights, old, new, rank, P, applied):
    """Layers that are neither entirely old nor entirely new (should be none)."""
    bad = []
    for layer in range(len(weights)):
        want = new if layer in applied else old
        if not check(torch, [weights[layer]], want[layer : layer + 1], rank, P, first_layer=layer):
            bad.append(layer)
    return bad


@dataclass(frozen=True)
class Workload:
    """One rank's workload: expert weights (``layers`` layers of ``num_logical`` experts plus
    ``redundant_per_rank`` slots per rank, bf16 rows of ``row_shape`` and an fp32 scale row),
    the forward step (``matmul``² bf16 matmuls, ``a2a_bytes`` of all-to-all and all-reduce,
    the host reading its result where ``host_sync``), a random sleep of up to
    ``max_delay_ms`` per step, maps seeded by ``seed``, and the rearrangement's transport
    (``"nccl"`` or ``"ipc"``)."""

    seed: int = 0
    layers: int = 4
    num_logical: int = 24
    redundant_per_rank: int = 2
    row_shape: tuple = (1024, 1024)
    matmul: int = 8192
    a2a_bytes: int = 16 << 20
    max_delay_ms: float = 2.0
    host_sync: bool = True
    transport: str = "nccl"


def stress_rank(
    rank: int,
    world: int,
    comm,
    *,
    steps: int = 500,
    check_every: int = 25,
    lockstep: bool = False,
    step_before_read: bool = True,
    sync_repeats: int = 3,
    log=None,
    **workload,
) -> dict:
    """The workload on this rank (see the module docstring); this rank's figures.
    ``workload``: fields of :class:`Workload` (its defaults for the others)."""
    import torch

    run = _StressRun(torch, rank, world, comm, Workload(**workload))
    say = log or (lambda m: None)
    run.loop_time(10)  # warm-up
    base_step = run.loop_time(min(steps, 200))
    say(f"forward step alone {base_step * 1e3:.3f} ms")
    sync_times = run.sync_path(sync_repeats)
    say(f"sync rearrangements {[round(t * 1e3, 2) for t in sync_times]} ms")
    loop_s = run.busy_loop(steps, check_every, lockstep, step_before_read, say)
    run.catch_up()
    after_step = run.loop_time(min(steps, 200))
    if run.w.transport == "ipc":
        run.transport.close()
    return {
        "rank": rank,
        "steps": steps,
        "rearrangements": run.done,
        "mismatches": run.mismatches,
        "half_layers": run.half,
        "base_step_ms": base_step * 1e3,
        "base_step_after_ms": after_step * 1e3,
        "busy_step_ms": loop_s / steps * 1e3,
        "step_host_us": run.step_host / max(run.step_calls, 1) * 1e6,
        # host time in rearrange_async() and step() per forward step
        "host_per_step_us": (run.step_host + run.start_host) / steps * 1e6,
        "sync_ms": float(np.median(sync_times)) * 1e3,
        "async_ms": float(np.median(run.async_times)) * 1e3 if run.async_times else 0.0,
        "layer_mib": sum(t[0].nbytes for t in run.weights[0]) * run.P / 2**20,
    }


class _StressRun:
    """One rank's state: weights, shuffler, forward tensors and what the loop counted."""

    def __init__(self, torch, rank, world, comm, w: Workload):
        import eplb_pynccl as ep

        self.torch, self.rank, self.world, self.w = torch, rank, world, w
        self.seed, self.layers, self.num_logical = w.seed, w.layers, w.num_logical
        self.max_delay_ms = w.max_delay_ms
        self.host_sync = w.host_sync
        dev = self.dev = torch.device("cuda", torch.cuda.current_device())
        num_physical = w.num_logical + w.redundant_per_rank * world
        self.num_physical = num_physical + (-num_physical) % world
        P = self.P = self.num_physical // world
        self.weights = [
            [
                torch.empty((P, *w.row_shape), dtype=torch.bfloat16, device=dev),
                torch.empty((P, 8), dtype=torch.float32, device=dev),
            ]
            for _ in range(w.layers)
        ]
        self.transport = (
            ep.IpcTransport(communicator=comm) if w.transport == "ipc" else ep.NcclTransport(comm)
        )
        self.shuffler = ep.ExpertShuffler(self.transport, self.weights)
        n = w.matmul
        a2a = w.a2a_bytes // 4
        self.fwd = (
            torch.randn(n, n, device=dev, dtype=torch.bfloat16),
            torch.randn(n, n, device=dev, dtype=torch.bfloat16) * (1.0 / n),
            torch.empty(n, n, device=dev, dtype=torch.bfloat16),
            torch.randn(a2a, device=dev, dtype=torch.float32),
            torch.empty(a2a, device=dev, dtype=torch.float32),
            torch.randn(a2a, device=dev, dtype=torch.float32),
        )
        self.delays = np.random.default_rng([w.seed, rank, 99])
        self.cur = self.maps(0)[0]
        fill(torch, self.weights, self.cur, rank, P)
        torch.cuda.synchronize()
        # the busy loop's counters
        self.done = 0
        self.mismatches, self.half, self.async_times = [], [], []
        self.step_host = 0.0
        self.step_calls = 0
        self.excluded = 0.0  # seconds spent verifying (not part of the loop's cost)
        self.handle = None
        self.started = 0.0
        self.target = None
        self.k = 100
        self.start_host = 0.0  # host time inside rearrange_async()

    def maps(self, k):
        return make_maps(
            self.seed * 1000 + k, self.layers, self.num_logical, self.num_physical, self.world
        )

    def sleep(self):
        time.sleep(self.delays.random() * self.max_delay_ms * 1e-3)

    def exact(self, amap) -> bool:
        return check(self.torch, self.weights, amap, self.rank, self.P)

    def loop_time(self, nsteps):
        torch = self.torch
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(nsteps):
            _forward(torch, self.fwd)
            _read(self.fwd, self.host_sync)
            self.sleep()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / nsteps

    def sync_path(self, repeats) -> list[float]:
        """The synchronous path, same sizes: seconds per rearrangement."""
        times = []
        for k in range(1, 1 + repeats):
            nxt = self.maps(k)[1]
            self.torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.shuffler.rearrange(self.cur, nxt)
            times.append(time.perf_counter() - t0)
            if not self.exact(nxt):
                raise AssertionError(f"rank {self.rank}: sync rearrangement {k} wrong")
            self.cur = nxt
        return times

    def _start(self):
        self.k += 1
        self.target = self.maps(self.k)[1]
        self.started = time.perf_counter()
        self.handle = self.shuffler.rearrange_async(self.cur, self.target)
        self.start_host += time.perf_counter() - self.started

    def _verified(self):
        """Check a completed rearrangement (outside the loop's timed cost)."""
        tx = time.perf_counter()
        if not self.exact(self.target):
            self.mismatches.append(self.k)
        self.excluded += time.perf_counter() - tx
        self.cur, self.handle = self.target, None
        self.done += 1

    def rearrangement_step(self, step, check_every, lockstep):
        if self.handle is None:
            self._start()
            return
        t0 = time.perf_counter()
        self.handle.step(wait=lockstep)
        self.step_host += time.perf_counter() - t0
        self.step_calls += 1
        if self.handle.done:
            self.async_times.append(time.perf_counter() - self.started)
            # the compute stream only: a device-wide sync while a peer's round is in flight
            # can deadlock (README, threading model)
            self.torch.cuda.current_stream().synchronize()
            self._verified()
        elif check_every and step % check_every == 0:
            self.torch.cuda.current_stream().synchronize()
            tx = time.perf_counter()
            bad = _layer_state(
                self.torch,
                self.weights,
                self.cur,
                self.target,
                self.rank,
                self.P,
                set(self.handle.applied_layers),
            )
            if bad:
                self.half.append((self.k, bad))
            self.excluded += time.perf_counter() - tx

    def busy_loop(self, steps, check_every, lockstep, step_before_read, say):
        """The forward loop with rearrangements back to back: its seconds, checks excluded."""
        torch = self.torch
        torch.cuda.synchronize()
        t_loop = time.perf_counter()
        # the same number of steps on every rank: the forward's collectives must pair up
        for step in range(steps):
            _forward(torch, self.fwd)
            if step_before_read:  # while the GPU runs this step: the host's work is hidden
                self.rearrangement_step(step, check_every, lockstep)
            _read(self.fwd, self.host_sync)
            self.sleep()
            if not step_before_read:
                self.rearrangement_step(step, check_every, lockstep)
            if (step + 1) % 100 == 0:
                say(f"step {step + 1}: {self.done} rearrangements done")
        if self.handle is not None:
            self.handle.wait()
            self.async_times.append(time.perf_counter() - self.started)
            if not self.exact(self.target):
                self.mismatches.append(self.k)
            self.cur = self.target
            self.done += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t_loop - self.excluded

    def catch_up(self):
        """Free-running ranks may have started different numbers of rearrangements: the ones
        behind run the missing ones (every rank must run the same sequence)."""
        torch = self.torch
        started_max = torch.tensor([self.k], dtype=torch.int64, device=self.dev)
        torch.distributed.all_reduce(started_max, op=torch.distributed.ReduceOp.MAX)
        while self.k < int(started_max.item()):
            self.k += 1
            self.target = self.maps(self.k)[1]
            self.shuffler.rearrange(self.cur, self.target)
            if not self.exact(self.target):
                self.mismatches.append(self.k)
            self.cur = self.target
        torch.cuda.synchronize()


def summarize(every: list[dict]) -> dict:
    """One row from every rank's result: the slowest rank's figures."""
    base = max(max(r["base_step_ms"], r["base_step_after_ms"]) for r in every)
    busy = max(r["busy_step_ms"] for r in every)
    return {
        "steps": min(r["steps"] for r in every),
        "rearrangements": min(r["rearrangements"] for r in every),
        "mismatches": sum(len(r["mismatches"]) for r in every),
        "half_layers_seen": sum(len(r["half_layers"]) for r in every),
        "base_step_ms": round(base, 3),
        "busy_step_ms": round(busy, 3),
        "slowdown_pct": round((busy / base - 1) * 100, 1),
        "step_host_us": round(max(r["step_host_us"] for r in every), 1),
        "host_per_step_us": round(max(r["host_per_step_us"] for r in every), 1),
        "async_ms": round(max(r["async_ms"] for r in every), 2),
        "sync_ms": round(max(r["sync_ms"] for r in every), 2),
        "layer_mib": round(every[0]["layer_mib"], 1),
    }


def run_stress(ctx):
    """bench part ``stress`` (GPU): the workload above on this run's ranks, per variant."""
    import eplb_pynccl as ep
    from bench.harness import PartSkipped

    if not ctx.is_gpu or ctx.world_size < 2:
        raise PartSkipped("stress needs 2+ GPUs")
    names = [v for v in (getattr(ctx.args, "stress_variants", "") or "default").split(",") if v]
    steps = int(getattr(ctx.args, "stress_steps", 500) or 500)
    timeout = float(getattr(ctx.args, "stress_timeout", 60) or 60)
    implicit = os.environ.get("NCCL_LAUNCH_ORDER_IMPLICIT", "")
    rows = []
    for name in names:
        cfg = variant_settings(name)
        comm = ep.Communicator.from_store(
            ctx.store,
            ctx.rank,
            ctx.world_size,
            ctx.device.index,
            key=f"bench/stress/{name}",
            blocking=cfg["blocking"],
            max_ctas=cfg["max_ctas"],
            timeout=timeout,
        )
        err = None
        try:
            if cfg["connect"]:
                comm.connect_peers()
            res = stress_rank(
                ctx.rank,
                ctx.world_size,
                comm,
                seed=ctx.args.seed,
                steps=steps,
                lockstep=cfg["lockstep"],
                matmul=cfg["matmul"],
                host_sync=cfg["host_sync"],
                step_before_read=cfg["step_before_read"],
                transport=cfg["transport"],
            )
        except ep.RearrangeError as e:  # e.g. a launch-order deadlock caught by the timeout
            err, res = f"{type(e).__name__}: {e}", None
        if err is None:
            comm.close()
        else:
            comm.abort()
        every = ctx.allgather((res, err))
        row = {
            "variant": name,
            "world_size": ctx.world_size,
            "launch_order_implicit": implicit or "unset",
            "settings": ", ".join(f"{k}={v}" for k, v in cfg.items()),
        }
        errs = [e for _, e in every if e]
        if errs:
            row["error"] = errs[0][:300]
        else:
            row.update(summarize([r for r, _ in every]))
        rows.append(row)
    return rows
