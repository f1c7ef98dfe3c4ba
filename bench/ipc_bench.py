"""Part ``ipc``: the copy-engine transport (IpcTransport), on however many GPUs there are.

It starts its own ``--ipc-procs`` processes (default 4), spread over the visible GPUs (several
share a GPU when there are fewer GPUs than processes: CUDA IPC works between processes of one
device), joined by a TCPStore only (no NCCL). Public API only. Rows:

* ``probe``: rank 0 receives rows from rank 1 through ``ExpertShuffler`` over IpcTransport
  (one layer: 24 DeepSeek-V3 w13 rows of 29.4 MB; the same as whole 42 MiB experts of 4
  tensors), every other rank idle; time, GB/s and the GPU time of the pulls (profile). With
  one GPU these are copies inside the GPU by its copy engines, not a link.
* ``host``: host time per round of DeepSeek-V3 EP``n`` plans (288 slots, the 4 tensors of an
  expert, 4 layers), with rows scaled down to 4 KiB per tensor (the same ops, little data):
  launch, poll (the pulls are issued there) and apply per round, slowest rank.
* ``eplb``: a whole rearrangement of Qwen3-30B-A3B bf16 experts (real sizes), verified.
"""

from __future__ import annotations

import os
import queue
import time
import traceback

import numpy as np

from bench.harness import PartSkipped, free_port

DSV3 = [
    ((4096, 7168), "float8_e4m3fn"),
    ((7168, 2048), "float8_e4m3fn"),
    ((32, 56), "float32"),
    ((56, 16), "float32"),
]
QWEN3 = [((1536, 2048), "bfloat16"), ((2048, 768), "bfloat16")]


def _sync_time(torch, fn, reps):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def _per_round(st) -> tuple:
    """Host seconds per round (launch, poll, apply), rounds, set-up seconds."""
    r = st.rounds
    return (st.launch_seconds / r, st.poll_seconds / r, st.apply_seconds / r, r, st.setup_seconds)


class _Ranks:
    """One rank's view of the run: its store, barrier, tensors and transports."""

    def __init__(self, rank: int, n: int, port: int, device: int, opts: dict) -> None:
        import datetime

        import torch
        from torch.distributed import TCPStore

        import eplb_pynccl as ep

        self.torch, self.ep, self.td = torch, ep, datetime.timedelta
        self.rank, self.n, self.device, self.opts = rank, n, device, opts
        torch.cuda.set_device(device)
        self.dev = torch.device("cuda", device)
        self.reps = int(opts["reps"])
        self.store = TCPStore(
            "127.0.0.1", port, n, rank == 0, datetime.timedelta(seconds=120), wait_for_workers=False
        )

    def barrier(self, tag: str) -> None:
        key = f"bar/{tag}"
        if self.store.add(key, 1) == self.n:
            self.store.set(key + "/go", b"1")
        self.store.wait([key + "/go"], self.td(seconds=600))

    def weights(self, spec, P: int, layers: int) -> list:
        torch = self.torch
        return [
            [
                torch.empty((P, *shape), dtype=getattr(torch, dt), device=self.dev)
                for shape, dt in spec
            ]
            for _ in range(layers)
        ]

    def shuffler(self, tag, spec, P, layers, pull_graphs=True, signals="auto", **kw):
        t = self.ep.IpcTransport(
            self.rank,
            self.n,
            self.store,
            device=self.device,
            key=f"ipc/{tag}",
            timeout=120,
            pull_graphs=pull_graphs,
            signals=signals,
        )
        w = self.weights(spec, P, layers)
        return t, w, self.ep.ExpertShuffler(t, w, **kw)

    def repeat(self, tag, sh, w, old, new, P, rank=None, barrier=True):
        """``reps`` timed rearrangements after one warm-up, each from freshly filled old
        rows: (stats of the timed ones, wall seconds of each, every one byte-exact)."""
        from bench.common import check, fill

        torch = self.torch
        rank = self.rank if rank is None else rank
        stats, times, ok = [], [], True
        for k in range(self.reps + 1):
            fill(torch, w, old, rank, P)
            torch.cuda.synchronize()
            if barrier:
                self.barrier(f"{tag}/{k}")
            t0 = time.perf_counter()
            st = sh.rearrange(old, new)
            torch.cuda.synchronize()
            if k:
                times.append(time.perf_counter() - t0)
                stats.append(st)
            ok = ok and check(torch, w, new, rank, P)
        return stats, times, ok


