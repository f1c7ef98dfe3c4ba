"""Layer 4: the schedule. Every rank's rounds of ops, built once from the plan (pure numpy).

A rearrangement moves whole layers in *rounds*, the same on every rank, sized so that each
rank's staging fits the bound. A round of one rank is three phases of plain ops:

* ``pre`` (phase A, on the exchange stream, before the messages): :class:`Copies` into rows
  nobody reads (non-transactional mode only), then :class:`Kernels` gathers: the stash (one
  saved row per cycle of local copies) and the packed sends (rows of small tensors gathered
  into one staging block per tensor).
* ``sends`` and ``recvs``: :class:`Messages`, one per tensor and run of consecutive source
  rows (or per peer and small tensor, packed). Each names its bytes on *both* ends: here
  ``(buf, off)``, on the peer ``(rbuf, roff)``; a buffer is a weight tensor of this rank
  (``layout.buf(layer, i)``) or :data:`STAGING`. Between two ranks the i-th send of one is the
  i-th receive of the other (what an NCCL group needs not to hang).
* ``post`` (phase C, on the caller's stream, once the messages have completed): the old-content
  local copies in read-before-write order, as waves of copies that may run at once (small
  tensors through a staging block), the staged receives scattered into the live rows, then
  the duplicates of rows new in this layer.

Every rank can compute every rank's schedule from the same inputs, so a one-sided transport
knows the remote addresses it reads without a metadata exchange (:meth:`Schedule.linked`).
:func:`simulate` executes all ranks' schedules on numpy arrays (a virtual cluster) and checks
them; :func:`simulate_rearrangement` is the one entry point from maps to checked figures.

Transactional mode (the default) writes no live row before its round's messages complete, so
after any failure each layer is entirely old or entirely new.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .planner import RearrangementPlan, plan_rearrangement

__all__ = [
    "ALIGN",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_PACK_THRESHOLD",
    "STAGING",
    "Copies",
    "Kernels",
    "Layout",
    "Messages",
    "RankSchedule",
    "RoundOps",
    "Schedule",
    "ScheduleError",
    "build_schedule",
    "simulate",
    "simulate_rearrangement",
]

ALIGN = 16  # staging blocks start 16-byte aligned (any dtype view, vector copies)
DEFAULT_PACK_THRESHOLD = 1 << 20  # rows below 1 MiB are packed per peer
DEFAULT_MAX_MESSAGES = 1024
STAGING = -1  # the buffer id of a rank's staging buffer
_I64 = np.int64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ScheduleError(AssertionError):
    """The virtual cluster found a schedule that would hang, corrupt or overrun (a bug)."""


# ---- layout and ops ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The weights of one rank as the schedule sees them: per layer, the byte size of one row
    of each tensor (``row_bytes[layer][i]``), the number of rows (local experts) and, for
    the gather/scatter kernels, the word size each tensor's rows are moved in (1 if unknown).
    Tensor ``i`` of ``layer`` is buffer ``buf(layer, i)``; staging is :data:`STAGING`."""

    row_bytes: tuple
    rows: int
    word_bytes: tuple | None = None

    @classmethod
    def of(cls, row_bytes, rows: int, word_bytes=None) -> Layout:
        rb = tuple(tuple(int(b) for b in layer) for layer in row_bytes)
        if not rb or any(not layer for layer in rb):
            raise ValueError("row_bytes must list at least one tensor for every layer")
        if any(b < 0 for layer in rb for b in layer):
            raise ValueError("row_bytes must be >= 0")
        wb = None
        if word_bytes is not None:
            wb = tuple(tuple(int(w) for w in layer) for layer in word_bytes)
            if [len(x) for x in wb] != [len(x) for x in rb]:
                raise ValueError("word_bytes must have the shape of row_bytes")
        return cls(rb, int(rows), wb)

    @property
    def num_layers(self) -> int:
        return len(self.row_bytes)

    @property
    def first_buf(self) -> np.ndarray:
        """Buffer id of tensor 0 of each layer (tensors are numbered layer by layer)."""
        return np.cumsum([0] + [len(x) for x in self.row_bytes[:-1]]).astype(_I64)

    def buf(self, layer: int, i: int) -> int:
        return int(self.first_buf[layer]) + i

    @property
    def num_bufs(self) -> int:
        return sum(len(x) for x in self.row_bytes)

    def buf_row_bytes(self) -> np.ndarray:
        """Row bytes of every buffer, by buffer id."""
        return np.asarray([b for layer in self.row_bytes for b in layer], dtype=_I64)

    def buf_word_bytes(self) -> np.ndarray:
        if self.word_bytes is None:
            return np.ones(self.num_bufs, dtype=_I64)
        return np.asarray([w for layer in self.word_bytes for w in layer], dtype=_I64)

    def layer_bytes(self) -> int:
        """The default staging bound: one layer of local experts (the largest), aligned."""
        return max(sum(_align(b) for b in rb) for rb in self.row_bytes) * self.rows


@dataclass(frozen=True)
class Copies:
    """Device copies of ``nbytes[k]`` bytes from ``(src_buf, src_off)`` to ``(dst_buf,
    dst_off)`` on this rank. ``ordered``: they must run in array order (a later copy
    overwrites a row an earlier one read); otherwise they are independent. ``reads_new``: the
    copies read rows written earlier in this rearrangement (duplicates of received rows);
    every other read is of old content."""

    dst_buf: np.ndarray
    dst_off: np.ndarray
    src_buf: np.ndarray
    src_off: np.ndarray
    nbytes: np.ndarray
    reads_new: bool = False
    ordered: bool = False  # False: no copy reads what another writes (any order, batchable)

    def __len__(self) -> int:
        return int(self.nbytes.shape[0])


