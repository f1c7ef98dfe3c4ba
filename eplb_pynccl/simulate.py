"""Simulation, beside the pure pillar it checks: a plan applied to a model of the ranks, and
every rank's schedule executed on numpy arrays (a virtual cluster).

* :func:`simulate_plan` applies a :class:`~eplb_pynccl.planner.RearrangementPlan` to the
  expert ids per slot (the planner's hazard model) and returns the resulting map;
* :func:`simulate_schedule` runs every rank's rounds of a
  :class:`~eplb_pynccl.schedule.Schedule` in one process, on scaled-down rows tagged with
  the bytes they hold, and raises :class:`~eplb_pynccl.schedule.ScheduleError` on the first
  violation (hang, corruption, overrun);
* :func:`simulate_rearrangement` is the one entry point from maps to checked figures.

Nothing here runs in a rearrangement: the tests and the bench use it to check the planner
and the schedule builder.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_bool, check_count, check_row_bytes, expert_map
from .copytables import Phase, rank_phases
from .planner import RearrangementPlan, plan_rearrangement
from .schedule import (
    STAGING,
    Layout,
    RankSchedule,
    Schedule,
    ScheduleError,
    build_schedule,
)

__all__ = ["simulate_plan", "simulate_schedule", "simulate_rearrangement"]

_I64 = np.int64


# ---- a plan on a model of the ranks ---------------------------------------------------------


def simulate_plan(plan: RearrangementPlan, old_map, new_map) -> np.ndarray:
    """Apply ``plan`` to a model of the ranks and return the resulting map.

    The model's content is the expert id held per slot, starting from ``old_map`` (``-1``
    = unknown/garbage). Per layer, every send and every old-content local copy reads the
    *old* state; ``src_is_new`` copies read the state after those have landed. Slots the
    plan does not write keep their old content (so slots where ``new_map`` is ``-1`` may
    hold anything). ``new_map`` is only used to check shapes.

    Raises ValueError when the plan is ill-formed in a way the hazard model cannot give a
    meaning to: a slot written twice in one layer, or a ``src_is_new`` copy whose source
    row is not written by a receive or old-content copy of the same layer.
    """
    old = expert_map(old_map, "old_map")
    new = expert_map(new_map, "new_map")
    shape = (plan.num_layers, plan.num_physical)
    if old.shape != shape or new.shape != shape:
        raise ValueError(
            f"maps must have the plan's shape {shape}, got {old.shape} and {new.shape}"
        )
    N, P = plan.num_physical, plan.slots_per_rank
    oldf = old.ravel()
    out = oldf.copy()

    t_dst = plan.t_layer * N + plan.t_dst_rank * P + plan.t_dst_row
    t_src = plan.t_layer * N + plan.t_src_rank * P + plan.t_src_row
    base = plan.c_layer * N + plan.c_rank * P
    c_dst = base + plan.c_dst_row
    c_src = base + plan.c_src_row
    nw = plan.c_src_is_new

    written = np.concatenate([t_dst, c_dst])
    if np.unique(written).size != written.size:
        raise ValueError("plan writes some slot more than once in a layer")
    first_wave = np.concatenate([t_dst, c_dst[~nw]])
    if not np.isin(c_src[nw], first_wave).all():
        raise ValueError("a src_is_new copy reads a row that no receive/old copy writes")

    out[t_dst] = oldf[t_src]
    out[c_dst[~nw]] = oldf[c_src[~nw]]
    out[c_dst[nw]] = out[c_src[nw]]
    return out.reshape(shape)


# ---- the virtual cluster --------------------------------------------------------------------


def _tag(layer: int, expert: int, i: int) -> int:
    """The name of the bytes of (layer, expert, tensor i); -1 for an empty slot's junk."""
    return (layer * 1_000_003 + expert) * 64 + i if expert >= 0 else -1


def _untag(t: int) -> str:
    if t < 0:
        return "an empty slot's junk"
    le, i = divmod(t, 64)
    return f"layer {le // 1_000_003} expert {le % 1_000_003} tensor {i}"


