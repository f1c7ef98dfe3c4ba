"""A description of the machines a rearrangement runs on, for the time model (``estimate.py``).

:class:`Cluster` says how many GPUs there are and how they are linked: GPUs per node (one
NVLink domain), nodes, the per-GPU NVLink rate and per-message cost, the copy engines, the
NICs (which GPUs of a node share each one, their rate and per-message cost), the rate of
copies inside one GPU, and the host's cost per op, per round and per rearrangement for each
way of driving the exchange. Rates are *effective* rates in bytes per second (what a transfer
reaches, not the line rate); the presets say where each figure comes from.

All fields are checked when the object is made (a clear ``TypeError``/``ValueError`` naming
the field); the object is frozen. Nothing here imports torch or talks to a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ._checks import check_count, check_real

__all__ = ["HOST_PROFILES", "TRANSPORTS", "Cluster", "HostCost"]

GB = 1e9
US = 1e-6
MS = 1e-3

# the ways of driving an exchange the model knows, by their host cost entry:
# "nccl": this project's executor over NcclTransport (prepared messages, one group per round);
# "ipc": its IpcTransport (copy-engine pulls, host-polled); "torch": torch.distributed
# batch_isend_irecv with one P2POp per expert per tensor (the vLLM-style baseline).
TRANSPORTS = ("nccl", "ipc", "torch")


def _num(value, name: str, *, low_open: bool = True) -> float:
    """A finite real number (not bool) above 0 (or at least 0): :func:`_checks.check_real`."""
    return check_real(value, name, low=0.0, low_open=low_open)


@dataclass(frozen=True)
class HostCost:
    """Host (CPU) time of one way of driving the exchange, in seconds.

    ``per_op``: enqueueing one message (one NCCL send/recv call, one P2POp, one copy-engine
    pull); ``per_copy``: enqueueing one local copy or kernel; ``per_round``: the fixed cost of
    one round (group start/end, events, stream switches, the poll that sees it done, the
    apply's kernel launches); ``setup``: once per rearrangement (the schedule, the executor's
    tables); ``setup_per_message`` and ``setup_per_copy``: the set-up's part that grows with
    the busiest rank's message ends (sends + receives: prepared ops, captured pulls) and its
    local row copies (copy tables); ``plan_per_message``: planning on the engine's host, per
    message end of the busiest rank. ``gpu_per_copy`` is GPU time, not host: what one local
    copy or kernel costs the GPU beside its bytes under this executor (None: the cluster's
    ``local_op``; the current executor copies a phase's rows in one kernel launch)."""

    per_op: float
    per_copy: float
    per_round: float
    setup: float = 0.0
    plan_per_message: float = 0.0
    setup_per_message: float = 0.0
    setup_per_copy: float = 0.0
    gpu_per_copy: float | None = None

    def __post_init__(self) -> None:
        if self.gpu_per_copy is not None:
            object.__setattr__(
                self,
                "gpu_per_copy",
                _num(self.gpu_per_copy, "HostCost.gpu_per_copy", low_open=False),
            )
        for f in (
            "per_op",
            "per_copy",
            "per_round",
            "setup",
            "plan_per_message",
            "setup_per_message",
            "setup_per_copy",
        ):
            object.__setattr__(self, f, _num(getattr(self, f), f"HostCost.{f}", low_open=False))


def _checked_host(host) -> dict:
    """A copy of ``host``: one HostCost for every transport, none for another."""
    if not isinstance(host, dict):
        raise TypeError(f"host must be a dict of transport -> HostCost, got {type(host).__name__}")
    for k, v in host.items():
        if k not in TRANSPORTS:
            raise ValueError(f"host: unknown transport {k!r} (known: {', '.join(TRANSPORTS)})")
        if not isinstance(v, HostCost):
            raise TypeError(f"host[{k!r}] must be a HostCost, got {type(v).__name__}")
    missing = [t for t in TRANSPORTS if t not in host]
    if missing:
        raise ValueError(f"host lacks a HostCost for {', '.join(map(repr, missing))}")
    return dict(host)


def _nic_groups(nic_gpus, gpn: int, nics: int) -> tuple:
    """The local GPUs each NIC serves: ``nic_gpus`` checked, or (None) split evenly."""
    if nic_gpus is None:
        if gpn % nics and nics % gpn:
            raise ValueError(
                f"nic_gpus must be given when {nics} NICs do not split {gpn} GPUs evenly"
            )
        if nics <= gpn:
            per = gpn // nics
            return tuple(tuple(range(j * per, (j + 1) * per)) for j in range(nics))
        return tuple((j * gpn // nics,) for j in range(nics))  # several NICs per GPU: one each
    try:
        groups = tuple(
            tuple(check_count(g, "nic_gpus entry", minimum=0) for g in grp) for grp in nic_gpus
        )
    except TypeError as e:
        raise TypeError(f"nic_gpus must be a sequence of sequences of GPU ids: {e}") from None
    if len(groups) != nics:
        raise ValueError(f"nic_gpus lists {len(groups)} NICs, nics_per_node is {nics}")
    seen = sorted(g for grp in groups for g in grp)
    if any(not grp for grp in groups):
        raise ValueError("nic_gpus: every NIC must serve at least one GPU")
    if seen != list(range(gpn)):
        raise ValueError(
            f"nic_gpus must name every local GPU 0..{gpn - 1} exactly once, got {groups}"
        )
    return groups


@dataclass(frozen=True)
class Cluster:
    """GPUs, links and host costs (see the module docstring). Rates in bytes/s, times in s.

    ``nvlink_bw`` is one GPU's NVLink rate per direction (egress and ingress each) and
    ``nvlink_latency`` the cost of one message on it; NCCL gives each peer of a group its own
    channels, so when a GPU talks to ``k`` NVLink peers in a round each pair gets ``1/k`` of
    the rate (``split_channels``; the measured probes in bench/RESULTS.md behave this way).
    ``copy_engines`` engines of ``ce_bw`` each (capped at ``nvlink_bw``) move a one-sided
    transport's pulls, ``ce_latency`` per copy. ``nic_gpus[j]`` lists the local GPUs behind
    NIC ``j`` of every node (default: GPUs split evenly, in order); a NIC moves ``nic_bw``
    per direction, ``nic_latency`` per message. ``local_bw`` is the rate of copies inside
    one GPU (bytes copied per second) and ``local_op`` the GPU cost of one copy or kernel.
    ``host`` maps each transport of :data:`TRANSPORTS` to its :class:`HostCost`.
    """

    name: str
    gpus_per_node: int
    nodes: int
    nvlink_bw: float
    nvlink_latency: float
    copy_engines: int
    ce_bw: float
    ce_latency: float
    nics_per_node: int
    nic_bw: float
    nic_latency: float
    local_bw: float
    local_op: float
    host: dict
    nic_gpus: tuple | None = None
    split_channels: bool = True
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        gpn = check_count(self.gpus_per_node, "gpus_per_node")
        object.__setattr__(self, "gpus_per_node", gpn)
        object.__setattr__(self, "nodes", check_count(self.nodes, "nodes"))
        object.__setattr__(self, "copy_engines", check_count(self.copy_engines, "copy_engines"))
        nics = check_count(self.nics_per_node, "nics_per_node")
        object.__setattr__(self, "nics_per_node", nics)
        for f in ("nvlink_bw", "ce_bw", "nic_bw", "local_bw"):
            object.__setattr__(self, f, _num(getattr(self, f), f))
        for f in ("nvlink_latency", "ce_latency", "nic_latency", "local_op"):
            object.__setattr__(self, f, _num(getattr(self, f), f, low_open=False))
        if not isinstance(self.split_channels, (bool, np.bool_)):
            raise TypeError(
                f"split_channels must be a bool, got {type(self.split_channels).__name__}"
            )
        object.__setattr__(self, "host", _checked_host(self.host))
        object.__setattr__(self, "nic_gpus", _nic_groups(self.nic_gpus, gpn, nics))

    # ---- derived -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def node_of(self, ranks) -> np.ndarray:
        return np.asarray(ranks, dtype=np.int64) // self.gpus_per_node

    def nic_of(self, ranks) -> np.ndarray:
        """Global NIC id (node * nics_per_node + j) of each rank (GPU)."""
        local = np.empty(self.gpus_per_node, dtype=np.int64)
        for j, grp in enumerate(self.nic_gpus or ()):  # always set by __post_init__
            local[list(grp)] = j
        r = np.asarray(ranks, dtype=np.int64)
        return (r // self.gpus_per_node) * self.nics_per_node + local[r % self.gpus_per_node]

    @property
    def ce_rate(self) -> float:
        """Aggregate copy-engine rate of one GPU over NVLink (capped by the link)."""
        return min(self.copy_engines * self.ce_bw, self.nvlink_bw)

    def with_nodes(self, nodes: int) -> Cluster:
        return replace(self, nodes=nodes)

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, *, nodes: int = 1, host: str = "current") -> Cluster:
        """A described cluster: ``"h100-ib400"``, ``"h200-ib400"``, ``"gb200-nvl72"``,
        ``"h100x4-nv18"`` (this project's 4-GPU device machine, run F) or ``"h200x1"`` (its
        one-GPU machine). ``nodes``: nodes (NVLink domains) of it. ``host``: which measured
        host costs (:data:`HOST_PROFILES`): ``"current"`` (the executor as it is now,
        Session 7), ``"session-6"`` (the executor of Session 6, kept to show what moved) or
        ``"run-f"`` (the executor of run F, 2026-11-27, for the calibration against run F's
        rows).

        Sources (facts and figures, in our words):

        * NVLink 4 (H100/H200 SXM): 18 links, 450 GB/s per direction per GPU. On this
          project's 4x H100 NV18 machine an all-pairs exchange of one large message per peer
          reached 332-336 GB/s per GPU and 2-GPU sendrecv 360 GB/s (bench/RESULTS.md, run F;
          NCCL's maintainers quote ~370 GB/s for non-allreduce traffic). The effective rate is
          332 GB/s; the per-message cost (~30 us) is fitted to run F's EPLB rows and its
          probes of per-row messages (24/16/8 rows of 29 MB to three peers: 210-216 GB/s
          against 254-305 for one message per peer).
        * Copy engines: others measured copy-engine writes between two H100s at 371-377 GB/s
          one way (83% of line rate), 742-749 GB/s both ways; this project measured ~4.5 us of
          GPU time per copy in a batch of small copies on one H200.
        * Network (h100/h200-ib400): 8 ConnectX-7 NICs of 400 Gb/s per node (50 GB/s line),
          one per GPU as in NVIDIA's DGX/HGX H100 reference design; NCCL point-to-point over
          InfiniBand reaches ~45 GB/s per NIC; ~25 us per message is assumed (NCCL's small
          message latency over IB is 15-30 us); not measured here.
        * Copies inside a GPU: index kernels over 8-byte words moved 1,376-1,452 GB/s on H100
          (run A), a device copy on one H200 2,128 GB/s (session 4); ~8 us of GPU time per
          copy or kernel (fitted to run F's apply phase, 10.9 ms for 4 layers) for run F's and
          Session 6's executors and torch's copies (the vLLM-style baseline); the current
          executor copies a whole phase in one row-copy kernel launch: ~45 ns of GPU per row
          copy at its default 16 CTAs (Session 7 D9, 1,148 x 4 KiB in 0.052 ms), its
          profile's ``HostCost.gpu_per_copy``.
        * GB200 NVL72: 72 Blackwell GPUs in one NVLink 5 domain, 900 GB/s per direction per GPU
          (1.8 TB/s both ways), modelled at H100's measured efficiency (0.74: 664 GB/s); one
          400 Gb/s NIC per GPU (4 per compute tray); HBM3e at 8 TB/s, copies at 3.5 TB/s
          (H200's measured share of its peak). Its figures are not measured here; its host
          costs are the Hopper hosts' (Grace's are not measured).
        * Host costs, ``"current"`` (the executor of Session 7: one kernel launch per copy
          phase, at most 8 waves, IPC pulls captured as CUDA graphs; bench/RESULTS.md
          "Session 7", run D9 on one H200, rows of
          ``bench/results/2026-12-02-s7-D9-ipc-results.json``): NCCL: 1.04 us per prepared
          op (Session 5, H3; not re-measured); per round 0.215 ms = the ``host-ep1`` row's
          launch 0.151 + poll 0.007 + apply 0.057 ms (one rank's 1,148 local moves: three
          phase launches, their events; no peer, so no NCCL group in it: the non-blocking
          group's ~90 us hand-over of D10's pair probe is spent before the next round's
          launch, which waits for the apply); nothing per row copied. Set-up 1.50 ms +
          2.91 us per local row copy of the busiest rank, the line through ``host-ep1``'s
          set-up (4.84 ms, 1,148 copies) and the local permutation's at 132 CTAs (1.91 ms,
          142 copies), + 2.48 us per message end (send or receive) of the busiest rank:
          the IPC row with batched pulls (4.63 ms for rank 0's 1,156 message ends and 90
          copies, less the fixed and copy parts), taken for NCCL's prepared messages too
          (no multi-rank NCCL set-up was measured in Session 7: an assumption). IPC: per
          round 0.512 ms = the ``host`` row with graphs, launch 0.143 + poll 0.289 + apply
          0.080 ms (DeepSeek-V3 EP4 plans, 4 processes on the GPU, 289 message ends per rank
          and round); nothing per message in a round (one graph launch per peer); set-up
          as NCCL's but 6.43 us per message end (9.19 ms with graphs: the captures move the
          pulls' driver work into the set-up). Planning inside ``rearrange()``: ~14 us per
          message end of the busiest rank (run F's wall time less its set-up, launch, wait
          and apply: 11.6 ms for 660 messages on DeepSeek-V3 EP4, 6.5 ms for 634 on Qwen3
          EP4; not re-measured). torch's ``batch_isend_irecv`` (the vLLM-style baseline):
          17.1 us per op (run F, overhead part), a torch copy ~4.5 us (one H200, sessions
          4/5), ~0.5 ms per layer for the group and its wait (fitted to run F's vLLM-style
          rows). Session 6's profile (5.2 ms fixed set-up, 0.31 ms NCCL and 0.52 ms + 2.6 us
          per message IPC rounds) is ``"session-6"``.
        * Host costs, ``"run-f"`` (the executor before the row-copy kernel): 1.65 us per
          prepared NCCL op, ~1.3 ms per round (launch + apply of per-row copies), 1.0 us per
          local copy, 1.3 ms set-up (run F, 4x H100); IPC ~2.2 ms per round (launch 0.41 +
          poll 0.91 + apply 0.92 ms, one H200, before Session 6); planning and torch as above.
        """
        nodes = check_count(nodes, "nodes")
        key = name.lower() if isinstance(name, str) else name
        if key not in _PRESETS:
            raise ValueError(f"unknown cluster preset {name!r} (known: {', '.join(_PRESETS)})")
        if host not in HOST_PROFILES:
            raise ValueError(
                f"host must be one of {', '.join(map(repr, HOST_PROFILES))}, got {host!r}"
            )
        return replace(_PRESETS[key], nodes=nodes, host=HOST_PROFILES[host]())


def _torch_host() -> HostCost:
    return HostCost(per_op=17.1 * US, per_copy=4.5 * US, per_round=0.5 * MS)


# Session 7's set-up line (bench/RESULTS.md "Session 7", D9): fixed + per local row copy, through
# host-ep1 (4.84 ms, 1,148 copies) and the local permutation at 132 CTAs (1.912 ms, 142 copies)
_S7_SETUP_PER_COPY = (4.840 - 1.912) * MS / (1148 - 142)
_S7_SETUP = 1.912 * MS - 142 * _S7_SETUP_PER_COPY
# the IPC host row (rank 0: 1,156 message ends, 90 copies): set-up per message end, pulls
# batched (4.629 ms) and captured as graphs (9.189 ms)
_S7_RANK0_COPIES = 90 * _S7_SETUP_PER_COPY
_S7_SETUP_PER_MESSAGE_BATCH = (4.629 * MS - _S7_SETUP - _S7_RANK0_COPIES) / 1156
_S7_SETUP_PER_MESSAGE_GRAPH = (9.189 * MS - _S7_SETUP - _S7_RANK0_COPIES) / 1156
# GPU per row copy under one row-copy kernel launch per phase (D9: 1,148 x 4 KiB, 16 CTAs, 0.052 ms)
_S7_GPU_PER_COPY = 0.052 * MS / 1148


def _s7_host(per_op: float, per_round: float, setup_per_message: float) -> HostCost:
    """A transport's host costs under Session 7's executor: its own per op, per round and
    per message end of the set-up; nothing per copy; the shared set-up line, planning and
    GPU time per row copy."""
    return HostCost(
        per_op=per_op,
        per_copy=0.0,
        per_round=per_round,
        setup=_S7_SETUP,
        plan_per_message=14 * US,
        setup_per_message=setup_per_message,
        setup_per_copy=_S7_SETUP_PER_COPY,
        gpu_per_copy=_S7_GPU_PER_COPY,
    )


def _host_current() -> dict:
    """The executor as it is now (Session 7, D9): see :meth:`Cluster.preset`."""
    return {
        "nccl": _s7_host(1.04 * US, (0.151 + 0.007 + 0.057) * MS, _S7_SETUP_PER_MESSAGE_BATCH),
        "ipc": _s7_host(0.0, (0.143 + 0.289 + 0.080) * MS, _S7_SETUP_PER_MESSAGE_GRAPH),
        "torch": _torch_host(),
    }


def _host_session_6() -> dict:
    """The executor of Session 6 (one launch per wave, pulls issued in the poll)."""
    return {
        "nccl": HostCost(
            per_op=1.04 * US,
            per_copy=0.0,
            per_round=0.09 * MS + 0.20 * MS + 3 * 7 * US,
            setup=5.2 * MS,
            plan_per_message=14 * US,
        ),
        "ipc": HostCost(
            per_op=2.6 * US,
            per_copy=0.0,
            per_round=0.32 * MS + 0.20 * MS,
            setup=6.4 * MS,
            plan_per_message=14 * US,
        ),
        "torch": _torch_host(),
    }


def _host_run_f() -> dict:
    """The executor of run F (2026-11-27): see :meth:`Cluster.preset`."""
    return {
        "nccl": HostCost(
            per_op=1.65 * US,
            per_copy=1.0 * US,
            per_round=1.3 * MS,
            setup=1.3 * MS,
            plan_per_message=14 * US,
        ),
        "ipc": HostCost(
            per_op=2.0 * US,
            per_copy=1.0 * US,
            per_round=2.2 * MS,
            setup=1.3 * MS,
            plan_per_message=14 * US,
        ),
        "torch": _torch_host(),
    }


# measured host costs by executor version (Cluster.preset's ``host``)
HOST_PROFILES = {
    "current": _host_current,
    "session-6": _host_session_6,
    "run-f": _host_run_f,
}


_H100 = Cluster(
    name="h100-ib400",
    gpus_per_node=8,
    nodes=1,
    nvlink_bw=332 * GB,
    nvlink_latency=30 * US,
    copy_engines=1,
    ce_bw=375 * GB,
    ce_latency=4.5 * US,
    nics_per_node=8,
    nic_bw=45 * GB,
    nic_latency=25 * US,
    local_bw=1400 * GB,
    local_op=8 * US,
    host=_host_current(),
    source="8x H100 SXM (NVLink 4) + 8x 400 Gb/s InfiniBand per node",
)

_PRESETS = {
    "h100-ib400": _H100,
    "h200-ib400": replace(
        _H100,
        name="h200-ib400",
        local_bw=2000 * GB,
        source="8x H200 SXM (NVLink 4) + 8x 400 Gb/s InfiniBand per node",
    ),
    "gb200-nvl72": replace(
        _H100,
        name="gb200-nvl72",
        gpus_per_node=72,
        nvlink_bw=664 * GB,
        ce_bw=664 * GB,
        nics_per_node=72,
        nic_gpus=None,
        local_bw=3500 * GB,
        source="GB200 NVL72: 72 GPUs in one NVLink 5 domain, one 400 Gb/s NIC per GPU",
    ),
    "h100x4-nv18": replace(
        _H100,
        name="h100x4-nv18",
        gpus_per_node=4,
        nics_per_node=1,
        nic_gpus=None,
        source="this project's nvidia-h100-x4 device (run F): 4x H100, NV18 between every pair",
    ),
    "h200x1": replace(
        _H100,
        name="h200x1",
        gpus_per_node=1,
        nics_per_node=1,
        nic_gpus=None,
        local_bw=2000 * GB,
        source="this project's nvidia-h200 device: one H200",
    ),
}
