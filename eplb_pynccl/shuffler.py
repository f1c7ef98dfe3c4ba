"""Layer 5: the expert-weight shuffler, its public API and the async state machine.

How a rearrangement moves:

1. :func:`~eplb_pynccl.plan_rearrangement` (``planner.py``): which rows move where.
2. :func:`~eplb_pynccl.schedule.build_schedule` (``schedule.py``): rounds of whole layers and,
   per rank and round, the ops by phase (gathers, messages with both ends, copies, scatters).
3. :class:`~eplb_pynccl.executor.Executor` (``executor.py``): this rank's ops on its buffers,
   built once when the rearrangement starts.
4. :class:`RearrangeHandle` (here): launch a round, poll it, apply it, handle errors.

Transactional mode (the default) writes no live row before its layer's exchange has
completed, so after any failure each layer is entirely old or entirely new, and
:class:`~eplb_pynccl.RearrangeError` lists which.
"""

from __future__ import annotations

import hashlib
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from . import _optional
from ._checks import check_bool, check_count, check_ranks_per_node, check_timeout, to_numpy
from ._deadline import DEFAULT_TIMEOUT, poll_until
from ._nccl import cuda as _cuda
from ._nccl import rowcopy as _rowcopy
from .errors import RearrangeError
from .executor import COPY_METHODS, Buffers, Executor
from .planner import RearrangementPlan, plan_rearrangement
from .schedule import (
    DEFAULT_COPY_WAVES,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_PACK_THRESHOLD,
    Layout,
    build_schedule,
)
from .transport import Transport

if TYPE_CHECKING:
    import torch

__all__ = ["ExpertShuffler", "RearrangeStats", "RearrangeHandle"]


class _GathersWithTimeout(Protocol):
    """A transport whose all-gather takes ``timeout=`` (see Transport.all_gather_bytes)."""

    def all_gather_bytes(self, data: bytes, timeout: float | None = None) -> list[bytes]: ...


