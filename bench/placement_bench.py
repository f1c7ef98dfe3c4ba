"""The ``placement`` part of ``make bench`` (CPU, in the parent): EPLB policies over load sequences.

For every model shape and drift level (``bench/loadgen.py``), a seeded sequence of
``--placement-steps + 1`` load windows; the first window's DeepSeek placement is where every
policy starts, then each policy rebalances at every following window from *its own* previous
placement (the sequence an engine would go through):

* ``deepseek``: :func:`eplb_pynccl.rebalance` ``policy="deepseek"`` (from scratch each time);
* ``deepseek relabelled``: ``policy="deepseek_relabelled"`` (the same packs, placed to keep rows);
* ``migration_aware``: ``policy="migration_aware"`` (default target: DeepSeek's imbalance);
* ``keep old``: never moves (the first placement under every later window's loads).

Per (shape, drift, policy), over the rebalances: mean and max imbalance (max GPU load / mean,
per layer, averaged over layers), slots changed (% of all slots), the bytes the busiest GPU
receives per rebalance (mean and max), bytes crossing nodes per rebalance (all GPUs), and the
policy's time (median and max; deepseek's beside the others). The targets of issue 11 are
checked in rows of part ``placement-targets``.

Shapes (:data:`SHAPES`), with the expert sizes of the public model configs:

* DeepSeek-V3: 58 MoE layers, 256 experts in 8 groups, 288 slots (32 redundant, as in
  DeepSeek's own deployment); EP8 on one node and EP32 on 4 nodes of 8 GPUs (hierarchical
  there); expert = w13 [4096, 7168] + w2 [7168, 2048] fp8 + scales [32, 56] and [56, 16] fp32
  = 42.0 MiB.
* Qwen3-30B-A3B: 48 layers x 128 experts (hidden 2048, moe_intermediate 768), 144 slots
  (16 redundant, 12.5%: 36 or 18 per GPU), EP4 and EP8 on one node; bf16 w13 [1536, 2048] +
  w2 [2048, 768] = 9 MiB.
* Qwen3-235B-A22B: 94 layers x 128 experts (hidden 4096, moe_intermediate 1536), 144 slots,
  EP8 on one node and EP16 on two; bf16 w13 [3072, 4096] + w2 [4096, 1536] = 36 MiB.

Qwen3 has no expert groups: DeepSeek's global variant there.

Part ``placement-time``: policy time of deepseek and migration_aware, 58 layers, DeepSeek-V3
(256 experts, 8 groups) and Kimi-K2 (384 experts, no groups) at EP 8-256 with
``ceil(experts / ep) + r`` slots per GPU (r = 1, 4), 8 GPUs per node, moderate drift; idle and
with one busy-loop process per core started and stopped beside it; BLAS threads at their
defaults. Target (issue 23): migration_aware <= 25 ms.

Run alone: ``python -m bench.placement_bench [--steps N] [--shapes ...] [--drifts ...]``
(``--time-only`` for part placement-time alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

try:
    import eplb_pynccl  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eplb_pynccl.placement import placement_imbalance, rebalance  # noqa: E402

from .loadgen import DRIFTS, load_sequence, regime_steps  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
DSV3_EXPERT_BYTES = 4096 * 7168 + 7168 * 2048 + (32 * 56 + 56 * 16) * 4  # 42.0 MiB
QWEN30_EXPERT_BYTES = (1536 * 2048 + 2048 * 768) * 2  # 9 MiB
QWEN235_EXPERT_BYTES = (3072 * 4096 + 4096 * 1536) * 2  # 36 MiB


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    experts: int
    physical: int
    ep: int
    nodes: int
    groups: int | None
    row_bytes: int
    top_k: int

    @property
    def label(self) -> str:
        return f"{self.name} ep{self.ep}" + (f" {self.nodes}n" if self.nodes > 1 else "")


SHAPES: dict[str, Shape] = {
    s.label.replace(" ", "-"): s
    for s in (
        Shape("dsv3", 58, 256, 288, 8, 1, 8, DSV3_EXPERT_BYTES, 8),
        Shape("dsv3", 58, 256, 288, 32, 4, 8, DSV3_EXPERT_BYTES, 8),
        Shape("qwen3-30b", 48, 128, 144, 4, 1, None, QWEN30_EXPERT_BYTES, 8),
        Shape("qwen3-30b", 48, 128, 144, 8, 1, None, QWEN30_EXPERT_BYTES, 8),
        Shape("qwen3-235b", 94, 128, 144, 8, 1, None, QWEN235_EXPERT_BYTES, 8),
        Shape("qwen3-235b", 94, 128, 144, 16, 2, None, QWEN235_EXPERT_BYTES, 8),
    )
}

POLICIES = ("deepseek", "deepseek relabelled", "migration_aware", "keep old")
_API = {
    "deepseek": "deepseek",
    "deepseek relabelled": "deepseek_relabelled",
    "migration_aware": "migration_aware",
}

BYTES_FRACTION_TARGET = 0.1  # steady/moderate: migration_aware moves <= 1/10 of deepseek's bytes
TIME_TARGET_MS = 50.0  # DeepSeek-V3 EP32 policy time on the 2-core CPU machine


def _seed(seed: int, shape: Shape, drift: str) -> int:
    key = f"{shape.label}/{drift}".encode()
    return (
        seed * 1_000_003 + int.from_bytes(key[:8].ljust(8, b"\0"), "little") + sum(key) * 7919
    ) % (1 << 63)


def _keep_old_step(cur, loads, shape: Shape, st: dict) -> None:
    """One rebalance of policy 'keep old': the imbalance of the placement kept, nothing moved."""
    t0 = time.perf_counter()
    im = placement_imbalance(cur, loads, shape.ep)
    st["ms"].append((time.perf_counter() - t0) * 1e3)
    st["imb"].append(im)
    st["chg"].append(0.0)
    st["recv"].append(0)
    st["inter"].append(0)


def _over_reference(res, loads, cur, shape: Shape, kw: dict) -> bool:
    """The per-call promise: never more bytes than the relabelled reference would move from
    this same placement (computed here, not timed)."""
    ref = rebalance(
        loads,
        shape.physical,
        shape.ep,
        old_map=cur,
        policy="deepseek_relabelled",
        **kw,
    )
    return res.bytes_received_max > ref.bytes_received_max


def _policy_steps(pol: str, seq, first, shape: Shape, steps: int, shifts: set, kw: dict) -> dict:
    """Per-rebalance figures of one policy over the sequence ``seq``, from placement ``first``."""
    cur = first
    st: dict = {"imb": [], "chg": [], "recv": [], "inter": [], "ms": [], "shift_recv": []}
    st["missed"], st["over_ref"] = 0, 0
    for t in range(1, steps + 1):
        if pol == "keep old":
            _keep_old_step(cur, seq[t], shape, st)
            continue
        res = rebalance(seq[t], shape.physical, shape.ep, old_map=cur, policy=_API[pol], **kw)
        st["ms"].append(res.seconds * 1e3)
        st["imb"].append(res.imbalance)
        st["chg"].append(float(res.slots_changed.sum()) / (shape.layers * shape.physical))
        st["recv"].append(res.bytes_received_max)
        st["inter"].append(res.internode_bytes_total)
        if t in shifts:
            st["shift_recv"].append(res.bytes_received_max)
        if pol == "migration_aware":
            st["missed"] += not res.reached_target
            st["over_ref"] += _over_reference(res, seq[t], cur, shape, kw)
        cur = res.new_map
    return st


def _policy_row(shape: Shape, drift: str, pol: str, steps: int, st: dict, shifts: set) -> dict:
    """The row of one policy: means, peaks and medians of its per-rebalance figures ``st``."""
    im = np.stack(st["imb"])  # [steps, layers]
    recv, ms = st["recv"], st["ms"]
    row = {
        "shape": shape.label,
        "drift": drift,
        "policy": pol,
        "rebalances": steps,
        "imb_mean": round(float(im.mean()), 4),
        "imb_max": round(float(im.max()), 4),
        "imb_worst_layer_mean": round(float(im.max(1).mean()), 4),
        "excess_pct": round(100 * float(im.mean() - 1), 3),
        "excess_pct_max": round(100 * float(im.max() - 1), 2),
        "changed_pct": round(100 * float(np.mean(st["chg"])), 2),
        "recv_max_gib": round(float(np.mean(recv)) / GiB, 3),
        "recv_max_gib_peak": round(float(np.max(recv)) / GiB, 3),
        "internode_gib": round(float(np.mean(st["inter"])) / GiB, 3),
        "ms_median": round(float(np.median(ms)), 2),
        "ms_max": round(float(np.max(ms)), 2),
    }
    if shifts and pol != "keep old":
        row["shift_recv_max_gib"] = round(float(np.mean(st["shift_recv"])) / GiB, 3)
    if pol == "migration_aware":
        row["target_missed"] = st["missed"]
        row["over_ref"] = st["over_ref"]
    return row


def run_sequence(shape: Shape, drift: str, steps: int, seed: int = 0) -> list[dict]:
    """One row per policy for ``steps`` consecutive rebalances of one shape and drift."""
    seq = load_sequence(
        shape.layers,
        shape.experts,
        steps + 1,
        drift,
        seed=_seed(seed, shape, drift),
        top_k=shape.top_k,
    )
    kw = dict(num_nodes=shape.nodes, num_groups=shape.groups, row_bytes=shape.row_bytes)
    first = rebalance(seq[0], shape.physical, shape.ep, **kw).new_map
    shifts = set(regime_steps(steps + 1, drift))
    rows = []
    for pol in POLICIES:
        st = _policy_steps(pol, seq, first, shape, steps, shifts, kw)
        rows.append(_policy_row(shape, drift, pol, steps, st, shifts))
    by = {r["policy"]: r for r in rows}
    ds = by["deepseek"]
    for r in rows:
        if ds["recv_max_gib"] > 0:
            r["bytes_vs_deepseek"] = round(r["recv_max_gib"] / ds["recv_max_gib"], 4)
    return rows


def _target_row(shape: str, drift: str, target: str, measured: str, why: list[str]) -> dict:
    """A placement-targets row: met where ``why`` (what falls short) is empty."""
    return {
        "shape": shape,
        "drift": drift,
        "target": target,
        "measured": measured,
        "status": "MISSED: " + "; ".join(why) if why else "met",
    }


def _bytes_target(shape: str, drift: str, ma: dict, ds: dict) -> dict:
    """Steady/moderate drift: migration_aware at deepseek's imbalance, with <= 1/10 its bytes."""
    frac = ma["recv_max_gib"] / ds["recv_max_gib"] if ds["recv_max_gib"] else 0.0
    ok_imb = ma["imb_mean"] <= ds["imb_mean"] + 1e-9
    ok_b = frac <= BYTES_FRACTION_TARGET
    why = []
    if not ok_imb:
        why.append(f"imbalance {ma['imb_mean']:.4f} > deepseek {ds['imb_mean']:.4f}")
    if not ok_b:
        why.append(f"bytes {frac:.1%} of deepseek's")
    return _target_row(
        shape,
        drift,
        "imbalance <= deepseek's and bytes <= 1/10 of deepseek's",
        f"imbalance {ma['imb_mean']:.4f} vs {ds['imb_mean']:.4f}; bytes "
        f"{ma['recv_max_gib']:.3f} vs {ds['recv_max_gib']:.3f} GiB ({frac:.1%})",
        why,
    )


