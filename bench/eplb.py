"""Part 4: the EPLB rearrangement benchmark.

Cases (``--eplb-cases``, comma-separated; default: both on GPU, the small CPU cases on CPU):

* ``dsv3``: DeepSeek-V3 fp8 experts (w13 [4096, 7168] and w2 [7168, 2048] float8_e4m3fn, scales
  [32, 56] and [56, 16] fp32: 42.0 MiB per expert), 256 logical + 32 redundant experts,
  EP = number of GPUs, ``--eplb-layers-dsv3`` layers.
* ``qwen3``: Qwen3-30B-A3B bf16 experts (w13 [1536, 2048], w2 [2048, 768]), 128 logical experts plus
  redundant ones to fill the ranks evenly (12.5% extra, rounded up to a multiple of EP),
  ``--eplb-layers-qwen`` layers.
* ``dsv3-cpu`` / ``qwen3-cpu``: the same layouts shrunk for gloo on the CPU.
* ``dsv3-seq`` / ``dsv3-seq-cpu``: rearrangements over a load sequence, one per placement
  policy (bench/eplb_sequence.py).

Placements: a greedy EPLB rebalance of Zipf(1.5) expert loads (replicate the hottest experts,
then place replicas heaviest first on the least loaded rank with room), old and new from
different seeded loads; the seed is in every row.

Methods, all in this run and all verified byte-exact after every timed repeat:

* ``eplb_pynccl``: ExpertShuffler over NcclTransport (defaults: transactional, packing rows
  < 1 MiB). ``eplb_pynccl direct``: non-transactional (receives into free rows in place).
  ``eplb_pynccl/torch-nccl``: the same shuffler over TorchTransport on the nccl group.
* ``vllm-style``: written here after the description in ANCHORS.md: one torch P2POp per expert per
  weight tensor, one batch_isend_irecv per layer, receive into a one-layer buffer, copy back.
* ``link-floor``: max bytes any GPU receives over the network / the all-to-all bus bandwidth the
  alltoall part measured for eplb_pynccl in this run at the nearest per-rank size.

Time is wall time from a common start (after a barrier) to the end of the slowest rank,
median over ``--eplb-repeats``; GB/s per GPU = max bytes received by any GPU / time.
"""

from __future__ import annotations

import time

import numpy as np

from bench.harness import BenchContext, PartSkipped, sig

MiB = 1 << 20


CASES = ("dsv3", "qwen3", "dsv3-cpu", "qwen3-cpu", "dsv3-seq", "dsv3-seq-cpu")
# every method's name; which of them run depends on the mode (GPU: NCCL ones, CPU: gloo)
METHODS = (
    "eplb_pynccl",
    "eplb_pynccl direct",
    "eplb_pynccl packed-2L",
    "eplb_pynccl/torch-nccl",
    "eplb_pynccl ipc",
    "eplb_pynccl/gloo",
    "vllm-style",
)


def layers_of(a, model: str, cpu: bool) -> int:
    """--eplb-layers-<model> when given (every case of that model, CPU ones included), else
    the case's default: 4 (dsv3) or 8 (qwen3) layers on GPUs, 2 for the CPU cases."""
    v = getattr(a, f"eplb_layers_{model}", None)
    if v is not None:
        return int(v)
    return 2 if cpu else {"dsv3": 4, "qwen": 8}[model]


