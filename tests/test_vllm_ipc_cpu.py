"""The IPC path of the vLLM communicator without a GPU or vLLM: the pull list derived from the
old map, the layer and the rows; merging only where both ends are adjacent; one round per
execute() (empty ones too); the checks of add_send/add_recv; the timeout naming the peers.

The communicator's logic (``_CommunicatorImpl``, vLLM's base class left out) runs over a
recording stand-in for IpcTransport and CPU tensors (their data pointers are real: the
sender-row check and the pull addresses are computed exactly as on a GPU). Real rounds on a
GPU: tests/test_gpu_vllm_ipc.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplb_pynccl.integrations import vllm as V  # noqa: E402
from eplb_pynccl.integrations._vllm_ipc import (  # noqa: E402
    IpcPath,
    WeightRows,
    layout_disagreements,
    plan_pulls,
)
from eplb_pynccl.transport import Transport  # noqa: E402

# ---- plan_pulls -------------------------------------------------------------------------------


def test_pulls_merge_only_where_both_ends_are_adjacent():
    # tensor 0: rows of 16 bytes back to back; tensor 1: rows of 8 bytes every 24 (padded)
    bufs, stride, nbytes = [6, 7], [16, 24], [16, 8]
    A, B = 1000, 5000  # two destination allocations
    recvs = [
        (1, 3, [(A, A + 0), (B, B + 0)]),
        (1, 4, [(A, A + 16), (B, B + 8)]),  # rows 3, 4 and dsts adjacent: tensor 0 merges
        (2, 0, [(A, A + 32), (B, B + 16)]),  # another peer: its own copies
        (1, 5, [(A, A + 48), (B, B + 24)]),  # row 5 follows 4, dst not adjacent to A+32
        (1, 6, [(A + 64, A + 64), (B, B + 32)]),  # adjacent address, another allocation
        (2, 1, [(A, A + 48 + 16), (B, B + 40)]),
    ]
    assert plan_pulls(recvs, bufs, stride, nbytes) == [
        # peer 1, tensor 0: rows 3-4 as one copy; row 5 alone; row 6 alone (other storage)
        (1, 6, 3 * 16, A, 32),
        (1, 6, 5 * 16, A + 48, 16),
        (1, 6, 6 * 16, A + 64, 16),
        # peer 1, tensor 1: padded rows never merge
        (1, 7, 3 * 24, B, 8),
        (1, 7, 4 * 24, B + 8, 8),
        (1, 7, 5 * 24, B + 24, 8),
        (1, 7, 6 * 24, B + 32, 8),
        # peer 2: rows 0, 1 into A+32 and A+64 (not adjacent); tensor 1 rows not dense
        (2, 6, 0, A + 32, 16),
        (2, 6, 16, A + 64, 16),
        (2, 7, 0, B + 16, 8),
        (2, 7, 24, B + 40, 8),
    ]


def test_pulls_of_nothing_are_nothing():
    assert plan_pulls([], [0], [8], [8]) == []


# ---- WeightRows -------------------------------------------------------------------------------


def _padded(rows, n, dtype):
    """[rows, n] whose rows are ``n + 3`` elements apart (a padded layout)."""
    base = torch.zeros(rows, n + 3, dtype=dtype)
    return base[:, :n]


def test_weight_rows_buffers_strides_and_problems():
    w = [
        [torch.zeros(4, 3, 2), _padded(4, 5, torch.bfloat16)],
        [torch.zeros(4, 3, 2), _padded(4, 5, torch.bfloat16)],
    ]
    rows = WeightRows(w)
    assert rows.first == [0, 2] and rows.counts == [2, 2]
    assert [rows.buffer(1, i) for i in range(2)] == [2, 3]
    assert rows.stride == [24, 16, 24, 16] and rows.nbytes == [24, 10, 24, 10]
    assert rows.row_ptr(3, 2) == w[1][1].data_ptr() + 2 * 16 == w[1][1][2].data_ptr()
    assert rows.problems() == []
    bad = WeightRows([[torch.zeros(4, 3).t()], [torch.zeros(5, 2)], [torch.zeros(0, 2)]])
    assert bad.problems() == [
        "expert_weights[0][0]'s rows are not contiguous (shape (3, 4), strides (1, 3)): a row "
        "must be one block of memory to be copied",
        "expert_weights[1][0] has 5 expert rows, expert_weights[0][0] has 3",
        "expert_weights[2][0] has no expert rows (shape (0, 2))",
    ]
    assert WeightRows([]).problems() == ["there are no expert weights"]


def test_layouts_must_agree():
    a = WeightRows([[torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.bfloat16)]]).describe()
    b = WeightRows([[torch.zeros(4, 3), torch.zeros(4, 2)]]).describe()
    c = WeightRows([[torch.zeros(4, 3)]]).describe()
    d = WeightRows([[_padded(4, 3, torch.float32), torch.zeros(4, 2)]]).describe()
    assert layout_disagreements([a, a]) == []
    assert layout_disagreements([a, b, c, d]) == [
        "rank 1's weight tensor 1 has shape (4, 2), strides (2, 1), torch.float32; rank 0's has "
        "shape (4, 2), strides (2, 1), torch.bfloat16",
        "rank 2 has 1 expert weight tensors, rank 0 has 2",
        "rank 3's weight tensor 0 has shape (4, 3), strides (6, 1), torch.float32; rank 0's has "
        "shape (4, 3), strides (3, 1), torch.float32",
    ]


# ---- the communicator over a recording transport -----------------------------------------------


class _Round:
    def __init__(self, t, sends, recvs, remote):
        self.t, self.sends, self.recvs = t, sends, recvs
        _, rmsg = remote
        self.rbuf, self.roff = rmsg.rbuf.tolist(), rmsg.roff.tolist()
        self.peers = sorted({p for p, _ in sends} | {p for p, _ in recvs})
        self.seq = None
        self.released = 0

    def release(self):
        self.released += 1

    def launch(self, stream, deadline):
        self.t.rounds += 1
        self.seq = self.t.rounds
        self.t.launched.append(self)

    def done(self):
        return self.t.finishes

    def waiting_on(self):
        return [p for p, _ in self.recvs][:1], [p for p, _ in self.sends][:1]


class _FakeIpc(Transport):
    """What IpcPath uses of IpcTransport, recording rounds (CPU tensors)."""

    one_sided = accepts_raw = True

    def __init__(self, rank, world, timeout=30.0, finishes=True):
        self.rank, self.world_size, self.timeout = rank, world, timeout
        self.finishes = finishes
        self.rounds = 0
        self.launched = []
        self.aborted = None
        self.current_threads = []

    @property
    def device(self):
        return torch.device("cpu")

    def check_tensor(self, t, name):
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}")

    def make_current(self):
        self.current_threads.append(threading.get_ident())

    def prepare_round(self, sends, recvs, remote=None):
        return _Round(self, sends, recvs, remote)

    def abort(self, why="aborted"):
        if self.aborted is None:
            self.aborted = why

    def exchange(self, sends, recvs, stream=None, timeout=None):
        raise AssertionError("the IPC path posts no exchange")

    def wait(self, stream=None, timeout=None):
        raise AssertionError("the IPC path waits on its round")

    def all_gather_bytes(self, data):
        raise AssertionError("not at run time")


P, WORLD = 4, 3


def _setup(rank=0, **kw):
    """Rank ``rank`` of 3, 2 layers of an fp32 [P, 3, 2] weight and a bf16 [P, 5] one whose
    rows are 8 elements apart (padded: its rows never merge) each."""
    g = torch.Generator().manual_seed(rank)
    w = [
        [
            torch.randn(P, 3, 2, generator=g),
            torch.randn(P, 8, generator=g).to(torch.bfloat16)[:, :5],
        ]
        for _ in range(2)
    ]
    buf = [torch.zeros(P, 3, 2), torch.zeros(P, 5, dtype=torch.bfloat16)]
    t = _FakeIpc(rank, WORLD, **kw)
    c = V._CommunicatorImpl(t, w, buf, ipc=IpcPath(t, WeightRows(w)))
    return c, t, w, buf


# old map of layer 1: rank 0 holds 0 1 2 2, rank 1 holds 5 3 4 -1, rank 2 holds 7 6 6 8
OLD1 = np.array([0, 1, 2, 2, 5, 3, 4, -1, 7, 6, 6, 8])


def test_receives_pull_the_senders_first_rows_and_every_execute_is_a_round():
    c, t, w, buf = _setup()
    c.set_transfer_context(OLD1, 1)
    c.add_recv([buf[0][1], buf[1][1]], 1, 3)  # rank 1 row 1
    c.add_recv([buf[0][2], buf[1][2]], 1, 4)  # rank 1 row 2: merges with row 1 (fp32 only)
    c.add_recv([buf[0][0], buf[1][0]], 2, 6)  # rank 2's first slot of 6: row 1
    c.add_send([w[1][0][2], w[1][1][2]], 2, 2)  # expert 2: first slot row 2 on rank 0
    c.add_send([w[1][0][0], w[1][1][0]], 1, 0)
    c.execute()
    for _ in range(2):  # nothing queued: still one round each
        c.set_transfer_context(OLD1, 1)
        c.execute()
    c.execute()  # not even a transfer context
    assert [r.seq for r in t.launched] == [1, 2, 3, 4]
    assert [r.released for r in t.launched] == [1, 1, 1, 1]  # each round's resources freed
    r0 = t.launched[0]
    row32, step16, row16 = 3 * 2 * 4, 8 * 2, 5 * 2
    assert list(zip([p for p, _ in r0.recvs], r0.rbuf, r0.roff, [m for _, m in r0.recvs])) == [
        (1, 2, 1 * row32, (buf[0][1].data_ptr(), 2 * row32)),
        (1, 3, 1 * step16, (buf[1][1].data_ptr(), row16)),
        (1, 3, 2 * step16, (buf[1][2].data_ptr(), row16)),
        (2, 2, 1 * row32, (buf[0][0].data_ptr(), row32)),
        (2, 3, 1 * step16, (buf[1][0].data_ptr(), row16)),
    ]
    assert [p for p, _ in r0.sends] == [2, 1]  # readers of this rank's rows
    for r in t.launched[1:]:
        assert (r.sends, r.recvs, r.rbuf) == ([], [], [])
    assert len(t.current_threads) == 4 and t.aborted is None


def test_executes_from_another_thread_make_the_device_current_there():
    c, t, w, buf = _setup()
    out = []
    th = threading.Thread(target=lambda: (c.execute(), out.append(threading.get_ident())))
    th.start()
    th.join(30)
    assert t.current_threads == out and len(t.launched) == 1


def test_a_receive_from_this_rank_is_a_local_copy():
    c, t, w, buf = _setup()
    c.set_transfer_context(OLD1, 1)
    c.add_recv([buf[0][3], buf[1][3]], 0, 2)  # rank 0's own expert 2: row 2
    c.add_send([w[1][0][2], w[1][1][2]], 0, 2)
    c.execute()
    assert torch.equal(buf[0][3], w[1][0][2]) and torch.equal(buf[1][3], w[1][1][2])
    (r,) = t.launched
    assert (r.sends, r.recvs) == ([], [])


@pytest.mark.parametrize(
    "call, msg",
    [
        (
            lambda c, w, buf: c.add_send([w[1][0][3], w[1][1][3]], 1, 2),
            "add_send: tensors[0] of expert 2 is not row 2 of expert_weights[1][0] (the "
            "expert's first slot on this rank in the old map), the registered row its peers "
            "read over CUDA IPC",
        ),
        (
            lambda c, w, buf: c.add_send([w[1][0][2].clone(), w[1][1][2]], 1, 2),
            "add_send: tensors[0] of expert 2 is not row 2 of expert_weights[1][0] (the "
            "expert's first slot on this rank in the old map), the registered row its peers "
            "read over CUDA IPC",
        ),
        (
            lambda c, w, buf: c.add_send([w[0][0][2], w[0][1][2]], 1, 2),  # layer 0's rows
            "add_send: tensors[0] of expert 2 is not row 2 of expert_weights[1][0] (the "
            "expert's first slot on this rank in the old map), the registered row its peers "
            "read over CUDA IPC",
        ),
        (
            lambda c, w, buf: c.add_send([w[1][0][2]], 1, 2),
            "add_send: 1 tensors, but layer 1 of expert_weights has 2",
        ),
        (
            lambda c, w, buf: c.add_send([w[1][0][0], w[1][1][0]], 1, 7),
            "add_send: expert 7 is in no slot of this rank (rank 0) in the old map of layer 1",
        ),
        (
            lambda c, w, buf: c.add_recv([buf[0][0], buf[1][0]], 1, 0),
            "add_recv: expert 0 is in no slot of rank 1 in the old map of layer 1",
        ),
        (
            lambda c, w, buf: c.add_recv([buf[0][0], buf[0][1]], 1, 3),
            "add_recv: tensors[1] is (3, 2) torch.float32, but a row of expert_weights[1][1] is "
            "(5,) torch.bfloat16",
        ),
        (
            lambda c, w, buf: c.add_recv([buf[0][:, 0], buf[1][0]], 1, 3),
            "add_recv: tensors[0] is (4, 2) torch.float32, but a row of expert_weights[1][0] is "
            "(3, 2) torch.float32",
        ),
        (
            lambda c, w, buf: c.add_recv([buf[0][0].t().contiguous().t(), buf[1][0]], 1, 3),
            "add_recv: tensors[0] is not contiguous",
        ),
        (
            lambda c, w, buf: c.add_recv([buf[0][0], buf[1][0]], 3, 3),
            "add_recv: rank 3 is not an EP rank in [0, 3)",
        ),
    ],
)
def test_bad_calls_are_refused_and_abort_the_transport(call, msg):
    c, t, w, buf = _setup()
    c.set_transfer_context(OLD1, 1)
    with pytest.raises(ValueError) as e:
        call(c, w, buf)
    full = msg if "is not an EP rank" in msg else msg + "; the communicator was aborted"
    assert str(e.value) == full
    assert t.aborted == msg
    assert (c._sends, c._recvs) == ([], [])


@pytest.mark.parametrize(
    "context, msg",
    [
        (
            None,
            "add_send: the IPC transport needs set_transfer_context(old_indices, layer_idx) "
            "before the layer's add_send/add_recv (it reads the sender's weight rows, found "
            "from the old map)",
        ),
        (
            (OLD1, 2),
            "add_send: layer_idx 2 of set_transfer_context is not a layer of the "
            "communicator's expert_weights (0..1)",
        ),
    ],
)
def test_without_a_usable_transfer_context_ipc_refuses(context, msg):
    c, t, w, buf = _setup()
    if context is not None:
        c.set_transfer_context(*context)
    with pytest.raises(ValueError) as e:
        c.add_send([w[1][0][2], w[1][1][2]], 1, 2)
    assert str(e.value) == msg + "; the communicator was aborted"
    assert t.aborted == msg


def test_a_round_that_does_not_finish_times_out_naming_the_peers():
    c, t, w, buf = _setup(timeout=0.2, finishes=False)
    c.set_transfer_context(OLD1, 1)
    c.add_recv([buf[0][1], buf[1][1]], 2, 7)
    c.add_send([w[1][0][2], w[1][1][2]], 1, 2)
    with pytest.raises(TimeoutError) as e:
        c.execute()
    msg = (
        "rank 0: the IPC round of layer 1 did not complete within 0.2 s (ranks [2] never made "
        "their rows ready; ranks [1] never finished reading this rank's rows)"
    )
    assert str(e.value) == msg + "; the communicator was aborted"
    assert t.aborted == msg


def test_the_ipc_communicator_keeps_vllms_layer_loop():
    c, t, w, buf = _setup()
    ep = SimpleNamespace(rank=lambda: 0, size=lambda: WORLD)
    with pytest.raises(ValueError) as e:
        V.rearrange_expert_weights_inplace(None, None, w, buf, ep, c)
    assert str(e.value) == (
        "rearrange_expert_weights_inplace: the 'eplb_pynccl_ipc' communicator moves one "
        "execute() at a time over its registered weights; use vLLM's layer loop with it "
        "(register() keeps vLLM's loop for it)"
    )


# ---- create_communicator's refusals before any set-up ------------------------------------------


@pytest.mark.parametrize(
    "weights, msg",
    [
        (
            [[torch.zeros(2, 3)]],
            "EPLB communicator 'eplb_pynccl_ipc' moves CUDA expert weights over CUDA IPC; the "
            "expert weights are on cpu (use 'eplb_pynccl' for CPU weights)",
        ),
        (
            [],
            "EPLB communicator 'eplb_pynccl_ipc' moves CUDA expert weights over CUDA IPC; the "
            "expert weights are none (use 'eplb_pynccl' for CPU weights)",
        ),
    ],
)
def test_ipc_needs_cuda_weights(weights, msg):
    gc = SimpleNamespace(cpu_group=None)  # never reached: refused before any collective
    with pytest.raises(ValueError) as e:
        V.create_communicator(gc, weights, [], transport="ipc")
    assert str(e.value) == msg


def test_transport_name_is_checked():
    with pytest.raises(ValueError) as e:
        V.create_communicator(SimpleNamespace(cpu_group=None), [], [], transport="nvlink")
    assert str(e.value) == "transport must be 'nccl' or 'ipc', got 'nvlink'"


# ---- vLLM's calls over in-process rounds that really copy ---------------------------------------


class _Node:
    """Every rank of a virtual node in this process: a round copies each pull with memmove
    from the sender's registered row (the address IpcTransport would read)."""

    def __init__(self):
        self.bases = {}