def _regime_target(shape: str, drift: str, ma: dict, rl: dict) -> dict:
    """Regime drift: migration_aware never moves more than deepseek relabelled, at its
    imbalance."""
    ok_imb = ma["imb_mean"] <= rl["imb_mean"] + 1e-9
    why = []
    if ma["over_ref"]:
        why.append(
            f"{ma['over_ref']} rebalance(s) moved more than the reference from the same placement"
        )
    if ma["recv_max_gib"] > rl["recv_max_gib"] + 1e-12:
        why.append("more bytes than deepseek relabelled over the sequence")
    if not ok_imb:
        why.append(f"imbalance {ma['imb_mean']:.4f} > relabelled {rl['imb_mean']:.4f}")
    return _target_row(
        shape,
        drift,
        "never more bytes than deepseek relabelled, at its imbalance",
        f"bytes {ma['recv_max_gib']:.3f} vs {rl['recv_max_gib']:.3f} GiB "
        f"(at shifts {ma.get('shift_recv_max_gib', 0):.3f} vs "
        f"{rl.get('shift_recv_max_gib', 0):.3f}); imbalance {ma['imb_mean']:.4f} "
        f"vs {rl['imb_mean']:.4f}",
        why,
    )


def _policy_targets(rows: list[dict]) -> list[dict]:
    """The bytes/imbalance target of each (shape, drift) of part 'placement' in ``rows``."""
    out = []
    keys = list(
        dict.fromkeys(
            (r["shape"], r["drift"]) for r in rows if r.get("part", "placement") == "placement"
        )
    )
    for shape, drift in keys:
        by = {r["policy"]: r for r in rows if r.get("shape") == shape and r.get("drift") == drift}
        ma, ds, rl = by.get("migration_aware"), by.get("deepseek"), by.get("deepseek relabelled")
        if not (ma and ds and rl):
            continue
        if drift in ("steady", "moderate"):
            out.append(_bytes_target(shape, drift, ma, ds))
        elif drift == "regime":
            out.append(_regime_target(shape, drift, ma, rl))
    return out


