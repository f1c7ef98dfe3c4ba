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
from ._deadline import default_timeout, poll_until, process_alive
from ._nccl import cuda as _cuda
from .communicator import Communicator
from .errors import CommunicatorStateError
from .transport import Transport, TransportRound, round_peers, wait_for_stream

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


class _Local:
    """This rank's side of the node, owned by :class:`IpcTransport` and used by its rounds:
    the driver and device, the copy stream, the ready/done events peers open, the shared page
    (host counters and stream-signal slots), the opened peers, and what close() must free.
    ``seq`` counts rounds launched (the same sequence on every rank)."""

    def __init__(self, drv, device: int, world_size: int, pull_method: str) -> None:
        self.drv, self.device = drv, device
        self.state = "open"
        self.failed_why: str | None = None
        self.peers: dict[int, _Peer] = {}
        self.opened: list[int] = []  # mapped peer allocations
        self.events: list[int] = []  # every event created or opened here
        self.graphs: set = set()  # CopyGraphs of live rounds
        self.seq = 0
        self.pull_method = pull_method
        self.signals_method = "host"  # decided by register_buffers
        drv.set_device(device)
        self.copy_stream = drv.stream_create()
        self.ready = drv.event_create_ipc()
        self.done = drv.event_create_ipc()
        self.events += [self.ready, self.done]
        self.page = _Page.create(f"eplb_ipc_{os.getpid()}_{id(self):x}", _Page.size(world_size))

    def check_open(self) -> None:
        if self.state != "open":
            raise CommunicatorStateError(f"this IpcTransport is {self.state}; make a new one")
        if self.failed_why is not None:
            raise CommunicatorStateError(
                f"this IpcTransport failed ({self.failed_why}); make a new one"
            )

    def make_current(self) -> None:
        self.drv.set_device(self.device)

    def add_event(self) -> int:
        """A driver event freed by close()."""
        e = self.drv.event_create()
        self.events.append(e)
        return e

    def held(self) -> dict[str, int]:
        """How many mappings, events, peers and graphs are held (close() leaves none)."""
        return {
            "opened": len(self.opened),
            "events": len(self.events),
            "peers": len(self.peers),
            "graphs": len(self.graphs),
        }


def _agree(whose: str, rank, world_size, owner) -> None:
    """The rank and world_size given (None: not given) are ``owner``'s own."""
    for name, v, own in (("rank", rank, owner.rank), ("world_size", world_size, owner.world_size)):
        if v is not None and v != own:
            raise ValueError(f"{name} {v} differs from the {whose}'s {name} {own}")


def _from_communicator(communicator, rank, world_size, device):
    """rank, world_size and device taken from ``communicator`` (those given must agree)."""
    if not isinstance(communicator, Communicator):
        raise TypeError(
            f"communicator must be an eplb_pynccl.Communicator, got {type(communicator).__name__}"
        )
    _agree("communicator", rank, world_size, communicator)
    return (
        communicator.rank,
        communicator.world_size,
        device if device is not None else communicator.device,
    )


