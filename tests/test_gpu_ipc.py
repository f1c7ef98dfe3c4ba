"""IpcTransport on a GPU: 2 and 4 processes sharing one GPU (CUDA IPC works between processes
on one device), or one process per GPU where there are more.

Exact bytes over many random rearrangements (fp8 + fp32 + bf16, duplicates, -1 slots), sync
and async, transactional and not; a peer that dies mid-round; handles released by close().
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests.gpu_util import RankFailure, run_ranks

pytestmark = pytest.mark.gpu(gpus=1)

SPECS = [
    [
        ((64, 112), "float8_e4m3fn"),
        ((112, 32), "float8_e4m3fn"),
        ((2, 4), "float32"),
        ((4, 2), "float32"),
    ],
    [((96, 64), "bfloat16"), ((64, 48), "bfloat16")],
    [((300,), "float32")],
]


def _devices(procs):
    import torch

    n = torch.cuda.device_count()
    return [r % n for r in range(procs)]


def _transport(ctx, timeout=30.0):
    import torch

    import eplb_pynccl as ep

    torch.cuda.set_device(ctx.device)
    return ep.IpcTransport(
        ctx.rank, ctx.world_size, ctx.store, device=ctx.device, key=ctx.key("ipc"), timeout=timeout
    )


def _ipc_job(ctx, seed, rearrangements):
    import torch

    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, make_weights, random_maps

    t = _transport(ctx)
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    specs = [[(shape, getattr(torch, dt)) for shape, dt in layer] for layer in SPECS]
    rng = np.random.default_rng(seed)  # the same stream on every rank: the same maps
    P = 5
    num_logical = n * P - 3  # redundant slots: duplicates
    cur, _ = random_maps(rng, len(specs), num_logical, n, P, empty_frac=0.1)
    weights = make_weights(torch, specs, cur, rank, n, dev)
    ptrs = [[w.data_ptr() for w in ws] for ws in weights]
    shufflers = {
        "transactional": ep.ExpertShuffler(t, weights),
    }
    out = []
    for k in range(rearrangements):
        _, nxt = random_maps(rng, len(specs), num_logical, n, P, empty_frac=0.1)
        for layer in range(len(specs)):  # nxt may only need experts cur holds
            held = set(cur[layer][cur[layer] >= 0].tolist())
            bad = [
                s for s in range(nxt.shape[1]) if nxt[layer, s] >= 0 and nxt[layer, s] not in held
            ]
            nxt[layer, bad] = cur[layer, bad]
        sh = shufflers["transactional"]
        if k % 2:
            h = sh.rearrange_async(cur, nxt)
            steps = 0
            while not h.done:
                h.step()
                steps += 1
                time.sleep(0.0005)
            torch.cuda.current_stream().synchronize()
            stats = h.stats
        else:
            stats = sh.rearrange(cur, nxt, verify=True)
        out.append(
            {
                "bad": check_weights(torch, weights, nxt, rank, n),
                "rounds": stats.rounds,
                "sent": stats.bytes_sent,
                "recv": stats.bytes_received,
                "peak": stats.peak_extra_bytes,
                "bound": stats.staging_bound,
            }
        )
        cur = nxt
    kept = ptrs == [[w.data_ptr() for w in ws] for ws in weights]
    opened = len(t._opened)
    t.close()
    after = {"opened": len(t._opened), "events": len(t._events), "peers": len(t._peers)}
    swapped = cur.copy()  # rank 0's and rank 1's first rows trade experts: work in every layer
    swapped[:, [0, P]] = cur[:, [P, 0]]
    try:  # use after close: refused before anything moves
        sh.rearrange(cur, swapped, verify=False)
        refused = None
    except Exception as e:  # noqa: BLE001 - the exact type is asserted by the test
        refused = f"{type(e).__name__}: {e}"
    torch.cuda.synchronize()
    return out, kept, opened, after, refused


@pytest.mark.parametrize("procs", [2, 4])
def test_ipc_random_rearrangements_exact(procs):
    results = run_ranks(_ipc_job, procs, 21 + procs, 8, timeout=240, devices=_devices(procs))
    for i in range(8):
        assert sum(r[0][i]["sent"] for r in results) == sum(r[0][i]["recv"] for r in results)
    for out, kept, opened, after, refused in results:
        assert kept, "weight tensors lost their storage"
        for r in out:
            assert r["bad"] == [], r["bad"][:5]
            assert r["peak"] <= r["bound"]
        assert opened >= procs - 1  # at least one allocation of every peer mapped
        assert after == {"opened": 0, "events": 0, "peers": 0}  # close() released everything
        assert refused == "CommunicatorStateError: this IpcTransport is closed; make a new one", (
            refused
        )


def _ipc_nontransactional_job(ctx, seed):
    import torch

    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, make_weights, random_maps

    t = _transport(ctx)
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    specs = [[(shape, getattr(torch, dt)) for shape, dt in layer] for layer in SPECS]
    rng = np.random.default_rng(seed)
    P = 4
    old, new = random_maps(rng, len(specs), n * P - 2, n, P, empty_frac=0.1)
    weights = make_weights(torch, specs, old, rank, n, dev)
    sh = ep.ExpertShuffler(t, weights, transactional=False, max_messages_per_round=6)
    stats = sh.rearrange(old, new)
    bad = check_weights(torch, weights, new, rank, n)
    t.close()
    return bad, stats.rounds


def test_ipc_direct_receives_and_many_rounds():
    results = run_ranks(_ipc_nontransactional_job, 3, 5, timeout=180, devices=_devices(3))
    assert all(bad == [] for bad, _ in results)
    assert max(r for _, r in results) >= 2


def _ipc_failure_job(ctx, outdir, timeout):
    import torch

    import eplb_pynccl as ep
    from bench.common import check as _check
    from bench.common import fill as _fill
    from bench.common import make_maps

    t = _transport(ctx, timeout=timeout)
    n, rank = ctx.world_size, ctx.rank
    layers, P = 6, 8
    old, new = make_maps(3, layers, 8 * n - n, 8 * n, n)
    dev = torch.device("cuda", ctx.device)
    weights = [
        [torch.empty((P, 256, 1024), dtype=torch.bfloat16, device=dev)] for _ in range(layers)
    ]
    _fill(torch, weights, old, rank, P)
    torch.cuda.synchronize()
    sh = ep.ExpertShuffler(t, weights, staging_bytes=3 * P * 256 * 1024 * 2)  # several rounds
    victim = n - 1
    h = sh.rearrange_async(old, new)
    if rank == victim:
        h.step()  # launches round 0, then the process dies mid-rearrangement
        os._exit(3)
    t0 = time.monotonic()
    err = None
    try:
        h.wait()
    except ep.RearrangeError as e:
        err = e
    elapsed = time.monotonic() - t0
    torch.cuda.synchronize()
    state = {}
    for layer in range(layers):
        is_new = _check(torch, [weights[layer]], new[layer : layer + 1], rank, P, first_layer=layer)
        is_old = _check(torch, [weights[layer]], old[layer : layer + 1], rank, P, first_layer=layer)
        state[layer] = "new" if is_new else "old" if is_old else "mixed"
    try:
        again = None
        h.step()
    except ep.RearrangeError as e2:
        again = str(e2) == str(err)
    t.close()
    res = {
        "rank": rank,
        "elapsed": elapsed,
        "error": None if err is None else str(err),
        "completed": None if err is None else err.completed_layers,
        "pending": None if err is None else err.pending_layers,
        "peers": None if err is None else err.peers,
        "state": state,
        "again": again,
        "released": len(t._opened) == 0 and len(t._events) == 0,
        "unchanged_here": [
            l
            for l in range(layers)
            if np.array_equal(old[l, rank * P : (rank + 1) * P], new[l, rank * P : (rank + 1) * P])
        ],
    }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    return res


@pytest.mark.parametrize("procs", [2, 4])
def test_ipc_peer_dies_mid_round(procs, tmp_path):
    timeout = 5.0
    with pytest.raises(RankFailure) as info:
        run_ranks(
            _ipc_failure_job,
            procs,
            str(tmp_path),
            timeout,
            timeout=100,
            grace=timeout + 20,
            devices=_devices(procs),
        )
    msg = str(info.value)
    victim = procs - 1
    assert f"1 of {procs} ranks failed" in msg
    assert f"rank {victim} exited (exit code 3)" in msg
    for rank in range(procs - 1):
        with open(tmp_path / f"rank{rank}.json") as fh:
            r = json.load(fh)
        assert r["error"] is not None, r
        assert r["elapsed"] <= timeout + 5, r
        assert "mixed" not in r["state"].values(), r
        for layer in r["completed"]:
            assert r["state"][str(layer)] == "new", r
        for layer in r["pending"]:
            assert r["state"][str(layer)] == "old" or layer in r["unchanged_here"], r
        assert not (set(r["completed"]) & set(r["pending"]))
        assert r["again"] is True, r
        assert r["released"], r
