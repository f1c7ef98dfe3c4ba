"""Layer 5: walking one rank's schedule on its buffers (CUDA streams or CPU tensors).

Everything a round needs is built once, when the rearrangement starts (``Executor(...)``):
the staging buffer, the device index tensor, every kernel's views, every copy's pointers, and
every round's messages prepared by the transport. ``launch(k, stream)`` then runs round k's
phase A and hands its messages to the transport; ``apply(k, stream)`` runs its phase C.

On CUDA, copies are driver memcpys on the stream (independent rows under 1 MiB as one
``cuMemcpyBatchAsync``, larger ones one call per row, no tensor view) and the
gather/scatter kernels run over word views of the rows (8-byte words move several times
faster than bytes); on the CPU (gloo), copies are tensor copies of byte views.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _buffers
from ._nccl import cuda as _cuda
from .schedule import STAGING, Copies, Kernels, RankSchedule, Schedule

__all__ = ["Executor"]

BATCH_BELOW = 1 << 20  # independent row copies below this size go in one cuMemcpyBatchAsync


def word_rows(torch, b):
    """``b`` ([rows, row_bytes] uint8) as [rows, k] of the widest integer type whose size
    divides the row length and the start address."""
    n = b.shape[1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if n % size == 0 and b.data_ptr() % size == 0:
            return b.view(dtype)
    return b


class Buffers:
    """A rank's weight tensors in buffer order (``Layout.buf``), with the views executors
    use: 1-D bytes, [rows, row_bytes] bytes, [rows, k] words, and device pointers (CUDA)."""

    def __init__(self, torch, tensors: list) -> None:
        self.tensors = tensors
        self.flat = [t.view(torch.uint8).view(-1) for t in tensors]
        self.rows = [t.view(torch.uint8).view(t.shape[0], -1) for t in tensors]
        self.words = [word_rows(torch, b) for b in self.rows]
        self.is_cuda = tensors[0].is_cuda
        self.ptrs = np.asarray([t.data_ptr() for t in tensors], dtype=np.int64)


class Executor:
    """One rank's rearrangement, ready to run round by round (see the module docstring)."""

    def __init__(
        self,
        torch,
        sched: Schedule,
        rs: RankSchedule,
        bufs: Buffers,
        transport,
        device,
        stream,
        index_host,
    ) -> None:
        self.torch = torch
        self.sched, self.rs, self.bufs = sched, rs, bufs
        self.transport = transport
        self.stream = stream  # the exchange stream (CUDA) or None
        self._side = None  # (stream, event, event) for batches on the legacy default stream
        cuda = bufs.is_cuda
        self.staging = None
        if rs.staging_bytes:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                self.staging = torch.empty(rs.staging_bytes, dtype=torch.uint8, device=device)
        self.index = None
        self._index_host = index_host
        if rs.index.size:
            if cuda:
                with torch.cuda.stream(stream):
                    self.index = torch.empty(rs.index.size, dtype=torch.int64, device=device)
            else:
                self.index = index_host
        self._index_copied = not cuda or self.index is None
        raw = bool(getattr(transport, "accepts_raw", False)) and cuda
        sbase = self.staging.data_ptr() if self.staging is not None else 0
        self._bases = np.append(bufs.ptrs, sbase)  # index -1 = STAGING
        self.rounds = []
        for ro in rs.rounds:
            pre = [self._op(op) for op in ro.pre]
            post = [self._op(op) for op in ro.post]
            sends = self._messages(ro.sends, raw)
            recvs = self._messages(ro.recvs, raw)
            tround = transport.prepare_round(sends, recvs, remote=(ro.sends, ro.recvs))
            self.rounds.append((pre, tround, post))

    # ---- building ---------------------------------------------------------------------
    def _ptrs(self, buf: np.ndarray, off: np.ndarray) -> list:
        return (self._bases[buf] + off).tolist()

    def _view(self, buf: int, off: int, n: int):
        src = self.staging if buf == STAGING else self.bufs.flat[buf]
        return src[off : off + n]

    def _messages(self, m, raw: bool) -> list:
        if raw:
            return list(zip(m.peer.tolist(), zip(self._ptrs(m.buf, m.off), m.nbytes.tolist())))
        return [
            (p, self._view(b, o, n))
            for p, b, o, n in zip(
                m.peer.tolist(), m.buf.tolist(), m.off.tolist(), m.nbytes.tolist()
            )
        ]

    def _block(self, offset: int, rows: int, w):
        """A [rows, k] view of staging at ``offset`` shaped and typed like the rows ``w``."""
        n = rows * w.shape[1] * w.element_size()
        return self.staging[offset : offset + n].view(w.dtype).view(rows, w.shape[1])

    def _op(self, op):
        if isinstance(op, Copies):
            if self.bufs.is_cuda:
                copies = list(
                    zip(
                        self._ptrs(op.dst_buf, op.dst_off),
                        self._ptrs(op.src_buf, op.src_off),
                        op.nbytes.tolist(),
                    )
                )
                drv = _cuda.driver()
                if op.ordered or drv is None or not drv.has_memcpy_batch:
                    return ("memcpy", copies)
                # independent copies: the small rows as one batch (one driver call instead of
                # one per row; the driver picks the engine), large rows one memcpy each (the
                # device's copy kernels beat a copy engine inside one GPU)
                small = [c for c in copies if c[2] < BATCH_BELOW]
                big = [c for c in copies if c[2] >= BATCH_BELOW]
                return ("batch", (_cuda.copy_arrays(small) if small else None, big))
            return (
                "copy",
                [
                    (self._view(d, do, n), self._view(s, so, n))
                    for d, do, s, so, n in zip(
                        op.dst_buf.tolist(),
                        op.dst_off.tolist(),
                        op.src_buf.tolist(),
                        op.src_off.tolist(),
                        op.nbytes.tolist(),
                    )
                ],
            )
        if isinstance(op, Kernels):
            items = []
            for buf, a, cnt, stg in zip(
                op.buf.tolist(), op.idx.tolist(), op.count.tolist(), op.stage.tolist()
            ):
                w = self.bufs.words[buf]
                items.append((w, self.index[a : a + cnt], self._block(stg, cnt, w)))
            return (op.kind, items)
        raise TypeError(f"unknown op {type(op).__name__}")

    # ---- running ----------------------------------------------------------------------
    def _run(self, ops, stream) -> None:
        torch = self.torch
        for kind, items in ops:
            if kind == "memcpy":
                _buffers.copy_async(items, stream.cuda_stream)
            elif kind == "batch":
                arrays, big = items
                h = stream.cuda_stream
                if arrays is not None:
                    self._batch(arrays, h)
                if big:
                    _buffers.copy_async(big, h)
            elif kind == "copy":
                for dst, src in items:
                    dst.copy_(src)
            elif kind == "gather":
                for w, ix, blk in items:
                    torch.index_select(w, 0, ix, out=blk)
            else:  # scatter
                for w, ix, blk in items:
                    w.index_copy_(0, ix, blk)

    def _batch(self, arrays, h: int) -> None:
        """One cuMemcpyBatchAsync on stream ``h``; on the legacy default stream (which the
        call refuses) through a side stream ordered by two events."""
        drv = _cuda.driver()
        if h:
            drv.memcpy_batch(*arrays, h, prefer_ce=False)
            return
        if self._side is None:
            self._side = (drv.stream_create(), drv.event_create(), drv.event_create())
        side, before, after = self._side
        drv.event_record(before, 0)
        drv.stream_wait_event(side, before)
        drv.memcpy_batch(*arrays, side, prefer_ce=False)
        drv.event_record(after, side)
        drv.stream_wait_event(0, after)

    def launch_pre(self, k: int):
        """Round k's phase A (on the current stream: the exchange stream); the first call
        also copies the row indices to the device. Returns the transport's round."""
        pre, tround, _ = self.rounds[k]
        if not self._index_copied:
            self.index.copy_(self._index_host, non_blocking=True)
            self._index_copied = True
        self._run(pre, self.stream)
        return tround

    def launch_messages(self, k: int, deadline: float) -> None:
        """Round k's messages, handed to the transport (poll the round's ``done()``)."""
        self.rounds[k][1].launch(self.stream, deadline)

    def copied_index(self) -> bool:
        return self._index_copied

    def apply(self, k: int, stream) -> None:
        """Round k's phase C on ``stream`` (the caller orders it after the round's end)."""
        self._run(self.rounds[k][2], stream)

    def release(self) -> None:
        self.staging = None
        self.index = None
        self.rounds = []
        if self._side is not None:  # work queued on it completes first; the handles go now
            drv = _cuda.driver()
            side, before, after = self._side
            self._side = None
            drv.stream_destroy(side)
            drv.event_destroy(before)
            drv.event_destroy(after)
