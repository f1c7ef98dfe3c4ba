"""Rows of the ``ipc`` part about host-free rounds (issue: one launch per phase).

* ``copies``: independent row copies inside one GPU (1,148 × 4 KiB, 1,148 × 56 KiB,
  256 × 1 MiB, 24 × 29.4 MB): host time to enqueue and GPU time, for one
  ``cuMemcpyBatchAsync`` (copy engines preferred and not), torch ``index_select`` +
  ``index_copy_`` over int64 words, and the row-copy kernel at several CTA bounds.
* ``local-permutation``: ``ExpertShuffler.rearrange`` of DeepSeek-V3 fp8 experts at EP1 (2
  layers × 72 slots, 142 rows moved, 44 MB each) over a 1-rank communicator, per copy method
  and CTA bound, beside torch ``index_select`` + copy back and the HBM copy floor (the same
  bytes copied once by torch at the device's copy rate); ``floor_fraction`` = floor / time.
* ``step``: async ``step()`` between forward steps: every rank runs matmuls on its compute
  stream and calls ``step()`` after every 2 of them while a rearrangement of 8 layers of fp8
  rows runs over IpcTransport; host ms per call p50 / p99 / max, and ``step(wait=True)``.
"""

from __future__ import annotations

import time

import numpy as np

DSV3 = [
    ((4096, 7168), "float8_e4m3fn"),
    ((7168, 2048), "float8_e4m3fn"),
    ((32, 56), "float32"),
    ((56, 16), "float32"),
]


def _ev(torch):
    return torch.cuda.Event(enable_timing=True)


def _timed(torch, stream, fn, reps):
    """(median host ms to enqueue, median GPU ms) of ``fn()`` on ``stream``."""
    host, gpu = [], []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        a, b = _ev(torch), _ev(torch)
        a.record(stream)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        b.record(stream)
        b.synchronize()
        host.append((t1 - t0) * 1e3)
        gpu.append(a.elapsed_time(b))
    return float(np.median(host[1:])), float(np.median(gpu[1:]))


def copies_rows(torch, dev, device: int, reps: int) -> list[dict]:
    from eplb_pynccl._nccl import cuda as cu
    from eplb_pynccl._nccl import rowcopy

    drv = cu.driver()
    k = rowcopy.kernel(device)
    s = torch.cuda.Stream(dev)
    h = s.cuda_stream
    rows = []
    for n, rb in ((1148, 4096), (1148, 56 << 10), (256, 1 << 20), (24, 4096 * 7168)):
        case = _CopyCase(torch, dev, (s, h), n, rb, reps)
        rows += case.batch_rows(cu, drv)
        rows += case.torch_rows()
        rows += case.kernel_rows(k)
        del case
    torch.cuda.empty_cache()
    return rows