def _cell_bytes(tag: int, cell: int) -> np.ndarray:
    return np.random.default_rng([tag & 0x7FFFFFFF, 7]).integers(0, 256, cell, dtype=np.uint8)


class _Rank:
    """One rank's memory in the virtual cluster, in cells of one row of one tensor.

    Weight cells ``(buf, row)`` hold a tag (whose bytes they hold) and ``cell`` scaled-down
    bytes; ``over`` marks rows written during this rearrangement. Staging cells are keyed by
    their byte offset (full size) with their row size; a write clobbers every cell it
    overlaps, so a later read of a clobbered cell fails."""

    def __init__(self, sched: Schedule, rs: RankSchedule, old: np.ndarray, cell: int) -> None:
        layout = sched.layout
        P = layout.rows
        self.rs = rs
        self.cell = cell
        self.tags, self.data = [], []
        for layer, rb in enumerate(layout.row_bytes):
            for i in range(len(rb)):
                tags = np.asarray(
                    [_tag(layer, int(old[layer, rs.rank * P + j]), i) for j in range(P)], dtype=_I64
                )
                self.tags.append(tags)
                self.data.append(
                    np.stack([_cell_bytes(int(t), cell) for t in tags])
                    if P
                    else np.zeros((0, cell), dtype=np.uint8)
                )
        self.over = [np.zeros(P, dtype=bool) for _ in self.tags]
        self.stage: dict = {}  # offset -> (row bytes, tag, bytes)

    # staging
    def stage_write(self, off: int, rb: int, tag: int, data) -> None:
        end = off + rb
        for o in [o for o, v in self.stage.items() if o < end and o + v[0] > off]:
            del self.stage[o]
        self.stage[off] = (rb, tag, data)

    def stage_read(self, off: int, rb: int, what: str):
        v = self.stage.get(off)
        if v is None or v[0] != rb:
            raise ScheduleError(
                f"{what}: reads staging at byte {off}, which holds no row of {rb} B (never written, or overwritten)"
            )
        return v[1], v[2]


def _rows_of(
    sched: Schedule, rs: RankSchedule, buf: int, off: int, nbytes: int, rb: int, what: str
):
    """A byte range as cells: ('w', buf, rows) or ('s', offsets, rb); checks it is whole rows
    of ``rb`` bytes inside the buffer (staging: inside the rank's staging)."""
    if rb <= 0:
        raise ScheduleError(f"{what}: rows of {rb} B")
    if nbytes % rb:
        raise ScheduleError(f"{what}: {nbytes} B are not whole rows of {rb} B")
    k = nbytes // rb
    if buf == STAGING:
        if off < 0 or off + nbytes > rs.staging_bytes:
            raise ScheduleError(
                f"{what}: staging bytes [{off}, {off + nbytes}) outside the rank's staging of {rs.staging_bytes} B"
            )
        return ("s", [off + j * rb for j in range(k)], rb)
    rbytes = sched.layout.buf_row_bytes()
    if not 0 <= buf < rbytes.size:
        raise ScheduleError(f"{what}: no buffer {buf}")
    if int(rbytes[buf]) != rb:
        raise ScheduleError(
            f"{what}: rows of {rb} B in buffer {buf}, whose rows have {int(rbytes[buf])} B"
        )
    if off % rb:
        raise ScheduleError(f"{what}: byte {off} of buffer {buf} is not the start of a row")
    first = off // rb
    if first < 0 or first + k > sched.layout.rows:
        raise ScheduleError(f"{what}: rows [{first}, {first + k}) of buffer {buf} do not exist")
    return ("w", buf, np.arange(first, first + k, dtype=_I64))


def _keys(c) -> set:
    if c[0] == "s":
        return {("s", o) for o in c[1]}
    return {("w", c[1], int(j)) for j in c[2]}


