"""End to end on the CPU: ExpertShuffler over TorchTransport(gloo) with 2, 3 and 4 processes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.shuffle_util import restrict_to_held, run_gloo, torch_specs

torch = pytest.importorskip("torch")


SPECS = [
    [((4, 6), "float8_e4m3fn"), ((6, 2), "bfloat16"), ((3,), "float32")],
    [((5, 3), "bfloat16"), ((2, 2), "int32")],
    [((40,), "float16"), ((7,), "uint8")],
]


def _rearrange_job(
    rank, world, seed, rounds, pack_threshold, transactional, staging, max_messages=1024
):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights, random_maps

    rng = np.random.default_rng(seed)
    P = 3
    specs = torch_specs(torch, SPECS)
    num_logical = max(2, world * P - 2)
    old, new = random_maps(rng, len(specs), num_logical, world, P, empty_frac=0.1)
    weights = make_weights(T, specs, old, rank, world, "cpu")
    ptrs = [[t.data_ptr() for t in ws] for ws in weights]
    kw = {
        "pack_threshold": pack_threshold,
        "transactional": transactional,
        "max_messages_per_round": max_messages,
    }
    if staging is not None:
        kw["staging_bytes"] = staging
    sh = ExpertShuffler(TorchTransport(), weights, **kw)
    results = []
    cur = old
    for _ in range(rounds):
        _, nxt = random_maps(rng, len(specs), num_logical, world, P, empty_frac=0.1)
        restrict_to_held(cur, nxt)  # nxt must only need experts cur holds
        stats = sh.rearrange(cur, nxt, verify=True)
        bad = check_weights(T, weights, nxt, rank, world)
        assert stats.peak_extra_bytes <= stats.staging_bound, (
            stats.peak_extra_bytes,
            stats.staging_bound,
        )
        results.append((bad, stats.bytes_sent, stats.bytes_received, stats.rounds))
        # -1 slots hold junk now; a later map may not rely on them
        cur = nxt
    same = ptrs == [[t.data_ptr() for t in ws] for ws in weights]
    # no change moves nothing
    stats = sh.rearrange(cur, cur)
    return (
        results,
        same,
        (stats.bytes_sent, stats.bytes_received, stats.messages, stats.local_copies),
    )


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_random_rearrangements_exact(world):
    out = run_gloo(_rearrange_job, world, 100 + world, 3, 1 << 20, True, None)
    for results, same, nochange in out:
        for bad, *_ in results:
            assert bad == []
        assert same, "weights lost their storage"
        assert nochange == (0, 0, 0, 0)
    # bytes sent by all ranks equal bytes received by all ranks
    for i in range(3):
        assert sum(o[0][i][1] for o in out) == sum(o[0][i][2] for o in out)


def test_gloo_direct_mode_and_small_staging_rounds():
    # pack_threshold 0: every tensor as its own message; non-transactional: direct receives;
    # a small staging bound forces several rounds.
    out = run_gloo(_rearrange_job, 3, 7, 2, 0, False, 4096, 8)
    for results, same, _ in out:
        for bad, _, _, nrounds in results:
            assert bad == []
            assert nrounds >= 2
        assert same


def _too_small_job(rank, world):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import make_weights, random_maps

    rng = np.random.default_rng(3)
    old, new = random_maps(rng, 1, 6, world, 4)
    weights = make_weights(T, [[((64,), T.float32)]], old, rank, world, "cpu")
    before = [t.clone() for t in weights[0]]
    sh = ExpertShuffler(TorchTransport(), weights, staging_bytes=64)
    try:
        sh.rearrange(old, new)
    except ValueError as e:
        return str(e), all(
            T.equal(a.view(T.uint8), b.view(T.uint8)) for a, b in zip(before, weights[0])
        )
    return None, None


def test_gloo_staging_too_small_is_refused_before_anything_moves():
    for msg, unchanged in run_gloo(_too_small_job, 2):
        assert msg is not None and msg.startswith("staging_bytes=64 is too small: layer 0 needs ")
        assert "raise staging_bytes" in msg
        assert unchanged


def _config_sweep_job(rank, world, seed, n):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights, random_maps

    rng = np.random.default_rng(seed)  # same stream on every rank: same configs and maps
    specs = torch_specs(torch, SPECS)
    P = 3
    num_logical = max(2, world * P - 1)
    cur, _ = random_maps(rng, len(specs), num_logical, world, P, empty_frac=0.1)
    weights = make_weights(T, specs, cur, rank, world, "cpu")
    failures = []
    for k in range(n):
        cfg = {
            "transactional": bool(rng.integers(2)),
            "pack_threshold": int(rng.choice([0, 64, 1 << 20])),
            "max_messages_per_round": int(rng.choice([8, 1024])),
        }
        if rng.integers(2):
            cfg["staging_bytes"] = 1 << 16
        _, nxt = random_maps(
            rng, len(specs), num_logical, world, P, empty_frac=0.1, keep_frac=float(rng.random())
        )
        restrict_to_held(cur, nxt)
        sh = ExpertShuffler(TorchTransport(), weights, **cfg)
        sh.rearrange(cur, nxt)
        bad = check_weights(T, weights, nxt, rank, world)
        if bad:
            failures.append((k, cfg, bad[:3]))
        cur = nxt
    return failures


@pytest.mark.parametrize("world", [1, 3])
def test_gloo_random_configurations_sweep(world):
    # world 1: everything is a local copy (no network); world 3: every executor option mixed
    for failures in run_gloo(_config_sweep_job, world, 2024 + world, 12, timeout=180):
        assert failures == []


def _lockstep_job(rank, world, seed):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights, random_maps

    rng = np.random.default_rng(seed)
    P = 3
    specs = torch_specs(torch, SPECS)
    old, new = random_maps(rng, len(specs), world * P - 1, world, P)
    weights = make_weights(T, specs, old, rank, world, "cpu")
    # at most one message per round: every changed layer is a round of its own
    sh = ExpertShuffler(TorchTransport(), weights, max_messages_per_round=1)
    h = sh.rearrange_async(old, new)
    rounds = h.stats.rounds
    calls = []
    while not h.done:
        calls.append(h.step(wait=True))
    return rounds, calls, check_weights(T, weights, new, rank, world)


def test_gloo_lockstep_step_advances_one_round_per_call():
    out = run_gloo(_lockstep_job, 2, 11)
    assert out[0][:2] == out[1][:2]  # the same sequence on both ranks
    for rounds, calls, bad in out:
        assert bad == []
        assert rounds >= 2
        # call 1 launches round 0; call k applies round k-2 and launches round k-1; the last
        # call applies the last round: rounds + 1 calls, each layer applied exactly once
        assert len(calls) == rounds + 1 and calls[0] == []
        assert all(len(c) >= 1 for c in calls[1:])
        applied = [l for c in calls for l in c]
        assert len(applied) == len(set(applied))


def _runs_job(rank, world, new, transactional):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import check_weights, make_weights

    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])  # rank 0 holds experts 0..3, rank 1 holds 4..7
    new = np.array([new])
    weights = make_weights(T, [[((3, 8), T.bfloat16), ((5,), T.float32)]], old, rank, world, "cpu")
    sh = ExpertShuffler(TorchTransport(), weights, pack_threshold=0, transactional=transactional)
    st = sh.rearrange(old, new)
    return (
        st.messages,
        st.experts_sent + st.experts_received,
        check_weights(T, weights, new, rank, world),
    )


@pytest.mark.parametrize("transactional", [True, False])
def test_gloo_consecutive_rows_travel_as_one_message(transactional):
    # a swap of the two ranks' experts; slots 2 and 3 cross over, but sorted by source row
    # the four transfers of each direction are still rows 0..3: one run, one message per
    # tensor each way (every old row is read by a send, so every receive is staged)
    for messages, moved, bad in run_gloo(_runs_job, 2, [4, 5, 7, 6, 0, 1, 3, 2], transactional):
        assert bad == []
        assert moved == 8
        assert messages == 2 * 2
    # rank 1's slots 0 and 1 get experts 0 and 1 (rank 0's rows 0 and 1); their old experts
    # 4 and 5 are read by nobody: non-transactional mode receives in place, row by row
    out = run_gloo(_runs_job, 2, [0, 1, 2, 3, 0, 1, 6, 7], transactional)
    for messages, moved, bad in out:
        assert bad == []
        assert moved == 2
        assert messages == (2 if transactional else 4)
