"""Probe (one GPU): CopyGraph (captured copies) against cuMemcpyBatchAsync: exact bytes and
host time per launch, for both capture ways. Prints one line per case."""

from __future__ import annotations

import time

import numpy as np
import torch

from eplb_pynccl._nccl import cuda as _cuda


def main() -> None:
    drv = _cuda.driver()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    drv.set_device(0)
    s = drv.stream_create()
    for n, size in ((300, 4096), (24, 28 << 20)):
        src = torch.randint(0, 256, (n * size,), dtype=torch.uint8, device=dev)
        dst = torch.zeros_like(src)
        perm = np.random.default_rng(0).permutation(n)
        copies = [
            (dst.data_ptr() + int(perm[i]) * size, src.data_ptr() + i * size, size)
            for i in range(n)
        ]
        want = torch.empty_like(src)
        for d, sr, z in copies:
            want[d - dst.data_ptr() : d - dst.data_ptr() + z] = src[
                sr - src.data_ptr() : sr - src.data_ptr() + z
            ]
        for how in ("batch", "dtod", "auto"):
            dst.zero_()
            torch.cuda.synchronize()
            try:
                if how == "auto":
                    g = _cuda.CopyGraph(drv, copies)
                else:
                    g = _cuda.CopyGraph.__new__(_cuda.CopyGraph)
                    g._drv, g._exec, g._graph, g.count = drv, None, None, n
                    arrays = _cuda.copy_arrays(copies)
                    cs = drv.stream_create()
                    drv.begin_capture(cs)
                    err = None
                    try:
                        if how == "batch":
                            drv.memcpy_batch(*arrays, cs, prefer_ce=True)
                        else:
                            drv.memcpy_dtod_async(copies, cs)
                    except _cuda.CudaError as e:
                        err = e
                    graph = drv.end_capture(cs)
                    g._graph, g._exec, g.how = graph, drv.graph_instantiate(graph), how
                    if err:
                        print(how, "capture error", err)
            except _cuda.CudaError as e:
                print(f"{n} x {size}: {how}: {e}")
                continue
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                g.launch(s)
                times.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
            torch.cuda.synchronize()
            ok = torch.equal(dst, want)
            print(
                f"{n} x {size}: graph {g.how}: exact={ok} launch host us p50={np.median(times) * 1e6:.1f}"
            )
            g.close()
        arrays = _cuda.copy_arrays(copies)
        times = []
        for _ in range(20):
            dst.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            drv.memcpy_batch(*arrays, s)
            times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        print(
            f"{n} x {size}: batch: exact={torch.equal(dst, want)} host us p50={np.median(times) * 1e6:.1f}"
        )


if __name__ == "__main__":
    main()
