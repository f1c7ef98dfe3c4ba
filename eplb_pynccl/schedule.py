"""Layer 4: the schedule. Every rank's rounds of ops, built once from the plan (pure numpy).

A rearrangement moves whole layers in *rounds*, the same on every rank, sized so that each
rank's staging fits the bound. A round of one rank is three phases of plain ops:

* ``pre`` (phase A, on the exchange stream, before the messages): :class:`Copies` into rows
  nobody reads (non-transactional mode only), then :class:`Kernels` gathers: the stash (rows
  whose readers must not wait for them, see :class:`CopyOrder`) and the packed sends (rows of small tensors gathered
  into one staging block per tensor).
* ``sends`` and ``recvs``: :class:`Messages`, one per tensor and run of consecutive source
  rows (or per peer and small tensor, packed). Each names its bytes on *both* ends: here
  ``(buf, off)``, on the peer ``(rbuf, roff)``; a buffer is a weight tensor of this rank
  (``layout.buf(layer, i)``) or :data:`STAGING`. Between two ranks the i-th send of one is the
  i-th receive of the other (what an NCCL group needs not to hang).
* ``post`` (phase C, on the caller's stream, once the messages have completed): the old-content
  local copies in read-before-write order, as at most ``copy_waves`` waves of copies that
  may run at once (small tensors through a staging block), the staged receives scattered into the live rows, then
  the duplicates of rows new in this layer.

Every rank can compute every rank's schedule from the same inputs, so a one-sided transport
knows the remote addresses it reads without a metadata exchange (:meth:`Schedule.linked`).
:mod:`eplb_pynccl.simulate` executes all ranks' schedules on numpy arrays (a virtual cluster)
and checks them; its :func:`~eplb_pynccl.simulate.simulate_rearrangement` is the one entry
point from maps to checked figures.

Transactional mode (the default) writes no live row before its round's messages complete, so
after any failure each layer is entirely old or entirely new.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._checks import check_count
from .planner import RearrangementPlan

__all__ = [
    "ALIGN",
    "DEFAULT_COPY_WAVES",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_PACK_THRESHOLD",
    "STAGING",
    "CopyOrder",
    "Copies",
    "Kernels",
    "Layout",
    "Messages",
    "RankSchedule",
    "RoundOps",
    "Schedule",
    "ScheduleError",
    "StagingTooSmall",
    "build_schedule",
    "copy_order",
]

ALIGN = 16  # staging blocks start 16-byte aligned (any dtype view, vector copies)
DEFAULT_PACK_THRESHOLD = 1 << 20  # rows below 1 MiB are packed per peer
DEFAULT_MAX_MESSAGES = 1024
DEFAULT_COPY_WAVES = 8  # waves of ordered local copies per phase at most (stash: ~1/8 more)
STAGING = -1  # the buffer id of a rank's staging buffer
_I64 = np.int64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class StagingTooSmall(ValueError):
    """``staging_bytes`` below what a layer needs; ``required``: a bound every layer fits."""

    def __init__(self, message: str, required: int) -> None:
        super().__init__(message)
        self.required = required


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
    packed: np.ndarray
    staging_bound: int
    transactional: bool
    pack_threshold: int
    max_messages: int
    one_sided: bool
    copy_waves: int = 0
    order: CopyOrder | None = field(default=None, repr=False)
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


def split_row_tensors(rb, packed: bool, thr: int):
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
        b_ids, s_ids = split_row_tensors(rb, packed, thr)
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
    copy_waves: int = DEFAULT_COPY_WAVES,
) -> Schedule:
    """The rounds of whole layers, identical on every rank (computed from the global plan).

    Per layer: packing is used when the layer has rows under ``pack_threshold`` and every
    rank's staging for it fits the bound; otherwise all its tensors travel as their own
    messages (staging then only holds rows that cannot be written in place, at most one
    layer). ``one_sided``: the receiver reads the sender's rows itself, so nothing is packed
    (a sender has no staging its peers read). ``copy_waves``: waves of ordered local copies
    per phase at most (see :class:`CopyOrder`: fewer waves stash more rows). Raises ValueError
    when a single layer cannot fit an explicit ``staging_bytes``; its ``required`` attribute
    is a ``staging_bytes`` that fits (the largest layer's need).
    """
    copy_waves = check_count(copy_waves, "copy_waves")
    _check_fits(plan, layout)
    bound = layout.layer_bytes() if staging_bytes is None else int(staging_bytes)
    thr = 0 if one_sided else int(pack_threshold)
    reserve = _index_reserve(plan)
    order = copy_order(plan, transactional, copy_waves)
    packed, need, msgs = _choose_packing(
        plan, layout, thr, transactional, order, budget=bound - reserve
    )
    active = np.flatnonzero(plan.changed.reshape(plan.num_layers, -1).any(axis=1))
    budget = _layer_budget(need, active, bound, reserve, staging_bytes is None, transactional)
    return Schedule(
        plan=plan,
        layout=layout,
        rounds=_group_rounds(active, need, msgs, budget, max_messages_per_round),
        packed=packed,
        staging_bound=budget + reserve,
        transactional=bool(transactional),
        pack_threshold=thr,
        max_messages=int(max_messages_per_round),
        one_sided=bool(one_sided),
        copy_waves=copy_waves,
        order=order,
    )


def _check_fits(plan: RearrangementPlan, layout: Layout) -> None:
    """The plan's layers and slots per rank are the layout's."""
    if plan.num_layers != layout.num_layers:
        raise ValueError(
            f"the plan has {plan.num_layers} layers but the layout {layout.num_layers}"
        )
    if plan.slots_per_rank != layout.rows:
        raise ValueError(
            f"the plan has {plan.slots_per_rank} slots per rank but the layout {layout.rows} rows"
        )


def _index_reserve(plan: RearrangementPlan) -> int:
    """Staging bytes reserved for the device index tensor (rows to gather/scatter): an upper
    bound that is the same on every rank (8 bytes per index, at most two indices per transfer
    end and per local copy)."""
    n = plan.ep_size
    ends = np.bincount(plan.t_src_rank, minlength=n) + np.bincount(plan.t_dst_rank, minlength=n)
    ends = ends + np.bincount(plan.c_rank, minlength=n)
    return int(16 * ends.max()) if ends.size else 0


def _choose_packing(plan, layout: Layout, thr: int, transactional: bool, order, budget: int):
    """(packed [layers], staging need [layers, ranks], messages [layers, ranks]): a layer is
    packed when it has tensors under ``thr`` and every rank's packed need fits ``budget``;
    its need and messages are those of the way it travels."""
    L, n, P = plan.num_layers, plan.ep_size, plan.slots_per_rank
    changed = plan.changed.reshape(L, n, P)
    needed = plan.source_needed.reshape(L, n, P)
    unsafe = changed if transactional else needed  # rows that may not be written before C
    tl, ts, td, tr = plan.t_layer, plan.t_src_rank, plan.t_dst_rank, plan.t_dst_row
    full = _sizes(layout, False, thr)[0]  # aligned bytes of a whole row (every tensor on its own)
    key = _distinct((tl * n + ts) * n + td)  # (layer, src, dst) with transfers
    traffic = _Traffic(
        tl,
        ts,
        td,
        staged=unsafe[tl, td, tr] if tl.size else np.zeros(0, dtype=bool),
        pairs=np.stack([key // (n * n), key // n % n, key % n]),
        stash=order.stash_rows * full[:, None],
        tcount=order.count,
    )
    need_p, msgs_p = _layer_needs(traffic, _sizes(layout, True, thr), L, n)
    need_u, msgs_u = _layer_needs(traffic, _sizes(layout, False, thr), L, n)
    has_small = _sizes(layout, True, thr)[4] > 0
    packed = has_small & (need_p.max(axis=1) <= budget)
    need = np.where(packed[:, None], need_p, need_u)
    msgs = np.where(packed[:, None], msgs_p, msgs_u)
    return packed, need, msgs


class _Traffic(NamedTuple):
    """What a layer's staging need and messages are counted from: the transfers' layer,
    source and destination rank, whether each is staged, the (layer, src, dst) pairs with
    transfers (as rows of ``pairs``), the stashed rows' bytes and the copy counts [layers,
    ranks] of the copy order."""

    tl: np.ndarray
    ts: np.ndarray
    td: np.ndarray
    staged: np.ndarray
    pairs: np.ndarray
    stash: np.ndarray
    tcount: np.ndarray


def _layer_needs(t: _Traffic, sizes, L: int, n: int):
    """(staging need, messages), each [layers, ranks], with the tensors sent as :func:`_sizes`
    splits them."""
    big, small, small_al, nbig, nsmall = sizes
    tl, ts, td, staged, pairs = t.tl, t.ts, t.td, t.staged, t.pairs
    # stash rows, and the old content of small tensors' rows copied in phase C
    need = t.stash + t.tcount * small_al[:, None]
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


def _layer_budget(need, active, bound: int, reserve: int, auto: bool, transactional: bool) -> int:
    """The staging a round may use (``bound`` less ``reserve``); with the default bound
    (``auto``) raised to the largest layer's need where that is more. Raises
    :class:`StagingTooSmall` when a changed layer does not fit an explicit bound."""
    budget = bound - reserve
    worst = need.max(axis=1)
    if auto and active.size and worst[active].max() > budget:
        # default bound (one layer of local experts) below this rearrangement's minimum:
        # only with tiny rows, where alignment and row indices dominate; use the minimum
        budget = int(worst[active].max())
    for layer in active:
        if worst[layer] > budget:
            r = int(need[layer].argmax())
            # a staging_bytes every layer fits in (the largest need as laid out at this
            # bound): a caller bounding memory can retry with it rather than the default
            raise StagingTooSmall(
                f"staging_bytes={bound} is too small: layer {layer} needs "
                f"{int(worst[layer]) + bound - budget} bytes of staging on rank {r}"
                + (" (transactional)" if transactional else "")
                + "; raise staging_bytes (default: one layer of local experts)",
                int(worst[active].max()) + reserve,
            )
    return budget


def _group_rounds(active, need, msgs, budget: int, max_messages: int) -> list:
    """The changed layers, in order, grouped into rounds: a round closes before the layer
    that would take a rank's staging over ``budget`` or its messages over ``max_messages``."""
    n = need.shape[1]
    rounds = []
    cur: list = []
    acc = np.zeros(n, dtype=_I64)
    macc = np.zeros(n, dtype=_I64)
    for layer in active:
        if cur and (
            (acc + need[layer]).max() > budget or (macc + msgs[layer]).max() > max_messages
        ):
            rounds.append(cur)
            cur, acc, macc = [], np.zeros(n, dtype=_I64), np.zeros(n, dtype=_I64)
        cur.append(int(layer))
        acc += need[layer]
        macc += msgs[layer]
    if cur:
        rounds.append(cur)
    return rounds


