"""SGLang's EPLB update and policy beside eplb_pynccl's inside SGLang (bench part ``sglang``).

Needs SGLang 0.5.23's EPLB modules (``make test-sglang`` builds ``.venv-sglang`` with them):
``.venv-sglang/bin/python -m bench.run --parts sglang``, or ``.venv-sglang/bin/python -m
bench.sglang``. Where they do not import (the default environment) the part is skipped and
says why.

``sglang`` rows (4 gloo CPU processes, the same processes and the same maps for both):
SGLang's own ``_update_expert_weights_raw`` and eplb_pynccl's (``install()`` once, as in a
server), alternating per update, medians over the repeats, beside the gloo floor (the bytes
each pair of ranks exchanges in the update, one message per pair, no copies), after a pass that checks both
give the same bytes (weights placed by the first map: replicas hold the same bytes).
``sglang_batches`` (its ``batch_isend_irecv`` calls) and ``ours_rounds`` are the update's
host-synchronous gloo rounds; ``round_ms`` is what one round of a 64-byte message per pair
costs in the same run (16 back to back); ``*_cpu_ms`` the CPU time of rank 0's process,
every thread, per update (with more ranks than cores each rank's CPU time is time another
waits for a core). Each
rank runs torch with the cores it has to itself (cores // 4, at least 1: the fair setting,
the one the targets are judged on), and one more row with torch's default (a thread per
core, oversubscribed where the ranks share the cores: SGLang's per-row copies of rows over
128 KiB then wait for descheduled threads; eplb_pynccl's update sets 1 thread itself). Maps: ``random`` (random placements, ~96% of the slots
changed per step), ``deepseek`` (SGLang's ``deepseek`` algorithm on drifting loads), ``ours``
(SGLang's ``rebalance_experts`` with ``install(policy="migration_aware")`` on the same loads).
Memory: the process's peak resident memory during the update above its resident memory
before it (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``;
glibc's mmap threshold pinned so that freed buffers leave the resident set), per layer of
expert weights, the largest over ranks and updates. ``ours_staging_layers`` is what
eplb_pynccl's schedule allocated (staging plus row indices: exact). ``peak_ratio`` is the
larger of ours over SGLang's temp buffers, one full layer (``empty_like``: on a GPU all of
it is allocated; on a CPU only the rows it receives become resident, its measured peak).

``sglang-policy`` row (this process): SGLang's ``rebalance_experts`` with its ``deepseek``
algorithm vs ours on a drifting load sequence, each fed its own previous placement
(SGLang's global metadata): mean imbalance (max GPU load / mean GPU load) and mean fraction
of slots changed per step, over the steps after the first.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .harness import PartSkipped

CASES = ("random", "deepseek", "ours")
# 9 slots per rank: DeepSeek-V3 at EP32 (256 experts + 32 redundant over 32 GPUs)
WORLD, LAYERS, ROWS, STEPS, REPS = 4, 8, 9, 3, 3
SHAPES = ((256, 256), (128, 256))  # float32 tensors per expert row: 256 KiB and 128 KiB
# the policy rows: DeepSeek-V3's layer at EP32 (fewer layers: seconds on a CPU)
POLICY = {
    "layers": 8,
    "logical": 256,
    "ep": 32,
    "per_rank": 9,
    "steps": 12,
    "drifts": ("steady", "moderate", "bursty"),
}
TARGETS = {"time_ratio": 0.5, "peak_ratio": 0.25, "imbalance_ratio": 1.01, "changed_ratio": 0.1}
# SGLang's elastic-EP state refuses a machine without CUDA otherwise
RANK_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}


def _skip_reason() -> str | None:
    try:
        import sglang.srt.eplb.expert_location_updater  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or an install broken on import
        return (
            f"SGLang's EPLB modules do not import ({type(e).__name__}: {e}); run it with "
            ".venv-sglang (make test-sglang builds it)"
        )
    return None


def _maps(torch, source: str, ws: int):
    from tests_sglang.util import rebalanced_maps, sequence

    N = ROWS * ws
    if source == "random":
        return sequence(1, STEPS, LAYERS, N - ws, N)
    from .loadgen import load_sequence

    loads = load_sequence(LAYERS, N - ws, STEPS, "bursty")
    return rebalanced_maps(torch, loads, N - ws, N, ROWS, source)


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                got[k] = int(v.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _rss()[0]


def _pin_mmap_threshold() -> None:
    """glibc: buffers above 128 KiB are mmapped and unmapped when freed (no dynamic
    threshold), so a freed buffer leaves the resident set and a new one enters it."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)