def _time_targets(rows: list[dict]) -> list[dict]:
    """The time target, at every drift level (judged on the median)."""
    out = []
    for r in rows:
        if r.get("shape") == "dsv3 ep32 4n" and r.get("policy") == "migration_aware":
            ds = next(
                x
                for x in rows
                if x.get("shape") == r["shape"]
                and x.get("drift") == r["drift"]
                and x.get("policy") == "deepseek"
            )
            ok = r["ms_median"] <= TIME_TARGET_MS
            status = "met" if ok else f"MISSED: median {r['ms_median']:.1f} ms"
            if ok and r["ms_max"] > TIME_TARGET_MS:
                status += f" (median; the slowest rebalance took {r['ms_max']:.1f} ms)"
            out.append(
                {
                    "shape": r["shape"],
                    "drift": r["drift"],
                    "target": f"policy time <= {TIME_TARGET_MS:g} ms",
                    "measured": f"migration_aware {r['ms_median']:.1f} ms median (max {r['ms_max']:.1f}); "
                    f"deepseek {ds['ms_median']:.1f} ms",
                    "status": status,
                }
            )
    return out


def targets(rows: list[dict]) -> list[dict]:
    """Rows of part 'placement-targets': each target of issue 11, met or missed, and why."""
    out = _policy_targets(rows) + _time_targets(rows)
    for r in out:
        r["part"] = "placement-targets"
    return out


