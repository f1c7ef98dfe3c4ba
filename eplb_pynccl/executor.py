"""Execution: walking one rank's schedule on its buffers (CUDA streams or CPU tensors).

Everything a round needs is built once, when the rearrangement starts (``Executor(...)``):
the staging buffer, every round's messages prepared by the transport and, on CUDA, one device
table of every local copy of the whole rearrangement (:mod:`eplb_pynccl.copytables`: the
gathers into staging, the scatters out of it and the row copies, cut into pieces of at most
1 MiB). The table is copied to the device on the exchange stream at set-up. ``launch_pre(k)`` runs
round k's phase A and ``launch_messages(k)`` hands its messages to the transport;
``apply(k, stream)`` runs its phase C.

A phase's ops run one after the other, each a wave of independent copies
(:func:`eplb_pynccl.copytables.rank_phases`, the table the virtual cluster checks). On CUDA
(``copy_method``):

* ``"kernel"`` (default): the whole phase is one launch of the row-copy kernel
  (:mod:`eplb_pynccl._nccl.rowcopy`) over its slice of the table, waves separated by a
  grid-wide barrier, with at most ``copy_ctas`` thread blocks: one host call per phase,
  whatever its number of rows, tensors, layers and waves;
* ``"copy_engine"``: one ``cuMemcpyBatchAsync`` per wave with the hint that prefers copy
  engines: no SM touched, but the driver costs ~4.5 us of host time per copy.

On the CPU (gloo), copies are tensor copies of byte views and gathers/scatters index kernels
over word views.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from . import copytables as _tables
from ._checks import device_index
from ._nccl import cuda as _cuda
from ._nccl import rowcopy as _rowcopy
from .schedule import STAGING, Copies, Kernels, RankSchedule, Schedule

if TYPE_CHECKING:
    import torch

__all__ = ["COPY_METHODS", "Executor"]

COPY_METHODS = ("kernel", "copy_engine")


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

    staging: torch.Tensor | None
    table: torch.Tensor | None
    index: torch.Tensor | None
    _table_host: torch.Tensor | None
    _side: tuple[int, int, int] | None

    def __init__(
        self,
        torch,
        sched: Schedule,
        rs: RankSchedule,
        bufs: Buffers,
        transport,
        device,
        stream,
        host_int64,
        *,
        copy_method: str = "kernel",
        copy_ctas: int = 16,
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
        sbase = self.staging.data_ptr() if self.staging is not None else 0
        self.table = None  # CUDA: the device copy table (int64 words), see copytables
        self.index = None  # CPU: the row indices of the gather/scatter kernels
        self.host_calls = []  # per round: (phase A calls, phase C calls)
        self._table_host = None
        if cuda:
            phases = self._cuda_phases(device, stream, sbase, host_int64, copy_method, copy_ctas)
        else:
            self.index = host_int64(rs.index) if rs.index.size else None
            phases = [
                tuple(
                    [x for x in map(self._cpu_op, ops) if x is not None]
                    for ops in (ro.pre, ro.post)
                )
                for ro in rs.rounds
            ]
        raw = bool(getattr(transport, "accepts_raw", False)) and cuda
        self._bases = np.append(bufs.ptrs, sbase)  # index -1 = STAGING
        self.rounds = []
        for ro, (pre, post) in zip(rs.rounds, phases):
            sends = self._messages(ro.sends, raw)
            recvs = self._messages(ro.recvs, raw)
            tround = transport.prepare_round(sends, recvs, remote=(ro.sends, ro.recvs))
            self.rounds.append((pre, tround, post))
            self.host_calls.append((len(pre), len(post)))
        if self._table_host is not None:  # the table goes up now, not in a round's launch
            assert self.table is not None  # made together
            with torch.cuda.stream(stream):
                self.table.copy_(self._table_host, non_blocking=True)

    # ---- building ---------------------------------------------------------------------
    def _cuda_phases(self, device, stream, sbase, host_int64, method, ctas) -> list:
        """Every round's two phases as prepared host calls, ``[(pre, post)]``: with the
        kernel one ``("kernel", Launch)`` per phase (all its waves), with copy engines one
        ``("batch", arrays)`` per wave. ``method`` is one of COPY_METHODS (ExpertShuffler
        checked it)."""
        torch, rs = self.torch, self.rs
        for ro in rs.rounds:
            for op in (*ro.pre, *ro.post):
                if isinstance(op, Copies) and op.ordered:
                    raise ValueError("ordered Copies ops are not supported on CUDA (none is built)")
        phases = _tables.rank_phases(rs, STAGING)
        if method != "kernel":
            return [tuple(self._batches(ph, sbase) for ph in pair) for pair in phases]
        flat = [_tables.split_phase(ph) for pair in phases for ph in pair]
        entries = _tables.resolve(
            _tables.concat([ph.table for ph in flat]), self.bufs.ptrs, sbase
        ).view(np.int64)
        words = [entries.reshape(-1)]
        at = entries.size  # words: the entries, then each multi-wave phase's starts and sync
        waves_at = []
        for ph in flat:
            waves_at.append(at if ph.waves > 1 else -1)
            if ph.waves > 1:
                words.append(ph.starts.astype(np.int64))
                words.append(np.zeros(_rowcopy.SYNC_WORDS, dtype=np.int64))
                at += ph.waves + 1 + _rowcopy.SYNC_WORDS
        host = np.concatenate(words)
        calls: list = []
        if len(entries):
            k = _rowcopy.kernel(device_index(device))
            with torch.cuda.stream(stream):
                self.table = torch.empty(host.size, dtype=torch.int64, device=device)
            self._table_host = host_int64(host)
            base = self.table.data_ptr()
        first = 0
        for ph, wat in zip(flat, waves_at):
            n = len(ph.table)
            if not n:
                calls.append([])
                continue
            opts = {}
            if wat >= 0:
                starts = base + 8 * wat
                opts = dict(
                    starts_ptr=starts,
                    waves=ph.waves,
                    sync_ptr=starts + 8 * (ph.waves + 1),
                    max_wave=int(np.diff(ph.starts).max()),
                )
            launch = k.prepare(
                base + 8 * _rowcopy.ENTRY_WORDS * first, n, ctas, int(ph.table.nbytes.max()), **opts
            )
            calls.append([("kernel", launch)])
            first += n
        return [(calls[2 * r], calls[2 * r + 1]) for r in range(len(phases))]

    def _batches(self, ph, sbase) -> list:
        """One phase on copy engines: a cuMemcpyBatchAsync per wave."""
        host = _tables.resolve(ph.table, self.bufs.ptrs, sbase)
        out = []
        for w in range(ph.waves):
            rows = host[int(ph.starts[w]) : int(ph.starts[w + 1])]
            if len(rows):
                dst, src, n = (rows[:, c].tolist() for c in (1, 0, 2))
                out.append(("batch", _cuda.copy_arrays(list(zip(dst, src, n)))))
        return out

    def _ptrs(self, buf: np.ndarray, off: np.ndarray) -> list:
        return (self._bases[buf] + off).tolist()

    def _view(self, buf: int, off: int, n: int):
        src = self.staging if buf == STAGING else self.bufs.flat[buf]
        assert src is not None  # STAGING is named only where rs.staging_bytes > 0
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
        assert self.staging is not None  # rows staged: rs.staging_bytes > 0
        return self.staging[offset : offset + n].view(w.dtype).view(rows, w.shape[1])

    def _cpu_op(self, op):
        if isinstance(op, Copies):
            if not len(op):
                return None
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
                assert self.index is not None  # kernel rows: rs.index is not empty
                items.append((w, self.index[a : a + cnt], self._block(stg, cnt, w)))
            return (op.kind, items) if items else None
        raise TypeError(f"unknown op {type(op).__name__}")

    # ---- running ----------------------------------------------------------------------
    def _run(self, ops, stream) -> None:
        torch = self.torch
        for kind, items in ops:
            if kind == "kernel":
                items.launch(stream.cuda_stream)
            elif kind == "batch":
                self._batch(items, stream.cuda_stream)
            elif kind == "copy":
                for dst, src in items:
                    dst.copy_(src)
            elif kind == "gather":
                for w, ix, blk in items:
                    torch.index_select(w, 0, ix, out=blk)
            else:  # scatter
                for w, ix, blk in items:
                    w.index_copy_(0, ix, blk)

    def _batch(self, arrays: tuple[Any, Any, Any], h: int) -> None:
        """One cuMemcpyBatchAsync on stream ``h`` (copy engines preferred); on the legacy
        default stream (which the call refuses) through a side stream ordered by two events."""
        drv = _cuda.driver()
        assert drv is not None  # a CUDA executor: the driver loaded
        if h:
            drv.memcpy_batch(*arrays, h, prefer_ce=True)
            return
        if self._side is None:
            self._side = (drv.stream_create(), drv.event_create(), drv.event_create())
        side, before, after = self._side
        drv.event_record(before, 0)
        drv.stream_wait_event(side, before)
        drv.memcpy_batch(*arrays, side, prefer_ce=True)
        drv.event_record(after, side)
        drv.stream_wait_event(0, after)

    def launch_pre(self, k: int):
        """Round k's phase A on the exchange stream. Returns the transport's round."""
        pre, tround, _ = self.rounds[k]
        self._run(pre, self.stream)
        return tround

    def launch_messages(self, k: int, deadline: float) -> None:
        """Round k's messages, handed to the transport (poll the round's ``done()``)."""
        self.rounds[k][1].launch(self.stream, deadline)

    @property
    def uses_pinned(self) -> bool:
        """Whether the set-up copied a pinned host table on the exchange stream (the host
        buffer may be reused once the stream has passed that copy)."""
        return self._table_host is not None

    @property
    def table_bytes(self) -> int:
        return 0 if self.table is None else 8 * self.table.numel()

    @property
    def extra_bytes(self) -> int:
        """Extra device memory this rearrangement holds: staging plus the copy table."""
        return (0 if self.staging is None else self.staging.numel()) + self.table_bytes

    def apply(self, k: int, stream) -> None:
        """Round k's phase C on ``stream`` (the caller orders it after the round's end)."""
        self._run(self.rounds[k][2], stream)

    def release(self) -> None:
        self.staging = None
        self.table = None
        self.index = None
        for _, tround, _ in self.rounds:
            tround.release()
        self.rounds = []
        if self._side is not None:  # work queued on it completes first; the handles go now
            drv = _cuda.driver()
            assert drv is not None  # it made the side stream
            side, before, after = self._side
            self._side = None
            drv.stream_destroy(side)
            drv.event_destroy(before)
            drv.event_destroy(after)