def _weights(torch, phy, rank: int, device="cpu"):
    """This rank's expert rows as placed by ``phy`` [layers, physical]: every replica of a
    logical expert holds the same bytes (seeded by layer and expert), as in a server."""
    out = []
    for layer in range(LAYERS):
        ts = [torch.empty(ROWS, *s) for s in SHAPES]
        for row in range(ROWS):
            e = int(phy[layer, rank * ROWS + row])
            gen = torch.Generator().manual_seed(layer * 100_003 + e)
            for t, s in zip(ts, SHAPES):
                t[row] = torch.randn(*s, generator=gen)
        out.append([t.to(device) for t in ts])
    return out


def _floor_job(torch, rank: int, ws: int, old, new, row_bytes: int, device, sync):
    """The gloo floor of an update: the bytes each pair of ranks exchanges in it (the rows
    the plan sends, as SGLang's update sends them too: one copy per receiving rank), as one
    message per pair in one batch, no copy before or after. Returns a function timing one
    such exchange (between barriers, like the updates)."""
    from eplb_pynccl.planner import plan_rearrangement

    plan = plan_rearrangement(old, new, ws, ranks_per_node=ws)
    pair = np.zeros((ws, ws), dtype=np.int64)
    np.add.at(pair, (plan.t_src_rank, plan.t_dst_rank), row_bytes)
    dist = torch.distributed
    sends = {
        p: torch.empty(int(pair[rank, p]), dtype=torch.uint8, device=device) for p in range(ws)
    }
    recvs = {
        p: torch.empty(int(pair[p, rank]), dtype=torch.uint8, device=device) for p in range(ws)
    }
    ops = [dist.P2POp(dist.isend, t, p) for p, t in sends.items() if p != rank and t.numel()]
    ops += [dist.P2POp(dist.irecv, t, p) for p, t in recvs.items() if p != rank and t.numel()]

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        sync()
        return time.perf_counter() - t0

    return run


def _round_job(torch, rank: int, ws: int, device, sync, rounds: int = 16):
    """What one gloo round costs whatever its bytes: ``rounds`` rounds of one 64-byte
    message each way per pair, back to back between barriers. Returns a function timing
    one such round (the mean of the ``rounds``)."""
    dist = torch.distributed
    peers = [p for p in range(ws) if p != rank]
    sends = torch.zeros(64, dtype=torch.uint8, device=device)
    recvs = {p: torch.empty(64, dtype=torch.uint8, device=device) for p in peers}

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            ops = [dist.P2POp(dist.irecv, recvs[p], p) for p in peers]
            ops += [dist.P2POp(dist.isend, sends, p) for p in peers]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        sync()
        return (time.perf_counter() - t0) / rounds

    return run


def _gpu_world(torch, ctx):
    """GPU rows: WORLD with gloo for CPU tensors and NCCL for CUDA ones (SGLang's own update
    moves CUDA weights over it), and a gloo group for the bench's barriers."""
    from tests.engine_suite import tcp_world

    torch.cuda.set_device(ctx.device)
    rank, ws = tcp_world(ctx, "cpu:gloo,cuda:nccl")
    group = ctx.cache.get("gloo")
    if group is None:
        group = ctx.cache["gloo"] = torch.distributed.new_group(backend="gloo")
    return rank, ws, group