class _CopyCase:
    """One size of the ``copies`` rows: ``n`` rows of ``rb`` bytes of ``src`` copied, in a
    seeded permutation, into ``dst`` on ``stream`` (``streams``: the stream and its handle)
    by each method; ``want`` is what ``dst`` must hold after each."""

    def __init__(self, torch, dev, streams, n: int, rb: int, reps: int):
        self.torch, self.dev, self.reps = torch, dev, reps
        self.s, self.h = streams
        self.n, self.rb = n, rb
        self.src = torch.randint(0, 255, (n, rb), dtype=torch.uint8, device=dev)
        self.dst = torch.zeros_like(self.src)
        self.perm = np.random.default_rng(0).permutation(n)
        self.want = self.src[torch.from_numpy(self.perm).to(dev)]
        self.what = f"{n} x {rb / 1024:.0f} KiB"
        self.nbytes = n * rb

    def row(self, method, host_ms, gpu_ms, ok) -> dict:
        return {
            "case": "copies",
            "what": self.what,
            "method": method,
            "host_ms": host_ms,
            "gpu_ms": gpu_ms,
            "gbps": self.nbytes / (gpu_ms * 1e-3) / 1e9 if gpu_ms else None,
            "check": "ok" if ok else "FAIL",
        }

    def batch_rows(self, cu, drv) -> list[dict]:
        """One ``cuMemcpyBatchAsync`` of every row, without and with the copy-engine hint."""
        torch, n, rb, h = self.torch, self.n, self.rb, self.h
        sp = self.src.data_ptr() + self.perm.astype(np.uint64) * rb
        dp = self.dst.data_ptr() + np.arange(n, dtype=np.uint64) * rb
        arrays = cu.copy_arrays(list(zip(dp.tolist(), sp.tolist(), [rb] * n)))
        rows = []
        for ce in (False, True):
            self.dst.zero_()
            hm, gm = _timed(
                torch, self.s, lambda ce=ce: drv.memcpy_batch(*arrays, h, prefer_ce=ce), self.reps
            )
            torch.cuda.synchronize()
            ok = torch.equal(self.dst, self.want)
            rows.append(self.row("cuMemcpyBatchAsync" + (" (CE hint)" if ce else ""), hm, gm, ok))
        return rows

    def torch_rows(self) -> list[dict]:
        """torch ``index_select`` into a temporary, ``index_copy_`` into ``dst``, int64 words."""
        torch, dev, s = self.torch, self.dev, self.s
        ix = torch.from_numpy(self.perm).to(dev)
        iw = torch.arange(self.n, device=dev)
        sw, dw = self.src.view(torch.int64), self.dst.view(torch.int64)
        tmp = torch.empty_like(sw)

        def torch_copy():
            with torch.cuda.stream(s):
                torch.index_select(sw, 0, ix, out=tmp)
                dw.index_copy_(0, iw, tmp)

        self.dst.zero_()
        hm, gm = _timed(torch, s, torch_copy, self.reps)
        torch.cuda.synchronize()
        return [
            self.row("torch index_select + index_copy_", hm, gm, torch.equal(self.dst, self.want))
        ]

    def kernel_rows(self, k) -> list[dict]:
        """The row-copy kernel: pieces of 1 MiB (the executor's) at every CTA bound; 256 KiB
        at 132 CTAs (tail)."""
        from eplb_pynccl import copytables as ct

        torch, n, rb, perm, h = self.torch, self.n, self.rb, self.perm, self.h
        whole = ct.CopyTable(
            np.zeros(n, np.int64),
            perm.astype(np.int64) * rb,
            np.ones(n, np.int64),
            np.arange(n, dtype=np.int64) * rb,
            np.full(n, rb, np.int64),
        )
        bases = np.array([self.src.data_ptr(), self.dst.data_ptr()], dtype=np.int64)
        rows = []
        for chunk, ctas_list in ((ct.DEFAULT_CHUNK, (8, 16, 32, 64, 132)), (256 << 10, (132,))):
            t = ct.split(whole, chunk)
            host = ct.resolve(t, bases, 0)
            table = torch.from_numpy(host.view(np.int64).reshape(-1)).to(self.dev)
            for ctas in ctas_list:
                launch = k.prepare(table.data_ptr(), len(t), ctas, int(t.nbytes.max()))
                self.dst.zero_()
                hm, gm = _timed(torch, self.s, lambda launch=launch: launch.launch(h), self.reps)
                torch.cuda.synchronize()
                label = f"row-copy kernel, {ctas} CTAs"
                if chunk != ct.DEFAULT_CHUNK:
                    label += f", {chunk >> 10} KiB pieces"
                rows.append(self.row(label, hm, gm, torch.equal(self.dst, self.want)))
        return rows


def _torch_permutation_ms(torch, w, new, dev, reps: int) -> float:
    """torch: index_select of every tensor into a temporary, copied back; median ms."""
    L = len(w)
    perm = [torch.from_numpy(new[layer]).to(dev) for layer in range(L)]

    def torch_perm():
        for layer in range(L):
            for t in w[layer]:
                t.copy_(torch.index_select(t, 0, perm[layer]))

    ms = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch_perm()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ms[1:]))


def _shuffler_permutation(torch, ep, comm, w, old, new, dev, reps, method, ctas, waves) -> dict:
    """ExpertShuffler permuting ``w`` from ``old`` to ``new`` and back, ``reps`` times after a
    warm-up: its times, host figures and a check of every row after each forward permutation."""
    L = len(w)
    sh = ep.ExpertShuffler(
        ep.NcclTransport(comm), w, copy_method=method, copy_ctas=ctas, copy_waves=waves
    )
    cur = old
    ms, gpu, okall = [], [], True
    for k in range(reps + 1):
        nxt = new if k % 2 == 0 else old
        ref = [[t.clone() for t in lw] for lw in w]
        torch.cuda.synchronize()
        e0, e1 = _ev(torch), _ev(torch)
        e0.record()
        t0 = time.perf_counter()
        st = sh.rearrange(cur, nxt, verify=False)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
        e1.record()
        e1.synchronize()
        gpu.append(e0.elapsed_time(e1))
        src = new if k % 2 == 0 else None
        # check: row j of each tensor now holds old row (permutation) j
        if k % 2 == 0:
            for layer in range(L):
                p = torch.from_numpy(src[layer]).to(dev)
                okall &= all(  # bytes: random fp8/fp32 bytes hold NaNs
                    torch.equal(t.view(torch.uint8), r[p].view(torch.uint8))
                    for t, r in zip(w[layer], ref[layer])
                )
        del ref
        cur = nxt
    tm = float(np.median(ms[1:]))
    return {
        "method": f"ExpertShuffler {method}, {ctas} CTAs, {waves} waves",
        "time_ms": tm,
        "gpu_ms": float(np.median(gpu[1:])),
        "floor_fraction": None,  # set by the caller (its place in the row kept)
        "apply_host_ms": st.apply_seconds * 1e3,
        "launch_host_ms": st.launch_seconds * 1e3,
        "setup_ms": st.setup_seconds * 1e3,
        "planner_ms": st.planner_seconds * 1e3,
        "host_calls": sum(st.round_host_calls),
        "extra_bytes": st.peak_extra_bytes,
        "check": "ok" if okall else "FAIL",
    }


