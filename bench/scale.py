"""The ``scale`` part of ``make bench`` (CPU, in the parent): rebalances past one node, on paper.

Two things, both from the time model (``eplb_pynccl/estimate.py``) on described clusters
(``eplb_pynccl/cluster.py``):

1. **Calibration** (part ``scale-calibration``): the model's prediction for every
   measured EPLB row of bench/RESULTS.md that it can model (run F on 4x H100: DeepSeek-V3
   and Qwen3-30B-A3B at EP4 and EP2, ours in its variants and the vLLM-style baseline, with
   run F's executor host costs; one H200: a local permutation at EP1 with earlier executors
   and with Session 7's, the latter with the current host profile and, beside it, what
   Session 6's profile predicted), the same placements as the bench (``make_maps``, seed 0),
   the error per row and, for a miss, its measured cause (:data:`MISS_CAUSES`).
2. **Scale** (part ``scale``): DeepSeek-V3 fp8 (256 experts, 58 MoE layers), Kimi-K2
   (384, 60) and Qwen3-235B-A22B bf16 (128, 94) at EP 8-256 over 8-GPU nodes with
   8x 400 Gb/s per node (``h100-ib400``) and on GB200 NVL72 (EP up to 72); a drifting
   load sequence (``bench/loadgen.py``, "moderate"), every policy rebalancing from its own
   previous placement; each rebalance timed for the vLLM-style exchange, ours over NCCL,
   ours with copy engines inside a node (IPC) + NCCL between nodes, and ours with node-level
   dedupe, with the current executor's host costs. Per (model, cluster, EP, policy,
   executor): predicted seconds per rebalance (mean over the sequence; ``setup_s`` of it is
   ours' set-up and planning, ``exchange_s`` the rounds), network bytes received per node
   (the busiest node, mean), the share of rounds bound by each resource; the host time to
   plan and build the schedule (and one rank's ops) on this machine; the reported figures
   of others beside the comparable rows.
3. **Options** (part ``scale-options``): the targets' two cases under every staging bound
   of :data:`STAGING_LAYERS` and both transports.
4. **Targets** (part ``scale-targets``): issue 25's ratios with the default options, the
   best options and the exchange alone, each with what it rests on and, when missed, where
   the time goes; the dedupe byte ratio; the host time to plan + build the schedule + one
   rank's schedule and of ``estimate_rearrangement`` at DeepSeek-V3 EP256, 58 layers,
   measured here.

Options (attributes of the bench's args when present): ``scale_steps`` (rebalances per
sequence, default 2), ``scale_models`` (comma-separated keys of :data:`MODELS`), ``out`` and
``no_plots`` (the plot ``scale.png``). Run alone: ``python -m bench.scale [--calibrate]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

try:
    import eplb_pynccl  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eplb_pynccl.cluster import Cluster  # noqa: E402
from eplb_pynccl.estimate import (  # noqa: E402
    estimate_rearrangement,
    estimate_vllm_style,
    predict_eplb_row,
)
from eplb_pynccl.placement import rebalance  # noqa: E402
from eplb_pynccl.planner import plan_rearrangement  # noqa: E402
from eplb_pynccl.schedule import Layout, build_schedule  # noqa: E402

GB = 1e9
DSV3_ROW = [4096 * 7168, 7168 * 2048, 32 * 56 * 4, 56 * 16 * 4]  # fp8 + fp32 block scales
QWEN30_ROW = [1536 * 2048 * 2, 2048 * 768 * 2]
QWEN235_ROW = [3072 * 4096 * 2, 4096 * 1536 * 2]


@dataclass(frozen=True)
class Model:
    name: str
    experts: int
    layers: int
    row: list
    groups: int | None
    eps: tuple  # EP sizes over 8-GPU nodes
    nvl72_eps: tuple


# Kimi-K2 has DeepSeek-V3's expert shapes (hidden 7168, moe_intermediate 2048, fp8 blocks)
MODELS = {
    "dsv3": Model("DeepSeek-V3 fp8", 256, 58, DSV3_ROW, 8, (8, 16, 32, 64, 128, 256), (32, 64, 72)),
    "kimi-k2": Model("Kimi-K2 fp8", 384, 60, DSV3_ROW, None, (16, 64, 256), (72,)),
    "qwen3-235b": Model("Qwen3-235B-A22B bf16", 128, 94, QWEN235_ROW, None, (16, 64, 256), (72,)),
}
POLICIES = ("deepseek", "migration_aware")
EXECUTORS = ("vllm-style", "ours nccl", "ours ipc+nccl", "ours dedupe")
# the schedule options scanned for the targets' cases (rows of part 'scale-options'): the
# staging bound in layers of local experts (ExpertShuffler(staging_bytes=...); None: the
# default, one layer; 0: unbounded, every layer in one round) x transport; the other options
# are scanned at one and two layers (EXTRA_OPTIONS)
STAGING_LAYERS = (None, 2, 4, 8, 0)

# what others reported, printed beside the comparable rows (ANCHORS.md)
ANCHORS = {
    ("dsv3", "gb200-nvl72", 32, "deepseek", "vllm-style"): (
        "vLLM: 0.91 s mean (0.65-1.70 s) per sync rearrangement, DeepSeek-R1 NVFP4 on 32x "
        "GB200 over NIXL (its policy, its layer loop; NVFP4 rows are ~0.6x of fp8)"
    ),
    ("dsv3", "h100-ib400", 32, "deepseek", "vllm-style"): (
        "SGLang: ~1.8 s per rebalance (2025; setup not stated); TensorRT-LLM estimates "
        "0.5-1 s for a bulk update (from host memory)"
    ),
}

# measured rows of bench/RESULTS.md: (case, ep, layers, method, ms, where[, copy rate B/s])
MEASURED = [
    ("dsv3", 4, 4, "eplb_pynccl", 72.5, "run F, 4x H100"),
    ("dsv3", 4, 4, "eplb_pynccl direct", 69.0, "run F, 4x H100"),
    ("dsv3", 4, 4, "eplb_pynccl packed-2L", 60.4, "run F, 4x H100"),
    ("dsv3", 4, 4, "eplb_pynccl/torch-nccl", 91.2, "run F, 4x H100"),
    ("dsv3", 4, 4, "vllm-style", 95.8, "run F, 4x H100 (79-209)"),
    ("qwen3", 4, 8, "eplb_pynccl", 40.0, "run F, 4x H100"),
    ("qwen3", 4, 8, "eplb_pynccl direct", 42.6, "run F, 4x H100"),
    ("qwen3", 4, 8, "eplb_pynccl packed-2L", 34.9, "run F, 4x H100"),
    ("qwen3", 4, 8, "eplb_pynccl/torch-nccl", 58.5, "run F, 4x H100"),
    ("qwen3", 4, 8, "vllm-style", 49.8, "run F, 4x H100"),
    ("dsv3", 2, 4, "eplb_pynccl", 81.6, "run F, H100 x2"),
    ("dsv3", 2, 4, "eplb_pynccl direct", 88.9, "run F, H100 x2"),
    ("dsv3", 2, 4, "vllm-style", 138.2, "run F, H100 x2 (115-218)"),
    ("qwen3", 2, 8, "eplb_pynccl", 32.3, "run F, H100 x2"),
    ("qwen3", 2, 8, "eplb_pynccl direct", 31.9, "run F, H100 x2"),
    ("qwen3", 2, 8, "vllm-style", 61.0, "run F, H100 x2"),
    ("dsv3-perm", 1, 2, "eplb_pynccl", 6.9, "one H200, 2026-12-01 (ANCHORS)"),
    ("dsv3-perm", 1, 2, "eplb_pynccl", 10.5, "one H200, 2026-12-02 (8.5-12.5)"),
    # the executor as it is now (Session 7, run D7: one launch per phase, at most 8 waves):
    # the row-copy kernel at its default 16 CTAs and at 132, and the copy engines; the
    # cluster's copy rate is what that method measured on 24 rows of 28 MiB in the same run
    # (765, 1,879 and 1,687 GB/s)
    ("dsv3-perm", 1, 2, "eplb_pynccl", 12.18, "one H200, Session 7 D7, kernel 16 CTAs", 765e9),
    ("dsv3-perm", 1, 2, "eplb_pynccl", 6.09, "one H200, Session 7 D7, kernel 132 CTAs", 1879e9),
    ("dsv3-perm", 1, 2, "eplb_pynccl", 7.70, "one H200, Session 7 D7, copy engines", 1687e9),
]


def _bench_maps(case: str, ep: int, layers: int):
    if case == "dsv3-perm":  # 71 of 72 rows of each layer move (one cycle), 142 in all
        old = np.tile(np.arange(72), (layers, 1))
        new = old.copy()
        new[:, :71] = np.roll(old[:, :71], 1, axis=1)
        return old, new, DSV3_ROW
    from bench.eplb import make_maps

    if case == "dsv3":
        old, new = make_maps(0, layers, 256, 288, ep)
        return old, new, DSV3_ROW
    phys = -(-int(128 * 1.125) // ep) * ep
    old, new = make_maps(0, layers, 128, phys, ep)
    return old, new, QWEN30_ROW


# the measured cause of each row the model misses by more than 25% (bench/RESULTS.md, run F's
# eplb table in bench/results/2026-11-27-s3-h100x4-bench.md, Session 6's D3 rows)
MISS_CAUSES = {
    # run F's three repeats took 23.0 / 35.0 / 35.5 ms and the model is within 2% of the
    # fastest; the profiled run's exchange took 26.6 ms of GPU for 96 messages (73 GB/s to the
    # busiest GPU), slower than the unpacked variant's 22.4 ms for 634 messages, while an
    # alltoall of that size per rank ran at ~300 GB/s in the same run: the exchange time there
    # follows neither bytes nor message count, and the model has no term that does
    ("qwen3", "eplb_pynccl packed-2L", 34.9): (
        "repeats 23.0/35.0/35.5 ms, model -2% of the fastest; exchange 73 GB/s whatever the "
        "message count (alltoall ~300)"
    ),
    # the same permutation and executor family measured 6.9 ms on 2026-12-01 (model -0.4%);
    # this row's range 8.5-12.5 ms is Session 6's 'before' column (23-34% of the 2.98 ms
    # floor); no phase profile of it is kept, so the 1.5x between sessions is not attributed;
    # the current code's rows (Session 7 D7: kernel, copy engines) are within
    ("dsv3-perm", "eplb_pynccl", 10.5): (
        "1.5x the 2026-12-01 run of the same case (6.9 ms, model -0.4%); no profile kept: "
        "not attributed"
    ),
}


def _host_profile(where: str) -> str:
    """The host costs of the executor that ran a measured row: Session 7's rows ran the
    current executor (its profile is fitted to Session 7's D9 rows of the same code), the
    others ran run F's or an earlier one (run F's profile)."""
    return "current" if "Session 7" in where else "run-f"


def _calibration_cluster(ep: int, where: str, host: str | None = None) -> Cluster:
    """The machine of a measured row, with the host costs of the executor that ran it."""
    host = host or _host_profile(where)
    return Cluster.preset("h200x1" if ep == 1 else "h100x4-nv18", host=host)


def calibration_rows() -> list[dict]:
    """The model against every measured row of :data:`MEASURED`: prediction and error."""
    rows = []
    for case, ep, layers, method, ms, where, *local in MEASURED:
        old, new, row = _bench_maps(case, ep, layers)
        P = old.shape[1] // ep

        def predict(host=None):
            c = _calibration_cluster(ep, where, host)
            if local:
                c = replace(c, local_bw=local[0])
            return c, predict_eplb_row(
                old, new, ep, row, method, cluster=c, layer_bytes=sum(row) * P
            )

        cluster, pred = predict()
        ok = abs(pred - ms) <= 0.25 * ms
        rows.append(
            {
                "kind": "calibration",
                "part": "scale-calibration",
                "case": f"{case} ep{ep} {layers}L",
                "method": method,
                "measured_ms": ms,
                "predicted_ms": round(pred, 1),
                "error_pct": round(100 * (pred - ms) / ms, 1),
                "within_25pct": ok,
                "where": where,
                "cluster": cluster.name,
                "host_costs": _host_profile(where),
            }
        )
        if _host_profile(where) == "current":  # what the profile's update moved
            before = predict("session-6")[1]
            rows[-1]["session6_profile_ms"] = round(before, 1)
            rows[-1]["session6_error_pct"] = round(100 * (before - ms) / ms, 1)
        if not ok:
            rows[-1]["cause"] = MISS_CAUSES.get((case, method, ms), "not attributed")
    return rows


# ---- the scale part --------------------------------------------------------------------------


def _slots(experts: int, ep: int) -> int:
    """12.5% redundant slots (DeepSeek's 32 of 256), rounded up to a multiple of EP."""
    return -(-int(np.ceil(experts * 1.125)) // ep) * ep


def _clusters(m: Model):
    for ep in m.eps:
        yield "h100-ib400", ep, Cluster.preset("h100-ib400", nodes=max(1, ep // 8))
    for ep in m.nvl72_eps:
        yield "gb200-nvl72", ep, Cluster.preset("gb200-nvl72")


def _sequence(m: Model, ep: int, nodes: int, loads, policy: str) -> list:
    phys = _slots(m.experts, ep)
    groups = m.groups if (m.groups and nodes > 1 and m.groups % nodes == 0) else None
    kw = {"num_nodes": nodes, "num_groups": groups} if groups else {"num_nodes": 1}
    maps = [rebalance(loads[0], phys, ep, policy="deepseek", **kw).new_map]
    for t in range(1, len(loads)):
        maps.append(rebalance(loads[t], phys, ep, old_map=maps[-1], policy=policy, **kw).new_map)
    return maps


def _host_build_ms(old, new, ep: int, rpn, row, reps: int = 3) -> float:
    """Host time (this machine) to plan, build the schedule and one rank's ops; median."""
    times = []
    P = old.shape[1] // ep
    layout = Layout.of([row] * old.shape[0], P)
    for _ in range(reps):
        t0 = time.perf_counter()
        plan = plan_rearrangement(old, new, ep, ranks_per_node=rpn)
        build_schedule(plan, layout).rank(0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _estimates(old, new, ep, row, cluster) -> dict:
    out = {
        "vllm-style": estimate_vllm_style(old, new, ep, row, cluster=cluster),
        "ours nccl": estimate_rearrangement(old, new, ep, row, cluster=cluster),
        "ours ipc+nccl": estimate_rearrangement(
            old, new, ep, row, cluster=cluster, transport="ipc"
        ),
    }
    if cluster.nodes > 1 and ep > cluster.gpus_per_node:
        out["ours dedupe"] = estimate_rearrangement(
            old, new, ep, row, cluster=cluster, node_dedupe=True
        )
    return out


def _per_executor(maps, ep: int, row, cluster) -> dict:
    """Executor -> its estimates, one per rebalance of the placement sequence ``maps``."""
    per: dict = {}
    for t in range(1, len(maps)):
        for ex, est in _estimates(maps[t - 1], maps[t], ep, row, cluster).items():
            per.setdefault(ex, []).append(est)
    return per


def _dedupe_columns(ests, plain) -> dict:
    """The 'ours dedupe' columns: 'auto' (two stages only where the model says faster) and
    the network bytes against plain 'ours nccl'."""
    auto = float(np.mean([min(e.seconds, p.seconds) for e, p in zip(ests, plain)]))
    base = np.mean([p.max_network_bytes_per_node for p in plain])
    return {
        "seconds_auto": round(auto, 4),
        "plain_network_gb": round(float(base) / GB, 3),
        "net_vs_plain": round(
            float(np.mean([e.max_network_bytes_per_node for e in ests])) / max(base, 1),
            3,
        ),
    }


def _scale_row(case: dict, slots: int, ex: str, ests, plain, build_ms: float) -> dict:
    """One row of part 'scale': the means over the rebalances of one executor's ``ests``."""
    share = {r: float(np.mean([e.share()[r] for e in ests])) for r in ests[0].share()}
    secs = float(np.mean([e.seconds for e in ests]))
    setup = float(np.mean([e.setup_seconds for e in ests]))
    row = {
        "kind": "scale",
        "model": case["model"],
        "cluster": case["cluster"],
        "ep": case["ep"],
        "nodes": case["nodes"],
        "slots": slots,
        "policy": case["policy"],
        "executor": ex,
        "seconds_per_rebalance": round(secs, 4),
        "setup_s": round(setup, 4),
        "exchange_s": round(secs - setup, 4),
        "network_gb_per_node": round(
            float(np.mean([e.max_network_bytes_per_node for e in ests])) / GB, 3
        ),
        "busiest_gpu_gb": round(float(np.mean([e.busiest_gpu_bytes for e in ests])) / GB, 3),
        "rounds": round(float(np.mean([e.rounds for e in ests])), 1),
        "bound": " / ".join(f"{r} {v:.0%}" for r, v in share.items() if v > 0),
        "host_build_ms": round(build_ms, 1),
        "rebalances": len(ests),
    }
    if ex == "ours dedupe":
        row.update(_dedupe_columns(ests, plain))
    note = ANCHORS.get((case["model"], case["cluster"], case["ep"], case["policy"], ex))
    if note:
        row["reported"] = note
    return row


def _cluster_rows(key: str, m, loads, topo: str, ep: int, cluster) -> list[dict]:
    """The rows of one model on one cluster: every policy x executor."""
    nodes = cluster.nodes if topo == "h100-ib400" else 1
    rpn = 8 if topo == "h100-ib400" and ep > 8 else None
    build_ms = None
    rows = []
    for policy in POLICIES:
        maps = _sequence(m, ep, nodes, loads, policy)
        if build_ms is None:
            build_ms = _host_build_ms(maps[0], maps[1], ep, rpn, m.row)
        per = _per_executor(maps, ep, m.row, cluster)
        case = {"model": key, "cluster": topo, "ep": ep, "nodes": cluster.nodes, "policy": policy}
        for ex, ests in per.items():
            rows.append(_scale_row(case, maps[0].shape[1], ex, ests, per["ours nccl"], build_ms))
    return rows


def scale_rows(steps: int = 2, seed: int = 0, models=None) -> list[dict]:
    from bench.loadgen import load_sequence

    rows = []
    for key in models or MODELS:
        m = MODELS[key]
        loads = load_sequence(m.layers, m.experts, steps + 1, "moderate", seed=seed)
        for topo, ep, cluster in _clusters(m):
            rows += _cluster_rows(key, m, loads, topo, ep, cluster)
    return rows


def _mean(ests, f) -> float:
    return float(np.mean([f(e) for e in ests]))


# the other schedule options scanned at the default staging bound and at two layers (rows of
# 'scale-options'): no cap on messages per round, no packing, node dedupe (over 8-GPU nodes)
EXTRA_OPTIONS = (
    ("max_messages_per_round=2**20", {"max_messages_per_round": 1 << 20}),
    ("pack_threshold=0", {"pack_threshold": 0}),
    ("node_dedupe", {"node_dedupe": True}),
)


def _option_cases(layer: int, multi_node: bool):
    """(staging label, option label, estimate kwargs) of every scanned case."""
    for k in STAGING_LAYERS:
        staging = "1 layer (default)" if k is None else "unbounded" if k == 0 else f"{k} layers"
        kw = {} if k is None else {"staging_bytes": (k or 1 << 20) * layer}
        yield staging, k, "", kw
        if k in (None, 2):
            for label, extra in EXTRA_OPTIONS:
                if "node_dedupe" in extra and not multi_node:
                    continue
                yield staging, k, label, {**kw, **extra}


def option_rows(steps: int = 2, seed: int = 0) -> list[dict]:
    """The targets' cases (DeepSeek-V3 migration_aware, EP64 on 8 nodes and EP72 on NVL72)
    under the schedule options (:data:`STAGING_LAYERS` x transport, and
    :data:`EXTRA_OPTIONS` at one and two layers of staging): what the model says our
    executor could do with its best options, and per resource the seconds of the rounds it
    binds (``*_bound_s``). Rows of part 'scale-options'."""
    from bench.loadgen import load_sequence

    m = MODELS["dsv3"]
    loads = load_sequence(m.layers, m.experts, steps + 1, "moderate", seed=seed)
    out = []
    for topo, ep, cluster, nodes in (
        ("h100-ib400", 64, Cluster.preset("h100-ib400", nodes=8), 8),
        ("gb200-nvl72", 72, Cluster.preset("gb200-nvl72"), 1),
    ):
        maps = _sequence(m, ep, nodes, loads, "migration_aware")
        layer = sum(m.row) * (maps[0].shape[1] // ep)
        for tr in ("nccl", "ipc"):
            for staging, k, label, kw in _option_cases(layer, nodes > 1):
                ests = [
                    estimate_rearrangement(
                        maps[t - 1], maps[t], ep, m.row, cluster=cluster, transport=tr, **kw
                    )
                    for t in range(1, len(maps))
                ]
                secs = _mean(ests, lambda e: e.seconds)
                setup = _mean(ests, lambda e: e.setup_seconds)
                share = {r: _mean(ests, lambda e, r=r: e.share()[r]) for r in ests[0].share()}
                row = {
                    "kind": "option",
                    "part": "scale-options",
                    "model": "dsv3",
                    "cluster": topo,
                    "ep": ep,
                    "policy": "migration_aware",
                    "executor": f"ours {'nccl' if tr == 'nccl' else 'ipc+nccl'}",
                    "staging": staging,
                    "staging_gb": round((k or 1) * layer / GB, 2) if k != 0 else "",
                    "options": label or "-",
                    "seconds_per_rebalance": round(secs, 4),
                    "setup_s": round(setup, 4),
                    "exchange_s": round(secs - setup, 4),
                    "rounds": round(_mean(ests, lambda e: e.rounds), 1),
                    "bound": " / ".join(f"{r} {v:.0%}" for r, v in share.items() if v > 0),
                    "busiest_gpu_gb": round(_mean(ests, lambda e: e.busiest_gpu_bytes) / GB, 3),
                }
                for r in share:
                    row[f"{r}_bound_s"] = round(_mean(ests, lambda e, r=r: _bound_seconds(e, r)), 5)
                out.append(row)
    return out


def _bound_seconds(e, resource: str) -> float:
    """Seconds of the rounds of ``e`` that ``resource`` binds."""
    return float(sum(t for t, c in zip(e.round_seconds, e.critical) if c == resource))


def _target(what: str, value, target: str, met: bool, rests_on: str, cause: str = "") -> dict:
    row = {
        "kind": "target",
        "part": "scale-targets",
        "what": what,
        "value": value,
        "target": target,
        "met": met,
        "rests_on": rests_on,
    }
    if cause and not met:
        row["cause"] = cause
    return row


def _host_figures() -> str:
    """What the ratios rest on, in short (the sources: Cluster.preset's docstring)."""
    c = Cluster.preset("h100-ib400")
    h, t = c.host["nccl"], c.host["torch"]
    return (
        f"ours {h.per_round * 1e3:.3f} ms/round, set-up {h.setup * 1e3:.2f} ms + "
        f"{(h.setup_per_message + h.plan_per_message) * 1e6:.1f} us/message end + "
        f"{h.setup_per_copy * 1e6:.2f} us/copy (Session 7, D9); NIC {c.nic_bw / 1e9:.0f} GB/s "
        f"assumed; vLLM-style {t.per_op * 1e6:.1f} us/op (run F)"
    )


def _pick(rows: list[dict], model, topo, ep, policy, ex) -> dict | None:
    """The first row of ``rows`` for that model, cluster, EP, policy and executor."""
    for r in rows:
        if (r["model"], r["cluster"], r["ep"], r["policy"], r["executor"]) == (
            model,
            topo,
            ep,
            policy,
            ex,
        ):
            return r
    return None


def _ratio_cases(default: list[dict], scanned: list[dict]):
    """(label, candidate rows, the column compared) of each ratio of one cluster."""
    return (
        ("default options", default, "seconds_per_rebalance"),
        ("best options", default + scanned, "seconds_per_rebalance"),
        (
            "exchange only (ours' set-up left out: the baseline has none)",
            default + scanned,
            "exchange_s",
        ),
    )


def _ratio_target(head: str, label: str, r: dict, b: dict, key: str) -> dict:
    """The target row of ours' row ``r`` against the baseline row ``b`` on column ``key``."""
    base = b["seconds_per_rebalance"]
    ratio = base / r[key] if r[key] > 0 else float("inf")
    opt = f", staging {r['staging']}" if "staging" in r else ""
    if r.get("options", "-") != "-":
        opt += f", {r['options']}"
    cause = (
        f"ours {r['seconds_per_rebalance'] * 1e3:.1f} ms = set-up "
        f"{r['setup_s'] * 1e3:.1f} + {r['rounds']:.0f} round(s) "
        f"{r['exchange_s'] * 1e3:.1f} ms (bound: {r['bound']}; busiest GPU "
        f"{r['busiest_gpu_gb']:.2f} GB, the baseline's {b['busiest_gpu_gb']:.2f} GB); "
        f"baseline {base * 1e3:.1f} ms ({b['bound']})"
    )
    return _target(
        f"{head}, {label}: {r['executor']}{opt}",
        round(ratio, 1),
        ">= 20x",
        ratio >= 20,
        _host_figures(),
        cause,
    )


def _speedup_targets(rows: list[dict], options) -> list[dict]:
    """The ratios of migration_aware + ours over deepseek + vLLM-style, per target cluster."""
    out = []
    for topo, ep in (("h100-ib400", 64), ("gb200-nvl72", 72)):
        b = _pick(rows, "dsv3", topo, ep, "deepseek", "vllm-style")
        if b is None:
            continue
        head = f"dsv3 {topo} EP{ep}: migration_aware + ours vs deepseek + vLLM-style"
        default = [
            r
            for r in (
                _pick(rows, "dsv3", topo, ep, "migration_aware", e)
                for e in ("ours nccl", "ours ipc+nccl", "ours dedupe")
            )
            if r
        ]
        scanned = [r for r in options if (r["cluster"], r["ep"]) == (topo, ep)]
        for label, cands, key in _ratio_cases(default, scanned):
            if not cands:
                continue
            r = min(cands, key=lambda x: x[key])
            out.append(_ratio_target(head, label, r, b, key))
    return out


def _dedupe_target(rows: list[dict]) -> list[dict]:
    """Network bytes per node with dedupe over without, on the best deepseek sequence."""
    ded = [
        r
        for r in rows
        if r.get("executor") == "ours dedupe"
        and r["policy"] == "deepseek"
        and r.get("plain_network_gb", 0) > 0
    ]
    if not ded:
        return []
    best = min(ded, key=lambda r: r["net_vs_plain"])
    return [
        _target(
            "network bytes per node with dedupe / without (best sequence: "
            f"{best['model']} EP{best['ep']} {best['policy']})",
            best["net_vs_plain"],
            "<= 0.6",
            best["net_vs_plain"] <= 0.6,
            "the planner's relay_map; bytes counted from the schedules, exact",
        )
    ]


def targets(rows: list[dict], options: list[dict] = ()) -> list[dict]:
    """Issue 25's ratios: DeepSeek-V3, migration-aware + ours vs deepseek + vLLM-style, EP64 on
    8 nodes and EP72 on NVL72, with the default options, with the best options of
    :func:`option_rows`, and the exchange alone; network bytes per node with dedupe vs
    without."""
    return _speedup_targets(rows, options) + _dedupe_target(rows)


def host_targets(seed: int = 0, reps: int = 5) -> list[dict]:
    """Issue 25's host targets, measured on this machine: planning + building the schedule +
    one rank's schedule (what ``rearrange()`` does before the first round) and
    ``estimate_rearrangement``, DeepSeek-V3 EP256 (32 nodes of 8), 58 layers, on deepseek's
    placements (the most moves) and migration_aware's; medians of ``reps``."""
    from bench.loadgen import load_sequence

    m = MODELS["dsv3"]
    loads = load_sequence(m.layers, m.experts, 2, "moderate", seed=seed)
    c = Cluster.preset("h100-ib400", nodes=32)
    where = f"this machine ({os.cpu_count()} cores), median of {reps}"
    out = []
    for policy in POLICIES:
        maps = _sequence(m, 256, 32, loads, policy)
        build = []
        for _ in range(reps):
            build.append(_host_build_ms(maps[0], maps[1], 256, 8, m.row, reps=1))
        est = []
        for _ in range(reps):
            t0 = time.perf_counter()
            e = estimate_rearrangement(maps[0], maps[1], 256, m.row, cluster=c)
            est.append(time.perf_counter() - t0)
        bm, em = float(np.median(build)), float(np.median(est))
        what = f"dsv3 EP256 58L ({policy} placements, {e.messages} messages, {e.rounds} rounds)"
        out.append(
            _target(
                f"{what}: plan + schedule + one rank's schedule, ms",
                round(bm, 1),
                "<= 100",
                bm <= 100,
                f"{where}; min {min(build):.1f}, max {max(build):.1f}",
                "the planner's greedy sender choice (Python, one request at a time) is most of it",
            )
        )
        out.append(
            _target(
                f"{what}: estimate_rearrangement, s",
                round(em, 3),
                "<= 1",
                em <= 1,
                f"{where}; min {min(est):.3f}, max {max(est):.3f}",
            )
        )
    return out


def _plot_time_and_network(axes, rows: list[dict]) -> None:
    """Panels 1-2: predicted seconds and network GB per rebalance against EP (DeepSeek-V3, 8-GPU
    nodes), a line per (policy, executor); network only for ours, and only where bytes cross."""
    sub = [r for r in rows if r["model"] == "dsv3" and r["cluster"] == "h100-ib400"]
    for policy in POLICIES:
        for ex in EXECUTORS:
            pts = sorted(
                (r["ep"], r["seconds_per_rebalance"], r["network_gb_per_node"])
                for r in sub
                if r["policy"] == policy and r["executor"] == ex
            )
            if not pts:
                continue
            ls = "-" if policy == "migration_aware" else "--"
            lab = f"{policy} + {ex}"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, label=lab)
            net = [p for p in pts if p[2] > 0]  # one node: nothing crosses (log scale)
            if ex in ("ours nccl", "ours dedupe") and net:
                axes[1].plot(
                    [p[0] for p in net], [p[2] for p in net], ls, marker="o", ms=3, label=lab
                )
    for ax, t in zip(axes[:2], ("predicted s per rebalance", "network GB received, busiest node")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("EP (8-GPU nodes, 8x 400 Gb/s each)")
        ax.set_title(f"DeepSeek-V3 fp8: {t}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)


def _bound_shares(bound: str) -> dict[str, float]:
    """A row's ``bound`` column ('nvlink 38% / nic 62%') as {resource: fraction of rounds}."""
    return dict(
        (p.split(" ")[0], float(p.split(" ")[1].rstrip("%")) / 100) for p in bound.split(" / ") if p
    )


def _plot_bound_bars(ax, rows: list[dict]) -> None:
    """Panel 3: for migration_aware + ours nccl, stacked bars of what bounds the rounds."""
    res = ("host", "local", "nvlink", "copy_engine", "nic")
    bars = [
        r
        for r in rows
        if r["model"] == "dsv3"
        and r["executor"] == "ours nccl"
        and r["policy"] == "migration_aware"
    ]
    labels = [f"{'nvl72' if r['cluster'] == 'gb200-nvl72' else '8gpu'} EP{r['ep']}" for r in bars]
    bottom = np.zeros(len(bars))
    shares = [_bound_shares(r["bound"]) for r in bars]
    for res_name in res:
        vals = [s.get(res_name, 0.0) for s in shares]
        ax.bar(labels, vals, bottom=bottom, label=res_name)
        bottom += np.asarray(vals)
    ax.set_title("DeepSeek-V3, migration_aware + ours: share of rounds bound by")
    ax.tick_params(axis="x", rotation=60)
    ax.legend(fontsize=7)


def plot(path: str, rows: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    _plot_time_and_network(axes, rows)
    _plot_bound_bars(axes[2], rows)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_scale(args: argparse.Namespace) -> list[dict]:
    steps = int(getattr(args, "scale_steps", 2) or 2)
    seed = int(getattr(args, "seed", 0) or 0)
    models = [m for m in (getattr(args, "scale_models", "") or "").split(",") if m] or None
    for m in models or ():
        if m not in MODELS:
            raise ValueError(f"unknown scale model {m!r} (known: {', '.join(MODELS)})")
    rows = calibration_rows()
    srows = scale_rows(steps, seed, models)
    out = getattr(args, "out", None)
    if out and not getattr(args, "no_plots", False):
        os.makedirs(out, exist_ok=True)
        p = plot(os.path.join(out, "scale.png"), srows)
        if p:
            srows[0]["plot"] = os.path.basename(p)
    opts = option_rows(steps, seed)
    return rows + srows + opts + targets(srows, opts) + host_targets(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", action="store_true", help="only the calibration rows")
    ap.add_argument("--steps", dest="scale_steps", type=int, default=2)
    ap.add_argument("--models", dest="scale_models", default="", help=", ".join(MODELS))
    ap.add_argument("--out", default="")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = calibration_rows() if a.calibrate else bench_scale(a)
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items() if k != "kind"))
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