def _read(m: _Rank, c, reads_new: bool, what: str) -> list:
    """(tag, bytes) of each cell, enforcing old/new content for live rows."""
    if c[0] == "s":
        return [m.stage_read(o, c[2], what) for o in c[1]]
    buf, rows = c[1], c[2]
    over = m.over[buf][rows]
    if reads_new and not over.all():
        raise ScheduleError(
            f"{what}: reads rows {rows[~over].tolist()} of buffer {buf} as new, but they were not written yet"
        )
    if not reads_new and over.any():
        raise ScheduleError(
            f"{what}: reads rows {rows[over].tolist()} of buffer {buf} after they were overwritten"
        )
    return [(int(m.tags[buf][j]), m.data[buf][j].copy()) for j in rows.tolist()]


def _write(m: _Rank, c, vals: list, what: str, live_ok: bool) -> None:
    if c[0] == "s":
        for o, (tag, data) in zip(c[1], vals):
            m.stage_write(o, c[2], tag, data)
        return
    buf, rows = c[1], c[2]
    if not live_ok and len(rows):
        raise ScheduleError(
            f"{what}: writes live rows {rows.tolist()} of buffer {buf} before the round's exchange "
            "completed (transactional)"
        )
    for j, (tag, data) in zip(rows.tolist(), vals):
        m.tags[buf][j] = tag
        m.data[buf][j] = data
    m.over[buf][rows] = True


def _run_wave(sched, m: _Rank, t, reads_new: bool, where: str, live_ok: bool) -> None:
    """One wave of a phase's copy table: independent copies (none reads or writes what
    another writes), each whole rows of the tensor it reads or writes."""
    rbytes = sched.layout.buf_row_bytes()
    cells = []
    for q in range(len(t)):
        what = f"{where} copy {q}"
        sb, db = int(t.src_buf[q]), int(t.dst_buf[q])
        wb = db if db != STAGING else sb
        if wb == STAGING:
            raise ScheduleError(f"{what}: a copy from staging to staging")
        if not 0 <= wb < rbytes.size:
            raise ScheduleError(f"{what}: no buffer {wb}")
        rb = int(rbytes[wb])
        cells.append(
            (
                _rows_of(sched, m.rs, sb, int(t.src_off[q]), int(t.nbytes[q]), rb, what),
                _rows_of(sched, m.rs, db, int(t.dst_off[q]), int(t.nbytes[q]), rb, what),
                what,
            )
        )
    wr: set = set()
    for src, dst, what in cells:
        d = _keys(dst)
        if d & wr or _keys(src) & wr:
            raise ScheduleError(f"{what}: depends on another copy of its wave")
        wr |= d
    for src, _, what in cells:
        if _keys(src) & wr:
            raise ScheduleError(f"{what}: reads a row another copy of its wave writes")
    for src, dst, what in cells:
        _write(
            m,
            dst,
            _read(m, src, reads_new and src[0] == "w", what),
            what,
            live_ok or dst[0] == "s",
        )


def _run_phase(sched, m: _Rank, ph: Phase, k: int, phase: str) -> None:
    """A phase as the executor runs it: the same copy table (copytables.rank_phases), wave by
    wave."""
    live_ok = phase == "post" or not sched.transactional
    for w in range(ph.waves):
        where = f"round {k} rank {m.rs.rank} {phase} wave {w} ({ph.what[w]})"
        _run_wave(sched, m, ph.wave(w), ph.reads_new[w], where, live_ok)


def _exchange(sched: Schedule, mems: list, k: int) -> None:
    """Round k's messages, all concurrent (one NCCL group per rank): every send reads the
    memory as phase A left it, no send reads bytes a receive of the round writes on its rank,
    and no two receives write the same bytes."""
    rbytes = sched.layout.buf_row_bytes()
    written, recv_cells = _receive_cells(sched, mems, k, rbytes)
    deliveries = _send_reads(sched, mems, k, rbytes, written)
    index: dict = {}
    for m in mems:
        rm = m.rs.rounds[k].recvs
        for q, peer in enumerate(rm.peer.tolist()):
            index.setdefault((m.rs.rank, peer), []).append(q)
    live_ok = not sched.transactional
    for p, r, pos, vals in deliveries:
        q = index[(p, r)][pos]
        c = recv_cells[p][q]
        _write(mems[p], c, vals, f"round {k} rank {p} receive {q} from rank {r}", live_ok)


