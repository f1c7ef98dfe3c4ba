"""vLLM's async EPLB path over the IPC communicator (backend ``eplb_pynccl_ipc``) on a GPU: 2 and
3 processes sharing one GPU (CUDA IPC works between processes of one device), one GPU each
where there are more.

Each rank process joins a gloo group (file rendezvous) and makes the communicator over it; a
namespace with ``cpu_group`` stands in for vLLM's GroupCoordinator (the only thing
create_communicator reads of it). Random old/new maps (duplicate replicas, -1 slots, experts
moving across ranks and within one), fp32 and bf16 weights of several shapes in every layer.
As in vLLM's async mode, a background thread (its own device setting and its own generic
``torch.Stream``, given to ``set_stream``) moves one layer at a time into the buffer, while the
main thread keeps running matmuls on another stream and copies each finished layer from the
buffer into the weights; after every rearrangement every row is checked byte for byte.

With vLLM importable, a layer is vLLM's own ``transfer_layer`` and ``move_from_buffer``
(rebalance_execute.py). Without it (the GPU machine has no vLLM, and no network to install
it), the communicator is ``_CommunicatorImpl`` (vLLM's base class adds only the abstract
interface) from the same set-up (``_setup_ipc``), driven with the calls vLLM makes: local
moves into the buffer on the worker's stream, ``set_transfer_context``, ``add_send`` of each
expert's first-slot row on its sender, ``add_recv`` into buffer rows, one ``execute()`` per
layer on every rank (with nothing queued too), then the buffer rows copied into the weights.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.gpu_util import RankFailure, run_ranks
from tests.vllm_calls import VllmCalls

pytestmark = pytest.mark.gpu(gpus=1)

P, LAYERS = 4, 3
# set (e.g. where tools/engine_bundle.py's archive is on PYTHONPATH) to fail instead of emulating
REQUIRE_VLLM = "EPLB_PYNCCL_TEST_REQUIRE_VLLM"
SPECS = [((6, 40), "float32"), ((24,), "bfloat16"), ((3, 5, 7), "float32"), ((16, 8), "bfloat16")]


def _devices(procs):
    import torch

    n = torch.cuda.device_count()
    return [r % n for r in range(procs)]


def _vllm_rebalance_execute():
    """vLLM's rebalance_execute module, or None where vLLM does not import (then its calls are
    emulated; with $EPLB_PYNCCL_TEST_REQUIRE_VLLM set the import error is raised)."""
    try:
        import vllm.distributed.eplb.rebalance_execute as rx
    except Exception:  # noqa: BLE001 - no vLLM (or one that does not import): emulate its calls
        if os.environ.get(REQUIRE_VLLM):
            raise
        rx = None
    return rx


def _make_communicator(torch, V, gc, ws, buf, rx, timeout):
    """The IPC communicator: vLLM's create_communicator path, or the same set-up without vLLM."""
    if rx is not None:
        return V.create_communicator(gc, ws, buf, transport="ipc", timeout=timeout)
    t, path = V._setup_ipc(torch, gc.cpu_group, ws, timeout)
    return V._CommunicatorImpl(t, ws, buf, ipc=path)


def _die_in_the_second_layer(comm):
    """This rank's process exits inside execute() of layer 1, its sends and receives queued."""
    real = comm.execute

    def execute():  # dies in the second layer, its sends and receives queued
        if comm._layer == 1:
            os._exit(3)
        real()

    comm.execute = execute


def _async_worker(ctx, torch, comm, rx, emu, maps, ws, buf, handoff, consumed, failure):
    """vLLM's async EPLB thread: every layer of every rearrangement into the buffer on its own
    stream, handed to the main thread, the next layer only after the main thread's copy-out."""
    import torch.distributed as dist

    try:
        if hasattr(torch, "accelerator"):
            torch.accelerator.set_device_index(ctx.device)
        else:
            torch.cuda.set_device(ctx.device)
        stream = torch.Stream(device=torch.device("cuda", ctx.device))
        comm.set_stream(stream)
        for old, new in zip(maps, maps[1:]):
            for layer in range(LAYERS):
                failure["t0"] = time.monotonic()
                if rx is not None:
                    md = rx.transfer_layer(
                        torch.from_numpy(old[layer]),
                        torch.from_numpy(new[layer]),
                        ws[layer],
                        buf,
                        dist.group.WORLD,
                        comm,
                        stream=stream,
                        layer_idx=layer,
                    )
                else:
                    md = emu.transfer(old[layer], new[layer], ws[layer], buf, stream, layer)
                stream.synchronize()
                handoff.put((layer, md, old[layer], new[layer]))
                consumed.get(timeout=60).wait(stream)  # the main thread's copy-out
        handoff.put(None)
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        failure["elapsed"] = time.monotonic() - failure.get("t0", time.monotonic())
        handoff.put(("error", f"{type(e).__name__}: {e}"))


