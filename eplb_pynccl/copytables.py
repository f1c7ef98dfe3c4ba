"""Copy tables: every local op of a schedule as a table of independent byte copies (pure numpy).

A :class:`~eplb_pynccl.schedule.Copies` op or a :class:`~eplb_pynccl.schedule.Kernels` op
(gathers into staging, scatters out of it) is, on the device, a set of independent copies of
``nbytes`` bytes from ``(src_buf, src_off)`` to ``(dst_buf, dst_off)``: buffers are a rank's
weight tensors by buffer id, or :data:`~eplb_pynccl.schedule.STAGING`. :func:`op_table` turns
an op into that table; :func:`split` cuts long copies into pieces of at most ``chunk`` bytes
(so that one launch spreads a few large rows over many thread blocks); :func:`resolve` turns a
table into the ``(src, dst, nbytes)`` device-pointer triples the row-copy kernel reads.

A phase of a round (its ``pre`` or ``post`` ops) is a :class:`Phase`: the ops' tables one
after the other, each op a *wave* of independent copies that runs after the waves before it.
The row-copy kernel runs a whole phase in one launch (a grid-wide barrier between waves).

:func:`rank_phases` is what the executor uploads, once, when a rearrangement starts, and what
the virtual cluster (:func:`~eplb_pynccl.simulate.simulate_schedule`) runs wave by wave, so
what it checks is what the GPU executes (the executor only cuts the same entries into pieces
of at most 1 MiB with :func:`split_phase`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_CHUNK",
    "CopyTable",
    "Phase",
    "concat",
    "op_table",
    "phase",
    "rank_phases",
    "resolve",
    "split",
    "split_phase",
]

_I64 = np.int64
DEFAULT_CHUNK = 1 << 20  # bytes per table entry at most (a multiple of 16: alignment kept)


@dataclass(frozen=True)
class CopyTable:
    """Independent copies: entry ``k`` copies ``nbytes[k]`` bytes from ``(src_buf[k],
    src_off[k])`` to ``(dst_buf[k], dst_off[k])``. No entry reads bytes another writes."""

    src_buf: np.ndarray
    src_off: np.ndarray
    dst_buf: np.ndarray
    dst_off: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return int(self.nbytes.shape[0])

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())


def _empty() -> CopyTable:
    z = np.zeros(0, dtype=_I64)
    return CopyTable(z, z, z, z, z)


def op_table(op, index: np.ndarray, staging: int = -1) -> CopyTable:
    """The copies of one schedule op. ``index`` is the rank schedule's row index array
    (``RankSchedule.index``, which ``Kernels.idx`` points into); ``staging`` the staging
    buffer's id."""
    kind = getattr(op, "kind", None)
    if kind is None:  # Copies
        return CopyTable(
            np.asarray(op.src_buf, dtype=_I64),
            np.asarray(op.src_off, dtype=_I64),
            np.asarray(op.dst_buf, dtype=_I64),
            np.asarray(op.dst_off, dtype=_I64),
            np.asarray(op.nbytes, dtype=_I64),
        )
    if kind not in ("gather", "scatter"):
        raise ValueError(f"unknown op kind {kind!r}")
    count = np.asarray(op.count, dtype=_I64)
    total = int(count.sum())
    if total == 0:
        return _empty()
    idx = np.asarray(op.idx, dtype=_I64)
    if count.min() < 0 or idx.min() < 0 or int((idx + count).max()) > len(index):
        raise ValueError(f"{kind} op: index ranges outside the rank's index of {len(index)} rows")
    k = np.repeat(np.arange(count.size, dtype=_I64), count)  # kernel of each row
    first = np.cumsum(count) - count
    j = np.arange(total, dtype=_I64) - first[k]  # row number inside its kernel
    rb = np.asarray(op.row_bytes, dtype=_I64)[k]
    rows = np.asarray(index, dtype=_I64)[idx[k] + j]
    wbuf = np.asarray(op.buf, dtype=_I64)[k]
    woff = rows * rb
    sbuf = np.full(total, staging, dtype=_I64)
    soff = np.asarray(op.stage, dtype=_I64)[k] + j * rb
    if kind == "gather":
        return CopyTable(wbuf, woff, sbuf, soff, rb)
    return CopyTable(sbuf, soff, wbuf, woff, rb)


