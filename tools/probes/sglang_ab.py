"""Probe (CPU, 4 gloo ranks, ``.venv-sglang``): SGLang's update against eplb_pynccl's host
path at an earlier commit and now, in one run, bench ``sglang``'s shapes and maps, the
variants interleaved per update (the order reversed every other repeat).

Variants: ``sglang`` (SGLang's own ``_update_expert_weights_raw``); ``now``; ``packed`` (now,
rows under 1 MiB packed per peer as before ``pack_threshold=0``); ``old`` (``--rev``'s
``TorchTransport.exchange``, rounds through ``batch_isend_irecv``, and packed rows: the host
path before this probe's commit). Prints per variant the medians of rank 0 (wall ms, CPU ms
of its process, CPU ms of its main thread) and the wall ratio over SGLang's.

    .venv-sglang/bin/python tools/probes/sglang_ab.py --maps random --reps 4
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PACKED = 1 << 20  # the shuffler's default pack_threshold


def _old_transport(path: str):
    spec = importlib.util.spec_from_file_location("_old_transport", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _variant(mode, TR, old, S):
    """Put ``mode`` in force; returns a function that restores the present code."""
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if mode == "old":
        patch(TR.TorchTransport, "prepare_round", TR.Transport.prepare_round)
        patch(TR.TorchTransport, "exchange", old.TorchTransport.exchange)
    if mode != "sglang":
        made = S._shuffler
        thr = PACKED if mode in ("old", "packed") else 0

        def shuffler(*a, **k):  # the cached shuffler, with this variant's packing
            sh = made(*a, **k)
            sh.pack_threshold = thr
            return sh

        patch(S, "_shuffler", shuffler)

    def restore():
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)

    return restore


def job(ctx, source: str, staging: str, reps: int, modes: list, old_path: str) -> dict:
    import torch
    from sglang.srt.eplb import expert_location_updater as U

    from bench import sglang as B
    from eplb_pynccl import transport as TR
    from eplb_pynccl.integrations import sglang as S
    from tests_sglang.util import metadata, world

    dist = torch.distributed
    rank, ws = world(ctx)
    torch.set_num_threads(1)
    old = _old_transport(old_path)
    maps = B._maps(torch, source, ws)
    metas = [metadata(torch, m, B.ROWS * ws - ws, ws) for m in maps]
    w = B._weights(torch, maps[0], rank)
    layer_bytes = sum(t.nbytes for t in w[0])
    layers = list(range(B.LAYERS))
    sg_raw, sg_single = U._update_expert_weights_raw, U.update_expert_weights_single_layer
    S.install(staging_bytes=layer_bytes if staging == "layer" else None)
    got: dict = {m: [] for m in modes}
    try:
        for rep in range(reps):
            order = modes if rep % 2 == 0 else modes[::-1]
            for a, b in zip(metas, metas[1:]):
                for mode in order:
                    fn = sg_raw if mode == "sglang" else U._update_expert_weights_raw
                    ours_single = U.update_expert_weights_single_layer
                    if mode == "sglang":
                        U.update_expert_weights_single_layer = sg_single
                    restore = _variant(mode, TR, old, S)
                    try:
                        dist.barrier()
                        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
                        fn({i: w[i] for i in layers}, a, b, layers, 1, rank)
                        c1, m1 = time.process_time(), time.thread_time()
                        dist.barrier()
                        got[mode].append((time.perf_counter() - t0, c1 - c0, m1 - m0))
                    finally:
                        restore()
                        U.update_expert_weights_single_layer = ours_single
    finally:
        S.uninstall()
    return {
        m: [round(1e3 * float(np.median([x[i] for x in v])), 1) for i in range(3)]
        for m, v in got.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", default="random", choices=("random", "deepseek", "ours"))
    ap.add_argument("--staging", default="quarter", choices=("quarter", "layer"))
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--modes", default="sglang,old,packed,now")
    ap.add_argument("--rev", default="100e07e", help="the commit whose exchange() is 'old'")
    args = ap.parse_args()
    sys.path.insert(0, os.getcwd())
    from tests.gpu_util import RankPool

    src = subprocess.run(
        ["git", "show", f"{args.rev}:eplb_pynccl/transport.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.replace("from . import", "from eplb_pynccl import")
    src = src.replace("from .", "from eplb_pynccl.")
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "old_transport.py")
        with open(path, "w") as f:
            f.write(src)
        with RankPool(4, env={"SGLANG_USE_CPU_ENGINE": "1"}) as pool:
            res = pool.run(job, args.maps, args.staging, args.reps, modes, path, timeout=1200)
    r0 = res[0]
    print(f"maps {args.maps}, {args.staging} staging, {args.reps} repeats, {os.cpu_count()} cores")
    base = r0.get("sglang", [None])[0]
    for m, (wall, cpu, main_cpu) in r0.items():
        ratio = f"{wall / base:.2f}x SGLang" if base else ""
        print(
            f"  {m:7s} wall {wall:7.1f} ms  cpu {cpu:6.1f} ms  main thread {main_cpu:6.1f} ms  {ratio}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
