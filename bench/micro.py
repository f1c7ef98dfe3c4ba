"""NCCL micro-benchmarks: sendrecv, alltoall (grouped p2p) and per-op host overhead.

Every binding issues its operations on the same stream (a side stream of torch's, made current
for the part) so CUDA events recorded on it bracket the work of all of them alike.

Bindings (``binding`` column of the rows):

=========================  =================================================================
eplb_pynccl                ``with ep.group(): comm.send(t, peer); comm.recv(t, peer)`` with torch
                           tensors, stream left to the default (torch's current stream)
eplb_pynccl[stream]        the same, passing the stream as an int handle (overhead part only)
eplb_pynccl[raw]           ``(ptr, nbytes)`` tuples and an int stream (overhead part only)
eplb_pynccl[p2p]           ``Communicator.p2p(sends, recvs, stream)`` with ``(ptr, nbytes)`` tuples:
                           the batched call the shuffler uses (overhead part only)
eplb_pynccl[prepared]      ``Communicator.prepare_p2p(sends, recvs)`` once, then ``launch(stream)``
                           per group: validation paid once, one ctypes call per op (overhead only)
eplb_pynccl[graph]         the prepared batch captured once as a CUDA graph
                           (``PreparedP2P.capture()``), ``launch(stream)`` replays it (overhead only)
cupy                       ``cupy.cuda.nccl``: ``groupStart(); comm.send(ptr, n, NCCL_UINT8, peer,
                           stream) ...; groupEnd()`` with raw pointers
torch                      ``torch.distributed.batch_isend_irecv`` of ``P2POp`` s, then ``wait()``
                           on the works; a rank's send to itself (alltoall) is a device ``copy_``
                           because torch refuses p2p to self
torch.all_to_all_single    alltoall part only: ``dist.all_to_all_single(recv, send)``
nccl4py                    ``nccl.core``: ``group_start(); comm.send(t, peer, stream=s) ...;
                           group_end()`` with torch tensors
=========================  =================================================================

Timing (sendrecv, alltoall): per size, every binding gets ``--warmup`` untimed iterations (they
pay the lazy connection setup) and a data check; then ``--repeats`` rounds, each timing every
binding once (interleaved, so a drift of the host's speed hits all alike): store barrier, one
untimed iteration (aligns the ranks on the GPU), CUDA event, ``--iters`` iterations back to back,
CUDA event. A rank's time is the median over repeats of (elapsed / iters); the row reports the
slowest rank's. The overhead part interleaves its repeats the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .harness import BenchContext, HostTimer, PartSkipped, median, sig, size_series, summarize

Op = tuple[bool, Any, int]  # (is_send, tensor, peer)
Issue = Callable[[], None]


# --------------------------------------------------------------------------------------------
# Bindings: each turns a list of ops into a closure that issues them as one group
# --------------------------------------------------------------------------------------------


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _prep_eplb(ctx: BenchContext, ops: list[Op], mode: str = "tensor") -> Issue:
    import eplb_pynccl as ep

    comm, group = ctx.comm, ep.group
    if mode == "p2p":
        st = ctx.stream_handle()
        sends = [((t.data_ptr(), _nbytes(t)), p) for s, t, p in ops if s]
        recvs = [((t.data_ptr(), _nbytes(t)), p) for s, t, p in ops if not s]

        def issue_batch() -> None:
            comm.p2p(sends, recvs, st)

        return issue_batch
    if mode in (
        "prepared",
        "graph",
    ):  # validated once, reissued: what a repeating exchange pays per op
        st = ctx.stream_handle()
        batch = comm.prepare_p2p(
            [(t, p) for s, t, p in ops if s], [(t, p) for s, t, p in ops if not s]
        )
        if mode == "graph":  # captured once as a CUDA graph, replayed
            batch.launch(st)  # connections are made outside the capture
            ctx.sync()
            batch = batch.capture()

        def issue_prepared() -> None:
            batch.launch(st)

        return issue_prepared
    send, recv = comm.send, comm.recv
    if mode == "raw":
        calls = [(send if s else recv, (t.data_ptr(), _nbytes(t)), p) for s, t, p in ops]
    else:
        calls = [(send if s else recv, t, p) for s, t, p in ops]
    if mode in ("raw", "stream"):
        st = ctx.stream_handle()

        def issue() -> None:
            with group():
                for f, buf, p in calls:
                    f(buf, p, stream=st)
    else:

        def issue() -> None:
            with group():
                for f, buf, p in calls:
                    f(buf, p)

    return issue


def _prep_cupy(ctx: BenchContext, ops: list[Op]) -> Issue:
    from cupy.cuda import nccl as cn

    c, st, u8 = ctx.cupy_comm, ctx.stream_handle(), cn.NCCL_UINT8
    gs, ge = cn.groupStart, cn.groupEnd
    calls = [(c.send if s else c.recv, t.data_ptr(), _nbytes(t), p) for s, t, p in ops]

    def issue() -> None:
        gs()
        try:
            for f, ptr, n, p in calls:
                f(ptr, n, u8, p, st)
        finally:
            ge()

    return issue


def _prep_torch(ctx: BenchContext, ops: list[Op]) -> Issue:
    import torch.distributed as dist

    me = ctx.rank
    p2p = [dist.P2POp(dist.isend if s else dist.irecv, t, p) for s, t, p in ops if p != me]
    self_send = [t for s, t, p in ops if p == me and s]
    self_recv = [t for s, t, p in ops if p == me and not s]
    if len(self_send) != len(self_recv):
        raise ValueError("unpaired send/recv to self")
    copies = list(zip(self_recv, self_send, strict=True))
    bisr = dist.batch_isend_irecv

    def issue() -> None:
        for dst, src in copies:
            dst.copy_(src)
        if p2p:
            for w in bisr(p2p):
                w.wait()

    return issue


def _prep_nccl4py(ctx: BenchContext, ops: list[Op]) -> Issue:
    import nccl.core as n4

    c, st = ctx.nccl4py_comm, ctx.stream_handle()
    calls = [(c.send if s else c.recv, t, p) for s, t, p in ops]
    gs, ge = getattr(n4, "group_start", None), getattr(n4, "group_end", None)
    if gs is None or ge is None:
        grp = n4.group

        def issue() -> None:
            with grp():
                for f, t, p in calls:
                    f(t, p, stream=st)

        return issue

    def issue() -> None:
        gs()
        try:
            for f, t, p in calls:
                f(t, p, stream=st)
        finally:
            ge()

    return issue


# name -> (ctx.bindings key, prepare(ctx, ops))
P2P_BINDINGS: dict[str, tuple[str, Callable[[BenchContext, list[Op]], Issue]]] = {
    "eplb_pynccl": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "tensor")),
    "eplb_pynccl[stream]": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "stream")),
    "eplb_pynccl[raw]": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "raw")),
    "eplb_pynccl[p2p]": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "p2p")),
    "eplb_pynccl[prepared]": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "prepared")),
    "eplb_pynccl[graph]": ("eplb_pynccl", lambda c, o: _prep_eplb(c, o, "graph")),
    "cupy": ("cupy", _prep_cupy),
    "torch": ("torch", _prep_torch),
    "nccl4py": ("nccl4py", _prep_nccl4py),
}
BW_BINDINGS = ["eplb_pynccl", "cupy", "torch", "nccl4py"]
OVERHEAD_BINDINGS = [
    "eplb_pynccl",
    "eplb_pynccl[stream]",
    "eplb_pynccl[raw]",
    "eplb_pynccl[p2p]",
    "eplb_pynccl[prepared]",
    "eplb_pynccl[graph]",
    "cupy",
    "torch",
    "nccl4py",
]


def _selected(ctx: BenchContext, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Bindings to run (availability and --bindings filter), and why the others are left out."""
    wanted = [w.strip() for w in (getattr(ctx.args, "bindings", "") or "").split(",") if w.strip()]
    run, left = [], {}
    for n in names:
        base = n.split("[")[0].split(".")[0]
        if wanted and not any(n == w or base == w for w in wanted):
            left[n] = "not in --bindings"
        elif ctx.bindings.get(base, "?") != "ok":
            left[n] = ctx.bindings.get(base, "unknown binding")
        else:
            run.append(n)
    return run, left