def _message_rows(sched: Schedule, m, ops, q: int, rbytes, what: str):
    """The rows message ``q`` of ``ops`` (a round's sends or receives on ``m``'s rank) covers."""
    return _rows_of(
        sched,
        m.rs,
        int(ops.buf[q]),
        int(ops.off[q]),
        int(ops.nbytes[q]),
        int(rbytes[ops.tensor[q]]),
        what,
    )


def _receive_cells(sched: Schedule, mems: list, k: int, rbytes) -> tuple[list, list]:
    """Per rank, the bytes round k's receives write (no two the same) and each receive's rows."""
    written = []
    recv_cells = []
    for m in mems:
        r = m.rs.rank
        rm = m.rs.rounds[k].recvs
        w: set = set()
        cells = []
        for q in range(len(rm)):
            what = f"round {k} rank {r} receive {q} from rank {int(rm.peer[q])}"
            c = _message_rows(sched, m, rm, q, rbytes, what)
            key = _keys(c)
            if key & w:
                raise ScheduleError(f"{what}: writes bytes another receive of the round writes")
            w |= key
            cells.append(c)
        written.append(w)
        recv_cells.append(cells)
    return written, recv_cells


def _send_reads(sched: Schedule, mems: list, k: int, rbytes, written: list) -> list:
    """Round k's sends read (none of bytes a receive of the round writes on its rank): per
    send (destination, source, its position among the source's sends to it, the values)."""
    deliveries = []
    for m in mems:
        r = m.rs.rank
        sm = m.rs.rounds[k].sends
        # the i-th send to p is the i-th receive from r on p (linked() checked sizes)
        seen: dict = {}
        for q in range(len(sm)):
            p = int(sm.peer[q])
            what = f"round {k} rank {r} send {q} to rank {p}"
            c = _message_rows(sched, m, sm, q, rbytes, what)
            if _keys(c) & written[r]:
                raise ScheduleError(f"{what}: reads bytes a receive of the same round writes")
            pos = seen.get(p, 0)
            seen[p] = pos + 1
            deliveries.append((p, r, pos, _read(m, c, False, what)))
    return deliveries


def _check_final(sched: Schedule, mems: list, new, cell: int) -> None:
    """Every rank's rows hold exactly the experts of ``new`` (tags and bytes)."""
    layout, P = sched.layout, sched.plan.slots_per_rank
    first = layout.first_buf
    for m in mems:
        r = m.rs.rank
        for layer, rb in enumerate(layout.row_bytes):
            for i in range(len(rb)):
                buf = int(first[layer]) + i
                for j in range(P):
                    e = int(new[layer, r * P + j])
                    if e < 0:
                        continue
                    want = _tag(layer, e, i)
                    if m.tags[buf][j] != want or not np.array_equal(
                        m.data[buf][j], _cell_bytes(want, cell)
                    ):
                        raise ScheduleError(
                            f"rank {r} layer {layer} tensor {i} row {j}: holds "
                            f"{_untag(int(m.tags[buf][j]))}, new_map wants expert {e}"
                        )


def _figures(sched: Schedule, rs) -> dict:
    """One rank's figures, as :func:`simulate_schedule` returns them."""
    return {
        "rank": rs.rank,
        "rounds": len(rs.rounds),
        "messages": rs.messages,
        "bytes_sent": sum(x.bytes_sent for x in rs.rounds),
        "bytes_received": sum(x.bytes_received for x in rs.rounds),
        "experts_sent": sum(x.experts_sent for x in rs.rounds),
        "experts_received": sum(x.experts_received for x in rs.rounds),
        "local_copies": sum(x.local_copies for x in rs.rounds),
        "peak_staging_bytes": rs.staging_bytes,
        "peak_extra_bytes": rs.peak_extra_bytes,
        "staging_bound": sched.staging_bound,
    }