def local_permutation_rows(torch, ep, dev, device: int, reps: int) -> list[dict]:
    """EP1: a permutation of 2 layers × 72 DeepSeek-V3 experts (142 rows move)."""
    P, L = 72, 2
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=device)
    w = [
        [torch.empty((P, *shape), dtype=getattr(torch, dt), device=dev) for shape, dt in DSV3]
        for _ in range(L)
    ]
    for lw in w:
        for t in lw:
            t.view(torch.uint8).random_(0, 255)
    row_bytes = sum(t[0].nbytes for t in w[0])
    rng = np.random.default_rng(1)
    old = np.tile(np.arange(P, dtype=np.int64), (L, 1))
    # slot 0 keeps its expert, the other 71 of each layer are permuted: 142 rows move
    new = np.stack([np.concatenate([[0], 1 + rng.permutation(P - 1)]) for _ in range(L)])
    moved = int((new != old).sum())
    nbytes = moved * row_bytes
    rows = []
    # floor: the moved bytes copied once at this device's copy rate (a large torch copy)
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    _, gm = _timed(torch, torch.cuda.current_stream(dev), lambda: b.copy_(a), reps)
    floor_ms = 2 * gm
    a = b = None
    torch.cuda.empty_cache()
    base = {"case": "local-permutation", "what": f"dsv3 fp8 ep1 {L}L x {P}, {moved} rows moved"}
    rows.append({**base, "method": "HBM copy floor", "time_ms": floor_ms, "bytes": nbytes})
    tm = _torch_permutation_ms(torch, w, new, dev, reps)
    rows.append(
        {
            **base,
            "method": "torch index_select + copy",
            "time_ms": tm,
            "floor_fraction": floor_ms / tm,
        }
    )
    variants = [("kernel", 16, 8), ("kernel", 32, 8), ("kernel", 132, 8), ("kernel", 132, 4)]
    variants += [("kernel", 132, 16), ("copy_engine", 16, 8), ("copy_engine", 16, 16)]
    for method, ctas, waves in variants:
        row = _shuffler_permutation(torch, ep, comm, w, old, new, dev, reps, method, ctas, waves)
        rows.append({**base, **row, "floor_fraction": floor_ms / row["time_ms"]})
    comm.close()
    w = None
    torch.cuda.empty_cache()
    return rows


def step_rows(torch, ep, dev, rank, n, make_shuffler, barrier, reps) -> list[dict]:
    """Async step() host time while matmuls run (every rank)."""
    L, P = 8, 6
    spec = DSV3[:2]
    t, w, sh = make_shuffler("step", spec, P, L)
    rng = np.random.default_rng(7)
    old = np.tile(np.arange(n * P, dtype=np.int64), (L, 1))
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    comp = torch.cuda.Stream(dev)
    per_call, lock_calls = [], []
    for k in range(reps):
        new = np.stack([rng.permutation(n * P) for _ in range(L)])
        barrier(f"step/{k}")
        with torch.cuda.stream(comp):
            h = sh.rearrange_async(old, new, stream=comp)
            while not h.done:
                for _ in range(2):
                    a = torch.tanh(a @ a) * 0.5
                t0 = time.perf_counter()
                h.step()
                per_call.append((time.perf_counter() - t0) * 1e3)
            h.wait()
        torch.cuda.synchronize()
        old = new
        new = np.stack([rng.permutation(n * P) for _ in range(L)])
        barrier(f"stepw/{k}")
        with torch.cuda.stream(comp):
            h = sh.rearrange_async(old, new, stream=comp)
            while not h.done:
                a = torch.tanh(a @ a) * 0.5
                t0 = time.perf_counter()
                h.step(wait=True)
                lock_calls.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        old = new
    t.close()
    pc = np.asarray(per_call)
    return [
        {
            "case": "step",
            "what": f"ipc {n} procs, {L}L fp8 rows, step() after every 2 matmuls",
            "procs": n,
            "rank": rank,
            "calls": int(pc.size),
            "step_p50_ms": float(np.percentile(pc, 50)),
            "step_p99_ms": float(np.percentile(pc, 99)),
            "step_max_ms": float(pc.max()),
            "step_wait_p50_ms": float(np.median(lock_calls)),
            "check": "timing only",
        }
    ]


