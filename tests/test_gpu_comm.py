"""Layer 2 on GPUs: Communicator between real processes, one GPU each.

Every test runs a job in all ranks of a process pool (tests/gpu_util.py): one pool per world
size (``$EPLB_PYNCCL_TEST_WORLD_SIZES``, default 2 and 4), kept for the module, with one main
communicator made through ``Communicator.from_store`` and a torch TCPStore (no process group).
Jobs check their data exactly (byte for byte) inside the ranks and return summaries that the
test checks again. A failing or hung job kills the pool (the next test starts a new one).

The init-timeout test uses its own fresh process.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.gpu_util import RankPool, run_ranks

pytestmark = pytest.mark.gpu

# ~0.1 s of GPU spinning on an H100 (torch.cuda._sleep counts clock cycles).
SLEEP_CYCLES = 200_000_000
JOB_TIMEOUT = 120

DTYPES = [
    "uint8",
    "int8",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "bool",
]

STATE_MSG = "communicator is {}; no further operations are allowed"

# ---- pools -------------------------------------------------------------------------------------

_POOLS: dict[int, RankPool] = {}


def _close_pools() -> None:
    for ws in list(_POOLS):
        _POOLS.pop(ws).close()


@pytest.fixture(scope="module", autouse=True)
def _pools_closed_at_module_end():
    yield
    _close_pools()


@pytest.fixture
def pool(world_size) -> RankPool:
    p = _POOLS.get(world_size)
    if p is None or p.broken:
        _close_pools()  # one pool at a time holds the GPUs
        p = _POOLS[world_size] = RankPool(world_size)
    return p


# ---- helpers used inside the ranks -------------------------------------------------------------


def _seed(*parts: int) -> int:
    s = 0
    for x in parts:
        s = (s * 1_000_003 + int(x) + 1) % (2**62)
    return s


def _payload(seed: int, count: int, dtype_name: str = "uint8"):
    """A CPU tensor of ``count`` elements whose bytes depend only on ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if dtype_name == "bool":
        return torch.randint(0, 2, (count,), dtype=torch.uint8, generator=g).bool()
    dt = getattr(torch, dtype_name)
    itemsize = torch.empty(0, dtype=dt).element_size()
    return torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=g).view(dt)


def _assert_bytes(got, expected, what: str) -> None:
    """Exact byte equality of two tensors (any dtype, any device)."""
    import torch

    g = got.detach().reshape(-1).view(torch.uint8).cpu()
    e = expected.detach().reshape(-1).view(torch.uint8).cpu()
    if g.shape != e.shape:
        raise AssertionError(f"{what}: {g.numel()} bytes, expected {e.numel()}")
    if not torch.equal(g, e):
        bad = (g != e).nonzero().reshape(-1)
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {e.numel()} bytes differ; first at byte {i}: "
            f"got {int(g[i])}, expected {int(e[i])}"
        )


def _setup(ctx):
    """torch with this rank's device current, and the pool's main communicator."""
    import torch

    from eplb_pynccl import Communicator

    torch.cuda.set_device(ctx.device)
    comm = ctx.cache.get("comm")
    if comm is None:
        comm = Communicator.from_store(
            ctx.store, ctx.rank, ctx.world_size, device=ctx.device, key=ctx.key("main"), timeout=60
        )
        ctx.cache["comm"] = comm
    return torch, comm


def _ring(ctx, comm, tag: int, nbytes: int = 4096, **kw) -> None:
    """A ring exchange (send right, receive from left) checked exactly."""
    import torch

    from eplb_pynccl import group

    r, n = ctx.rank, ctx.world_size
    right, left = (r + 1) % n, (r - 1) % n
    x = _payload(_seed(tag, r), nbytes).to(ctx.device)
    y = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device=ctx.device)
    with group():
        comm.send(x, right, **kw)
        comm.recv(y, left, **kw)
    comm.wait(timeout=30)
    _assert_bytes(y, _payload(_seed(tag, left), nbytes), f"ring exchange {tag}")