@dataclass
class RearrangeStats:
    """What one rearrangement did on this rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0  # point-to-point messages posted by this rank (sends + receives)
    local_copies: int = 0  # expert rows copied on this rank (all tensors of a row count once)
    experts_sent: int = 0
    experts_received: int = 0
    rounds: int = 0
    seconds: float = 0.0
    planner_seconds: float = 0.0
    peak_extra_bytes: int = 0  # staging + copy-table (CUDA) / row-index device memory at the peak
    staging_bound: int = 0  # the bound in force (staging_bytes; see ExpertShuffler)
    # host time split (seconds): enqueueing rounds (copies, packing, NCCL calls), waiting for
    # exchanges to complete, enqueueing the copies that apply them
    launch_seconds: float = 0.0
    wait_seconds: float = 0.0
    apply_seconds: float = 0.0
    poll_seconds: float = 0.0  # of wait_seconds: inside the transport's done() (a one-sided
    # transport issues its copies there), not sleeping
    setup_seconds: float = 0.0  # host: schedule, staging, row indices, prepared rounds
    layers_changed: list = field(default_factory=list)
    # ExpertShuffler(profile=True) only: GPU time per phase in ms, summed over rounds, from CUDA
    # events: "pack" (stash and pack copies), "exchange" (the round's messages), "apply" (copies
    # into the live rows), "idle_after_exchange" (exchange done -> apply starts: the host seeing
    # the round complete), "idle_before_round" (previous apply done -> next round starts)
    gpu_ms: dict = field(default_factory=dict)
    # per round, in round order: host microseconds spent launching it (phase A + messages),
    # polling it (inside the transport's done()), applying it (phase C), and the number of
    # host calls into CUDA/NCCL our code made for it (phase A ops + the transport's + phase C)
    round_launch_us: list = field(default_factory=list)
    round_poll_us: list = field(default_factory=list)
    round_apply_us: list = field(default_factory=list)
    round_host_calls: list = field(default_factory=list)
    copy_method: str = ""  # CUDA: "kernel" or "copy_engine" (see ExpertShuffler)
    # CUDA: device bytes of the copy table (24 per copy piece); counted in peak_extra_bytes,
    # outside the staging bound (metadata, like the row indices on the CPU)
    table_bytes: int = 0


class ExpertShuffler:
    """Rearranges expert weights in place across the ranks of a transport.

    Args:
        transport: :class:`NcclTransport`, :class:`TorchTransport`,
            :class:`~eplb_pynccl.IpcTransport` (or another Transport).
        expert_weights: ``expert_weights[layer] = [tensor, ...]``, each tensor shaped
            ``[num_local_experts, ...]`` and contiguous, on the transport's device (TorchTransport
            over gloo also takes CUDA tensors, staged through the host). Tensors keep their
            storage: rearrangement writes into them.
        staging_bytes: bound on extra device memory; default one layer of local experts
            (the largest layer). Larger exchanges are split into rounds of whole layers.
        pack_threshold: tensors whose row is smaller than this many bytes are packed (one
            gather per tensor, one message per peer and tensor); larger rows travel as their
            own messages without a copy. A one-sided transport packs nothing.
        transactional: True (default): no live row is written before its layer's exchange has
            completed, so a failure leaves every layer entirely old or entirely new.
            False: rows nobody else reads are received into directly (less copying).
        max_messages_per_round: cap on p2p messages one rank posts in one NCCL group.
        ranks_per_node: EP ranks per node (at most ep_size): the planner prefers senders on
            the receiver's node.
        timeout: seconds a round may take before the transport is aborted (default: the
            transport's timeout, e.g. the communicator's for NcclTransport).
        profile: record CUDA events around each phase and report GPU time per phase in
            ``RearrangeStats.gpu_ms`` (filled by ``wait()``; costs a few events per round).
        copy_method: how local copies, gathers and scatters run on CUDA: ``"kernel"`` (one
            launch of the row-copy kernel per phase over a device table: one host call per
            phase), ``"copy_engine"`` (one ``cuMemcpyBatchAsync`` per wave of a phase
            preferring copy engines: no SM touched, ~4.5 us of host time per row copy), or
            ``"auto"`` (default: the kernel, or the copy engines with a warning where the
            driver cannot load the kernel).
        copy_ctas: thread blocks per kernel launch (default 16): the SMs a copy phase may
            take from a concurrent forward pass.
        copy_waves: waves of ordered local copies per phase at most (default 8): rows that
            move along chains and cycles of local copies are copied in waves; fewer waves
            stash more of them first (about one row in ``copy_waves`` is copied twice).

    On CUDA, construction also launches the copy kernels once on tiny tensors (~0.1 s), so
    that lazy module loading does not land in the first rearrangement. With a one-sided
    transport (IpcTransport), construction is collective: every rank shares its weights'
    memory with its peers.
    """

    _pinned_free: torch.cuda.Event | None
    copy_method: str

    def __init__(
        self,
        transport: Transport,
        expert_weights,
        *,
        staging_bytes: int | None = None,
        pack_threshold: int = DEFAULT_PACK_THRESHOLD,
        transactional: bool = True,
        max_messages_per_round: int = DEFAULT_MAX_MESSAGES,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
        profile: bool = False,
        copy_method: str = "auto",
        copy_ctas: int = 16,
        copy_waves: int = DEFAULT_COPY_WAVES,
    ) -> None:
        _check_transport(transport)
        torch = _optional.torch("ExpertShuffler")
        self._torch = torch
        self.transport = transport
        self.rank = transport.rank
        self.ep_size = transport.world_size
        layers, rows = _checked_weights(torch, transport, expert_weights)
        staging_bytes = self._take_options(
            staging_bytes=staging_bytes,
            pack_threshold=pack_threshold,
            transactional=transactional,
            max_messages_per_round=max_messages_per_round,
            ranks_per_node=ranks_per_node,
            timeout=timeout,
            copy_method=copy_method,
            copy_ctas=copy_ctas,
            copy_waves=copy_waves,
        )
        self.weights = layers
        self.num_local = rows
        self.row_bytes = [[t[0].nbytes if rows else 0 for t in lw] for lw in layers]
        self._bufs = Buffers(torch, [t for lw in layers for t in lw])
        words = iter(self._bufs.words)  # buffer order: layer by layer, tensor by tensor
        self.layout = Layout.of(
            self.row_bytes, rows, [[next(words).element_size() for _ in lw] for lw in layers]
        )
        self._staging_auto = staging_bytes is None
        self.staging_bytes = self.layout.layer_bytes() if staging_bytes is None else staging_bytes
        self.device = layers[0][0].device
        self._is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._is_cuda else None
        self.profile = bool(profile) and self._is_cuda
        self._active: RearrangeHandle | None = None
        self._failed: BaseException | None = None
        self._failed_peers: list[int] = []
        self._gather_takes_timeout = _takes_timeout(transport.all_gather_bytes)
        self._verified = False  # a verify has passed on this shuffler (shapes are fixed)
        self._shapes_digest = _shapes_digest(layers)
        self._pinned = None  # host buffer of the copy table (CUDA), see _host_int64
        self._pinned_free = None  # event after the last copy out of it
        if self._is_cuda:
            self.copy_method = self._copy_method(self.copy_method)
        transport.register_buffers(self._bufs.tensors)

    def _take_options(
        self,
        *,
        staging_bytes,
        pack_threshold,
        transactional,
        max_messages_per_round,
        ranks_per_node,
        timeout,
        copy_method,
        copy_ctas,
        copy_waves,
    ) -> int | None:
        """The constructor's options checked, in the order they are listed, and kept; passed by
        name (most are ints: a shifted position would pass the checks). Returns
        ``staging_bytes`` checked (None: one layer's bytes, once the layout is known)."""
        if staging_bytes is not None:
            staging_bytes = check_count(staging_bytes, "staging_bytes", minimum=0)
        pack_threshold = check_count(pack_threshold, "pack_threshold", minimum=0)
        transactional = check_bool(transactional, "transactional")
        max_messages_per_round = check_count(max_messages_per_round, "max_messages_per_round")
        ranks_per_node = check_ranks_per_node(ranks_per_node, self.ep_size)
        if timeout is None:
            timeout = getattr(self.transport, "timeout", DEFAULT_TIMEOUT)
        timeout = check_timeout(timeout)
        if copy_method not in ("auto", *COPY_METHODS):
            raise ValueError(
                f"copy_method must be 'auto', 'kernel' or 'copy_engine', got {copy_method!r}"
            )
        copy_ctas = check_count(copy_ctas, "copy_ctas")
        self.copy_waves = check_count(copy_waves, "copy_waves")
        self.pack_threshold = pack_threshold
        self.transactional = transactional
        self.max_messages = max_messages_per_round
        self.ranks_per_node = ranks_per_node
        self.timeout = float(timeout)
        self.copy_ctas = copy_ctas
        self.copy_method = copy_method
        return staging_bytes

    # ------------------------------------------------------------------------------------
    def plan(self, old_map, new_map) -> RearrangementPlan:
        """The plan this shuffler would execute (pure; also validates the maps)."""
        return plan_rearrangement(
            old_map, new_map, self.ep_size, ranks_per_node=self.ranks_per_node
        )

    def schedule(self, plan: RearrangementPlan):
        """The schedule this shuffler would execute for ``plan`` (pure; every rank's ops)."""
        return build_schedule(
            plan,
            self.layout,
            staging_bytes=None if self._staging_auto else self.staging_bytes,
            pack_threshold=self.pack_threshold,
            transactional=self.transactional,
            max_messages_per_round=self.max_messages,
            one_sided=bool(getattr(self.transport, "one_sided", False)),
            copy_waves=self.copy_waves,
        )

    def rearrange(
        self, old_map, new_map, *, verify: bool | None = None, stream=None
    ) -> RearrangeStats:
        """Move the experts so every rank holds what ``new_map`` assigns to its slots (in place).

        Synchronous: returns when every layer is done. ``stream`` (torch.cuda.Stream, default:
        the current stream) is where the switch to new weights is ordered; the exchange runs on
        the shuffler's own stream. Raises ValueError/TypeError before anything moves on bad
        input, RearrangeError (naming complete and still-old layers, and the peers) on any
        failure of the transport: in the verification (within the shuffler's timeout) or the
        exchange. After a RearrangeError the transport is aborted and every later call on
        this shuffler raises one at once (required reset: make a new transport and shuffler).

        ``verify`` (collective check that every rank has the same maps, ep_size and weight
        shapes/dtypes): None (default) verifies the first synchronous rearrangement of a
        shuffler and every rearrangement over a host transport (gloo), where ranks that
        disagree would otherwise kill each other's process; True always; False never.
        """
        h = self.rearrange_async(
            old_map, new_map, verify=self._verify_default(verify, sync=True), stream=stream
        )
        h.wait()
        return h.stats

    def rearrange_async(
        self, old_map, new_map, *, verify: bool | None = None, stream=None
    ) -> RearrangeHandle:
        """Start a rearrangement and return at once; drive it with ``handle.step()`` between
        forward steps (same call order on every rank), or ``handle.wait()``.

        Forced transactional: live weights change only inside ``step()``/``wait()``, on the
        caller's stream, one whole layer at a time. ``verify`` (None: only over a host
        transport such as gloo) blocks until every rank has called ``rearrange_async`` for
        this rearrangement: with it, call it at the same forward step on every rank.
        """
        if self._failed is not None:
            raise RearrangeError(
                f"this shuffler's transport failed earlier ({self._failed!r}); make a new "
                "communicator and shuffler",
                [],
                range(len(self.weights)),
                self._failed_peers,
                self._failed,
            )
        if self._active is not None and not self._active.done:
            raise RuntimeError(
                "a rearrangement is already in progress on this shuffler; finish it first"
            )
        verify = self._verify_default(verify, sync=False)
        t0 = time.perf_counter()
        plan, err = None, None
        try:
            plan = self.plan(old_map, new_map)
            if plan.num_layers != len(self.weights):
                raise ValueError(
                    f"old_map/new_map have {plan.num_layers} layers but expert_weights has {len(self.weights)}"
                )
            if plan.slots_per_rank != self.num_local:
                raise ValueError(
                    f"maps give {plan.slots_per_rank} slots per rank (num_physical {plan.num_physical} / "
                    f"ep_size {self.ep_size}) but the weight tensors have {self.num_local} expert rows"
                )
        except (ValueError, TypeError) as e:
            err = e
        planner_s = time.perf_counter() - t0
        if verify:
            # every rank joins, also one whose own checks failed: no peer is left waiting
            self._verify(old_map, new_map, err, plan)
        if err is not None:
            raise err
        assert plan is not None  # no error: planned
        return RearrangeHandle(self, plan, planner_s, stream)

    def _verify_default(self, verify, sync: bool) -> bool:
        if verify is not None:
            return bool(verify)
        return bool(getattr(self.transport, "host_exchange", False)) or (
            sync and not self._verified
        )

    def _verify(self, old_map, new_map, err: BaseException | None, plan) -> None:
        """Collective: every rank's maps/ep_size/rows and weight shapes/dtypes must agree, and
        no rank may have refused the input; otherwise every rank raises ValueError (a rank
        that refused raises its own error). Nothing has moved yet. A failure of the
        transport here (a peer that is gone or never comes, within the shuffler's timeout)
        is a RearrangeError, and the shuffler is failed (see :meth:`_fail_before_moving`)."""
        maps = hashlib.sha256()
        shapes = self._shapes_digest
        if err is None:
            try:
                maps.update(f"ep_size={self.ep_size};rows={self.num_local};".encode())
                maps.update(to_numpy(old_map, "old_map", dtype=np.int64).tobytes())
                maps.update(to_numpy(new_map, "new_map", dtype=np.int64).tobytes())
            except (ValueError, TypeError) as e:
                err = e
        if err is not None:
            maps = hashlib.sha256(f"refused by rank {self.rank}: {err}".encode())
            shapes = maps.digest()
        try:
            everyone = self._all_gather(maps.digest() + shapes)
        except BaseException as e:
            self._fail_before_moving("while verifying (before anything moved)", e, err)
        if err is not None:
            raise err
        differ = []
        for name, part in (
            ("old_map/new_map, ep_size or local expert rows", slice(0, 32)),
            ("expert weight shapes/dtypes", slice(32, 64)),
        ):
            bad = [r for r, d in enumerate(everyone) if d[part] != everyone[self.rank][part]]
            if bad:
                differ.append(f"{name} (ranks {bad} differ from rank {self.rank})")
        if differ:
            raise ValueError(
                "verify=True: ranks disagree or refused the input: "
                + "; ".join(differ)
                + "; nothing was moved"
            )
        self._verified = True

    def _copy_method(self, asked: str) -> str:
        """Load the row-copy kernel now (the driver compiles its PTX once per process and
        device, a few ms that belong at set-up, not in the first rearrangement)."""
        if asked == "copy_engine":
            return asked
        err = _rowcopy.kernel_error(self.device.index)
        if err is None:
            return "kernel"
        if asked == "kernel":
            raise RuntimeError(f"copy_method='kernel': the row-copy kernel did not load: {err}")
        warnings.warn(
            f"eplb_pynccl: the row-copy kernel did not load ({err}); local copies use the "
            "copy engines (~4.5 us of host time per row copy)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "copy_engine"

    def _all_gather(self, data: bytes) -> list[bytes]:
        """The transport's all-gather, bounded by this shuffler's timeout where the transport
        takes one (its ``all_gather_bytes(data, timeout=...)``), else by its own."""
        if self._gather_takes_timeout:
            timed = cast("_GathersWithTimeout", self.transport)
            return timed.all_gather_bytes(data, timeout=self.timeout)
        return self.transport.all_gather_bytes(data)

    def _fail_before_moving(self, where: str, e: BaseException, refused=None):
        """A transport failure before any row moved: abort the transport, fail the shuffler
        (every later call raises at once, so no retry can pair with a late peer's first
        call), raise the RearrangeError: every layer still old, every other rank named."""
        peers = [r for r in range(self.ep_size) if r != self.rank]
        self.mark_failed(e, peers)
        msg = f"rearrangement failed on rank {self.rank} {where}: {type(e).__name__}: {e}"
        if refused is not None:
            msg += f"; this rank had also refused the input: {refused}"
        raise RearrangeError(msg, [], range(len(self.weights)), peers, e) from e

    # ---- package-internal: what a RearrangeHandle uses of its shuffler ------------------
    @property
    def torch_module(self):
        """The torch module the weights belong to."""
        return self._torch

    @property
    def on_cuda(self) -> bool:
        """Whether the weights are on a CUDA device."""
        return self._is_cuda

    @property
    def exchange_stream(self):
        """The shuffler's own CUDA stream (the exchange runs there); None on the CPU."""
        return self._stream

    def caller_stream(self, stream=None):
        """``stream``, or the current CUDA stream of the weights' device (CUDA only)."""
        return stream or self._torch.cuda.current_stream(self.device)

    def executor(self, sched, rs) -> Executor:
        """The executor of this rank's rounds ``rs`` of ``sched`` over this shuffler's weights;
        where it copies its table out of the pinned host buffer, that buffer is marked busy
        until the work enqueued so far on the exchange stream has run."""
        ex = Executor(
            self._torch,
            sched,
            rs,
            self._bufs,
            self.transport,
            self.device,
            self._stream,
            self._host_int64,
            copy_method=self.copy_method,
            copy_ctas=self.copy_ctas,
        )
        if ex.uses_pinned:  # its pinned host buffer is free once this has run
            self._pinned_free = self._torch.cuda.Event()
            self._pinned_free.record(self._stream)
        return ex

    def attach(self, handle: RearrangeHandle) -> None:
        """``handle`` is this shuffler's rearrangement in progress."""
        self._active = handle

    def detach(self, handle: RearrangeHandle) -> None:
        """``handle`` has finished or failed: no rearrangement is in progress (if it was)."""
        if self._active is handle:
            self._active = None

    def mark_failed(self, e: BaseException, peers) -> None:
        """Required reset: the transport is aborted and this shuffler refuses every later
        rearrangement (make a new transport and shuffler)."""
        self._failed = e
        self._failed_peers = sorted(peers)
        try:
            self.transport.abort()
        except Exception:  # noqa: BLE001 - aborting is best effort; the shuffler is failed either way
            pass

    def _host_int64(self, values: np.ndarray):
        """``values`` (the row indices on the CPU, the copy table on CUDA) as an int64 host
        tensor; on CUDA in a pinned buffer kept by the
        shuffler (pinning a fresh one per rearrangement cost ~0.5 ms of host time), reused
        once the previous rearrangement's copy out of it has completed."""
        torch = self._torch
        values = values.astype(np.int64, copy=False)
        if not self._is_cuda:
            return torch.from_numpy(values)
        n = values.size
        buf = self._pinned
        if buf is None or buf.numel() < n:
            buf = self._pinned = torch.empty(
                max(n, 2 * (0 if buf is None else buf.numel()), 4096),
                dtype=torch.int64,
                pin_memory=True,
            )
            self._pinned_free = None
        elif self._pinned_free is not None:
            self._pinned_free.synchronize()  # already complete unless a rearrangement was cut short
        buf[:n].numpy()[:] = values
        return buf[:n]


def _check_transport(transport) -> None:
    if not isinstance(transport, Transport):
        raise TypeError(
            f"transport must be an eplb_pynccl Transport, got {type(transport).__name__}"
        )


def _checked_weights(torch, transport: Transport, expert_weights) -> tuple[list, int]:
    """``expert_weights`` checked (a non-empty list per layer of contiguous, non-empty tensors
    the transport takes, all with the same leading expert rows): the layers and that row count."""
    if isinstance(expert_weights, (str, bytes)) or not hasattr(expert_weights, "__len__"):
        raise TypeError("expert_weights must be a list (per layer) of lists of tensors")
    if len(expert_weights) == 0:
        raise ValueError("expert_weights is empty: give at least one layer")
    layers = []
    rows = None
    for li, ws in enumerate(expert_weights):
        if isinstance(ws, torch.Tensor) or not hasattr(ws, "__len__") or len(ws) == 0:
            raise TypeError(f"expert_weights[{li}] must be a non-empty list of tensors")
        lw = []
        for ti, t in enumerate(ws):
            name = f"expert_weights[{li}][{ti}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"{name} must have a leading expert dimension, got a 0-d tensor")
            if t.numel() == 0:
                raise ValueError(
                    f"{name} is empty (shape {tuple(t.shape)}): every weight tensor holds "
                    "at least one expert row of at least one element"
                )
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous")
            transport.check_tensor(t, name)
            if rows is None:
                rows = t.shape[0]
            if t.shape[0] != rows:
                raise ValueError(
                    f"{name} has {t.shape[0]} expert rows but expert_weights[0][0] has {rows}: "
                    "every weight tensor holds the same local experts"
                )
            lw.append(t)
        layers.append(lw)
    assert rows is not None  # expert_weights[0][0] exists (checked above)
    return layers, rows


def _shapes_digest(layers) -> bytes:
    """A digest of every weight tensor's shape and dtype, layer by layer (what verify compares)."""
    shapes = hashlib.sha256()
    for lw in layers:
        for t in lw:
            shapes.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        shapes.update(b"|")
    return shapes.digest()


def _takes_timeout(fn) -> bool:
    try:
        return "timeout" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _mark(torch, stream):
    e = torch.cuda.Event(enable_timing=True)
    e.record(stream)
    return e


class _Round:
    __slots__ = ("index", "layers", "peers", "tround", "launched_at", "done", "marks")

    def __init__(self, index, layers, peers):
        self.index = index
        self.layers = layers
        self.peers = peers
        self.tround = None
        self.launched_at = 0.0
        self.done = False
        self.marks = {}  # profile=True: phase name -> CUDA event


def _count(st: RearrangeStats, sched, rs) -> None:
    """The schedule's totals for this rank (``rs``) into ``st``."""
    st.staging_bound = sched.staging_bound
    st.rounds = len(sched.rounds)
    st.layers_changed = sched.layers_changed
    for ro in rs.rounds:
        st.messages += len(ro.sends) + len(ro.recvs)
        st.bytes_sent += ro.bytes_sent
        st.bytes_received += ro.bytes_received
        st.experts_sent += ro.experts_sent
        st.experts_received += ro.experts_received
        st.local_copies += ro.local_copies
    st.peak_extra_bytes = rs.peak_extra_bytes


class RearrangeHandle:
    """A rearrangement in progress (see :meth:`ExpertShuffler.rearrange_async`).

    ``step()`` launches and applies rounds; ``done``; ``wait(timeout)``; ``applied_layers``;
    ``stats``. After a failure every call raises the same :class:`RearrangeError`.
    """

    def __init__(
        self, shuffler: ExpertShuffler, plan: RearrangementPlan, planner_s: float, stream
    ) -> None:
        self.s = shuffler
        self.plan = plan
        self.stats = st = RearrangeStats(planner_seconds=planner_s)
        self._t0 = t_setup = time.perf_counter()
        self._user_stream = stream
        self.schedule = sched = shuffler.schedule(plan)
        rs = sched.rank(shuffler.rank)
        _count(st, sched, rs)
        self._rounds = [_Round(i, ro.layers, ro.peers) for i, ro in enumerate(rs.rounds)]
        self._next = 0  # next round to launch
        self._inflight: _Round | None = None
        self.applied_layers: list[int] = []
        self._error: RearrangeError | None = None
        self._release: int | None = None  # driver event after the last consumer of staging
        self._ends: list[int] = []  # CUDA: the release event (driver handle) of each round
        self._drv: _cuda.Driver | None = None
        self._exec: Executor | None = None
        if rs.rounds:
            self._exec = shuffler.executor(sched, rs)
            self._prepare_rounds(len(rs.rounds))
        shuffler.attach(self)
        st.setup_seconds = time.perf_counter() - t_setup
        if not rs.rounds:
            self._finish()

    def _prepare_rounds(self, n: int) -> None:
        """Per-round stats, and on CUDA each round's release event (a driver event: ~1 us a
        call where torch's cost ~5), made now rather than on the host thread of a step that
        applies a round."""
        st, ex = self.stats, self._exec
        assert ex is not None  # rounds: an executor
        if self.s.on_cuda:
            st.peak_extra_bytes = ex.extra_bytes
            st.table_bytes = ex.table_bytes
            st.copy_method = self.s.copy_method
            self._drv = drv = _cuda.driver()
            assert drv is not None  # CUDA weights: the driver loaded
            drv.set_device(self.s.device.index)
            self._ends = [drv.event_create() for _ in range(n)]
        st.round_launch_us = [0.0] * n
        st.round_poll_us = [0.0] * n
        st.round_apply_us = [0.0] * n
        st.round_host_calls = [
            a + c + int(getattr(ex.rounds[k][1], "host_calls", 0))
            for k, (a, c) in enumerate(ex.host_calls)
        ]

    # ---- public ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._next >= len(self._rounds) and self._inflight is None

    @property
    def pending_layers(self) -> list[int]:
        return [l for r in self._rounds if not r.done for l in r.layers]

    def step(self, wait: bool = False) -> list[int]:
        """Apply the layers whose data has arrived (on the caller's current stream) and launch
        the next round; returns the layers switched to new weights by this call.

        ``wait=False`` (default): never blocks; a round still in flight is left for a later
        call, so how far a rank has got depends on its timing. ``wait=True`` (lockstep): every
        call advances exactly one round: it waits (up to the timeout) for the round in flight,
        applies it and launches the next. Called at the same forward steps on every rank, the
        NCCL launches then come at the same point of every rank's launch sequence, which
        ``NCCL_LAUNCH_ORDER_IMPLICIT`` requires (README, threading model).
        """
        if wait:
            return self._lockstep()
        return self._advance(block=False)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Run to completion (blocking); returns the layers applied by this call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        applied = []
        while not self.done:
            applied += self._advance(block=True, deadline=deadline)
        if self.s.on_cuda:
            self.s.caller_stream(self._user_stream).synchronize()
        self.stats.seconds = time.perf_counter() - self._t0
        if self.s.profile:
            self.stats.gpu_ms = self._phase_times()
        return applied

    def _phase_times(self) -> dict:
        out = {
            "pack": 0.0,
            "exchange": 0.0,
            "apply": 0.0,
            "idle_after_exchange": 0.0,
            "idle_before_round": 0.0,
        }
        prev = None
        for r in self._rounds:
            m = r.marks
            if not {"start", "packed", "exchanged", "apply", "end"} <= m.keys():
                continue
            out["pack"] += m["start"].elapsed_time(m["packed"])
            out["exchange"] += m["packed"].elapsed_time(m["exchanged"])
            out["idle_after_exchange"] += m["exchanged"].elapsed_time(m["apply"])
            out["apply"] += m["apply"].elapsed_time(m["end"])
            if prev is not None:
                out["idle_before_round"] += prev.elapsed_time(m["start"])
            prev = m["end"]
        return {k: round(v, 3) for k, v in out.items()}

    # ---- engine -----------------------------------------------------------------------------
    def _advance(self, block: bool, deadline: float | None = None) -> list[int]:
        def body():
            if self._inflight is None:
                self._launch_next()
            rnd = self._inflight
            applied = self._wait_and_apply(rnd, block, deadline) if rnd is not None else None
            if applied is None:
                return []
            self._launch_next()
            return applied

        return self._guarded(body)

    def _lockstep(self) -> list[int]:
        def body():
            rnd = self._inflight
            # blocking: returns the layers, or raises on timeout / peer error
            applied = self._wait_and_apply(rnd, True, None) if rnd is not None else []
            self._launch_next()
            return applied

        return self._guarded(body)

    def _guarded(self, body) -> list[int]:
        """Run one step of the engine; any failure becomes this handle's RearrangeError."""
        if self._error is not None:
            raise self._error
        try:
            applied = body()
            if self.done:
                self._finish()
            return applied
        except RearrangeError:
            raise
        except BaseException as e:
            self._fail(e)
            assert self._error is not None  # _fail set it
            raise self._error from e

    def _launch_next(self) -> None:
        if self._next < len(self._rounds):
            self._launch(self._rounds[self._next])
            self._next += 1

    def _wait_and_apply(self, rnd: _Round, block: bool, deadline: float | None):
        """Apply ``rnd`` once it has arrived; returns its layers, or None if not yet."""
        t_wait = time.perf_counter()
        arrived = self._arrived(rnd, block, deadline)
        self.stats.wait_seconds += time.perf_counter() - t_wait
        if not arrived:
            return None
        t_apply = time.perf_counter()
        self._apply(rnd)
        dt = time.perf_counter() - t_apply
        self.stats.apply_seconds += dt
        self.stats.round_apply_us[rnd.index] += dt * 1e6
        self._inflight = None
        return list(rnd.layers)

    def _fail(self, e: BaseException) -> None:
        rnd = self._inflight
        peers = set() if rnd is None else set(rnd.peers)
        partial = [] if self.s.transactional or rnd is None else list(rnd.layers)
        msg = f"rearrangement failed on rank {self.s.rank}: {type(e).__name__}: {e}"
        if partial:
            msg += f"; non-transactional mode: layers {partial} may be partly written"
        self._error = RearrangeError(msg, self.applied_layers, self.pending_layers, peers, e)
        self.s.mark_failed(e, peers)
        self._release_exec()
        self._inflight = None
        self.s.detach(self)

    def _finish(self) -> None:
        self._release_exec()
        self.s.detach(self)

    def _release_exec(self) -> None:
        if self._exec is not None:
            if self._release is not None:
                # staging and the table were allocated on the exchange stream: once it has
                # waited for the last apply (on the caller's streams), the allocator may hand
                # their memory to that stream's later work (no record_stream per round)
                stream = self.s.exchange_stream
                assert self._drv is not None and stream is not None  # CUDA rounds
                self._drv.stream_wait_event(stream.cuda_stream, self._release)
            self._exec.release()
            self._exec = None
        if self._ends:  # work recorded on them completes first (cuEventDestroy)
            assert self._drv is not None  # made with them
            for e in self._ends:
                self._drv.event_destroy(e)
            self._ends = []
            self._release = None

    def _launch(self, rnd: _Round) -> None:
        t_start = time.perf_counter()
        s = self.s
        torch = s.torch_module
        stream = s.exchange_stream
        # in flight from here: a failure inside launch (a host transport's exchange) names
        # this round's peers
        self._inflight = rnd
        rnd.launched_at = time.monotonic()
        # every call takes its stream explicitly (no torch stream context: ~10 us each way)
        if stream is not None:
            drv = self._drv
            assert drv is not None  # CUDA rounds: made with the release events
            h = stream.cuda_stream
            if self._release is not None:  # staging is free again
                drv.stream_wait_event(h, self._release)
            else:  # first round: after the caller's earlier work on the weights (round 0's
                # release event, recorded again when round 0 is applied)
                user = s.caller_stream(self._user_stream)
                drv.event_record(self._ends[0], user.cuda_stream)
                drv.stream_wait_event(h, self._ends[0])
        if s.profile:
            rnd.marks["start"] = _mark(torch, stream)
        ex = self._exec
        assert ex is not None  # rounds to launch: an executor
        rnd.tround = ex.launch_pre(rnd.index)
        if s.profile:
            rnd.marks["packed"] = _mark(torch, stream)
        ex.launch_messages(rnd.index, rnd.launched_at + s.timeout)
        if s.profile:
            rnd.marks["exchanged"] = _mark(torch, stream)
        dt = time.perf_counter() - t_start
        self.stats.launch_seconds += dt
        self.stats.round_launch_us[rnd.index] += dt * 1e6

    def _arrived(self, rnd: _Round, block: bool, deadline: float | None) -> bool:
        s = self.s
        limit = rnd.launched_at + s.timeout
        if deadline is not None:
            limit = min(limit, deadline)

        def done() -> bool:
            t0 = time.perf_counter()
            ok = rnd.tround.done()
            dt = time.perf_counter() - t0
            self.stats.poll_seconds += dt
            self.stats.round_poll_us[rnd.index] += dt * 1e6
            return ok

        def expired() -> None:
            s.transport.abort()
            raise TimeoutError(
                f"round {rnd.index} (layers {rnd.layers}, peers {rnd.peers}) did not complete "
                f"within {limit - rnd.launched_at:.1f} s; the transport was aborted"
            )

        if not block:
            if done():
                return True
            if time.monotonic() > limit:
                expired()
            return False
        # short cap: every round's apply (and the next round) waits for the host to see it
        return poll_until(done, limit, expired, cap=1e-4)

    def _apply(self, rnd: _Round) -> None:
        s = self.s
        torch = s.torch_module
        stream = s.exchange_stream
        drv = self._drv
        if s.on_cuda:
            assert drv is not None and stream is not None  # CUDA rounds: both made
            cs = s.caller_stream(self._user_stream)
            h = cs.cuda_stream
            ev = rnd.tround.end_event()
            if ev is None:  # the transport made its stream wait for the round's end
                if s.profile:
                    rnd.marks["exchanged"] = _mark(torch, stream)
                ev = self._ends[rnd.index]  # re-recorded below, after this wait is enqueued
                drv.event_record(ev, stream.cuda_stream)
            drv.stream_wait_event(h, ev)
            if s.profile:
                rnd.marks["apply"] = _mark(torch, cs)
        else:
            cs = None
        # CUDA phases take their stream explicitly (no torch stream context: ~10 us each way)
        ex = self._exec
        assert ex is not None  # a round to apply: an executor
        ex.apply(rnd.index, cs)
        if cs is not None:
            assert drv is not None  # CUDA: set above
            self._release = self._ends[rnd.index]
            drv.event_record(self._release, h)
            if s.profile:
                rnd.marks["end"] = _mark(torch, cs)
        rnd.done = True
        self.applied_layers.extend(rnd.layers)