def _cases(ctx: BenchContext):
    a = ctx.args
    wanted = [c for c in (getattr(a, "eplb_cases", "") or "").split(",") if c]
    n = ctx.world_size
    if not wanted:
        wanted = (
            ["dsv3", "qwen3", "dsv3-seq"]
            if ctx.is_gpu
            else ["dsv3-cpu", "qwen3-cpu", "dsv3-seq-cpu"]
        )
    out = []
    for c in wanted:
        if c in ("dsv3-seq", "dsv3-seq-cpu"):
            continue  # bench/eplb_sequence.py
        if c == "dsv3":
            spec = [
                ((4096, 7168), "float8_e4m3fn"),
                ((7168, 2048), "float8_e4m3fn"),
                ((32, 56), "float32"),
                ((56, 16), "float32"),
            ]
            out.append((c, spec, 256, 288, layers_of(a, "dsv3", False)))
        elif c == "qwen3":
            phys = -(-int(128 * 1.125) // n) * n
            out.append(
                (
                    c,
                    [((1536, 2048), "bfloat16"), ((2048, 768), "bfloat16")],
                    128,
                    phys,
                    layers_of(a, "qwen", False),
                )
            )
        elif c == "dsv3-cpu":
            spec = [
                ((64, 112), "float8_e4m3fn"),
                ((112, 32), "float8_e4m3fn"),
                ((2, 4), "float32"),
                ((4, 2), "float32"),
            ]
            out.append((c, spec, 32, 32 + 4 * n, layers_of(a, "dsv3", True)))
        elif c == "qwen3-cpu":
            out.append(
                (
                    c,
                    [((48, 64), "bfloat16"), ((64, 24), "bfloat16")],
                    16,
                    16 + 2 * n,
                    layers_of(a, "qwen", True),
                )
            )
        else:
            raise ValueError(
                f"unknown eplb case {c!r} (dsv3, qwen3, dsv3-cpu, qwen3-cpu, dsv3-seq, dsv3-seq-cpu)"
            )
    return out


# ---- placements -----------------------------------------------------------------------------


def greedy_placement(loads: np.ndarray, num_physical: int, ep: int) -> np.ndarray:
    """Slot -> expert: replicate the hottest experts, then place heaviest replicas first on the
    least loaded rank that has room (and does not hold that expert yet, where possible)."""
    num_logical = len(loads)
    reps = np.ones(num_logical, dtype=np.int64)
    for _ in range(num_physical - num_logical):
        reps[np.argmax(loads / reps)] += 1
    per = num_physical // ep
    items = sorted(
        ((loads[e] / reps[e], e) for e in range(num_logical) for _ in range(reps[e])),
        key=lambda x: (-x[0], x[1]),
    )
    rank_load = np.zeros(ep)
    rank_rows: list[list[int]] = [[] for _ in range(ep)]
    for load, e in items:
        order = np.argsort(rank_load, kind="stable")
        choice = None
        for r in order:
            if len(rank_rows[r]) < per and e not in rank_rows[r]:
                choice = r
                break
        if choice is None:
            choice = next(r for r in order if len(rank_rows[r]) < per)
        rank_rows[choice].append(e)
        rank_load[choice] += load
    return np.array([e for rows in rank_rows for e in rows], dtype=np.int64)


def make_maps(seed: int, layers: int, num_logical: int, num_physical: int, ep: int):
    rng = np.random.default_rng(seed)
    old = np.empty((layers, num_physical), dtype=np.int64)
    new = np.empty_like(old)
    ranks = np.arange(1, num_logical + 1)
    for layer in range(layers):
        for m in (old, new):
            loads = (1.0 / ranks**1.5)[rng.permutation(num_logical)] * 1e6
            m[layer] = greedy_placement(loads, num_physical, ep)
    return old, new


# ---- weights: a per-(layer, expert, tensor) byte pattern made and checked on the device -------


def _pattern(torch, n: int, layer: int, expert: int, index: int, device):
    h = (layer * 1_000_003 + expert * 7919 + index * 104_729 + 17) & 0x7FFFFFFF
    mul, add = (h % 251) * 2 + 1, h % 256
    idx = torch.arange(n, device=device, dtype=torch.int32)
    return ((idx * mul + add) & 0xFF).to(torch.uint8)


def _rows(torch, weights, amap, rank, P, first_layer):
    """(byte row, layer, expert, tensor index) for every row; ``weights[k]`` is layer
    ``first_layer + k`` and ``amap[k]`` its map."""
    for k, ws in enumerate(weights):
        for i, t in enumerate(ws):
            v = t.view(torch.uint8).view(P, -1)
            for r in range(P):
                yield v[r], first_layer + k, int(amap[k, rank * P + r]), i


def _fill(torch, weights, amap, rank, P, first_layer=0):
    """Write each row's expert pattern (empty slots get expert 0's)."""
    for row, layer, e, i in _rows(torch, weights, amap, rank, P, first_layer):
        row.copy_(_pattern(torch, row.numel(), layer, max(e, 0), i, row.device))


def _check(torch, weights, amap, rank, P, first_layer=0) -> bool:
    """Whether every non-empty row holds its expert's pattern."""
    return all(
        e < 0 or torch.equal(row, _pattern(torch, row.numel(), layer, e, i, row.device))
        for row, layer, e, i in _rows(torch, weights, amap, rank, P, first_layer)
    )


# ---- the vLLM-style baseline ------------------------------------------------------------------


def vllm_style(torch, weights, plan, rank, group=None):
    """One P2POp per expert per tensor, one batch_isend_irecv per layer, receive into a
    one-layer buffer, copy back. Uses the same plan (who sends what) as eplb_pynccl."""
    dist = torch.distributed
    rv = plan.rank_view(rank)
    P = plan.slots_per_rank
    buf = [torch.empty_like(t) for t in weights[0]]
    for layer, ws in enumerate(weights):
        if not plan.changed[layer].any():
            continue
        if any(b.shape != t.shape or b.dtype != t.dtype for b, t in zip(buf, ws)):
            buf = [torch.empty_like(t) for t in ws]
        ops = []
        m = rv.s_layer == layer
        for peer, src in zip(rv.s_peer[m].tolist(), rv.s_src_row[m].tolist()):
            for t in ws:
                ops.append(dist.P2POp(dist.isend, t[src], peer, group))
        m = rv.r_layer == layer
        for peer, dst in zip(rv.r_peer[m].tolist(), rv.r_dst_row[m].tolist()):
            for b in buf:
                ops.append(dist.P2POp(dist.irecv, b[dst], peer, group))
        m = rv.c_layer == layer
        copies = list(
            zip(rv.c_src_row[m].tolist(), rv.c_dst_row[m].tolist(), rv.c_src_is_new[m].tolist())
        )
        for src, dst, is_new in copies:
            if not is_new:
                for b, t in zip(buf, ws):
                    b[dst].copy_(t[src])
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for src, dst, is_new in copies:
            if is_new:
                for b in buf:
                    b[dst].copy_(b[src])
        # copy back row by row, as vLLM does (one copy kernel per changed row and tensor)
        for row in np.flatnonzero(plan.changed[layer, rank * P : (rank + 1) * P]).tolist():
            for b, t in zip(buf, ws):
                t[row].copy_(b[row])
    del buf


# ---- the part ---------------------------------------------------------------------------------


def model_ms(ctx: BenchContext, old, new, n: int, weights0, method: str, layer_bytes=None):
    """The time model's prediction (ms) for a measured GPU row (eplb_pynccl/estimate.py), or
    None (CPU rows, methods it does not model, any failure of the model)."""
    if not ctx.is_gpu:
        return None
    try:
        from eplb_pynccl.estimate import predict_eplb_row

        ms = predict_eplb_row(
            old, new, n, [int(t[0].nbytes) for t in weights0], method, layer_bytes=layer_bytes
        )
    except Exception:  # noqa: BLE001 - a model failure must not cost the measurement
        return None
    return None if ms is None else round(ms, 1)


def _floor_bw(ctx: BenchContext, per_rank_total: float):
    rows = [
        r
        for r in ctx.results.get("alltoall", [])
        if r.get("binding") == "eplb_pynccl" and r.get("busbw_gbps")
    ]
    if not rows:
        return None, None
    best = min(rows, key=lambda r: abs(np.log(max(r["size_bytes"], 1) / max(per_rank_total, 1))))
    return best["busbw_gbps"], best["size_bytes"]


def _methods(ctx: BenchContext, ep, layer_bytes: int):
    """(name, factory(weights) -> ExpertShuffler, or None for the vLLM-style baseline)."""
    methods = []
    if ctx.is_gpu:
        if ctx.comm is not None:
            nccl_t = ep.NcclTransport(ctx.comm)
            methods.append(("eplb_pynccl", lambda w: ep.ExpertShuffler(nccl_t, w)))
            methods.append(
                ("eplb_pynccl direct", lambda w: ep.ExpertShuffler(nccl_t, w, transactional=False))
            )
            # probe: every tensor packed per peer (one message per peer per layer); that needs
            # send and receive staging, so two layers of it
            methods.append(
                (
                    "eplb_pynccl packed-2L",
                    lambda w: ep.ExpertShuffler(
                        nccl_t, w, pack_threshold=1 << 62, staging_bytes=2 * layer_bytes
                    ),
                )
            )
        methods.append(
            ("eplb_pynccl/torch-nccl", lambda w: ep.ExpertShuffler(ep.TorchTransport(), w))
        )
        if ctx.comm is not None:
            # copy engines over CUDA IPC (one transport per shuffler: it shares its weights)
            methods.append(
                (
                    "eplb_pynccl ipc",
                    lambda w: ep.ExpertShuffler(ep.IpcTransport(communicator=ctx.comm), w),
                )
            )
    else:
        methods.append(("eplb_pynccl/gloo", lambda w: ep.ExpertShuffler(ep.TorchTransport(), w)))
    methods.append(("vllm-style", None))
    return methods


def run_copy_probe(ctx: BenchContext):
    """Probe: gather/scatter of expert rows on one GPU (DeepSeek-V3 w13 rows, 29.4 MB each):
    index kernels over byte views vs 8-byte word views vs one copy per row. Rank 0 measures;
    the others wait."""
    import torch

    if not ctx.is_gpu:
        raise PartSkipped("needs a GPU")
    rows = []
    if ctx.rank == 0:
        P, k, row = 72, 55, 4096 * 7168
        w = torch.randint(0, 255, (P, row), dtype=torch.uint8, device=ctx.device)
        stage = torch.empty((k, row), dtype=torch.uint8, device=ctx.device)
        sel = torch.randperm(P, device=ctx.device)[:k].sort().values
        sel_l = sel.tolist()

        def timed(fn):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
            return float(np.median(ts))

        w64, s64 = w.view(torch.int64), stage.view(torch.int64)
        cases = {
            "gather index_select uint8": lambda: torch.index_select(w, 0, sel, out=stage),
            "gather index_select int64": lambda: torch.index_select(w64, 0, sel, out=s64),
            "gather copy per row": lambda: [stage[j].copy_(w[r]) for j, r in enumerate(sel_l)],
            "scatter index_copy_ uint8": lambda: w.index_copy_(0, sel, stage),
            "scatter index_copy_ int64": lambda: w64.index_copy_(0, sel, s64),
            "scatter copy per row": lambda: [w[r].copy_(stage[j]) for j, r in enumerate(sel_l)],
        }
        for name, fn in cases.items():
            t = timed(fn)
            rows.append(
                {
                    "kernel": name,
                    "rows": k,
                    "row_bytes": row,
                    "time_ms": round(t * 1e3, 3),
                    "gbps_copied": round(k * row / t / 1e9, 1),
                }
            )
    ctx.barrier()
    return ctx.allgather(rows)[0]


def _probe_time(ctx: BenchContext, torch, issue, reps: int = 5) -> float:
    """Seconds per call of ``issue`` (one untimed call first), median over ``reps`` timed
    calls, each from a barrier to a device sync; the slowest rank's."""
    times = []
    for rep in range(reps + 1):
        ctx.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        issue()
        torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - t0)
    return max(ctx.allgather(float(np.median(times))))