class _DLPackOnly:
    """A buffer known only through DLPack."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, stream=None):
        return self.t.__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


class _CAIOnly:
    """A buffer known only through __cuda_array_interface__."""

    def __init__(self, t):
        self.t = t

    @property
    def __cuda_array_interface__(self):
        return self.t.__cuda_array_interface__


# ---- jobs (run in every rank) ------------------------------------------------------------------


def _job_properties(ctx):
    torch, comm = _setup(ctx)
    import torch.distributed as dist

    from eplb_pynccl._nccl import library

    lib = library.load()
    h = comm.handle
    return {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "device": comm.device,
        "blocking": comm.blocking,
        "closed": comm.closed,
        "timeout": comm.timeout,
        "handle_nonzero": h != 0,
        "nccl_count": lib.comm_int("ncclCommCount", h),
        "nccl_rank": lib.comm_int("ncclCommUserRank", h),
        "nccl_device": lib.comm_int("ncclCommCuDevice", h),
        "nccl_version_matches": comm.nccl_version == lib.version,
        "async_error": comm.async_error(),
        "process_group": dist.is_initialized(),
        "repr": repr(comm),
        "library": lib.path,
    }


def _job_ring_dtypes(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    done = []
    for i, name in enumerate(DTYPES):  # one group per dtype
        count = 1000 + 37 * i
        x = _payload(_seed(1, r, i), count, name).to(dev)
        y = torch.empty(count, dtype=x.dtype, device=dev)
        y.view(torch.uint8).fill_(0xA5)
        with group():
            comm.send(x, right)
            comm.recv(y, left)
        comm.wait(timeout=30)
        _assert_bytes(y, _payload(_seed(1, left, i), count, name), f"ring {name}")
        done.append(name)
    # every dtype in a single group: several ops to the same peer, matched in order
    xs = [_payload(_seed(2, r, i), 500 + 3 * i, name).to(dev) for i, name in enumerate(DTYPES)]
    ys = [torch.empty_like(x) for x in xs]
    for y in ys:
        y.view(torch.uint8).fill_(0x5A)
    with group():
        for x, y in zip(xs, ys, strict=True):
            comm.send(x, right)
            comm.recv(y, left)
    comm.wait(timeout=30)
    for i, (name, y) in enumerate(zip(DTYPES, ys, strict=True)):
        _assert_bytes(y, _payload(_seed(2, left, i), 500 + 3 * i, name), f"grouped {name}")
    return done


def _pair_size(src: int, dst: int, k: int) -> int:
    return 1 + (src * 7919 + dst * 104729 + k * 15485863 + k * k * 31) % 24000


def _job_all_pairs(ctx, ops_per_peer: int):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    sends, recvs = {}, {}
    for p in range(n):  # every peer, this rank included
        ss = [_pair_size(r, p, k) for k in range(ops_per_peer)]
        rs = [_pair_size(p, r, k) for k in range(ops_per_peer)]
        sends[p] = (_payload(_seed(3, r, p), sum(ss)).to(dev), ss)
        recvs[p] = (torch.full((sum(rs),), 0xA5, dtype=torch.uint8, device=dev), rs)
    soff = {p: 0 for p in range(n)}
    roff = {p: 0 for p in range(n)}
    issued = 0
    with group():
        for k in range(ops_per_peer):
            for j in range(n):
                p = (r + j + k) % n  # vary the issue order between ranks and rounds
                buf, ss = sends[p]
                comm.send(buf[soff[p] : soff[p] + ss[k]], p)
                soff[p] += ss[k]
                rbuf, rs = recvs[p]
                comm.recv(rbuf[roff[p] : roff[p] + rs[k]], p)
                roff[p] += rs[k]
                issued += 2
    comm.wait(timeout=60)
    total = 0
    for p in range(n):
        rbuf, rs = recvs[p]
        _assert_bytes(rbuf, _payload(_seed(3, p, r), sum(rs)), f"all-pairs data from rank {p}")
        total += rbuf.numel()
    return {"ops": issued, "bytes_received": total}


def _job_self_send(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    a = _payload(_seed(5, r), 10_000, "float32").to(dev)
    b = torch.zeros_like(a)
    with group():
        comm.send(a, r)
        comm.recv(b, r)
    comm.wait(timeout=30)
    _assert_bytes(b, a, "self send")
    # self and ring in one group, receives queued before sends
    c = _payload(_seed(6, r), 3000, "int64").to(dev)
    d = torch.zeros_like(c)
    e = torch.zeros_like(c)
    with group():
        comm.recv(d, r)
        comm.recv(e, left)
        comm.send(c, right)
        comm.send(c, r)
    comm.wait(timeout=30)
    _assert_bytes(d, c, "self send in a ring group")
    _assert_bytes(e, _payload(_seed(6, left), 3000, "int64"), "ring part of the self group")
    return True


def _stream_and_buffers(torch, dev, seed, N):
    """A side stream, the payload of ``seed``, a zero send buffer and a 0xA5 receive buffer of
    ``N`` bytes on ``dev``, the device synchronized."""
    s = torch.cuda.Stream(device=dev)
    payload = _payload(seed, N).to(dev)
    x = torch.zeros(N, dtype=torch.uint8, device=dev)
    y = torch.full((N,), 0xA5, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    return s, payload, x, y


def _copy_after_sleep(torch, x, payload):
    """On the current stream: a GPU sleep, then ``payload`` into ``x`` (a send issued on any
    other stream reads x's zeros)."""
    torch.cuda._sleep(SLEEP_CYCLES)
    x.copy_(payload)


def _job_torch_streams(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    N = 1 << 20
    # 1. stream= a torch.cuda.Stream. The payload lands in x on that stream only after a GPU
    # sleep: a send issued on any other stream would read x's zeros.
    s, payload, x, y = _stream_and_buffers(torch, dev, _seed(7, r), N)
    with torch.cuda.stream(s):
        _copy_after_sleep(torch, x, payload)
    with group():
        comm.send(x, right, stream=s)
        comm.recv(y, left, stream=s)
    comm.wait(stream=s, timeout=30)
    explicit_done = s.query()
    _assert_bytes(y, _payload(_seed(7, left), N), "explicit torch stream")
    # 2. stream=None inside `with torch.cuda.stream(s2)`: the current stream is used, and
    # wait() (stream=None) waits for that stream too.
    s2, payload2, x2, y2 = _stream_and_buffers(torch, dev, _seed(8, r), N)
    with torch.cuda.stream(s2):
        _copy_after_sleep(torch, x2, payload2)
        with group():
            comm.send(x2, right)
            comm.recv(y2, left)
        comm.wait(timeout=30)
        current_done = s2.query()
    _assert_bytes(y2, _payload(_seed(8, left), N), "current torch stream")
    return {"explicit_done": explicit_done, "current_done": current_done}


def _job_raw_tuples(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    N = 65536 + 17
    x = _payload(_seed(9, r), N).to(dev)
    y = torch.full((N,), 0xA5, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    with group():
        comm.send((x.data_ptr(), x.nbytes), right)  # stream None: the default stream
        comm.recv((y.data_ptr(), y.nbytes), left, stream=0)
    comm.wait(stream=0, timeout=30)
    _assert_bytes(y, _payload(_seed(9, left), N), "raw tuples, default stream")
    # an int handle of a side stream; one buffer sent as two messages of different sizes
    s = torch.cuda.Stream(device=dev)
    x2 = _payload(_seed(10, r), N).to(dev)
    y2 = torch.full((N,), 0xA5, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    p, q = x2.data_ptr(), y2.data_ptr()
    with group():
        comm.send((p, 1000), right, stream=s.cuda_stream)
        comm.send((p + 1000, N - 1000), right, stream=s.cuda_stream)
        comm.recv((q, 1000), left, stream=s.cuda_stream)
        comm.recv((q + 1000, N - 1000), left, stream=s.cuda_stream)
    comm.wait(stream=s.cuda_stream, timeout=30)
    assert s.query()
    _assert_bytes(y2, _payload(_seed(10, left), N), "raw tuples, int stream handle")
    return True


def _job_p2p_and_prepared(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import PreparedP2P, group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    N = 4096 + 3
    peers = [p for p in range(n) if p != r] or [r]  # one rank: a batch to itself
    x = {p: _payload(_seed(20, r * n + p), N).to(dev) for p in peers}  # what r sends to p
    y = {p: torch.full((N,), 0xA5, dtype=torch.uint8, device=dev) for p in peers}
    torch.cuda.synchronize(dev)
    # one batched call: tensors and raw tuples mixed
    comm.p2p([(x[p], p) for p in peers], [((y[p].data_ptr(), N), p) for p in peers])
    torch.cuda.synchronize(dev)
    for p in peers:
        _assert_bytes(y[p], _payload(_seed(20, p * n + r), N), f"p2p from {p}")
    # a prepared batch, launched twice on two streams: contents are read at each launch
    batch = comm.prepare_p2p([(x[p], p) for p in peers], [(y[p], p) for p in peers])
    assert isinstance(batch, PreparedP2P) and batch.num_ops == 2 * len(peers)
    s = torch.cuda.Stream(device=dev)
    for k, stream in ((21, None), (22, s)):
        for p in peers:
            x[p].copy_(_payload(_seed(k, r * n + p), N).to(dev))
            y[p].fill_(0xA5)
        torch.cuda.synchronize(dev)
        batch.launch(stream)
        torch.cuda.synchronize(dev)
        for p in peers:
            _assert_bytes(y[p], _payload(_seed(k, p * n + r), N), f"prepared launch {k} from {p}")
    # inside a group, beside a plain send/recv pair (ring), on an int stream handle
    z = torch.full((N,), 0xA5, dtype=torch.uint8, device=dev)
    for p in peers:
        y[p].fill_(0xA5)
    torch.cuda.synchronize(dev)
    with group():
        batch.launch(s.cuda_stream)
        comm.send(x[peers[0]], (r + 1) % n, stream=s)
        comm.recv(z, (r - 1) % n, stream=s)
    s.synchronize()
    for p in peers:
        _assert_bytes(y[p], _payload(_seed(22, p * n + r), N), f"prepared in a group from {p}")
    left = (r - 1) % n
    left_first = ([q for q in range(n) if q != left] or [left])[
        0
    ]  # what left sent: its x[peers[0]]
    _assert_bytes(z, _payload(_seed(22, left * n + left_first), N), "ring beside")
    # bad input is refused by prepare_p2p, naming the entry; nothing is issued
    try:
        comm.prepare_p2p([(x[peers[0]], n)])
    except ValueError as e:
        assert str(e) == f"sends[0]: peer must be in [0, {n}), got {n}", str(e)
    else:
        raise AssertionError("a bad peer was accepted")
    return True


def _job_captured_batch(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import CapturedP2P

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    N = 4096 + 5
    peers = [p for p in range(n) if p != r] or [r]
    x = {p: torch.empty(N, dtype=torch.uint8, device=dev) for p in peers}
    y = {p: torch.full((N,), 0xA5, dtype=torch.uint8, device=dev) for p in peers}
    sends, recvs = [(x[p], p) for p in peers], [(y[p], p) for p in peers]
    batch = comm.prepare_p2p(sends, recvs)
    batch.launch()  # connections are made outside the capture
    torch.cuda.synchronize(dev)
    g = batch.capture()
    assert isinstance(g, CapturedP2P) and g.num_ops == 2 * len(peers) and not g.released
    _replay_captured(ctx, torch, g, x, y, peers, N)
    _released_by_the_caller(torch, comm, dev, sends, recvs)
    _capture_refusals(comm, batch)
    # a communicator with a live graph closes (collective) without hanging, releasing it; one
    # aborted releases its graphs too
    out = {}
    for how in ("close", "abort"):
        out[how] = _released_with_its_communicator(ctx, torch, how, sends, recvs)
    g.release()
    return True


def _replay_captured(ctx, torch, g, x, y, peers, N):
    """The captured graph replayed on the default stream, a torch stream and an int handle."""
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    s = torch.cuda.Stream(device=dev)
    for k, stream in ((31, None), (32, s), (33, s.cuda_stream)):
        for p in peers:  # the graph reads its buffers' contents when it runs
            x[p].copy_(_payload(_seed(k, r * n + p), N).to(dev))
            y[p].fill_(0xA5)
        torch.cuda.synchronize(dev)
        g.launch(stream)
        torch.cuda.synchronize(dev)
        for p in peers:
            _assert_bytes(y[p], _payload(_seed(k, p * n + r), N), f"replay {k} from {p}")


def _released_by_the_caller(torch, comm, dev, sends, recvs):
    """prepare_p2p(graph=True) captures at once; once released, a launch is refused."""
    from eplb_pynccl import CapturedP2P, CommunicatorStateError

    g2 = comm.prepare_p2p(sends, recvs, graph=True)
    assert isinstance(g2, CapturedP2P)
    g2.launch()
    torch.cuda.synchronize(dev)
    g2.release()
    with pytest.raises(
        CommunicatorStateError,
        match=r"^this captured batch was released \(released by the caller\); capture it again$",
    ):
        g2.launch()


def _capture_refusals(comm, batch):
    """No capture inside group(), none of an empty batch."""
    from eplb_pynccl import group

    with pytest.raises(RuntimeError, match=r"^capture\(\) cannot run inside group\(\)"):
        with group():
            batch.capture()
    with pytest.raises(ValueError, match=r"^capture\(\) of an empty batch"):
        comm.prepare_p2p([], []).capture()


def _released_with_its_communicator(ctx, torch, how, sends, recvs):
    """A new communicator with a live graph, closed or aborted (``how``): the graph is
    released and refused; returns the seconds close() or abort() took."""
    from eplb_pynccl import Communicator, CommunicatorStateError

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    c = Communicator.from_store(
        ctx.store, r, n, device=dev, key=ctx.key(f"graph-{how}"), timeout=60
    )
    b = c.prepare_p2p(sends, recvs)
    b.launch()
    torch.cuda.synchronize(dev)
    gg = b.capture()
    gg.launch()
    torch.cuda.synchronize(dev)
    t0 = time.monotonic()
    getattr(c, how)()
    elapsed = time.monotonic() - t0
    assert gg.released
    word = "closed" if how == "close" else "aborted"
    with pytest.raises(
        CommunicatorStateError,
        match=f"^this captured batch was released \\(its communicator was {word}\\); capture it again$",
    ):
        gg.launch()
    return elapsed


def _job_raw_tuples_wrong_device(ctx):
    torch, comm = _setup(ctx)
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    other = (dev + 1) % torch.cuda.device_count()
    z = torch.zeros(16, device=other)
    msg = f"buf is on cuda:{other} but this communicator is on cuda:{dev}"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        comm.send((z.data_ptr(), z.nbytes), (r + 1) % n)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        comm.recv(z, (r + 1) % n)
    _ring(ctx, comm, 11)
    return True


def _job_cupy(ctx):
    torch, comm = _setup(ctx)
    import cupy as cp
    import numpy as np

    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n

    def np_payload(tag, rank, shape, dtype):
        count = int(np.prod(shape))
        raw = _payload(_seed(tag, rank), count * np.dtype(dtype).itemsize).numpy()
        return raw.view(dtype).reshape(shape)

    with cp.cuda.Device(dev):
        # explicit cupy stream, C-ordered float32 arrays (compared as bytes: NaN patterns)
        a = cp.asarray(np_payload(12, r, (60, 50), np.float32))
        b = cp.zeros((60, 50), dtype=cp.float32)
        cp.cuda.Device(dev).synchronize()
        s = cp.cuda.Stream(non_blocking=True)
        with group():
            comm.send(a, right, stream=s)
            comm.recv(b, left, stream=s)
        s.synchronize()
        got = cp.asnumpy(b).view(np.uint8)
        want = np_payload(12, left, (60, 50), np.float32).view(np.uint8)
        assert np.array_equal(got, want), "cupy explicit stream: data differs"
        # the current cupy stream (stream=None), Fortran-ordered int32 arrays
        s2 = cp.cuda.Stream(non_blocking=True)
        c = cp.asfortranarray(cp.asarray(np_payload(13, r, (33, 21), np.int32)))
        d = cp.zeros((33, 21), dtype=cp.int32, order="F")
        cp.cuda.Device(dev).synchronize()
        with s2:
            with group():
                comm.send(c, right)
                comm.recv(d, left)
        comm.wait(stream=s2, timeout=30)  # a cupy stream handed to wait()
        s2_done = s2.done
        assert np.array_equal(cp.asnumpy(d), np_payload(13, left, (33, 21), np.int32)), (
            "cupy F-order"
        )
        # a non-contiguous cupy array is refused before NCCL
        with pytest.raises(
            ValueError, match=r"^buf is not contiguous \(shape \(60, 25\), strides \(200, 8\)\)$"
        ):
            comm.send(a[:, ::2], right)
        # a cupy collective keeps its dtype
        e = cp.full((8,), r + 1, dtype=cp.int64)
        cp.cuda.Device(dev).synchronize()  # s does not wait for the null stream by itself
        comm.all_reduce(e, stream=s)
        s.synchronize()
        assert cp.asnumpy(e).tolist() == [n * (n + 1) // 2] * 8
    return {"s2_done": s2_done}


def _job_dlpack_and_cai(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    x = _payload(_seed(14, r), 5000, "float32").to(dev)
    y = torch.zeros_like(x)
    x2 = _payload(_seed(15, r), 777).to(dev)
    y2 = torch.zeros_like(x2)
    torch.cuda.synchronize(dev)
    with group():
        comm.send(_DLPackOnly(x), right)
        comm.recv(_CAIOnly(y), left)
        comm.send(_CAIOnly(x2), right)
        comm.recv(_DLPackOnly(y2), left)
    comm.wait(stream=0, timeout=30)
    _assert_bytes(y, _payload(_seed(14, left), 5000, "float32"), "DLPack -> CAI")
    _assert_bytes(y2, _payload(_seed(15, left), 777), "CAI -> DLPack")
    # collectives keep the element type of such objects (a float sum, not a byte sum)
    z = torch.full((8,), 1.5 * (r + 1), dtype=torch.float32, device=dev)
    w = torch.full((8,), float(r), dtype=torch.float32, device=dev)
    torch.cuda.synchronize(dev)
    comm.all_reduce(_DLPackOnly(z))
    comm.all_reduce(_CAIOnly(w), op="max")
    comm.wait(stream=0, timeout=30)
    assert z.cpu().tolist() == [1.5 * n * (n + 1) / 2] * 8, z.cpu().tolist()
    assert w.cpu().tolist() == [float(n - 1)] * 8, w.cpu().tolist()
    return True


def _job_collectives(ctx):
    torch, comm = _setup(ctx)
    out = {}
    x = _all_reduces(ctx, torch, comm, out)
    g, b = _gathers_and_broadcast(ctx, torch, comm, out)
    _collectives_in_one_group(ctx, torch, comm, out)
    _collective_argument_errors(ctx, torch, comm, x, g, b)
    _ring(ctx, comm, 17)  # still healthy
    return out


def _all_reduces(ctx, torch, comm, out):
    """all_reduce with every op, in place and into out=, in three dtypes; returns x."""
    r, dev = ctx.rank, ctx.device
    x = torch.full((16,), float(r + 1), dtype=torch.float32, device=dev)
    comm.all_reduce(x)
    comm.wait(timeout=30)
    out["sum"] = x.cpu().tolist()
    a = torch.arange(10, dtype=torch.int64, device=dev) * (r + 1)
    mx = torch.empty_like(a)
    mn = torch.empty_like(a)
    comm.all_reduce(a, out=mx, op="max")
    comm.all_reduce(a, out=mn, op="min")
    comm.wait(timeout=30)
    out["max"], out["min"], out["a"] = mx.cpu().tolist(), mn.cpu().tolist(), a.cpu().tolist()
    p = torch.full((4,), float(r + 1), dtype=torch.float64, device=dev)
    avg = torch.full((4,), float(r + 1), dtype=torch.float32, device=dev)
    bf = torch.full((4,), float(r + 1), dtype=torch.bfloat16, device=dev)
    comm.all_reduce(p, op="prod")
    comm.all_reduce(avg, op="avg")
    comm.all_reduce(bf)
    comm.wait(timeout=30)
    out["prod"], out["avg"], out["bf16"] = (
        p.cpu().tolist(),
        avg.cpu().tolist(),
        bf.float().cpu().tolist(),
    )
    return x


def _gathers_and_broadcast(ctx, torch, comm, out):
    """all_gather (int32, fp8 checked byte for byte) and broadcast; returns g and b."""
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    g = torch.arange(5, dtype=torch.int32, device=dev) + 100 * r
    gathered = torch.full((5 * n,), -1, dtype=torch.int32, device=dev)
    comm.all_gather(g, gathered)
    f8 = _payload(_seed(16, r), 64, "float8_e4m3fn").to(dev)
    f8_all = torch.empty(64 * n, dtype=torch.float8_e4m3fn, device=dev)
    comm.all_gather(f8, f8_all)
    b = torch.arange(7, dtype=torch.float64, device=dev) + 1000 * r
    comm.broadcast(b, root=n - 1)
    comm.wait(timeout=30)
    out["gather"], out["bcast"] = gathered.cpu().tolist(), b.cpu().tolist()
    for q in range(n):
        _assert_bytes(
            f8_all[64 * q : 64 * (q + 1)],
            _payload(_seed(16, q), 64, "float8_e4m3fn"),
            f"fp8 all_gather part {q}",
        )
    return g, b


def _collectives_in_one_group(ctx, torch, comm, out):
    """Two collectives fused in one group."""
    from eplb_pynccl import group

    r, dev = ctx.rank, ctx.device
    u = torch.full((3,), float(r + 1), device=dev)
    v = torch.full((3,), float(r + 1), device=dev)
    with group():
        comm.all_reduce(u)
        comm.all_reduce(v, op="max")
    comm.wait(timeout=30)
    out["group"] = [u.cpu().tolist(), v.cpu().tolist()]


def _collective_argument_errors(ctx, torch, comm, x, g, b):
    """Argument errors, raised before NCCL."""
    n, dev = ctx.world_size, ctx.device
    errs = [
        (
            lambda: comm.all_reduce(x, op="bogus"),
            ValueError,
            "op must be one of ['avg', 'max', 'min', 'prod', 'sum'], got 'bogus'",
        ),
        (
            lambda: comm.all_reduce(x, out=torch.empty(16, dtype=torch.float64, device=dev)),
            TypeError,
            "out must have the same dtype as buf",
        ),
        (
            lambda: comm.all_reduce(x, out=torch.empty(8, device=dev)),
            ValueError,
            "out has 32 bytes but buf has 64",
        ),
        (
            lambda: comm.all_gather(g, torch.empty(5 * n + 1, dtype=torch.int32, device=dev)),
            ValueError,
            f"out has {4 * (5 * n + 1)} bytes; all_gather needs world_size * 20 = {20 * n}",
        ),
        (lambda: comm.broadcast(b, root=n), ValueError, f"root must be in [0, {n}), got {n}"),
        (
            lambda: comm.all_reduce(torch.ones(4, dtype=torch.bool, device=dev)),
            TypeError,
            "buf has dtype bool, which NCCL collectives do not support",
        ),
        (
            lambda: comm.all_reduce(torch.ones(4)),
            ValueError,
            "buf is a CPU tensor; NCCL needs a CUDA tensor (got device cpu)",
        ),
    ]
    for call, exc, msg in errs:
        with pytest.raises(exc, match="^" + re.escape(msg)):
            call()


def _job_barrier_connect_wait(ctx):
    torch, comm = _setup(ctx)
    comm.connect_peers(timeout=30)
    _ring(ctx, comm, 18)
    if ctx.rank == 0:
        time.sleep(1.5)  # the others must wait for this rank in barrier()
    t0 = time.monotonic()
    comm.barrier(timeout=30)
    barrier_s = time.monotonic() - t0
    # wait() returns only after the stream's work is done
    torch.cuda._sleep(SLEEP_CYCLES)
    comm.wait(timeout=30)
    current_done = torch.cuda.current_stream().query()
    s = torch.cuda.Stream(device=ctx.device)
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
    comm.wait(stream=s, timeout=30)
    side_done = s.query()
    return {"barrier_s": barrier_s, "current_done": current_done, "side_done": side_done}


def _job_validation(ctx):
    torch, comm = _setup(ctx)
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    x = _payload(_seed(19, r), 256).to(dev)
    _refuses_bad_peers(comm, n, x)
    bad_bufs, cpu, cpu_msg = _refuses_bad_buffers(ctx, torch, comm)
    _refuses_missing_devices(torch)
    _failed_groups_issue_nothing(ctx, torch, comm, bad_bufs, cpu, cpu_msg)
    return len(bad_bufs)


def _raises(exc, msg, call):
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        call()


def _refuses_bad_peers(comm, n, x):
    """Peers out of range, or not an int."""
    for bad in (n, -1, n + 7):
        _raises(
            ValueError, f"peer must be in [0, {n}), got {bad}", lambda bad=bad: comm.send(x, bad)
        )
        _raises(
            ValueError, f"peer must be in [0, {n}), got {bad}", lambda bad=bad: comm.recv(x, bad)
        )
    for bad, tname in (("1", "str"), (True, "bool"), (1.0, "float"), (None, "NoneType")):
        _raises(TypeError, f"peer must be an int, got {tname}", lambda bad=bad: comm.send(x, bad))


def _refuses_bad_buffers(ctx, torch, comm):
    """Non-contiguous, CPU and other-GPU buffers; returns them with their messages, and the
    CPU buffer and its message."""
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    ndev = torch.cuda.device_count()
    noncontig = torch.arange(12, dtype=torch.float32, device=dev).view(3, 4).t()
    nc_msg = "buf is not contiguous (shape (4, 3), strides (1, 4)); pass .contiguous()"
    cpu = torch.zeros(64, dtype=torch.uint8)
    cpu_msg = "buf is a CPU tensor; NCCL needs a CUDA tensor (got device cpu)"
    bad_bufs = [(noncontig, nc_msg), (cpu, cpu_msg)]
    if ndev >= 2:
        other = (dev + 1) % ndev
        bad_bufs.append(
            (
                torch.zeros(64, device=other),
                f"buf is on cuda:{other} but this communicator is on cuda:{dev}",
            )
        )
    for buf, msg in bad_bufs:
        _raises(ValueError, msg, lambda buf=buf: comm.send(buf, right))
        _raises(ValueError, msg, lambda buf=buf: comm.recv(buf, left))
    return bad_bufs, cpu, cpu_msg


def _refuses_missing_devices(torch):
    from eplb_pynccl import Communicator, UniqueId

    ndev = torch.cuda.device_count()
    _raises(
        ValueError,
        f"device {ndev} does not exist: this machine has {ndev} CUDA device(s)",
        lambda: Communicator(UniqueId(bytes(128)), 0, 1, device=ndev),
    )
    _raises(
        ValueError,
        f"device {ndev + 3} does not exist: this machine has {ndev} CUDA device(s)",
        lambda: Communicator(UniqueId(bytes(128)), 0, 1, device=f"cuda:{ndev + 3}"),
    )


def _failed_groups_issue_nothing(ctx, torch, comm, bad_bufs, cpu, cpu_msg):
    """In a group, a bad op discards everything queued in that group. If the unmatched send
    below (or the all-reduce) had been issued, the exchanges after it would receive the
    stale bytes, hang (wait() times out), or z would change."""
    from eplb_pynccl import group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    stale = _payload(_seed(20, r), 4096).to(dev)
    z = torch.full((16,), float(r + 1), device=dev)
    for buf, msg in bad_bufs:
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            with group():
                comm.all_reduce(z)
                comm.send(stale, right)
                comm.send(buf, right)
    # nested: the inner group fails, the outer group's exchange still goes out alone
    fresh = _payload(_seed(21, r), 4096).to(dev)
    y = torch.full((4096,), 0xA5, dtype=torch.uint8, device=dev)
    with group():
        comm.send(fresh, right)
        comm.recv(y, left)
        with pytest.raises(ValueError, match="^" + re.escape(cpu_msg) + "$"):
            with group():
                comm.send(stale, right)
                comm.send(cpu, right)
    comm.wait(timeout=20)
    _assert_bytes(y, _payload(_seed(21, left), 4096), "exchange after a failed inner group")
    _ring(ctx, comm, 22)
    torch.cuda.synchronize(dev)
    assert z.cpu().tolist() == [float(r + 1)] * 16, "a discarded all_reduce ran"


def _job_abort_and_wait_timeout(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import Communicator, CommunicatorStateError, NcclTimeoutError, group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right = (r + 1) % n
    x = torch.zeros(64, dtype=torch.uint8, device=dev)
    aborted = STATE_MSG.format("aborted")

    def all_ops_refused(c):
        calls = [
            lambda: c.send(x, right),
            lambda: c.recv(x, right),
            lambda: c.send((x.data_ptr(), 64), right),
            lambda: c.all_reduce(x),
            lambda: c.all_gather(x, torch.zeros(64 * n, dtype=torch.uint8, device=dev)),
            lambda: c.broadcast(x),
            lambda: c.barrier(),
            lambda: c.connect_peers(),
            lambda: c.wait(),
            lambda: c.async_error(),
            lambda: c.handle,
        ]
        for call in calls:
            with pytest.raises(CommunicatorStateError, match="^" + re.escape(aborted) + "$"):
                call()
        with pytest.raises(CommunicatorStateError, match="^" + re.escape(aborted) + "$"):
            with group():
                c.send(x, right)
        return len(calls) + 1

    # wait() past its timeout aborts the communicator
    c2 = Communicator.from_store(
        ctx.store, r, n, device=dev, key=ctx.key("wait-timeout"), timeout=60
    )
    _ring(ctx, c2, 23)
    torch.cuda._sleep(SLEEP_CYCLES * 30)  # ~3 s of work on the current stream
    t0 = time.monotonic()
    with pytest.raises(NcclTimeoutError) as info:
        c2.wait(timeout=0.3)
    wait_s = time.monotonic() - t0
    still_busy = not torch.cuda.current_stream().query()  # it gave up, not waited it out
    wait_msg = str(info.value)
    assert c2.closed and repr(c2).endswith("state=aborted)")
    refused = all_ops_refused(c2)
    c2.abort()  # idempotent
    c2.close()  # nothing to close any more
    torch.cuda.synchronize(dev)

    # abort() by hand
    c3 = Communicator.from_store(ctx.store, r, n, device=dev, key=ctx.key("abort"), timeout=60)
    _ring(ctx, c3, 24)
    c3.abort()
    assert c3.closed and repr(c3).endswith("state=aborted)")
    all_ops_refused(c3)
    # the main communicator is unaffected
    _ring(ctx, comm, 25)
    return {"wait_s": wait_s, "still_busy": still_busy, "wait_msg": wait_msg, "refused": refused}


def _job_close(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import Communicator, CommunicatorStateError

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right = (r + 1) % n
    x = torch.zeros(64, dtype=torch.uint8, device=dev)
    closed = STATE_MSG.format("closed")
    c4 = Communicator.from_store(ctx.store, r, n, device=dev, key=ctx.key("close"), timeout=60)
    _ring(ctx, c4, 26)
    c4.barrier(timeout=30)  # allocates the scratch buffer that close() frees
    c4.close()
    assert c4.closed and repr(c4).endswith("state=closed)")
    calls = [
        lambda: c4.send(x, right),
        lambda: c4.recv(x, right),
        lambda: c4.all_reduce(x),
        lambda: c4.broadcast(x),
        lambda: c4.barrier(),
        lambda: c4.wait(),
        lambda: c4.handle,
    ]
    for call in calls:
        with pytest.raises(CommunicatorStateError, match="^" + re.escape(closed) + "$"):
            call()
    c4.close()  # idempotent
    c4.abort()  # no-op once closed
    assert repr(c4).endswith("state=closed)")
    # context manager: close on normal exit ...
    with Communicator.from_store(ctx.store, r, n, device=dev, key=ctx.key("cm"), timeout=60) as c5:
        _ring(ctx, c5, 27)
    assert repr(c5).endswith("state=closed)")
    # ... abort on an exception
    with pytest.raises(RuntimeError, match="^inside$"):
        with Communicator.from_store(
            ctx.store, r, n, device=dev, key=ctx.key("cm2"), timeout=60
        ) as c6:
            raise RuntimeError("inside")
    assert repr(c6).endswith("state=aborted)")
    _ring(ctx, comm, 28)
    return len(calls)


def _job_nonblocking(ctx):
    torch, comm = _setup(ctx)
    from eplb_pynccl import Communicator, group

    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    right, left = (r + 1) % n, (r - 1) % n
    c = Communicator.from_store(
        ctx.store, r, n, device=dev, key=ctx.key("nonblocking"), blocking=False, timeout=60
    )
    state = {"blocking": c.blocking, "closed": c.closed, "async_error": c.async_error()}
    x = _payload(_seed(29, r), 100_000, "bfloat16").to(dev)
    y = torch.zeros_like(x)
    with group():
        c.send(x, right)
        c.recv(y, left)
    c.wait(timeout=30)
    _assert_bytes(y, _payload(_seed(29, left), 100_000, "bfloat16"), "non-blocking exchange")
    s = torch.full((5,), float(r + 1), device=dev)
    c.all_reduce(s)  # outside a group: issued and waited for by itself
    c.wait(timeout=30)
    assert s.cpu().tolist() == [n * (n + 1) / 2] * 5
    c.connect_peers(timeout=30)
    c.barrier(timeout=30)
    c.close()
    state["closed_after"] = c.closed
    _ring(ctx, comm, 30)
    return state


def _job_init_timeout(ctx):
    from eplb_pynccl import Communicator, CommunicatorStateError, NcclTimeoutError, UniqueId

    made = []

    class Capture(Communicator):
        def __init__(self, *a, **k):
            made.append(self)
            super().__init__(*a, **k)

    uid = UniqueId.generate()
    t0 = time.monotonic()
    try:
        Capture(uid, 0, 2, device=ctx.device, blocking=False, timeout=3)
    except NcclTimeoutError as e:
        err = e
    else:
        raise AssertionError("a non-blocking init whose peer never joins did not time out")
    elapsed = time.monotonic() - t0
    c = made[0]
    with pytest.raises(
        CommunicatorStateError, match="^" + re.escape(STATE_MSG.format("aborted")) + "$"
    ):
        c.send((4096, 0), 1)
    return {
        "elapsed": elapsed,
        "msg": str(err),
        "code": err.code,
        "function": err.function,
        "is_timeout_error": isinstance(err, TimeoutError),
        "closed": c.closed,
        "repr": repr(c),
    }


# ---- tests -------------------------------------------------------------------------------------


def test_from_store_communicator_properties(pool, world_size):
    res = pool.run(_job_properties, timeout=JOB_TIMEOUT)
    assert len({r["library"] for r in res}) == 1
    for rank, r in enumerate(res):
        assert r == {
            "rank": rank,
            "world_size": world_size,
            "device": rank,
            "blocking": True,
            "closed": False,
            "timeout": 60.0,
            "handle_nonzero": True,
            "nccl_count": world_size,
            "nccl_rank": rank,
            "nccl_device": rank,
            "nccl_version_matches": True,
            "async_error": None,
            "process_group": False,  # from_store made no torch.distributed process group
            "repr": f"Communicator(rank={rank}, world_size={world_size}, device={rank}, state=open)",
            "library": res[0]["library"],
        }


def test_ring_send_recv_every_dtype(pool, world_size):
    assert pool.run(_job_ring_dtypes, timeout=JOB_TIMEOUT) == [DTYPES] * world_size


def test_grouped_all_pairs_many_ops(pool, world_size):
    ops = 64
    res = pool.run(_job_all_pairs, ops, timeout=JOB_TIMEOUT)
    for rank, r in enumerate(res):
        assert r["ops"] == 2 * ops * world_size
        assert r["bytes_received"] == sum(
            _pair_size(p, rank, k) for p in range(world_size) for k in range(ops)
        )


def test_self_send_inside_a_group(pool, world_size):
    assert pool.run(_job_self_send, timeout=JOB_TIMEOUT) == [True] * world_size


def test_torch_side_streams(pool, world_size):
    res = pool.run(_job_torch_streams, timeout=JOB_TIMEOUT)
    assert res == [{"explicit_done": True, "current_done": True}] * world_size


def test_raw_pointer_tuples(pool, world_size):
    assert pool.run(_job_raw_tuples, timeout=JOB_TIMEOUT) == [True] * world_size


def test_p2p_batch_and_prepared_batch(pool, world_size):
    assert pool.run(_job_p2p_and_prepared, timeout=JOB_TIMEOUT) == [True] * world_size


def test_prepared_batch_captured_as_a_cuda_graph(pool, world_size):
    assert pool.run(_job_captured_batch, timeout=JOB_TIMEOUT) == [True] * world_size


@pytest.mark.gpu(gpus=2)  # the pointer must live on a GPU other than the communicator's
def test_raw_pointer_on_another_gpu_is_refused(pool, world_size):
    assert pool.run(_job_raw_tuples_wrong_device, timeout=JOB_TIMEOUT) == [True] * world_size


def test_cupy_arrays_and_streams(pool, world_size):
    pytest.importorskip("cupy")
    assert pool.run(_job_cupy, timeout=JOB_TIMEOUT) == [{"s2_done": True}] * world_size


def test_dlpack_and_cuda_array_interface_objects(pool, world_size):
    assert pool.run(_job_dlpack_and_cai, timeout=JOB_TIMEOUT) == [True] * world_size


def test_collectives(pool, world_size):
    n = world_size
    res = pool.run(_job_collectives, timeout=JOB_TIMEOUT)
    fact = 1
    for k in range(1, n + 1):
        fact *= k
    for rank, r in enumerate(res):
        assert r["sum"] == [n * (n + 1) / 2] * 16
        assert r["max"] == [i * n for i in range(10)]
        assert r["min"] == list(range(10))
        assert r["a"] == [i * (rank + 1) for i in range(10)]  # out= left the input alone
        assert r["prod"] == [float(fact)] * 4
        assert r["avg"] == pytest.approx([(n + 1) / 2] * 4, rel=1e-6)
        assert r["bf16"] == [n * (n + 1) / 2] * 4
        assert r["gather"] == [i + 100 * q for q in range(n) for i in range(5)]
        assert r["bcast"] == [i + 1000.0 * (n - 1) for i in range(7)]
        assert r["group"] == [[n * (n + 1) / 2] * 3, [float(n)] * 3]


def test_barrier_connect_peers_and_wait(pool, world_size):
    res = pool.run(_job_barrier_connect_wait, timeout=JOB_TIMEOUT)
    for rank, r in enumerate(res):
        assert r["current_done"] and r["side_done"]
        if rank != 0:
            assert r["barrier_s"] > 0.7, f"rank {rank} left barrier() before rank 0 entered it"


def test_validation_raises_before_nccl_and_groups_issue_nothing(pool, world_size):
    res = pool.run(_job_validation, timeout=JOB_TIMEOUT)
    assert all(k >= 2 for k in res)


def test_abort_and_wait_timeout(pool, world_size):
    res = pool.run(_job_abort_and_wait_timeout, timeout=JOB_TIMEOUT)
    for r in res:
        assert r["wait_msg"] == (
            "wait failed: ncclTimeout (8): operation timed out; stream work not done after 0.3 s; "
            "the communicator was aborted"
        )
        # wait() gave up after 0.3 s and aborted; ncclCommAbort itself then waits for the work
        # already queued on the device (the ~3 s sleep), so the call returns after it, bounded.
        assert 0.3 <= r["wait_s"] < 0.3 + 3.5 + 5, r
        assert "stream work not done after 0.3 s; the communicator was aborted" in r["wait_msg"], r
        assert r["refused"] == 12


def test_close_and_context_manager(pool, world_size):
    assert pool.run(_job_close, timeout=JOB_TIMEOUT) == [7] * world_size


def test_nonblocking_communicator(pool, world_size):
    res = pool.run(_job_nonblocking, timeout=JOB_TIMEOUT)
    assert (
        res
        == [{"blocking": False, "closed": False, "async_error": None, "closed_after": True}]
        * world_size
    )


@pytest.mark.gpu(gpus=1)
def test_nonblocking_init_times_out_when_a_peer_never_joins():
    (r,) = run_ranks(_job_init_timeout, 1, timeout=60)
    assert r["msg"] == (
        "ncclCommInitRankConfig failed: ncclTimeout (8): operation timed out; "
        "the communicator was aborted"
    )
    assert (r["code"], r["function"], r["is_timeout_error"]) == (8, "ncclCommInitRankConfig", True)
    assert 3.0 <= r["elapsed"] <= 8.0, r["elapsed"]
    assert r["closed"] is True
    assert r["repr"] == "Communicator(rank=0, world_size=2, device=0, state=aborted)"
