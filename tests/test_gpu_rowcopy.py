"""The row-copy kernel and the shuffler's kernel path on a GPU: exact bytes.

* the kernel on random tables: every size from 0 to a few MiB, every source/destination
  alignment (so every word width and the byte head/tail), every CTA bound, bytes outside the
  copies untouched;
* ``ExpertShuffler`` at EP1 over a 1-rank communicator (local moves only: stash, waves,
  duplicates) with fp8, bf16, fp32 and odd-sized int8 rows, tensors at unaligned addresses,
  -1 slots, duplicates, several layers per round, sync and async, for both copy methods; the
  host calls per round do not grow with the rows.
Multi-process IPC rounds through the kernel are in tests/test_gpu_ipc.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _torch():
    import torch

    return torch


def test_kernel_copies_random_tables_exactly():
    torch = _torch()
    from eplb_pynccl import copytables as ct
    from eplb_pynccl._nccl import rowcopy

    dev = torch.device("cuda", torch.cuda.current_device())
    k = rowcopy.kernel(dev.index)
    rng = np.random.default_rng(0)
    sizes = [0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 255, 4095, 4096, 4099, 65537, (1 << 20) + 5]
    sizes += rng.integers(1, 3 << 20, 8).tolist()
    n = len(sizes)
    src_off = np.cumsum([0] + [s + 64 for s in sizes[:-1]]) + rng.integers(0, 32, n)
    dst_off = np.cumsum([0] + [s + 64 for s in sizes[:-1]]) + rng.integers(0, 32, n)
    total = int(max(src_off[-1], dst_off[-1]) + sizes[-1] + 64)
    src = torch.randint(0, 256, (total,), dtype=torch.uint8, device=dev)
    s = torch.cuda.Stream(dev)
    for chunk in (16, 4096, 1 << 20):
        t = ct.split(
            ct.CopyTable(
                np.zeros(n, np.int64),
                src_off.astype(np.int64),
                np.ones(n, np.int64),
                dst_off.astype(np.int64),
                np.asarray(sizes, np.int64),
            ),
            chunk,
        )
        for ctas in (1, 3, 16, 132):
            dst = torch.full((total,), 0xA5, dtype=torch.uint8, device=dev)
            want = dst.clone()
            for so, do, sz in zip(src_off.tolist(), dst_off.tolist(), sizes):
                want[do : do + sz] = src[so : so + sz]
            host = ct.resolve(t, np.array([src.data_ptr(), dst.data_ptr()], np.int64), 0)
            table = torch.from_numpy(host.view(np.int64).reshape(-1)).to(dev)
            torch.cuda.synchronize()
            k.prepare(table.data_ptr(), len(t), ctas, int(t.nbytes.max())).launch(s.cuda_stream)
            s.synchronize()
            bad = (dst != want).nonzero()
            assert bad.numel() == 0, f"chunk {chunk} ctas {ctas}: first wrong byte {bad[:4]}"


def _weights(torch, dev, specs, amap, P, offset):
    """Tensors whose storage starts ``offset`` bytes into an allocation (unaligned rows)."""
    from tests.shuffle_util import make_weights

    ws = make_weights(torch, specs, amap, 0, 1, dev)
    if not offset:
        return ws
    out = []
    for lw in ws:
        row = []
        for t in lw:
            raw = torch.empty(t.numel() * t.element_size() + offset, dtype=torch.uint8, device=dev)
            v = raw[offset:].view(t.dtype).view(t.shape)
            v.copy_(t)
            row.append(v)
        out.append(row)
    return out


CASES = {
    # (specs per layer, byte offset of every tensor)
    "fp8-fp32": ([[((16, 24), "float8_e4m3fn"), ((2, 3), "float32")]] * 3, 0),
    "bf16": ([[((8, 40), "bfloat16"), ((40, 8), "bfloat16")]] * 2, 0),
    "int8-odd-unaligned": ([[((7, 13), "int8"), ((1, 3), "int8")]] * 3, 1),
    "fp8-large-rows": ([[((512, 2048), "float8_e4m3fn"), ((5,), "float32")]] * 2, 0),
}


@pytest.mark.parametrize("method", ["kernel", "copy_engine"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", list(CASES))
def test_shuffler_local_moves_exact(case, mode, method):
    torch = _torch()
    import eplb_pynccl as ep
    from tests.shuffle_util import check_weights, random_maps, restrict_to_held

    specs_raw, offset = CASES[case]
    specs = [[(shape, getattr(torch, dt)) for shape, dt in layer] for layer in specs_raw]
    dev = torch.device("cuda", torch.cuda.current_device())
    rng = np.random.default_rng(zlib.crc32(f"{case}{mode}{method}".encode()))
    P = 9
    cur, _ = random_maps(rng, len(specs), 7, 1, P, empty_frac=0.1)
    w = _weights(torch, dev, specs, cur, P, offset)
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=dev.index)
    # a small staging bound: several rounds, some with several layers
    sh = ep.ExpertShuffler(ep.NcclTransport(comm), w, copy_method=method)
    assert sh.copy_method == method
    try:
        for it in range(4):
            _, nxt = random_maps(rng, len(specs), 7, 1, P, empty_frac=0.1)
            restrict_to_held(cur, nxt)
            side = torch.cuda.Stream(dev)
            if mode == "sync":
                st = sh.rearrange(cur, nxt, stream=side)
            else:
                h = sh.rearrange_async(cur, nxt, stream=side)
                while not h.done:
                    h.step()
                h.wait()
                st = h.stats
            torch.cuda.synchronize()
            assert check_weights(torch, w, nxt, 0, 1) == [], f"rearrangement {it}"
            assert st.copy_method == method
            assert len(st.round_host_calls) == st.rounds
            assert len(st.round_apply_us) == st.rounds
            cur = nxt
    finally:
        comm.close()


def test_host_calls_do_not_grow_with_tensors_or_layers():
    """The same moves with 1 tensor and 1 layer, or 4 tensors and 3 layers in one round: the
    same host calls per round (one launch per op, whatever it holds)."""
    torch = _torch()
    import eplb_pynccl as ep

    dev = torch.device("cuda", torch.cuda.current_device())
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=dev.index)
    calls = []
    P = 16
    try:
        for tensors, layers in ((1, 1), (4, 3)):
            w = [
                [torch.zeros((P, 64), dtype=torch.float32, device=dev) for _ in range(tensors)]
                for _ in range(layers)
            ]
            sh = ep.ExpertShuffler(ep.NcclTransport(comm), w, pack_threshold=0)
            old = np.tile(np.arange(P, dtype=np.int64), (layers, 1))
            new = old.copy()
            new[:, :4] = old[:, [1, 0, 3, 2]]  # two swaps per layer
            st = sh.rearrange(old, new)
            assert st.rounds == 1
            calls.append(st.round_host_calls)
    finally:
        comm.close()
    assert calls[0] == calls[1], calls


@pytest.mark.parametrize("ctas", [1, 3, 16, 1000])
def test_one_launch_runs_dependent_waves_in_order(ctas):
    """Wave w copies region w into region w + 1 in many small pieces: region W ends equal to
    region 0 only if every wave saw all of the one before (the grid-wide barrier, loads that
    bypass L1). Launched again and again: the counters are zero after every launch."""
    torch = _torch()
    from eplb_pynccl import copytables as ct
    from eplb_pynccl._nccl import rowcopy

    dev = torch.device("cuda", torch.cuda.current_device())
    k = rowcopy.kernel(dev.index)
    waves, region = 7, (3 << 20) + 13  # odd: byte heads and tails in every piece
    buf = torch.zeros(waves + 1, region, dtype=torch.uint8, device=dev)
    tabs = [
        ct.split(
            ct.CopyTable(
                *(np.array([v], np.int64) for v in (0, w * region, 0, (w + 1) * region, region))
            ),
            4096,
        )
        for w in range(waves)
    ]
    starts = np.cumsum([0] + [len(t) for t in tabs]).astype(np.int64)
    entries = ct.resolve(ct.concat(tabs), np.array([buf.data_ptr()], np.int64), 0)
    words = np.concatenate(
        [entries.view(np.int64).reshape(-1), starts, np.zeros(rowcopy.SYNC_WORDS, np.int64)]
    )
    table = torch.from_numpy(words).to(dev)
    at = table.data_ptr() + 8 * entries.size
    launch = k.prepare(
        table.data_ptr(),
        int(starts[-1]),
        ctas,
        4096,
        starts_ptr=at,
        waves=waves,
        sync_ptr=at + 8 * (waves + 1),
        max_wave=int(np.diff(starts).max()),
    )
    assert launch.grid <= k.multiprocessors and launch.waves == waves
    s = torch.cuda.Stream(dev)
    for it in range(20):
        buf[1:].zero_()
        buf[0].random_(0, 256)
        torch.cuda.synchronize()
        launch.launch(s.cuda_stream)
        s.synchronize()
        assert torch.equal(buf[waves], buf[0]), f"launch {it}"
    sync = table[-rowcopy.SYNC_WORDS :].cpu().tolist()
    assert sync == [0, 0]


def test_host_calls_do_not_grow_with_cycle_length():
    """One cycle of 4, 16 or 64 rows: with the kernel a round is one launch per phase, and
    its waves stay within copy_waves (the rows come out exact)."""
    torch = _torch()
    import eplb_pynccl as ep

    dev = torch.device("cuda", torch.cuda.current_device())
    comm = ep.Communicator(ep.UniqueId.generate(), 0, 1, device=dev.index)
    P = 64
    calls = []
    try:
        for length in (4, 16, 64):
            w = [[torch.arange(P * 96, dtype=torch.float32, device=dev).view(P, 96)]]
            want = w[0][0].clone()
            sh = ep.ExpertShuffler(
                ep.NcclTransport(comm), w, pack_threshold=0, copy_method="kernel"
            )
            old = np.arange(P, dtype=np.int64)[None]
            new = old.copy()
            new[0, :length] = np.roll(old[0, :length], 1)
            st = sh.rearrange(old, new)
            torch.cuda.synchronize()
            assert torch.equal(w[0][0], want[new[0]]), length
            assert st.rounds == 1
            calls.append(st.round_host_calls)
    finally:
        comm.close()
    # one launch for phase A (the stash), one for phase C, the round's end event (nothing to
    # send at EP1)
    assert calls == [[3]] * 3, calls
