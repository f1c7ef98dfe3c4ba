"""vLLM's own move_to_buffer + move_from_buffer (rebalance_execute.py) over the IPC
communicator's logic, without a GPU: every EP rank in this process, each an
``_CommunicatorImpl`` with its IpcPath over a stand-in transport whose rounds copy every pull
with memmove from the sender's registered row (the address IpcTransport would read). So
vLLM's add_send tensors must pass the sender-row check, and the pulls derived from the old
map, layer and rows must land the exact bytes. Real rounds on a GPU: tests/test_gpu_vllm_ipc.py."""

from __future__ import annotations

import pytest
import torch

from eplb_pynccl.integrations import vllm as V
from eplb_pynccl.integrations._vllm_ipc import IpcPath, WeightRows
from tests.shuffle_util import check_weights, make_weights
from tests.test_vllm_ipc_cpu import _CopyingIpc, _Node
from tests_vllm.util import sequence

P, LAYERS = 4, 3
SPECS = [((6, 4), torch.float32), ((5, 3), torch.bfloat16), ((7,), torch.float32)]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("batching", [False, True], ids=["one_execute", "migration_batches"])
def test_vllms_move_to_buffer_over_ipc_rounds_is_exact(n, batching):
    import vllm.distributed.eplb.rebalance_execute as rx

    maps = sequence(30 + n, 4, LAYERS, n, P)
    node = _Node()
    ranks = []
    for r in range(n):
        ws = make_weights(torch, [SPECS] * LAYERS, maps[0], r, n, "cpu")
        buf = [torch.empty_like(t) for t in ws[0]]
        t = _CopyingIpc(node, r, n)
        rows = WeightRows(ws)
        node.bases[r] = rows.ptr
        ranks.append((ws, buf, t, V._CommunicatorImpl(t, ws, buf, ipc=IpcPath(t, rows))))
    for k, (old, new) in enumerate(zip(maps, maps[1:])):
        for layer in range(LAYERS):
            mds = [
                rx.move_to_buffer(
                    P,
                    old[layer],
                    new[layer],
                    ws[layer],
                    buf,
                    None,
                    r,
                    comm,
                    layer_idx=layer,
                    enable_migration_batching=batching,
                )
                for r, (ws, buf, _, comm) in enumerate(ranks)
            ]
            for r, ((ws, buf, _, _), md) in enumerate(zip(ranks, mds)):
                rx.move_from_buffer(ws[layer], buf, md, new[layer], r)
            assert len({t.rounds for _, _, t, _ in ranks}) == 1  # the same rounds everywhere
        for r, (ws, _, t, _) in enumerate(ranks):
            assert check_weights(torch, ws, new, r, n) == [], (k, r)
            assert t.aborted is None
    assert sum(len(rnd.recvs) for _, _, t, _ in ranks for rnd in t.launched) > 0