def nccl_pair_rows(torch, ep, dev, device: int, reps: int, pairs: int = 200) -> list[dict]:
    """A 4 KiB self send/recv pair (1-rank communicators): GPU time per pair with the host
    ahead of the GPU (a sleep kernel first), and host time per pair; ours blocking and
    non-blocking, and cupy's communicator on the same libnccl when cupy imports."""
    s = torch.cuda.Stream(dev)
    a = torch.zeros(1024, dtype=torch.float32, device=dev)
    b = torch.zeros_like(a)
    runs = _pair_runs(ep, device, s, a, b)
    out = {k: ([], []) for k in runs}
    for _ in range(reps + 1):
        for name, (fn, c) in runs.items():  # interleaved: host drift hits every binding alike
            gpu_us, host_us = _pair_time(torch, s, fn, c, pairs)
            out[name][0].append(gpu_us)
            out[name][1].append(host_us)
    rows = _pair_rows(out)
    for _, c in runs.values():
        if c is not None:
            c.close()
    return rows


def _pair_runs(ep, device: int, s, a, b) -> dict:
    """name -> (one send/recv pair of ``a`` into ``b`` on ``s``, its communicator to wait
    on and close, or None): ours blocking, non-blocking, and cupy's where it imports."""
    import importlib.util

    runs = {}
    for name, kw in (("ours blocking", {}), ("ours non-blocking", {"blocking": False})):
        c = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=device, **kw)

        def pair(c=c):
            with ep.group():
                c.send(a, 0, s.cuda_stream)
                c.recv(b, 0, s.cuda_stream)

        runs[name] = (pair, c)
    if importlib.util.find_spec("cupy") is not None:
        from cupy.cuda import nccl as cnccl

        uid = cnccl.get_unique_id()
        cc = cnccl.NcclCommunicator(1, uid, 0)

        def cpair():
            cnccl.groupStart()
            cc.send(a.data_ptr(), a.numel(), cnccl.NCCL_FLOAT32, 0, s.cuda_stream)
            cc.recv(b.data_ptr(), b.numel(), cnccl.NCCL_FLOAT32, 0, s.cuda_stream)
            cnccl.groupEnd()

        runs["cupy"] = (cpair, None)
    return runs


def _pair_time(torch, s, fn, c, pairs: int) -> tuple[float, float]:
    """(GPU µs, host µs) per pair of ``pairs`` calls of ``fn`` enqueued behind a ~20 ms sleep
    kernel on ``s``, after one untimed call."""
    fn()
    if c is not None:
        c.wait(s.cuda_stream)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(40_000_000)  # ~20 ms: the host enqueues every pair first
    e0, e1 = _ev(torch), _ev(torch)
    e0.record(s)
    t0 = time.perf_counter()
    for _ in range(pairs):
        fn()
    t1 = time.perf_counter()
    if c is not None and c._pending:
        c.wait(s.cuda_stream)
    e1.record(s)
    e1.synchronize()
    return e0.elapsed_time(e1) * 1e3 / pairs, (t1 - t0) * 1e6 / pairs


def _pair_rows(out: dict) -> list[dict]:
    """A row per binding of ``out`` (name -> per repeat GPU µs, host µs; the first repeat
    left out), with its GPU time over cupy's where cupy ran."""
    rows = []
    cupy_gpu = float(np.median(out["cupy"][0][1:])) if "cupy" in out else None
    for name, (g, h) in out.items():
        gu = float(np.median(g[1:]))
        rows.append(
            {
                "case": "nccl-pair",
                "what": "4 KiB self send/recv pair, 1-rank communicator",
                "method": name,
                "gpu_us_per_pair": gu,
                "host_us_per_pair": float(np.median(h[1:])),
                "gpu_vs_cupy": gu / cupy_gpu if cupy_gpu else None,
            }
        )
    return rows