def _probe_rows(r: _Ranks) -> list[dict]:
    """Rank 0 receives 24 rows from rank 1 (and rank 1 rank 0's); a device copy beside."""
    rows, n = [], r.n
    for name, spec in (
        ("24 w13 rows (29.4 MB each)", DSV3[:1]),
        ("24 experts (4 tensors, 42 MiB)", DSV3),
    ):
        P = 24
        old = np.arange(n * P, dtype=np.int64)[None, :]
        new = old.copy()
        new[0, :P] = old[0, P : 2 * P]  # rank 0's rows become rank 1's experts
        new[0, P : 2 * P] = old[0, :P]
        t, w, sh = r.shuffler(f"probe{len(spec)}", spec, P, 1, profile=True)
        stats, times, ok = r.repeat(f"probe{len(spec)}", sh, w, old, new, P)
        nbytes = P * sum(x[0].nbytes for x in w[0])
        if r.rank in (0, 1):
            med = float(np.median(times))
            gpu = float(np.median([st.gpu_ms.get("exchange", 0.0) for st in stats]))
            rows.append(
                {
                    "case": "probe",
                    "what": name,
                    "procs": n,
                    "rank": r.rank,
                    "bytes": nbytes,
                    "time_ms": round(med * 1e3, 3),
                    "gbps": round(nbytes / med / 1e9, 1),
                    "pull_gpu_ms": round(gpu, 3),
                    "pull_gbps": round(nbytes / (gpu * 1e-3) / 1e9, 1) if gpu else None,
                    "check": "ok" if ok else "FAIL",
                }
            )
        t.close()
        del w, sh
        r.torch.cuda.empty_cache()
    if r.rank == 0:  # a device copy of the same bytes on this GPU, for reference
        a = r.torch.empty(24 * 4096 * 7168, dtype=r.torch.uint8, device=r.dev)
        b = r.torch.empty_like(a)
        med, _ = _sync_time(r.torch, lambda: b.copy_(a), r.reps)
        rows.append(
            {
                "case": "probe",
                "what": "torch copy_ on one GPU (reference)",
                "procs": 1,
                "rank": 0,
                "bytes": a.numel(),
                "time_ms": round(med * 1e3, 3),
                "gbps": round(a.numel() / med / 1e9, 1),
            }
        )
    return rows


_SMALL = [((1024,), "float32")] * 4  # DeepSeek-V3 plans with rows scaled down to 4 KiB


def _host_row(case, what, procs, stats, count_field, count, ok) -> dict:
    """Per-round host figures (medians over the timed rearrangements)."""
    a = np.median(np.asarray([_per_round(st) for st in stats]), axis=0)
    return {
        "case": case,
        "what": what,
        "procs": procs,
        "launch_ms_per_round": round(a[0] * 1e3, 3),
        "poll_ms_per_round": round(a[1] * 1e3, 3),
        "apply_ms_per_round": round(a[2] * 1e3, 3),
        "rounds": int(a[3]),
        count_field: count,
        "host_calls_per_round": float(np.mean(stats[-1].round_host_calls)),
        "setup_ms": round(a[4] * 1e3, 3),
        "check": "ok" if ok else "FAIL",
    }


def _host_rows(r: _Ranks) -> list[dict]:
    """Host time per round: DeepSeek-V3 EPn plans over IPC (pulls as graphs and as batches),
    and the same plans' local moves at EP1 over NCCL (a 1-rank communicator, rank 0)."""
    from bench.common import make_maps

    L, n, rows = 4, r.n, []
    num_physical = 288 if 288 % n == 0 else 288 + (-288) % n
    P = num_physical // n
    old, new = make_maps(r.opts["seed"], L, 256, num_physical, n)
    # pulls as graphs or batches; ranks ordered on the GPU (stream signals) or by host polls
    for graphs, signals in ((True, "auto"), (True, "host"), (False, "host")):
        tag = f"host{graphs}{signals}"
        t, w, sh = r.shuffler(
            tag, _SMALL, P, L, pull_graphs=graphs, signals=signals, pack_threshold=0
        )
        stats, _, ok = r.repeat(tag, sh, w, old, new, P)
        what = (
            f"dsv3 ep{n} {L}L plans, 4 KiB rows, pulls: {t.pull_method}, "
            f"signals: {t.signals_method}"
        )
        row = _host_row("host", what, n, stats, "messages", stats[-1].messages, ok)
        rows.append({**row, "rank": r.rank})
        t.close()
        del w, sh
        r.torch.cuda.empty_cache()
    if r.rank == 0:
        ep = r.ep
        comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=r.device)
        w = r.weights(_SMALL, 288, L)
        sh1 = ep.ExpertShuffler(ep.NcclTransport(comm), w, pack_threshold=0)
        o1, n1 = make_maps(r.opts["seed"], L, 256, 288, 1)
        stats, _, ok = r.repeat("host-ep1", sh1, w, o1, n1, 288, rank=0, barrier=False)
        what = f"dsv3 ep1 {L}L local moves (NCCL, 1 rank), 4 KiB rows"
        rows.append(
            {
                **_host_row("host-ep1", what, 1, stats, "local_copies", stats[-1].local_copies, ok),
                "rank": 0,
            }
        )
        del w, sh1
        comm.close()
        r.torch.cuda.empty_cache()
    return rows