# policy time (part 'placement-time'): 58 layers, EP 8-256, idle and beside busy loops
TIME_MODELS = {"dsv3": (256, 8), "kimi-k2": (384, 1)}  # experts, expert groups
TIME_EPS = (8, 16, 32, 64, 128, 256)
TIME_REDUNDANT = (1, 4)  # further slots per GPU: ceil(experts / ep) + r slots per GPU
POLICY_TIME_TARGET_MS = 25.0  # issue 23: 58 layers, EP8-256, loaded 2-core host


class _BusyLoops:
    """One busy-loop process per core beside the measurement (started and stopped here)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list = []

    def __enter__(self):
        import subprocess

        code = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.3)  # let them reach the loop
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def policy_time(
    steps: int = 3, seed: int = 0, eps=TIME_EPS, redundant=TIME_REDUNDANT
) -> list[dict]:
    """Rows of part 'placement-time': median and max policy time (``RebalanceResult.seconds``)
    of deepseek and migration_aware over ``steps`` rebalances of drifting loads (moderate),
    58 layers, 8 GPUs per node, for each model, EP and redundancy; idle, then with one
    busy-loop process per core. BLAS threads are left at their defaults. Beside the wall
    times, the median CPU time of this process per call (``*_cpu_ms_median``: on a host
    shared with other work, the policy's own cost)."""
    cases = []
    for model, (E, G) in TIME_MODELS.items():
        for ep in eps:
            for r in redundant:
                P = -(-E // ep) + r
                cases.append((model, E, G, ep, P))
    seqs = {
        (m, E): load_sequence(58, E, steps + 1, "moderate", seed=seed + E, top_k=8)
        for m, E, *_ in cases
    }
    out = []
    for cond in ("idle", "loaded"):
        ctx = _BusyLoops(os.cpu_count() or 1) if cond == "loaded" else None
        if ctx:
            ctx.__enter__()
        try:
            for model, E, G, ep, P in cases:
                seq = seqs[(model, E)]
                nodes = max(1, ep // 8)
                kw = dict(num_nodes=nodes, num_groups=G, row_bytes=1)
                first = rebalance(seq[0], ep * P, ep, **kw).new_map
                row = {"model": model, "ep": ep, "slots_per_gpu": P, "condition": cond}
                for pol in ("deepseek", "migration_aware"):
                    cur, ms, cpu = first, [], []
                    for t in range(1, steps + 1):
                        c0 = time.process_time()
                        res = rebalance(seq[t], ep * P, ep, old_map=cur, policy=pol, **kw)
                        cpu.append((time.process_time() - c0) * 1e3)
                        ms.append(res.seconds * 1e3)
                        cur = res.new_map
                    key = "ds" if pol == "deepseek" else "ma"
                    row[f"{key}_ms_median"] = round(float(np.median(ms)), 1)
                    row[f"{key}_ms_max"] = round(float(np.max(ms)), 1)
                    # this process's CPU time: on a shared host, less of the others' load
                    row[f"{key}_cpu_ms_median"] = round(float(np.median(cpu)), 1)
                row["ma_vs_ds"] = round(row["ma_ms_median"] / row["ds_ms_median"], 2)
                row["status"] = (
                    "met"
                    if row["ma_ms_median"] <= POLICY_TIME_TARGET_MS
                    else f"MISSED: migration_aware {row['ma_ms_median']:.0f} ms"
                )
                out.append(row)
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    for r in out:
        r["part"] = "placement-time"
    return out


def bench_placement(args: argparse.Namespace) -> list[dict]:
    steps = int(getattr(args, "placement_steps", 20) or 20)
    seed = int(getattr(args, "seed", 0) or 0)
    shapes = [s for s in (getattr(args, "placement_shapes", "") or "").split(",") if s] or list(
        SHAPES
    )
    drifts = [d for d in (getattr(args, "placement_drifts", "") or "").split(",") if d] or list(
        DRIFTS
    )
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown placement shape {s!r} (known: {', '.join(SHAPES)})")
    for d in drifts:
        if d not in DRIFTS:
            raise ValueError(f"unknown drift {d!r} (known: {', '.join(DRIFTS)})")
    # warm-up: the first relabelling imports scipy (~0.3 s), which no rebalance should pay
    rebalance(np.ones((1, 2)), 2, 1, old_map=np.array([[0, 1]]), policy="deepseek_relabelled")
    rows: list[dict] = []
    for s in shapes:
        for d in drifts:
            rows += run_sequence(SHAPES[s], d, steps, seed)
    for r in rows:
        r["part"] = "placement"
    timing = policy_time(int(getattr(args, "placement_time_steps", 3) or 3), seed)
    return rows + targets(rows) + timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", dest="placement_steps", type=int, default=20)
    ap.add_argument("--shapes", dest="placement_shapes", default="", help=", ".join(SHAPES))
    ap.add_argument("--drifts", dest="placement_drifts", default="", help=", ".join(DRIFTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-only", action="store_true", help="only part placement-time")
    ap.add_argument("--time-steps", dest="placement_time_steps", type=int, default=3)
    a = ap.parse_args()
    rows = policy_time(a.placement_time_steps, a.seed) if a.time_only else bench_placement(a)
    from .report import part_table, text_table

    for part in ("placement", "placement-targets", "placement-time"):
        if not any(r["part"] == part for r in rows):
            continue
        h, c = part_table(part, [r for r in rows if r["part"] == part])
        print(text_table(h, c))


if __name__ == "__main__":
    main()
