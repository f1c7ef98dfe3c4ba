"""Layer 2: NCCL communicators made from a unique id, outside any torch.distributed group.

``group()`` defers: send/recv calls inside it are validated and queued, and the whole batch
is issued (ncclGroupStart, the ops, ncclGroupEnd) when the outermost ``group()`` exits
without an exception. An exception inside the block therefore launches nothing.
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal

from . import _buffers
from ._checks import check_count, check_rank_world, check_timeout, current_device, device_index
from ._deadline import DEFAULT_TIMEOUT, Deadline, default_timeout, poll_until
from ._nccl import cuda as _cuda
from ._nccl import library as _library
from ._nccl.library import INT_ARG_MAX as _INT_ARG_MAX
from ._nccl.library import size_arg as _size_arg
from ._nccl.library import word as _word
from ._nccl.table import NCCL_IN_PROGRESS, UNIQUE_ID_BYTES, Dtype, RedOp, Result
from .errors import CommunicatorStateError, NcclError, NcclTimeoutError

if TYPE_CHECKING:
    from ._types import Buffer, DeviceSpec, StreamSpec


__all__ = [
    "UniqueId",
    "Communicator",
    "PreparedP2P",
    "CapturedP2P",
    "group",
    "library_path",
    "load_library",
    "nccl_version",
    "DEFAULT_TIMEOUT",
]


def load_library(path: str | os.PathLike | None = None) -> str:
    """Load libnccl now (``path``, or the discovery order when None) and return its path.

    An explicit path that does not load raises NcclLibraryError naming it; a process holds one
    libnccl, so a second, different path is refused too.
    """
    return _library.load(path).path


def library_path() -> str:
    """Path of the libnccl this process uses (loading it by the discovery order if needed)."""
    return _library.load().path


def nccl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the loaded libnccl."""
    return _library.load().version