@dataclass(frozen=True)
class CopyOrder:
    """How phase C runs the old-content copies of a rearrangement (global, the same on every
    rank), aligned with the plan's ``c_*`` arrays.

    Rows read by a copy of phase C and written by another form chains and cycles (a row is
    written by at most one copy). Walking up from a row to the row its content comes from gives
    each row a depth: 0 at the start of a chain, or at the smallest row of a cycle (which is
    cut there). A row that is written, read, and at a depth that is a multiple of ``waves``
    is *stashed*: phase A saves it to staging and its readers read the saved copy. A copy
    writing a row of depth ``d`` runs in wave ``0`` if ``d % waves == 0``, else
    ``waves - d % waves``: every copy runs after the copies that read the row it overwrites,
    a phase has at most ``waves`` waves, and about one row in ``waves`` of a long chain or
    cycle is copied once more (into the stash)."""

    ordered: np.ndarray  # per c copy: old content into a row read or live (phase C, ordered)
    wave: np.ndarray  # per c copy: its wave (-1: not ordered)
    from_stash: np.ndarray  # per c copy: reads its source from the stash
    stashed: np.ndarray  # per node (layer, rank, row) flattened: saved in phase A
    stash_rows: np.ndarray  # (layers, ranks): rows stashed
    count: np.ndarray  # (layers, ranks): ordered copies