@dataclass(frozen=True)
class Kernels:
    """Index kernels, one per entry: ``gather`` copies rows ``index[idx:idx + count]`` of
    buffer ``buf`` into staging at ``stage`` (rows back to back, ``row_bytes`` each);
    ``scatter`` copies them back from staging into those rows. Each kernel is one launch and
    its rows are moved concurrently."""

    kind: str  # "gather" | "scatter"
    buf: np.ndarray
    idx: np.ndarray
    count: np.ndarray
    stage: np.ndarray
    row_bytes: np.ndarray
    what: str = ""  # "stash", "pack", "copy", "recv": what the kernels are for

    def __len__(self) -> int:
        return int(self.buf.shape[0])


@dataclass(frozen=True)
class Messages:
    """Point-to-point messages of one rank in one round, in posting order. Each carries whole
    rows of one tensor (buffer ``tensor``). ``(buf, off)`` is where the bytes are on this
    rank, ``(rbuf, roff)`` where they are on ``peer`` (-1/-1 in a schedule that is not
    :meth:`Schedule.linked`, except for receives from weight rows)."""

    peer: np.ndarray
    tensor: np.ndarray
    buf: np.ndarray
    off: np.ndarray
    nbytes: np.ndarray
    rbuf: np.ndarray
    roff: np.ndarray
    layer: np.ndarray

    def __len__(self) -> int:
        return int(self.peer.shape[0])

    @property
    def peers(self) -> list[int]:
        return sorted(set(self.peer.tolist()))


@dataclass
class RoundOps:
    """One rank's ops for one round (see the module docstring)."""

    index: int
    layers: list
    pre: list
    sends: Messages
    recvs: Messages
    post: list
    staging_bytes: int = 0
    # for stats: (rows sent, rows received, row bytes sent, row bytes received, local copies)
    experts_sent: int = 0
    experts_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    local_copies: int = 0

    @property
    def peers(self) -> list[int]:
        return sorted(set(self.sends.peer.tolist()) | set(self.recvs.peer.tolist()))


@dataclass
class RankSchedule:
    """Every round of one rank; ``index`` holds the rows of every kernel (``Kernels.idx``
    points into it); ``staging_bytes`` is the staging buffer it needs (the largest round)."""

    rank: int
    rounds: list
    index: np.ndarray
    staging_bytes: int

    @property
    def peak_extra_bytes(self) -> int:
        """Staging plus the device index tensor: the extra device memory at the peak."""
        return self.staging_bytes + 8 * int(self.index.size)

    @property
    def messages(self) -> int:
        return sum(len(r.sends) + len(r.recvs) for r in self.rounds)


@dataclass
class Schedule:
    """The rounds of a rearrangement (the same on every rank) and, on demand, every rank's
    ops. ``staging_bound``: the bound in force (``staging_bytes``, or with the default, more
    only if this rearrangement cannot be done within one layer of local experts)."""

    plan: RearrangementPlan
    layout: Layout
    rounds: list
    round_staging: list
    packed: np.ndarray
    staging_bound: int
    transactional: bool
    pack_threshold: int
    max_messages: int
    one_sided: bool
    _ranks: dict = field(default_factory=dict, repr=False)
    _linked: bool = False

    @property
    def layers_changed(self) -> list:
        return [layer for rl in self.rounds for layer in rl]

    def rank(self, rank: int) -> RankSchedule:
        """Rank ``rank``'s ops (computed once, then cached)."""
        if not 0 <= rank < self.plan.ep_size:
            raise ValueError(f"rank must be in [0, {self.plan.ep_size}), got {rank}")
        rs = self._ranks.get(rank)
        if rs is None:
            rs = self._ranks[rank] = _rank_schedule(self, rank)
        return rs

    def linked(self) -> list:
        """Every rank's schedule with the remote end of every message filled in (the i-th
        send from r to p is matched with the i-th receive of p from r). Raises ScheduleError
        when the two sides disagree in count or size."""
        ranks = [self.rank(r) for r in range(self.plan.ep_size)]
        if not self._linked:
            _link(ranks, len(self.rounds))
            self._linked = True
        return ranks


# ---- building ------------------------------------------------------------------------------


def _split(rb, packed: bool, thr: int):
    """(tensors sent as their own messages, tensors packed per peer) of a layer."""
    if not packed:
        return list(range(len(rb))), []
    return [i for i, b in enumerate(rb) if b >= thr], [i for i, b in enumerate(rb) if b < thr]


@functools.lru_cache(maxsize=64)
def _sizes(layout: Layout, packed: bool, thr: int):
    """Per layer: aligned bytes of the tensors sent as their own messages, bytes and aligned
    bytes of the packed ones, and their counts. Fixed for a shuffler's layout: cached (one
    rearrangement asks six times; ~0.1 ms each for 58 layers), read-only."""
    L = layout.num_layers
    out = tuple(np.zeros(L, dtype=_I64) for _ in range(5))
    big, small, small_al, nbig, nsmall = out
    for layer, rb in enumerate(layout.row_bytes):
        b_ids, s_ids = _split(rb, packed, thr)
        big[layer] = sum(_align(rb[i]) for i in b_ids)
        small[layer] = sum(rb[i] for i in s_ids)
        small_al[layer] = sum(_align(rb[i]) for i in s_ids)
        nbig[layer], nsmall[layer] = len(b_ids), len(s_ids)
    for a in out:
        a.setflags(write=False)
    return out