def rank_job(
    ctx, source: str, threads: int | None, reps: int, staging: str, transport: str | None = None
) -> dict:
    """On every rank: the case's updates, SGLang's and ours alternating, timed (rank 0's
    clock, between barriers), with this rank's peak extra memory. ``threads``: torch's
    intra-op threads for the job (None: torch's default, one per core). ``staging``:
    ``"quarter"`` (install()'s default bound) or ``"layer"`` (one layer, the memory
    SGLang's temp buffers take). ``transport``: None for CPU weights over gloo; ``"nccl"``
    or ``"ipc"`` for CUDA weights (one GPU per rank; peak memory from torch's allocator)."""
    import torch
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl import shuffler as SH
    from eplb_pynccl.integrations import sglang as S
    from tests_sglang.util import metadata

    rank, ws, device, meters = _meters(torch, ctx, transport)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    maps = _maps(torch, source, ws)
    metas = [metadata(torch, m, ROWS * ws - ws, ws) for m in maps]
    w = _weights(torch, maps[0], rank, device)
    layer_bytes = sum(t.nbytes for t in w[0])
    stats, per_update = [], []  # the shuffler's RearrangeStats; per update of ours: figures
    sg_batches: list = []  # per SGLang update: its batch_isend_irecv calls
    cpus: dict = {"sglang": [], "ours": []}  # per update: this process's CPU seconds
    original_rearrange = SH.ExpertShuffler.rearrange
    recorded = _recorded(original_rearrange, stats)
    # SGLang's own functions, taken before install(); ours installed once (as in a server:
    # its transport and shufflers are made on the first update and kept)
    update = _updater(U, torch.distributed, rank, meters, stats, per_update, sg_batches, cpus)
    SH.ExpertShuffler.rearrange = recorded
    S.install(
        transport=transport or "auto", staging_bytes=layer_bytes if staging == "layer" else None
    )
    try:
        same = _same_bytes(torch, update, w, metas)
        per_update.clear()
        sg_batches.clear()
        for v in cpus.values():
            v.clear()
        job = (rank, ws, device, meters[0])
        times, peaks = _timed_job(torch, update, job, w, maps, metas, layer_bytes, reps)
    finally:
        S.uninstall()
        SH.ExpertShuffler.rearrange = original_rearrange
        threads_used = torch.get_num_threads()
        torch.set_num_threads(default_threads)
    return {
        "same": same,
        "times": times,
        "peaks": peaks,
        **_update_figures(per_update),
        "sglang_batches": float(np.median(sg_batches)),
        "cpu": {k: float(np.median(v)) for k, v in cpus.items()},
        "layer_bytes": layer_bytes,
        "changed": float(np.mean([(x != y).mean() for x, y in zip(maps, maps[1:])])),
        "threads": threads_used,
    }


def _recorded(original_rearrange, stats: list):
    """``ExpertShuffler.rearrange`` as ``original_rearrange``, each result also appended to
    ``stats``."""

    def recorded(self, *a, **k):
        st = original_rearrange(self, *a, **k)
        stats.append(st)
        return st

    return recorded


