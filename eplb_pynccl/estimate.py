"""A time model of a rearrangement on a described :class:`~eplb_pynccl.cluster.Cluster`.

:func:`estimate_rearrangement` builds the schedule the executor would run (the planner and
:func:`~eplb_pynccl.schedule.build_schedule`, unchanged) and times it:

* every message of a round is placed on the links it uses: NVLink (both ends on one node;
  a copy engine of the receiver for the one-sided ``"ipc"`` transport) or the sender's and
  the receiver's NICs (the ends on different nodes);
* a link's time in a round is its bytes over its rate plus a per-message cost; with
  ``Cluster.split_channels`` an NVLink pair gets ``1/k`` of the GPU's rate when the GPU has
  ``k`` NVLink peers in that round (NCCL gives each peer its own channels), so a GPU's
  time is its slowest pair's; a NIC's time is the sum over the GPUs behind it;
* the round's exchange is its busiest link (over every GPU, NIC and direction); the local
  work before it (packing gathers, the stash) and after it (staged receives scattered, local
  copies) is the busiest rank's bytes over ``local_bw`` plus ``local_op`` per copy or kernel;
* the host enqueues a round while the GPU finishes the previous one: a round takes the larger
  of its host time (``per_round`` + ``per_op`` per message + ``per_copy`` per copy, busiest
  rank) and its GPU time (local before + exchange + local after);
* rounds run one after another (the executor launches round k+1 once round k's staging is
  free), plus the transport's set-up once (fixed, plus a cost per message end and per
  local row copy of the slowest rank, plus planning per message end).

:func:`estimate_vllm_style` models the baseline the bench compares with (vLLM's exchange):
one layer at a time, one P2POp per expert per tensor in one ``batch_isend_irecv``, receives
into a one-layer buffer, copied back row by row; its host enqueues every op before the group
starts, so host and GPU add up.

Everything is numpy over all layers and ranks at once (no per-rank schedules are built);
:func:`round_messages` gives the per-(round, sender, receiver) messages and bytes that the
timing uses, and the tests check them against every rank's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ._checks import check_count
from .cluster import Cluster
from .planner import RearrangementPlan, plan_rearrangement
from .schedule import (
    DEFAULT_PACK_THRESHOLD,
    Layout,
    Schedule,
    build_schedule,
    message_runs,
    phase_c_copies,
    split_row_tensors,
)

__all__ = [
    "RESOURCES",
    "RearrangementEstimate",
    "estimate_rearrangement",
    "estimate_schedule",
    "estimate_stages",
    "estimate_vllm_style",
    "predict_eplb_row",
    "round_messages",
]

_I64 = np.int64
# what can bind a round: the host, local copies before/after the exchange, NVLink, a copy
# engine, a NIC
RESOURCES = ("host", "local", "nvlink", "copy_engine", "nic")
_SCHEDULE_OPTS = {
    "staging_bytes",
    "pack_threshold",
    "transactional",
    "max_messages_per_round",
    "ranks_per_node",
}
_TRANSPORTS = ("nccl", "ipc")
# host seconds per message (send or receive) of the shuffler's launch over TorchTransport:
# run F's host_launch_ms / messages_max of its eplb_pynccl/torch-nccl rows, 24.85 ms / 660
# (DeepSeek-V3 EP4) and 23.79 ms / 634 (Qwen3 EP4): 37.6 us, against 17.1 us per op that
# torch's batch_isend_irecv costs alone (4 KiB ops, the overhead part)
TORCH_TRANSPORT_PER_MESSAGE = 37.6e-6


@dataclass(frozen=True, eq=False)
class RearrangementEstimate:
    """The modelled time of one rearrangement (seconds, bytes).

    ``seconds``: total; ``seconds_per_layer``: total over the layers that change;
    ``nvlink_bytes`` / ``network_bytes``: bytes moved over NVLink (or copy engines) and over
    the network, summed over the cluster; ``network_bytes_per_node``: bytes each node
    receives over the network; ``busiest_gpu_bytes``: the most bytes any GPU sends or
    receives; ``rounds``: number of rounds; ``round_seconds``; ``critical``: the resource
    that sets each round's time (one of :data:`RESOURCES`); ``parts``: per round, the time of
    each resource (``host``, ``local``, ``nvlink``, ``copy_engine``, ``nic``, ``gpu``)."""

    seconds: float
    seconds_per_layer: float
    nvlink_bytes: int
    network_bytes: int
    network_bytes_per_node: np.ndarray
    busiest_gpu_bytes: int
    rounds: int
    round_seconds: np.ndarray
    critical: tuple
    layers_moved: int
    messages: int
    setup_seconds: float = 0.0
    parts: dict = field(default_factory=dict, repr=False)
    stages: int = 1

    def share(self) -> dict:
        """Fraction of rounds bound by each resource."""
        n = max(len(self.critical), 1)
        return {r: sum(c == r for c in self.critical) / n for r in RESOURCES}

    @property
    def max_network_bytes_per_node(self) -> int:
        a = self.network_bytes_per_node
        return int(a.max()) if a.size else 0


# ---- inputs --------------------------------------------------------------------------------------


def _row_bytes(row_bytes, num_layers: int):
    """``row_bytes`` per layer: a list of per-layer lists, or one list used for every layer."""
    rb = list(row_bytes)
    if rb and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in rb):
        return [list(rb)] * num_layers
    return rb


def _check_cluster(cluster, ep: int) -> Cluster:
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    if ep > cluster.world_size:
        raise ValueError(
            f"ep_size ({ep}) is larger than the cluster's {cluster.world_size} GPUs "
            f"({cluster.nodes} nodes of {cluster.gpus_per_node}); use Cluster.preset(..., "
            "nodes=...)"
        )
    return cluster


def _check_transport(transport) -> str:
    if transport not in _TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(_TRANSPORTS)}, got {transport!r}")
    return transport


# ---- messages of every round, vectorised --------------------------------------------------------


def _layer_tensor_sizes(sched: Schedule):
    """Per layer: (bytes of one row of its unpacked tensors, their count, of the packed ones,
    their count, of all tensors, number of tensors of >= 1 MiB rows)."""
    L = sched.layout.num_layers
    thr = sched.pack_threshold
    out = [np.zeros(L, dtype=_I64) for _ in range(6)]
    for layer, rb in enumerate(sched.layout.row_bytes):
        b_ids, s_ids = split_row_tensors(rb, bool(sched.packed[layer]), thr)
        out[0][layer] = sum(rb[i] for i in b_ids)
        out[1][layer] = len(b_ids)
        out[2][layer] = sum(rb[i] for i in s_ids)
        out[3][layer] = len(s_ids)
        out[4][layer] = sum(rb)
        out[5][layer] = sum(1 for b in rb if b >= DEFAULT_PACK_THRESHOLD)
    return out


def _round_of(sched: Schedule) -> np.ndarray:
    r = np.full(sched.layout.num_layers, -1, dtype=_I64)
    for k, layers in enumerate(sched.rounds):
        r[list(layers)] = k
    return r


def round_messages(sched: Schedule):
    """The messages of every round, per (round, sender, receiver) with any: arrays
    ``(round, src, dst, messages, bytes)`` sorted by that key. The same counts and bytes as
    every rank's schedule (``sched.rank(r).rounds[k].sends``), computed from the plan."""
    plan = sched.plan
    n, P = plan.ep_size, plan.slots_per_rank
    big_b, nbig, small_b, nsmall, _, _ = _layer_tensor_sizes(sched)
    rof = _round_of(sched)
    tl, ts, td = plan.t_layer, plan.t_src_rank, plan.t_dst_rank
    tsr, tdr = plan.t_src_row, plan.t_dst_row
    if tl.size == 0:
        z = np.zeros(0, dtype=_I64)
        return z, z, z, z, z
    o = np.lexsort((tdr, tsr, td, ts, tl))
    tl, ts, td, tsr, tdr = tl[o], ts[o], td[o], tsr[o], tdr[o]
    unsafe = (plan.changed if sched.transactional else plan.source_needed).reshape(-1)
    staged = unsafe[tl * (n * P) + td * P + tdr] & (nbig[tl] > 0)
    starts, lens = message_runs(ts * n + td, tsr, staged, tl)
    rl = tl[starts]
    # runs of whole rows: one message per unpacked tensor, run length rows each
    k_run = (rof[rl] * n + ts[starts]) * n + td[starts]
    m_run = nbig[rl]
    b_run = lens * big_b[rl]
    # packed tensors: one message per (layer, pair) and packed tensor
    pk = (tl * n + ts) * n + td
    first = np.ones(pk.size, dtype=bool)
    first[1:] = pk[1:] != pk[:-1]
    idx = np.flatnonzero(first)
    cnt = np.diff(np.append(idx, pk.size))
    pl = tl[idx]
    k_pack = (rof[pl] * n + ts[idx]) * n + td[idx]
    m_pack = nsmall[pl]
    b_pack = cnt * small_b[pl]
    key = np.concatenate([k_run, k_pack])
    msgs = np.concatenate([m_run, m_pack])
    byts = np.concatenate([b_run, b_pack])
    keep = msgs > 0
    key, msgs, byts = key[keep], msgs[keep], byts[keep]
    o = np.argsort(key, kind="stable")
    key, msgs, byts = key[o], msgs[o], byts[o]
    f = np.ones(key.size, dtype=bool)
    f[1:] = key[1:] != key[:-1]
    g = np.flatnonzero(f)
    uk = key[g]
    return uk // (n * n), uk // n % n, uk % n, np.add.reduceat(msgs, g), np.add.reduceat(byts, g)


