"""vLLM's own layer loops (rearrange_expert_weights_inplace, transfer_layer + move_from_buffer)
with eplb_pynccl's EplbCommunicator, against vLLM's built-in torch_nccl communicator on the same
gloo group and maps: the same bytes in every row, and the right expert in every slot."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time

import numpy as np
import pytest

from tests_vllm.util import (
    STEPS,
    TIMEOUT,
    CountingTransport,
    buffer,
    coordinator,
    differences,
    side_by_side,
    specs,
    weights,
)


def _run_vllm(path, rx, torch, old, new, ws, buf, gc, comm, batching):
    ep_rank = gc.rank_in_group
    if path == "rearrange":
        rx.rearrange_expert_weights_inplace(
            torch.from_numpy(old), torch.from_numpy(new), ws, buf, gc.device_group, comm
        )
        return
    for layer in range(len(ws)):
        md = rx.transfer_layer(
            torch.from_numpy(old[layer]),
            torch.from_numpy(new[layer]),
            ws[layer],
            buf,
            gc.device_group,
            comm,
            layer_idx=layer,
            enable_migration_batching=batching,
        )
        rx.move_from_buffer(ws[layer], buf, md, new[layer], ep_rank)


def vllm_paths_job(ctx, seed, dtype, path, batching, groups=None):
    import torch
    import vllm.distributed.eplb.rebalance_execute as rx

    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights

    gc, maps, ref, ours, ref_buf, our_buf, ref_comm = side_by_side(ctx, torch, seed, dtype, groups)
    ep_rank, ep_size = gc.rank_in_group, gc.world_size
    our_comm = V.create_communicator(gc, ours, our_buf)
    ptrs = [t.data_ptr() for ws in ours for t in ws]
    steps = []
    for old, new in zip(maps, maps[1:]):
        _run_vllm(path, rx, torch, old, new, ref, ref_buf, gc, ref_comm, batching)
        _run_vllm(path, rx, torch, old, new, ours, our_buf, gc, our_comm, batching)
        moved = int((old != new).sum())
        steps.append(
            (
                differences(torch, ref, ours, new, ep_rank, ep_size),
                check_weights(torch, ours, new, ep_rank, ep_size),
                moved,
            )
        )
    same_storage = ptrs == [t.data_ptr() for ws in ours for t in ws]
    return (
        type(ref_comm).__name__,
        type(our_comm).__name__,
        type(our_comm.transport).__name__,
        steps,
        same_storage,
    )


def _check(results, steps=STEPS):
    for rank, (ref_name, our_name, transport, out, same_storage) in enumerate(results):
        assert ref_name == "TorchDistNcclEplbCommunicator"
        assert our_name == "EplbPyncclCommunicator"
        assert transport == "TorchTransport"
        assert same_storage
        assert len(out) == steps
        for step, (diff, bad, _moved) in enumerate(out):
            assert diff == {"filled": [], "empty": []}, (rank, step, diff)
            assert bad == [], (rank, step, bad)
    # the maps really move experts (not a sequence of no-ops)
    assert all(moved > 0 for _, _, _, out, _ in results for _, _, moved in out)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed"])
def test_rearrange_matches_vllm_torch_nccl(pools, world, dtype):
    seed = {"float32": 1, "bfloat16": 2, "mixed": 3}[dtype] + 10 * world
    _check(pools(world).run(vllm_paths_job, seed, dtype, "rearrange", False, timeout=TIMEOUT))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batching", [False, True], ids=["unbatched", "migration_batching"])
def test_transfer_layer_matches_vllm_torch_nccl(pools, world, batching):
    _check(
        pools(world).run(
            vllm_paths_job, 40 + world, "mixed", "transfer_layer", batching, timeout=TIMEOUT
        )
    )


def test_ep_group_ranks_are_group_local(pools):
    """3 processes, EP groups [0] and [1, 2]: EP rank 0 of the second group is global rank 1."""
    results = pools(3).run(
        vllm_paths_job, 7, "bfloat16", "rearrange", False, [[0], [1, 2]], timeout=TIMEOUT
    )
    _check(results)


# ---- merged messages -------------------------------------------------------------------------

OLD = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
MERGE_CASES = {
    # rank 0 takes experts 4, 5 (rank 1's rows 0, 1) into its rows 0, 1, and the reverse:
    # one message per tensor each way, straight from and into the rows
    "adjacent": np.array([[4, 5, 2, 3, 0, 1, 6, 7]]),
    # rank 0 takes 4, 5 (rank 1's rows 0, 1: one run) into rows 2, 0 (staged, then copied);
    # rank 1 takes 0 and 2 (rank 0's rows 0 and 2: two runs)
    "scattered": np.array([[5, 1, 4, 3, 0, 2, 6, 7]]),
}


def merge_job(ctx, case, context):
    import torch
    import vllm.distributed.eplb.rebalance_execute as rx

    from eplb_pynccl import TorchTransport
    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights

    gc = coordinator(ctx)
    spec = specs(torch, "float32")
    new = MERGE_CASES[case]
    ws = weights(torch, spec, 1, OLD, gc.rank_in_group, 2)
    buf = buffer(torch, ws)
    transport = CountingTransport(TorchTransport(gc.cpu_group))
    comm = V.EplbPyncclCommunicator(transport, ws, buf)
    if context:
        rx.rearrange_expert_weights_inplace(
            torch.from_numpy(OLD), torch.from_numpy(new), ws, buf, gc.device_group, comm
        )
    else:
        # vLLM always sets the context; without one each expert is its own message per tensor
        me, peer = gc.rank_in_group, 1 - gc.rank_in_group
        gives = [e for e in OLD[0, me * 4 : me * 4 + 4] if e in new[0, peer * 4 : peer * 4 + 4]]
        takes = [e for e in OLD[0, peer * 4 : peer * 4 + 4] if e in new[0, me * 4 : me * 4 + 4]]
        for e in sorted(gives):
            row = list(OLD[0, me * 4 : me * 4 + 4]).index(e)
            comm.add_send([w[row] for w in ws[0]], peer, int(e))
        rows = [list(new[0, me * 4 : me * 4 + 4]).index(e) for e in sorted(takes)]
        for e, row in zip(sorted(takes), rows):
            comm.add_recv([b[row] for b in buf], peer, int(e))
        comm.execute()
        for row in rows:
            for w, b in zip(ws[0], buf):
                w[row].copy_(b[row])
    return transport.exchanges, check_weights(torch, ws, new, gc.rank_in_group, 2)


def test_adjacent_rows_travel_as_one_message_per_tensor(pools):
    # row bytes: tensor 0 is 6x4 fp32 = 96, tensor 1 is 5x3 fp32 = 60
    r0, r1 = pools(2).run(merge_job, "adjacent", True, timeout=TIMEOUT)
    assert r0 == ([([(1, 192), (1, 120)], [(1, 192), (1, 120)])], [])
    assert r1 == ([([(0, 192), (0, 120)], [(0, 192), (0, 120)])], [])


def test_runs_follow_the_senders_rows_and_receivers_stage_what_is_not_adjacent(pools):
    r0, r1 = pools(2).run(merge_job, "scattered", True, timeout=TIMEOUT)
    assert r0 == ([([(1, 96), (1, 60), (1, 96), (1, 60)], [(1, 192), (1, 120)])], [])
    assert r1 == ([([(0, 192), (0, 120)], [(0, 96), (0, 60), (0, 96), (0, 60)])], [])


def test_without_transfer_context_every_expert_is_its_own_message(pools):
    r0, r1 = pools(2).run(merge_job, "adjacent", False, timeout=TIMEOUT)
    one = [(1, 96), (1, 60), (1, 96), (1, 60)]
    assert r0 == ([(one, one)], [])
    assert r1 == ([([(0, n) for _, n in one], [(0, n) for _, n in one])], [])


# ---- bad calls and a dead peer -----------------------------------------------------------------


def bad_calls_job(ctx):
    import torch

    from eplb_pynccl.integrations import vllm as V

    gc = coordinator(ctx)
    ws = [[torch.zeros(4, 3)]]
    comm = V.create_communicator(gc, ws, buffer(torch, ws))
    out = []
    for call in (
        lambda: comm.add_send([ws[0][0][0]], 2, 0),
        lambda: comm.add_recv([ws[0][0][0]], -1, 0),
        lambda: comm.add_send(ws[0][0][0], 1, 0),
        lambda: comm.add_recv([], 1, 0),
        lambda: comm.add_send([ws[0][0][0], "row"], 1, 0),
        lambda: comm.set_stream("stream"),
    ):
        try:
            call()
            out.append(None)
        except (TypeError, ValueError) as e:
            out.append((type(e).__name__, str(e)))
    comm.execute()  # nothing was queued by the refused calls: returns at once
    return out, comm.needs_profile_buffer_reservation


def test_bad_calls_are_refused_with_their_reason(pools):
    for out, reserve in pools(2).run(bad_calls_job, timeout=TIMEOUT):
        assert reserve is False
        assert out == [
            ("ValueError", "add_send: rank 2 is not an EP rank in [0, 2)"),
            ("ValueError", "add_recv: rank -1 is not an EP rank in [0, 2)"),
            ("TypeError", "add_send: tensors must be a non-empty list of tensors"),
            ("TypeError", "add_recv: tensors must be a non-empty list of tensors"),
            ("TypeError", "add_send: tensors[1] must be a torch.Tensor, got str"),
            ("TypeError", "set_stream() needs a CUDA stream or None, got 'stream'"),
        ]


def _dead_peer_main(rank, port, q):
    try:
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
        import torch

        from eplb_pynccl.integrations import vllm as V

        class Ctx:
            host, world_size, cache = "127.0.0.1", 2, {}

        ctx = Ctx()
        ctx.rank, ctx.port = rank, port
        gc = coordinator(ctx)
        ws = [[torch.zeros(4, 1000)]]
        comm = V.create_communicator(gc, ws, buffer(torch, ws))
        torch.distributed.barrier(group=gc.cpu_group)
        if rank == 1:
            os._exit(0)  # the peer dies before the exchange
        time.sleep(0.5)
        comm.add_recv([ws[0][0][0]], 1, 5)
        t0 = time.monotonic()
        try:
            comm.execute()
            q.put((rank, "returned", None, time.monotonic() - t0))
        except Exception as e:
            q.put((rank, type(e).__name__, str(e), time.monotonic() - t0))
    except BaseException as e:
        q.put((rank, "setup failed", repr(e), 0.0))


def test_a_dead_peer_is_an_error_not_a_hang():
    from tests.gpu_util import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dead_peer_main, args=(r, port, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, kind, msg, seconds = q.get(timeout=90)
    except queue.Empty:
        pytest.fail("rank 0 neither raised nor returned within 90 s of start")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert (rank, kind) == (0, "RuntimeError"), (rank, kind, msg)
    assert "Connection closed by peer" in msg, msg
    assert seconds < 30, seconds
