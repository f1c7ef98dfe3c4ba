"""Layer 3: one small interface for a round of point-to-point messages, and its transports.

A *round* is a list of sends and a list of receives, each ``(peer, buffer)``, posted together.
Between any two ranks, the i-th send of one matches the i-th receive of the other: callers
list them in the same order on both sides (the schedule guarantees this).

Two ways to use a transport:

* ``exchange(sends, recvs, stream=None, timeout=None)``: post one round of tensors now.
* ``prepare_round(sends, recvs, remote=None)``: validate and build a round once, then
  ``launch(stream, deadline)`` it and poll ``done()``: what the shuffler does for every round
  of a rearrangement (see :class:`TransportRound`). ``remote`` carries the schedule's
  messages (both ends of every message) for transports that read their peers' memory.

Transports:

* :class:`NcclTransport` drives this package's :class:`~eplb_pynccl.Communicator` (CUDA
  tensors; rounds are prepared p2p batches, one NCCL group each).
* :class:`TorchTransport` drives ``torch.distributed`` point-to-point on a process group: a
  gloo group moves CPU tensors, and CUDA tensors staged through host memory; an nccl group
  moves CUDA tensors. Every wait keeps the timeout; on a timeout the group is aborted.
* :class:`~eplb_pynccl.ipc.IpcTransport` (``eplb_pynccl/ipc.py``): copy engines over CUDA IPC
  between the GPUs of one node, NCCL for peers on other nodes.
"""

from __future__ import annotations

import abc
import datetime
import time
from typing import TYPE_CHECKING, Any

from . import _optional
from ._checks import check_timeout
from ._deadline import DEFAULT_TIMEOUT, Deadline, default_timeout, poll_until
from ._nccl import cuda as _cuda
from .communicator import Communicator

if TYPE_CHECKING:
    import torch


__all__ = ["Transport", "TransportRound", "NcclTransport", "TorchTransport"]


class TransportRound(abc.ABC):
    """One prepared round: ``launch(stream, deadline)`` once, then ``done()`` until True.

    ``launch`` enqueues the round on ``stream`` (CUDA) or runs it to completion (host
    transports, which raise TimeoutError past ``deadline``, a ``time.monotonic()`` value).
    ``done()`` never blocks: True once this rank's receives have landed and its own buffers
    are no longer read by the round (for a one-sided transport: every peer that reads this
    rank's rows has finished). It raises on a transport error. ``peers``: the ranks this rank
    exchanges with in the round (for error reports)."""

    peers: list

    @abc.abstractmethod
    def launch(self, stream, deadline: float) -> None: ...

    @abc.abstractmethod
    def done(self) -> bool: ...

    def end_event(self) -> int | None:
        """A CUDA driver event (handle) recorded after the round's work on this rank, or None:
        the shuffler orders the round's apply after it (one ``cuStreamWaitEvent``)."""
        return None

    def release(self) -> None:
        """Free what the round holds beyond memory (captured graphs), once it is not needed
        again; work of it still in flight completes first. The default holds nothing."""
        return None


