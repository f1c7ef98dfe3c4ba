"""Helpers shared by the shuffler tests (CPU/gloo and GPU): expert contents and random maps.

Every (layer, expert, tensor) has its own deterministic bytes, so after a rearrangement each
row can be checked exactly against the expert the new map assigns to its slot.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback

import numpy as np


def expert_bytes(layer: int, expert: int, index: int, nbytes: int) -> np.ndarray:
    rng = np.random.default_rng([layer, expert, index, 12345])
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


def make_weights(torch, specs, old_map, rank, ep_size, device):
    """specs[layer] = [(shape_without_rows, dtype), ...]; rows hold old_map's experts (-1: junk)."""
    old_map = np.asarray(old_map)
    P = old_map.shape[1] // ep_size
    weights = []
    for layer, spec in enumerate(specs):
        ws = []
        for i, (shape, dtype) in enumerate(spec):
            t = torch.empty((P, *shape), dtype=dtype, device=device)
            row = t[0].nbytes
            host = np.empty((P, row), dtype=np.uint8)
            for r in range(P):
                e = int(old_map[layer, rank * P + r])
                host[r] = expert_bytes(layer, e if e >= 0 else 10_000 + r, i, row)
            t.view(torch.uint8).view(P, row).copy_(torch.from_numpy(host))
            ws.append(t)
        weights.append(ws)
    return weights


def check_weights(torch, weights, new_map, rank, ep_size) -> list[str]:
    """Mismatches (empty = every non-empty slot holds exactly its new expert's bytes)."""
    new_map = np.asarray(new_map)
    P = new_map.shape[1] // ep_size
    bad = []
    for layer, ws in enumerate(weights):
        for i, t in enumerate(ws):
            host = t.contiguous().view(torch.uint8).view(P, -1).cpu().numpy()
            for r in range(P):
                e = int(new_map[layer, rank * P + r])
                if e < 0:
                    continue
                if not np.array_equal(host[r], expert_bytes(layer, e, i, host.shape[1])):
                    bad.append(f"rank {rank} layer {layer} tensor {i} row {r}: expected expert {e}")
    return bad


def random_maps(
    rng: np.random.Generator,
    num_layers,
    num_logical,
    ep_size,
    slots_per_rank,
    *,
    empty_frac=0.0,
    keep_frac=0.3,
):
    """Old/new maps where every logical expert appears at least once (when slots allow),
    with redundancy filling the rest, some -1 slots, and some unchanged slots."""
    n = ep_size * slots_per_rank
    old = np.empty((num_layers, n), dtype=np.int64)
    new = np.empty((num_layers, n), dtype=np.int64)
    for layer in range(num_layers):
        for m in (old, new):
            base = np.arange(num_logical) % num_logical
            extra = rng.integers(0, num_logical, size=max(0, n - num_logical))
            m[layer] = rng.permutation(np.concatenate([base, extra])[:n])
        keep = rng.random(n) < keep_frac
        new[layer, keep] = old[layer, keep]
        if empty_frac:
            new[layer, rng.random(n) < empty_frac] = -1
        # every expert new needs must exist in old: replace missing ones by a held one
        held = set(old[layer].tolist())
        for s in range(n):
            if new[layer, s] >= 0 and new[layer, s] not in held:
                new[layer, s] = old[layer, s]
    return old, new


# ---- CPU process groups (gloo) -------------------------------------------------------------


def _child(rank, world, rendezvous, fn, args, q):
    try:
        import torch.distributed as dist

        # a file rendezvous: no port that another process could take between pick and bind
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
        )
        try:
            q.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        q.put((rank, "err", traceback.format_exc()))


def run_gloo(fn, world, *args, timeout=120):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group;
    return the results in rank order. A failing rank fails the call with its traceback; a job
    past ``timeout`` seconds fails it too (the processes are killed)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="eplb_gloo_"), "rendezvous")
    procs = [
        ctx.Process(target=_child, args=(r, world, rendezvous, fn, args, q)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world):
            try:
                rank, status, val = q.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(out))
                raise AssertionError(f"ranks {missing} did not finish within {timeout} s") from None
            if status == "err":
                raise AssertionError(f"rank {rank} failed:\n{val}")
            out[rank] = val
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