class UniqueId:
    """An ncclUniqueId: 128 opaque bytes made by one rank and shared with the others."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"unique id must be bytes, got {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) != UNIQUE_ID_BYTES:
            raise ValueError(f"unique id must be {UNIQUE_ID_BYTES} bytes, got {len(raw)}")
        self._raw = raw

    @classmethod
    def generate(cls) -> UniqueId:
        """A new id from ncclGetUniqueId (rank 0 calls this and shares the bytes)."""
        return cls(_library.load().get_unique_id())

    @classmethod
    def from_bytes(cls, raw: bytes) -> UniqueId:
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> UniqueId:
        try:
            raw = bytes.fromhex(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"unique id hex is not valid hex: {e}") from None
        return cls(raw)

    def hex(self) -> str:
        return self._raw.hex()

    def __bytes__(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UniqueId) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"UniqueId({self._raw[:8].hex()}...)"


# ---- groups --------------------------------------------------------------------------------

_tls = threading.local()


def _state():
    st = getattr(_tls, "st", None)
    if st is None:
        st = _tls.st = _GroupState()
    return st


class _GroupState:
    __slots__ = ("depth", "ops", "comms")

    def __init__(self) -> None:
        self.depth = 0
        self.ops: list = []
        self.comms: dict[int, Communicator] = {}


class group:
    """Context manager fusing the send/recv/collectives inside it into one NCCL group.

    Nests. Ops are issued when the outermost group exits normally; on an exception nothing
    queued inside this (inner) group is issued. For non-blocking communicators the exit waits
    (polling ncclCommGetAsyncError) until the launch completed, up to each communicator's
    timeout; a timeout aborts that communicator and raises NcclTimeoutError.
    """

    __slots__ = ("_mark", "_st")

    def __enter__(self):
        st = self._st = getattr(_tls, "st", None) or _state()
        st.depth += 1
        self._mark = len(st.ops)
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        st = self._st
        st.depth -= 1
        if exc_type is not None:
            del st.ops[self._mark :]
            if st.depth == 0:
                st.comms.clear()
            return False
        if st.depth == 0:
            ops, st.ops = st.ops, []
            comms = st.comms  # the non-blocking communicators of the ops (usually none)
            if comms:
                st.comms = {}
            if ops:
                _issue(ops, comms)
        return False


def _issue(ops: list, comms: dict | None) -> None:
    """Issue queued calls (see NcclLibrary.issue_calls) as one NCCL group.

    ``comms``: the non-blocking communicators of the ops (only those are listed). Their
    previous launch must have completed before NCCL is called on them again (settled here,
    polling with their timeout); this launch is not waited for: when ncclGroupEnd says it is
    still in progress they are marked pending, and whoever next needs the launch done
    (:meth:`Communicator.wait`, a transport round's ``done()``, the next issue) settles it."""
    lib = _library._loaded or _library.load()  # loaded once a communicator exists: no lock
    if comms:
        for c in comms.values():
            if c._pending:
                c._settle("ncclGroupEnd")
    lib.group_start()
    rc = 0
    try:
        lib.issue_calls(ops)
    finally:
        rc = lib.group_end()
    if comms and rc == NCCL_IN_PROGRESS:  # only non-blocking communicators return this
        for c in comms.values():
            c._pending = True


# ---- communicator --------------------------------------------------------------------------


class PreparedP2P:
    """A validated batch of p2p ops (see :meth:`Communicator.prepare_p2p`)."""

    __slots__ = ("_comm", "_calls", "_hint", "_keep", "num_ops")

    def __init__(self, comm: Communicator, ops: list, hint, keep) -> None:
        self._comm = comm
        self._calls = comm._lib.prepare_p2p(ops, comm._comm)
        self._hint = hint
        self._keep = keep  # the buffers stay alive as long as the batch
        self.num_ops = len(ops)

    def launch(self, stream=None) -> None:
        """Issue the batch on ``stream`` (torch/cupy stream, raw handle or None as for
        :meth:`Communicator.p2p`): as one NCCL group, or inside the enclosing :func:`group`."""
        c = self._comm
        if c._comm_obj is None:
            c._check_open()
        calls = self._calls
        h = stream if type(stream) is int else _buffers.stream_handle(stream, self._hint, c._device)
        if not self.num_ops:
            return
        # one deferred op with this launch's stream: issued now as a group of its own, or at
        # the enclosing group's end
        c._enqueue([(None, lambda: calls.issue(h), None)])

    def capture(self) -> CapturedP2P:
        """Capture the batch once as a CUDA graph; its ``launch(stream)`` replays it (one
        driver call, whatever the number of ops). See :class:`CapturedP2P`.

        Make the connections first (``connect_peers()``, or launch the batch once): set-up
        inside a capture is not recorded. Not inside :func:`group`."""
        c = self._comm
        c._check_open()
        if _state().depth:
            raise RuntimeError("capture() cannot run inside group(): the graph is the whole batch")
        drv = _cuda.driver()
        if drv is None:
            raise RuntimeError(f"capture() needs the CUDA driver: {_cuda.unavailable_reason()}")
        if not self.num_ops:
            raise ValueError("capture() of an empty batch: there is nothing to replay")
        prev = drv.current_device()
        drv.set_device(c._device)
        s = drv.stream_create()
        graph = exec_ = None
        try:
            drv.begin_capture(s)
            try:
                calls = self._calls
                _issue([(None, lambda: calls.issue(s), None)], None if c._blocking else {id(c): c})
            finally:
                graph = drv.end_capture(s)  # ends the capture even when issuing failed
            exec_ = drv.graph_instantiate(graph)
        except BaseException:
            drv.graph_destroy(exec_, graph)
            raise
        finally:
            drv.stream_destroy(s)
            if prev is not None and prev != c._device:
                drv.set_device(prev)
        g = CapturedP2P(c, exec_, graph, self._hint, self._keep, self.num_ops)
        c._graphs[id(g)] = weakref.ref(g)
        return g


class CapturedP2P:
    """A prepared p2p batch captured as a CUDA graph (:meth:`PreparedP2P.capture`).

    ``launch(stream=None)`` replays it on ``stream``: the same ops with the same buffers (their
    contents as they are when it runs), at the cost of one ``cuGraphLaunch``. Every rank must
    replay its matching graph, as it would launch the batch. It keeps its buffers alive.

    Capture again after anything that invalidates it: :meth:`release` (or garbage collection)
    frees the graph, and ``close()``/``abort()`` of the communicator release every graph it
    has (a live graph would keep ``ncclCommFinalize`` waiting forever); a launch after that
    raises CommunicatorStateError."""

    __slots__ = ("_comm", "_exec", "_graph", "_hint", "_keep", "num_ops", "_why", "__weakref__")

    def __init__(
        self, comm: Communicator, exec_: int, graph: int, hint, keep, num_ops: int
    ) -> None:
        self._comm = comm
        self._exec: int | None = exec_
        self._graph: int | None = graph
        self._hint, self._keep = hint, keep
        self.num_ops = num_ops
        self._why = ""

    @property
    def released(self) -> bool:
        return self._exec is None

    def launch(self, stream=None) -> None:
        ex = self._exec
        if ex is None:
            raise CommunicatorStateError(
                f"this captured batch was released ({self._why}); capture it again"
            )
        c = self._comm
        h = stream if type(stream) is int else _buffers.stream_handle(stream, self._hint, c._device)
        drv = _cuda.driver()
        assert drv is not None  # a captured graph exists: the driver loaded
        drv.graph_launch(ex, h)

    def release(self, why: str = "released by the caller") -> None:
        """Free the graph now (idempotent)."""
        if self._exec is None:
            return
        ex, g = self._exec, self._graph
        self._exec = self._graph = None
        self._why = why
        self._keep = None
        self._comm._graphs.pop(id(self), None)
        drv = _cuda.driver()
        if drv is not None:
            drv.graph_destroy(ex, g)

    def __del__(self) -> None:
        try:
            self.release("garbage collected")
        except Exception:
            pass


# torch.Tensor once torch is imported (see _torch_tensor_cls)
_TORCH_TENSOR: type[Any] | None = None
_RAW_STREAM: list = [None]  # torch's current raw stream of a device, once torch is imported


def _torch_tensor_cls():
    """torch.Tensor once torch is imported (never imports it); a placeholder class before."""
    global _TORCH_TENSOR
    if _TORCH_TENSOR is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return _NoClass
        _TORCH_TENSOR = torch.Tensor
        _RAW_STREAM[0] = (
            getattr(torch._C, "_cuda_getCurrentRawStream", None) or _buffers.torch_current_stream
        )
    return _TORCH_TENSOR


class _NoClass:
    pass


def _no_gpu() -> str:
    """Why NCCL cannot work here when the CUDA driver does not load (no GPU)."""
    return (
        "no usable GPU on this machine: the CUDA driver does not load "
        f"({_cuda.unavailable_reason()}); a Communicator needs an NVIDIA GPU and its driver"
    )


def _p2p_method(is_send: bool, doc: str):
    """Communicator.send / .recv: one function body, one Python call per op."""

    def op(self, buf, peer, stream=None) -> None:
        # The per-op hot path: the common cases (a contiguous torch tensor on this device, an
        # int stream or torch's current one) inline, everything else through _resolve; the
        # same checks either way. The op is queued as its ncclSend/ncclRecv call with every
        # argument prebuilt (see NcclLibrary.issue_calls).
        comm = self._comm_obj
        if comm is None:
            self._check_open()
        if type(peer) is not int or not 0 <= peer < self._world_size:
            self._bad_peer(peer)
        if type(buf) is _TORCH_TENSOR and buf.get_device() == self._device and buf.is_contiguous():
            ptr, nbytes = buf.data_ptr(), buf.nbytes
            if stream is None:
                stream = _RAW_STREAM[0](self._device)
            elif type(stream) is not int:
                stream = _buffers.stream_handle(stream, _buffers.HINT_TORCH, self._device)
        else:
            ptr, nbytes, hint = self._resolve(buf, "buf")
            if type(stream) is not int:
                stream = _buffers.stream_handle(stream, hint, self._device)
        so = self._stream_objs.get(stream)
        if so is None:  # first use of this stream handle (validated once)
            so = self._lib.stream_obj(
                _buffers.stream_handle(stream, _buffers.HINT_DEFAULT, self._device)
            )
        call = (
            self._send_fn if is_send else self._recv_fn,
            (
                _word(ptr),
                nbytes if nbytes <= _INT_ARG_MAX else _size_arg(nbytes),
                0,
                peer,
                comm,
                so,
            ),
            self._comm,
        )
        st = getattr(_tls, "st", None) or _state()  # _enqueue([call]) inlined
        if st.depth:
            st.ops.append(call)
            if not self._blocking:
                st.comms[id(self)] = self
        else:
            _issue([call], None if self._blocking else {id(self): self})

    op.__name__ = op.__qualname__ = "send" if is_send else "recv"
    op.__doc__ = doc
    return op


def _as_unique_id(unique_id) -> UniqueId:
    """A UniqueId, or its 128 bytes (bytes, bytearray) as one."""
    if isinstance(unique_id, UniqueId):
        return unique_id
    if isinstance(unique_id, (bytes, bytearray)):
        return UniqueId(bytes(unique_id))
    raise TypeError(
        "unique_id must be a UniqueId or its 128 bytes (bytes, bytearray), got "
        f"{type(unique_id).__name__}"
    )


def _config_options(lib, **given) -> dict[str, Any]:
    """The ncclConfig options given (None: left out); an option too new for this NCCL is
    raised here, before any NCCL call."""
    options = {k: v for k, v in given.items() if v is not None}
    if options:
        from ._nccl.config import build_config

        build_config(lib.version, **options)
    return options


def _existing_device(drv, dev: int | None) -> int:
    """``dev`` (None: the current device), checked against the devices the driver sees."""
    if dev is None:
        dev = current_device()
    if drv is not None:
        n = drv.device_count()
        if dev >= n:
            raise ValueError(f"device {dev} does not exist: this machine has {n} CUDA device(s)")
    return dev


class Communicator:
    """A NCCL communicator over ``world_size`` ranks, one GPU each.

    Args:
        unique_id: the :class:`UniqueId` rank 0 generated (all ranks pass the same).
        rank, world_size: this rank and the number of ranks.
        device: CUDA device index (int, ``"cuda:N"`` or torch.device); None = current device.
        blocking: False makes a non-blocking communicator: init and every grouped launch poll
            ncclCommGetAsyncError until done, aborting and raising NcclTimeoutError after
            ``timeout`` seconds. With blocking=True, init blocks inside NCCL until all ranks
            join (no timeout possible there); ``timeout`` still bounds :meth:`wait`.
        timeout: seconds; None = ``$EPLB_PYNCCL_TIMEOUT`` or 600.
        max_ctas, min_ctas, comm_name, cga_cluster_size, net_name, split_share: ncclConfig_t
            fields, refused with a clear error when the loaded NCCL is too old for them.

    ``close()`` is collective (ncclCommFinalize + ncclCommDestroy: every rank must call it);
    ``abort()`` is local. Garbage collection of an open communicator aborts it (never a
    collective). As a context manager it closes on normal exit and aborts on an exception.
    """

    def __init__(
        self,
        unique_id: UniqueId,
        rank: int,
        world_size: int,
        device: DeviceSpec = None,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        max_ctas: int | None = None,
        min_ctas: int | None = None,
        comm_name: str | None = None,
        cga_cluster_size: int | None = None,
        net_name: str | None = None,
        split_share: bool | None = None,
    ) -> None:
        self._comm = 0
        self._comm_obj = None
        self._state = "init"
        self._pending = False  # non-blocking: the last grouped launch may still be in progress
        self._graphs: dict = {}  # id -> weakref of the CapturedP2P graphs of this communicator
        unique_id = _as_unique_id(unique_id)
        rank, world_size = check_rank_world(rank, world_size)
        timeout = default_timeout() if timeout is None else check_timeout(timeout)
        if max_ctas is not None:
            max_ctas = check_count(max_ctas, "max_ctas")
        if min_ctas is not None:
            min_ctas = check_count(min_ctas, "min_ctas")
        if max_ctas is not None and min_ctas is not None and min_ctas > max_ctas:
            raise ValueError(f"min_ctas ({min_ctas}) must be <= max_ctas ({max_ctas})")
        dev = None if device is None else device_index(device)

        lib = self._lib = _library.load()
        self._stream_objs = lib._stream_objs  # stream handle -> prebuilt ctypes pointer
        _torch_tensor_cls()
        options = _config_options(
            lib,
            blocking=None if blocking else 0,
            max_ctas=max_ctas,
            min_ctas=min_ctas,
            comm_name=comm_name,
            cga_cluster_size=cga_cluster_size,
            net_name=net_name,
            split_share=None if split_share is None else int(bool(split_share)),
        )
        drv = _cuda.driver()
        dev = _existing_device(drv, dev)
        self._rank = rank
        self._world_size = world_size
        self._device = dev
        self._blocking = bool(blocking)
        self._timeout = float(timeout)
        self._scratch_ptr = 0
        # allocations (start, end) raw pointers were found in, sorted by start: a pointer
        # inside one needs no driver query (a shuffler's rows span a few hundred allocations)
        self._ranges: list = []
        self._starts: list = []
        self._init_comm(drv, unique_id, options)

    def _init_comm(self, drv, unique_id: UniqueId, options: dict[str, Any]) -> None:
        """ncclCommInitRankConfig on this communicator's device (the caller's current device
        is restored); non-blocking: waits until the communicator is ready."""
        lib, dev = self._lib, self._device
        prev = drv.current_device() if drv is not None else None
        if drv is not None:
            drv.set_device(dev)
        try:
            try:
                self._comm, rc = lib.comm_init_rank(
                    self._world_size, bytes(unique_id), self._rank, options
                )
            except NcclError as e:
                if drv is None and e.code == Result.ncclUnhandledCudaError:  # without a driver
                    raise type(e)(
                        e.code, e.error_string, e.last_error, e.function, _no_gpu()
                    ) from None
                raise
            self._comm_obj = lib.comm_obj(self._comm)
            self._send_fn, self._recv_fn = lib.p2p_fn(True), lib.p2p_fn(False)
            self._state = "open"
            if not self._blocking:
                self._wait_ready("ncclCommInitRankConfig")
        finally:
            if drv is not None and prev is not None and prev != dev:
                drv.set_device(prev)

    @classmethod
    def from_store(
        cls,
        store,
        rank: int,
        world_size: int,
        device=None,
        key: str = "eplb_pynccl/unique_id",
        **kwargs,
    ) -> Communicator:
        """Make a communicator, sharing the unique id through a key-value store.

        ``store`` is anything with ``set(key, bytes)`` and ``get(key) -> bytes`` where get
        waits for the key (torch.distributed.TCPStore and FileStore do). Rank 0 generates the id
        and sets it under ``key``; the others get it. No process group is created. Use a
        different ``key`` for each communicator made through the same store.
        """
        if not (hasattr(store, "set") and hasattr(store, "get")):
            raise TypeError(f"store must have set() and get(), got {type(store).__name__}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if rank == 0:
            uid = UniqueId.generate()
            store.set(key, bytes(uid))
        else:
            raw = store.get(key)
            if isinstance(raw, str):
                raw = raw.encode("latin-1")
            uid = UniqueId.from_bytes(raw)
        return cls(uid, rank, world_size, device, **kwargs)

    # -- properties ----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> int:
        return self._device

    @property
    def nccl_version(self) -> tuple[int, int, int]:
        return self._lib.version

    @property
    def blocking(self) -> bool:
        return self._blocking

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def closed(self) -> bool:
        return self._state != "open"

    @property
    def handle(self) -> int:
        """The raw ncclComm_t (an int)."""
        self._check_open()
        return self._comm

    def __repr__(self) -> str:
        return (
            f"Communicator(rank={self._rank}, world_size={self._world_size}, "
            f"device={self._device}, state={self._state})"
        )

    # -- checks --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise CommunicatorStateError(
                f"communicator is {self._state}; no further operations are allowed"
            )

    def _raw_device(self, ptr: int, nbytes: int, name: str) -> None:
        """Check a raw pointer is on this communicator's device and its bytes lie inside
        one allocation (allocation ranges are cached: a cache hit costs no driver call)."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i >= 0:
            lo, hi = self._ranges[i]
            if ptr + nbytes <= hi:
                return
        drv = _cuda.driver()
        r = drv.pointer_range(ptr) if drv is not None and ptr else None
        if r is None:
            return  # CUDA cannot tell (e.g. no driver): trust the caller
        start, size, dev = r
        if dev != self._device:
            raise ValueError(
                f"{name} is on cuda:{dev} but this communicator is on cuda:{self._device}"
            )
        if ptr + nbytes > start + size:
            raise ValueError(
                f"{name}: {nbytes} bytes at {ptr:#x} run past the end of its allocation "
                f"({start:#x} + {size} bytes)"
            )
        if len(self._ranges) >= 4096:  # allocations come and go: start over
            self._ranges, self._starts = [], []
        # an allocation freed and replaced by one at the same start replaces its entry
        j = bisect.bisect_left(self._starts, start)
        if j < len(self._starts) and self._starts[j] == start:
            self._ranges[j] = (start, start + size)
        else:
            self._starts.insert(j, start)
            self._ranges.insert(j, (start, start + size))

    def _resolve(self, buf, name: str):
        """(ptr, nbytes, stream hint) of a buffer, validated for this communicator."""
        cls = type(buf)
        if cls is tuple and len(buf) == 2:
            ptr, nbytes = buf
            if type(ptr) is not int or type(nbytes) is not int:
                raise TypeError(f"{name}: a raw buffer is a (pointer: int, nbytes: int) tuple")
            if nbytes < 0:
                raise ValueError(f"{name}: nbytes must be >= 0, got {nbytes}")
            if ptr <= 0 and nbytes:
                raise ValueError(f"{name}: pointer must be a positive device address, got {ptr}")
            self._raw_device(ptr, nbytes, name)
            return ptr, nbytes, _buffers.HINT_DEFAULT
        if cls is _torch_tensor_cls():
            dev = buf.get_device()
            if dev == self._device and buf.is_contiguous():
                return buf.data_ptr(), buf.nbytes, _buffers.HINT_TORCH
        ptr, nbytes, dev, hint = _buffers.resolve(buf, name)
        if dev != self._device:
            if dev == -2:
                self._raw_device(ptr, nbytes, name)
            elif dev >= 0:
                raise ValueError(
                    f"{name} is on cuda:{dev} but this communicator is on cuda:{self._device}"
                )
        return ptr, nbytes, hint

    def _bad_peer(self, peer):
        if isinstance(peer, int) and not isinstance(peer, bool):
            raise ValueError(f"peer must be in [0, {self._world_size}), got {peer}")
        raise TypeError(f"peer must be an int, got {type(peer).__name__}")

    # -- point to point ------------------------------------------------------------------
    send = _p2p_method(
        True, """Send ``buf``'s bytes to ``peer`` (inside :func:`group` to pair with receives)."""
    )
    recv = _p2p_method(False, """Receive ``buf``'s size in bytes from ``peer`` into ``buf``.""")

    def p2p(self, sends=(), recvs=(), stream: StreamSpec = None) -> None:
        """Post many sends and receives in one NCCL group (or the enclosing :func:`group`).

        ``sends``/``recvs``: sequences of ``(buf, peer)``. Everything is validated first; if
        any entry is bad, nothing is issued and the error names it (``sends[3]``). One
        stream for all (None: torch's current stream for torch tensors, else the default
        stream). Between two ranks, the i-th send matches the i-th receive on the peer.
        """
        ops, hint = self._p2p_ops(sends, recvs)
        if not ops:
            return
        s = self._lib.stream_obj(
            stream if type(stream) is int else _buffers.stream_handle(stream, hint, self._device)
        )
        sf, rf, cw, c, w = self._send_fn, self._recv_fn, self._comm_obj, self._comm, _word
        self._enqueue(
            [(sf if i else rf, (w(p), _size_arg(n), 0, peer, cw, s), c) for i, p, n, peer in ops]
        )

    def prepare_p2p(self, sends=(), recvs=(), *, graph: bool = False):
        """Validate a batch of sends and receives once and return a :class:`PreparedP2P`
        whose ``launch(stream)`` issues it as one NCCL group with no per-op validation.

        For exchanges that repeat with the same buffers (a fixed pipeline, the same
        rearrangement pattern again): the buffers are referenced, not copied (their
        contents are read when launched) and kept alive by the batch. ``graph=True``
        captures it at once and returns the :class:`CapturedP2P` (``PreparedP2P.capture``).
        """
        sends, recvs = list(sends), list(recvs)
        ops, hint = self._p2p_ops(sends, recvs)
        batch = PreparedP2P(self, ops, hint, (sends, recvs))
        return batch.capture() if graph else batch

    def _p2p_ops(self, sends, recvs):
        comm = self._comm_obj
        if comm is None:
            self._check_open()
        n = self._world_size
        resolve = self._resolve
        ops = []
        hint = None
        for is_send, items, what in ((True, sends, "sends"), (False, recvs, "recvs")):
            for k, (buf, peer) in enumerate(items):
                if type(peer) is not int or not 0 <= peer < n:
                    try:
                        self._bad_peer(peer)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"{what}[{k}]: {e}") from None
                ptr, nbytes, h = resolve(buf, f"{what}[{k}]")
                if hint is None:
                    hint = h
                ops.append((is_send, ptr, nbytes, peer))
        return ops, hint

    def _enqueue(self, ops: list) -> None:
        """Queue ops in the enclosing group(), or issue them as a group of their own."""
        st = getattr(_tls, "st", None) or _state()
        if st.depth:
            st.ops.extend(ops)
            if not self._blocking:
                st.comms[id(self)] = self
        else:
            _issue(ops, None if self._blocking else {id(self): self})

    # -- collectives (small, for metadata) ----------------------------------------------
    def _typed(self, buf, name):
        ptr, nbytes, hint = self._resolve(buf, name)
        dtype, size = _buffers.nccl_dtype(buf, name)
        since = Dtype(dtype).since
        if since is not None and self._lib.version < since:
            raise TypeError(
                f"{name}: fp8 collectives need NCCL >= {since[0]}.{since[1]}, loaded "
                f"{self._lib.version}"
            )
        return ptr, nbytes, dtype, size, hint

    def _collective(self, fn, stream, hint) -> None:
        s = self._lib.stream_obj(_buffers.stream_handle(stream, hint, self._device))
        self._enqueue([(None, lambda: fn(s), None)])

    def all_reduce(
        self, buf: Buffer, out: Buffer | None = None, op: str = "sum", stream: StreamSpec = None
    ) -> None:
        """All-reduce ``buf`` into ``out`` (in place when out is None)."""
        self._check_open()
        redops = RedOp.by_short()
        if op not in redops:
            raise ValueError(f"op must be one of {sorted(redops)}, got {op!r}")
        sptr, sbytes, dtype, size, hint = self._typed(buf, "buf")
        rptr, rbytes = sptr, sbytes
        if out is not None:
            rptr, rbytes, rdtype, _, _ = self._typed(out, "out")
            if rdtype != dtype:
                raise TypeError("out must have the same dtype as buf")
            if rbytes != sbytes:
                raise ValueError(f"out has {rbytes} bytes but buf has {sbytes}")
        lib, comm, count, red = self._lib, self._comm, sbytes // size, int(redops[op])
        self._collective(
            lambda s: lib.all_reduce(sptr, rptr, count, dtype, red, comm, s), stream, hint
        )

    def all_gather(self, buf, out, stream=None) -> None:
        """Gather every rank's ``buf`` into ``out`` (world_size times buf's size, rank order)."""
        self._check_open()
        sptr, sbytes, dtype, size, hint = self._typed(buf, "buf")
        rptr, rbytes, rdtype, _, _ = self._typed(out, "out")
        if rdtype != dtype:
            raise TypeError("out must have the same dtype as buf")
        if rbytes != sbytes * self._world_size:
            raise ValueError(
                f"out has {rbytes} bytes; all_gather needs world_size * {sbytes} = {sbytes * self._world_size}"
            )
        lib, comm, count = self._lib, self._comm, sbytes // size
        self._collective(lambda s: lib.all_gather(sptr, rptr, count, dtype, comm, s), stream, hint)

    def broadcast(self, buf: Buffer, root: int = 0, stream: StreamSpec = None) -> None:
        """Broadcast ``buf`` from ``root`` in place."""
        self._check_open()
        if not isinstance(root, int) or not 0 <= root < self._world_size:
            raise ValueError(f"root must be in [0, {self._world_size}), got {root}")
        ptr, nbytes, dtype, size, hint = self._typed(buf, "buf")
        lib, comm, count = self._lib, self._comm, nbytes // size
        self._collective(
            lambda s: lib.broadcast(ptr, ptr, count, dtype, root, comm, s), stream, hint
        )

    # -- synchronisation and health ------------------------------------------------------
    def _settle(self, what: str) -> None:
        """Wait (polling, with the timeout) until the pending non-blocking launch is done."""
        self._pending = False
        self._wait_ready(what)

    def launch_settled(self) -> bool:
        """Non-blocking communicators: whether the last grouped launch has been handed to the
        stream (one ncclCommGetAsyncError query, never a wait); raises the communicator's
        asynchronous error (after aborting it). Always True for a blocking communicator.
        Only once it is True may an event recorded on the launch's stream follow the launch."""
        if not self._pending:
            return True
        code = self._lib.async_error(self._comm)
        if code == NCCL_IN_PROGRESS:
            return False
        self._pending = False
        if code:
            err = self._lib.error(code, "ncclGroupEnd", self._comm, "the communicator was aborted")
            self.abort()
            raise err
        return True

    def _wait_ready(self, what: str) -> None:
        deadline = time.monotonic() + self._timeout
        try:
            self._lib.wait_ready(self._comm, deadline, what)
        except NcclTimeoutError:
            self._mark_aborted()
            raise

    def async_error(self) -> NcclError | None:
        """The communicator's asynchronous error as an NcclError, or None (in progress: None)."""
        self._check_open()
        code = self._lib.async_error(self._comm)
        if code in (0, NCCL_IN_PROGRESS):
            return None
        return self._lib.error(code, "ncclCommGetAsyncError", self._comm)

    def wait(self, stream: StreamSpec = None, timeout: float | None = None) -> None:
        """Wait until the work queued on ``stream`` so far is done, watching for NCCL errors.

        ``stream`` None means torch's current stream on this device when torch is loaded,
        else the default stream. Past ``timeout`` (default: the communicator's) or on an
        asynchronous NCCL error the communicator is aborted and the error raised.
        """
        self._check_open()
        if self._pending:
            self._settle("wait")
        drv = _cuda.driver()
        if drv is None:
            raise RuntimeError(f"wait() needs the CUDA driver: {_cuda.unavailable_reason()}")
        hint = _buffers.HINT_TORCH if "torch" in sys.modules else _buffers.HINT_DEFAULT
        s = _buffers.stream_handle(stream, hint, self._device)
        t = self._timeout if timeout is None else check_timeout(timeout)
        prev = drv.current_device()
        drv.set_device(self._device)
        ev = drv.event_create()
        try:
            drv.event_record(ev, s)

            def finished() -> bool:
                if drv.event_done(ev):
                    return True
                code = self._lib.async_error(self._comm)
                if code not in (0, NCCL_IN_PROGRESS):
                    err = self._lib.error(code, "wait", self._comm, "the communicator was aborted")
                    self.abort()
                    raise err
                return False

            def expired() -> None:
                self.abort()
                raise NcclTimeoutError(
                    Result.ncclTimeout,
                    "operation timed out",
                    "",
                    "wait",
                    f"stream work not done after {t:g} s; the communicator was aborted",
                )

            poll_until(finished, Deadline(t), expired)
        finally:
            drv.event_destroy(ev)
            if prev is not None and prev != self._device:
                drv.set_device(prev)

    def _scratch(self) -> int:
        if not self._scratch_ptr:
            self._scratch_ptr = self._lib.mem_alloc(4096)
        return self._scratch_ptr

    def barrier(self, stream: StreamSpec = None, timeout: float | None = None) -> None:
        """All ranks meet: a 1-element all-reduce, then :meth:`wait` (collective)."""
        self._check_open()
        drv = _cuda.driver()
        if drv is not None:
            drv.set_device(self._device)
        ptr = self._scratch()
        lib, comm = self._lib, self._comm
        f32, add = int(Dtype.ncclFloat32), int(RedOp.ncclSum)
        s = 0 if stream is None else _buffers.stream_handle(stream, 0, self._device)
        self._collective(lambda so: lib.all_reduce(ptr, ptr, 1, f32, add, comm, so), s, 0)
        self.wait(s, timeout)

    def connect_peers(self, stream: StreamSpec = None, timeout: float | None = None) -> None:
        """Open the p2p connection to every peer now (collective): one tiny grouped exchange
        with all ranks, so no lazy connection set-up happens later, in the middle of serving."""
        self._check_open()
        drv = _cuda.driver()
        if drv is not None:
            drv.set_device(self._device)
        ptr = self._scratch()
        s = 0 if stream is None else _buffers.stream_handle(stream, 0, self._device)
        n = self._world_size
        with group():
            for k in range(1, n):
                self.send((ptr, 4), (self._rank + k) % n, s)
                self.recv((ptr + 64, 4), (self._rank - k) % n, s)
        self.wait(s, timeout)

    # -- registration --------------------------------------------------------------------
    def register(self, buf) -> int:
        """ncclCommRegister the buffer; returns a handle for :meth:`deregister`."""
        self._check_open()
        ptr, nbytes, _, _ = _buffers.resolve(buf, "buf")
        return self._lib.comm_register(self._comm, ptr, nbytes)

    def deregister(self, handle: int) -> None:
        self._check_open()
        self._lib.comm_deregister(self._comm, handle)

    # -- lifecycle -----------------------------------------------------------------------
    def _mark_aborted(self) -> None:
        self._release_graphs("its communicator was aborted")
        self._state = "aborted"
        self._comm_obj = None

    def _release_graphs(self, why: str) -> None:
        for ref in list(self._graphs.values()):
            g = ref()
            if g is not None:
                g.release(why)
        self._graphs.clear()

    def close(self) -> None:
        """Finalize and destroy (collective: every rank must call it). Idempotent. Releases
        the communicator's captured graphs first (a live one would hang ncclCommFinalize)."""
        if self._state != "open":
            return
        self._release_graphs("its communicator was closed")
        lib, comm = self._lib, self._comm
        drv = _cuda.driver()
        if drv is not None:
            drv.set_device(self._device)
        if self._pending:
            self._settle("ncclCommFinalize")
        if self._scratch_ptr:
            lib.mem_free(self._scratch_ptr)
            self._scratch_ptr = 0
        rc = lib.comm_finalize(comm)
        if rc == NCCL_IN_PROGRESS or not self._blocking:
            self._wait_ready("ncclCommFinalize")
        self._state = "closed"
        self._comm_obj = None
        lib.comm_destroy(comm)

    def abort(self) -> None:
        """Abort (local, never collective): pending NCCL work is cancelled, captured graphs
        released. Idempotent."""
        if self._state not in ("open",):
            return
        self._release_graphs("its communicator was aborted")
        self._mark_aborted()
        self._lib.comm_abort(self._comm)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        try:
            if getattr(self, "_state", None) == "open":
                self._state = "aborted"
                self._lib.comm_abort(self._comm)
        except Exception:
            pass