class _CopyingIpc(_FakeIpc):
    def __init__(self, node, rank, world):
        super().__init__(rank, world)
        self.node = node

    def prepare_round(self, sends, recvs, remote=None):
        rnd = _Round(self, sends, recvs, remote)
        node = self.node

        def launch(stream, deadline):
            import ctypes

            for (peer, (dst, n)), b, off in zip(rnd.recvs, rnd.rbuf, rnd.roff):
                ctypes.memmove(dst, node.bases[peer][b] + off, n)
            _Round.launch(rnd, stream, deadline)

        rnd.launch = launch
        return rnd


@pytest.mark.parametrize("n", [2, 3])
def test_vllms_calls_over_copying_rounds_move_every_row_exactly(n):
    """The call sequence the GPU test drives without vLLM (tests/vllm_calls.py) and the pull
    addresses: every rank's layer queued and executed (the copies happen in execute), then
    every rank's copy-out, as vLLM orders them; exact bytes after each rearrangement."""
    from tests.shuffle_util import check_weights, make_weights
    from tests.test_gpu_vllm_ipc import LAYERS, SPECS
    from tests.test_gpu_vllm_ipc import P as PR
    from tests.vllm_calls import VllmCalls
    from tests_vllm.util import sequence

    maps = sequence(7 + n, 4, LAYERS, n, PR)
    specs = [[(shape, getattr(torch, dt)) for shape, dt in SPECS]] * LAYERS
    node = _Node()
    ranks = []
    for r in range(n):
        ws = make_weights(torch, specs, maps[0], r, n, "cpu")
        buf = [torch.empty_like(t) for t in ws[0]]
        t = _CopyingIpc(node, r, n)
        rows = WeightRows(ws)
        node.bases[r] = rows.ptr
        comm = V._CommunicatorImpl(t, ws, buf, ipc=IpcPath(t, rows))
        ranks.append((ws, buf, t, VllmCalls(torch, V, comm, r, n, PR)))
    pulled = 0
    for k, (old, new) in enumerate(zip(maps, maps[1:])):
        for layer in range(LAYERS):
            primaries = [
                calls.transfer(old[layer], new[layer], ws[layer], buf, None, layer)
                for ws, buf, _, calls in ranks
            ]
            for (ws, buf, _, calls), primary in zip(ranks, primaries):
                calls.move_from(ws[layer], buf, primary, old[layer], new[layer])
        for r, (ws, _, t, _) in enumerate(ranks):
            assert check_weights(torch, ws, new, r, n) == [], (k, r)
            assert t.rounds == (k + 1) * LAYERS
            pulled += sum(len(rnd.recvs) for rnd in t.launched)
    assert pulled > 0