def _from_setup(setup, timeout: float, rank, world_size):
    """The setup transport made from ``setup``, and its rank and world_size (those given
    must agree)."""
    setup = _setup_transport(setup, timeout)
    _agree("setup transport", rank, world_size, setup)
    return setup, setup.rank, setup.world_size


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
            rank, world_size, device = _from_communicator(communicator, rank, world_size, device)
        timeout = default_timeout() if timeout is None else check_timeout(timeout)
        if setup is not None:
            setup, rank, world_size = _from_setup(setup, timeout, rank, world_size)
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
        self.timeout = float(timeout)
        self._key = key
        self._gen = 0
        self._rpn = ranks_per_node
        self._next_alive_check = 0.0
        self._registered = False
        self._signals = signals
        self.node = [0] * world_size
        self._local = _Local(drv, device, world_size, "graph" if pull_graphs else "batch")
        self._info = drv.device_info(device)

    @property
    def pull_method(self) -> str:
        """How a round's pulls from a peer are enqueued: ``"graph"`` or ``"batch"``."""
        return self._local.pull_method

    @property
    def signals_method(self) -> str:
        """How a round's ranks order each other: ``"stream"`` or ``"host"``."""
        return self._local.signals_method

    @property
    def rounds(self) -> int:
        """Rounds launched so far (the same count on every rank)."""
        return self._local.seq

    # ---- Transport members ---------------------------------------------------------------
    @property
    def device(self):
        import torch

        return torch.device("cuda", self._local.device)

    def check_tensor(self, t, name: str) -> None:
        d = self._local.device
        if t.device.type != "cuda" or t.device.index != d:
            raise ValueError(f"{name} is on {t.device}, but this IpcTransport is on cuda:{d}")

    def exchange(
        self, sends, recvs, stream: torch.cuda.Stream | None = None, timeout: float | None = None
    ) -> None:
        """Tensors of a round: only between ranks of different nodes (through the
        communicator); a one-sided round of the same node needs the schedule (prepare_round)."""
        self._local.check_open()
        near = [p for p in round_peers(sends, recvs) if self.node[p] == self.node[self.rank]]
        if near or self.comm is None:
            raise NotImplementedError(
                "IpcTransport.exchange() moves tensors only to peers on other nodes (through the "
                "communicator); rounds on one node come from the shuffler's schedule (prepare_round)"
            )
        import torch

        s = torch.cuda.current_stream(self._local.device) if stream is None else stream
        self.comm.p2p([(t, p) for p, t in sends], [(t, p) for p, t in recvs], s.cuda_stream)

    def wait(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        import torch

        s = torch.cuda.current_stream(self._local.device) if stream is None else stream
        wait_for_stream(self, s, self.timeout if timeout is None else timeout)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        self._local.check_open()
        return self._all_gather(data)

    def poll_error(self) -> None:
        """Raise at once when a peer on the node failed (its flag) or its process is gone
        (checked every 50 ms), rather than at the timeout. A peer's flag set because a
        process died is reported as that death (the root cause), where it is seen."""
        for p in self._local.peers.values():
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
        for p in self._local.peers.values():
            if p.pid is not None and not process_alive(p.pid):
                self.abort(f"peer rank {p.rank} (pid {p.pid}) exited")
                raise RuntimeError(
                    f"rank {self.rank}: peer rank {p.rank} (pid {p.pid}) exited mid-round"
                )

    def abort(self, why: str = "aborted by the caller") -> None:
        """Local: mark this transport failed (peers see it at once) and abort the communicator."""
        own = self._local
        if own.failed_why is None:
            own.failed_why = why
            if own.state == "open":
                own.page.counters[_FAILED] = 1
                self._release_waits()
        if self.comm is not None:
            self.comm.abort()

    # ---- set-up ----------------------------------------------------------------------------
    def make_current(self) -> None:
        """Make this transport's device current on the calling thread (driver calls of a
        thread other than the one that made the transport need it first)."""
        self._local.make_current()

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
        own = self._local
        own.check_open()
        if self._registered:
            raise RuntimeError(
                "IpcTransport.register_buffers: this transport already has buffers (one shuffler per transport)"
            )
        own.make_current()
        allocs, tens, err = self._exports(tensors)
        host = socket.gethostname()
        can_signal = self._signals != "host" and self._stream_signals_work()
        mine = {
            "signals": can_signal,
            "err": err,
            "host": host,
            "info": self._info,
            "allocs": allocs,
            "tensors": tens,
            "ready": own.drv.ipc_event_handle(own.ready),
            "done": own.drv.ipc_event_handle(own.done),
            "shm": own.page.name,
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
        self._place_nodes(everyone)
        problems = self._problems(everyone, can_signal)
        # every rank learns about every rank's problems, so they all refuse together
        verdict = [pickle.loads(b) for b in self._all_gather(pickle.dumps(problems))]
        allp = [f"rank {r}: {m}" for r, ps in enumerate(verdict) for m in ps]
        if allp:
            raise ValueError("IpcTransport: " + "; ".join(allp) + "; nothing was moved")
        try:
            self._open_peers(everyone, host)
        except BaseException:
            self._release_peers()
            raise
        self._registered = True

    def _exports(self, tensors: list) -> tuple[list, list, str | None]:
        """This rank's allocations ``(base, size, IPC handle)``, its tensors as ``(allocation,
        offset, nbytes)``, and what stops a tensor from being exported (or None)."""
        drv = self._local.drv
        index: dict[int, int] = {}  # allocation base -> its place in allocs
        allocs: list[tuple[int, int, bytes]] = []
        tens: list[tuple[int, int, int]] = []
        for i, t in enumerate(tensors):
            ptr = t.data_ptr()
            rng = drv.pointer_range(ptr)
            if rng is None:
                return allocs, tens, f"tensors[{i}]: CUDA does not know its pointer {ptr:#x}"
            base, size, _ = rng
            if not drv.ipc_capable(base):
                return (
                    allocs,
                    tens,
                    f"tensors[{i}] lives in memory CUDA IPC cannot export (a cuMem/VMM allocation, "
                    "e.g. torch's expandable segments): unset PYTORCH_CUDA_ALLOC_CONF="
                    "expandable_segments:True for the expert weights, or use NcclTransport",
                )
            if base not in index:
                index[base] = len(allocs)
                allocs.append((base, size, drv.ipc_mem_handle(base)))
            tens.append((index[base], ptr - base, t.nbytes))
        return allocs, tens, None

    def _place_nodes(self, everyone: list) -> None:
        """Each rank's node (by ``ranks_per_node`` or host name); far ranks need NCCL."""
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

    def _near(self) -> list[int]:
        """The other ranks on this rank's node."""
        me = self.node[self.rank]
        return [r for r in range(self.world_size) if r != self.rank and self.node[r] == me]

    def _problems(self, everyone: list, can_signal: bool) -> list[str]:
        """What this rank finds wrong with the set-up: forced stream signals it cannot run,
        peers on the node with another GPU model, invisible or without peer access."""
        drv, mine = self._local.drv, self._info
        problems = []
        if self._signals == "stream" and not can_signal:
            problems.append(
                "signals='stream' but this rank's driver cannot run stream memory operations "
                "on registered host memory (use signals='auto' or 'host')"
            )
        for r in self._near():
            info = everyone[r]["info"]
            if (info["name"], info["cc_major"], info["cc_minor"]) != (
                mine["name"],
                mine["cc_major"],
                mine["cc_minor"],
            ):
                problems.append(
                    f"rank {r} is on a {info['name']} (sm_{info['cc_major']}{info['cc_minor']}), "
                    f"this rank on a {mine['name']}"
                )
                continue
            dev = drv.device_by_uuid(info["uuid"])
            if dev is None:
                problems.append(
                    f"rank {r}'s GPU ({info['name']}, uuid {info['uuid'][:8]}) is not visible to this "
                    "process (CUDA_VISIBLE_DEVICES)"
                )
            elif not drv.can_access_peer(self._local.device, dev):
                problems.append(
                    f"rank {r}'s GPU (cuda:{dev}) has no peer access from cuda:{self._local.device}"
                )
        return problems

    def _open_peers(self, everyone: list, host: str) -> None:
        """Open every near peer's allocations, events and page; stream signals where every
        rank of the node can run them (their pages registered for the device)."""
        own = self._local
        drv = own.drv
        for r in self._near():
            e = everyone[r]
            mapped = []
            for _base, _size, handle in e["allocs"]:
                p = drv.ipc_open_mem(handle)
                own.opened.append(p)
                mapped.append(p)
            bases = np.asarray([mapped[a] + off for a, off, _ in e["tensors"]], dtype=np.int64)
            ready = drv.ipc_open_event(e["ready"])
            done = drv.ipc_open_event(e["done"])
            own.events += [ready, done]
            shm = _Page.attach(e["shm"])
            pid = e["pid"] if e["host"] == host else None
            own.peers[r] = _Peer(r, bases, ready, done, shm.counters, shm, pid)
        if all(everyone[r]["signals"] for r in (self.rank, *self._near())):
            for peer in own.peers.values():
                peer.shm.device_address = drv.host_register(peer.shm.address, peer.shm.nbytes)
            own.signals_method = "stream"

    def _stream_signals_work(self) -> bool:
        """Whether stream waits/writes on this rank's registered page work here: register it,
        write a slot from the copy stream, wait for it there, and see the host read it back."""
        own = self._local
        drv, page = own.drv, own.page
        if not drv.has_stream_memops():
            return False
        slot = self.rank  # ready_from[self]: no round uses it
        ev = None
        try:
            if not page.device_address:
                page.device_address = drv.host_register(page.address, page.nbytes)
            addr = page.device_address + 64 + 4 * slot
            # the calls rounds make: batched writes and waits
            _cuda.MemOps(drv, "write", [addr]).run(own.copy_stream, 7)
            _cuda.MemOps(drv, "wait", [addr]).run(own.copy_stream, 7)
            ev = drv.event_create()
            drv.event_record(ev, own.copy_stream)

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
        own = self._local
        if own.signals_method == "stream" and own.page.slots is not None:
            own.page.slots[:] = _RELEASED

    # ---- rounds ------------------------------------------------------------------------------
    def prepare_round(self, sends, recvs, remote=None) -> TransportRound:
        self._local.check_open()
        if not self._registered:
            raise RuntimeError(
                "IpcTransport: register_buffers() first (ExpertShuffler does it at construction)"
            )
        if remote is None:
            raise ValueError("IpcTransport rounds need the schedule's messages (remote=)")
        return _IpcRound(self, self._local, sends, recvs, remote)

    def close(self) -> None:
        """Release every opened handle, event and page (local). Idempotent."""
        own = self._local
        if own.state != "open":
            return
        self._release_waits()
        own.state = "closed"
        drv = own.drv
        own.make_current()
        drained = True
        if own.signals_method == "stream":  # no queued stream op may touch an unregistered page
            ev = drv.event_create()
            drv.event_record(ev, own.copy_stream)
            try:
                poll_until(lambda: drv.event_done(ev), time.monotonic() + 5.0, lambda: None)
            except TimeoutError:
                drained = False  # a stuck stream: leave the pages registered
            drv.event_destroy(ev)
        for g in own.graphs:  # before the mappings they copy from are closed
            g.close()
        own.graphs = set()
        self._release_peers(unregister=drained)
        for e in own.events:
            drv.event_destroy(e)
        own.events = []
        drv.stream_destroy(own.copy_stream)
        if own.page.device_address and drained:
            drv.host_unregister(own.page.address)
        own.page.close(unlink=True)

    def _release_peers(self, unregister: bool = True) -> None:
        own = self._local
        drv = own.drv
        for p in own.opened:
            try:
                drv.ipc_close_mem(p)
            except _cuda.CudaError:
                pass  # a peer that died may have taken its mapping with it
        own.opened = []
        for peer in own.peers.values():
            if peer.shm.device_address and unregister:
                drv.host_unregister(peer.shm.address)
            peer.counters = None
            peer.shm.close()
        own.peers = {}

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
    """One round: pulls from peers on the node (copy engines), NCCL for the others. It uses
    the transport's public side (node map, communicator, poll_error, abort) and this rank's
    :class:`_Local` resources."""

    def __init__(self, t: IpcTransport, own: _Local, sends, recvs, remote) -> None:
        self.t, self.own = t, own
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
            src = int(own.peers[peer].bases[rb]) + int(rmsg.roff[q])
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
        self._end: int | None = None
        self.proto = self._host_protocol(sorted(pulls), readers)
        if own.signals_method == "stream":
            self._signal_ops(sorted(pulls), readers)
            self._end = own.drv.event_create()

    def _host_protocol(self, sources: list, readers: list) -> RoundProtocol:
        """The host-poll ordering (``signals="host"``) over the peers' counters and events."""
        own = self.own
        drv, peers = own.drv, own.peers

        def ready(p, q):
            return peers[p].counters[_READY] >= q and drv.event_done(peers[p].ready)

        def done(p, q):
            return peers[p].counters[_DONE] >= q and drv.event_done(peers[p].done)

        def pull(p):
            self.pulls[p](own.copy_stream)

        def finish():
            drv.event_record(own.done, own.copy_stream)
            own.page.counters[_DONE] = self.proto.q
            drv.stream_wait_event(self._stream, own.done)  # the round ends after the pulls

        return RoundProtocol(
            sources, readers, ready, done, pull, finish, lambda: drv.event_done(own.done)
        )

    def _signal_ops(self, sources: list, readers: list) -> None:
        """Every address a stream-signalled launch writes or waits on (device addresses of
        the shared pages), as one batch of memory operations per direction."""
        own, rank, w = self.own, self.t.rank, self.t.world_size
        drv = own.drv
        mine = own.page.device_address + 64
        peer = {p: own.peers[p].shm.device_address + 64 for p in (*sources, *readers)}
        self._ready_out = _cuda.MemOps(drv, "write", [peer[p] + 4 * rank for p in readers])
        self._wait_ready = _cuda.MemOps(drv, "wait", [mine + 4 * p for p in sources])
        self._pull_list = [self.pulls[p] for p in sources]
        self._done_out = _cuda.MemOps(drv, "write", [peer[p] + 4 * (w + rank) for p in sources])
        self._wait_done = _cuda.MemOps(drv, "wait", [mine + 4 * (w + p) for p in readers])

    def _pull_call(self, copies: list):
        """``f(stream)`` enqueueing the copies from one peer: a captured graph (one host call)
        or one batch (see IpcTransport's ``pull_graphs``)."""
        own = self.own
        if own.pull_method == "graph":
            own.make_current()  # the graph's capture stream is on this rank's device
            try:
                g = _cuda.CopyGraph(own.drv, copies)
            except _cuda.CudaError:
                own.pull_method = "batch"  # this driver cannot capture them: batches from now on
            else:
                self.graphs.append(g)
                own.graphs.add(g)
                return g.launch
        dsts, srcs, sizes = _cuda.copy_arrays(copies)
        drv = own.drv
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
        own = self.own
        for g in self.graphs:
            g.close()
            own.graphs.discard(g)
        self.graphs = []
        if self._end is not None and own.state == "open":  # close() destroys the driver's
            own.drv.event_destroy(self._end)  # events with the context's streams
        self._end = None

    def launch(self, stream, deadline: float) -> None:
        own = self.own
        own.check_open()
        drv = own.drv
        s = stream.cuda_stream
        own.seq += 1
        q = own.seq
        self._stream = s
        self.proto.start(q)
        if self._end is not None:
            self._launch_signalled(s, q)
            return
        drv.event_record(own.ready, s)  # my rows (and phase A) for this round are stable
        own.page.counters[_READY] = q
        if self.nccl is not None:
            self.nccl.launch(s)
            if self._nccl_end is None:
                self._nccl_end = own.add_event()
            drv.event_record(self._nccl_end, s)
        # pulls wait for this rank's own phase A (staging free, rows it overwrote)
        drv.stream_wait_event(own.copy_stream, own.ready)
        self.proto.poll()

    def _launch_signalled(self, s: int, q: int) -> None:
        """The whole round on the GPU (stream signals): nothing is left for ``done()`` but
        one event query."""
        own = self.own
        drv, c = own.drv, own.copy_stream
        self._ready_out.run(s, q)  # my rows (and phase A) for this round are stable
        if self.nccl is not None:
            self.nccl.launch(s)
        drv.event_record(own.ready, s)
        drv.stream_wait_event(c, own.ready)  # pulls after my own phase A (staging free)
        self._wait_ready.run(c, q)  # every source's rows are stable
        for pull in self._pull_list:
            pull(c)
        self._done_out.run(c, q)  # I have read the sources' rows
        drv.event_record(own.done, c)
        drv.stream_wait_event(s, own.done)
        self._wait_done.run(s, q)  # my readers have read my rows: they may change now
        assert self._end is not None  # stream signals: made at prepare
        drv.event_record(self._end, s)

    def end_event(self) -> int | None:
        """With stream signals, the event after the whole round; else None (the exchange
        stream is made to wait for the pulls once they are issued)."""
        return self._end

    def waiting_on(self) -> tuple[list, list]:
        """(peers whose rows are not ready yet, readers not done yet): who holds the round."""
        if self._end is None:
            return self.proto.waiting_on()
        q, w, slots = self.proto.q, self.t.world_size, self.own.page.slots
        unready = [p for p in self.proto.sources if int(slots[p]) - q < 0]
        undone = [p for p in self.proto.readers if int(slots[w + p]) - q < 0]
        return unready, undone

    def done(self) -> bool:
        own = self.own
        own.check_open()
        self.t.poll_error()
        if self._end is not None:
            if own.drv.event_done(self._end):
                return True
            self._raise_nccl_error()
            return False
        if not self.proto.poll():
            return False
        if self._nccl_end is not None and not own.drv.event_done(self._nccl_end):
            self._raise_nccl_error()
            return False
        return True

    def _raise_nccl_error(self) -> None:
        """While the round's NCCL part is pending: abort and raise NCCL's asynchronous
        error, if it has one."""
        if self.nccl is None:
            return
        comm = self.t.comm
        assert comm is not None  # an NCCL part implies the communicator
        err = comm.async_error()
        if err is not None:
            self.t.abort(str(err))
            raise err
