"""Timing of :func:`eplb_pynccl.planner.plan_rearrangement` on DeepSeek-V3 shapes.

58 MoE layers x 288 physical slots (256 logical experts + 32 redundant), EP 8 and EP 32.
Placements come from :func:`make_placements`, a small seeded generator: the old map is a
random permutation of the 256 experts plus 32 replicas per layer; the new map keeps about a
third of the slots, shuffles the rest among themselves and re-points about half of the
replicas to other experts (about 67% of slots change).

Run: ``python bench/planner_bench.py [--repeats N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

try:
    from eplb_pynccl.planner import plan_rearrangement
except ImportError:  # run from a checkout without installing: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from eplb_pynccl.planner import plan_rearrangement

NUM_LAYERS = 58
NUM_LOGICAL = 256
NUM_REDUNDANT = 32
NUM_PHYSICAL = NUM_LOGICAL + NUM_REDUNDANT


def _layer_placement(rng: np.random.Generator, num_logical: int, num_redundant: int):
    replicas = rng.choice(num_logical, size=num_redundant, replace=False)
    experts = np.concatenate([np.arange(num_logical), replicas])
    perm = rng.permutation(experts.size)
    placement = experts[perm]
    is_replica = perm >= num_logical  # slots holding a replica (every expert keeps one copy)
    return placement, is_replica


def make_placements(
    seed: int = 0,
    num_layers: int = NUM_LAYERS,
    num_logical: int = NUM_LOGICAL,
    num_redundant: int = NUM_REDUNDANT,
    keep_fraction: float = 1 / 3,
    replica_move_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (old_map, new_map), each ``[num_layers, num_logical + num_redundant]``."""
    rng = np.random.default_rng(seed)
    n = num_logical + num_redundant
    old = np.empty((num_layers, n), dtype=np.int64)
    new = np.empty((num_layers, n), dtype=np.int64)
    for layer in range(num_layers):
        placement, is_replica = _layer_placement(rng, num_logical, num_redundant)
        old[layer] = placement
        nxt = placement.copy()
        rep = is_replica.copy()
        moved = rng.random(n) >= keep_fraction
        idx = np.flatnonzero(moved)
        shuffled = rng.permutation(idx)
        nxt[idx] = placement[shuffled]
        rep[idx] = is_replica[shuffled]
        # Re-point some replicas to other experts: the load-balancer's choice of hot experts.
        for s in np.flatnonzero(rep):
            if rng.random() < replica_move_prob:
                nxt[s] = rng.integers(num_logical)
        new[layer] = nxt
    return old, new


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return float(np.median(ts)), float(np.percentile(ts, 90))


def bench_planner(repeats: int = 50, seed: int = 0) -> list[dict]:
    """Time plan_rearrangement on DeepSeek-V3 shapes; one dict per configuration."""
    old, new = make_placements(seed)
    changed = float(((new != old) & (new != -1)).mean())
    rows = []
    for ep, rpn in ((8, None), (8, 8), (32, None), (32, 8)):
        plan = plan_rearrangement(old, new, ep, ranks_per_node=rpn)
        med, p90 = _time(
            lambda ep=ep, rpn=rpn: plan_rearrangement(old, new, ep, ranks_per_node=rpn), repeats
        )
        sent = plan.sent_per_rank()
        rows.append(
            {
                "layers": NUM_LAYERS,
                "slots": NUM_PHYSICAL,
                "ep": ep,
                "ranks_per_node": rpn,
                "changed_frac": changed,
                "transfers": plan.num_transfers,
                "copies": plan.num_copies,
                "max_sent": int(sent.max()),
                "mean_sent": float(sent.mean()),
                "median_ms": med,
                "p90_ms": p90,
            }
        )
    return rows


def run_planner(args: argparse.Namespace) -> list[dict]:
    """bench part ``planner``: :func:`bench_planner` with ``--planner-repeats`` and ``--seed``."""
    return bench_planner(repeats=int(args.planner_repeats), seed=int(args.seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = bench_planner(args.repeats, args.seed)
    head = (
        f"{'shape':>10} {'EP':>3} {'rpn':>4} {'changed':>8} {'xfers':>6} {'copies':>6} "
        f"{'sent max/mean':>14} {'median ms':>10} {'p90 ms':>8}"
    )
    print(head)
    for r in rows:
        rpn = "-" if r["ranks_per_node"] is None else str(r["ranks_per_node"])
        print(
            f"{r['layers']:>4}x{r['slots']:<5} {r['ep']:>3} {rpn:>4} {r['changed_frac']:>8.1%} "
            f"{r['transfers']:>6} {r['copies']:>6} "
            f"{r['max_sent']:>6}/{r['mean_sent']:<7.1f} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f}"
        )


if __name__ == "__main__":
    main()
