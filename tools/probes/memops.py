"""Probe (one GPU): host microseconds per driver call on the IPC round's launch path: event
record, stream wait on an event, 32-bit stream write/wait on registered host memory (the
shared-page signals) and on device memory, a captured copy graph launch."""

from __future__ import annotations

import json
import mmap
import sys
import time

import numpy as np
import torch

from eplb_pynccl._nccl import cuda


def _driver_and_page():
    """The driver on device 0, a 4 KiB page of int32 slots and its registered device address."""
    drv = cuda.driver()
    assert drv is not None
    drv.set_device(0)
    page = np.ndarray((1024,), dtype=np.int32, buffer=mmap.mmap(-1, 4096))
    return drv, page, drv.host_register(int(page.__array_interface__["data"][0]), 4096)


def per_call(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    torch.cuda.set_device(0)
    drv, page, dp = _driver_and_page()
    s = drv.stream_create()
    ev = drv.event_create()
    dev = torch.zeros(1024, dtype=torch.int32, device="cuda")
    page[:] = 1 << 30
    dev.fill_(1 << 30)
    torch.cuda.synchronize()
    a = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    g = cuda.CopyGraph(
        drv, [(b.data_ptr() + 4096 * i, a.data_ptr() + 4096 * i, 4096) for i in range(64)]
    )
    out = {
        "event_record_us": per_call(lambda: drv.event_record(ev, s)),
        "stream_wait_event_us": per_call(lambda: drv.stream_wait_event(s, ev)),
        "event_query_us": per_call(lambda: drv.event_done(ev)),
        "write_value_host_us": per_call(lambda: drv.write_value(s, dp, 5)),
        "wait_value_host_us": per_call(lambda: drv.wait_value(s, dp + 4, 3)),
        "write_value_device_us": per_call(lambda: drv.write_value(s, dev.data_ptr(), 5)),
        "wait_value_device_us": per_call(lambda: drv.wait_value(s, dev.data_ptr() + 4, 3)),
        "graph_launch_64_us": per_call(lambda: g.launch(s), 500),
    }

    out["wait_value_host_after_idle_us"] = per_call(lambda: drv.wait_value(s, dp + 4, 3), 500)
    g.close()
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__" and len(sys.argv) == 1:
    main()


def blocked() -> None:
    """Host us of each call of a signalled launch while the stream waits on a slot no one
    has written yet (a round whose sources are not ready), then released by the host."""
    drv, page, dp = _driver_and_page()
    s, c = drv.stream_create(), drv.stream_create()
    ev = drv.event_create()
    a = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    g = cuda.CopyGraph(
        drv, [(b.data_ptr() + 4096 * i, a.data_ptr() + 4096 * i, 4096) for i in range(64)]
    )
    res = []
    for q in range(1, 21):
        t = []

        def tick(fn):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e6)

        for k in range(3):
            tick(lambda: drv.write_value(s, dp + 4 * (16 + k), q))
        tick(lambda: drv.event_record(ev, s))
        tick(lambda: drv.stream_wait_event(c, ev))
        for k in range(3):
            tick(lambda: drv.wait_value(c, dp + 4 * k, q))  # not yet written
            tick(lambda: g.launch(c))
        for k in range(3):
            tick(lambda: drv.write_value(c, dp + 4 * (32 + k), q))
        tick(lambda: drv.event_record(ev, c))
        t0 = time.perf_counter()
        page[0:3] = q  # release
        while not drv.event_done(ev):
            pass
        t.append((time.perf_counter() - t0) * 1e6)
        res.append(t)
    med = np.median(np.asarray(res[2:]), axis=0)
    print(json.dumps({"blocked_launch_calls_us": [round(float(x), 2) for x in med]}))
    g.close()


if __name__ == "__main__" and "--blocked" in sys.argv:
    blocked()


def latency() -> None:
    """GPU-side latency of a signal: stream c waits on a slot, stream s writes it (after a
    spin kernel-free delay: a wait on an event the host records late), for a slot in
    registered host memory and in device memory; host us from the write's enqueue to c's
    event completing."""
    drv, page, hp = _driver_and_page()
    s, c = drv.stream_create(), drv.stream_create()
    ev = drv.event_create()
    dev = torch.zeros(1024, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    out = {}
    for name, base in (("host", hp), ("device", dev.data_ptr())):
        lat = []
        for q in range(1, 41):
            drv.wait_value(c, base, q)
            drv.event_record(ev, c)
            time.sleep(0.002)  # c is parked on the wait
            t0 = time.perf_counter()
            drv.write_value(s, base, q)
            while not drv.event_done(ev):
                pass
            lat.append((time.perf_counter() - t0) * 1e6)
        out[f"{name}_signal_to_done_us"] = round(float(np.median(lat[5:])), 1)
    print(json.dumps(out))


if __name__ == "__main__" and "--latency" in sys.argv:
    latency()
