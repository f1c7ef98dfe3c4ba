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

from bench.common import (
    DSV3,
    DSV3_CPU,
    QWEN3,
    QWEN3_CPU,
    MiB,
    check,
    fill,
    layers_of,
    listed,
    make_maps,
    make_weights,
    row_bytes,
)
from bench.eplb_sequence import SEQ_CASES, run_sequence_cases, sequence_shape
from bench.harness import BenchContext, PartSkipped

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


def wanted_cases(ctx: BenchContext) -> list[str]:
    """--eplb-cases, or the mode's default: dsv3, qwen3, dsv3-seq (their -cpu versions on CPU)."""
    cpu = ["dsv3-cpu", "qwen3-cpu", "dsv3-seq-cpu"]
    return listed(ctx.args, "eplb_cases") or (["dsv3", "qwen3", "dsv3-seq"] if ctx.is_gpu else cpu)


def case_shape(case: str, n: int, args):
    """(layout, num_logical, num_physical, layers) of a whole-rearrangement case at ``n`` ranks."""
    if case == "dsv3":
        return DSV3, 256, 288, layers_of(args, "dsv3", False)
    if case == "qwen3":
        return QWEN3, 128, -(-int(128 * 1.125) // n) * n, layers_of(args, "qwen", False)
    # CPU cases: 4 (2) redundant experts per rank, rounded up to fill every rank evenly
    if case == "dsv3-cpu":
        return DSV3_CPU, 32, -(-(32 + 4 * n) // n) * n, layers_of(args, "dsv3", True)
    if case == "qwen3-cpu":
        return QWEN3_CPU, 16, -(-(16 + 2 * n) // n) * n, layers_of(args, "qwen", True)
    raise ValueError(f"unknown eplb case {case!r} ({', '.join(CASES)})")


def case_memory(case: str, n: int, args) -> tuple[int, str]:
    """Bytes one rank holds for a case (its layers of weights plus two layers for staging and
    the baseline's buffer), and how that adds up."""
    if case in SEQ_CASES:
        spec, _, num_physical, layers, _ = sequence_shape(case, n, args)
    else:
        spec, _, num_physical, layers = case_shape(case, n, args)
    per_layer = -(-num_physical // n) * row_bytes(spec)
    return (
        layers + 2
    ) * per_layer, f"({layers} layers + 2 of staging) x {per_layer / MiB:,.0f} MiB"


def _cases(ctx: BenchContext):
    return [
        (c, *case_shape(c, ctx.world_size, ctx.args))
        for c in wanted_cases(ctx)
        if c not in SEQ_CASES  # bench/eplb_sequence.py
    ]


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


def _issue_groups(ctx: BenchContext, ep, groups) -> None:
    """The probes' exchange: each group of (send peer, send tensor, recv peer, recv tensor)
    in one ``ep.group()``, every send followed by its recv, on ``ctx.comm``."""
    for grp in groups:
        with ep.group():
            for sp, st, rp, rt in grp:
                ctx.comm.send(st, sp)
                ctx.comm.recv(rt, rp)


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
    shapes = _shape_plans(total, row, k)
    ring_run = _ring_exchange(ctx, torch, ep, src, dst, peers, total)
    rows = []
    for name, groups in shapes.items():
        for p in peers:
            dst[p].zero_()

        def issue(groups=groups):
            if groups == "ring":
                ring_run()
                return
            _issue_groups(ctx, ep, (_shape_ops(src, dst, peers, pieces) for pieces in groups))

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


def _shape_plans(total: int, row: int, k: int) -> dict:
    """The shapes of :func:`run_p2p_shape`: name -> groups, each a list of (offset, length)
    pieces sent to (and received from) every peer in one group; ``"ring"``: the packed run."""

    def chunks(c):
        return [[(o, min(c, total - o))] for o in range(0, total, c)]

    mixed = []
    o = 0
    while o < total:  # w13 row then w2 row (half as long), as one expert's two big tensors
        for ln in (row, row // 2):
            mixed.append((o, min(ln, total - o)))
            o += ln
    return {
        "1 op/peer": [[(0, total)]],
        "24 ops/peer 29MB": [[(i * row, row) for i in range(k)]],
        "48 ops/peer 14.7MB": [[(i * row // 2, row // 2) for i in range(2 * k)]],
        "32 ops/peer 29+14.7MB": [mixed],
        "11 groups x 64MiB/peer": chunks(64 * MiB),
        "22 groups x 32MiB/peer": chunks(32 * MiB),
        "11 groups x 64MiB/peer, packed": "ring",
    }


def _shape_ops(src, dst, peers, pieces):
    """One group of :func:`run_p2p_shape`: every piece of ``src`` to every peer, received
    into the same piece of the peer's ``dst``."""
    for p in peers:
        for off, ln in pieces:
            yield p, src[off : off + ln], p, dst[p][off : off + ln]


def _ring_exchange(ctx: BenchContext, torch, ep, src, dst, peers, total):
    """The packed shape of :func:`run_p2p_shape`: its two ring slots per rank of 64 MiB and a
    pack stream, and the function that runs the exchange through them."""
    pack_stream = torch.cuda.Stream(ctx.device)
    ring = [
        [torch.empty(64 * MiB, dtype=torch.uint8, device=ctx.device) for _ in range(2)]
        for _ in range(ctx.world_size)
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
            _issue_groups(
                ctx, ep, [((p, ring[p][j % 2][:ln], p, dst[p][o : o + ln]) for p in peers)]
            )
            ev = torch.cuda.Event()
            ev.record(cur)
            sent[j % 2] = ev

    return ring_run


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


def _skew_ops(bufs, d: int, first: int, last: int, per_row: bool):
    """(send peer, send tensor, recv peer, recv tensor) of rows [first, last) of the skew
    exchange at distance ``d`` (to rank + d, from rank - d): one per row, or one for them
    all. ``bufs``: what :func:`_skew_buffers` returns."""
    n, rank, row, _, src, dst = bufs
    step = 1 if per_row else last - first
    for a in range(first, last, step):
        sl = slice(a * row, (a + step) * row)
        yield (rank + d) % n, src[d][sl], (rank - d) % n, dst[d][sl]


def _skew_group(bufs, grp):
    """The ops of one group of a skew plan: its (d, first, last, per_row) pieces in order."""
    for d, a, b, per_row in grp:
        yield from _skew_ops(bufs, d, a, b, per_row)


def _skew_plans(cnt: dict) -> dict:
    """The plans of :func:`run_p2p_skew`: name -> groups of (d, first, last, per_row)."""
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
    return plans


def run_p2p_skew(ctx: BenchContext):
    """Probe: an uneven exchange, as EPLB layers are (rank r sends 24, 16 and 8 rows of 29 MB
    to r+1, r+2, r+3): one group of per-row messages, one group of one message per peer,
    and sub-groups that each carry at most 8 rows per pair (so later groups hold only the
    heavy pairs). Needs 4 ranks."""
    import torch

    import eplb_pynccl as ep

    bufs = _skew_buffers(ctx)
    n, rank, row, cnt, src, dst = bufs
    handles = []
    rows = []
    for name, groups in _skew_plans(cnt).items():
        if "Register" in name and not handles:
            handles = [ctx.comm.register(t) for t in (*src.values(), *dst.values())]
        for d in cnt:
            dst[d].zero_()

        def issue(groups=groups):
            _issue_groups(ctx, ep, (_skew_group(bufs, grp) for grp in groups))

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

    bufs = _skew_buffers(ctx)
    n, rank, row, cnt, src, dst = bufs
    rows = []
    for ctas in (32, 16, 8, 4):
        comm = ep.Communicator.from_store(
            ctx.store, rank, n, ctx.device.index, key=f"probe/ctas{ctas}", max_ctas=ctas
        )
        comm.connect_peers()
        for per_row in (True, False):
            sends, recvs = [], []
            for d in cnt:
                for sp, st, rp, rt in _skew_ops(bufs, d, 0, cnt[d], per_row):
                    sends.append((st, sp))
                    recvs.append((rt, rp))
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
    """The part: every whole-rearrangement case, then the sequence cases. A case whose slots
    do not divide over the ranks is skipped, with a row that says so."""
    n = ctx.world_size
    if n < 2:
        raise PartSkipped("eplb needs at least 2 ranks")
    rows = []
    for case in _cases(ctx):
        if case[3] % n:
            why = f"{case[3]} slots do not divide over {n} ranks"
            ctx.log(f"eplb {case[0]}: skipped ({why})")
            rows.append({"case": f"{case[0]} ep{n}", "skipped": why})
            continue
        rows += _run_case(ctx, *case)
    seq = run_sequence_cases(ctx, wanted_cases(ctx))
    for row in seq:
        if "time_ms" in row:
            _model_na(row, "the sequence rows keep no per-rebalance maps to model")
    return rows + seq


class _Case:
    """One case's set-up on this rank: maps, weights, plan and the sizes its rows report."""

    def __init__(self, ctx: BenchContext, case, spec, num_logical, num_physical, layers):
        import torch

        import eplb_pynccl as ep

        n = ctx.world_size
        self.P = P = num_physical // n
        self.layers = layers
        self.seed = ctx.args.seed
        self.old, self.new = make_maps(self.seed, layers, num_logical, num_physical, n)
        self.weights = make_weights(torch, spec, layers, P, ctx.device)
        self.tensor_row_bytes = [int(t[0].nbytes) for t in self.weights[0]]
        self.row_bytes = sum(self.tensor_row_bytes)
        t0 = time.perf_counter()
        self.plan = ep.plan_rearrangement(self.old, self.new, n)
        self.plan_ms = (time.perf_counter() - t0) * 1e3
        self.max_recv = int(self.plan.received_per_rank().max()) * self.row_bytes
        self.changed = float(self.plan.changed.mean())
        self.label = f"{case} ep{n} {layers}L"


def _selected_methods(ctx: BenchContext, ep, c: _Case):
    """The methods of this mode, narrowed to --eplb-methods (none left: a ValueError)."""
    methods = _methods(ctx, ep, c.row_bytes * c.P)
    variants = listed(ctx.args, "eplb_methods")
    if not variants:
        return methods
    chosen = [m for m in methods if m[0] in variants]
    if not chosen:
        raise ValueError(
            f"--eplb-methods {','.join(variants)}: none of them runs in "
            f"{'GPU' if ctx.is_gpu else 'CPU'} mode here (these do: "
            f"{', '.join(m[0] for m in methods)})"
        )
    return chosen


def _run_case(ctx: BenchContext, *case) -> list[dict]:
    import torch

    import eplb_pynccl as ep

    c = _Case(ctx, *case)
    repeats = int(getattr(ctx.args, "eplb_repeats", 5) or 5)
    rows, results = [], {}
    for name, make in _selected_methods(ctx, ep, c):
        every = ctx.allgather(_time_method(ctx, torch, c, make, repeats))
        row = _method_row(c, name, every, repeats, ctx.world_size)
        results[name] = row["time_ms"]
        rows.append(row)
    _add_speedups(rows, results.get("vllm-style"))
    name = torch.cuda.get_device_name(ctx.device) if ctx.is_gpu else None
    cluster, why = model_cluster(name, ctx.world_size)
    add_model_columns(
        rows, c.old, c.new, ctx.world_size, c.tensor_row_bytes, c.row_bytes * c.P, cluster, why
    )
    rows += _floor_rows(ctx, c, rows)
    del c.weights
    if ctx.is_gpu:
        torch.cuda.empty_cache()
    return rows


def _timed_rearrangement(ctx: BenchContext, torch, c: _Case, shuffler):
    """One rearrangement from a barrier: (seconds, extra device bytes, stats, exact)."""
    dev = ctx.device
    fill(torch, c.weights, c.old, ctx.rank, c.P)
    ctx.sync()
    if ctx.is_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    ctx.barrier()
    t0 = time.perf_counter()
    stats = None
    if shuffler is not None:
        stats = shuffler.rearrange(c.old, c.new)
    else:
        vllm_style(torch, c.weights, c.plan, ctx.rank)
    ctx.sync()
    dt = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated(dev) - base_mem) if ctx.is_gpu else 0
    return dt, extra, stats, check(torch, c.weights, c.new, ctx.rank, c.P)


def _profiled_gpu_ms(ctx: BenchContext, torch, c: _Case, shuffler):
    """One more (untimed) run with CUDA events per phase: (gpu ms per phase, exact)."""
    shuffler.profile = True
    fill(torch, c.weights, c.old, ctx.rank, c.P)
    ctx.sync()
    ctx.barrier()
    gpu_ms = shuffler.rearrange(c.old, c.new).gpu_ms
    return gpu_ms, check(torch, c.weights, c.new, ctx.rank, c.P)


def _time_method(ctx: BenchContext, torch, c: _Case, make, repeats: int):
    """This rank's (times [(s, extra bytes)], exact, stats summary or None) of one method;
    the first of ``repeats + 1`` runs is warm-up (connections, allocator)."""
    shuffler = make(c.weights) if make is not None else None
    times, ok, stats = [], True, None
    for rep in range(repeats + 1):
        dt, extra, stats, good = _timed_rearrangement(ctx, torch, c, shuffler)
        ok = ok and good
        if rep:
            times.append((dt, extra))
    gpu_ms = {}
    if shuffler is not None and ctx.is_gpu:
        gpu_ms, good = _profiled_gpu_ms(ctx, torch, c, shuffler)
        ok = ok and good
    del shuffler
    if stats is None:
        return times, ok, None
    summary = (
        stats.messages,
        stats.rounds,
        stats.peak_extra_bytes,
        stats.launch_seconds,
        stats.wait_seconds,
        stats.apply_seconds,
        stats.setup_seconds,
        gpu_ms,
    )
    return times, ok, summary


def _method_row(c: _Case, name: str, every, repeats: int, n: int) -> dict:
    """The row of one method from every rank's :func:`_time_method` (slowest rank per repeat)."""
    slow = [max(every[r][0][i][0] for r in range(n)) for i in range(repeats)]
    peak = max(every[r][0][i][1] for r in range(n) for i in range(repeats))
    med = float(np.median(slow)) * 1e3
    row = {
        "case": c.label,
        "method": name,
        "world_size": n,
        "layers": c.layers,
        "time_ms": med,
        "time_ms_min": min(slow) * 1e3,
        "time_ms_max": max(slow) * 1e3,
        "gbps_per_gpu": c.max_recv / (med * 1e-3) / 1e9,
        "bytes_max_per_gpu": c.max_recv,
        "peak_extra_mib": peak / MiB,
        "layer_mib_per_gpu": c.row_bytes * c.P / MiB,
        "repeats": repeats,
        "check": "ok" if all(e[1] for e in every) else "FAIL",
        "seed": c.seed,
        "changed_frac": c.changed,
        "planner_ms": c.plan_ms,
    }
    if every[0][2] is not None:
        row.update(_host_columns(every))
    return row


def _host_columns(every) -> dict:
    """Messages, rounds and host time per phase: the slowest rank's."""
    out = {
        "messages_max": max(e[2][0] for e in every),
        "rounds": every[0][2][1],
        "host_launch_ms": max(e[2][3] for e in every) * 1e3,
        "host_wait_ms": max(e[2][4] for e in every) * 1e3,
        "host_apply_ms": max(e[2][5] for e in every) * 1e3,
        "host_setup_ms": max(e[2][6] for e in every) * 1e3,
    }
    if every[0][2][7]:
        # slowest rank per phase (profiled run)
        out["gpu_ms"] = " / ".join(
            f"{k} {max(e[2][7][k] for e in every):.1f}" for k in every[0][2][7]
        )
    return out


def model_cluster(device_name: str | None, n: int):
    """The described cluster a run of ``n`` ranks is on, for the time model's columns:
    ``(cluster, None)``, or ``(None, why not)``. ``device_name``: the GPU's name (None: CPU
    mode, gloo). One host's GPUs are one NVLink domain of ``n`` GPUs (``h200x1`` for one
    H200); H100 and H200 are described (eplb_pynccl/cluster.py), with the host costs of the
    executor as it is now."""
    from dataclasses import replace

    from eplb_pynccl.cluster import Cluster

    if device_name is None:
        return None, (
            "gloo on the CPU: no cluster description (gloo's per-op cost and loopback rate "
            "are not measured; the model's rates are NVLink, copy engines and InfiniBand)"
        )
    kind = "h200" if "H200" in device_name else "h100" if "H100" in device_name else None
    if kind is None:
        return None, f"no cluster description for {device_name!r} (H100 and H200 are described)"
    if kind == "h200" and n == 1:
        return Cluster.preset("h200x1"), None
    base = Cluster.preset("h100x4-nv18" if kind == "h100" else "h200-ib400")
    return replace(base, name=f"{kind}x{n}", gpus_per_node=n, nics_per_node=1, nic_gpus=None), None


def _model_na(row: dict, why: str) -> None:
    row["model_ms"] = "n/a"
    row["model_err"] = "n/a"
    row["model_note"] = why


def add_model_columns(
    rows: list[dict], old, new, n: int, tensor_row_bytes, layer_bytes: int, cluster, why
) -> None:
    """``model_ms`` (the time model's prediction for each measured row, on ``cluster``) and
    ``model_err`` ((model - measured) / measured, percent, as bench/scale.py) beside every
    row's ``time_ms``; ``n/a`` with ``model_note`` saying why where the model has nothing to
    say (``cluster`` None: ``why``)."""
    from eplb_pynccl.estimate import predict_eplb_row

    for row in rows:
        if cluster is None:
            _model_na(row, why)
            continue
        try:
            ms = predict_eplb_row(
                old,
                new,
                n,
                tensor_row_bytes,
                row["method"],
                cluster=cluster,
                layer_bytes=layer_bytes,
            )
        except ValueError as e:  # e.g. more ranks than the cluster holds
            _model_na(row, f"the model refused: {e}")
            continue
        if ms is None:
            _model_na(row, f"the model has no {row['method']!r} executor")
            continue
        row["model_ms"] = ms
        row["model_err"] = 100.0 * (ms - row["time_ms"]) / row["time_ms"]
        row["model_cluster"] = cluster.name


def _add_speedups(rows: list[dict], base) -> None:
    for row in rows:
        if base and row["method"] != "vllm-style":
            row["speedup"] = base / row["time_ms"]
            row["note"] = "speedup vs vllm-style"


def _floor_rows(ctx: BenchContext, c: _Case, rows: list[dict]) -> list[dict]:
    """The link-floor row (when the alltoall part ran), and each eplb_pynccl row's share of it."""
    n = ctx.world_size
    bw, at = _floor_bw(ctx, c.max_recv / max(n - 1, 1) * n / c.layers)
    if not bw:
        return []
    floor_ms = c.max_recv / (bw * 1e9) * 1e3
    for row in rows:
        if row["method"].startswith("eplb_pynccl"):
            row["floor_frac"] = floor_ms / row["time_ms"]
    return [
        {
            "case": c.label,
            "method": "link-floor",
            "world_size": n,
            "layers": c.layers,
            "time_ms": floor_ms,
            "gbps_per_gpu": bw,
            "bytes_max_per_gpu": c.max_recv,
            "reference": True,
            "note": f"max bytes received / eplb_pynccl alltoall busbw at {at} B per rank",
        }
    ]