def copy_order(plan: RearrangementPlan, transactional: bool, waves: int = DEFAULT_COPY_WAVES):
    """The :class:`CopyOrder` of ``plan`` (vectorised: pointer doubling over every row)."""
    L, n, P = plan.num_layers, plan.ep_size, plan.slots_per_rank
    N = L * n * P
    cl, cr, cs, cd, cn = (
        plan.c_layer,
        plan.c_rank,
        plan.c_src_row,
        plan.c_dst_row,
        plan.c_src_is_new,
    )
    stash_rows = np.zeros((L, n), dtype=_I64)
    count = np.zeros((L, n), dtype=_I64)
    wave = np.full(cl.size, -1, dtype=_I64)
    from_stash = np.zeros(cl.size, dtype=bool)
    stashed = np.zeros(N, dtype=bool)
    if cl.size:
        unsafe = (plan.changed if transactional else plan.source_needed).reshape(L, n, P)
        tc = ~cn & unsafe[cl, cr, cd]
        node = (cl * n + cr) * P
        src, dst = node[tc] + cs[tc], node[tc] + cd[tc]
        wave[tc], from_stash[tc], stashed = order_copies(src, dst, N, waves)
        np.add.at(count, (cl[tc], cr[tc]), 1)
        hit = np.flatnonzero(stashed)
        np.add.at(stash_rows, (hit // (n * P), hit // P % n), 1)
    else:
        tc = np.zeros(0, dtype=bool)
    return CopyOrder(tc, wave, from_stash, stashed, stash_rows, count)


def order_copies(src: np.ndarray, dst: np.ndarray, nodes: int, waves: int):
    """The rule of :class:`CopyOrder` for copies ``src[k] -> dst[k]`` among ``nodes`` rows
    (every ``dst`` distinct): (wave per copy, reads the stash per copy, stashed per row)."""
    parent = np.full(nodes, -1, dtype=_I64)
    parent[dst] = src
    depth = _depths(parent)
    read = np.zeros(nodes, dtype=bool)
    read[src] = True
    stashed = (parent >= 0) & read & (depth % waves == 0)
    r = depth[dst] % waves
    return np.where(r == 0, 0, waves - r), stashed[src], stashed


def phase_c_copies(plan: RearrangementPlan, transactional: bool, waves: int = DEFAULT_COPY_WAVES):
    """Per (layer, rank): (rows stashed, ordered copies) of phase C (see :class:`CopyOrder`)."""
    o = copy_order(plan, transactional, waves)
    return o.stash_rows, o.count


def _depths(parent: np.ndarray) -> np.ndarray:
    """Steps from every node up ``parent`` (node -> node, -1: none) to the start of its chain,
    or to the smallest node of its cycle (each cycle cut there)."""
    n = len(parent)
    p = np.where(parent >= 0, parent, np.arange(n, dtype=_I64))
    heads = _cycle_heads(parent)
    p[heads] = heads
    d = (p != np.arange(n)).astype(_I64)
    for _ in range(max(1, int(n).bit_length()) + 1):
        d = d + d[p]
        p = p[p]
    return d


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


def message_runs(peer: np.ndarray, src: np.ndarray, staged: np.ndarray, layer: np.ndarray):
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
    copies_c: list  # (src, j, dst, wave): phase C first, old content, by wave (CopyOrder)
    copies_new: list  # (src, dst): phase C last, duplicates of rows new in this layer
    send_msgs: list  # (peer, first src row, rows)
    recv_msgs: list  # (peer, first src row, first dst row, first j or -1, rows)


def _layer_works(sched: Schedule, rank: int, layers: list) -> dict:
    """This rank's transfers and copies for each of ``layers``: layer -> _LayerWork.

    Sorting and run detection are done once over all layers (numpy: :func:`_sorted_side`,
    :func:`_rank_copies`); only the per-layer lists are built in Python
    (:func:`_sends_by_layer`, :func:`_recvs_by_layer`, :func:`_copies_by_layer`).
    """
    plan, layout = sched.plan, sched.layout
    rv = plan.rank_view(rank)
    sl, sp, ss, _, _, s_starts, s_len = _sorted_side(
        sched, rv.s_layer, rv.s_peer, rv.s_src_row, rv.s_dst_row, None
    )
    rl, rp, rs, rd, staged_r, r_starts, r_len = _sorted_side(
        sched, rv.r_layer, rv.r_peer, rv.r_src_row, rv.r_dst_row, rank
    )
    order = sched.order
    assert order is not None  # build_schedule sets it
    cl, cs, cd, ckind, cwave, cstash = _rank_copies(plan, order, rank, rv)
    lay = np.asarray(layers, dtype=_I64)
    stashed = order.stashed.reshape(plan.num_layers, plan.ep_size, -1)[lay, rank]
    sends = _sends_by_layer(lay, sl, sp, ss, s_starts, s_len)
    recvs = _recvs_by_layer(lay, rl, rp, rs, rd, staged_r, r_starts, r_len)
    copies = _copies_by_layer(lay, cl, cs, cd, ckind, cwave, cstash, stashed)
    out = {}
    for layer, (s, s_msgs), (r, r_rows, r_msgs), (c_a, c_stash, c_c, c_new) in zip(
        layers, sends, recvs, copies, strict=True
    ):
        packed = bool(sched.packed[layer])
        big, small = split_row_tensors(layout.row_bytes[layer], packed, sched.pack_threshold)
        out[layer] = _LayerWork(
            layer, big, small, s, r, r_rows, c_a, c_stash, c_c, c_new, s_msgs, r_msgs
        )
    return out


def _sorted_side(sched: Schedule, layer, peer, src, dst, rank: int | None) -> tuple:
    """One side of a rank's transfers (``rank``: the receiving rank, None for the send side,
    where the peer receives), sorted by (layer, peer, source row, destination row): (layer,
    peer, src row, dst row, staged, starts, lengths), where ``staged`` says the transfer is
    received into staging and (starts, lengths) are its :func:`message_runs`.

    Per pair of ranks both sides list the transfers by (source row, destination row), and a
    run of transfers from consecutive source rows, all received into staging, travels as one
    message per tensor (k rows of the source tensor -> k staged rows). The receiver's staging
    decision comes from the global plan, so the sender breaks runs where the receiver does:
    a row is staged when it may not be written before phase C and its layer has tensors
    sent as their own messages."""
    plan, layout, thr = sched.plan, sched.layout, sched.pack_threshold
    P = plan.slots_per_rank
    nP = plan.ep_size * P
    # rows (of every rank) that may not be written before phase C, flat per layer
    unsafe_all = (plan.changed if sched.transactional else plan.source_needed).reshape(-1)
    nbig = np.where(sched.packed, _sizes(layout, True, thr)[3], _sizes(layout, False, thr)[3])
    o = np.lexsort((dst, src, peer, layer))
    layer, peer, src, dst = layer[o], peer[o], src[o], dst[o]
    to = peer if rank is None else rank
    staged = unsafe_all[layer * nP + to * P + dst] & (nbig > 0)[layer]
    starts, lengths = message_runs(peer, src, staged, layer)
    return layer, peer, src, dst, staged, starts, lengths


def _rank_copies(plan: RearrangementPlan, order: CopyOrder, rank: int, rv) -> tuple:
    """Rank ``rank``'s local copies (``rv``: its :meth:`~RearrangementPlan.rank_view`)
    sorted by layer (stable: the plan's order within a layer): (layer, src row, dst row, kind,
    wave, reads the stash), the last two from ``order``. Kind 0: duplicate of a new row
    (phase C last), 1: into a row nobody reads (phase A), 2: old content into a row that is
    read or live (phase C first, ordered)."""
    o = np.argsort(rv.c_layer, kind="stable")
    cl, cs, cd, cn = rv.c_layer[o], rv.c_src_row[o], rv.c_dst_row[o], rv.c_src_is_new[o]
    mine = np.flatnonzero(plan.c_rank == rank)[o]  # the same copies in the plan's order
    ckind = np.where(cn, 0, np.where(order.ordered[mine], 2, 1))
    return cl, cs, cd, ckind, order.wave[mine], order.from_stash[mine]


def _spans(keys: np.ndarray, lay: np.ndarray) -> np.ndarray:
    """``[len(lay), 2]``: the [start, end) of each layer of ``lay`` in the sorted ``keys``."""
    return np.stack([np.searchsorted(keys, lay), np.searchsorted(keys, lay, side="right")], 1)


def _sends_by_layer(lay, layer, peer, src, starts, lengths) -> list:
    """Per layer of ``lay``, from the send side of :func:`_sorted_side`: ((peer, src row) per
    transfer, (peer, first src row, rows) per message)."""
    spans = _spans(layer, lay)
    runs = np.searchsorted(starts, spans).tolist()
    peer, src, starts, lengths = peer.tolist(), src.tolist(), starts.tolist(), lengths.tolist()
    out = []
    for (a, b), (i0, i1) in zip(spans.tolist(), runs):
        sends = list(zip(peer[a:b], src[a:b]))
        msgs = [(peer[x], src[x], m) for x, m in zip(starts[i0:i1], lengths[i0:i1])]
        out.append((sends, msgs))
    return out


def _recvs_by_layer(lay, layer, peer, src, dst, staged, starts, lengths) -> list:
    """Per layer of ``lay``, from the receive side of :func:`_sorted_side`: ((peer, src row,
    dst row, j) per transfer, with j the row of the staged-receive blocks or -1 in place;
    the dst rows of the staged ones, by j; (peer, first src row, first dst row, first j,
    rows) per message)."""
    spans = _spans(layer, lay)
    runs = np.searchsorted(starts, spans).tolist()
    peer, src, dst, staged = peer.tolist(), src.tolist(), dst.tolist(), staged.tolist()
    starts, lengths = starts.tolist(), lengths.tolist()
    out = []
    for (a, b), (i0, i1) in zip(spans.tolist(), runs):
        recvs: list[tuple[int, int, int, int]] = []  # (peer, src row, dst row, staged index)
        recv_rows: list[int] = []
        for p, s, row, stg in zip(peer[a:b], src[a:b], dst[a:b], staged[a:b]):
            if stg:
                recvs.append((p, s, row, len(recv_rows)))
                recv_rows.append(row)
            else:
                recvs.append((p, s, row, -1))
        msgs = [recvs[x - a] + (m,) for x, m in zip(starts[i0:i1], lengths[i0:i1])]
        out.append((recvs, recv_rows, msgs))
    return out


def _copies_by_layer(lay, layer, src, dst, kind, wave, from_stash, stashed) -> list:
    """Per layer of ``lay``, from :func:`_rank_copies` (``stashed``: ``[len(lay), rows]``, the
    stash flags of this rank's rows): (phase A copies (src, dst); the rows saved into the
    stash blocks; phase C's ordered copies (src, stash block or -1, dst, wave) by (wave, src,
    from stash, dst); the copies of new rows (src, dst))."""
    cols = tuple(x.tolist() for x in (src, dst, kind, wave, from_stash))
    out = []
    for k, (a, b) in enumerate(_spans(layer, lay).tolist()):
        new, copies_a, tc = [], [], []
        for s, d, kd, wv, fs in zip(*(c[a:b] for c in cols)):
            if kd == 2:
                tc.append((wv, s, fs, d))
            elif kd == 1:
                copies_a.append((s, d))
            else:
                new.append((s, d))
        stash_src = np.flatnonzero(stashed[k]).tolist() if tc else []
        slot = {r: j for j, r in enumerate(stash_src)}
        copies_c = [(s, slot[s] if fs else -1, d, wv) for wv, s, fs, d in sorted(tc)]
        out.append((copies_a, stash_src, copies_c, new))
    return out


class _RoundBuilder:
    """Accumulates one rank's ops for one round: staging offsets, index ranges, op rows."""

    def __init__(self, layout: Layout, index_parts: list, index_pos: int) -> None:
        self.layout = layout
        self.cursor = 0
        self.parts = index_parts
        self.pos = index_pos
        self.kern: dict = {}  # (phase, kind, what) -> list of rows
        self.copies: dict = {}  # phase name -> list of [k, 5] row arrays
        self.msgs: dict[str, list] = {"s": [], "r": []}

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

    def copies_of(self, key, dst_buf, dst_off, src_buf, src_off, n) -> None:
        """Copies ``n`` bytes ``(src_buf, src_off) -> (dst_buf, dst_off)``, element by element
        of arrays of one shape (or scalars broadcast against them)."""
        cols = np.broadcast_arrays(
            *(np.asarray(x, dtype=_I64) for x in (dst_buf, dst_off, src_buf, src_off, n))
        )
        self.copies.setdefault(key, []).append(np.stack([c.reshape(-1) for c in cols], axis=1))

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
        a = np.concatenate(rows) if len(rows) > 1 else rows[0]
        if not len(a):
            return None
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
        st = RoundOps(ri, list(layers), [], None, None, [])  # type: ignore[arg-type]  # set below
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
    st = _stage_layer(b, w, rb)
    _lay_out_pre(b, w, rb, fb, st)
    _lay_out_messages(b, w, rb, fb, layer, st)
    _lay_out_post(b, w, rb, fb, st)


@dataclass
class _LayerStaging:
    """Where one layer's staged bytes and index ranges are (block offsets by tensor)."""

    recv_block: dict  # tensor -> staging offset of the received rows (big tensors)
    stash_block: dict  # tensor -> staging offset of the stashed rows (every tensor)
    recv_ix: int
    stash_ix: int
    copy_block: dict  # tensor -> staging offset of the old-content copies (small tensors)
    c_src_ix: int
    c_dst_ix: int
    packs: dict  # "s"/"r" -> (spans [(peer, first, count)], blocks by tensor, index, count)


def _stage_layer(b: _RoundBuilder, w: _LayerWork, rb) -> _LayerStaging:
    """Take the layer's staging blocks and index ranges, in the order the executor reads them."""
    ntens = len(rb)
    recv_block = {i: b.take(len(w.recv_rows) * rb[i]) for i in w.big} if w.recv_rows else {}
    stash_block = {i: b.take(len(w.stash_src) * rb[i]) for i in range(ntens)} if w.stash_src else {}
    recv_ix = b.index(w.recv_rows) if w.recv_rows else -1
    stash_ix = b.index(w.stash_src) if w.stash_src else -1
    copy_block, c_src_ix, c_dst_ix = {}, -1, -1
    if w.copies_c and w.small and not w.stash_src:
        copy_block = {i: b.take(len(w.copies_c) * rb[i]) for i in w.small}
        c_src_ix = b.index([c[0] for c in w.copies_c])
        c_dst_ix = b.index([c[2] for c in w.copies_c])
    packs = {}
    for tag, pairs in (("s", w.sends), ("r", [(p, d) for p, _, d, _ in w.recvs])):
        if w.small and pairs:
            packs[tag] = _pack(b, w, rb, pairs)
    return _LayerStaging(
        recv_block, stash_block, recv_ix, stash_ix, copy_block, c_src_ix, c_dst_ix, packs
    )


def _pack(b: _RoundBuilder, w: _LayerWork, rb, pairs) -> tuple:
    """The small tensors' rows to or from each peer, in one staging block per tensor."""
    by_peer: dict = {}
    for peer, row in pairs:
        by_peer.setdefault(peer, []).append(row)
    spans, rows, at = [], [], 0
    for peer, pr in by_peer.items():
        spans.append((peer, at, len(pr)))
        rows += pr
        at += len(pr)
    blocks = {i: b.take(at * rb[i]) for i in w.small}
    return spans, blocks, b.index(rows), at


def _pack_kernels(b: _RoundBuilder, w: _LayerWork, rb, fb: int, st: _LayerStaging, tag, key):
    """The small tensors' pack kernels (``key``) of the sends ("s": gather into the packed
    block) or receives ("r": scatter out of it), where this layer packs any."""
    if tag in st.packs:
        _, blocks, ix, cnt = st.packs[tag]
        for i in w.small:
            b.kernel(key, fb + i, ix, cnt, blocks[i], rb[i])


def _lay_out_pre(b: _RoundBuilder, w: _LayerWork, rb, fb: int, st: _LayerStaging) -> None:
    """Phase A: local copies into rows nobody reads; the stash; packed sends."""
    if w.copies_a:
        _row_copies(b, "a", np.asarray(w.copies_a, dtype=_I64), rb, fb, range(len(rb)))
    for i, off in st.stash_block.items():
        b.kernel(("pre", "gather", "stash"), fb + i, st.stash_ix, len(w.stash_src), off, rb[i])
    _pack_kernels(b, w, rb, fb, st, "s", ("pre", "gather", "pack"))


def _lay_out_messages(
    b: _RoundBuilder, w: _LayerWork, rb, fb: int, layer: int, st: _LayerStaging
) -> None:
    """Phase B: messages. Sends straight from the rows; receives into staging or (not
    transactional, rows nobody reads) straight into the rows. The remote end is filled where
    this rank knows it: a receive's source row on the sender (-1 until Schedule.linked
    otherwise)."""
    for peer, src, k in w.send_msgs:
        for i in w.big:
            b.msgs["s"].append((peer, fb + i, fb + i, src * rb[i], k * rb[i], -1, -1, layer))
    for peer, src, dst, j, k in w.recv_msgs:
        for i in w.big:
            if j < 0:
                here, off, n = fb + i, dst * rb[i], rb[i]
            else:
                here, off, n = STAGING, st.recv_block[i] + j * rb[i], k * rb[i]
            b.msgs["r"].append((peer, fb + i, here, off, n, fb + i, src * rb[i], layer))
    for tag in ("s", "r"):
        if tag not in st.packs:
            continue
        spans, blocks, _, _ = st.packs[tag]
        for peer, at, k in spans:
            for i in w.small:
                b.msgs[tag].append(
                    (peer, fb + i, STAGING, blocks[i] + at * rb[i], k * rb[i], -1, -1, layer)
                )


def _lay_out_post(b: _RoundBuilder, w: _LayerWork, rb, fb: int, st: _LayerStaging) -> None:
    """Phase C: old-content copies (small tensors through a staging block, the rest row by
    row in read-before-write order), staged receives into the rows, then duplicates of new
    rows."""
    if w.copies_c:
        nc = len(w.copies_c)
        for i, off in st.copy_block.items():
            b.kernel(("post", "gather", "copy"), fb + i, st.c_src_ix, nc, off, rb[i])
        _copy_waves(b, w, rb, fb, st)
        for i, off in st.copy_block.items():
            b.kernel(("post", "scatter", "copy"), fb + i, st.c_dst_ix, nc, off, rb[i])
    for i, off in st.recv_block.items():
        b.kernel(("post", "scatter", "recv"), fb + i, st.recv_ix, len(w.recv_rows), off, rb[i])
    _pack_kernels(b, w, rb, fb, st, "r", ("post", "scatter", "pack"))
    if w.copies_new:
        _row_copies(b, "new", np.asarray(w.copies_new, dtype=_I64), rb, fb, range(len(rb)))


def _row_copies(b: _RoundBuilder, key, pairs: np.ndarray, rb, fb: int, tensors) -> None:
    """Whole-row copies ``pairs[:, 0] -> pairs[:, 1]`` (rows of this rank) of ``tensors``."""
    t = np.asarray(list(tensors), dtype=_I64)
    r = np.asarray(rb, dtype=_I64)[t]
    src, dst = pairs[:, :1], pairs[:, 1:2]
    b.copies_of(key, fb + t, dst * r, fb + t, src * r, r)


def _copy_waves(b: _RoundBuilder, w: _LayerWork, rb, fb: int, st: _LayerStaging) -> None:
    """The row-by-row old-content copies, one op per wave of :class:`CopyOrder` (the copies
    of a wave are independent; the waves of every layer of the round run together)."""
    t = np.asarray([i for i in range(len(rb)) if i not in st.copy_block], dtype=_I64)
    if not t.size:
        return
    c = np.asarray(w.copies_c, dtype=_I64)  # (src, j, dst, wave)
    r = np.asarray(rb, dtype=_I64)[t]
    stash = np.asarray([st.stash_block.get(int(i), 0) for i in t], dtype=_I64)
    src, j, dst = c[:, :1], c[:, 1:2], c[:, 2:3]
    from_row = j < 0
    src_buf = np.where(from_row, fb + t, STAGING)
    src_off = np.where(from_row, src * r, stash + j * r)
    # every copy x tensor row at once, then cut by wave (copy-major within a wave, as one
    # copies_of call per wave would lay them out)
    shape = (len(c), len(t))
    cols = (fb + t, dst * r, src_buf, src_off, r)
    rows = np.stack([np.broadcast_to(x, shape) for x in cols], axis=2)
    order = np.argsort(c[:, 3], kind="stable")
    waves = c[order, 3]
    rows = rows[order]
    cut = np.flatnonzero(waves[1:] != waves[:-1]) + 1
    for chunk, wave in zip(np.split(rows, cut), waves[np.append(0, cut)].tolist()):
        b.copies.setdefault(("c", wave), []).append(chunk.reshape(-1, 5))


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