class Transport(abc.ABC):
    """What the shuffler needs from a transport.

    ``timeout``: seconds any wait of this transport may take (default ``$EPLB_PYNCCL_TIMEOUT``
    or 600). ``accepts_raw``: buffers may be raw ``(pointer, nbytes)`` device buffers.
    ``one_sided``: the receiver reads its peers' rows itself (the schedule then packs
    nothing, and :meth:`register_buffers` must be called, collectively, before rounds).
    ``host_exchange``: rounds complete inside ``launch`` on the host (gloo): every rank's host
    meets its peers there."""

    rank: int
    world_size: int
    timeout: float = DEFAULT_TIMEOUT
    accepts_raw = False
    one_sided = False
    host_exchange = False

    @property
    @abc.abstractmethod
    def device(self):
        """The torch.device whose tensors this transport moves without staging."""

    @abc.abstractmethod
    def check_tensor(self, t, name: str) -> None:
        """Raise ValueError (naming ``name``) if this transport cannot move tensor ``t``."""

    @abc.abstractmethod
    def exchange(
        self,
        sends: list[tuple[int, Any]],
        recvs: list[tuple[int, Any]],
        stream=None,
        timeout: float | None = None,
    ) -> None:
        """Post one grouped round. For CUDA transports the work is enqueued on ``stream`` (a
        torch.cuda.Stream; None = current) and this returns once enqueued; host transports
        return when the round is complete, or raise TimeoutError after ``timeout`` seconds
        (default: the transport's) with the transport aborted."""

    @abc.abstractmethod
    def wait(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        """Block until the work enqueued on ``stream`` is done; raise on failure or timeout
        (after making further use of the transport fail fast)."""

    @abc.abstractmethod
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (equal lengths), in rank order. Collective. A transport may
        take ``timeout=`` (seconds, default its own) as well: the shuffler then bounds its
        collective checks by its own timeout."""

    # ---- the shuffler's path, with defaults built on exchange() ------------------------
    def prepare_round(self, sends, recvs, remote=None) -> TransportRound:
        """A round of these messages, built once (see :class:`TransportRound`)."""
        return _ExchangeRound(self, sends, recvs)

    def register_buffers(self, tensors: list) -> None:
        """The tensors rounds will read and write (buffer ``i`` = ``tensors[i]``). Collective
        for one-sided transports (they share their buffers with their peers); a no-op here."""
        return None

    def poll_error(self) -> None:
        """Raise (after aborting) if the transport has failed asynchronously."""
        return None

    def abort(self, why: str = "aborted by the caller") -> None:
        """Stop using the transport: pending work is cancelled where that is possible.
        ``why`` is kept where the transport reports it on later use."""
        return None


def round_peers(sends, recvs) -> list:
    """The sorted peers a round's ``(peer, buffer)`` sends and receives touch."""
    return sorted({p for p, _ in sends} | {p for p, _ in recvs})


class _EventRound(TransportRound):
    """A round enqueued on a CUDA stream (or run on the host) that is complete once one event
    recorded after it has: ``done()`` is one event query. ``_issue`` enqueues the round;
    ``_settled()`` is False while the transport is still handing it to the stream (a
    non-blocking NCCL group): the event is then recorded at the first ``done()`` after."""

    t: Transport
    _stream = None  # the raw stream handle once launched on one
    _event: int | None = None  # the driver event, made at the first launch on a stream
    _recorded = False
    _drv: Any = None

    def _issue(self, stream, deadline: float) -> None:
        raise NotImplementedError

    def _settled(self) -> bool:
        return True

    def launch(self, stream, deadline: float) -> None:
        self._issue(stream, deadline)
        self._recorded = False
        if stream is None:
            self._stream = None
            return
        drv = _cuda.driver()
        assert drv is not None  # a CUDA stream: the driver loaded
        if self._event is None:
            drv.set_device(stream.device.index)
            self._event = drv.event_create()
        self._drv, self._stream = drv, stream.cuda_stream
        if self._settled():
            drv.event_record(self._event, self._stream)
            self._recorded = True

    def done(self) -> bool:
        if self._stream is None:  # not launched, or a host round: complete when launch returned
            return True
        if not self._recorded:
            if not self._settled():
                return False
            self._drv.event_record(self._event, self._stream)
            self._recorded = True
        if self._drv.event_done(self._event):
            return True
        self.t.poll_error()
        return False

    def end_event(self) -> int | None:
        return self._event if self._recorded else None

    def release(self) -> None:
        if self._event is not None:  # recorded work completes first (cuEventDestroy)
            self._drv.event_destroy(self._event)
            self._event = None


class _ExchangeRound(_EventRound):
    """A round through ``transport.exchange``."""

    def __init__(self, transport: Transport, sends, recvs) -> None:
        self.t = transport
        self.sends, self.recvs = sends, recvs
        self.peers = round_peers(sends, recvs)

    def _issue(self, stream, deadline: float) -> None:
        self.t.exchange(
            self.sends, self.recvs, stream, timeout=max(0.0, deadline - time.monotonic())
        )


def wait_for_stream(t: Transport, stream, timeout: float, aborted: str = "") -> None:
    """Return once the work queued so far on ``stream`` (a torch CUDA stream) has completed;
    past ``timeout`` seconds abort ``t`` and raise TimeoutError naming its rank (``aborted``:
    what the abort did, appended to the message)."""
    torch = _optional.torch()
    limit = check_timeout(timeout)
    ev = torch.cuda.Event()
    ev.record(stream)
    what = f"stream work not done after {limit:.3g} s"

    def expired() -> None:
        t.abort(what)
        raise TimeoutError(f"rank {t.rank}: {what}{aborted}")

    poll_until(ev.query, Deadline(limit), expired)


def _tagged(msgs) -> list:
    """``(peer, buffer)`` messages as ``(peer, buffer, tag)``: the i-th message to (or from)
    a peer has tag i, so both ends agree on the order for backends that match by tag."""
    count: dict[int, int] = {}
    out = []
    for peer, t in msgs:
        k = count[peer] = count.get(peer, -1) + 1
        out.append((peer, t, k))
    return out


class _HostRound(TransportRound):
    """A gloo round of CPU tensors: tagged once when prepared; ``launch`` posts the receives
    then the sends straight on the group and returns when every one has completed."""

    def __init__(self, t: TorchTransport, sends, recvs) -> None:
        self.t = t
        self.peers = round_peers(sends, recvs)
        self.sends, self.recvs = _tagged(sends), _tagged(recvs)

    def launch(self, stream, deadline: float) -> None:
        self.t._run_host(self.sends, self.recvs, deadline, self.peers)

    def done(self) -> bool:
        return True


class NcclTransport(Transport):
    """Rounds through an eplb_pynccl :class:`Communicator` (one NCCL group per round).

    Buffers may be tensors or raw ``(pointer, nbytes)`` device buffers (``accepts_raw``). A
    prepared round is a :meth:`Communicator.prepare_p2p` batch: validated once, launched with
    one ctypes call per message."""

    accepts_raw = True

    def __init__(self, communicator: Communicator) -> None:
        if not isinstance(communicator, Communicator):
            raise TypeError(
                f"communicator must be an eplb_pynccl.Communicator, got {type(communicator).__name__}"
            )
        self.comm = communicator
        self.rank = communicator.rank
        self.world_size = communicator.world_size
        self._gather_stream: torch.cuda.Stream | None = None

    @property
    def timeout(self) -> float:  # type: ignore[override]  # read-only: the communicator's
        return self.comm.timeout

    @property
    def device(self):
        return _optional.torch("NcclTransport").device("cuda", self.comm.device)

    def check_tensor(self, t, name: str) -> None:
        if t.device.type != "cuda" or t.device.index != self.comm.device:
            raise ValueError(
                f"{name} is on {t.device}, but the NCCL transport's communicator is on cuda:{self.comm.device}"
            )

    def exchange(
        self, sends, recvs, stream: torch.cuda.Stream | None = None, timeout: float | None = None
    ) -> None:
        s = _optional.torch().cuda.current_stream(self.comm.device) if stream is None else stream
        self.comm.p2p([(t, p) for p, t in sends], [(t, p) for p, t in recvs], s.cuda_stream)

    def prepare_round(self, sends, recvs, remote=None) -> TransportRound:
        return _NcclRound(self, sends, recvs)

    def wait(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        h = None if stream is None else stream.cuda_stream
        self.comm.wait(h, timeout)

    def poll_error(self) -> None:
        """Raise (after aborting the communicator) if NCCL reported an asynchronous error."""
        err = self.comm.async_error()
        if err is not None:
            self.comm.abort()
            raise err

    def abort(self, why: str = "aborted by the caller") -> None:
        self.comm.abort()

    def all_gather_bytes(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        """On a stream of its own: waits for the tiny all-gather only, not for the caller's
        compute stream (up to ``timeout`` seconds, default the communicator's)."""
        torch = _optional.torch()
        n = len(data)
        if self._gather_stream is None:
            self._gather_stream = torch.cuda.Stream(self.device)
        stream = self._gather_stream
        with torch.cuda.stream(stream):
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            out = torch.empty(n * self.world_size, dtype=torch.uint8, device=self.device)
            self.comm.all_gather(buf, out, stream=stream.cuda_stream)
            self.comm.wait(stream.cuda_stream, timeout)
            host = out.cpu().numpy().tobytes()
        return [host[i * n : (i + 1) * n] for i in range(self.world_size)]


class _NcclRound(_EventRound):
    """One prepared NCCL group; a non-blocking communicator's launch settles lazily."""

    t: NcclTransport

    def __init__(self, t: NcclTransport, sends, recvs) -> None:
        self.t = t
        self.peers = round_peers(sends, recvs)
        self.batch = t.comm.prepare_p2p([(b, p) for p, b in sends], [(b, p) for p, b in recvs])
        # NCCL calls per launch: group start/end + one per message, and the end event
        self.host_calls = (2 + len(sends) + len(recvs) if (sends or recvs) else 0) + 1

    def _issue(self, stream, deadline: float) -> None:
        self.batch.launch(stream.cuda_stream)

    def _settled(self) -> bool:
        return self.t.comm.launch_settled()


class TorchTransport(Transport):
    """Rounds through ``torch.distributed`` point-to-point on ``group`` (default: the world).

    gloo: CPU tensors move directly; CUDA tensors are staged through host memory (the engines'
    "gloo" option); a round completes on the host. nccl: CUDA tensors on the current device;
    a round is enqueued on the stream.

    ``timeout`` (seconds; default ``$EPLB_PYNCCL_TIMEOUT`` or 600) bounds every wait. Past
    it the process group is aborted (``ProcessGroup.abort``: a peer that never posts its side
    leaves operations pending that no later call could match) and TimeoutError names the
    peers; the transport refuses further use.
    """

    def __init__(self, group=None, timeout: float | None = None) -> None:
        torch = _optional.torch("TorchTransport")
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchTransport needs torch.distributed initialised (init_process_group)"
            )
        self.timeout = default_timeout() if timeout is None else check_timeout(timeout)
        self.group = group
        self.backend = str(dist.get_backend(group)).lower()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r
            for r in range(self.world_size)
        ]
        self._cuda_capable = "nccl" in self.backend
        self.host_exchange = not self._cuda_capable
        self._failed: str | None = None
        # gloo: the group's own send/recv (torch.distributed's isend/irecv and
        # batch_isend_irecv call the same methods after Python checks: 13 vs 9 us of CPU per
        # message posted, measured on 2 gloo ranks)
        self._pg = (
            None if self._cuda_capable else (group if group is not None else dist.group.WORLD)
        )

    @property
    def device(self):
        torch = _optional.torch()
        if self._cuda_capable:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_tensor(self, t, name: str) -> None:
        if self._cuda_capable:
            if t.device != self.device:
                raise ValueError(
                    f"{name} is on {t.device}, but the {self.backend} group moves tensors on {self.device}"
                )
        elif t.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"{name} is on {t.device}; a {self.backend} group moves CPU or CUDA (staged) tensors"
            )

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                f"this TorchTransport was aborted ({self._failed}); make a new process group"
            )

    def exchange(
        self, sends, recvs, stream: torch.cuda.Stream | None = None, timeout: float | None = None
    ) -> None:
        self._check_usable()
        torch = _optional.torch()
        dist = torch.distributed
        g = self._global
        staged_back = []
        if not self._cuda_capable:
            # gloo: stage CUDA tensors through host memory.
            hs = []
            for peer, t in sends:
                hs.append((peer, t.cpu() if t.is_cuda else t))
            hr = []
            for peer, t in recvs:
                if t.is_cuda:
                    h = torch.empty(t.shape, dtype=t.dtype)
                    staged_back.append((h, t))
                    hr.append((peer, h))
                else:
                    hr.append((peer, t))
            limit = self.timeout if timeout is None else timeout
            self._run_host(_tagged(hs), _tagged(hr), time.monotonic() + limit, round_peers(hs, hr))
            for h, dst in staged_back:
                dst.copy_(h)
            return
        # Tags keep the per-pair order explicit for backends that match by tag.
        ops = [dist.P2POp(dist.isend, t, g[p], self.group, tag=k) for p, t, k in _tagged(sends)]
        ops += [dist.P2POp(dist.irecv, t, g[p], self.group, tag=k) for p, t, k in _tagged(recvs)]
        if not ops:
            return
        # nccl: enqueued on the stream, completion is the stream's (wait(), or an event)
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            for r in dist.batch_isend_irecv(ops):
                r.wait()

    def prepare_round(self, sends, recvs, remote=None) -> TransportRound:
        """gloo with CPU buffers: the messages tagged once (:class:`_HostRound`); otherwise,
        and in a subclass that overrides :meth:`exchange`, rounds through ``exchange``."""
        direct = type(self).exchange is TorchTransport.exchange
        if self._cuda_capable or not direct or any(t.is_cuda for _, t in (*sends, *recvs)):
            return _ExchangeRound(self, sends, recvs)
        return _HostRound(self, sends, recvs)

    def _post(self, sends, recvs) -> list:
        """gloo: post tagged ``(peer, tensor, tag)`` receives, then sends, on the group; the
        requests in that order."""
        self._check_usable()
        pg = self._pg
        assert pg is not None  # gloo: the group, set at construction
        reqs = [pg.recv([t], p, k) for p, t, k in recvs]
        reqs += [pg.send([t], p, k) for p, t, k in sends]
        return reqs

    def _run_host(self, sends, recvs, deadline: float, peers) -> None:
        """One gloo round of tagged CPU messages, to completion (TimeoutError past
        ``deadline``, a ``time.monotonic()`` value, with the group aborted)."""
        limit = max(0.0, deadline - time.monotonic())
        reqs = self._post(sends, recvs)
        if reqs:
            self._wait_all(reqs, deadline, peers, limit)

    def _wait_all(self, reqs, deadline: float, peers, t: float) -> None:
        """Wait for the requests, each with what is left until the deadline (gloo's work
        reports completion only through wait); past it abort the group and raise."""
        for r in reqs:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise RuntimeError("Timed out before waiting")
                r.wait(timeout=datetime.timedelta(seconds=left))
            except RuntimeError as e:
                # gloo says "Timed out ..." or "Operation timed out!"
                if "timed out" not in str(e).lower() and time.monotonic() <= deadline:
                    raise
                self.abort(f"a round with peers {peers} did not complete within {t:.3g} s")
                raise TimeoutError(
                    f"rank {self.rank}: the exchange with peers {peers} did not complete within "
                    f"{t:.3g} s; the process group was aborted"
                ) from None

    def wait(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        torch = _optional.torch()
        if not (self._cuda_capable or stream is not None):
            return
        s = stream or torch.cuda.current_stream()
        t = self.timeout if timeout is None else timeout
        wait_for_stream(self, s, t, "; the process group was aborted")

    def abort(self, why: str = "aborted by the caller") -> None:
        if self._failed is not None:
            return
        self._failed = why
        torch = _optional.torch()
        pg = self.group if self.group is not None else torch.distributed.group.WORLD
        fn = getattr(pg, "abort", None)
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - aborting is best effort; the transport is dead either way
                pass

    def all_gather_bytes(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        """Every rank's ``data``; over gloo past ``timeout`` seconds (default the
        transport's) the group is aborted and TimeoutError raised."""
        self._check_usable()
        torch = _optional.torch()
        dist = torch.distributed
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self._cuda_capable:
            t = t.to(self.device)
        # the group's real size, not self.world_size: a transport misreporting its size must
        # still meet its peers here, so that verify=True can tell them all
        outs = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        work = dist.all_gather(outs, t, group=self.group, async_op=True)
        if self._cuda_capable:
            work.wait()
        else:
            t = self.timeout if timeout is None else timeout
            self._wait_all([work], time.monotonic() + t, list(range(self.world_size)), t)
        return [o.cpu().numpy().tobytes() for o in outs]