def run_p2p_shape(ctx: BenchContext):
    """Probe: the same bytes to every peer (DeepSeek-V3 sized: 24 w13 rows, 704 MB) as one
    message, as many EPLB-sized messages in one group, or as a sequence of groups of one
    chunk per peer (with and without packing each chunk from the rows on a second stream
    while the previous chunk is in flight, through two ring slots per peer)."""
    import torch

    import eplb_pynccl as ep

    if not ctx.is_gpu:
        raise PartSkipped("needs GPUs")
    n, rank = ctx.world_size, ctx.rank
    row = 4096 * 7168
    k = 24
    total = k * row
    src = torch.full((total,), rank + 1, dtype=torch.uint8, device=ctx.device)  # peer p sends p + 1
    dst = [torch.empty(total, dtype=torch.uint8, device=ctx.device) for _ in range(n)]
    peers = [p for p in range(n) if p != rank]

    def chunks(c):
        return [[(o, min(c, total - o))] for o in range(0, total, c)]

    mixed = []
    o = 0
    while o < total:  # w13 row then w2 row (half as long), as one expert's two big tensors
        for ln in (row, row // 2):
            mixed.append((o, min(ln, total - o)))
            o += ln
    shapes = {
        "1 op/peer": [[(0, total)]],
        "24 ops/peer 29MB": [[(i * row, row) for i in range(k)]],
        "48 ops/peer 14.7MB": [[(i * row // 2, row // 2) for i in range(2 * k)]],
        "32 ops/peer 29+14.7MB": [mixed],
        "11 groups x 64MiB/peer": chunks(64 * MiB),
        "22 groups x 32MiB/peer": chunks(32 * MiB),
        "11 groups x 64MiB/peer, packed": "ring",
    }
    pack_stream = torch.cuda.Stream(ctx.device)
    ring = [
        [torch.empty(64 * MiB, dtype=torch.uint8, device=ctx.device) for _ in range(2)]
        for _ in range(n)
    ]

    def ring_run(c=64 * MiB):
        # pack chunk j of every peer into slot j % 2 (after the group that last read that slot)
        # on pack_stream; group j on the current stream after its chunk is packed
        cur = torch.cuda.current_stream(ctx.device)
        sent = [None, None]
        for j, o in enumerate(range(0, total, c)):
            ln = min(c, total - o)
            with torch.cuda.stream(pack_stream):
                if sent[j % 2] is not None:
                    pack_stream.wait_event(sent[j % 2])
                for p in peers:
                    ring[p][j % 2][:ln].copy_(src[o : o + ln])
                packed = torch.cuda.Event()
                packed.record(pack_stream)
            cur.wait_event(packed)
            with ep.group():
                for p in peers:
                    ctx.comm.send(ring[p][j % 2][:ln], p)
                    ctx.comm.recv(dst[p][o : o + ln], p)
            ev = torch.cuda.Event()
            ev.record(cur)
            sent[j % 2] = ev

    rows = []
    for name, groups in shapes.items():
        for p in peers:
            dst[p].zero_()

        def issue(groups=groups):
            if groups == "ring":
                ring_run()
                return
            for pieces in groups:
                with ep.group():
                    for p in peers:
                        for off, ln in pieces:
                            ctx.comm.send(src[off : off + ln], p)
                            ctx.comm.recv(dst[p][off : off + ln], p)

        t = _probe_time(ctx, torch, issue)
        rows.append(
            {
                "shape": name,
                "bytes_per_peer": total,
                "time_ms": round(t * 1e3, 2),
                "gbps_per_gpu": round(total * len(peers) / t / 1e9, 1),
                "check": "ok" if all(bool((dst[p] == p + 1).all()) for p in peers) else "FAIL",
            }
        )
    return rows


def _skew_buffers(ctx: BenchContext):
    """The uneven exchange of the skew probes: rank r sends cnt[d] rows of 29 MB (bytes r + 1)
    to rank r + d and receives as many from r - d, for d = 1, 2, 3. Needs 4 GPU ranks."""
    import torch

    n, rank = ctx.world_size, ctx.rank
    if not ctx.is_gpu or n != 4:
        raise PartSkipped("needs 4 GPUs")
    row = 4096 * 7168
    cnt = {1: 24, 2: 16, 3: 8}
    src = {
        d: torch.full((cnt[d] * row,), rank + 1, dtype=torch.uint8, device=ctx.device) for d in cnt
    }
    dst = {d: torch.empty(cnt[d] * row, dtype=torch.uint8, device=ctx.device) for d in cnt}
    return n, rank, row, cnt, src, dst


def _skew_ok(dst, n, rank) -> str:
    return "ok" if all(bool((t == (rank - d) % n + 1).all()) for d, t in dst.items()) else "FAIL"


def run_p2p_skew(ctx: BenchContext):
    """Probe: an uneven exchange, as EPLB layers are (rank r sends 24, 16 and 8 rows of 29 MB
    to r+1, r+2, r+3): one group of per-row messages, one group of one message per peer,
    and sub-groups that each carry at most 8 rows per pair (so later groups hold only the
    heavy pairs). Needs 4 ranks."""
    import torch

    import eplb_pynccl as ep

    n, rank, row, cnt, src, dst = _skew_buffers(ctx)

    def ops(d, first, last, per_row):
        # (send to rank + d, recv from rank - d) rows [first, last)
        step = 1 if per_row else last - first
        for a in range(first, last, step):
            sl = slice(a * row, (a + step) * row)
            yield (rank + d) % n, src[d][sl], (rank - d) % n, dst[d][sl]

    plans = {
        "one group, per-row ops": [[(d, 0, cnt[d], True) for d in cnt]],
        "one group, one op per peer": [[(d, 0, cnt[d], False) for d in cnt]],
        "groups of <= 8 rows per pair, per-row ops": [
            [(d, g, min(g + 8, cnt[d]), True) for d in cnt if g < cnt[d]] for g in range(0, 24, 8)
        ],
        "groups of <= 8 rows per pair, one op per peer": [
            [(d, g, min(g + 8, cnt[d]), False) for d in cnt if g < cnt[d]] for g in range(0, 24, 8)
        ],
    }
    for name in list(plans):
        if "per-row" in name and "groups" not in name or name == "one group, one op per peer":
            plans[name + " (buffers ncclCommRegister'ed)"] = plans[name]
    handles = []
    rows = []
    for name, groups in plans.items():
        if "Register" in name and not handles:
            handles = [ctx.comm.register(t) for t in (*src.values(), *dst.values())]
        for d in cnt:
            dst[d].zero_()

        def issue(groups=groups):
            for grp in groups:
                with ep.group():
                    for d, a, b, per_row in grp:
                        for sp, st, rp, rt in ops(d, a, b, per_row):
                            ctx.comm.send(st, sp)
                            ctx.comm.recv(rt, rp)

        t = _probe_time(ctx, torch, issue)
        total = sum(cnt.values()) * row
        rows.append(
            {
                "shape": name,
                "bytes_out_per_gpu": total,
                "time_ms": round(t * 1e3, 2),
                "gbps_per_gpu": round(total / t / 1e9, 1),
                "check": _skew_ok(dst, n, rank),
            }
        )
    torch.cuda.synchronize()
    for h in handles:
        ctx.comm.deregister(h)
    return rows


def run_p2p_ctas(ctx: BenchContext):
    """Probe: the uneven exchange of :func:`run_p2p_skew` (per-row messages, and one message
    per peer) on communicators with at most 32, 16, 8 and 4 CTAs (``max_ctas``)."""
    import torch

    import eplb_pynccl as ep

    n, rank, row, cnt, src, dst = _skew_buffers(ctx)
    rows = []
    for ctas in (32, 16, 8, 4):
        comm = ep.Communicator.from_store(
            ctx.store, rank, n, ctx.device.index, key=f"probe/ctas{ctas}", max_ctas=ctas
        )
        comm.connect_peers()
        for per_row in (True, False):
            sends, recvs = [], []
            for d in cnt:
                step = 1 if per_row else cnt[d]
                for a in range(0, cnt[d], step):
                    sl = slice(a * row, (a + step) * row)
                    sends.append((src[d][sl], (rank + d) % n))
                    recvs.append((dst[d][sl], (rank - d) % n))
            batch = comm.prepare_p2p(sends, recvs)
            for d in cnt:
                dst[d].zero_()
            t = _probe_time(ctx, torch, batch.launch)
            total = sum(cnt.values()) * row
            rows.append(
                {
                    "max_ctas": ctas,
                    "shape": "per-row ops" if per_row else "one op per peer",
                    "time_ms": round(t * 1e3, 2),
                    "gbps_per_gpu": round(total / t / 1e9, 1),
                    "check": _skew_ok(dst, n, rank),
                }
            )
        comm.close()
    return rows


def run_eplb(ctx: BenchContext):
    import torch

    import eplb_pynccl as ep

    n, rank = ctx.world_size, ctx.rank
    if n < 2:
        raise PartSkipped("eplb needs at least 2 ranks")
    repeats = int(getattr(ctx.args, "eplb_repeats", 5) or 5)
    variants = [v for v in (getattr(ctx.args, "eplb_methods", "") or "").split(",") if v]
    dev = ctx.device
    rows = []
    for case, spec, num_logical, num_physical, layers in _cases(ctx):
        if num_physical % n:
            raise PartSkipped(f"{case}: {num_physical} slots do not divide over {n} ranks")
        P = num_physical // n
        seed = ctx.args.seed
        old, new = make_maps(seed, layers, num_logical, num_physical, n)
        tspec = [(shape, getattr(torch, dt)) for shape, dt in spec]
        weights = [
            [torch.empty((P, *shape), dtype=dt, device=dev) for shape, dt in tspec]
            for _ in range(layers)
        ]
        row_bytes = sum(t[0].nbytes for t in weights[0])
        t0 = time.perf_counter()
        plan = ep.plan_rearrangement(old, new, n)
        plan_ms = (time.perf_counter() - t0) * 1e3
        recv_rows = plan.received_per_rank()
        max_recv = int(recv_rows.max()) * row_bytes
        changed = float(plan.changed.mean())
        label = f"{case} ep{n} {layers}L"
        methods = _methods(ctx, ep, row_bytes * P)

        if variants:
            methods = [m for m in methods if m[0] in variants]
            if not methods:
                raise ValueError(
                    f"--eplb-methods {','.join(variants)}: none of them runs in "
                    f"{'GPU' if ctx.is_gpu else 'CPU'} mode here (these do: "
                    f"{', '.join(m[0] for m in _methods(ctx, ep, row_bytes * P))})"
                )
        results = {}
        for name, make in methods:
            shuffler = make(weights) if make is not None else None
            times, ok, stats = [], True, None
            for rep in range(repeats + 1):  # the first is warm-up (connections, allocator)
                _fill(torch, weights, old, rank, P)
                ctx.sync()
                if ctx.is_gpu:
                    torch.cuda.reset_peak_memory_stats(dev)
                    base_mem = torch.cuda.memory_allocated(dev)
                ctx.barrier()
                t0 = time.perf_counter()
                if shuffler is not None:
                    stats = shuffler.rearrange(old, new)
                else:
                    vllm_style(torch, weights, plan, rank)
                ctx.sync()
                dt = time.perf_counter() - t0
                extra = (torch.cuda.max_memory_allocated(dev) - base_mem) if ctx.is_gpu else 0
                good = _check(torch, weights, new, rank, P)
                ok = ok and good
                if rep:
                    times.append((dt, extra))
            gpu_ms = {}
            if shuffler is not None and ctx.is_gpu:
                # one more (untimed) run with CUDA events per phase: where the GPU time goes
                shuffler.profile = True
                _fill(torch, weights, old, rank, P)
                ctx.sync()
                ctx.barrier()
                gpu_ms = shuffler.rearrange(old, new).gpu_ms
                ok = ok and _check(torch, weights, new, rank, P)
            del shuffler
            every = ctx.allgather(
                (
                    times,
                    ok,
                    None
                    if stats is None
                    else (
                        stats.messages,
                        stats.rounds,
                        stats.peak_extra_bytes,
                        stats.launch_seconds,
                        stats.wait_seconds,
                        stats.apply_seconds,
                        stats.setup_seconds,
                        gpu_ms,
                    ),
                )
            )
            slow = [max(every[r][0][i][0] for r in range(n)) for i in range(repeats)]
            peak = max(every[r][0][i][1] for r in range(n) for i in range(repeats))
            all_ok = all(e[1] for e in every)
            med = float(np.median(slow)) * 1e3
            row = {
                "case": label,
                "method": name,
                "world_size": n,
                "layers": layers,
                "time_ms": round(med, 3),
                "time_ms_min": round(min(slow) * 1e3, 3),
                "time_ms_max": round(max(slow) * 1e3, 3),
                "gbps_per_gpu": sig(max_recv / (med * 1e-3) / 1e9),
                "bytes_max_per_gpu": max_recv,
                "peak_extra_mib": sig(peak / MiB),
                "layer_mib_per_gpu": sig(row_bytes * P / MiB),
                "repeats": repeats,
                "check": "ok" if all_ok else "FAIL",
                "seed": seed,
                "changed_frac": round(changed, 3),
                "planner_ms": round(plan_ms, 2),
            }
            pred = model_ms(ctx, old, new, n, weights[0], name, row_bytes * P)
            if pred is not None:
                row["model_ms"] = pred
                row["model_err_pct"] = round(100 * (pred - med) / med, 1) if med else None
            if every[0][2] is not None:
                row["messages_max"] = max(e[2][0] for e in every)
                row["rounds"] = every[0][2][1]
                row["host_launch_ms"] = round(max(e[2][3] for e in every) * 1e3, 2)
                row["host_wait_ms"] = round(max(e[2][4] for e in every) * 1e3, 2)
                row["host_apply_ms"] = round(max(e[2][5] for e in every) * 1e3, 2)
                row["host_setup_ms"] = round(max(e[2][6] for e in every) * 1e3, 2)
                if every[0][2][7]:
                    # slowest rank per phase (profiled run)
                    row["gpu_ms"] = " / ".join(
                        f"{k} {max(e[2][7][k] for e in every):.1f}" for k in every[0][2][7]
                    )
            results[name] = med
            rows.append(row)
        base = results.get("vllm-style")
        for row in rows:
            if row["case"] == label and base and row["method"] != "vllm-style":
                row["speedup"] = round(base / row["time_ms"], 2)
                row["note"] = "speedup vs vllm-style"
        bw, at = _floor_bw(ctx, max_recv / max(n - 1, 1) * n / layers)
        if bw:
            floor_ms = max_recv / (bw * 1e9) * 1e3
            rows.append(
                {
                    "case": label,
                    "method": "link-floor",
                    "world_size": n,
                    "layers": layers,
                    "time_ms": round(floor_ms, 3),
                    "gbps_per_gpu": bw,
                    "bytes_max_per_gpu": max_recv,
                    "reference": True,
                    "note": f"max bytes received / eplb_pynccl alltoall busbw at {at} B per rank",
                }
            )
            for row in rows:
                if row["case"] == label and row["method"].startswith("eplb_pynccl"):
                    row["floor_frac"] = round(floor_ms / row["time_ms"], 3)
        del weights
        if ctx.is_gpu:
            torch.cuda.empty_cache()
        ctx.log(f"eplb {label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results.items()))
    from bench.eplb_sequence import run_sequence_cases

    wanted = [c for c in (getattr(ctx.args, "eplb_cases", "") or "").split(",") if c]
    rows += run_sequence_cases(ctx, wanted or (["dsv3-seq"] if ctx.is_gpu else ["dsv3-seq-cpu"]))
    return rows
