"""IpcTransport on a GPU: 2 and 4 processes sharing one GPU (CUDA IPC works between processes
on one device), or one process per GPU where there are more.

Exact bytes over many random rearrangements (fp8 + fp32 + bf16, duplicates, -1 slots), sync
and async, transactional and not; a peer that dies mid-round and one that never launches (no
stream left waiting on it); stream and host signals; handles released by close().
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.gpu_util import RankFailure, run_ranks
from tests.shuffle_util import (
    GPU_SPECS,
    check_peer_death,
    peer_death_job,
    restrict_to_held,
    torch_specs,
)

pytestmark = pytest.mark.gpu(gpus=1)


def _devices(procs):
    import torch

    n = torch.cuda.device_count()
    return [r % n for r in range(procs)]


def _transport(ctx, timeout=30.0, pull_graphs=True, signals="auto"):
    import torch

    import eplb_pynccl as ep

    torch.cuda.set_device(ctx.device)
    return ep.IpcTransport(
        ctx.rank,
        ctx.world_size,
        ctx.store,
        device=ctx.device,
        key=ctx.key("ipc"),
        timeout=timeout,
        pull_graphs=pull_graphs,
        signals=signals,
    )


def _ipc_job(ctx, seed, rearrangements, signals="auto"):
    import torch

    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, make_weights, random_maps

    t = _transport(ctx, signals=signals)
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    specs = torch_specs(torch, GPU_SPECS)
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
        restrict_to_held(cur, nxt)  # nxt may only need experts cur holds
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
    opened = t._local.held()["opened"]
    method = (t.pull_method, t.signals_method)
    t.close()
    after = t._local.held()
    swapped = cur.copy()  # rank 0's and rank 1's first rows trade experts: work in every layer
    swapped[:, [0, P]] = cur[:, [P, 0]]
    try:  # use after close: refused before anything moves
        sh.rearrange(cur, swapped, verify=False)
        refused = None
    except Exception as e:  # noqa: BLE001 - the exact type is asserted by the test
        refused = f"{type(e).__name__}: {e}"
    torch.cuda.synchronize()
    return out, kept, opened, after, refused, method


@pytest.mark.parametrize(("procs", "signals"), [(2, "stream"), (4, "stream"), (3, "host")])
def test_ipc_random_rearrangements_exact(procs, signals):
    results = run_ranks(
        _ipc_job, procs, 21 + procs, 8, signals, timeout=240, devices=_devices(procs)
    )
    for i in range(8):
        assert sum(r[0][i]["sent"] for r in results) == sum(r[0][i]["recv"] for r in results)
    for out, kept, opened, after, refused, method in results:
        # the pulls were captured (not the batch fallback); the ordering asked for ran
        assert method == ("graph", signals)
        assert kept, "weight tensors lost their storage"
        for r in out:
            assert r["bad"] == [], r["bad"][:5]
            assert r["peak"] <= r["bound"]
        assert opened >= procs - 1  # at least one allocation of every peer mapped
        # close() released everything
        assert after == {"opened": 0, "events": 0, "peers": 0, "graphs": 0}
        assert refused == "CommunicatorStateError: this IpcTransport is closed; make a new one", (
            refused
        )


def _ipc_nontransactional_job(ctx, seed):
    import torch

    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, make_weights, random_maps

    t = _transport(ctx, pull_graphs=False)  # the batch path
    n, rank = ctx.world_size, ctx.rank
    dev = torch.device("cuda", ctx.device)
    specs = torch_specs(torch, GPU_SPECS)
    rng = np.random.default_rng(seed)
    P = 4
    old, new = random_maps(rng, len(specs), n * P - 2, n, P, empty_frac=0.1)
    weights = make_weights(torch, specs, old, rank, n, dev)
    sh = ep.ExpertShuffler(t, weights, transactional=False, max_messages_per_round=6)
    stats = sh.rearrange(old, new)
    bad = check_weights(torch, weights, new, rank, n)
    method = t.signals_method
    t.close()
    return bad, stats.rounds, method


def test_ipc_direct_receives_and_many_rounds():
    results = run_ranks(_ipc_nontransactional_job, 3, 5, timeout=180, devices=_devices(3))
    assert all(bad == [] for bad, _, _ in results)
    assert max(r for _, r, _ in results) >= 2
    # "auto" chose GPU-side signals where the driver runs stream memory operations
    assert {m for _, _, m in results} == {"stream"}


def _ipc_for_peer_death(ctx, timeout):
    t = _transport(ctx, timeout=timeout)

    def closed():
        t.close()
        return t._local.held()["opened"] == 0 and t._local.held()["events"] == 0

    return t, closed, True


@pytest.mark.parametrize("procs", [2, 4])
def test_ipc_peer_dies_mid_round(procs, tmp_path):
    timeout = 5.0
    with pytest.raises(RankFailure) as info:
        run_ranks(
            peer_death_job,
            procs,
            str(tmp_path),
            timeout,
            _ipc_for_peer_death,
            (256, 1024),
            3 * 8,  # several rounds
            timeout=100,
            grace=timeout + 20,
            devices=_devices(procs),
        )
    check_peer_death(info, str(tmp_path), procs, timeout)


def _peer_never_launches_job(ctx, outdir, signals):
    """The last rank sets up and then never launches a round (alive, idle); the others run
    one rearrangement with a 3 s timeout."""
    import json
    import os

    import torch

    import eplb_pynccl as ep
    from bench.eplb import make_maps
    from tests.shuffle_util import make_weights, wait_for_error

    t = _transport(ctx, timeout=3.0, signals=signals)
    n, rank = ctx.world_size, ctx.rank
    layers = 4
    old, new = make_maps(3, layers, 8 * n - n, 8 * n, n)
    dev = torch.device("cuda", ctx.device)
    weights = make_weights(torch, [[((256, 1024), torch.bfloat16)]] * layers, old, rank, n, dev)
    torch.cuda.synchronize()
    sh = ep.ExpertShuffler(t, weights)
    if rank == n - 1:  # idle until every other rank has reported
        until = time.monotonic() + 90
        while len(os.listdir(outdir)) < n - 1 and time.monotonic() < until:
            time.sleep(0.05)
        t.close()
        return None
    err, elapsed = wait_for_error(ep, sh.rearrange_async(old, new))
    t1 = time.monotonic()
    torch.cuda.synchronize()  # no stream of this rank may be left waiting on the idle peer
    synced = time.monotonic() - t1
    out = {
        "cause": None if err is None else type(err.__cause__).__name__,
        "message": None if err is None else str(err),
        "elapsed": elapsed,
        "synced": synced,
        "signals": t.signals_method,
    }
    t.close()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    return out


@pytest.mark.parametrize(("procs", "signals"), [(2, "stream"), (3, "stream"), (2, "host")])
def test_ipc_peer_that_never_launches_times_out_and_leaves_no_stream_blocked(
    procs, signals, tmp_path
):
    results = run_ranks(
        _peer_never_launches_job,
        procs,
        str(tmp_path),
        signals,
        timeout=150,
        devices=_devices(procs),
    )
    survivors = [r for r in results if r is not None]
    assert len(survivors) == procs - 1
    for r in survivors:
        assert r["signals"] == signals
        assert r["cause"] in ("TimeoutError", "RuntimeError"), r
        assert r["elapsed"] < 3.0 + 5.0, r
        assert r["synced"] < 5.0, r  # the abort released this rank's stream waits
    # the rank whose own round timed out says so; the others may hear of it first
    assert any(r["cause"] == "TimeoutError" for r in survivors), survivors
    assert any("did not complete within 3.0 s" in r["message"] for r in survivors), survivors