def split(t: CopyTable, chunk: int = DEFAULT_CHUNK) -> CopyTable:
    """``t`` with every copy longer than ``chunk`` bytes cut into pieces of ``chunk`` bytes
    (the last one shorter), in order; zero-byte copies dropped. ``chunk`` must be a positive
    multiple of 16, so every piece keeps its copy's alignment."""
    if chunk <= 0 or chunk % 16:
        raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}")
    keep = t.nbytes > 0
    n = t.nbytes[keep]
    pieces = (n + chunk - 1) // chunk
    if n.size == len(t) and int(pieces.sum()) == n.size:
        return t
    e = np.repeat(np.flatnonzero(keep), pieces)  # source entry of each piece
    first = np.cumsum(pieces) - pieces
    p = np.arange(int(pieces.sum()), dtype=_I64) - np.repeat(first, pieces)
    at = p * chunk
    return CopyTable(
        t.src_buf[e],
        t.src_off[e] + at,
        t.dst_buf[e],
        t.dst_off[e] + at,
        np.minimum(t.nbytes[e] - at, chunk),
    )


def concat(tables: list) -> CopyTable:
    if not tables:
        return _empty()
    return CopyTable(
        *(np.concatenate([getattr(t, f) for t in tables]) for f in CopyTable.__dataclass_fields__)
    )


def resolve(t: CopyTable, bases: np.ndarray, staging_base: int) -> np.ndarray:
    """``[len(t), 3]`` uint64 ``(src, dst, nbytes)`` with buffer ``b`` at ``bases[b]`` and
    staging at ``staging_base``: what the row-copy kernel reads."""
    b = np.append(np.asarray(bases, dtype=np.uint64), np.uint64(staging_base))
    out = np.empty((len(t), 3), dtype=np.uint64)
    out[:, 0] = b[t.src_buf] + t.src_off.astype(np.uint64)
    out[:, 1] = b[t.dst_buf] + t.dst_off.astype(np.uint64)
    out[:, 2] = t.nbytes.astype(np.uint64)
    return out


@dataclass(frozen=True)
class Phase:
    """Waves of independent copies run in order: wave ``w`` is entries ``[starts[w],
    starts[w + 1])`` of ``table``, from the op named ``what[w]``; ``reads_new[w]``: the wave
    reads rows written earlier in the round (the duplicates of new rows)."""

    table: CopyTable
    starts: np.ndarray
    what: tuple
    reads_new: tuple

    @property
    def waves(self) -> int:
        return len(self.what)

    def wave(self, w: int) -> CopyTable:
        a, b = int(self.starts[w]), int(self.starts[w + 1])
        t = self.table
        return CopyTable(*(getattr(t, f)[a:b] for f in CopyTable.__dataclass_fields__))


def _op_name(op) -> str:
    kind = getattr(op, "kind", None)
    return "copies" if kind is None else f"{kind} ({op.what})"


def phase(ops: list, index: np.ndarray, staging: int = -1) -> Phase:
    """The ops of one phase as a :class:`Phase`, one wave per op that copies anything."""
    tabs, what, new = [], [], []
    for op in ops:
        t = op_table(op, index, staging)
        if len(t):
            tabs.append(t)
            what.append(_op_name(op))
            new.append(bool(getattr(op, "reads_new", False)))
    starts = np.cumsum([0] + [len(t) for t in tabs]).astype(_I64)
    return Phase(concat(tabs), starts, tuple(what), tuple(new))


def rank_phases(rs, staging: int = -1) -> list:
    """Every round of a rank schedule as ``(pre, post)`` :class:`Phase` pairs."""
    return [
        (phase(ro.pre, rs.index, staging), phase(ro.post, rs.index, staging)) for ro in rs.rounds
    ]


def split_phase(ph: Phase, chunk: int = DEFAULT_CHUNK) -> Phase:
    """``ph`` with its entries cut by :func:`split` (waves keep their entries, in order)."""
    t = split(ph.table, chunk)  # checks chunk
    pieces = np.where(ph.table.nbytes > 0, (ph.table.nbytes + chunk - 1) // chunk, 0)
    ends = np.concatenate([[0], np.cumsum(pieces)]).astype(_I64)
    return Phase(t, ends[ph.starts], ph.what, ph.reads_new)