ONE_GPU_NOTE = "1 GPU: sends to itself (a copy inside the GPU, no link)"


def _need_gpu(ctx: BenchContext, part: str) -> None:
    if not ctx.is_gpu:
        raise PartSkipped(f"{part} needs GPUs (NCCL); CPU mode")


def _pattern(src: int, dst: int) -> int:
    """The byte value src puts in the data it sends to dst (never 0, so zeroed buffers show)."""
    return (src * 31 + dst * 7 + 1) % 251 + 1


def _set_up_everywhere(ctx: BenchContext, issues: dict, mine: dict) -> list[str]:
    """The bindings (in ``issues``' order) that every rank set up, so the interleaved timing
    loops meet at the same barriers; the others are marked failed in ``mine``."""
    common = set.intersection(*(set(x) for x in ctx.allgather(sorted(issues))))
    for b in issues:
        if b not in common:
            mine[b] = {"error": "it failed on another rank"}
    return [b for b in issues if b in common]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _time_gpu(ctx: BenchContext, issue: Issue, iters: int, repeats: int) -> list[float]:
    """Per-iteration microseconds, one value per repeat (CUDA events on the current stream)."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(repeats):
        ctx.barrier()
        issue()  # untimed: waits for the slowest peer so the timed iterations start aligned
        start.record()
        for _ in range(iters):
            issue()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / iters)
    return out


def _bw_rows(
    ctx: BenchContext,
    part: str,
    size: int,
    per_rank: list[dict[str, Any]],
    binding_names: list[str],
    bus_factor: float,
    notes: dict[str, str],
) -> list[dict]:
    rows = []
    for b in binding_names:
        res = [pr[b] for pr in per_rank]
        if any("error" in r for r in res):
            continue
        t = max(r["median"] for r in res)
        algbw = size / t / 1e3 if t > 0 else float("nan")  # bytes/µs -> GB/s (1e9 B/s)
        rows.append(
            {
                "part": part,
                "binding": b,
                "world_size": ctx.world_size,
                "size_bytes": size,
                "time_us": round(t, 3),
                "time_us_min": round(min(r["min"] for r in res), 3),
                "time_us_max": round(max(r["max"] for r in res), 3),
                "algbw_gbps": sig(algbw),
                "busbw_gbps": sig(algbw * bus_factor),
                "check": "ok" if all(r["check"] for r in res) else "FAIL",
                "iters": int(ctx.args.iters),
                "repeats": int(ctx.args.repeats),
                "note": (ONE_GPU_NOTE + "; " if ctx.world_size == 1 else "") + notes.get(b, ""),
            }
        )
    return rows


def _run_bw(ctx: BenchContext, part: str, extra: list[str]) -> list[dict]:
    """One part of the bandwidth table: every size in turn (:func:`_bw_size`) on a side
    stream, then a row per binding disabled on the way."""
    import torch

    _need_gpu(ctx, part)
    names = _bw_bindings(ctx, part, extra)
    sizes = _bw_sizes(ctx.args, part, ctx.world_size)
    cap = max(sizes)
    dead: dict[str, str] = {}
    rows: list[dict] = []
    notes = _bw_notes(part)
    stream = torch.cuda.Stream(ctx.device)
    with torch.cuda.stream(stream):
        send = torch.empty(cap, dtype=torch.uint8, device=ctx.device)
        recv = torch.empty(cap, dtype=torch.uint8, device=ctx.device)
        for size in sizes:
            rows += _bw_size(ctx, part, size, names, (send, recv, stream), dead, notes)
        del send, recv
    torch.cuda.synchronize(ctx.device)
    torch.cuda.empty_cache()  # the blocks belong to this part's stream; later parts can't reuse them
    for b, why in dead.items():
        rows.append({"part": part, "binding": b, "world_size": ctx.world_size, "error": why})
    return rows


def _bw_bindings(ctx: BenchContext, part: str, extra: list[str]) -> list[str]:
    """The bindings the part runs (the others logged as left out); none: PartSkipped."""
    names, left_out = _selected(ctx, BW_BINDINGS + extra)
    if left_out:
        ctx.log(f"{part}: left out: " + "; ".join(f"{k} ({v})" for k, v in left_out.items()))
    if not names:
        raise PartSkipped(f"{part}: no binding available ({left_out})")
    return names


def _bw_sizes(a: Any, part: str, n: int) -> list[int]:
    """The sizes of the part; alltoall's rounded down to a multiple of ``n`` (at least ``n``)."""
    sizes = size_series(int(a.min_bytes), int(a.max_bytes), int(getattr(a, "step_factor", 4)))
    if part == "alltoall":
        sizes = sorted({(s // n) * n for s in sizes if s >= n})
    return sizes


def _bw_notes(part: str) -> dict[str, str]:
    """The ``note`` of each binding's rows."""
    return {
        "torch": "batch_isend_irecv of P2POps"
        + ("; self chunk by copy_" if part == "alltoall" else ""),
        "torch.all_to_all_single": "dist.all_to_all_single",
        "eplb_pynccl": "torch tensors, default stream",
        "cupy": "raw pointers, groupStart/groupEnd",
        "nccl4py": "torch tensors, group_start/group_end",
    }


def _bw_size(
    ctx: BenchContext,
    part: str,
    size: int,
    names: list[str],
    bufs: tuple[Any, Any, Any],
    dead: dict[str, str],
    notes: dict[str, str],
) -> list[dict]:
    """One size: every binding set up, warmed and checked, then timed, interleaved; its rows.
    ``bufs``: (send, recv, stream). A binding that fails on a rank goes into ``dead``."""
    t0 = time.perf_counter()
    ops, expect = _bw_ops(ctx, part, size, bufs[0], bufs[1])
    mine: dict[str, Any] = {}
    issues, checks = _bw_set_up_all(ctx, size, names, ops, expect, bufs, dead, mine)
    # then the repeats interleaved (repeat j times every binding once): host drift
    # hits all bindings alike; only bindings every rank set up, so barriers match
    _bw_timed(ctx, issues, checks, mine)
    del issues
    per_rank = ctx.allgather(mine)
    for b in names:
        errs = [pr[b]["error"] for pr in per_rank if "error" in pr[b]]
        if errs and b not in dead:
            dead[b] = errs[0]
            ctx.log(f"{part}: {b} disabled: {errs[0]}")
    bus = 1.0 if part == "sendrecv" else (ctx.world_size - 1) / ctx.world_size
    new = _bw_rows(ctx, part, size, per_rank, names, bus, notes)
    ctx.log(
        f"{part} {size:>11d} B ({time.perf_counter() - t0:5.1f} s): "
        + "  ".join(
            f"{r['binding']} {r['time_us']:.1f}us {r['busbw_gbps']:.1f}GB/s{'' if r['check'] == 'ok' else ' FAIL'}"
            for r in new
        )
    )
    return new


def _bw_ops(
    ctx: BenchContext, part: str, size: int, send: Any, recv: Any
) -> tuple[list[Op], list[tuple[Any, int]]]:
    """The size's ops (its send chunks filled with their patterns) and the (received view,
    byte it must hold) pairs of the check: the ring for sendrecv, every rank for alltoall."""
    n, me = ctx.world_size, ctx.rank
    if part == "sendrecv":
        nxt, prv = (me + 1) % n, (me - 1) % n
        s_v, r_v = send[:size], recv[:size]
        s_v.fill_(_pattern(me, nxt))
        ops: list[Op] = [(True, s_v, nxt), (False, r_v, prv)]
        expect = [(r_v, _pattern(prv, me))]
    else:
        c = size // n
        ops, expect = [], []
        for j in range(n):
            send[j * c : (j + 1) * c].fill_(_pattern(me, j))
            ops.append((True, send[j * c : (j + 1) * c], j))
        for i in range(n):
            ops.append((False, recv[i * c : (i + 1) * c], i))
            expect.append((recv[i * c : (i + 1) * c], _pattern(i, me)))
    return ops, expect


def _bw_set_up_all(
    ctx: BenchContext,
    size: int,
    names: list[str],
    ops: list[Op],
    expect: list[tuple[Any, int]],
    bufs: tuple[Any, Any, Any],
    dead: dict[str, str],
    mine: dict[str, Any],
) -> tuple[dict[str, Issue], dict[str, bool]]:
    """(issue, check) of every binding not in ``dead``, set up, warmed and checked; a binding
    dead or failing here gets its error in ``mine``."""
    issues: dict[str, Issue] = {}
    checks: dict[str, bool] = {}
    for b in names:  # every binding set up, warmed and checked first
        if b in dead:
            mine[b] = {"error": dead[b]}
            continue
        try:
            issue, checks[b] = _bw_set_up(ctx, b, size, ops, expect, bufs)
            issues[b] = issue
        except Exception as e:  # noqa: BLE001 - disabled for the rest of the part
            mine[b] = {"error": f"{type(e).__name__}: {e}"}
    return issues, checks


def _bw_set_up(
    ctx: BenchContext,
    b: str,
    size: int,
    ops: list[Op],
    expect: list[tuple[Any, int]],
    bufs: tuple[Any, Any, Any],
) -> tuple[Issue, bool]:
    """Binding ``b``'s issue for the size, after ``--warmup`` untimed iterations, and whether
    they received the expected bytes."""
    send, recv, stream = bufs
    if b == "torch.all_to_all_single":
        issue = _all_to_all_single(send[:size], recv[:size])
    else:
        issue = P2P_BINDINGS[b][1](ctx, ops)
    recv[:size].zero_()
    for _ in range(int(ctx.args.warmup)):
        issue()
    stream.synchronize()
    return issue, all(bool((v == x).all()) for v, x in expect)


def _all_to_all_single(s_all: Any, r_all: Any) -> Issue:
    import torch.distributed as dist

    def issue() -> None:
        dist.all_to_all_single(r_all, s_all)

    return issue


def _bw_timed(
    ctx: BenchContext, issues: dict[str, Issue], checks: dict[str, bool], mine: dict[str, Any]
) -> None:
    """``--repeats`` rounds, each timing every binding every rank set up once (in
    ``issues``' order); their figures (or the error that lost them) into ``mine``."""
    a = ctx.args
    times: dict[str, list] = {b: [] for b in _set_up_everywhere(ctx, issues, mine)}
    try:
        for _ in range(int(a.repeats)):
            for b in times:
                times[b] += _time_gpu(ctx, issues[b], int(a.iters), 1)
        for b in times:
            mine[b] = {**summarize(times[b]), "check": checks[b]}
    except Exception as e:  # noqa: BLE001 - the size's timings are lost
        for b in times:
            mine[b] = {"error": f"{type(e).__name__}: {e}"}


def run_sendrecv(ctx: BenchContext) -> list[dict]:
    """Ring: rank r sends size bytes to r+1 and receives from r-1. algbw = busbw = size/time."""
    return _run_bw(ctx, "sendrecv", [])


def run_alltoall(ctx: BenchContext) -> list[dict]:
    """size/n bytes to every rank incl. self; algbw = size/time, busbw = algbw*(n-1)/n."""
    return _run_bw(ctx, "alltoall", ["torch.all_to_all_single"])


# --------------------------------------------------------------------------------------------
# Host overhead per op
# --------------------------------------------------------------------------------------------


def run_overhead(ctx: BenchContext) -> list[dict]:
    """K sends to r+1 and K recvs from r-1, op_bytes each, in one group.

    host_us_per_op: (group exit returned - group start) / 2K, median over repeats, slowest rank.
    e2e_us_per_op:  (stream synchronised - group start) / 2K, median over repeats; the row takes
                    the fastest rank, the one that waited least for its peers at the start.
    """
    import torch

    _need_gpu(ctx, "overhead")
    a = ctx.args
    k, nb = int(a.overhead_ops), int(a.overhead_bytes)
    reps, warm = int(a.overhead_repeats), max(1, int(a.warmup))
    names, left_out = _selected(ctx, OVERHEAD_BINDINGS)
    if left_out:
        ctx.log("overhead: left out: " + "; ".join(f"{b} ({v})" for b, v in left_out.items()))
    if not names:
        raise PartSkipped(f"overhead: no binding available ({left_out})")
    mine = _overhead_samples(ctx, names, k, nb, reps, warm)
    torch.cuda.synchronize(ctx.device)
    torch.cuda.empty_cache()
    per_rank = ctx.allgather(mine)
    rows = _overhead_rows(per_rank, names, ctx.world_size, k, nb, reps)
    _ratios_vs_cupy(rows, per_rank)
    return rows


def _overhead_samples(
    ctx: BenchContext, names: list[str], k: int, nb: int, reps: int, warm: int
) -> dict[str, Any]:
    """This rank's figures per binding (or its error): every binding set up, warmed and
    checked first, then the repeats interleaved (repeat j times every binding once)."""
    import torch

    n, me = ctx.world_size, ctx.rank
    nxt, prv = (me + 1) % n, (me - 1) % n
    stream = torch.cuda.Stream(ctx.device)
    mine: dict[str, Any] = {}
    with torch.cuda.stream(stream):
        send = torch.full((k * nb,), _pattern(me, nxt), dtype=torch.uint8, device=ctx.device)
        recv = torch.zeros(k * nb, dtype=torch.uint8, device=ctx.device)
        ops: list[Op] = [(True, send[i * nb : (i + 1) * nb], nxt) for i in range(k)]
        ops += [(False, recv[i * nb : (i + 1) * nb], prv) for i in range(k)]
        issues: dict[str, Issue] = {}
        checks: dict[str, bool] = {}
        for b in names:  # every binding set up, warmed and checked first
            try:
                issue = P2P_BINDINGS[b][1](ctx, ops)
                recv.zero_()
                for _ in range(warm):
                    issue()
                stream.synchronize()
                checks[b] = bool((recv == _pattern(prv, me)).all())
                issues[b] = issue
            except Exception as e:  # noqa: BLE001
                mine[b] = {"error": f"{type(e).__name__}: {e}"}
                ctx.log(f"overhead: {b} failed on rank {me}: {mine[b]['error']}", all_ranks=True)
        # Then the repeats interleaved: repeat j times every binding once, so a drift of the
        # host's speed (large on shared machines) hits all bindings alike, and each repeat
        # gives a ratio to cupy measured at the same moment.
        # only the bindings every rank could set up (so the barriers below match)
        issues = {b: issues[b] for b in _set_up_everywhere(ctx, issues, mine)}
        host: dict[str, list] = {b: [] for b in issues}
        e2e: dict[str, list] = {b: [] for b in issues}
        for _ in range(reps):
            for b, issue in issues.items():
                ctx.barrier()
                t0 = time.perf_counter()
                issue()
                t1 = time.perf_counter()
                stream.synchronize()
                t2 = time.perf_counter()
                host[b].append((t1 - t0) * 1e6 / (2 * k))
                e2e[b].append((t2 - t0) * 1e6 / (2 * k))
        for b in issues:
            mine[b] = {
                "host": summarize(host[b]),
                "e2e": summarize(e2e[b]),
                "check": checks[b],
                "host_samples": host[b],
            }
        del send, recv, ops, issues
    return mine


def _overhead_rows(
    per_rank: list[dict], names: list[str], n: int, k: int, nb: int, reps: int
) -> list[dict]:
    """One row per binding from every rank's figures: host time of the slowest rank, end to
    end of the fastest; an error row where a rank has an error."""
    rows = []
    for b in names:
        res = [pr[b] for pr in per_rank]
        if any("error" in r for r in res):
            rows.append(
                {
                    "part": "overhead",
                    "binding": b,
                    "world_size": n,
                    "error": next(r["error"] for r in res if "error" in r),
                }
            )
            continue
        rows.append(
            {
                "part": "overhead",
                "binding": b,
                "world_size": n,
                "ops_per_rank": 2 * k,
                "op_bytes": nb,
                "host_us_per_op": round(max(r["host"]["median"] for r in res), 3),
                "host_us_per_op_p90": round(max(r["host"]["p90"] for r in res), 3),
                "e2e_us_per_op": round(min(r["e2e"]["median"] for r in res), 3),
                "check": "ok" if all(r["check"] for r in res) else "FAIL",
                "repeats": reps,
                **({"note": ONE_GPU_NOTE} if n == 1 else {}),
            }
        )
    return rows


def _ratios_vs_cupy(rows: list[dict], per_rank: list[dict]) -> None:
    """Where cupy has a row: each measured row's host time over cupy's, as the ratio of the
    medians and as the median of the per-repeat ratios (in place)."""
    cupy_host = next(
        (r["host_us_per_op"] for r in rows if r["binding"] == "cupy" and "host_us_per_op" in r),
        None,
    )
    for r in rows:
        if cupy_host and "host_us_per_op" in r:
            r["host_ratio_vs_cupy"] = round(r["host_us_per_op"] / cupy_host, 3)
            # the median of the per-repeat ratios (each repeat times both back to back), on
            # the slowest rank: less sensitive to the host's drift than the ratio of medians
            paired = [
                median(
                    [
                        x / y
                        for x, y in zip(
                            pr[r["binding"]]["host_samples"], pr["cupy"]["host_samples"]
                        )
                    ]
                )
                for pr in per_rank
            ]
            r["host_ratio_vs_cupy_paired"] = round(max(paired), 3)


# --------------------------------------------------------------------------------------------
# Harness self-test (hidden part): exercises the store collectives, the process group and timing
# --------------------------------------------------------------------------------------------


def run_selftest(ctx: BenchContext) -> list[dict]:
    import torch
    import torch.distributed as dist

    n, me = ctx.world_size, ctx.rank
    got = ctx.allgather(me * 10)
    assert got == [r * 10 for r in range(n)], got
    assert ctx.broadcast("hello" if me == 0 else None) == "hello"
    bar = HostTimer()
    for _ in range(20):
        with bar:
            ctx.barrier()
    x = torch.ones(4, device=ctx.device) * (me + 1)
    dist.all_reduce(x)
    assert float(x[0]) == n * (n + 1) / 2, x
    rows = [
        {
            "part": "selftest",
            "what": "store barrier",
            "world_size": n,
            "time_us": round(median(bar.samples) * 1e6, 1),
        }
    ]
    if not ctx.is_gpu and n > 1:
        nxt, prv = (me + 1) % n, (me - 1) % n
        for size in (1 << 10, 1 << 20):
            s = torch.full((size // 4,), float(me), dtype=torch.float32)
            r = torch.empty_like(s)
            t = HostTimer()
            for _ in range(10):
                ctx.barrier()
                with t:
                    reqs = [dist.isend(s, nxt), dist.irecv(r, prv)]
                    for q in reqs:
                        q.wait()
            assert float(r[0]) == prv
            us = max(ctx.allgather(median(t.samples) * 1e6))
            rows.append(
                {
                    "part": "selftest",
                    "what": "gloo ring isend/irecv",
                    "world_size": n,
                    "size_bytes": size,
                    "time_us": round(us, 1),
                    "algbw_gbps": round(size / us / 1e3, 3),
                }
            )
    return rows
