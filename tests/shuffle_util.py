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

# The layers the GPU shuffler tests move: DeepSeek-V3-like (fp8 w13/w2 + fp32 block scales)
# and Qwen3-like bf16 experts, scaled down, and a 1-D fp32 tensor; dtypes by torch name.
_DSV3 = [
    ((64, 112), "float8_e4m3fn"),
    ((112, 32), "float8_e4m3fn"),
    ((2, 4), "float32"),
    ((4, 2), "float32"),
]
GPU_SPECS = [_DSV3, [((96, 64), "bfloat16"), ((64, 48), "bfloat16")], _DSV3, [((300,), "float32")]]


def torch_specs(torch, specs):
    """``specs`` with the dtype names turned into torch dtypes (for :func:`make_weights`)."""
    return [[(shape, getattr(torch, dt)) for shape, dt in layer] for layer in specs]


def expert_bytes(layer: int, expert: int, index: int, nbytes: int) -> np.ndarray:
    """The bytes of tensor ``index`` of ``expert`` in ``layer``: the bench's pattern (one
    oracle of expert contents for the bench and the tests)."""
    from bench.common import pattern_np

    return pattern_np(nbytes, layer, expert, index)


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


def restrict_to_held(cur, nxt):
    """``nxt`` changed in place to need only experts ``cur`` holds: a slot of a layer asking
    for an expert that layer of ``cur`` does not hold keeps its ``cur`` expert."""
    for layer in range(nxt.shape[0]):
        held = cur[layer][cur[layer] >= 0]
        bad = (nxt[layer] >= 0) & ~np.isin(nxt[layer], held)
        nxt[layer, bad] = cur[layer, bad]


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


def layer_states(torch, weights, old_map, new_map, rank, ep_size) -> dict:
    """Per layer of this rank: "new" when every non-empty slot holds its new expert's bytes,
    else "old" when every one holds its old expert's, else "mixed"."""
    bad_new = {int(m.split()[3]) for m in check_weights(torch, weights, new_map, rank, ep_size)}
    bad_old = {int(m.split()[3]) for m in check_weights(torch, weights, old_map, rank, ep_size)}
    return {
        layer: "new" if layer not in bad_new else "old" if layer not in bad_old else "mixed"
        for layer in range(len(weights))
    }


# ---- a peer that dies mid-rearrangement (GPU; one job for every transport) -----------------


def wait_for_error(ep, h):
    """``h.wait()``: (the RearrangeError it raised or None, seconds it took)."""
    import time

    t0 = time.monotonic()
    err = None
    try:
        h.wait()
    except ep.RearrangeError as e:
        err = e
    return err, time.monotonic() - t0


def peer_death_job(ctx, outdir, timeout, make_transport, row_shape, staging_rows):
    """Every rank starts one async rearrangement over ``make_transport(ctx, timeout)`` (which
    returns the transport, a no-argument ``closed()`` saying whether it was torn down, and
    whether to synchronise the device after the failure); the last rank launches round 0 and
    exits with code 3. The others record what they saw in ``outdir/rank{r}.json``."""
    import json

    import torch

    import eplb_pynccl as ep
    from bench.eplb import make_maps

    t, closed, sync_after = make_transport(ctx, timeout)
    n, rank = ctx.world_size, ctx.rank
    layers, P = 6, 8
    old, new = make_maps(3, layers, 8 * n - n, 8 * n, n)
    dev = torch.device("cuda", ctx.device)
    weights = make_weights(torch, [[(row_shape, torch.bfloat16)]] * layers, old, rank, n, dev)
    torch.cuda.synchronize()
    row_bytes = weights[0][0][0].nbytes
    staging = None if staging_rows is None else staging_rows * row_bytes
    sh = ep.ExpertShuffler(t, weights, staging_bytes=staging)
    victim = n - 1
    h = sh.rearrange_async(old, new)
    if rank == victim:
        h.step()  # launches round 0, then the process dies mid-rearrangement
        os._exit(3)
    err, elapsed = wait_for_error(ep, h)
    if sync_after:
        torch.cuda.synchronize()
    state = layer_states(torch, weights, old, new, rank, n)
    try:
        again = None
        h.step()
    except ep.RearrangeError as e2:
        again = str(e2) == str(err)
    res = {
        "rank": rank,
        "elapsed": elapsed,
        "error": None if err is None else str(err),
        "completed": None if err is None else err.completed_layers,
        "pending": None if err is None else err.pending_layers,
        "peers": None if err is None else err.peers,
        "state": state,
        "again": again,
        "closed": closed(),
        "unchanged_here": [
            layer
            for layer in range(layers)
            if np.array_equal(
                old[layer, rank * P : (rank + 1) * P], new[layer, rank * P : (rank + 1) * P]
            )
        ],
    }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    return res


def check_peer_death(info, outdir, world, timeout) -> list[dict]:
    """What every survivor of :func:`peer_death_job` must have seen: the victim's exit named,
    a RearrangeError within the timeout, each layer entirely old or new as the error says,
    the same error again on the next step, the transport torn down. Returns their records."""
    import json

    msg = str(info.value)
    victim = world - 1
    assert f"1 of {world} ranks failed" in msg
    assert f"rank {victim} exited (exit code 3)" in msg
    out = []
    for rank in range(world - 1):
        with open(os.path.join(outdir, f"rank{rank}.json")) as fh:
            r = json.load(fh)
        assert r["error"] is not None, r
        assert r["elapsed"] <= timeout + 5, r
        assert "mixed" not in r["state"].values(), r
        for layer in r["completed"]:
            assert r["state"][str(layer)] == "new", r
        for layer in r["pending"]:
            assert r["state"][str(layer)] == "old" or layer in r["unchanged_here"], r
        assert not (set(r["completed"]) & set(r["pending"]))
        assert r["again"] is True, r  # step() after the error raises the same error
        assert r["closed"], r  # the transport was aborted / released its handles
        out.append(r)
    return out
