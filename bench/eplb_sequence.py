"""The sequence case of the ``eplb`` part: the shuffler moving what each placement policy asks for.

Case ``dsv3-seq`` (GPU; ``dsv3-seq-cpu`` shrunk for gloo on the CPU): DeepSeek-V3 fp8 experts
(the ``dsv3`` case's tensors, 42.0 MiB per expert), 256 logical experts on 288 slots (more
when 288 does not divide over the ranks: the next multiple of the world size, so any number
of ranks >= 2 works), ``--eplb-layers-dsv3`` layers, EP = world size, one node. A seeded
``moderate`` load sequence (``bench/loadgen.py``) of ``--eplb-seq-steps`` + 1 windows; every
policy starts from DeepSeek's placement of the first window and rebalances at each later
window from its own previous placement, as an engine would: ``deepseek``,
``deepseek_relabelled``, ``migration_aware`` (:func:`eplb_pynccl.rebalance`). Each
rearrangement is timed (barrier to the slowest rank's end, after one untimed warm-up
rearrangement) and every row of every layer is checked after it.

Rows (part ``eplb``): ``time_ms`` is the median time per rebalance, ``gbps_per_gpu`` the
busiest receiver's bytes over all rebalances divided by their total time; with
``bytes_max_per_gpu`` (mean per rebalance), ``changed_frac``, ``imbalance`` (mean) and
``policy_ms`` (median time of the policy itself, on rank 0's CPU).
"""

from __future__ import annotations

import time

import numpy as np

from bench.eplb import _check, _fill, layers_of, model_ms
from bench.harness import BenchContext
from bench.loadgen import load_sequence

SEQ_CASES = ("dsv3-seq", "dsv3-seq-cpu")
POLICIES = ("deepseek", "deepseek_relabelled", "migration_aware")


def _spec(case: str, ctx: BenchContext):
    n = ctx.world_size
    if case == "dsv3-seq":
        spec = [
            ((4096, 7168), "float8_e4m3fn"),
            ((7168, 2048), "float8_e4m3fn"),
            ((32, 56), "float32"),
            ((56, 16), "float32"),
        ]
        return spec, 256, -(-288 // n) * n, layers_of(ctx.args, "dsv3", False), 8
    spec = [
        ((64, 112), "float8_e4m3fn"),
        ((112, 32), "float8_e4m3fn"),
        ((2, 4), "float32"),
        ((4, 2), "float32"),
    ]
    return spec, 32, 32 + 4 * n, layers_of(ctx.args, "dsv3", True), 8


def run_sequence_cases(ctx: BenchContext, wanted: list[str]) -> list[dict]:
    rows = []
    for case in wanted:
        if case in SEQ_CASES:
            rows += _run_case(ctx, case)
    return rows


def _run_case(ctx: BenchContext, case: str) -> list[dict]:
    import torch

    import eplb_pynccl as ep

    n, rank = ctx.world_size, ctx.rank
    spec, num_logical, num_physical, layers, groups = _spec(case, ctx)
    steps = max(1, int(getattr(ctx.args, "eplb_seq_steps", 4) or 4))
    P = num_physical // n
    seed = int(ctx.args.seed)
    seq = load_sequence(layers, num_logical, steps + 1, "moderate", seed=seed)
    kw = dict(num_groups=groups)
    first = ep.rebalance(seq[0], num_physical, n, **kw).new_map
    tspec = [(shape, getattr(torch, dt)) for shape, dt in spec]
    weights = [
        [torch.empty((P, *shape), dtype=dt, device=ctx.device) for shape, dt in tspec]
        for _ in range(layers)
    ]
    row_bytes = sum(t[0].nbytes for t in weights[0])
    if ctx.is_gpu and ctx.comm is not None:
        transport, tname = ep.NcclTransport(ctx.comm), "eplb_pynccl"
    else:
        transport, tname = (
            ep.TorchTransport(),
            "eplb_pynccl/torch-" + ("nccl" if ctx.is_gpu else "gloo"),
        )
    shuffler = ep.ExpertShuffler(transport, weights)
    # warm-up (connections, allocator, kernels): there and back, untimed
    other = ep.rebalance(seq[1], num_physical, n, **kw).new_map
    _fill(torch, weights, first, rank, P)
    ctx.sync()
    shuffler.rearrange(first, other)
    shuffler.rearrange(other, first)
    ctx.sync()
    ok = _check(torch, weights, first, rank, P)
    label = f"{case} ep{n} {layers}L x{steps}"
    rows = []
    for policy in POLICIES:
        cur = first
        times, recv, changed, imb, pol_ms, preds = [], [], [], [], [], []
        for t in range(1, steps + 1):
            res = ep.rebalance(
                seq[t], num_physical, n, old_map=cur, policy=policy, row_bytes=row_bytes, **kw
            )
            pol_ms.append(res.seconds * 1e3)
            ctx.barrier()
            t0 = time.perf_counter()
            shuffler.rearrange(cur, res.new_map)
            ctx.sync()
            times.append(time.perf_counter() - t0)
            preds.append(model_ms(ctx, cur, res.new_map, n, weights[0], tname))
            ok = _check(torch, weights, res.new_map, rank, P) and ok
            recv.append(res.bytes_received_max)
            changed.append(float(res.slots_changed.mean()) / num_physical)
            imb.append(float(res.imbalance.mean()))
            cur = res.new_map
        every = ctx.allgather((times, ok))
        slow = [max(e[0][i] for e in every) for i in range(steps)]
        med = float(np.median(slow)) * 1e3
        total = sum(slow)
        rows.append(
            {
                "case": label,
                "method": f"{policy} ({tname})",
                "world_size": n,
                "layers": layers,
                "time_ms": round(med, 3),
                "time_ms_min": round(min(slow) * 1e3, 3),
                "time_ms_max": round(max(slow) * 1e3, 3),
                "gbps_per_gpu": round(sum(recv) / total / 1e9, 2) if total > 0 else 0.0,
                "bytes_max_per_gpu": int(np.mean(recv)),
                "repeats": steps,
                "check": "ok" if all(e[1] for e in every) else "FAIL",
                "seed": seed,
                "changed_frac": round(float(np.mean(changed)), 4),
                "imbalance": round(float(np.mean(imb)), 4),
                "policy_ms": round(float(np.median(pol_ms)), 2),
                "note": "median time per rebalance over a moderate-drift load sequence",
            }
        )
        if preds and all(p is not None for p in preds):
            rows[-1]["model_ms"] = round(float(np.median(preds)), 1)
        # the next policy starts again from the first placement
        _fill(torch, weights, first, rank, P)
        ctx.sync()
    del shuffler, weights
    if ctx.is_gpu:
        torch.cuda.empty_cache()
    base = next((r["time_ms"] for r in rows if r["method"].startswith("deepseek (")), None)
    for r in rows:
        if base and r["time_ms"] > 0:
            r["speedup"] = round(base / r["time_ms"], 2)
            r["note"] += "; speedup vs deepseek"
    ctx.log(f"eplb {label}: " + ", ".join(f"{r['method']} {r['time_ms']:.1f} ms" for r in rows))
    return rows
