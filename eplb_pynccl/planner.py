"""Rearrangement planner: which expert rows move where when an EPLB placement changes.

An engine holds, for each MoE layer, a weight tensor shaped ``[num_local_experts, ...]`` on
each of ``ep_size`` ranks. A *placement map* is an integer array ``[num_layers,
num_physical]`` giving the logical expert id held by every physical slot (``-1``: empty).
Slot ``s`` lives on rank ``s // P`` at local row ``s % P`` with
``P = num_physical // ep_size``.

:func:`plan_rearrangement` turns an old and a new map into a :class:`RearrangementPlan`:

* rows whose expert does not change, and rows whose new expert is ``-1``, are left alone;
* a changed row whose new expert the same rank already holds (in the old map) is a *local
  copy* of that row's old content (an unchanged holder row is preferred, then the lowest);
* otherwise the expert crosses the network, at most once per (layer, receiving rank): the
  lowest such row receives it and the rank's other rows needing it copy that row's *new*
  content (``src_is_new``);
* the sender is a rank holding the expert in the old map; when several do, senders are
  chosen greedily to balance the number of rows each rank sends (cumulative over layers,
  ties to the lower rank), preferring a holder on the receiver's node when
  ``ranks_per_node`` is given.

The planner is pure and deterministic: every rank computes the identical plan from the
same maps, with no communication. All of it is numpy-vectorised except the greedy choice
among several candidate senders, which loops in Python over just those requests.

:func:`eplb_pynccl.simulate.simulate_plan` applies a plan to a model of the ranks (content =
expert id per slot) and is what the tests use to check that a plan produces the new map.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from ._checks import check_count, check_ids, check_index, check_ranks_per_node, expert_map

__all__ = [
    "RankPlan",
    "RearrangementPlan",
    "plan_rearrangement",
    "plan_stages",
    "relay_map",
    "stage_maps",
]

_I64 = np.int64
_KEY_LIMIT = 1 << 62  # composite sort keys must stay below this to fit in int64


# ---------------------------------------------------------------------------------------
# data structures
# ---------------------------------------------------------------------------------------


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False, repr=False)
class RankPlan:
    """The part of a :class:`RearrangementPlan` that concerns one rank.

    Sends (``s_*``) are sorted by (layer, dst rank, dst row); receives (``r_*``) by
    (layer, src rank, dst row). For any pair of ranks and any layer, the sender's list of
    sends to the receiver and the receiver's list of receives from the sender are therefore
    in the same order, which is what per-pair point-to-point matching needs.

    Local copies (``c_*``) are sorted by (layer, dst row): copy row ``c_src_row`` into row
    ``c_dst_row``; ``c_src_is_new`` False reads the source row's *old* content, True its
    *new* content (after this layer's receives and old-content copies have landed).

    ``s_expert``, ``r_expert`` and ``c_expert`` (the logical expert id moved) are extras
    for logging and checking; the executor does not need them.
    """

    rank: int
    s_layer: np.ndarray
    s_peer: np.ndarray
    s_src_row: np.ndarray
    s_dst_row: np.ndarray
    r_layer: np.ndarray
    r_peer: np.ndarray
    r_src_row: np.ndarray
    r_dst_row: np.ndarray
    c_layer: np.ndarray
    c_src_row: np.ndarray
    c_dst_row: np.ndarray
    c_src_is_new: np.ndarray
    s_expert: np.ndarray
    r_expert: np.ndarray
    c_expert: np.ndarray

    @property
    def num_sends(self) -> int:
        return int(self.s_layer.shape[0])

    @property
    def num_recvs(self) -> int:
        return int(self.r_layer.shape[0])

    @property
    def num_copies(self) -> int:
        return int(self.c_layer.shape[0])

    def __repr__(self) -> str:
        return (
            f"RankPlan(rank={self.rank}, sends={self.num_sends}, recvs={self.num_recvs}, "
            f"copies={self.num_copies})"
        )


@dataclass(frozen=True, eq=False, repr=False)
class RearrangementPlan:
    """Everything that moves when the placement changes from ``old_map`` to ``new_map``.

    Network transfers (one expert row each; ``t_*``, int64 arrays of equal length) are
    sorted by (layer, src rank, dst rank, dst row). Local copies (``c_*``) are sorted by
    (layer, rank, dst row); ``c_src_is_new`` marks copies that read the source row's *new*
    content (the source row then receives the same expert over the network in the same
    layer, and its own op is never itself ``src_is_new``).

    ``source_needed[layer, slot]`` is True for rows whose *old* content is read by a send
    or an old-content local copy; an executor must read (or stage) those before it
    overwrites them. ``changed[layer, slot]`` is ``new != old and new != -1``: exactly the
    rows that are written. All arrays are read-only.
    """

    num_layers: int
    num_physical: int
    ep_size: int
    slots_per_rank: int
    t_layer: np.ndarray
    t_src_rank: np.ndarray
    t_src_row: np.ndarray
    t_dst_rank: np.ndarray
    t_dst_row: np.ndarray
    t_expert: np.ndarray
    c_layer: np.ndarray
    c_rank: np.ndarray
    c_src_row: np.ndarray
    c_dst_row: np.ndarray
    c_expert: np.ndarray
    c_src_is_new: np.ndarray
    source_needed: np.ndarray
    changed: np.ndarray

    @property
    def num_transfers(self) -> int:
        return int(self.t_layer.shape[0])

    @property
    def num_copies(self) -> int:
        return int(self.c_layer.shape[0])

    @property
    def is_empty(self) -> bool:
        """True when nothing moves (no transfers and no local copies)."""
        return self.num_transfers == 0 and self.num_copies == 0

    def rank_view(self, rank: int) -> RankPlan:
        """The sends, receives and local copies of one rank."""
        rank = check_index(rank, "rank", self.ep_size)
        # The plan order (layer, src, dst, dst_row) restricted to one src is
        # (layer, dst, dst_row); restricted to one dst it is (layer, src, dst_row).
        s = np.flatnonzero(self.t_src_rank == rank)
        r = np.flatnonzero(self.t_dst_rank == rank)
        c = np.flatnonzero(self.c_rank == rank)
        return RankPlan(
            rank=rank,
            s_layer=_frozen(self.t_layer[s]),
            s_peer=_frozen(self.t_dst_rank[s]),
            s_src_row=_frozen(self.t_src_row[s]),
            s_dst_row=_frozen(self.t_dst_row[s]),
            r_layer=_frozen(self.t_layer[r]),
            r_peer=_frozen(self.t_src_rank[r]),
            r_src_row=_frozen(self.t_src_row[r]),
            r_dst_row=_frozen(self.t_dst_row[r]),
            c_layer=_frozen(self.c_layer[c]),
            c_src_row=_frozen(self.c_src_row[c]),
            c_dst_row=_frozen(self.c_dst_row[c]),
            c_src_is_new=_frozen(self.c_src_is_new[c]),
            s_expert=_frozen(self.t_expert[s]),
            r_expert=_frozen(self.t_expert[r]),
            c_expert=_frozen(self.c_expert[c]),
        )

    def sent_per_rank(self) -> np.ndarray:
        """``[ep_size]``: number of expert rows each rank sends over the network."""
        return np.bincount(self.t_src_rank, minlength=self.ep_size).astype(_I64)

    def received_per_rank(self) -> np.ndarray:
        """``[ep_size]``: number of expert rows each rank receives over the network."""
        return np.bincount(self.t_dst_rank, minlength=self.ep_size).astype(_I64)

    def layer_ranks_involved(self, layer: int) -> np.ndarray:
        """Sorted rank ids that send, receive or copy anything in ``layer``."""
        layer = check_index(layer, "layer", self.num_layers)
        t = self.t_layer == layer
        c = self.c_layer == layer
        hit = np.zeros(self.ep_size, dtype=bool)
        hit[self.t_src_rank[t]] = True
        hit[self.t_dst_rank[t]] = True
        hit[self.c_rank[c]] = True
        return np.flatnonzero(hit).astype(_I64)

    def equals(self, other: RearrangementPlan) -> bool:
        """Field-by-field equality (arrays compared by value and dtype)."""
        if not isinstance(other, RearrangementPlan):
            return False
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    def __repr__(self) -> str:
        return (
            f"RearrangementPlan(num_layers={self.num_layers}, "
            f"num_physical={self.num_physical}, ep_size={self.ep_size}, "
            f"transfers={self.num_transfers}, copies={self.num_copies})"
        )


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


# The rules live in _checks; placement.py still imports these names from here.
_as_map = expert_map
_check_ids = check_ids


def _index(value, name: str) -> int:
    return check_count(value, name, minimum=None)


def _two_maps(old_map, new_map):
    """Both maps as int64 [L, N], of the same shape."""
    old = expert_map(old_map, "old_map")
    new = expert_map(new_map, "new_map")
    if old.shape != new.shape:
        raise ValueError(
            "old_map and new_map must have the same shape, got "
            f"{tuple(old.shape)} and {tuple(new.shape)}"
        )
    return old, new


# ---------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------


def plan_rearrangement(
    old_map,
    new_map,
    ep_size: int,
    *,
    ranks_per_node: int | None = None,
    num_logical: int | None = None,
) -> RearrangementPlan:
    """Plan the expert moves that turn placement ``old_map`` into ``new_map``.

    Args:
        old_map, new_map: integer arrays ``[num_layers, num_physical]`` (numpy, torch or
            nested lists), slot -> logical expert id, ``-1`` = empty.
        ep_size: number of expert-parallel ranks; must divide ``num_physical``.
        ranks_per_node: EP ranks per node (at most ``ep_size``; the last node may hold
            fewer); when given, a sender on the receiver's node (``rank // ranks_per_node``)
            is preferred over load balance.
        num_logical: when given, every id must be below it.

    Returns:
        The :class:`RearrangementPlan`; identical on every rank for the same inputs.

    Raises:
        TypeError: a map that is not an integer array, a non-integer ``ep_size`` etc.
        ValueError: bad shapes, ids out of range, ``num_physical`` not divisible by
            ``ep_size``, or an expert the new map needs in a layer that the old map holds
            nowhere in that layer.
    """
    ep = check_count(ep_size, "ep_size")
    rpn = check_ranks_per_node(ranks_per_node, ep)
    nlog = None if num_logical is None else check_count(num_logical, "num_logical")
    old, new = _two_maps(old_map, new_map)
    num_layers, num_physical = old.shape
    if num_physical == 0:
        raise ValueError("num_physical must be >= 1, got 0 (the maps have no slots)")
    if num_physical % ep:
        raise ValueError(f"num_physical ({num_physical}) is not divisible by ep_size ({ep})")
    check_ids(old, "old_map", nlog)
    check_ids(new, "new_map", nlog)
    return _plan(old, new, ep, rpn)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Bool mask: True where a run of equal keys starts."""
    first = np.empty(sorted_keys.shape[0], dtype=bool)
    if first.shape[0]:
        first[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return first


def _plan(old: np.ndarray, new: np.ndarray, ep: int, rpn: int | None) -> RearrangementPlan:
    """The plan of ``old -> new`` (checked int64 maps ``[L, N]``, ``N`` divisible by ``ep``).

    Steps: the best old row holding each (layer, rank, expert) (:func:`_holders`); each
    changed row's source, a local copy or the network (:func:`_changed_rows`); a sender for
    every row received over the network (:func:`_senders`); then the plan's arrays.
    """
    L, N = old.shape
    P = N // ep
    oldf = old.ravel()
    newf = new.ravel()
    changed = (newf != oldf) & (newf != -1)
    oldc, newc, E = _expert_codes(oldf, newf, L, ep, P)
    h_key, h_row = _holders(oldc, oldf, newf, P, E)
    ch = _changed_rows(changed, newc, P, E, h_key, h_row)

    q_f = ch.fc[ch.recv]  # the receiving rows, in slot order
    q_lr = ch.lr[ch.recv]
    q_l = q_lr // ep
    q_dst = q_lr - q_l * ep
    q_row = ch.row[ch.recv]
    q_expert = newf[q_f]
    t_src, t_srow = _senders(h_key, h_row, L, ep, P, E, rpn, q_l, q_dst, q_row, newc[q_f], q_expert)

    t_layer, t_src_rank, t_src_row, t_dst_rank, t_dst_row, t_expert = _transfers(
        ep, P, q_l, t_src, t_srow, q_dst, q_row, q_expert
    )
    c_layer, c_rank, c_src_row, c_dst_row, c_expert, c_src_is_new = _copies(ch, newf, ep)
    needed = _source_needed(L, N, P, t_layer, t_src_rank, t_src_row, ch)
    return RearrangementPlan(
        num_layers=int(L),
        num_physical=int(N),
        ep_size=int(ep),
        slots_per_rank=int(P),
        t_layer=_frozen(t_layer),
        t_src_rank=_frozen(t_src_rank),
        t_src_row=_frozen(t_src_row),
        t_dst_rank=_frozen(t_dst_rank),
        t_dst_row=_frozen(t_dst_row),
        t_expert=_frozen(t_expert),
        c_layer=_frozen(c_layer),
        c_rank=_frozen(c_rank),
        c_src_row=_frozen(c_src_row),
        c_dst_row=_frozen(c_dst_row),
        c_expert=_frozen(c_expert),
        c_src_is_new=_frozen(c_src_is_new),
        source_needed=_frozen(needed),
        changed=_frozen(changed.reshape(L, N)),
    )


def _expert_codes(oldf: np.ndarray, newf: np.ndarray, L: int, ep: int, P: int):
    """(old codes, new codes, E): the expert ids of the flat maps as codes in ``[0, E)`` (-1
    stays -1) for the composite sort keys: the ids themselves when the keys fit in int64,
    else dense codes (only for absurdly sparse ids)."""
    max_id = int(max(oldf.max(), newf.max())) if oldf.size else -1
    E = max_id + 1 if max_id >= 0 else 1
    if (L + 1) * (ep + 1) * (E + 1) * 2 * (P + 1) < _KEY_LIMIT:
        return oldf, newf, E
    uniq, inv = np.unique(np.concatenate([oldf, newf]), return_inverse=True)
    inv = inv.astype(_I64)
    if uniq[0] == -1:
        inv -= 1
    return inv[: oldf.size], inv[oldf.size :], max(int(uniq.size), 1)


def _holders(oldc: np.ndarray, oldf: np.ndarray, newf: np.ndarray, P: int, E: int):
    """(keys, rows): every (layer, rank, expert) that the old map holds, as the sorted unique
    keys ``lr * E + e`` (``lr = layer * ep + rank``, the flat slot index ``// P``), and the
    best row holding it: the lowest row that keeps its expert, else the lowest row."""
    fo = np.flatnonzero(oldc != -1)
    lr_o = fo // P
    prio = (newf[fo] != oldf[fo]).astype(_I64)  # 0: the row keeps its expert (preferred)
    sv = ((lr_o * E + oldc[fo]) * 2 + prio) * P + (fo - lr_o * P)
    sv.sort()
    k = sv // (2 * P)
    first = _group_starts(k)
    return k[first], sv[first] % P


class _ChangedRows(NamedTuple):
    """The changed rows of a plan (new expert not -1 and not the old one), in slot order."""

    fc: np.ndarray  # flat slot index, layer * N + rank * P + row
    lr: np.ndarray  # layer * ep + rank
    row: np.ndarray  # row on its rank
    local: np.ndarray  # its rank holds the expert in old content: a copy from the holder row
    copy_src: np.ndarray  # source row of the copies (local and is_new); unset elsewhere
    is_copy: np.ndarray  # filled by a copy on its rank (local, or a duplicate of a received row)
    is_new: np.ndarray  # a copy of a row received over the network in this rearrangement
    recv: np.ndarray  # positions of the rows received over the network, in slot order


def _changed_rows(changed, newc, P: int, E: int, h_key, h_row) -> _ChangedRows:
    """Each changed row's source: a local copy from the holder row (:func:`_holders`) when its
    rank holds the expert in old content; otherwise the network (:func:`_network_rows`)."""
    fc = np.flatnonzero(changed)
    lr_c = fc // P
    row_c = fc - lr_c * P
    key_c = lr_c * E + newc[fc]
    if h_key.size:
        pos = np.searchsorted(h_key, key_c)
        np.minimum(pos, h_key.size - 1, out=pos)
        local = h_key[pos] == key_c
    else:
        pos = np.zeros(fc.size, dtype=_I64)
        local = np.zeros(fc.size, dtype=bool)

    copy_src = np.empty(fc.size, dtype=_I64)
    copy_src[local] = h_row[pos[local]]
    is_copy = local.copy()
    is_new = np.zeros(fc.size, dtype=bool)
    dup_pos, dup_src, recv = _network_rows(key_c, local, row_c)
    copy_src[dup_pos] = dup_src
    is_copy[dup_pos] = True
    is_new[dup_pos] = True
    return _ChangedRows(fc, lr_c, row_c, local, copy_src, is_copy, is_new, recv)


def _network_rows(key_c: np.ndarray, local: np.ndarray, row_c: np.ndarray):
    """The changed rows that are not local copies, grouped by (layer, rank, expert)
    (``key_c``): the lowest row of a group receives over the network, the others copy it.
    Returns (positions of those copies, their source rows, positions of the receiving rows
    in slot order), positions into the changed rows."""
    net = np.flatnonzero(~local)  # positions in fc (slot order)
    kn = key_c[net]
    order = np.argsort(kn, kind="stable")
    starts = _group_starts(kn[order])
    lead = order[np.maximum.accumulate(np.where(starts, np.arange(order.size), 0))]
    dup = ~starts
    return net[order[dup]], row_c[net[lead[dup]]], net[np.sort(order[starts])]


def _candidates(h_key: np.ndarray, h_row: np.ndarray, ep: int, P: int, E: int):
    """The holders of :func:`_holders` sorted by (layer, expert, rank): (``layer * E +
    expert``, rank, row) of each, the candidate senders of that (layer, expert)."""
    lr_h = h_key // E
    e_h = h_key - lr_h * E
    l_h = lr_h // ep
    r_h = lr_h - l_h * ep
    sv2 = ((l_h * E + e_h) * ep + r_h) * P + h_row
    sv2.sort()
    return sv2 // (ep * P), (sv2 // P) % ep, sv2 % P


def _senders(h_key, h_row, L, ep, P, E, rpn, q_l, q_dst, q_row, q_code, q_expert):
    """(rank, row) sending each network receive (layer ``q_l``, rank ``q_dst``, row
    ``q_row``, expert code ``q_code``): its only candidate (:func:`_candidates`), or the
    choice of :func:`_choose_senders` among several. Raises ValueError for an expert that
    the old map holds nowhere in the layer (``q_expert``: the ids, for the message)."""
    g2, hs_rank, hs_row = _candidates(h_key, h_row, ep, P, E)
    gq = q_l * E + q_code
    lo = np.searchsorted(g2, gq, side="left")
    hi = np.searchsorted(g2, gq, side="right")
    cnt = hi - lo
    if cnt.size and int(cnt.min()) == 0:
        i = int(np.argmax(cnt == 0))
        raise ValueError(
            f"layer {int(q_l[i])}: new_map needs expert {int(q_expert[i])}, "
            "which old_map holds nowhere"
        )
    sel = lo.copy()
    multi = np.flatnonzero(cnt > 1)
    if multi.size:
        sel[multi] = _choose_senders(L, ep, rpn, q_l, q_dst, q_row, lo, hi, multi, hs_rank)
    return hs_rank[sel], hs_row[sel]


def _transfers(ep: int, P: int, q_l, t_src, t_srow, q_dst, q_row, q_expert):
    """The network transfers in the plan's order, (layer, src rank, dst rank, dst row):
    (layer, src rank, src row, dst rank, dst row, expert)."""
    torder = np.argsort(((q_l * ep + t_src) * ep + q_dst) * P + q_row, kind="stable")
    return (
        q_l[torder],
        t_src[torder],
        t_srow[torder],
        q_dst[torder],
        q_row[torder],
        q_expert[torder],
    )


def _copies(ch: _ChangedRows, newf: np.ndarray, ep: int):
    """The local copies in slot order, (layer, rank, dst row): (layer, rank, src row, dst row,
    expert, source is new)."""
    cp = np.flatnonzero(ch.is_copy)
    c_lr = ch.lr[cp]
    c_layer = c_lr // ep
    c_rank = c_lr - c_layer * ep
    return c_layer, c_rank, ch.copy_src[cp], ch.row[cp], newf[ch.fc[cp]], ch.is_new[cp]


def _source_needed(L: int, N: int, P: int, t_layer, t_src_rank, t_src_row, ch: _ChangedRows):
    """``[L, N]`` bool: the slots whose old content is read, by a transfer or a local copy."""
    needed = np.zeros(L * N, dtype=bool)
    needed[t_layer * N + t_src_rank * P + t_src_row] = True
    lp = np.flatnonzero(ch.local)
    needed[ch.lr[lp] * P + ch.copy_src[lp]] = True
    return needed.reshape(L, N)


def _choose_senders(L, ep, rpn, q_l, q_dst, q_row, lo, hi, multi, hs_rank) -> np.ndarray:
    """Greedy sender choice for requests with several candidate holders.

    Loads count rows sent per rank, cumulative over layers. Within a layer, the sends with
    a single candidate (including those left with one after the node filter) are counted
    first; then requests go in order of (number of candidates, dst rank, dst row), each
    to the least-loaded candidate, ties to the lower rank. Returns the chosen index into
    the holder arrays for each request in ``multi``.
    """
    forced = np.ones(q_l.size, dtype=bool)
    forced[multi] = False
    fl = np.bincount(q_l[forced] * ep + hs_rank[lo[forced]], minlength=L * ep)
    cum = np.cumsum(fl.reshape(L, ep), axis=0)  # forced loads through each layer

    ml = q_l[multi].tolist()
    mlo = lo[multi].tolist()
    mhi = hi[multi].tolist()
    mdst = q_dst[multi].tolist()
    mrow = q_row[multi].tolist()
    rank_of = hs_rank.tolist()
    extra = [0] * ep  # greedy-chosen sends so far, all layers
    choice = [0] * len(ml)
    n = len(ml)
    i = 0
    while i < n:
        layer = ml[i]
        j = i
        while j < n and ml[j] == layer:
            j += 1
        load = [a + b for a, b in zip(cum[layer].tolist(), extra, strict=True)]
        todo = []
        for m in range(i, j):
            cands = list(range(mlo[m], mhi[m]))
            if rpn is not None:
                node = mdst[m] // rpn
                near = [c for c in cands if rank_of[c] // rpn == node]
                if near:
                    cands = near
            if len(cands) == 1:
                c = cands[0]
                choice[m] = c
                load[rank_of[c]] += 1
                extra[rank_of[c]] += 1
            else:
                todo.append((len(cands), mdst[m], mrow[m], m, cands))
        todo.sort(key=lambda t: t[:4])
        for _, _, _, m, cands in todo:
            best = cands[0]
            best_load = load[rank_of[best]]
            for c in cands[1:]:  # candidates ascend by rank: strict < keeps the lower rank
                v = load[rank_of[c]]
                if v < best_load:
                    best, best_load = c, v
            choice[m] = best
            load[rank_of[best]] += 1
            extra[rank_of[best]] += 1
        i = j
    return np.asarray(choice, dtype=_I64)


# ---------------------------------------------------------------------------------------
# node-level dedupe: an expert crosses the network once per node
# ---------------------------------------------------------------------------------------


def relay_map(old_map, new_map, ep_size: int, ranks_per_node: int) -> np.ndarray | None:
    """The intermediate placement of node-level dedupe, or None when nothing would change.

    When ``k > 1`` ranks of a node need expert ``e`` in a layer over the network (no rank of
    their node holds it in ``old_map``, and none of them holds it on its own rank), one of
    them, the *relay*, receives it from another node in the first stage; the others keep
    their old rows in the intermediate map and take ``e`` from a holder on their node (the
    relay, or any rank of the node that holds it by then) in the second stage, over NVLink.
    The relay of a group is the rank of it with the fewest network fetches so far in that
    layer (see ``_choose_relays``), so the fetches spread over the node's NICs. The
    intermediate map equals ``new_map`` except at those followers' rows, where
    it is ``old_map``; it holds every expert ``new_map`` holds, so it is itself a valid
    placement (an engine may serve from it between the stages).
    """
    ep, rpn, old, new = _relay_inputs(old_map, new_map, ep_size, ranks_per_node)
    L, N = old.shape
    P = N // ep
    nodes = -(-ep // rpn)
    E = int(max(old.max(initial=-1), new.max(initial=-1))) + 1
    if E == 0 or nodes == 1:
        return None
    slot = np.arange(N, dtype=_I64)
    rank = slot // P
    node = rank // rpn
    lay = np.repeat(np.arange(L, dtype=_I64), N)
    oldf, newf = old.ravel(), new.ravel()
    rk, nd = np.tile(rank, L), np.tile(node, L)
    held = oldf >= 0
    on_node = _distinct(((lay * nodes + nd) * E + oldf)[held])
    on_rank = _distinct(((lay * ep + rk) * E + oldf)[held])
    ch = np.flatnonzero((newf != oldf) & (newf >= 0))
    e = newf[ch]
    kn = (lay[ch] * nodes + nd[ch]) * E + e
    kr = (lay[ch] * ep + rk[ch]) * E + e
    net = ~_member(kn, on_node) & ~_member(kr, on_rank)
    ch, kn, kr, e = ch[net], kn[net], kr[net], e[net]
    if ch.size == 0:
        return None
    # distinct receiving ranks per (layer, node, expert) group
    ranks_in = _distinct(kn * ep + rk[ch])  # sorted by group, then rank
    grp = ranks_in // ep
    first = _group_starts(grp)
    gid = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    size = np.diff(np.append(starts, grp.size))
    k = size[gid]
    relay = _choose_relays(ranks_in % ep, grp // (nodes * E), starts, size, ep)
    follower = (k > 1) & ~relay
    if not follower.any():
        return None
    fkey = ranks_in[follower]  # (layer, node, expert, rank) of followers
    is_f = _member(kn * ep + rk[ch], fkey)
    mid = newf.copy()
    mid[ch[is_f]] = oldf[ch[is_f]]
    return mid.reshape(L, N)


def _relay_inputs(old_map, new_map, ep_size, ranks_per_node):
    """relay_map's arguments checked: ep_size, ranks_per_node and the two maps (ids checked,
    slots a positive multiple of ep_size)."""
    ep = check_count(ep_size, "ep_size")
    rpn = check_count(ranks_per_node, "ranks_per_node")
    old, new = _two_maps(old_map, new_map)
    N = old.shape[1]
    if N == 0 or N % ep:
        raise ValueError(f"num_physical ({N}) is not a positive multiple of ep_size ({ep})")
    check_ids(old, "old_map", None)
    check_ids(new, "new_map", None)
    return ep, rpn, old, new


def _choose_relays(rank, layer, starts, size, ep: int) -> np.ndarray:
    """Per (layer, node, expert) group of receiving ranks: which one fetches over the network.

    The NIC of a GPU that must fetch alone (a group of one) is loaded first; then, per layer,
    the larger groups first, each relay is the group's rank with the fewest fetches so far
    (ties to the lower rank), so the fetches spread over the node's NICs."""
    relay = np.zeros(rank.size, dtype=bool)
    single = starts[size == 1]
    relay[single] = True
    load = np.zeros((int(layer.max()) + 1 if layer.size else 0, ep), dtype=_I64)
    np.add.at(load, (layer[single], rank[single]), 1)
    multi = np.flatnonzero(size > 1)
    order = multi[np.lexsort((starts[multi], -size[multi], layer[starts[multi]]))]
    rank_l = rank.tolist()
    for g in order.tolist():
        a, n = int(starts[g]), int(size[g])
        row = load[int(layer[a])]
        cand = rank_l[a : a + n]  # ascending ranks
        best = min(range(n), key=lambda j: (row[cand[j]], j))
        relay[a + best] = True
        row[cand[best]] += 1
    return relay


def _member(a: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(a.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, a), sorted_keys.size - 1)
    return sorted_keys[pos] == a


def _distinct(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)
    if a.size:
        a = a[np.append(True, a[1:] != a[:-1])]
    return a


def _dedupe_mode(value):
    """``node_dedupe``: a bool (numpy's too) or ``"auto"``; 1, 0 or other truthy values are
    refused rather than taken for a mode."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "auto":
        return value
    raise ValueError(f"node_dedupe must be False, True or 'auto', got {value!r}")


def plan_stages(
    old_map,
    new_map,
    ep_size: int,
    *,
    ranks_per_node: int | None = None,
    node_dedupe=False,
    row_bytes=None,
    cluster=None,
    transport: str = "nccl",
) -> list:
    """The rearrangement as a list of stages ``(from_map, to_map, plan)``, run in order.

    ``node_dedupe=False`` (default): one stage, :func:`plan_rearrangement`. ``True``: two
    stages through :func:`relay_map` when it changes anything (an expert that several ranks
    of a node need from another node crosses the network once, then goes over NVLink from
    the relay). ``"auto"``: two stages only where the time model
    (:func:`eplb_pynccl.estimate.estimate_stages`) on ``cluster`` with ``row_bytes`` says
    they are faster. Each stage is a complete rearrangement (every layer ends the stage
    entirely in its ``to_map``), so each is executed and checked as one.
    """
    node_dedupe = _dedupe_mode(node_dedupe)
    one = [
        (
            old_map,
            new_map,
            plan_rearrangement(old_map, new_map, ep_size, ranks_per_node=ranks_per_node),
        )
    ]
    if node_dedupe is False:
        return one
    if ranks_per_node is None:
        raise ValueError("node_dedupe needs ranks_per_node (the EP ranks of one node)")
    mid = relay_map(old_map, new_map, ep_size, ranks_per_node)
    if mid is None:
        return one
    two = [
        (old_map, mid, plan_rearrangement(old_map, mid, ep_size, ranks_per_node=ranks_per_node)),
        (mid, new_map, plan_rearrangement(mid, new_map, ep_size, ranks_per_node=ranks_per_node)),
    ]
    if node_dedupe is True:
        return two
    if cluster is None or row_bytes is None:
        raise ValueError("node_dedupe='auto' needs cluster and row_bytes (for the time model)")
    from .estimate import estimate_stages

    t1 = estimate_stages(one, row_bytes, cluster=cluster, transport=transport).seconds
    t2 = estimate_stages(two, row_bytes, cluster=cluster, transport=transport).seconds
    return two if t2 < t1 else one


def stage_maps(
    old_map,
    new_map,
    ep_size: int,
    *,
    ranks_per_node: int,
    node_dedupe=True,
    row_bytes=None,
    cluster=None,
    transport: str = "nccl",
) -> list:
    """The placements a deduplicated rearrangement passes through: ``[old_map, mid, new_map]``
    (two stages, ``mid`` from :func:`relay_map`) or ``[old_map, new_map]`` (one: nothing to
    dedupe, or ``node_dedupe="auto"`` found one stage faster). Arguments as
    :func:`plan_stages`, whose stages these are (``ranks_per_node`` is required here).

    Run them as successive rearrangements on every rank, with a shuffler made with the same
    ``ranks_per_node`` (its planner then takes each relayed expert from the relay on the
    receiver's node, over NVLink)::

        maps = stage_maps(old, new, ep, ranks_per_node=8)
        for a, b in zip(maps, maps[1:]):
            shuffler.rearrange(a, b)          # or rearrange_async(a, b) ... wait()

    Each stage is a whole rearrangement with the shuffler's guarantees; every intermediate
    map holds every expert of ``new_map``, so an engine may serve from it between stages
    (its expert-to-slot table must follow each stage's ``to`` map)."""
    rpn = check_count(ranks_per_node, "ranks_per_node")
    node_dedupe = _dedupe_mode(node_dedupe)
    if node_dedupe is True:  # the maps only: the shuffler plans each stage itself
        mid = relay_map(old_map, new_map, ep_size, rpn)
        return [old_map, new_map] if mid is None else [old_map, mid, new_map]
    stages = plan_stages(
        old_map,
        new_map,
        ep_size,
        ranks_per_node=rpn,
        node_dedupe=node_dedupe,
        row_bytes=row_bytes,
        cluster=cluster,
        transport=transport,
    )
    return [stages[0][0]] + [b for _, b, _ in stages]