def _forward_and_copy_out(torch, dev, side, rx, emu, maps, ws, buf, rank, n, handoff, consumed):
    """The main thread: matmuls on their own stream, each finished layer copied out of the
    buffer, the weights checked after every rearrangement; returns (bad, steps, error)."""
    from tests.shuffle_util import check_weights

    a = torch.randn(256, 256, device=dev)
    bad, step, spins, error = [], 0, 0, None
    while True:  # the forward passes, on their own stream, and the copy-out after each layer
        with torch.cuda.stream(side):
            a = torch.tanh(a @ a)
        spins += 1
        if spins % 16 == 0:
            side.synchronize()
        try:
            item = handoff.get(timeout=0.001)
        except queue.Empty:
            continue
        if item is None:
            break
        if item[0] == "error":
            error = item[1]
            break
        layer, md, old_l, new_l = item
        if rx is not None:
            rx.move_from_buffer(ws[layer], buf, md, new_l, rank)
        else:
            emu.move_from(ws[layer], buf, md, old_l, new_l)
        ev = torch.Event()
        ev.record()
        consumed.put(ev)
        if layer == LAYERS - 1:
            torch.cuda.current_stream().synchronize()
            step += 1
            bad.append(check_weights(torch, ws, maps[step], rank, n))
    return bad, step, error


def _job(ctx, rendezvous, maps, victim=None, outdir=None, timeout=30.0):
    import torch
    import torch.distributed as dist

    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights, make_weights

    rx = _vllm_rebalance_execute()
    torch.cuda.set_device(ctx.device)
    torch.zeros(1, device=ctx.device)  # CUDA up before the rendezvous: set-up is then quick
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=ctx.rank, world_size=ctx.world_size
    )
    rank, n = ctx.rank, ctx.world_size
    maps = [np.asarray(m, dtype=np.int64) for m in maps]
    dev = torch.device("cuda", ctx.device)
    specs = [[(shape, getattr(torch, dt)) for shape, dt in SPECS]] * LAYERS
    ws = make_weights(torch, specs, maps[0], rank, n, dev)
    buf = [torch.empty_like(t) for t in ws[0]]
    ptrs = [t.data_ptr() for layer in ws for t in layer]
    gc = SimpleNamespace(cpu_group=dist.group.WORLD)
    comm = _make_communicator(torch, V, gc, ws, buf, rx, timeout)
    emu = VllmCalls(torch, V, comm, rank, n, P)
    if victim == rank:
        _die_in_the_second_layer(comm)
    handoff, consumed = queue.Queue(), queue.Queue()
    failure = {}
    th = threading.Thread(
        target=_async_worker,
        args=(ctx, torch, comm, rx, emu, maps, ws, buf, handoff, consumed, failure),
        daemon=True,
    )
    th.start()
    side = torch.cuda.Stream(dev)
    bad, step, error = _forward_and_copy_out(
        torch, dev, side, rx, emu, maps, ws, buf, rank, n, handoff, consumed
    )
    th.join(30)
    side.synchronize()
    torch.cuda.current_stream().synchronize()
    res = {
        "rank": rank,
        "vllm": rx is not None,
        "bad": bad,
        "steps": step,
        "rounds": comm.transport.rounds,
        "kept": ptrs == [t.data_ptr() for layer in ws for t in layer],
        "error": error,
        "elapsed": failure.get("elapsed"),
        "layer0_new": check_weights(torch, [ws[0]], maps[1][:1], rank, n) == [],
    }
    comm.transport.close()  # local; every round this rank ran has finished on its readers
    if outdir is not None:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
    return res


@pytest.mark.parametrize("procs", [2, 3])
def test_async_thread_moves_every_layer_exactly(procs, tmp_path):
    from tests_vllm.util import sequence

    steps = 4
    maps = [m.tolist() for m in sequence(40 + procs, steps, LAYERS, procs, P)]
    results = run_ranks(
        _job, procs, str(tmp_path / "rendezvous"), maps, timeout=90, devices=_devices(procs)
    )
    for r in results:
        assert r["error"] is None, r["error"]
        assert r["steps"] == steps
        assert r["bad"] == [[]] * steps, r["bad"]
        assert r["kept"], "weight tensors lost their storage"
        assert r["rounds"] == steps * LAYERS  # one IPC round per execute, on every rank
    assert len({r["vllm"] for r in results}) == 1
    if os.environ.get(REQUIRE_VLLM):
        assert results[0]["vllm"], "vLLM's own functions were not used"


def _ring_maps(n):
    """Every rank reads a row of each other rank in every layer: rank r's row 0 takes rank
    r+1's expert in row 0, its row 1 rank r+2's expert in row 1; rows 2, 3 stay."""
    old = np.arange(n * P, dtype=np.int64)
    new = old.copy()
    for r in range(n):
        new[r * P] = old[((r + 1) % n) * P]
        new[r * P + 1] = old[((r + 2) % n) * P + 1]
    return [np.tile(old, (LAYERS, 1)).tolist(), np.tile(new, (LAYERS, 1)).tolist()]


def test_a_peer_that_dies_mid_layer_is_named_by_every_survivor(tmp_path):
    procs, timeout = 3, 10.0
    victim = procs - 1
    with pytest.raises(RankFailure) as info:
        run_ranks(
            _job,
            procs,
            str(tmp_path / "rendezvous"),
            _ring_maps(procs),
            victim,
            str(tmp_path),
            timeout,
            timeout=90,
            grace=timeout + 20,
            devices=_devices(procs),
        )
    msg = str(info.value)
    assert f"1 of {procs} ranks failed" in msg
    assert f"rank {victim} exited (exit code 3)" in msg
    for rank in range(procs - 1):
        with open(tmp_path / f"rank{rank}.json") as fh:
            r = json.load(fh)
        assert r["error"] is not None, r
        assert r["error"].startswith(f"RuntimeError: rank {rank}: peer rank {victim} (pid "), r
        assert r["error"].endswith(") exited mid-round"), r
        assert r["elapsed"] <= timeout + 5, r
        assert r["layer0_new"], r  # the layer before the death landed whole
        assert r["steps"] == 0
