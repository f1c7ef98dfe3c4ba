"""The CUDA path of the vLLM integration on one GPU, without vLLM: the communicator's logic
(everything of EplbPyncclCommunicator but vLLM's base class) over a one-rank NCCL
communicator, whose sends and receives go to itself; the unique id over a one-rank gloo
group; the layer-loop replacement on CUDA weights. Several GPUs and vLLM itself: the
multi-GPU issue."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from tests.gpu_util import free_port

pytestmark = pytest.mark.gpu(gpus=1)


@pytest.fixture(scope="module")
def gloo1():
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if mine:  # the rest of the suite runs its process groups in rank processes, not here
        dist.destroy_process_group()


def _impl(gloo1):
    import torch

    from eplb_pynccl import Communicator, NcclTransport
    from eplb_pynccl.integrations.vllm import _CommunicatorImpl, _share_unique_id

    uid = _share_unique_id(torch, gloo1)
    comm = Communicator(uid, 0, 1, 0, blocking=False, timeout=60)
    return _CommunicatorImpl(NcclTransport(comm), (), ())


def test_self_exchange_merged_staged_and_on_a_generic_stream(gloo1):
    import torch

    c = _impl(gloo1)
    w = torch.arange(8 * 1024, dtype=torch.float32, device="cuda").view(8, 1024)
    buf = torch.full_like(w, -1.0)
    # the old map puts experts 10..17 in rows 0..7 of rank 0
    stream = torch.Stream(device="cuda")  # what vLLM's async worker makes
    c.set_stream(stream)
    assert isinstance(c._stream, torch.cuda.Stream) and c._stream.stream_id == stream.stream_id
    c.set_transfer_context(np.arange(10, 18), 0)
    moves = ((12, 2, 5), (13, 3, 1), (14, 4, 6), (16, 6, 7))  # (expert, source row, dest row)
    for e, src, _ in moves:
        c.add_send([w[src]], 0, e)
    for e, _, dst in moves:
        c.add_recv([buf[dst]], 0, e)
    c.execute()  # rows 2..4 are one run (staged on receipt: 5, 1, 6 are not adjacent), 6 alone
    c._stream.synchronize()
    want = torch.full_like(w, -1.0)
    for src, dst in ((2, 5), (3, 1), (4, 6), (6, 7)):
        want[dst] = w[src]
    assert torch.equal(buf, want)


def test_nccl_refuses_another_thread(gloo1):
    import torch

    c = _impl(gloo1)
    w = torch.zeros(2, 4, device="cuda")
    c.add_send([w[0]], 0, 0)
    c.add_recv([w[1]], 0, 0)
    errors = []
    t = threading.Thread(target=lambda: errors.append(_call(c.execute)))
    t.start()
    t.join(60)
    assert errors == [
        "eplb_pynccl: execute() was called from another thread than the one that made this "
        "communicator (vLLM's async EPLB thread?); NCCL kernels of a second communicator "
        "issued from a background thread can deadlock against the forward pass's NCCL kernels, "
        "so the NCCL transport refuses it: set eplb_config.use_async=false"
    ]


def _call(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def test_layer_loop_on_cuda(gloo1):
    import torch

    from eplb_pynccl.integrations.vllm import rearrange_expert_weights_inplace
    from tests.shuffle_util import check_weights, make_weights

    c = _impl(gloo1)
    old = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    new = np.array([[5, 3, 1, 0, 2, 4], [0, 0, 1, 2, 3, 5]])
    ws = make_weights(
        torch, [[((16, 8), torch.bfloat16), ((3,), torch.float32)]] * 2, old, 0, 1, "cuda"
    )
    ptrs = [t.data_ptr() for l in ws for t in l]
    stats = rearrange_expert_weights_inplace(
        torch.from_numpy(old).cuda(), torch.from_numpy(new), ws, None, gloo1, c
    )
    torch.cuda.synchronize()
    assert check_weights(torch, ws, new, 0, 1) == []
    assert ptrs == [t.data_ptr() for l in ws for t in l]
    assert stats.layers_changed == [0, 1]
    assert rearrange_expert_weights_inplace(old, new, ws, None, gloo1, c, True) is None