def _timed_job(torch, update, job, w, maps, metas, layer_bytes: int, reps: int):
    """(times, peaks) of :func:`_timed_updates` over ``maps``, with the gloo floor of each
    of their updates and one gloo round; ``job``: (rank, world size, device, sync)."""
    rank, ws, device, sync = job
    floor = [
        _floor_job(torch, rank, ws, x, y, layer_bytes // ROWS, device, sync)
        for x, y in zip(maps, maps[1:])
    ]
    one_round = _round_job(torch, rank, ws, device, sync)
    return _timed_updates(update, floor, w, metas, reps, one_round)


def _update_figures(per_update: list) -> dict:
    """Our updates' figures from their (rounds, messages, peak staging, steps): the largest
    staging, the medians of the others."""
    return {
        "staging": max(u[2] for u in per_update),
        "rounds": float(np.median([u[0] for u in per_update])),
        "messages": float(np.median([u[1] for u in per_update])),
        "steps": float(np.median([u[3] for u in per_update])),
    }


def _meters(torch, ctx, transport: str | None):
    """(rank, world size, device, (sync, reset_peak, peak_now)) of a job: CPU weights over
    gloo (peak: the process's resident memory) or, with a ``transport``, CUDA weights (peak:
    torch's allocator). ``sync`` waits for the device and the other ranks; ``reset_peak``
    returns the memory now, ``peak_now`` the peak since."""
    from tests_sglang.util import world

    dist = torch.distributed
    if transport is None:
        rank, ws = world(ctx)
        _pin_mmap_threshold()
        return rank, ws, torch.device("cpu"), (dist.barrier, _reset_peak, lambda: _rss()[1])
    rank, ws, group = _gpu_world(torch, ctx)
    device = torch.device("cuda", ctx.device)

    def sync():
        torch.cuda.synchronize(device)
        dist.barrier(group=group)

    def reset_peak():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    def peak_now():
        return torch.cuda.max_memory_allocated(device)

    return rank, ws, device, (sync, reset_peak, peak_now)


def _updater(U, dist, rank: int, meters, stats: list, per_update: list, sg_batches, cpus):
    """``update(mode, weights, a, b) -> (seconds, peak extra bytes)``: SGLang's own
    all-layer update (``mode="sglang"``, SGLang's functions as they are now: call it before
    install()) or the installed one, between ``sync``s; ours appends the (rounds, messages,
    peak staging, steps) of its rearrangements (``stats``, recorded) to ``per_update``,
    SGLang's its ``batch_isend_irecv`` calls to ``sg_batches``, each this process's CPU
    seconds to ``cpus[mode]``. SGLang's turn puts its per-layer function back for the call, since its all-layer one
    looks it up."""
    sync, reset_peak, peak_now = meters
    sg_raw, sg_single = U._update_expert_weights_raw, U.update_expert_weights_single_layer
    layers = list(range(LAYERS))

    batches = [0]
    sg_batch = dist.batch_isend_irecv

    def counted(ops):  # SGLang's update: its batch_isend_irecv calls (one batch each)
        batches[0] += 1
        return sg_batch(ops)

    def update(mode, ws_, a, b):
        fn = sg_raw if mode == "sglang" else U._update_expert_weights_raw
        ours_single = U.update_expert_weights_single_layer
        if mode == "sglang":
            U.update_expert_weights_single_layer = sg_single
            dist.batch_isend_irecv = counted
        try:
            sync()
            first, b0 = len(stats), batches[0]
            base = reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            fn({i: ws_[i] for i in layers}, a, b, layers, 1, rank)
            cpu = time.process_time() - c0
            sync()
            dt = time.perf_counter() - t0
            peak = peak_now() - base
            if mode == "sglang":
                sg_batches.append(batches[0] - b0)
            mine = stats[first:]
            if mine:  # this update's steps (one rearrangement each)
                per_update.append(
                    (
                        sum(st.rounds for st in mine),
                        sum(st.messages for st in mine),
                        max(st.peak_extra_bytes for st in mine),
                        len(mine),
                    )
                )
            cpus[mode].append(cpu)
            return dt, peak
        finally:
            U.update_expert_weights_single_layer = ours_single
            dist.batch_isend_irecv = sg_batch

    return update


def _same_bytes(torch, update, w, metas) -> bool:
    """The byte check: SGLang's updates and ours, each from a copy of ``w`` over the whole
    sequence, end with the same bytes."""
    ref = [[t.clone() for t in lw] for lw in w]
    ours = [[t.clone() for t in lw] for lw in w]
    for a, b in zip(metas, metas[1:]):
        update("sglang", ref, a, b)
        update("ours", ours, a, b)
    return all(torch.equal(x, y) for lx, ly in zip(ref, ours) for x, y in zip(lx, ly))


def _timed_updates(update, floor, w, metas, reps: int, one_round):
    """(times, peaks) per mode over ``reps`` passes of the sequence on ``w``: SGLang's and
    ours alternating per update (their order swapped every pass), then the floor's jobs and
    one gloo round (``one_round``)."""
    times: dict = {"sglang": [], "ours": [], "floor": [], "round": []}
    peaks: dict = {"sglang": [], "ours": []}
    for rep in range(reps):
        order = ("sglang", "ours") if rep % 2 == 0 else ("ours", "sglang")
        for a, b in zip(metas, metas[1:]):
            for mode in order:
                dt, peak = update(mode, w, a, b)
                times[mode].append(dt)
                peaks[mode].append(peak)
        for job in floor:
            times["floor"].append(job())
        times["round"].append(one_round())
    return times, peaks


def _row(res, source, staging, threads, where, cores) -> dict:
    r0 = res[0]
    lb = r0["layer_bytes"]
    t_s, t_o = np.median(r0["times"]["sglang"]), np.median(r0["times"]["ours"])
    t_f = np.median(r0["times"]["floor"])
    # the largest over ranks and updates; ours also what its schedule allocated
    p_s = max(max(r["peaks"]["sglang"]) for r in res) / lb
    p_o = max(max(r["peaks"]["ours"]) for r in res) / lb
    alloc = max(r["staging"] for r in res) / lb
    return {
        "part": "sglang",
        "where": where,
        "maps": source,
        "ours_staging_bytes": staging,
        "torch_threads": "default" if threads is None else str(threads),
        "slots_changed": round(r0["changed"], 3),
        "byte_exact": all(r["same"] for r in res),
        "sglang_ms": round(1e3 * t_s, 2),
        "ours_ms": round(1e3 * t_o, 2),
        "time_ratio": round(t_o / t_s, 3),
        "floor_ms": round(1e3 * t_f, 2),
        "floor_over_sglang": round(t_f / t_s, 3),
        # CPU time of rank 0's process (every thread) per update: with more ranks than
        # cores, each rank's CPU time is time the others wait for a core
        "sglang_cpu_ms": round(1e3 * r0["cpu"]["sglang"], 1),
        "ours_cpu_ms": round(1e3 * r0["cpu"]["ours"], 1),
        "sglang_batches": r0["sglang_batches"],
        "round_ms": round(1e3 * float(np.median(r0["times"]["round"])), 2),
        "sglang_peak_layers": round(p_s, 3),
        "ours_peak_layers": round(p_o, 3),
        "ours_staging_layers": round(alloc, 3),
        # SGLang's temp buffers are one full layer (empty_like; on a GPU all of it is
        # allocated, on a CPU only the rows it receives become resident)
        "peak_ratio": round(max(p_o, alloc), 3),
        "ours_steps": r0["steps"],
        "ours_rounds": r0["rounds"],
        "ours_messages": r0["messages"],
        "ranks": len(res),
        "layers": LAYERS,
        "layer_mib": round(lb / 2**20, 2),
        "threads": r0["threads"],
        "cores": cores,
    }


def update_rows() -> list[dict]:
    from tests.gpu_util import RankPool

    rows = []
    cores = len(os.sched_getaffinity(0))
    fair = max(1, cores // WORLD)  # the cores each rank has to itself
    runs = [(source, fair, REPS, st) for st in ("quarter", "layer") for source in CASES]
    runs.append(("random", None, 1, "quarter"))
    with RankPool(WORLD, env=RANK_ENV) as pool:
        for source, threads, reps, staging in runs:
            res = pool.run(rank_job, source, threads, reps, staging, timeout=600)
            rows.append(_row(res, source, staging, threads, "cpu, gloo", cores))
    return rows + gpu_rows(cores)


def gpu_rows(cores: int) -> list[dict]:
    """Where 2+ GPUs are visible: the same cases on one GPU per rank (up to 4), SGLang's
    own update over NCCL (its WORLD's CUDA backend) vs ours over ``nccl`` and ``ipc``;
    peak memory from torch's CUDA allocator (its peak during the update above what was
    allocated before). Not run on a machine without GPUs."""
    import torch

    n = min(WORLD, torch.cuda.device_count())
    if n < 2:
        return []
    from tests.gpu_util import RankPool

    rows = []
    with RankPool(n, devices=list(range(n))) as pool:
        for transport in ("nccl", "ipc"):
            for staging in ("quarter", "layer"):
                for source in CASES:
                    res = pool.run(rank_job, source, None, REPS, staging, transport, timeout=600)
                    where = f"{n} GPUs, ours over {transport}"
                    rows.append(_row(res, source, staging, None, where, cores))
    return rows


def policy_rows() -> list[dict]:
    """SGLang's deepseek vs ours inside SGLang on the same drifting loads (bench/loadgen.py's
    drift levels), DeepSeek-V3's per-layer shape at EP32: 256 experts on 32 ranks x 9 slots."""
    import torch

    from eplb_pynccl.placement import placement_imbalance
    from tests_sglang.util import rebalanced_maps

    from .loadgen import load_sequence

    p = POLICY
    L, E, ep, per = p["layers"], p["logical"], p["ep"], p["per_rank"]
    N = ep * per
    rows = []
    for drift in p["drifts"]:
        loads = load_sequence(L, E, p["steps"], drift, seed=1)
        out = {}
        for source in ("deepseek", "ours"):
            maps = rebalanced_maps(torch, loads, E, N, per, source)
            # after the first step (from the identity placement): the steady state
            imb = [placement_imbalance(m, lo, ep).mean() for m, lo in zip(maps[2:], loads[1:])]
            moved = [(x != y).mean() for x, y in zip(maps[1:], maps[2:])]
            out[source] = (float(np.mean(imb)), float(np.mean(moved)))
        (i_d, c_d), (i_o, c_o) = out["deepseek"], out["ours"]
        rows.append(
            {
                "part": "sglang-policy",
                "drift": drift,
                "shape": f"{L} layers x {E} experts, {ep} ranks x {per} slots, {p['steps']} steps",
                "deepseek_imbalance": round(i_d, 4),
                "ours_imbalance": round(i_o, 4),
                "imbalance_ratio": round(i_o / i_d, 4),
                "deepseek_changed": round(c_d, 4),
                "ours_changed": round(c_o, 4),
                "changed_ratio": round(c_o / c_d, 4) if c_d else None,
            }
        )
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """One row per target: the measured figure (worst case) and met / MISSED."""
    out = []
    upd = [r for r in rows if r["part"] == "sglang"]
    pol = [r for r in rows if r["part"] == "sglang-policy"]
    for key, what in (("time_ratio", "time per update"), ("peak_ratio", "peak extra memory")):
        for r in upd:
            if r["torch_threads"] == "default":
                continue  # informational: the environment's effect, not a fair comparison
            v = r[key]
            ok = v is not None and v <= TARGETS[key]
            label = f"{what}, {r['where']}, {r['maps']} maps, {r['ours_staging_bytes']} staging"
            out.append(_verdict(label, v, TARGETS[key], ok))
    for r in pol:
        for key, what in (("imbalance_ratio", "imbalance"), ("changed_ratio", "slots changed")):
            v = r[key]
            ok = v is not None and v <= TARGETS[key]
            label = f"policy {what} vs SGLang's deepseek, {r['drift']} loads"
            out.append(_verdict(label, v, TARGETS[key], ok))
    return out


def _verdict(what, value, target, ok) -> dict:
    return {
        "part": "sglang-targets",
        "figure": what,
        "ours_over_sglang": value,
        "target": f"<= {target:g}",
        "status": "met" if ok else "MISSED",
    }


def bench_sglang(args=None) -> list[dict]:
    """The bench part (``bench/run.py``): skipped, with the reason, without SGLang."""
    why = _skip_reason()
    if why is not None:
        raise PartSkipped(why)
    rows = update_rows()
    rows += policy_rows()
    return rows + verdicts(rows)


def main() -> int:
    why = _skip_reason()
    if why is not None:
        print(f"sglang bench skipped: {why}")
        return 0
    from .report import part_table, text_table

    rows = bench_sglang()
    for part in ("sglang", "sglang-policy", "sglang-targets"):
        mine = [r for r in rows if r["part"] == part]
        print(text_table(*part_table(part, mine)), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