def _local_work(sched: Schedule):
    """Per (round, rank): bytes and ops of the local work before the exchange and after it,
    as four arrays ``[rounds, ep]``: pre bytes, pre ops, post bytes, post ops."""
    plan = sched.plan
    n, P = plan.ep_size, plan.slots_per_rank
    R = len(sched.rounds)
    big_b, nbig, small_b, nsmall, full_b, nlarge = _layer_tensor_sizes(sched)
    rof = _round_of(sched)
    out = [np.zeros(R * n, dtype=np.float64) for _ in range(4)]
    pre_b, pre_o, post_b, post_o = out

    def add(arr, layer, rank, val):
        ok = rof[layer] >= 0
        np.add.at(arr, rof[layer[ok]] * n + rank[ok], val[ok] if np.ndim(val) else val)

    tl, ts, td = plan.t_layer, plan.t_src_rank, plan.t_dst_rank
    unsafe = (plan.changed if sched.transactional else plan.source_needed).reshape(-1)
    if tl.size:
        staged = unsafe[tl * (n * P) + td * P + plan.t_dst_row] & (nbig[tl] > 0)
        # packed sends gathered before, packed receives scattered after; staged receives too
        add(pre_b, tl, ts, small_b[tl].astype(float))
        add(post_b, tl, td, small_b[tl] + np.where(staged, big_b[tl], 0))
        # one gather / scatter kernel per tensor and (layer, rank) that has any
        lr_s = np.unique(tl * n + ts)
        lr_d = np.unique(tl * n + td)
        add(pre_o, lr_s // n, lr_s % n, nsmall[lr_s // n].astype(float))
        add(post_o, lr_d // n, lr_d % n, nsmall[lr_d // n].astype(float))
        lr_st = np.unique((tl * n + td)[staged])
        add(post_o, lr_st // n, lr_st % n, nbig[lr_st // n].astype(float))
    cl, cr, cn = plan.c_layer, plan.c_rank, plan.c_src_is_new
    if cl.size:
        ntens = np.asarray([len(rb) for rb in sched.layout.row_bytes], dtype=_I64)
        into_free = ~cn & ~unsafe[cl * (n * P) + cr * P + plan.c_dst_row]
        b = full_b[cl].astype(float)
        add(pre_b, cl[into_free], cr[into_free], b[into_free])
        add(post_b, cl[~into_free], cr[~into_free], b[~into_free])
        # duplicates and copies into free rows: one copy per tensor; ordered old-content
        # copies: one per large tensor, the small ones through one gather + scatter per tensor
        per = np.where(cn | into_free, ntens[cl], nlarge[cl]).astype(float)
        add(pre_o, cl[into_free], cr[into_free], per[into_free])
        add(post_o, cl[~into_free], cr[~into_free], per[~into_free])
        old_c = ~cn & ~into_free
        lr_c = np.unique((cl * n + cr)[old_c])
        add(post_o, lr_c // n, lr_c % n, 2.0 * (ntens - nlarge)[lr_c // n])
    cycles, _ = phase_c_copies(plan, sched.transactional, sched.copy_waves)
    cyc = cycles.reshape(-1)
    if cyc.any():
        lr = np.flatnonzero(cyc)
        lay, rk = lr // n, lr % n
        add(pre_b, lay, rk, cyc[lr] * full_b[lay].astype(float))
        add(pre_o, lay, rk, np.asarray([len(sched.layout.row_bytes[x]) for x in lay], float))
    return [a.reshape(R, n) for a in out]


# ---- timing ---------------------------------------------------------------------------------------


def _exchange_times(cluster: Cluster, R: int, rnd, src, dst, msgs, byts, ce_intra: bool):
    """Per round: the busiest NVLink, copy-engine and NIC time, as three [R] arrays."""
    nv = np.zeros(R)
    ce = np.zeros(R)
    nic = np.zeros(R)
    if rnd.size == 0:
        return nv, ce, nic
    n = cluster.world_size
    intra = cluster.node_of(src) == cluster.node_of(dst)
    b = byts.astype(float)
    m = msgs.astype(float)
    if ce_intra:
        # receiver pulls through its copy engines; the sender's NVLink egress is plain bytes
        i = intra
        pull = np.zeros(R * n)
        np.add.at(
            pull,
            rnd[i] * n + dst[i],
            b[i] / cluster.ce_rate + m[i] * cluster.ce_latency / cluster.copy_engines,
        )
        egress = np.zeros(R * n)
        np.add.at(egress, rnd[i] * n + src[i], b[i] / cluster.nvlink_bw)
        ce = np.maximum(pull.reshape(R, n).max(axis=1), egress.reshape(R, n).max(axis=1))
    else:
        i = intra
        for end in (src, dst):
            key = rnd[i] * n + end[i]
            if cluster.split_channels:
                k = np.bincount(key, minlength=R * n)  # NVLink peers of this GPU this round
                t = b[i] * k[key] / cluster.nvlink_bw + m[i] * cluster.nvlink_latency
                worst = np.zeros(R * n)
                np.maximum.at(worst, key, t)
            else:
                worst = np.zeros(R * n)
                np.add.at(worst, key, b[i] / cluster.nvlink_bw + m[i] * cluster.nvlink_latency)
            nv = np.maximum(nv, worst.reshape(R, n).max(axis=1))
    x = ~intra
    if x.any():
        nn = cluster.nodes * cluster.nics_per_node
        for end in (src, dst):
            key = rnd[x] * nn + cluster.nic_of(end[x])
            t = np.zeros(R * nn)
            np.add.at(t, key, b[x] / cluster.nic_bw + m[x] * cluster.nic_latency)
            nic = np.maximum(nic, t.reshape(R, nn).max(axis=1))
    return nv, ce, nic


def _critical(parts: dict, host_bound: np.ndarray) -> tuple:
    out = []
    names = ("local", "nvlink", "copy_engine", "nic")
    for k in range(host_bound.size):
        if host_bound[k]:
            out.append("host")
        else:
            out.append(max(names, key=lambda r: parts[r][k]))
    return tuple(out)


def _byte_figures(cluster: Cluster, ep: int, src, dst, byts):
    b = byts.astype(np.int64)
    intra = cluster.node_of(src) == cluster.node_of(dst)
    per_node = np.bincount(
        cluster.node_of(dst[~intra]), weights=b[~intra], minlength=cluster.nodes
    ).astype(np.int64)
    sent = np.bincount(src, weights=b, minlength=ep)
    recv = np.bincount(dst, weights=b, minlength=ep)
    busiest = int(max(sent.max(initial=0), recv.max(initial=0)))
    return int(b[intra].sum()), int(b[~intra].sum()), per_node, busiest


def _setup_seconds(hc, message_ends: np.ndarray, copies: np.ndarray) -> float:
    """Set-up and planning of one rearrangement: the ranks prepare in parallel, the slowest
    (most message ends and local row copies) sets it."""
    per = (hc.setup_per_message + hc.plan_per_message) * message_ends + hc.setup_per_copy * copies
    return hc.setup + float(per.max(initial=0.0))


def estimate_schedule(sched: Schedule, *, cluster: Cluster, transport: str = "nccl"):
    """Time a built schedule (see the module docstring); ``transport``: ``"nccl"`` (NVLink
    and NICs through NCCL) or ``"ipc"`` (copy engines inside a node, NCCL between nodes)."""
    transport = _check_transport(transport)
    ep = sched.plan.ep_size
    cluster = _check_cluster(cluster, ep)
    R = len(sched.rounds)
    rnd, src, dst, msgs, byts = round_messages(sched)
    nv, ce, nic = _exchange_times(cluster, R, rnd, src, dst, msgs, byts, transport == "ipc")
    pre_b, pre_o, post_b, post_o = _local_work(sched)
    hc = cluster.host[transport]
    lop = cluster.local_op if hc.gpu_per_copy is None else hc.gpu_per_copy
    pre = (pre_b / cluster.local_bw + pre_o * lop).max(axis=1, initial=0.0)
    post = (post_b / cluster.local_bw + post_o * lop).max(axis=1, initial=0.0)
    ops = np.zeros(R * ep)
    np.add.at(ops, rnd * ep + src, msgs.astype(float))
    np.add.at(ops, rnd * ep + dst, msgs.astype(float))
    copies = (pre_o + post_o).reshape(-1)
    host_r = hc.per_round + (ops * hc.per_op + copies * hc.per_copy).reshape(R, ep).max(
        axis=1, initial=0.0
    )
    exch = np.maximum(np.maximum(nv, ce), nic)
    gpu = pre + exch + post
    # the exchange starts once every rank has enqueued it (after applying the previous round);
    # the GPU's local work overlaps that host time
    rs = exch + np.maximum(host_r, pre + post)
    parts = {
        "host": host_r,
        "local": pre + post,
        "nvlink": nv,
        "copy_engine": ce,
        "nic": nic,
        "gpu": gpu,
    }
    nvb, netb, per_node, busiest = _byte_figures(cluster, ep, src, dst, byts)
    per_rank = np.bincount(src, weights=msgs, minlength=ep) + np.bincount(
        dst, weights=msgs, minlength=ep
    )
    setup = _setup_seconds(hc, per_rank, np.bincount(sched.plan.c_rank, minlength=ep)) if R else 0.0
    total = float(rs.sum()) + setup
    moved = len(sched.layers_changed)
    return RearrangementEstimate(
        seconds=total,
        seconds_per_layer=total / moved if moved else 0.0,
        nvlink_bytes=nvb,
        network_bytes=netb,
        network_bytes_per_node=per_node,
        busiest_gpu_bytes=busiest,
        rounds=R,
        round_seconds=rs,
        critical=_critical(parts, (host_r > pre + post) & (host_r > exch)),
        layers_moved=moved,
        messages=int(msgs.sum()),
        setup_seconds=setup,
        parts=parts,
    )


def _plan_inputs(old_map, new_map, ep_size, cluster, ranks_per_node):
    ep = check_count(ep_size, "ep_size")
    _check_cluster(cluster, ep)
    if ranks_per_node is None and cluster.nodes > 1 and ep > cluster.gpus_per_node:
        ranks_per_node = cluster.gpus_per_node
    return ep, plan_rearrangement(old_map, new_map, ep, ranks_per_node=ranks_per_node)


def estimate_rearrangement(
    old_map,
    new_map,
    ep_size: int,
    row_bytes,
    *,
    cluster: Cluster,
    transport: str = "nccl",
    node_dedupe=False,
    **schedule_opts,
) -> RearrangementEstimate:
    """The modelled time of the rearrangement ``old_map -> new_map`` on ``cluster``.

    ``row_bytes``: bytes of one row of each tensor, per layer (``[[w13, w2, ...], ...]``) or
    one list for every layer. ``transport``: ``"nccl"`` (ours over NCCL) or ``"ipc"`` (ours
    with copy engines inside a node; its schedule is one-sided). ``node_dedupe``: as
    :func:`~eplb_pynccl.planner.plan_stages` (``True``: relay through one GPU per node;
    ``"auto"``: only where this model says it is faster); the stages' times add up.
    ``schedule_opts``: ``staging_bytes``, ``pack_threshold``, ``transactional``,
    ``max_messages_per_round`` (as :class:`~eplb_pynccl.ExpertShuffler`) and
    ``ranks_per_node`` (default: the cluster's GPUs per node when the ranks span nodes).
    Rank ``r`` runs on GPU ``r`` of the cluster.
    """
    transport = _check_transport(transport)
    bad = set(schedule_opts) - _SCHEDULE_OPTS
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; known: {sorted(_SCHEDULE_OPTS)}")
    rpn = schedule_opts.pop("ranks_per_node", None)
    if node_dedupe is False:
        ep, plan = _plan_inputs(old_map, new_map, ep_size, cluster, rpn)
        return _estimate_plan(plan, row_bytes, cluster, transport, schedule_opts)
    from .planner import plan_stages

    ep = check_count(ep_size, "ep_size")
    _check_cluster(cluster, ep)
    if rpn is None:
        rpn = min(cluster.gpus_per_node, ep)
    stages = plan_stages(
        old_map,
        new_map,
        ep,
        ranks_per_node=rpn,
        node_dedupe=node_dedupe,
        row_bytes=row_bytes,
        cluster=cluster,
        transport=transport,
    )
    return estimate_stages(stages, row_bytes, cluster=cluster, transport=transport, **schedule_opts)


def _estimate_plan(plan, row_bytes, cluster, transport, opts) -> RearrangementEstimate:
    layout = Layout.of(_row_bytes(row_bytes, plan.num_layers), plan.slots_per_rank)
    sched = build_schedule(plan, layout, one_sided=transport == "ipc", **opts)
    return estimate_schedule(sched, cluster=cluster, transport=transport)


def estimate_stages(
    stages, row_bytes, *, cluster: Cluster, transport: str = "nccl", **schedule_opts
) -> RearrangementEstimate:
    """The time of a rearrangement run as consecutive stages (``plan_stages``' list of
    ``(from_map, to_map, plan)``): the stages' times, bytes and rounds add up."""
    transport = _check_transport(transport)
    schedule_opts.pop("ranks_per_node", None)
    ests = [
        _estimate_plan(p, row_bytes, cluster, transport, dict(schedule_opts)) for _, _, p in stages
    ]
    if len(ests) == 1:
        return ests[0]
    total = sum(e.seconds for e in ests)
    moved = max(e.layers_moved for e in ests)
    return RearrangementEstimate(
        seconds=total,
        seconds_per_layer=total / moved if moved else 0.0,
        nvlink_bytes=sum(e.nvlink_bytes for e in ests),
        network_bytes=sum(e.network_bytes for e in ests),
        network_bytes_per_node=np.sum([e.network_bytes_per_node for e in ests], axis=0),
        busiest_gpu_bytes=sum(e.busiest_gpu_bytes for e in ests),
        rounds=sum(e.rounds for e in ests),
        round_seconds=np.concatenate([e.round_seconds for e in ests]),
        critical=tuple(c for e in ests for c in e.critical),
        layers_moved=moved,
        messages=sum(e.messages for e in ests),
        setup_seconds=sum(e.setup_seconds for e in ests),
        parts={k: np.concatenate([e.parts[k] for e in ests]) for k in ests[0].parts},
        stages=len(ests),
    )


# ---- the vLLM-style baseline --------------------------------------------------------------------


def _vllm_messages(plan: RearrangementPlan, ntens, full):
    """vLLM-style messages, one per transfer per tensor, grouped by (layer, source,
    destination): each group's layer (its round), source, destination, messages and bytes."""
    ep = plan.ep_size
    tl, ts, td = plan.t_layer, plan.t_src_rank, plan.t_dst_rank
    # one message per transfer per tensor
    key = (tl * ep + ts) * ep + td
    o = np.argsort(key, kind="stable")
    key = key[o]
    if key.size:
        f = np.ones(key.size, dtype=bool)
        f[1:] = key[1:] != key[:-1]
        g = np.flatnonzero(f)
        cnt = np.diff(np.append(g, key.size))
        uk = key[g]
        rnd, src, dst = uk // (ep * ep), uk // ep % ep, uk % ep
        msgs = cnt * ntens[rnd]
        byts = cnt * full[rnd]
    else:
        rnd = src = dst = msgs = byts = np.zeros(0, dtype=_I64)
    return rnd, src, dst, msgs, byts


def _vllm_local(plan: RearrangementPlan, cluster: Cluster, ntens, full):
    """vLLM-style local copies: each layer's GPU time on its busiest rank, and the copies
    per (layer, rank)."""
    L, ep = plan.num_layers, plan.ep_size
    # local: old-content copies into the buffer before, duplicates after, then every changed
    # row copied back, one copy per row per tensor
    cb = np.zeros(L * ep)
    co = np.zeros(L * ep)
    cl, cr = plan.c_layer, plan.c_rank
    np.add.at(cb, cl * ep + cr, full[cl].astype(float))
    np.add.at(co, cl * ep + cr, ntens[cl].astype(float))
    ch = plan.changed.reshape(L, ep, -1).sum(axis=2).astype(float)  # changed rows per rank
    cb = cb.reshape(L, ep) + ch * full[:, None]
    co = co.reshape(L, ep) + ch * ntens[:, None]
    local_gpu = (cb / cluster.local_bw + co * cluster.local_op).max(axis=1)
    return local_gpu, co


def _vllm_plan_estimate(plan: RearrangementPlan, row_bytes: list, cluster: Cluster, link: str):
    L, ep = plan.num_layers, plan.ep_size
    ntens = np.asarray([len(rb) for rb in row_bytes], dtype=_I64)
    full = np.asarray([sum(rb) for rb in row_bytes], dtype=_I64)
    active = np.flatnonzero(plan.changed.reshape(L, -1).any(axis=1))
    R = L  # one "round" per layer; inactive layers cost nothing
    rnd, src, dst, msgs, byts = _vllm_messages(plan, ntens, full)
    nv, ce, nic = _exchange_times(cluster, R, rnd, src, dst, msgs, byts, link == "ce")
    local_gpu, co = _vllm_local(plan, cluster, ntens, full)
    hc = cluster.host["torch"]
    ops = np.zeros(R * ep)
    np.add.at(ops, rnd * ep + src, msgs.astype(float))
    np.add.at(ops, rnd * ep + dst, msgs.astype(float))
    host_ops = (ops * hc.per_op).reshape(R, ep).max(axis=1) + hc.per_round
    host_copy = (co * hc.per_copy).max(axis=1)
    exch = np.maximum(np.maximum(nv, ce), nic)
    # host enqueues every op, then the group runs; the copies' host and GPU time overlap
    rs = host_ops + exch + np.maximum(local_gpu, host_copy)
    on = np.zeros(L, dtype=bool)
    on[active] = True
    rs = np.where(on, rs, 0.0)
    parts = {
        "host": np.where(on, host_ops + host_copy, 0.0),
        "local": np.where(on, local_gpu, 0.0),
        "nvlink": nv,
        "copy_engine": ce,
        "nic": nic,
        "gpu": np.where(on, exch + local_gpu, 0.0),
    }
    host_bound = (host_ops + host_copy) > (exch + local_gpu)
    crit = _critical({k: v[active] for k, v in parts.items()}, host_bound[active])
    nvb, netb, per_node, busiest = _byte_figures(cluster, ep, src, dst, byts)
    total = float(rs.sum())
    return RearrangementEstimate(
        seconds=total,
        seconds_per_layer=total / active.size if active.size else 0.0,
        nvlink_bytes=nvb,
        network_bytes=netb,
        network_bytes_per_node=per_node,
        busiest_gpu_bytes=busiest,
        rounds=int(active.size),
        round_seconds=rs[active],
        critical=crit,
        layers_moved=int(active.size),
        messages=int(msgs.sum()),
        parts={k: v[active] for k, v in parts.items()},
    )


def estimate_vllm_style(
    old_map,
    new_map,
    ep_size: int,
    row_bytes,
    *,
    cluster: Cluster,
    link: str = "nccl",
    ranks_per_node: int | None = None,
) -> RearrangementEstimate:
    """The modelled time of the vLLM-style exchange of the same rearrangement (who sends what
    from the same planner): per layer, one P2POp per expert per tensor in one
    ``batch_isend_irecv`` (host cost ``cluster.host["torch"]``), receives into a one-layer
    buffer, then one copy per changed row per tensor. ``link="ce"`` moves the NVLink part
    through copy engines (as vLLM's NIXL communicator does within a node)."""
    if link not in ("nccl", "ce"):
        raise ValueError(f"link must be 'nccl' or 'ce', got {link!r}")
    ep, plan = _plan_inputs(old_map, new_map, ep_size, cluster, ranks_per_node)
    rb = _row_bytes(row_bytes, plan.num_layers)
    Layout.of(rb, plan.slots_per_rank)  # the same checks as ours
    return _vllm_plan_estimate(plan, rb, cluster, link)


# ---- the bench's hook ---------------------------------------------------------------------------


def predict_eplb_row(
    old_map,
    new_map,
    ep_size: int,
    row_bytes,
    method: str,
    *,
    cluster: Cluster | None = None,
    layer_bytes: int | None = None,
):
    """The model's prediction (milliseconds) for a measured eplb row of the bench, or None for
    a method it does not model (gloo on the CPU). ``method`` is the bench's method name;
    ``cluster`` defaults to this project's device machine of that size (``h100x4-nv18``
    for up to 4 ranks on one node, else ``h100-ib400``); ``layer_bytes`` (one layer of local
    experts) is the staging of the ``packed-2L`` probe. ``eplb_pynccl/torch-nccl`` is our
    schedule with :data:`TORCH_TRANSPORT_PER_MESSAGE` of host per message."""
    if cluster is None:
        cluster = (
            Cluster.preset("h100x4-nv18")
            if ep_size <= 4
            else Cluster.preset("h100-ib400", nodes=-(-int(ep_size) // 8))
        )
    if method == "vllm-style":
        est = estimate_vllm_style(old_map, new_map, ep_size, row_bytes, cluster=cluster)
    elif method == "eplb_pynccl":
        est = estimate_rearrangement(old_map, new_map, ep_size, row_bytes, cluster=cluster)
    elif method == "eplb_pynccl/torch-nccl":
        # the same schedule over TorchTransport: its launch's measured host cost per message
        host = dict(cluster.host)
        host["nccl"] = replace(host["nccl"], per_op=TORCH_TRANSPORT_PER_MESSAGE)
        est = estimate_rearrangement(
            old_map, new_map, ep_size, row_bytes, cluster=replace(cluster, host=host)
        )
    elif method == "eplb_pynccl direct":
        est = estimate_rearrangement(
            old_map, new_map, ep_size, row_bytes, cluster=cluster, transactional=False
        )
    elif method == "eplb_pynccl packed-2L":
        opts: dict = {"pack_threshold": 1 << 62}
        if layer_bytes is not None:
            opts["staging_bytes"] = 2 * int(layer_bytes)
        est = estimate_rearrangement(old_map, new_map, ep_size, row_bytes, cluster=cluster, **opts)
    elif method == "eplb_pynccl ipc":
        est = estimate_rearrangement(
            old_map, new_map, ep_size, row_bytes, cluster=cluster, transport="ipc"
        )
    else:
        return None
    return est.seconds * 1e3