def simulate_schedule(sched: Schedule, old_map, new_map, *, cell: int = 4) -> list[dict]:
    """Execute every rank's schedule in one process (a virtual cluster) and check it.

    Memory is kept in cells of one tensor row, each holding ``cell`` bytes (rows are scaled
    down; sizes, offsets and the bound are checked at full size). Raises
    :class:`ScheduleError` when: a pair's send and receive sequences differ (count, sizes,
    order) or a message's two ends disagree; an op reads a row's old content after it was
    overwritten, or a duplicate reads a row not yet written; concurrent ops touch the same
    bytes (the messages of a round, the copies of one wave of a phase's copy table: the
    tables the executor uploads, from :func:`~eplb_pynccl.copytables.rank_phases`);
    staging is used beyond its size, read where nothing (or something else) was written, or
    the rank's staging and index exceed the bound; in transactional mode a live row is written
    before its round's exchange completed; a range is not whole rows of one buffer; or the
    final rows are not exactly those of ``new_map``. Returns per-rank figures.
    """
    cell = check_count(cell, "cell")
    old = np.asarray(old_map)
    new = np.asarray(new_map)
    ranks = sched.linked()
    mems = []
    for rs in ranks:
        if rs.peak_extra_bytes > sched.staging_bound:
            raise ScheduleError(
                f"rank {rs.rank}: staging {rs.staging_bytes} B + index {8 * rs.index.size} B exceed "
                f"the bound of {sched.staging_bound} B"
            )
        mems.append(_Rank(sched, rs, old, cell))
    phases = []
    for rs in ranks:
        try:
            phases.append(rank_phases(rs, STAGING))
        except ValueError as err:
            raise ScheduleError(f"rank {rs.rank}: {err}") from None
    for k in range(len(sched.rounds)):
        for m, ph in zip(mems, phases):
            _run_phase(sched, m, ph[k][0], k, "pre")
        _exchange(sched, mems, k)
        for m, ph in zip(mems, phases):
            _run_phase(sched, m, ph[k][1], k, "post")
    _check_final(sched, mems, new, cell)
    return [_figures(sched, rs) for rs in ranks]


# ---- one entry point -----------------------------------------------------------------------

_SHUFFLER_OPTS = {
    "staging_bytes",
    "pack_threshold",
    "transactional",
    "max_messages_per_round",
    "ranks_per_node",
    "one_sided",
}


def simulate_rearrangement(
    old_map, new_map, ep_size: int, row_bytes, *, cell: int = 4, **opts
) -> list[dict]:
    """Plan, schedule and run a rearrangement on a virtual cluster of ``ep_size`` ranks.

    ``row_bytes[layer]`` lists the byte size of one row of each tensor of that layer (the
    same on every rank); ``opts`` are :class:`~eplb_pynccl.ExpertShuffler` options
    (``staging_bytes``, ``pack_threshold``, ``transactional``, ``max_messages_per_round``,
    ``ranks_per_node``) and ``one_sided`` (the copy-engine transport's mode). Raises
    :class:`ScheduleError` on any violation (see :func:`simulate_schedule`); returns per-rank figures
    (rounds, messages, bytes, local copies, peak staging).
    """
    bad = set(opts) - _SHUFFLER_OPTS
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; known: {sorted(_SHUFFLER_OPTS)}")
    row_bytes = check_row_bytes(row_bytes)
    cell = check_count(cell, "cell")
    if opts.get("staging_bytes") is not None:  # None: one layer (the shuffler's default)
        opts["staging_bytes"] = check_count(opts["staging_bytes"], "staging_bytes", minimum=0)
    for key, minimum in (("pack_threshold", 0), ("max_messages_per_round", 1)):
        if key in opts:
            opts[key] = check_count(opts[key], key, minimum=minimum)
    for key in ("transactional", "one_sided"):
        if key in opts:
            opts[key] = check_bool(opts[key], key)
    rpn = opts.pop("ranks_per_node", None)
    plan = plan_rearrangement(old_map, new_map, ep_size, ranks_per_node=rpn)
    if len(row_bytes) != plan.num_layers:
        raise ValueError(
            f"row_bytes has {len(row_bytes)} layers but old_map/new_map have {plan.num_layers}"
        )
    layout = Layout.of(row_bytes, plan.slots_per_rank)
    sched = build_schedule(plan, layout, **opts)
    return simulate_schedule(sched, old_map, new_map, cell=cell)
