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

from bench.common import DSV3, DSV3_CPU, check, fill, layers_of, make_weights
from bench.harness import BenchContext
from bench.loadgen import load_sequence

SEQ_CASES = ("dsv3-seq", "dsv3-seq-cpu")
POLICIES = ("deepseek", "deepseek_relabelled", "migration_aware")


def sequence_shape(case: str, n: int, args):
    """(layout, num_logical, num_physical, layers, groups) of a sequence case at ``n`` ranks
    (slots rounded up to fill every rank evenly)."""
    if case == "dsv3-seq":
        return DSV3, 256, -(-288 // n) * n, layers_of(args, "dsv3", False), 8
    return DSV3_CPU, 32, -(-(32 + 4 * n) // n) * n, layers_of(args, "dsv3", True), 8


def run_sequence_cases(ctx: BenchContext, wanted: list[str]) -> list[dict]:
    rows = []
    for case in wanted:
        if case in SEQ_CASES:
            rows += _run_case(ctx, case)
    return rows


def _transport(ctx: BenchContext, ep):
    """(transport, name): NCCL through eplb_pynccl on GPUs, torch.distributed otherwise."""
    if ctx.is_gpu and ctx.comm is not None:
        return ep.NcclTransport(ctx.comm), "eplb_pynccl"
    return ep.TorchTransport(), "eplb_pynccl/torch-" + ("nccl" if ctx.is_gpu else "gloo")


def _run_case(ctx: BenchContext, case: str) -> list[dict]:
    import torch

    import eplb_pynccl as ep

    n, rank = ctx.world_size, ctx.rank
    spec, num_logical, num_physical, layers, groups = sequence_shape(case, n, ctx.args)
    steps = max(1, int(getattr(ctx.args, "eplb_seq_steps", 4) or 4))
    P = num_physical // n
    seed = int(ctx.args.seed)
    seq = load_sequence(layers, num_logical, steps + 1, "moderate", seed=seed)
    kw = dict(num_groups=groups)
    first = ep.rebalance(seq[0], num_physical, n, **kw).new_map
    weights = make_weights(torch, spec, layers, P, ctx.device)
    row_bytes = sum(t[0].nbytes for t in weights[0])
    transport, tname = _transport(ctx, ep)
    shuffler = ep.ExpertShuffler(transport, weights)
    # warm-up (connections, allocator, kernels): there and back, untimed
    other = ep.rebalance(seq[1], num_physical, n, **kw).new_map
    fill(torch, weights, first, rank, P)
    ctx.sync()
    shuffler.rearrange(first, other)
    shuffler.rearrange(other, first)
    ctx.sync()
    ok = check(torch, weights, first, rank, P)
    label = f"{case} ep{n} {layers}L x{steps}"
    rows = []
    for policy in POLICIES:
        m = _run_policy(ctx, ep, torch, shuffler, seq, first, policy, row_bytes, P, kw, ok)
        m.update(case=label, method=f"{policy} ({tname})", layers=layers, seed=seed)
        rows.append(_policy_row(m, num_physical, n))
        # the next policy starts again from the first placement
        fill(torch, weights, first, rank, P)
        ctx.sync()
    del shuffler, weights
    if ctx.is_gpu:
        torch.cuda.empty_cache()
    _add_speedups(rows)
    return rows


def _run_policy(ctx, ep, torch, shuffler, seq, first, policy, row_bytes, P, kw, ok) -> dict:
    """Rebalance with ``policy`` at every later window and move it; every rank's timings."""
    n, rank = ctx.world_size, ctx.rank
    num_physical = first.shape[1]
    cur = first
    times, recv, changed, imb, pol_ms = [], [], [], [], []
    for t in range(1, len(seq)):
        res = ep.rebalance(
            seq[t], num_physical, n, old_map=cur, policy=policy, row_bytes=row_bytes, **kw
        )
        pol_ms.append(res.seconds * 1e3)
        ctx.barrier()
        t0 = time.perf_counter()
        shuffler.rearrange(cur, res.new_map)
        ctx.sync()
        times.append(time.perf_counter() - t0)
        ok = check(torch, shuffler.weights, res.new_map, rank, P) and ok
        recv.append(res.bytes_received_max)
        changed.append(float(res.slots_changed.mean()) / num_physical)
        imb.append(float(res.imbalance.mean()))
        cur = res.new_map
    every = ctx.allgather((times, ok))
    return dict(every=every, recv=recv, changed=changed, imb=imb, pol_ms=pol_ms)


def _policy_row(m: dict, num_physical: int, n: int) -> dict:
    every, recv = m["every"], m["recv"]
    steps = len(recv)
    slow = [max(e[0][i] for e in every) for i in range(steps)]
    med = float(np.median(slow)) * 1e3
    total = sum(slow)
    return {
        "case": m["case"],
        "method": m["method"],
        "world_size": n,
        "layers": m["layers"],
        "time_ms": med,
        "time_ms_min": min(slow) * 1e3,
        "time_ms_max": max(slow) * 1e3,
        "gbps_per_gpu": sum(recv) / total / 1e9 if total > 0 else 0.0,
        "bytes_max_per_gpu": int(np.mean(recv)),
        "repeats": steps,
        "check": "ok" if all(e[1] for e in every) else "FAIL",
        "seed": m["seed"],
        "changed_frac": float(np.mean(m["changed"])),
        "imbalance": float(np.mean(m["imb"])),
        "policy_ms": float(np.median(m["pol_ms"])),
        "note": "median time per rebalance over a moderate-drift load sequence",
    }


def _add_speedups(rows: list[dict]) -> None:
    base = next((r["time_ms"] for r in rows if r["method"].startswith("deepseek (")), None)
    for r in rows:
        if base and r["time_ms"] > 0:
            r["speedup"] = base / r["time_ms"]
            r["note"] += "; speedup vs deepseek"