def _eplb_rows(r: _Ranks) -> list[dict]:
    """A whole rearrangement: Qwen3-30B-A3B experts, real sizes."""
    from bench.common import make_maps

    L, n = 8, r.n
    num_physical = -(-int(128 * 1.125) // n) * n
    P = num_physical // n
    t, w, sh = r.shuffler("qwen3", QWEN3, P, L)
    old, new = make_maps(r.opts["seed"], L, 128, num_physical, n)
    stats, times, ok = r.repeat("qwen", sh, w, old, new, P)
    st, med = stats[-1], float(np.median(times))
    t.close()
    return [
        {
            "case": "eplb",
            "what": f"qwen3 bf16 ep{n} {L}L",
            "procs": n,
            "rank": r.rank,
            "time_ms": round(med * 1e3, 3),
            "bytes_received": st.bytes_received,
            "gbps": round(st.bytes_received / med / 1e9, 2),
            "rounds": st.rounds,
            "check": "ok" if ok else "FAIL",
        }
    ]


def _worker(rank, n, port, device, opts, q):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        from bench import hostfree

        r = _Ranks(rank, n, port, device, opts)
        rows = _probe_rows(r) + _host_rows(r)
        if rank == 0:  # host-free rounds: row copies and a local permutation (one process)
            rows += hostfree.copies_rows(r.torch, r.dev, device, r.reps)
            rows += hostfree.local_permutation_rows(r.torch, r.ep, r.dev, device, r.reps)
        r.barrier("hostfree")
        rows += hostfree.step_rows(r.torch, r.ep, r.dev, rank, n, r.shuffler, r.barrier, r.reps)
        rows += _eplb_rows(r)
        q.put((rank, "ok", rows))
    except BaseException:
        q.put((rank, "err", traceback.format_exc()))


def run_ipc(args) -> list[dict]:
    try:
        import torch
    except ImportError as e:
        raise PartSkipped(f"needs torch ({e})") from None
    if (
        getattr(args, "cpu", False)
        or getattr(args, "gpus", None) == 0
        or not torch.cuda.is_available()
    ):
        raise PartSkipped("needs a GPU (IpcTransport: CUDA IPC)")
    import multiprocessing as mp

    n = int(getattr(args, "ipc_procs", 4))
    if n < 2:
        raise PartSkipped("--ipc-procs must be >= 2")
    ngpu = torch.cuda.device_count()
    devices = [r % ngpu for r in range(n)]
    out = _run_workers(mp, args, n, devices)
    rows = [r for rank in sorted(out) for r in out[rank]]
    return _merged_rows(rows, n, ngpu)


def _run_workers(mp, args, n: int, devices: list[int]) -> dict:
    """rank -> rows of the ``n`` spawned :func:`_worker` processes; a rank's error (the first
    to arrive) or a timeout (``--timeout``) raises. Every process is joined (killed after
    10 s) before."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    opts = {
        "reps": int(getattr(args, "eplb_repeats", 5) or 5),
        "seed": int(getattr(args, "seed", 0)),
    }
    procs = [ctx.Process(target=_worker, args=(r, n, port, devices[r], opts, q)) for r in range(n)]
    for p in procs:
        p.start()
    out, errs = {}, []
    deadline = time.monotonic() + float(getattr(args, "timeout", 1800.0))
    try:
        while len(out) + len(errs) < n:
            try:
                rank, status, val = q.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"ipc: ranks {sorted(set(range(n)) - set(out))} did not finish"
                ) from None
            if status == "ok":
                out[rank] = val
            else:
                errs.append(f"rank {rank}:\n{val}")
                break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errs:
        raise RuntimeError("ipc part failed: " + errs[0])
    return out


def _merged_rows(rows: list[dict], n: int, ngpu: int) -> list[dict]:
    """Every rank's rows by case and ``what`` (cases in a fixed order): one row per group of
    the per-rank cases (each float column the slowest rank's, ``check`` the common one or
    FAIL, no ``rank``), the others as they are; each with a ``note`` on the processes."""
    note = f"{n} processes on {ngpu} GPU(s)" + (
        " (copies inside one GPU, no link)" if ngpu == 1 else ""
    )
    merged = []
    keys = [
        (c, w)
        for c in ("probe", "host", "host-ep1", "copies", "local-permutation", "step", "eplb")
        for w in dict.fromkeys(r["what"] for r in rows if r["case"] == c)
    ]
    for case, what in keys:
        group = [r for r in rows if r["case"] == case and r["what"] == what]
        if case in ("host", "host-ep1", "eplb", "step"):
            # the slowest rank per column
            first = dict(group[0])
            for k, v in first.items():
                if isinstance(v, float):
                    first[k] = max(r[k] for r in group)
            checks = {r["check"] for r in group}
            first["check"] = checks.pop() if len(checks) == 1 else "FAIL"
            first.pop("rank", None)
            merged.append({**first, "note": note})
        else:
            merged += [{**r, "note": note} for r in group]
    return merged