def build_schedule(
    plan: RearrangementPlan,
    layout: Layout,
    *,
    staging_bytes: int | None = None,
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    transactional: bool = True,
    max_messages_per_round: int = DEFAULT_MAX_MESSAGES,
    one_sided: bool = False,
) -> Schedule:
    """The rounds of whole layers, identical on every rank (computed from the global plan).

    Per layer: packing is used when the layer has rows under ``pack_threshold`` and every
    rank's staging for it fits the bound; otherwise all its tensors travel as their own
    messages (staging then only holds rows that cannot be written in place, at most one
    layer). ``one_sided``: the receiver reads the sender's rows itself, so nothing is packed
    (a sender has no staging its peers read). Raises ValueError when a single layer cannot
    fit an explicit ``staging_bytes``.
    """
    if plan.num_layers != layout.num_layers:
        raise ValueError(
            f"the plan has {plan.num_layers} layers but the layout {layout.num_layers}"
        )
    if plan.slots_per_rank != layout.rows:
        raise ValueError(
            f"the plan has {plan.slots_per_rank} slots per rank but the layout {layout.rows} rows"
        )
    auto = staging_bytes is None
    bound = layout.layer_bytes() if auto else int(staging_bytes)
    thr = 0 if one_sided else int(pack_threshold)
    P = plan.slots_per_rank
    L, n = plan.num_layers, plan.ep_size
    # The device index tensor (rows to gather/scatter) counts against the bound too: reserve
    # an upper bound that is the same on every rank (8 bytes per index, at most two indices
    # per transfer end and per local copy).
    ends = np.bincount(plan.t_src_rank, minlength=n) + np.bincount(plan.t_dst_rank, minlength=n)
    ends = ends + np.bincount(plan.c_rank, minlength=n)
    reserve = int(16 * ends.max()) if ends.size else 0
    budget = bound - reserve
    changed = plan.changed.reshape(L, n, P)
    needed = plan.source_needed.reshape(L, n, P)
    unsafe = changed if transactional else needed  # rows that may not be written before C
    tl, ts, td, tr = plan.t_layer, plan.t_src_rank, plan.t_dst_rank, plan.t_dst_row
    full = _sizes(layout, False, thr)[0]  # aligned bytes of a whole row (every tensor on its own)
    cycles, tcount = _phase_c_copies(plan, transactional)
    stash = cycles * full[:, None]
    staged = unsafe[tl, td, tr] if tl.size else np.zeros(0, dtype=bool)
    key = _distinct((tl * n + ts) * n + td)  # (layer, src, dst) with transfers
    pairs = np.stack([key // (n * n), key // n % n, key % n])

    def needs(packed: bool):
        big, small, small_al, nbig, nsmall = _sizes(layout, packed, thr)
        # stash rows, and the old content of small tensors' rows copied in phase C
        need = stash + tcount * small_al[:, None]
        msgs = np.zeros((L, n), dtype=_I64)
        if tl.size:
            np.add.at(need, (tl[staged], td[staged]), big[tl[staged]])
            np.add.at(need, (tl, td), small[tl])  # packed receives
            np.add.at(need, (tl, ts), small[tl])  # packed sends
            np.add.at(msgs, (tl, ts), nbig[tl])
            np.add.at(msgs, (tl, td), nbig[tl])
            # packed parts: one message per (peer, small tensor) each way
            k = nsmall[pairs[0]]
            np.add.at(msgs, (pairs[0], pairs[1]), k)
            np.add.at(msgs, (pairs[0], pairs[2]), k)
            # alignment slack of packed blocks: one per (small tensor, direction) (the bound
            # counts one per peer too: it only over-reserves)
            need += np.where(need > 0, ALIGN * 2 * n * nsmall[:, None], 0)
        return need, msgs

    need_p, msgs_p = needs(True)
    need_u, msgs_u = needs(False)
    has_small = _sizes(layout, True, thr)[4] > 0
    packed = has_small & (need_p.max(axis=1) <= budget)
    need = np.where(packed[:, None], need_p, need_u)
    msgs = np.where(packed[:, None], msgs_p, msgs_u)
    worst = need.max(axis=1)
    active = np.flatnonzero(changed.reshape(L, -1).any(axis=1))
    if auto and active.size and worst[active].max() > budget:
        # default bound (one layer of local experts) below this rearrangement's minimum:
        # only with tiny rows, where alignment and row indices dominate; use the minimum
        budget = int(worst[active].max())
    for layer in active:
        if worst[layer] > budget:
            r = int(need[layer].argmax())
            raise ValueError(
                f"staging_bytes={bound} is too small: layer {layer} needs "
                f"{int(worst[layer]) + bound - budget} bytes of staging on rank {r}"
                + (" (transactional)" if transactional else "")
                + "; raise staging_bytes (default: one layer of local experts)"
            )
    rounds = []
    cur: list = []
    acc = np.zeros(n, dtype=_I64)
    macc = np.zeros(n, dtype=_I64)
    for layer in active:
        if cur and (
            (acc + need[layer]).max() > budget
            or (macc + msgs[layer]).max() > max_messages_per_round
        ):
            rounds.append(cur)
            cur, acc, macc = [], np.zeros(n, dtype=_I64), np.zeros(n, dtype=_I64)
        cur.append(int(layer))
        acc += need[layer]
        macc += msgs[layer]
    if cur:
        rounds.append(cur)
    round_need = [int(need[rl].sum(axis=0).max()) for rl in rounds]
    return Schedule(
        plan=plan,
        layout=layout,
        rounds=rounds,
        round_staging=round_need,
        packed=packed,
        staging_bound=budget + reserve,
        transactional=bool(transactional),
        pack_threshold=thr,
        max_messages=int(max_messages_per_round),
        one_sided=bool(one_sided),
    )


def _phase_c_copies(plan: RearrangementPlan, transactional: bool):
    """Per (layer, rank), from the global plan: (cycles among the old-content copies that
    phase C applies, i.e. stash rows; number of those copies). The rank schedules execute
    exactly these."""
    L, n, P = plan.num_layers, plan.ep_size, plan.slots_per_rank
    cycles = np.zeros((L, n), dtype=_I64)
    count = np.zeros((L, n), dtype=_I64)
    cl, cr, cs, cd, cn = (
        plan.c_layer,
        plan.c_rank,
        plan.c_src_row,
        plan.c_dst_row,
        plan.c_src_is_new,
    )
    if cl.size:
        unsafe = (plan.changed if transactional else plan.source_needed).reshape(L, n, P)
        tc = ~cn & unsafe[cl, cr, cd]
        parent = np.full(L * n * P, -1, dtype=_I64)
        node = (cl * n + cr) * P
        parent[node[tc] + cd[tc]] = node[tc] + cs[tc]
        heads = _cycle_heads(parent)
        np.add.at(cycles, (heads // (n * P), heads // P % n), 1)
        np.add.at(count, (cl[tc], cr[tc]), 1)
    return cycles, count


def _cycle_heads(parent: np.ndarray) -> np.ndarray:
    """The smallest node of every cycle of ``parent`` (node -> node, -1: none), sorted.

    Pointer doubling: after ``2**J >= len`` steps a node's image is on a cycle (or is the
    sentinel for chains that end), every cycle node is such an image, and the running minimum
    along the path covers its whole cycle."""
    n = len(parent)
    if n == 0:
        return np.zeros(0, dtype=_I64)
    p = np.append(np.where(parent >= 0, parent, n), n)  # sentinel n: the end of a chain
    mn = np.append(np.arange(n, dtype=_I64), np.iinfo(_I64).max)
    for _ in range(max(1, int(n - 1).bit_length()) + 1):
        mn = np.minimum(mn, mn[p])
        p = p[p]
    on_cycle = _distinct(p[:n][p[:n] != n])
    return on_cycle[mn[on_cycle] == on_cycle]


def _distinct(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D int array (np.unique without its lazy import of
    numpy.ma: ~0.1 s on the first call, which would land in the middle of serving)."""
    a = np.sort(a)
    if a.size:
        a = a[np.append(True, a[1:] != a[:-1])]
    return a


def _order_copies(copies: list):
    """Order old-content copies (src, dst) so every row is read before it is written.

    Rows form chains and cycles (a row is written by at most one copy); the smallest row of
    each cycle is saved first (the stash) and its readers read the saved copy. Returns
    (stash rows, [(src, j, dst)]) with j the stash index of src, or -1 to read row src.
    """
    if not copies:
        return [], []
    # cycles of dst -> src (a few rows: plain Python beats numpy calls here)
    parent = {dst: src for src, dst in copies}
    seen: dict = {}
    heads = []
    for start in parent:
        path = []
        x = start
        while x in parent and x not in seen:
            seen[x] = start
            path.append(x)
            x = parent[x]
        if seen.get(x) == start and x in parent:  # this walk closed a cycle at x
            heads.append(min(path[path.index(x) :]))
    stash = sorted(heads)
    slot = {r: j for j, r in enumerate(stash)}
    writer = {dst: k for k, (_, dst) in enumerate(copies)}
    readers: dict = {}
    for src, _ in copies:
        if src not in slot:
            readers[src] = readers.get(src, 0) + 1
    ready = [k for k, (_, dst) in enumerate(copies) if not readers.get(dst)]
    order = []
    while ready:
        k = ready.pop()
        src, dst = copies[k]
        order.append((src, slot.get(src, -1), dst))
        if src not in slot:
            readers[src] -= 1
            if readers[src] == 0 and src in writer:
                ready.append(writer[src])
    if len(order) != len(copies):  # cannot happen: one stash row per cycle breaks them all
        raise AssertionError(f"local copies could not be ordered: {copies}")
    return stash, order


def _runs(peer: np.ndarray, src: np.ndarray, staged: np.ndarray, layer: np.ndarray):
    """(starts, lengths) of the runs of a sorted transfer list: same layer and peer,
    consecutive source rows, every one staged; an unstaged transfer is a run of its own."""
    n = len(peer)
    if n == 0:
        return np.zeros(0, dtype=_I64), np.zeros(0, dtype=_I64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (layer[1:] != layer[:-1])
        | (peer[1:] != peer[:-1])
        | (src[1:] != src[:-1] + 1)
        | ~staged[1:]
        | ~staged[:-1]
    )
    starts = np.flatnonzero(brk)
    return starts, np.diff(np.append(starts, n))


@dataclass
class _LayerWork:
    """One layer's transfers and copies on one rank, before staging offsets are assigned."""

    layer: int
    big: list  # tensors sent as their own messages
    small: list  # tensors packed per peer
    sends: list  # (peer, src_row), per peer by (src row, dst row)
    recvs: list  # (peer, src_row, dst_row, j): j = row of the staged-receive blocks, -1 = in place
    recv_rows: list  # dst rows of the staged receives, by j
    copies_a: list  # (src, dst): phase A, into rows nobody reads (non-transactional)
    stash_src: list  # phase A: old rows saved into the stash blocks (one per copy cycle)
    copies_c: list  # (src, j, dst): phase C first, old content, read before written
    copies_new: list  # (src, dst): phase C last, duplicates of rows new in this layer
    send_msgs: list  # (peer, first src row, rows)
    recv_msgs: list  # (peer, first src row, first dst row, first j or -1, rows)


def _layer_works(sched: Schedule, rank: int, layers: list) -> dict:
    """This rank's transfers and copies for each of ``layers``: layer -> _LayerWork.

    Sorting and run detection are done once over all layers (numpy); only the per-layer
    lists are built in Python.
    """
    plan, layout = sched.plan, sched.layout
    rv = plan.rank_view(rank)
    P = plan.slots_per_rank
    nP = plan.ep_size * P
    thr = sched.pack_threshold
    # rows (of every rank) that may not be written before phase C, flat per layer
    unsafe_all = (plan.changed if sched.transactional else plan.source_needed).reshape(-1)
    nbig = np.where(sched.packed, _sizes(layout, True, thr)[3], _sizes(layout, False, thr)[3])
    has_big = nbig > 0
    # Per pair of ranks both sides list the transfers by (source row, destination row), and a
    # run of transfers from consecutive source rows, all received into staging, travels as one
    # message per tensor (k rows of the source tensor -> k staged rows). The receiver's staging
    # decision comes from the global plan, so the sender breaks runs where the receiver does.
    sl, sp, ss, sd = rv.s_layer, rv.s_peer, rv.s_src_row, rv.s_dst_row
    o = np.lexsort((sd, ss, sp, sl))
    sl, sp, ss, sd = sl[o], sp[o], ss[o], sd[o]
    staged_s = unsafe_all[sl * nP + sp * P + sd] & has_big[sl]
    s_starts, s_len = _runs(sp, ss, staged_s, sl)
    rl, rp, rs, rd = rv.r_layer, rv.r_peer, rv.r_src_row, rv.r_dst_row
    o = np.lexsort((rd, rs, rp, rl))
    rl, rp, rs, rd = rl[o], rp[o], rs[o], rd[o]
    staged_r = unsafe_all[rl * nP + rank * P + rd] & has_big[rl]
    r_starts, r_len = _runs(rp, rs, staged_r, rl)
    o = np.argsort(rv.c_layer, kind="stable")
    cl, cs, cd, cn = rv.c_layer[o], rv.c_src_row[o], rv.c_dst_row[o], rv.c_src_is_new[o]
    # 0: duplicate of a new row (phase C last), 1: into a row nobody reads (phase A),
    # 2: old content into a row that is read or live (phase C first, ordered)
    ckind = np.where(cn, 0, np.where(unsafe_all[cl * nP + rank * P + cd], 2, 1))
    lay = np.asarray(layers, dtype=_I64)
    # per layer: [start, end) of its transfers/copies, and of its runs
    sb, rb_, cb = (
        np.stack([np.searchsorted(x, lay), np.searchsorted(x, lay, side="right")], axis=1)
        for x in (sl, rl, cl)
    )
    srb = np.searchsorted(s_starts, sb).tolist()
    rrb = np.searchsorted(r_starts, rb_).tolist()
    sb, rb_, cb = sb.tolist(), rb_.tolist(), cb.tolist()
    sp_l, ss_l = sp.tolist(), ss.tolist()
    rp_l, rs_l, rd_l, stg_l = rp.tolist(), rs.tolist(), rd.tolist(), staged_r.tolist()
    cs_l, cd_l, ck_l = cs.tolist(), cd.tolist(), ckind.tolist()
    s_starts, s_len, r_starts, r_len = (
        s_starts.tolist(),
        s_len.tolist(),
        r_starts.tolist(),
        r_len.tolist(),
    )
    out = {}
    for k, layer in enumerate(layers):
        big, small = _split(layout.row_bytes[layer], bool(sched.packed[layer]), thr)
        a, b = sb[k]
        sends = list(zip(sp_l[a:b], ss_l[a:b]))
        i0, i1 = srb[k]
        send_msgs = [(sp_l[x], ss_l[x], m) for x, m in zip(s_starts[i0:i1], s_len[i0:i1])]
        a, b = rb_[k]
        recvs, recv_rows = [], []
        for peer, src, row, staged in zip(rp_l[a:b], rs_l[a:b], rd_l[a:b], stg_l[a:b]):
            if staged:
                recvs.append((peer, src, row, len(recv_rows)))
                recv_rows.append(row)
            else:
                recvs.append((peer, src, row, -1))
        i0, i1 = rrb[k]
        recv_msgs = [recvs[x - a] + (m,) for x, m in zip(r_starts[i0:i1], r_len[i0:i1])]
        a, b = cb[k]
        lists: tuple = ([], [], [])  # new, copies_a, to order
        for src, dst, kind in zip(cs_l[a:b], cd_l[a:b], ck_l[a:b]):
            lists[kind].append((src, dst))
        new, copies_a, tc = lists
        stash_src, copies_c = _order_copies(tc)
        out[layer] = _LayerWork(
            layer,
            big,
            small,
            sends,
            recvs,
            recv_rows,
            copies_a,
            stash_src,
            copies_c,
            new,
            send_msgs,
            recv_msgs,
        )
    return out


class _RoundBuilder:
    """Accumulates one rank's ops for one round: staging offsets, index ranges, op rows."""

    def __init__(self, layout: Layout, index_parts: list, index_pos: int) -> None:
        self.layout = layout
        self.cursor = 0
        self.parts = index_parts
        self.pos = index_pos
        self.kern: dict = {}  # (phase, kind, what) -> list of rows
        self.copies: dict = {}  # phase name -> list of rows
        self.msgs = {"s": [], "r": []}

    def take(self, n: int) -> int:
        off = self.cursor
        self.cursor += _align(n)
        return off

    def index(self, rows) -> int:
        start = self.pos
        self.parts.append(np.asarray(rows, dtype=_I64))
        self.pos += len(rows)
        return start

    def kernel(self, key, buf, idx, count, stage, rb) -> None:
        self.kern.setdefault(key, []).append((buf, idx, count, stage, rb))

    def copy(self, key, dst_buf, dst_off, src_buf, src_off, n) -> None:
        self.copies.setdefault(key, []).append((dst_buf, dst_off, src_buf, src_off, n))

    def kernels_op(self, key) -> Kernels | None:
        rows = self.kern.get(key)
        if not rows:
            return None
        a = np.asarray(rows, dtype=_I64).reshape(-1, 5)
        return Kernels(key[1], a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], what=key[2])

    def copies_op(self, key, reads_new=False, ordered=False) -> Copies | None:
        rows = self.copies.get(key)
        if not rows:
            return None
        a = np.asarray(rows, dtype=_I64).reshape(-1, 5)
        return Copies(
            a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], reads_new=reads_new, ordered=ordered
        )

    def messages(self, tag) -> Messages:
        a = np.asarray(self.msgs[tag], dtype=_I64).reshape(-1, 8)
        return Messages(*(a[:, j] for j in range(8)))


def _rank_schedule(sched: Schedule, rank: int) -> RankSchedule:
    """Lay out one rank's rounds: staging offsets, index ranges and the op arrays."""
    layout = sched.layout
    first = layout.first_buf.tolist()
    works = _layer_works(sched, rank, sched.layers_changed)
    index_parts: list = []
    pos = 0
    rounds = []
    cap = 0
    for ri, layers in enumerate(sched.rounds):
        b = _RoundBuilder(layout, index_parts, pos)
        st = RoundOps(ri, list(layers), [], None, None, [])
        for layer in layers:
            w = works[layer]
            _lay_out_layer(b, w, layout.row_bytes[layer], first[layer], layer)
            nrow = sum(layout.row_bytes[layer])
            st.experts_sent += len(w.sends)
            st.experts_received += len(w.recvs)
            st.bytes_sent += nrow * len(w.sends)
            st.bytes_received += nrow * len(w.recvs)
            st.local_copies += len(w.copies_a) + len(w.copies_c) + len(w.copies_new)
        pos = b.pos
        st.pre = [
            op
            for op in (
                b.copies_op("a"),
                b.kernels_op(("pre", "gather", "stash")),
                b.kernels_op(("pre", "gather", "pack")),
            )
            if op is not None
        ]
        st.sends, st.recvs = b.messages("s"), b.messages("r")
        waves = sorted(k[1] for k in b.copies if isinstance(k, tuple) and k[0] == "c")
        st.post = [
            op
            for op in (
                b.kernels_op(("post", "gather", "copy")),
                *(b.copies_op(("c", k)) for k in waves),
                b.kernels_op(("post", "scatter", "copy")),
                b.kernels_op(("post", "scatter", "recv")),
                b.kernels_op(("post", "scatter", "pack")),
                b.copies_op("new", reads_new=True),
            )
            if op is not None
        ]
        st.staging_bytes = b.cursor
        cap = max(cap, b.cursor)
        rounds.append(st)
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=_I64)
    return RankSchedule(rank, rounds, index, cap)


def _lay_out_layer(b: _RoundBuilder, w: _LayerWork, rb, fb: int, layer: int) -> None:
    """Staging blocks, index ranges and ops of one layer (in the order the executor runs them).

    Per pair, both sides list messages run by run, tensor by tensor, then the packed parts
    tensor by tensor."""
    ntens = len(rb)
    recv_block = {i: b.take(len(w.recv_rows) * rb[i]) for i in w.big} if w.recv_rows else {}
    stash_block = {i: b.take(len(w.stash_src) * rb[i]) for i in range(ntens)} if w.stash_src else {}
    recv_ix = b.index(w.recv_rows) if w.recv_rows else -1
    stash_ix = b.index(w.stash_src) if w.stash_src else -1
    copy_block = {}
    if w.copies_c and w.small and not w.stash_src:
        copy_block = {i: b.take(len(w.copies_c) * rb[i]) for i in w.small}
        c_src_ix = b.index([src for src, _, _ in w.copies_c])
        c_dst_ix = b.index([dst for _, _, dst in w.copies_c])
    packs = {}
    for tag, pairs in (("s", w.sends), ("r", [(p, d) for p, _, d, _ in w.recvs])):
        if not (w.small and pairs):
            continue
        by_peer: dict = {}
        for peer, row in pairs:
            by_peer.setdefault(peer, []).append(row)
        spans, rows, at = [], [], 0
        for peer, pr in by_peer.items():
            spans.append((peer, at, len(pr)))
            rows += pr
            at += len(pr)
        blocks = {i: b.take(at * rb[i]) for i in w.small}
        packs[tag] = (spans, blocks, b.index(rows), at)

    # phase A: local copies into rows nobody reads; the stash; packed sends
    for src, dst in w.copies_a:
        for i in range(ntens):
            b.copy("a", fb + i, dst * rb[i], fb + i, src * rb[i], rb[i])
    for i in stash_block:
        b.kernel(
            ("pre", "gather", "stash"), fb + i, stash_ix, len(w.stash_src), stash_block[i], rb[i]
        )
    if "s" in packs:
        spans, blocks, ix, cnt = packs["s"]
        for i in w.small:
            b.kernel(("pre", "gather", "pack"), fb + i, ix, cnt, blocks[i], rb[i])
    # B: messages. Sends straight from the rows; receives into staging or (not transactional,
    # rows nobody reads) straight into the rows. The remote end is filled where this rank
    # knows it: a receive's source row on the sender (-1 until Schedule.linked otherwise).
    for peer, src, k in w.send_msgs:
        for i in w.big:
            b.msgs["s"].append((peer, fb + i, fb + i, src * rb[i], k * rb[i], -1, -1, layer))
    for peer, src, dst, j, k in w.recv_msgs:
        for i in w.big:
            if j < 0:
                b.msgs["r"].append(
                    (peer, fb + i, fb + i, dst * rb[i], rb[i], fb + i, src * rb[i], layer)
                )
            else:
                b.msgs["r"].append(
                    (
                        peer,
                        fb + i,
                        STAGING,
                        recv_block[i] + j * rb[i],
                        k * rb[i],
                        fb + i,
                        src * rb[i],
                        layer,
                    )
                )
    for tag in ("s", "r"):
        if tag not in packs:
            continue
        spans, blocks, _, _ = packs[tag]
        for peer, at, k in spans:
            for i in w.small:
                b.msgs[tag].append(
                    (peer, fb + i, STAGING, blocks[i] + at * rb[i], k * rb[i], -1, -1, layer)
                )
    # C: old-content copies (small tensors through a staging block, the rest row by row in
    # read-before-write order), staged receives into the rows, then duplicates of new rows
    if w.copies_c:
        nc = len(w.copies_c)
        for i, off in copy_block.items():
            b.kernel(("post", "gather", "copy"), fb + i, c_src_ix, nc, off, rb[i])
        rows = [i for i in range(ntens) if i not in copy_block]
        # waves of copies that may run at once (one batch each): a copy that overwrites a row
        # a copy of the current wave reads starts the next wave (the order reads every row
        # before it is written, so nothing else can conflict)
        wave, reads = 0, set()
        for src, j, dst in w.copies_c:
            if dst in reads:
                wave, reads = wave + 1, set()
            if j < 0:
                reads.add(src)
            for i in rows:
                if j < 0:
                    b.copy(("c", wave), fb + i, dst * rb[i], fb + i, src * rb[i], rb[i])
                else:
                    b.copy(
                        ("c", wave), fb + i, dst * rb[i], STAGING, stash_block[i] + j * rb[i], rb[i]
                    )
        for i, off in copy_block.items():
            b.kernel(("post", "scatter", "copy"), fb + i, c_dst_ix, nc, off, rb[i])
    for i, off in recv_block.items():
        b.kernel(("post", "scatter", "recv"), fb + i, recv_ix, len(w.recv_rows), off, rb[i])
    if "r" in packs:
        spans, blocks, ix, cnt = packs["r"]
        for i in w.small:
            b.kernel(("post", "scatter", "pack"), fb + i, ix, cnt, blocks[i], rb[i])
    for src, dst in w.copies_new:
        for i in range(ntens):
            b.copy("new", fb + i, dst * rb[i], fb + i, src * rb[i], rb[i])


def _link(ranks: list, nrounds: int) -> None:
    """Fill every message's remote end from its match on the peer (in place)."""
    for k in range(nrounds):
        # every send (src=r, dst=p, seq) against every receive (dst=p, src=r, seq)
        s_rows, r_rows = [], []
        for rs in ranks:
            m = rs.rounds[k].sends
            s_rows.append(np.stack([np.full(len(m), rs.rank), m.peer, np.arange(len(m))], axis=1))
            m = rs.rounds[k].recvs
            r_rows.append(np.stack([m.peer, np.full(len(m), rs.rank), np.arange(len(m))], axis=1))
        S = np.concatenate(s_rows) if s_rows else np.zeros((0, 3), dtype=_I64)
        R = np.concatenate(r_rows) if r_rows else np.zeros((0, 3), dtype=_I64)
        if len(S) != len(R):
            raise ScheduleError(f"round {k}: {len(S)} sends but {len(R)} receives in all")
        n = len(ranks)
        # order within a pair: position among that pair's messages on each side
        so = np.lexsort((S[:, 2], S[:, 1], S[:, 0]))
        ro = np.lexsort((R[:, 2], R[:, 1], R[:, 0]))
        S, R = S[so], R[ro]
        if not np.array_equal(S[:, :2], R[:, :2]):
            pair = S[:, 0] * n + S[:, 1]
            rpair = R[:, 0] * n + R[:, 1]
            bad = int(np.flatnonzero(pair != rpair)[0])
            raise ScheduleError(
                f"round {k}: rank {int(S[bad, 0])} sends {int(np.sum(pair == pair[bad]))} messages "
                f"to rank {int(S[bad, 1])}, which receives {int(np.sum(rpair == pair[bad]))}"
            )
        for (src, dst, si), (_, _, ri) in zip(S.tolist(), R.tolist()):
            sm, rm = ranks[src].rounds[k].sends, ranks[dst].rounds[k].recvs
            if sm.nbytes[si] != rm.nbytes[ri]:
                raise ScheduleError(
                    f"round {k}: message {si} from rank {src} to rank {dst} has {int(sm.nbytes[si])} "
                    f"bytes, the receive {ri} on rank {dst} {int(rm.nbytes[ri])}"
                )
            if sm.tensor[si] != rm.tensor[ri]:
                raise ScheduleError(
                    f"round {k}: message {si} from rank {src} to rank {dst} carries buffer "
                    f"{int(sm.tensor[si])}'s rows, the receive {ri} buffer {int(rm.tensor[ri])}'s"
                )
            if rm.roff[ri] >= 0 and (rm.rbuf[ri], rm.roff[ri]) != (sm.buf[si], sm.off[si]):
                raise ScheduleError(
                    f"round {k}: receive {ri} on rank {dst} expects bytes at ({int(rm.rbuf[ri])}, "
                    f"{int(rm.roff[ri])}) on rank {src}, which sends ({int(sm.buf[si])}, {int(sm.off[si])})"
                )
            if sm.roff[si] >= 0 and (sm.rbuf[si], sm.roff[si]) != (rm.buf[ri], rm.off[ri]):
                raise ScheduleError(
                    f"round {k}: send {si} on rank {src} targets ({int(sm.rbuf[si])}, {int(sm.roff[si])}) "
                    f"on rank {dst}, which receives at ({int(rm.buf[ri])}, {int(rm.off[ri])})"
                )
            sm.rbuf[si], sm.roff[si] = rm.buf[ri], rm.off[ri]
            rm.rbuf[ri], rm.roff[ri] = sm.buf[si], sm.off[si]


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


def _run_copies(sched, m: _Rank, op: Copies, where: str, live_ok: bool) -> None:
    rbytes = sched.layout.buf_row_bytes()
    cells = []
    for q in range(len(op)):
        what = f"{where} copy {q}"
        sb, db = int(op.src_buf[q]), int(op.dst_buf[q])
        wb = db if db != STAGING else sb
        if wb == STAGING:
            raise ScheduleError(f"{what}: a copy from staging to staging")
        rb = int(rbytes[wb])
        cells.append(
            (
                _rows_of(sched, m.rs, sb, int(op.src_off[q]), int(op.nbytes[q]), rb, what),
                _rows_of(sched, m.rs, db, int(op.dst_off[q]), int(op.nbytes[q]), rb, what),
                what,
            )
        )
    if not op.ordered:  # independent copies: no copy may read or write what another writes
        wr: set = set()
        for src, dst, what in cells:
            d = _keys(dst)
            if d & wr or _keys(src) & wr:
                raise ScheduleError(f"{what}: depends on another copy of an unordered batch")
            wr |= d
        for src, _, what in cells:
            if _keys(src) & wr:
                raise ScheduleError(
                    f"{what}: reads a row another copy of the unordered batch writes"
                )
    for src, dst, what in cells:
        _write(
            m,
            dst,
            _read(m, src, op.reads_new and src[0] == "w", what),
            what,
            live_ok or dst[0] == "s",
        )


def _run_kernels(sched, m: _Rank, op: Kernels, where: str, live_ok: bool) -> None:
    rbytes = sched.layout.buf_row_bytes()
    wbytes = sched.layout.buf_word_bytes()
    rs = m.rs
    for q in range(len(op)):
        what = f"{where} {op.kind} kernel {q} ({op.what})"
        buf, rb = int(op.buf[q]), int(op.row_bytes[q])
        a, cnt, stg = int(op.idx[q]), int(op.count[q]), int(op.stage[q])
        if not 0 <= buf < rbytes.size:
            raise ScheduleError(f"{what}: no buffer {buf}")
        word = int(wbytes[buf])
        if stg % ALIGN or rb % word:
            raise ScheduleError(
                f"{what}: staging offset {stg} not {ALIGN}-byte aligned or rows of {rb} B not whole words of {word} B"
            )
        if a < 0 or a + cnt > rs.index.size:
            raise ScheduleError(
                f"{what}: index range [{a}, {a + cnt}) outside the index of {rs.index.size}"
            )
        rows = rs.index[a : a + cnt]
        if op.kind == "scatter" and np.unique(rows).size != cnt:  # a gather may read a row twice
            raise ScheduleError(f"{what}: rows {rows.tolist()} written twice within one kernel")
        if cnt and (rows.min() < 0 or rows.max() >= sched.layout.rows):
            raise ScheduleError(f"{what}: rows {rows.tolist()} out of range")
        _rows_of(sched, rs, buf, 0, rb, rb, what)  # the buffer's row size
        wcells = ("w", buf, rows.astype(_I64))
        scells = _rows_of(sched, rs, STAGING, stg, cnt * rb, rb, what)
        if op.kind == "gather":
            _write(m, scells, _read(m, wcells, False, what), what, True)
        elif op.kind == "scatter":
            _write(m, wcells, _read(m, scells, False, what), what, live_ok)
        else:
            raise ScheduleError(f"{what}: unknown kernel kind {op.kind!r}")


def _run_phase(sched, m: _Rank, ops: list, k: int, phase: str) -> None:
    live_ok = phase == "post" or not sched.transactional
    for j, op in enumerate(ops):
        where = f"round {k} rank {m.rs.rank} {phase} op {j}"
        if isinstance(op, Copies):
            _run_copies(sched, m, op, where, live_ok)
        elif isinstance(op, Kernels):
            _run_kernels(sched, m, op, where, live_ok)
        else:
            raise ScheduleError(f"{where}: unknown op {type(op).__name__}")


def _exchange(sched: Schedule, mems: list, k: int) -> None:
    """Round k's messages, all concurrent (one NCCL group per rank): every send reads the
    memory as phase A left it, no send reads bytes a receive of the round writes on its rank,
    and no two receives write the same bytes."""
    rbytes = sched.layout.buf_row_bytes()
    written = []
    recv_cells = []
    for m in mems:
        r = m.rs.rank
        rm = m.rs.rounds[k].recvs
        w: set = set()
        cells = []
        for q in range(len(rm)):
            what = f"round {k} rank {r} receive {q} from rank {int(rm.peer[q])}"
            c = _rows_of(
                sched,
                m.rs,
                int(rm.buf[q]),
                int(rm.off[q]),
                int(rm.nbytes[q]),
                int(rbytes[rm.tensor[q]]),
                what,
            )
            key = _keys(c)
            if key & w:
                raise ScheduleError(f"{what}: writes bytes another receive of the round writes")
            w |= key
            cells.append(c)
        written.append(w)
        recv_cells.append(cells)
    deliveries = []
    for m in mems:
        r = m.rs.rank
        sm = m.rs.rounds[k].sends
        # the i-th send to p is the i-th receive from r on p (linked() checked sizes)
        seen: dict = {}
        for q in range(len(sm)):
            p = int(sm.peer[q])
            what = f"round {k} rank {r} send {q} to rank {p}"
            c = _rows_of(
                sched,
                m.rs,
                int(sm.buf[q]),
                int(sm.off[q]),
                int(sm.nbytes[q]),
                int(rbytes[sm.tensor[q]]),
                what,
            )
            if _keys(c) & written[r]:
                raise ScheduleError(f"{what}: reads bytes a receive of the same round writes")
            pos = seen.get(p, 0)
            seen[p] = pos + 1
            deliveries.append((p, r, pos, _read(m, c, False, what)))
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


def simulate(sched: Schedule, old_map, new_map, *, cell: int = 4) -> list[dict]:
    """Execute every rank's schedule in one process (a virtual cluster) and check it.

    Memory is kept in cells of one tensor row, each holding ``cell`` bytes (rows are scaled
    down; sizes, offsets and the bound are checked at full size). Raises
    :class:`ScheduleError` when: a pair's send and receive sequences differ (count, sizes,
    order) or a message's two ends disagree; an op reads a row's old content after it was
    overwritten, or a duplicate reads a row not yet written; concurrent ops touch the same
    bytes (the messages of a round, the rows of one kernel, an unordered batch of copies);
    staging is used beyond its size, read where nothing (or something else) was written, or
    the rank's staging and index exceed the bound; in transactional mode a live row is written
    before its round's exchange completed; a range is not whole rows of one buffer; or the
    final rows are not exactly those of ``new_map``. Returns per-rank figures.
    """
    plan, layout = sched.plan, sched.layout
    old = np.asarray(old_map)
    new = np.asarray(new_map)
    P = plan.slots_per_rank
    ranks = sched.linked()
    mems = []
    for rs in ranks:
        if rs.peak_extra_bytes > sched.staging_bound:
            raise ScheduleError(
                f"rank {rs.rank}: staging {rs.staging_bytes} B + index {8 * rs.index.size} B exceed "
                f"the bound of {sched.staging_bound} B"
            )
        mems.append(_Rank(sched, rs, old, cell))
    for k in range(len(sched.rounds)):
        for m in mems:
            _run_phase(sched, m, m.rs.rounds[k].pre, k, "pre")
        _exchange(sched, mems, k)
        for m in mems:
            _run_phase(sched, m, m.rs.rounds[k].post, k, "post")
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
    return [
        {
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
        for rs in ranks
    ]


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
    :class:`ScheduleError` on any violation (see :func:`simulate`); returns per-rank figures
    (rounds, messages, bytes, local copies, peak staging).
    """
    bad = set(opts) - _SHUFFLER_OPTS
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; known: {sorted(_SHUFFLER_OPTS)}")
    rpn = opts.pop("ranks_per_node", None)
    plan = plan_rearrangement(old_map, new_map, ep_size, ranks_per_node=rpn)
    layout = Layout.of(row_bytes, plan.slots_per_rank)
    sched = build_schedule(plan, layout, **opts)
    return simulate(sched, old_map, new_map, cell=cell)
