"""Layer 3: a one-sided, zero-SM transport for the GPUs of one node (copy engines over CUDA IPC),
with NCCL for peers on other nodes.

Set-up (:meth:`IpcTransport.register_buffers`, collective, through a key-value store, the
communicator, or any transport's ``all_gather_bytes``, e.g. a gloo group's): every rank exports CUDA IPC handles of the allocations that hold its expert
weights (a torch tensor lives at an offset inside one of the caching allocator's blocks) and of
two interprocess events, and creates a small shared-memory page of counters; its peers on the
node open all of them once.

A round (from the shuffler's schedule, which packs nothing for a one-sided transport, so every
receive names a weight row on the sender): the receiver *pulls* each run of rows from the
sender's live weights into its own staging (or, not transactional, into rows nobody reads) with
``cuMemcpyBatchAsync`` (copy engines, the hint that prefers overlap with compute; one
``cuMemcpyDtoDAsync`` per run where the driver lacks it) on a stream of the transport's own.

Ordering, ``signals="stream"`` (the default where the driver runs stream memory operations on
registered host memory): the whole round is enqueued at ``launch`` and ``done()`` is one event
query. Each rank's shared page holds, beside its host counters, an int32 slot per peer and
direction, written by that peer's streams (``cuStreamWriteValue32``) and waited on by this
rank's (``cuStreamWaitValue32``, "at least round q"):

1. on the exchange stream, after phase A: write q into ``ready_from[me]`` of each reader's page;
2. on the copy stream: for each source, wait until my ``ready_from[source]`` reaches q, pull its
   rows, then write q into ``done_from[me]`` of each source's page;
3. on the exchange stream, after the pulls: wait until my ``done_from[reader]`` reaches q for
   every reader, then record the round's end event (the apply waits on it).

A peer's slot only grows while a wait on it is pending, so a wait never misses its value. Every
wait still ends on the host's timeout: a rank that aborts (timeout, a peer's failed flag, a dead
peer's process) writes a value past every round into its own slots, so none of its streams stays
blocked. ``signals="host"`` (or a driver without them), every wait is a host poll:

1. ``launch``: after phase A on the exchange stream, record the *ready* event and publish the
   round's sequence number in this rank's ``ready`` counter: my rows for this round are stable.
2. ``done()``: a source peer is ready once its ``ready`` counter has reached the round and its
   ready event has completed; its pulls are then issued. Once all are issued, record the
   *done* event (after the pulls) and publish ``done``.
3. ``done()`` is True once my pulls have landed and every peer that reads my rows has
   published ``done`` for the round with its done event complete: only then may this rank
   apply (overwrite) rows a peer read.

A rank records ready_{q+1} only after applying round q, which waits for every reader's done_q,
and a reader records done_{q+1} only after seeing the sender's ready_{q+1}: an event is never
re-recorded before the peers that wait on its previous record have seen it complete. A failing
rank sets its ``failed`` counter, so its peers raise at once instead of at their timeout.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import time
from typing import TYPE_CHECKING

import numpy as np

from ._checks import check_count, check_rank_world, check_timeout, device_index
from ._deadline import default_timeout, poll_until
from ._nccl import cuda as _cuda
from .communicator import Communicator
from .errors import CommunicatorStateError
from .transport import Transport, TransportRound, round_peers

if TYPE_CHECKING:
    import torch

    from ._types import DeviceSpec


__all__ = ["IpcTransport"]

_READY, _DONE, _FAILED = 0, 1, 2  # this rank's counters in its shared page
_SIGNALS = ("auto", "stream", "host")
_RELEASED = 1 << 30  # written into this rank's slots on abort: every pending stream wait passes


class _Peer:
    """What a rank knows about a peer on its node: its tensors' base pointers in this
    process, its two events and its counters."""

    __slots__ = ("rank", "bases", "ready", "done", "counters", "shm", "pid")

    def __init__(self, rank, bases, ready, done, counters, shm, pid):
        self.rank, self.bases = rank, bases
        self.ready, self.done = ready, done
        self.counters, self.shm = counters, shm
        self.pid = pid


class IpcTransport(Transport):
    """Copy-engine rounds between the GPUs (or processes) of one node, NCCL across nodes.

    Args:
        rank, world_size: this rank and the number of ranks (taken from ``communicator``
            when one is given).
        store: a key-value store with ``set``/``get`` (torch ``TCPStore``) for the set-up
            exchange; or leave it None and give ``setup`` or a ``communicator``.
        communicator: an eplb_pynccl :class:`Communicator` of the same ranks: peers on other
            nodes go through it (NCCL), and the set-up may run over it.
        device: this rank's CUDA device (default: the communicator's, else the current one).
        ranks_per_node: ranks ``[k * n, (k + 1) * n)`` share node k; None: by host name.
        setup: what carries the set-up exchange when there is no store: a
            :class:`~eplb_pynccl.Transport` (its ``all_gather_bytes``, e.g. a
            :class:`~eplb_pynccl.TorchTransport` over a gloo group) or a torch.distributed
            process group (wrapped in a TorchTransport with this timeout). Its ranks are
            these ranks (``rank``/``world_size`` default to its own).
        timeout: seconds any wait may take (default ``$EPLB_PYNCCL_TIMEOUT`` or 600).
        key: store key prefix (different for each transport made through the same store).
        pull_graphs: capture each round's pulls from a peer as one CUDA graph when the round
            is prepared (at ``rearrange_async()``), so that launching them is one
            ``cuGraphLaunch`` instead of the driver's ~4.5 us of host time per copy; still
            copy engines. False (or a driver that cannot capture them): one
            ``cuMemcpyBatchAsync`` per peer and round. ``pull_method`` says which is used.
        signals: how a round's ranks order each other. ``"stream"``: on the GPU, with stream
            memory operations on the shared pages (registered host memory): a launch enqueues
            the whole round (write "ready" to each reader, wait each source's "ready" then
            pull, write "done" to each source, wait each reader's "done"), and ``done()`` is
            one event query. ``"host"``: every wait is a host poll of the peers' counters and
            events (the round's pulls are issued from ``done()``). ``"auto"`` (default):
            ``"stream"`` where every rank of the node can run it (checked at
            ``register_buffers``), else ``"host"``; ``signals_method`` says which is used.

    Rounds are launched by :class:`~eplb_pynccl.ExpertShuffler` (which calls
    :meth:`register_buffers` at construction: collective). ``close()`` releases every
    opened handle, event and page; use after it is an error.
    """

    accepts_raw = True
    one_sided = True

    def __init__(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        store=None,
        *,
        communicator: Communicator | None = None,
        device: DeviceSpec = None,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
        key: str = "eplb_pynccl/ipc",
        setup=None,
        pull_graphs: bool = True,
        signals: str = "auto",
    ) -> None:
        if communicator is not None:
            if not isinstance(communicator, Communicator):
                raise TypeError(
                    f"communicator must be an eplb_pynccl.Communicator, got {type(communicator).__name__}"
                )
            if rank is not None and rank != communicator.rank:
                raise ValueError(
                    f"rank {rank} differs from the communicator's rank {communicator.rank}"
                )
            if world_size is not None and world_size != communicator.world_size:
                raise ValueError(
                    f"world_size {world_size} differs from the communicator's {communicator.world_size}"
                )
            rank, world_size = communicator.rank, communicator.world_size
            if device is None:
                device = communicator.device
        timeout = default_timeout() if timeout is None else check_timeout(timeout)
        if setup is not None:
            setup = _setup_transport(setup, timeout)
            for name, v, own in (
                ("rank", rank, setup.rank),
                ("world_size", world_size, setup.world_size),
            ):
                if v is not None and v != own:
                    raise ValueError(f"{name} {v} differs from the setup transport's {name} {own}")
            rank, world_size = setup.rank, setup.world_size
        if store is None and communicator is None and setup is None:
            raise ValueError(
                "IpcTransport needs a store (set/get), a setup transport or group, or a "
                "communicator for its set-up"
            )
        if store is not None and not (hasattr(store, "set") and hasattr(store, "get")):
            raise TypeError(f"store must have set() and get(), got {type(store).__name__}")
        rank, world_size = check_rank_world(rank, world_size)
        if ranks_per_node is not None:
            ranks_per_node = check_count(ranks_per_node, "ranks_per_node")
            if ranks_per_node > world_size:
                raise ValueError(
                    f"ranks_per_node ({ranks_per_node}) is more than world_size ({world_size})"
                )
        if not isinstance(pull_graphs, bool):
            raise TypeError(f"pull_graphs must be True or False, got {pull_graphs!r}")
        if signals not in _SIGNALS:
            raise ValueError(f"signals must be one of {_SIGNALS}, got {signals!r}")
        drv = _cuda.driver()
        if drv is None:
            raise RuntimeError(
                f"IpcTransport needs a GPU and its driver: {_cuda.unavailable_reason()}"
            )
        device = device_index(device)
        self.rank, self.world_size = rank, world_size
        self.comm = communicator
        self.store = store
        self._setup = setup
        self._device = device
        self.timeout = float(timeout)
        self._key = key
        self._gen = 0
        self._rpn = ranks_per_node
        self._drv = drv
        self._state = "open"
        self._failed_why: str | None = None
        self._peers: dict[int, _Peer] = {}
        self._opened: list[int] = []  # mapped peer allocations, closed by close()
        self._events: list[int] = []  # every event created or opened here
        self._seq = 0  # rounds launched (the same sequence on every rank)
        self._next_alive_check = 0.0
        self._registered = False
        self.pull_method = "graph" if pull_graphs else "batch"
        self._signals = signals
        self.signals_method = "host"  # decided by register_buffers
        self._graphs: set = set()  # CopyGraphs of live rounds, freed by close()
        self.node = [0] * world_size
        drv.set_device(self._device)
        self._copy_stream = drv.stream_create()
        self._ready = drv.event_create_ipc()
        self._done = drv.event_create_ipc()
        self._events += [self._ready, self._done]
        self._shm = _Page.create(f"eplb_ipc_{os.getpid()}_{id(self):x}", _Page.size(world_size))
        self._counters = self._shm.counters
        self._info = drv.device_info(self._device)

    # ---- Transport members ---------------------------------------------------------------
    @property
    def device(self):
        import torch

        return torch.device("cuda", self._device)

    def check_tensor(self, t, name: str) -> None:
        if t.device.type != "cuda" or t.device.index != self._device:
            raise ValueError(
                f"{name} is on {t.device}, but this IpcTransport is on cuda:{self._device}"
            )

    def _check_open(self) -> None:
        if self._state != "open":
            raise CommunicatorStateError(f"this IpcTransport is {self._state}; make a new one")
        if self._failed_why is not None:
            raise CommunicatorStateError(
                f"this IpcTransport failed ({self._failed_why}); make a new one"
            )

    def exchange(
        self, sends, recvs, stream: torch.cuda.Stream | None = None, timeout: float | None = None
    ) -> None:
        """Tensors of a round: only between ranks of different nodes (through the
        communicator); a one-sided round of the same node needs the schedule (prepare_round)."""
        self._check_open()
        near = [p for p in round_peers(sends, recvs) if self.node[p] == self.node[self.rank]]
        if near or self.comm is None:
            raise NotImplementedError(
                "IpcTransport.exchange() moves tensors only to peers on other nodes (through the "
                "communicator); rounds on one node come from the shuffler's schedule (prepare_round)"
            )
        import torch

        s = torch.cuda.current_stream(self._device) if stream is None else stream
        self.comm.p2p([(t, p) for p, t in sends], [(t, p) for p, t in recvs], s.cuda_stream)

    def wait(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        import torch

        s = torch.cuda.current_stream(self._device) if stream is None else stream
        ev = torch.cuda.Event()
        ev.record(s)
        t = self.timeout if timeout is None else timeout
        _poll(ev.query, time.monotonic() + t, f"stream work not done after {t:.3g} s", self)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        self._check_open()
        return self._all_gather(data)

    def poll_error(self) -> None:
        """Raise at once when a peer on the node failed (its flag) or its process is gone
        (checked every 50 ms), rather than at the timeout. A peer's flag set because a
        process died is reported as that death (the root cause), where it is seen."""
        for p in self._peers.values():
            if p.counters[_FAILED]:
                self._raise_if_a_peer_died()
                self.abort(f"peer rank {p.rank} failed")
                raise RuntimeError(
                    f"rank {self.rank}: peer rank {p.rank} failed (it set its failed flag)"
                )
        now = time.monotonic()
        if now < self._next_alive_check:
            return
        self._next_alive_check = now + 0.05
        self._raise_if_a_peer_died()

    def _raise_if_a_peer_died(self) -> None:
        for p in self._peers.values():
            if p.pid is not None and not _alive(p.pid):
                self.abort(f"peer rank {p.rank} (pid {p.pid}) exited")
                raise RuntimeError(
                    f"rank {self.rank}: peer rank {p.rank} (pid {p.pid}) exited mid-round"
                )

    def abort(self, why: str = "aborted") -> None:
        """Local: mark this transport failed (peers see it at once) and abort the communicator."""
        if self._failed_why is None:
            self._failed_why = why
            if self._state == "open":
                self._counters[_FAILED] = 1
                self._release_waits()
        if self.comm is not None:
            self.comm.abort()

    # ---- set-up ----------------------------------------------------------------------------
    def make_current(self) -> None:
        """Make this transport's device current on the calling thread (driver calls of a
        thread other than the one that made the transport need it first)."""
        self._drv.set_device(self._device)

    def _all_gather(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (any lengths), through the store, the setup transport or
        the communicator."""
        self._gen += 1
        if self.store is not None:
            k = f"{self._key}/{self._gen}"
            self.store.set(f"{k}/{self.rank}", data)
            out = []
            deadline = time.monotonic() + self.timeout
            for r in range(self.world_size):
                key = f"{k}/{r}"
                if hasattr(self.store, "wait"):
                    import datetime

                    self.store.wait(
                        [key], datetime.timedelta(seconds=max(0.1, deadline - time.monotonic()))
                    )
                v = self.store.get(key)
                out.append(v.encode("latin-1") if isinstance(v, str) else bytes(v))
            return out
        if self._setup is not None:
            gather = self._setup.all_gather_bytes
        else:
            from .transport import NcclTransport

            assert self.comm is not None  # __init__ refuses no store, no setup, no communicator
            gather = NcclTransport(self.comm).all_gather_bytes
        # all_gather_bytes wants equal lengths: the lengths first, then the padded data
        n = len(data)
        sizes = gather(n.to_bytes(8, "little"))
        width = max(int.from_bytes(x, "little") for x in sizes)
        blobs = gather(data.ljust(width, b"\0"))
        return [b[: int.from_bytes(s, "little")] for b, s in zip(blobs, sizes)]

    def register_buffers(self, tensors: list) -> None:
        """Collective: export this rank's weight allocations and events, open the peers' on
        this node. Raises before anything moves when a tensor's memory cannot be exported
        (expandable segments) or a peer's GPU cannot be reached or is another model."""
        self._check_open()
        if self._registered:
            raise RuntimeError(
                "IpcTransport.register_buffers: this transport already has buffers (one shuffler per transport)"
            )
        drv = self._drv
        drv.set_device(self._device)
        allocs: dict[int, int] = {}  # base -> index
        alloc_list: list[tuple[int, int, bytes]] = []  # (base, size, IPC handle)
        tens = []
        err = None
        for i, t in enumerate(tensors):
            ptr = t.data_ptr()
            rng = drv.pointer_range(ptr)
            if rng is None:
                err = f"tensors[{i}]: CUDA does not know its pointer {ptr:#x}"
                break
            base, size, _ = rng
            if not drv.ipc_capable(base):
                err = (
                    f"tensors[{i}] lives in memory CUDA IPC cannot export (a cuMem/VMM allocation, "
                    "e.g. torch's expandable segments): unset PYTORCH_CUDA_ALLOC_CONF="
                    "expandable_segments:True for the expert weights, or use NcclTransport"
                )
                break
            if base not in allocs:
                allocs[base] = len(alloc_list)
                alloc_list.append((base, size, drv.ipc_mem_handle(base)))
            tens.append((allocs[base], ptr - base, t.nbytes))
        host = socket.gethostname()
        can_signal = self._signals != "host" and self._stream_signals_work()
        mine = {
            "signals": can_signal,
            "err": err,
            "host": host,
            "info": self._info,
            "allocs": alloc_list,
            "tensors": tens,
            "ready": drv.ipc_event_handle(self._ready),
            "done": drv.ipc_event_handle(self._done),
            "shm": self._shm.name,
            "pid": os.getpid(),
        }
        everyone = [pickle.loads(b) for b in self._all_gather(pickle.dumps(mine))]
        bad = [(r, e["err"]) for r, e in enumerate(everyone) if e["err"]]
        if bad:
            raise ValueError(
                "IpcTransport: "
                + "; ".join(f"rank {r}: {m}" for r, m in bad)
                + "; nothing was moved"
            )
        if self._rpn is not None:
            self.node = [r // self._rpn for r in range(self.world_size)]
        else:
            hosts = list(dict.fromkeys(e["host"] for e in everyone))
            self.node = [hosts.index(e["host"]) for e in everyone]
        me = self.node[self.rank]
        far = [r for r in range(self.world_size) if self.node[r] != me]
        if far and self.comm is None:
            raise ValueError(
                f"IpcTransport: ranks {far} are on other nodes; give a communicator for them (NCCL)"
            )
        problems = []
        if self._signals == "stream" and not can_signal:
            problems.append(
                "signals='stream' but this rank's driver cannot run stream memory operations "
                "on registered host memory (use signals='auto' or 'host')"
            )
        for r, e in enumerate(everyone):
            if r == self.rank or self.node[r] != me:
                continue
            info = e["info"]
            if (info["name"], info["cc_major"], info["cc_minor"]) != (
                self._info["name"],
                self._info["cc_major"],
                self._info["cc_minor"],
            ):
                problems.append(
                    f"rank {r} is on a {info['name']} (sm_{info['cc_major']}{info['cc_minor']}), "
                    f"this rank on a {self._info['name']}"
                )
                continue
            dev = drv.device_by_uuid(info["uuid"])
            if dev is None:
                problems.append(
                    f"rank {r}'s GPU ({info['name']}, uuid {info['uuid'][:8]}) is not visible to this "
                    "process (CUDA_VISIBLE_DEVICES)"
                )
            elif not drv.can_access_peer(self._device, dev):
                problems.append(
                    f"rank {r}'s GPU (cuda:{dev}) has no peer access from cuda:{self._device}"
                )
        # every rank learns about every rank's problems, so they all refuse together
        verdict = [pickle.loads(b) for b in self._all_gather(pickle.dumps(problems))]
        allp = [f"rank {r}: {m}" for r, ps in enumerate(verdict) for m in ps]
        if allp:
            raise ValueError("IpcTransport: " + "; ".join(allp) + "; nothing was moved")
        try:
            for r, e in enumerate(everyone):
                if r == self.rank or self.node[r] != me:
                    continue
                mapped = []
                for _base, _size, handle in e["allocs"]:
                    p = drv.ipc_open_mem(handle)
                    self._opened.append(p)
                    mapped.append(p)
                bases = np.asarray([mapped[a] + off for a, off, _ in e["tensors"]], dtype=np.int64)
                ready = drv.ipc_open_event(e["ready"])
                done = drv.ipc_open_event(e["done"])
                self._events += [ready, done]
                shm = _Page.attach(e["shm"])
                self._peers[r] = _Peer(
                    r,
                    bases,
                    ready,
                    done,
                    shm.counters,
                    shm,
                    e["pid"] if e["host"] == host else None,
                )
            if all(everyone[r]["signals"] for r in range(self.world_size) if self.node[r] == me):
                for peer in self._peers.values():
                    peer.shm.device_address = drv.host_register(peer.shm.address, peer.shm.nbytes)
                self.signals_method = "stream"
        except BaseException:
            self._release_peers()
            raise
        self._registered = True

    def _stream_signals_work(self) -> bool:
        """Whether stream waits/writes on this rank's registered page work here: register it,
        write a slot from the copy stream, wait for it there, and see the host read it back."""
        drv, page = self._drv, self._shm
        if not drv.has_stream_memops():
            return False
        slot = self.rank  # ready_from[self]: no round uses it
        ev = None
        try:
            if not page.device_address:
                page.device_address = drv.host_register(page.address, page.nbytes)
            addr = page.device_address + 64 + 4 * slot
            # the calls rounds make: batched writes and waits
            _cuda.MemOps(drv, "write", [addr]).run(self._copy_stream, 7)
            _cuda.MemOps(drv, "wait", [addr]).run(self._copy_stream, 7)
            ev = drv.event_create()
            drv.event_record(ev, self._copy_stream)

            def stuck() -> None:
                page.slots[slot] = 7  # let the wait pass, then give up on stream signals
                raise TimeoutError

            poll_until(lambda: drv.event_done(ev), time.monotonic() + 10.0, stuck)
            ok = int(page.slots[slot]) == 7
        except (_cuda.CudaError, TimeoutError):
            ok = False
        finally:
            if ev is not None:
                drv.event_destroy(ev)
            page.slots[slot] = 0
        if not ok and page.device_address:
            drv.host_unregister(page.address)
            page.device_address = 0
        return ok

    def _release_waits(self) -> None:
        """Let every stream wait on this rank's slots pass (abort/close: a peer that never
        writes must not leave this rank's streams blocked)."""
        if self.signals_method == "stream" and self._shm.slots is not None:
            self._shm.slots[:] = _RELEASED

    # ---- rounds ------------------------------------------------------------------------------
    def prepare_round(self, sends, recvs, remote=None) -> TransportRound:
        self._check_open()
        if not self._registered:
            raise RuntimeError(
                "IpcTransport: register_buffers() first (ExpertShuffler does it at construction)"
            )
        if remote is None:
            raise ValueError("IpcTransport rounds need the schedule's messages (remote=)")
        return _IpcRound(self, sends, recvs, remote)

    def close(self) -> None:
        """Release every opened handle, event and page (local). Idempotent."""
        if self._state != "open":
            return
        self._release_waits()
        self._state = "closed"
        drv = self._drv
        drv.set_device(self._device)
        drained = True
        if self.signals_method == "stream":  # no queued stream op may touch an unregistered page
            ev = drv.event_create()
            drv.event_record(ev, self._copy_stream)
            until = time.monotonic() + 5.0
            while not drv.event_done(ev) and time.monotonic() < until:
                time.sleep(1e-4)
            drained = drv.event_done(ev)
            drv.event_destroy(ev)
        for g in self._graphs:  # before the mappings they copy from are closed
            g.close()
        self._graphs = set()
        self._release_peers(unregister=drained)
        for e in self._events:
            drv.event_destroy(e)
        self._events = []
        drv.stream_destroy(self._copy_stream)
        self._counters = None
        if self._shm.device_address and drained:
            drv.host_unregister(self._shm.address)
        self._shm.close(unlink=True)

    def _release_peers(self, unregister: bool = True) -> None:
        drv = self._drv
        for p in self._opened:
            try:
                drv.ipc_close_mem(p)
            except _cuda.CudaError:
                pass  # a peer that died may have taken its mapping with it
        self._opened = []
        for peer in self._peers.values():
            if peer.shm.device_address and unregister:
                drv.host_unregister(peer.shm.address)
            peer.counters = None
            peer.shm.close()
        self._peers = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> IpcTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _setup_transport(setup, timeout: float) -> Transport:
    """``setup`` as a Transport: as it is, or a torch.distributed process group wrapped."""
    if isinstance(setup, Transport):
        return setup
    try:
        import torch.distributed as dist
    except ImportError:
        dist = None  # type: ignore[assignment]  # checked below
    if dist is not None and dist.is_available() and isinstance(setup, dist.ProcessGroup):
        from .transport import TorchTransport

        return TorchTransport(setup, timeout=timeout)
    raise TypeError(
        "setup must be an eplb_pynccl Transport or a torch.distributed ProcessGroup, got "
        f"{type(setup).__name__}"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie that has exited but not been reaped does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class _Page:
    """A page of counters in /dev/shm, shared by the processes of a node: 8 int64 host
    counters (ready, done, failed), then ``2 * world_size`` int32 signal slots that peers'
    streams write (``ready_from[p]``, then ``done_from[p]``). The owner creates and unlinks
    it, peers attach (no multiprocessing resource tracker, whose shared bookkeeping across
    spawned processes mixed up owners and attachers)."""

    def __init__(self, name: str, fd: int, owner: bool) -> None:
        self.name, self._owner = name, owner
        self.nbytes = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, self.nbytes)
        os.close(fd)
        self.counters = np.ndarray((8,), dtype=np.int64, buffer=self._map)
        self.slots = np.ndarray(
            ((self.nbytes - 64) // 4,), dtype=np.int32, buffer=self._map, offset=64
        )
        self.address = int(self.counters.__array_interface__["data"][0])
        self.device_address = 0  # set once registered for the device (stream signals)

    @staticmethod
    def size(world_size: int) -> int:
        return 64 + 8 * world_size

    @classmethod
    def create(cls, name: str, nbytes: int = 64) -> _Page:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, nbytes)
        page = cls(name, fd, True)
        page.counters[:] = 0
        page.slots[:] = 0
        return page

    @classmethod
    def attach(cls, name: str) -> _Page:
        return cls(name, os.open(f"/dev/shm/{name}", os.O_RDWR), False)

    def close(self, unlink: bool = False) -> None:
        self.counters = None
        self.slots = None
        try:
            self._map.close()
        except BufferError:  # a view still alive; the mapping goes with the process
            pass
        if unlink and self._owner:
            try:
                os.unlink(f"/dev/shm/{self.name}")
            except FileNotFoundError:
                pass


def _poll(cond, deadline: float, what: str, t: IpcTransport) -> None:
    def expired() -> None:
        t.abort(what)
        raise TimeoutError(f"rank {t.rank}: {what}")

    poll_until(cond, deadline, expired)


class RoundProtocol:
    """The ordering of one one-sided round on one rank, independent of CUDA (tested on the CPU
    as a state machine). ``q``: the round's sequence number. Callbacks:

    * ``peer_ready(p, q)``: peer p published ready for round q and its ready event completed;
    * ``peer_done(p, q)``: peer p published done for round q and its done event completed;
    * ``pull(p)``: enqueue the copies from peer p;
    * ``finish()``: record and publish this rank's done (after every pull);
    * ``local_done()``: this rank's done event (its pulls) completed.

    ``poll()`` never blocks: it pulls from each source as soon as it is ready, finishes once
    every pull is enqueued, and returns True once the local pulls landed and every reader has
    finished its round q (only then may this rank overwrite rows its readers read)."""

    def __init__(self, sources, readers, peer_ready, peer_done, pull, finish, local_done) -> None:
        self.sources, self.readers = list(sources), list(readers)
        self._ready, self._done, self._pull = peer_ready, peer_done, pull
        self._finish, self._local = finish, local_done
        self.q = 0
        self.pulled: set = set()
        self.finished = False
        self.landed = False
        self.waiting: list = []

    def start(self, q: int) -> None:
        self.q = q
        self.pulled = set()
        self.finished = False
        self.landed = False
        self.waiting = list(self.readers)  # readers not seen done yet

    def poll(self) -> bool:
        """One look at what the round waits for; every answer that can no longer change
        (a pull posted, the local pulls landed, a reader done) is kept, not asked again."""
        if not self.finished:
            for p in self.sources:
                if p not in self.pulled and self._ready(p, self.q):
                    self._pull(p)
                    self.pulled.add(p)
            if len(self.pulled) < len(self.sources):
                return False
            self._finish()
            self.finished = True
        if not self.landed:
            if not self._local():
                return False
            self.landed = True
        while self.waiting:
            if not self._done(self.waiting[-1], self.q):
                return False
            self.waiting.pop()
        return True

    def waiting_on(self) -> tuple[list, list]:
        """(sources not ready yet, readers not done yet) of the current round: who holds it."""
        unready = [p for p in self.sources if p not in self.pulled]
        undone = [p for p in self.readers if not self._done(p, self.q)]
        return unready, undone


class _IpcRound(TransportRound):
    """One round: pulls from peers on the node (copy engines), NCCL for the others."""

    def __init__(self, t: IpcTransport, sends, recvs, remote) -> None:
        self.t = t
        _, rmsg = remote
        me = t.node[t.rank]
        self.peers = round_peers(sends, recvs)
        # pulls, per source peer: this rank's destination, the peer's row, the size
        pulls: dict[int, list] = {}
        for q, (peer, (dst, n)) in enumerate(recvs):
            if t.node[peer] != me:
                continue
            rb = int(rmsg.rbuf[q])
            if rb < 0:
                raise ValueError(
                    "IpcTransport: a receive whose source is not a weight row (packed); "
                    "the schedule must be one-sided"
                )
            src = int(t._peers[peer].bases[rb]) + int(rmsg.roff[q])
            pulls.setdefault(peer, []).append((dst, src, n))
        self.graphs: list = []
        self.pulls = {p: self._pull_call(c) for p, c in pulls.items()}
        readers = sorted({p for p, _ in sends if t.node[p] == me})
        far_s = [(b, p) for p, b in sends if t.node[p] != me]
        far_r = [(b, p) for p, b in recvs if t.node[p] != me]
        self.nccl = None
        if far_s or far_r:
            assert t.comm is not None  # register_buffers refused far ranks without one
            self.nccl = t.comm.prepare_p2p(far_s, far_r)
        self._far = len(far_s) + len(far_r)
        self._stream = None
        self._nccl_end: int | None = None
        drv = t._drv

        def ready(p, q):
            peer = t._peers[p]
            return peer.counters[_READY] >= q and drv.event_done(peer.ready)

        def done(p, q):
            peer = t._peers[p]
            return peer.counters[_DONE] >= q and drv.event_done(peer.done)

        def pull(p):
            self.pulls[p](t._copy_stream)

        def finish():
            drv.event_record(t._done, t._copy_stream)
            t._counters[_DONE] = self.proto.q
            drv.stream_wait_event(self._stream, t._done)  # the round ends after the pulls

        self.proto = RoundProtocol(
            sorted(pulls), readers, ready, done, pull, finish, lambda: drv.event_done(t._done)
        )
        self._end: int | None = None
        if t.signals_method == "stream":
            # every address a launch writes or waits on (device addresses of the shared pages)
            w, sources = t.world_size, sorted(pulls)
            mine = t._shm.device_address + 64
            peer = {p: t._peers[p].shm.device_address + 64 for p in (*sources, *readers)}
            self._ready_out = _cuda.MemOps(drv, "write", [peer[p] + 4 * t.rank for p in readers])
            self._wait_ready = _cuda.MemOps(drv, "wait", [mine + 4 * p for p in sources])
            self._pull_list = [self.pulls[p] for p in sources]
            self._done_out = _cuda.MemOps(
                drv, "write", [peer[p] + 4 * (w + t.rank) for p in sources]
            )
            self._wait_done = _cuda.MemOps(drv, "wait", [mine + 4 * (w + p) for p in readers])
            self._end = drv.event_create()

    def _pull_call(self, copies: list):
        """``f(stream)`` enqueueing the copies from one peer: a captured graph (one host call)
        or one batch (see IpcTransport's ``pull_graphs``)."""
        t = self.t
        if t.pull_method == "graph":
            t.make_current()  # the graph's capture stream is on this rank's device
            try:
                g = _cuda.CopyGraph(t._drv, copies)
            except _cuda.CudaError:
                t.pull_method = "batch"  # this driver cannot capture them: batches from now on
            else:
                self.graphs.append(g)
                t._graphs.add(g)
                return g.launch
        dsts, srcs, sizes = _cuda.copy_arrays(copies)
        drv = t._drv
        return lambda s: drv.memcpy_batch(dsts, srcs, sizes, s)

    @property
    def host_calls(self) -> int:
        """Host calls into CUDA/NCCL a launch of this round makes: per source peer its pulls
        (with stream signals also a wait and a write), per reader a write (and a wait)."""
        n = len(self.pulls) + 4  # pulls, ready event + wait, done event + wait
        if self._end is not None:  # one batch of signal ops per direction, the end event
            n += sum(1 for b in (self._ready_out, self._wait_ready, self._done_out) if len(b))
            n += int(bool(len(self._wait_done))) + 1
        return n + (self._far + 3 if self.nccl is not None else 0)  # group, ops, end event

    def release(self) -> None:
        """Free the round's graphs (their launches in flight complete first)."""
        for g in self.graphs:
            g.close()
            self.t._graphs.discard(g)
        self.graphs = []
        if self._end is not None and self.t._state == "open":  # close() destroys the driver's
            self.t._drv.event_destroy(self._end)  # events with the context's streams
        self._end = None

    def launch(self, stream, deadline: float) -> None:
        t = self.t
        t._check_open()
        drv = t._drv
        s = stream.cuda_stream
        t._seq += 1
        self._stream = s
        if self._end is not None:
            self._launch_signalled(s, t._seq)
            return
        drv.event_record(t._ready, s)  # my rows (and phase A) for this round are stable
        t._counters[_READY] = t._seq
        self.proto.start(t._seq)
        if self.nccl is not None:
            self.nccl.launch(s)
            if self._nccl_end is None:
                self._nccl_end = drv.event_create()
                t._events.append(self._nccl_end)
            drv.event_record(self._nccl_end, s)
        # pulls wait for this rank's own phase A (staging free, rows it overwrote)
        drv.stream_wait_event(t._copy_stream, t._ready)
        self.proto.poll()

    def _launch_signalled(self, s: int, q: int) -> None:
        """The whole round on the GPU (stream signals): nothing is left for ``done()`` but
        one event query."""
        t, drv = self.t, self.t._drv
        c = t._copy_stream
        t._counters[_READY] = q
        self.proto.start(q)
        self._ready_out.run(s, q)  # my rows (and phase A) for this round are stable
        if self.nccl is not None:
            self.nccl.launch(s)
        drv.event_record(t._ready, s)
        drv.stream_wait_event(c, t._ready)  # pulls after my own phase A (staging free)
        self._wait_ready.run(c, q)  # every source's rows are stable
        for pull in self._pull_list:
            pull(c)
        self._done_out.run(c, q)  # I have read the sources' rows
        drv.event_record(t._done, c)
        drv.stream_wait_event(s, t._done)
        self._wait_done.run(s, q)  # my readers have read my rows: they may change now
        assert self._end is not None  # stream signals: made at prepare
        drv.event_record(self._end, s)

    def end_event(self) -> int | None:
        """With stream signals, the event after the whole round; else None (the exchange
        stream is made to wait for the pulls once they are issued)."""
        return self._end

    def waiting_on(self) -> tuple[list, list]:
        """(peers whose rows are not ready yet, readers not done yet): who holds the round."""
        t = self.t
        if self._end is None:
            return self.proto.waiting_on()
        q, w, slots = self.proto.q, t.world_size, t._shm.slots
        unready = [p for p in self.proto.sources if int(slots[p]) - q < 0]
        undone = [p for p in self.proto.readers if int(slots[w + p]) - q < 0]
        return unready, undone

    def done(self) -> bool:
        t = self.t
        t._check_open()
        t.poll_error()
        if self._end is not None:
            if t._drv.event_done(self._end):
                return True
            if self.nccl is not None:
                assert t.comm is not None  # an NCCL part implies the communicator
                err = t.comm.async_error()
                if err is not None:
                    t.abort(str(err))
                    raise err
            return False
        if not self.proto.poll():
            return False
        if self._nccl_end is not None and not t._drv.event_done(self._nccl_end):
            assert t.comm is not None  # an NCCL part (_nccl_end) implies the communicator
            err = t.comm.async_error()
            if err is not None:
                t.abort(str(err))
                raise err
            return False
        return True
