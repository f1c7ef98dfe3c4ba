"""ExpertLocationUpdater.update end to end (SGLang's own method and global metadata; its
canary variant needs SGLang's published device config, which only a server sets up), a peer that
dies mid-update named within the timeout, and one that dies between the steps of a split
update: every layer whole at one step's placement, the layers between old and new named."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import tempfile
import time
import traceback

import pytest

from tests_sglang.conftest import RANK_ENV
from tests_sglang.util import TIMEOUT, clone, metadata, raw_bytes, sequence, weights, world

NUM_LAYERS, PER_RANK = 4, 4


def updater_job(ctx, seed, nnodes):
    """SGLang's updater with eplb_pynccl installed vs without, on a subset of the layers: the
    same bytes, the same return value, the same metadata afterwards."""
    import torch
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl.integrations import sglang as S

    rank, ws = world(ctx)
    num_physical = PER_RANK * ws
    num_logical = num_physical - 3
    old, new = sequence(seed, 1, NUM_LAYERS, num_logical, num_physical)
    start = weights(torch, old, rank, ws, NUM_LAYERS)
    subset = [2, 0, 3]

    def run(w, ours: bool):
        el.set_global_expert_location_metadata(
            metadata(torch, old, num_logical, ws), allow_overwrite=True
        )
        up = U.ExpertLocationUpdater()
        if ours:
            S.install(transport="auto")
        else:
            up._first_execution = False  # SGLang's own: CPU torch has no empty_cache()
        try:
            missing = up.update(
                {i: w[i] for i in range(NUM_LAYERS)},
                metadata(torch, new, num_logical, ws),
                update_layer_ids=subset,
                nnodes=nnodes,
                rank=rank,
            )
        finally:
            S.uninstall()
        meta = el.get_global_expert_location_metadata()
        return (
            missing,
            raw_bytes(torch, w),
            meta.physical_to_logical_map_cpu.clone(),
            {
                k: getattr(meta, k).clone()
                for k in (
                    "logical_to_all_physical_map_cpu",
                    "logical_to_all_physical_map_num_valid",
                )
            },
        )

    ref = run(clone(start), False)
    ours = run(clone(start), True)
    expect = torch.from_numpy(old.copy())
    expect[subset] = torch.from_numpy(new[subset])
    return {
        "missing": (ref[0], ours[0]),
        "bytes": ref[1] == ours[1],
        "untouched": ours[1][1] == raw_bytes(torch, start)[1],
        "map": torch.equal(ours[2], expect) and torch.equal(ref[2], ours[2]),
        "others": all(torch.equal(ref[3][k], ours[3][k]) for k in ref[3]),
    }


@pytest.mark.parametrize("world_size,nnodes", [(2, 1), (3, 1), (4, 2), (4, 4)])
def test_updater_end_to_end(pools, world_size, nnodes):
    res = pools(world_size).run(updater_job, 11 + world_size, nnodes, timeout=TIMEOUT)
    for r in res:
        assert r["missing"] == ({}, {})
        assert r["bytes"] and r["untouched"] and r["map"] and r["others"]


# ---- a peer that dies --------------------------------------------------------------------


def _dying_child(rank, world_size, rendezvous, dead, timeout, q):
    try:
        os.environ.update(RANK_ENV)
        import torch
        import torch.distributed as dist
        from sglang.srt.eplb import expert_location_updater as U

        from eplb_pynccl.errors import RearrangeError
        from eplb_pynccl.integrations import sglang as S

        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
        )
        num_physical = PER_RANK * world_size
        maps = sequence(5, 2, NUM_LAYERS, num_physical - 1, num_physical)
        metas = [metadata(torch, m, num_physical - 1, world_size) for m in maps]
        w = weights(torch, maps[0], rank, world_size, NUM_LAYERS)
        layers = list(range(NUM_LAYERS))
        S.install(timeout=timeout)
        U._update_expert_weights_raw({i: w[i] for i in layers}, metas[0], metas[1], layers, 1, rank)
        dist.barrier()
        if rank == dead:
            os._exit(3)  # gone before the second update
        t0 = time.monotonic()
        try:
            U._update_expert_weights_raw(
                {i: w[i] for i in layers}, metas[1], metas[2], layers, 1, rank
            )
            q.put((rank, "no error", time.monotonic() - t0))
        except RearrangeError as e:
            q.put(
                (rank, ("RearrangeError", str(e), e.peers, e.pending_layers), time.monotonic() - t0)
            )
        q.close()
        q.join_thread()  # the result is written before the exit below
        time.sleep(3.0)  # stay alive while the other survivors look for the dead rank
        os._exit(0)  # the group is dead: no teardown
    except BaseException:
        q.put((rank, "crash", traceback.format_exc()))
        q.close()
        q.join_thread()
        os._exit(1)


def _run_with_a_dead_peer(target, world_size: int, dead: int, timeout: float):
    """``world_size`` spawned ranks running ``target(rank, world_size, rendezvous, dead,
    timeout, q)``; returns the processes (joined) and each survivor's (what, seconds)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="eplb_sglang_"), "rendezvous")
    procs = [
        ctx.Process(target=target, args=(r, world_size, rendezvous, dead, timeout, q))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world_size - 1):
            try:
                rank, what, secs = q.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"survivors did not report within {TIMEOUT} s: {got}")
            got[rank] = (what, secs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return procs, got


@pytest.mark.parametrize("world_size", [2, 3])
def test_dead_peer_named_within_timeout(world_size):
    timeout, dead = 6.0, world_size - 1
    procs, got = _run_with_a_dead_peer(_dying_child, world_size, dead, timeout)
    assert procs[dead].exitcode == 3
    assert sorted(got) == [r for r in range(world_size) if r != dead]
    for rank, (what, secs) in got.items():
        assert what[0] == "RearrangeError", (rank, what)
        _, msg, peers, pending = what
        named = re.search(r"rank\(s\) \[([0-9, ]+)\] exited", msg)
        assert named and str(dead) in named.group(1).split(", "), msg
        assert dead in peers
        assert pending == list(range(NUM_LAYERS))  # transactional: nothing half-written
        assert secs < timeout + 5.0, (rank, secs)


def _record_steps(S) -> list:
    """The steps each update of SGLang's drop-in takes (pure: the same on every rank), as they
    are planned."""
    planned = []
    plan_steps = S._plan_steps

    def recorded(*a, **k):
        planned.append(plan_steps(*a, **k))
        return planned[-1]

    S._plan_steps = recorded
    return planned


def _exit_at_second_step(S) -> None:
    """This process exits (code 3) as the drop-in starts its second step."""
    step = S._step
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os._exit(3)
        return step(*a, **k)

    S._step = dying


def _partial_update(torch, w, e, steps, old, new, rank, world_size) -> tuple:
    """What a survivor reports of the RearrangeError ``e``: its layer lists, the layers it
    names as between two placements, which placement (old, step 1, step 2, new) each layer
    holds, and what the steps were."""
    import numpy as np

    from tests.shuffle_util import check_weights

    layers = range(len(w))
    names = ("old", "1", "2", "new")
    bad = {
        name: {int(x.split()[3]) for x in check_weights(torch, w, m, rank, world_size)}
        for name, m in zip(names, (old, steps[0], steps[1], new))
    }
    held = [[name for name in names if i not in bad[name]] for i in layers]
    between = re.search(r"layers (\[[0-9, ]*\]) are between", str(e))
    return (
        "RearrangeError",
        e.completed_layers,
        e.pending_layers,
        None if between is None else between.group(1),
        held,
        len(steps),
        [bool((steps[0][i] != old[i]).any()) for i in layers],
        [bool(np.array_equal(steps[0][i], new[i])) for i in layers],
    )


def _dying_between_steps(rank, world_size, rendezvous, dead, timeout, q):
    """An update split into steps (small rows, a quarter of a layer of staging); rank
    ``dead`` exits as its second step starts. The survivors report the RearrangeError's
    layer lists and which placement each of their layers holds (the first step's map, the
    second's, or neither)."""
    try:
        os.environ.update(RANK_ENV)
        import torch
        import torch.distributed as dist
        from sglang.srt.eplb import expert_location_updater as U

        from eplb_pynccl.errors import RearrangeError
        from eplb_pynccl.integrations import sglang as S

        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
        )
        num_physical = PER_RANK * world_size
        old, new = sequence(9, 1, NUM_LAYERS, num_physical - 1, num_physical)
        w = weights(torch, old, rank, world_size, NUM_LAYERS)
        planned = _record_steps(S)
        S.install(timeout=timeout)
        if rank == dead:
            _exit_at_second_step(S)
        layers = list(range(NUM_LAYERS))
        t0 = time.monotonic()
        try:
            U._update_expert_weights_raw(
                {i: w[i] for i in layers},
                metadata(torch, old, num_physical - 1, world_size),
                metadata(torch, new, num_physical - 1, world_size),
                layers,
                1,
                rank,
            )
            q.put((rank, "no error", time.monotonic() - t0))
        except RearrangeError as e:
            report = _partial_update(torch, w, e, planned[0], old, new, rank, world_size)
            q.put((rank, report, time.monotonic() - t0))
        q.close()
        q.join_thread()
        time.sleep(3.0)
        os._exit(0)
    except BaseException:
        q.put((rank, "crash", traceback.format_exc()))
        q.close()
        q.join_thread()
        os._exit(1)


def test_a_peer_dead_between_steps_leaves_layers_named():
    world_size, dead, timeout = 3, 2, 6.0
    procs, got = _run_with_a_dead_peer(_dying_between_steps, world_size, dead, timeout)
    assert procs[dead].exitcode == 3
    for rank, (what, secs) in got.items():
        assert what[0] == "RearrangeError", (rank, what)
        _, done, pending, between, held, nsteps, moved1, done1 = what
        assert nsteps > 2  # the update was split: the death falls between its steps
        named = [] if between is None else [int(x) for x in between.strip("[]").split(", ")]
        for i in range(NUM_LAYERS):
            # every layer holds the first step's placement or the second's, whole
            assert "1" in held[i] or "2" in held[i], (rank, i, held[i])
            if i in done:
                assert "new" in held[i]
            elif i in pending:
                assert "old" in held[i]
            else:
                assert i in named, (rank, i, named)
        assert sorted(done + pending + named) == list(range(NUM_LAYERS))
        assert any(moved1) and named  # the first step moved rows and left layers between
        assert secs < timeout + 5.0, (rank, secs)
