"""Finding, loading and calling libnccl.

Discovery order (the first that loads wins; see README "Finding libnccl"):

1. an explicit path passed to :func:`load` or the ``EPLB_PYNCCL_NCCL_SO`` environment variable;
   if that does not load it is an error naming it, never a silent fallback;
2. a libnccl already loaded in this process (e.g. torch's), so a process never holds two copies;
3. the ``nvidia.nccl`` wheel (nvidia-nccl-cu12 or nvidia-nccl-cu13);
4. torch's ``lib`` directory;
5. the system loader's ``libnccl.so.2``.

Everything that touches ctypes lives in this package (``eplb_pynccl._nccl``); the layers above
call the Python methods of :class:`NcclLibrary`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import threading
from collections.abc import Iterable
from itertools import starmap as _starmap
from pathlib import Path
from typing import Any, NoReturn

from .._deadline import poll_until
from ..errors import NcclError, NcclLibraryError, NcclTimeoutError, error_class
from . import config as _config
from .table import (
    FUNCTIONS,
    NCCL_IN_PROGRESS,
    NCCL_SUCCESS,
    UNIQUE_ID_BYTES,
    NcclUniqueIdStruct,
    Result,
)

P2POp = tuple[bool, int, int, int]
"""One point-to-point op: ``(is_send, device pointer, nbytes, peer)``."""

ENV_VAR = "EPLB_PYNCCL_NCCL_SO"
MIN_VERSION = (2, 19, 0)
SONAME = "libnccl.so.2"

# ---- call arguments for the hot path ---------------------------------------------------------
# ctypes converts each argument of a foreign call on every call. A ``c_void_p`` instance costs a
# new conversion object per call; a plain int is cheap but is passed as a C int (32 bits); an
# object made by ``byref(obj, offset)`` is passed as the pointer ``&obj + offset`` with no work
# at the call. So the hot path passes every 64-bit value (device pointer, ncclComm_t,
# cudaStream_t, a byte count >= 2**31) as ``byref(_NULL, value)``: ``_NULL`` is a ctypes object
# *at address 0* (made with from_address, never read), so the argument is ``value`` itself. It
# is made once per buffer or handle (once per op on the one-shot path) instead of once per
# call. On LP64 ABIs (x86-64, aarch64) a pointer and a size_t travel in the same 64-bit
# register; _words_pass_through() checks all of it through libc once, and plain ctypes objects
# are used where that check fails.
_NULL = ctypes.c_char.from_address(0)  # only its address is ever used: never read it
_null_offset = functools.partial(ctypes.byref, _NULL)  # value -> argument passing value
INT_ARG_MAX = 0x7FFFFFFF  # a byte count up to this passes as a plain int (sign-extended by libffi)


def _words_pass_through() -> bool:
    """Whether byref-made words and plain ints reach C as the intended 64-bit values here."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(ctypes.c_size_t) != 8:
        return False
    w = _null_offset
    try:
        libc = ctypes.CDLL(None)
        labs = libc["labs"]  # long labs(long): returns its (positive) argument
        memmove = libc["memmove"]
        labs.restype = ctypes.c_long
        memmove.restype = ctypes.c_void_p
        src = ctypes.create_string_buffer(b"eplb_pynccl", 12)
        dst = ctypes.create_string_buffer(12)
        d, big = ctypes.addressof(dst), (1 << 46) + 12345
        ok = labs(w(big)) == big and labs(INT_ARG_MAX) == INT_ARG_MAX
        ok = ok and memmove(w(d), w(ctypes.addressof(src)), 12) == d and dst.raw == src.raw
    except Exception:  # noqa: BLE001 - any failure means: use the plain objects
        return False
    return ok


WORDS_BY_REF = _words_pass_through()
if not WORDS_BY_REF:
    INT_ARG_MAX = -1  # every byte count goes through size_arg()
word = _null_offset if WORDS_BY_REF else ctypes.c_void_p
"""``word(v)``: the call argument for a 64-bit value (pointer, size, handle), made in C."""


def size_arg(nbytes: int) -> Any:
    """The call argument for a byte count: a plain int when it fits a C int, else a word."""
    if nbytes <= INT_ARG_MAX:
        return nbytes
    return word(nbytes) if WORDS_BY_REF else ctypes.c_size_t(nbytes)


def decode_version(code: int) -> tuple[int, int, int]:
    """ncclGetVersion's integer -> (major, minor, patch)."""
    if code >= 10000:
        return code // 10000, (code % 10000) // 100, code % 100
    return code // 1000, (code % 1000) // 100, code % 100


def _loaded_nccl_paths() -> list[str]:
    """Paths of libnccl files already mapped into this process (Linux /proc/self/maps)."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if os.path.basename(path).startswith("libnccl.so") and path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def _spec_dirs(module: str) -> list[Path]:
    """Directories of an installed (possibly namespace) package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    if spec.origin:
        return [Path(spec.origin).parent]
    return []


def candidate_paths() -> list[tuple[str, str]]:
    """(source, path) pairs in discovery order for steps 2-5 (step 1 is handled by load)."""
    out: list[tuple[str, str]] = []
    for p in _loaded_nccl_paths():
        out.append(("already loaded in this process", p))
    for d in _spec_dirs("nvidia"):
        out.append(("nvidia.nccl wheel", str(d / "nccl" / "lib" / SONAME)))
    for d in _spec_dirs("torch"):
        for name in (SONAME, "libnccl.so"):
            out.append(("torch lib directory", str(d / "lib" / name)))
    out.append(("system loader", SONAME))
    return out


class NcclLibrary:
    """A loaded libnccl with the functions of the table bound and checked."""

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.source = source
        self._cdll = ctypes.CDLL(path)
        self._fns: dict[str, Any] = {}  # ctypes function pointers
        self.missing: list[str] = []
        for f in FUNCTIONS:
            try:
                fn = getattr(self._cdll, f.name)
            except AttributeError:
                self.missing.append(f.name)
                continue
            fn.restype = f.ctypes_restype
            fn.argtypes = f.ctypes_argtypes
            self._fns[f.name] = fn
        if "ncclGetVersion" in self.missing:
            raise NcclLibraryError(f"{path} has no ncclGetVersion: not a NCCL library")
        v = ctypes.c_int()
        rc = self._fns["ncclGetVersion"](ctypes.byref(v))
        if rc != NCCL_SUCCESS:
            raise NcclLibraryError(f"ncclGetVersion failed with {rc} in {path}")
        self.version_code = v.value
        self.version = decode_version(v.value)
        # The hot path: function pointers without argtypes, fed prebuilt ctypes objects, and
        # loaded through PyDLL so the GIL is kept: inside a group ncclSend/ncclRecv only
        # enqueue (they never block), and releasing and re-taking the GIL per call costs more
        # than the call. ncclGroupEnd, which may block, still releases it.
        hot = ctypes.PyDLL(path)
        self._raw_send: Any = hot["ncclSend"] if "ncclSend" not in self.missing else None
        self._raw_recv: Any = hot["ncclRecv"] if "ncclRecv" not in self.missing else None
        # ncclGroupStart only opens a group (keeps the GIL); ncclGroupEnd may block (it
        # releases it). Both without argtypes: no conversion work per call.
        self._gstart = hot["ncclGroupStart"]
        self._gend = self._cdll["ncclGroupEnd"]
        self._stream_objs: dict[int, Any] = {}  # word(handle): a C-made c_void_p or a byref

    # -- basics -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether the loaded library exports ``name`` (features are found by symbol)."""
        if name in self._fns:
            return True
        try:
            getattr(self._cdll, name)
            return True
        except AttributeError:
            return False

    def fn(self, name: str) -> Any:
        try:
            return self._fns[name]
        except KeyError:
            raise NcclLibraryError(
                f"{name} is not exported by {self.path} (NCCL {'.'.join(map(str, self.version))})"
            ) from None

    def error_string(self, code: int) -> str:
        s = self.fn("ncclGetErrorString")(code)
        return s.decode(errors="replace") if s else ""

    def last_error(self, comm: int | None = None) -> str:
        if "ncclGetLastError" in self.missing:
            return ""
        s = self._fns["ncclGetLastError"](comm)
        return s.decode(errors="replace") if s else ""

    def error(
        self, code: int, function: str, comm: int | None = None, detail: str = ""
    ) -> NcclError:
        """The NcclError (subclass) for a return code; does not raise."""
        return error_class(code)(
            code, self.error_string(code), self.last_error(comm), function, detail
        )

    def check(self, code: int, function: str, comm: int | None = None) -> int:
        """Raise for any code but success and in-progress; return the code."""
        if code != NCCL_SUCCESS and code != NCCL_IN_PROGRESS:
            raise self.error(code, function, comm)
        return code

    # -- unique id ----------------------------------------------------------------------
    def get_unique_id(self) -> bytes:
        uid = NcclUniqueIdStruct()
        self.check(self.fn("ncclGetUniqueId")(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), UNIQUE_ID_BYTES)

    # -- communicators ------------------------------------------------------------------
    def comm_init_rank(
        self, nranks: int, uid: bytes, rank: int, options: dict | None
    ) -> tuple[int, int]:
        """ncclCommInitRank(Config). Returns (comm handle, return code: success or in-progress)."""
        u = NcclUniqueIdStruct()
        ctypes.memmove(ctypes.addressof(u), uid, UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        if options:
            cfg = _config.build_config(self.version, **options)
            rc = self.fn("ncclCommInitRankConfig")(
                ctypes.byref(comm), nranks, u, rank, ctypes.addressof(cfg)
            )
            name = "ncclCommInitRankConfig"
        else:
            rc = self.fn("ncclCommInitRank")(ctypes.byref(comm), nranks, u, rank)
            name = "ncclCommInitRank"
        if rc != NCCL_SUCCESS and rc != NCCL_IN_PROGRESS:
            err = self.error(rc, name, comm.value)
            if comm.value:
                self.fn("ncclCommAbort")(comm.value)
            # A failed ncclCommInitRankConfig can leave this thread inside an NCCL group (seen
            # with NCCL 2.32.3), which would hold back every later launch on the thread. This
            # package never keeps an NCCL group open outside _issue, so end any such level.
            end = self.fn("ncclGroupEnd")
            for _ in range(16):
                if end() != NCCL_SUCCESS:
                    break
            raise err
        return comm.value or 0, rc

    def async_error(self, comm: int) -> int:
        r = ctypes.c_int()
        self.check(
            self.fn("ncclCommGetAsyncError")(comm, ctypes.byref(r)), "ncclCommGetAsyncError", comm
        )
        return r.value

    def wait_ready(self, comm: int, deadline: float | None, what: str) -> None:
        """Poll ncclCommGetAsyncError until not in progress; on an error raise it, past
        ``deadline`` (time.monotonic) abort the communicator and raise NcclTimeoutError."""
        # A non-blocking group usually completes within tens of microseconds (its launch runs
        # on an NCCL thread), far below the ~60 us a sleep lasts: yield the CPU for the first
        # ~200 us, then back off.

        def ready() -> bool:
            r = self.async_error(comm)
            if r != NCCL_SUCCESS and r != NCCL_IN_PROGRESS:
                raise self.error(r, what, comm)
            return r == NCCL_SUCCESS

        def timed_out() -> NoReturn:
            self.comm_abort(comm)
            raise NcclTimeoutError(
                Result.ncclTimeout, "operation timed out", "", what, "the communicator was aborted"
            )

        at = math.inf if deadline is None else deadline
        poll_until(ready, at, timed_out, cap=2e-3, spin=2e-4)

    def comm_int(self, name: str, comm: int) -> int:
        r = ctypes.c_int()
        self.check(self.fn(name)(comm, ctypes.byref(r)), name, comm)
        return r.value

    def comm_finalize(self, comm: int) -> int:
        return self.check(self.fn("ncclCommFinalize")(comm), "ncclCommFinalize", comm)

    def comm_destroy(self, comm: int) -> None:
        self.check(self.fn("ncclCommDestroy")(comm), "ncclCommDestroy")

    def comm_abort(self, comm: int) -> None:
        self.check(self.fn("ncclCommAbort")(comm), "ncclCommAbort")

    # -- groups and p2p -----------------------------------------------------------------
    def group_start(self) -> None:
        rc = self._gstart()
        if rc:
            self.check(rc, "ncclGroupStart")

    def group_end(self) -> int:
        rc = self._gend()
        if rc and rc != NCCL_IN_PROGRESS:
            raise self.error(rc, "ncclGroupEnd")
        return rc

    def stream_obj(self, stream: int) -> Any:
        """The prebuilt call argument for a cudaStream_t handle (cached per handle)."""
        s = self._stream_objs.get(stream)
        if s is None:
            if len(self._stream_objs) > 4096:
                self._stream_objs.clear()
            s = self._stream_objs[stream] = word(stream)
        return s

    def comm_obj(self, comm: int) -> Any:
        """The prebuilt call argument for an ncclComm_t handle."""
        return word(comm)

    def p2p_fn(self, is_send: bool) -> Any:
        """The raw ncclSend or ncclRecv (no argtypes: fed prebuilt arguments)."""
        return self._raw_send if is_send else self._raw_recv

    def p2p_error(self, rc: int, fn: Any, comm: int | None) -> NcclError:
        return self.error(rc, "ncclSend" if fn is self._raw_send else "ncclRecv", comm)

    def issue_calls(self, calls: Iterable[tuple[Any, Any, int | None]]) -> None:
        """Issue queued calls ``(fn, args, comm)``: a p2p function with its prebuilt arguments
        (see :meth:`p2p_fn`), or ``(None, callable, None)`` for deferred work (a collective, a
        prepared batch). The caller brackets them with group_start/group_end. The hot path:
        one ctypes call per op, nothing else unless one fails."""
        for fn, args, comm in calls:
            if fn is None:
                args()
                continue
            rc = fn(*args)
            if rc and rc != NCCL_IN_PROGRESS:
                raise self.p2p_error(rc, fn, comm)

    def prepare_p2p(self, ops: Iterable[P2POp], comm: int) -> PreparedCalls:
        """Prebuilt calls for ops ``(is_send, ptr, nbytes, peer)`` of communicator ``comm``
        (the stream is given per issue)."""
        return PreparedCalls(self, ops, comm)

    def all_reduce(
        self, sptr: int, rptr: int, count: int, dtype: int, op: int, comm: int, stream: int
    ) -> int:
        return self.check(
            self.fn("ncclAllReduce")(sptr, rptr, count, dtype, op, comm, stream),
            "ncclAllReduce",
            comm,
        )

    def all_gather(
        self, sptr: int, rptr: int, count: int, dtype: int, comm: int, stream: int
    ) -> int:
        return self.check(
            self.fn("ncclAllGather")(sptr, rptr, count, dtype, comm, stream), "ncclAllGather", comm
        )

    def broadcast(
        self, sptr: int, rptr: int, count: int, dtype: int, root: int, comm: int, stream: int
    ) -> int:
        return self.check(
            self.fn("ncclBroadcast")(sptr, rptr, count, dtype, root, comm, stream),
            "ncclBroadcast",
            comm,
        )

    # -- memory -------------------------------------------------------------------------
    def comm_register(self, comm: int, ptr: int, size: int) -> int:
        h = ctypes.c_void_p()
        self.check(
            self.fn("ncclCommRegister")(comm, ptr, size, ctypes.byref(h)), "ncclCommRegister", comm
        )
        return h.value or 0

    def comm_deregister(self, comm: int, handle: int) -> None:
        self.check(self.fn("ncclCommDeregister")(comm, handle), "ncclCommDeregister", comm)

    def mem_alloc(self, size: int) -> int:
        p = ctypes.c_void_p()
        self.check(self.fn("ncclMemAlloc")(ctypes.byref(p), size), "ncclMemAlloc")
        return p.value or 0

    def mem_free(self, ptr: int) -> None:
        self.check(self.fn("ncclMemFree")(ptr), "ncclMemFree")


class PreparedCalls:
    """ncclSend/ncclRecv calls with every argument prebuilt. The stream is the only argument
    that changes between issues: the argument tuples are built once per stream handle used
    (a batch is typically launched on one or two streams; more are rebuilt as needed)."""

    __slots__ = ("_lib", "_comm", "_sends", "_recvs", "_by_stream")

    def __init__(self, lib: NcclLibrary, ops: Iterable[P2POp], comm: int) -> None:
        self._lib = lib
        self._comm = comm
        cw = lib.comm_obj(comm)
        self._sends = [(word(p), size_arg(n), 0, peer, cw) for s, p, n, peer in ops if s]
        self._recvs = [(word(p), size_arg(n), 0, peer, cw) for s, p, n, peer in ops if not s]
        self._by_stream: dict[int, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {}

    def __len__(self) -> int:
        return len(self._sends) + len(self._recvs)

    def _args(self, stream: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        a = self._by_stream.get(stream)
        if a is None:
            s = self._lib.stream_obj(stream)
            a = ([x + (s,) for x in self._sends], [x + (s,) for x in self._recvs])
            if len(self._by_stream) >= 4:
                self._by_stream.clear()
            self._by_stream[stream] = a
        return a

    def issue(self, stream: int) -> None:
        """The prepared hot loop on ``stream``: the sends, then the receives (one NCCL group:
        their order across peers does not matter, and each kind keeps its own order, which
        is what pairs a rank's i-th send to a peer with the peer's i-th receive)."""
        sends, recvs = self._args(stream)
        lib = self._lib
        for fn, args in ((lib._raw_send, sends), (lib._raw_recv, recvs)):
            rcs = list(_starmap(fn, args))
            if any(rcs):
                for rc in rcs:
                    if rc and rc != NCCL_IN_PROGRESS:
                        raise lib.p2p_error(rc, fn, self._comm)


_lock = threading.Lock()
_loaded: NcclLibrary | None = None


def _try_load(path: str, source: str) -> NcclLibrary:
    lib = NcclLibrary(path, source)
    if lib.version < MIN_VERSION:
        raise NcclLibraryError(
            f"NCCL {'.'.join(map(str, lib.version))} at {path} is too old: eplb_pynccl needs "
            f"NCCL >= {'.'.join(map(str, MIN_VERSION))} (install nvidia-nccl-cu12 or -cu13)"
        )
    return lib


def load(path: str | os.PathLike | None = None) -> NcclLibrary:
    """Load libnccl (once per process) by the discovery order; return the library.

    An explicit ``path`` (or ``EPLB_PYNCCL_NCCL_SO``) must load: failing that is an error
    naming it. Otherwise every candidate is tried and, if none loads, the error lists each
    tried path with the reason it failed.
    """
    global _loaded
    with _lock:
        explicit = os.fspath(path) if path is not None else os.environ.get(ENV_VAR) or None
        source = "explicit path" if path is not None else f"${ENV_VAR}"
        if _loaded is not None:
            if explicit is None or os.path.realpath(explicit) == os.path.realpath(_loaded.path):
                return _loaded
            raise NcclLibraryError(
                f"libnccl is already loaded from {_loaded.path} ({_loaded.source}); cannot "
                f"switch to {explicit} ({source}) in the same process"
            )
        if explicit is not None:
            try:
                _loaded = _try_load(explicit, source)
            except NcclLibraryError:
                raise
            except OSError as e:
                raise NcclLibraryError(
                    f"cannot load libnccl from {explicit} ({source}): {e}"
                ) from e
            return _loaded
        tried: list[str] = []
        for src, p in candidate_paths():
            if src != "system loader" and not os.path.exists(p):
                tried.append(f"  {p} ({src}): no such file")
                continue
            try:
                _loaded = _try_load(p, src)
                return _loaded
            except NcclLibraryError as e:
                tried.append(f"  {p} ({src}): {e}")
            except OSError as e:
                tried.append(f"  {p} ({src}): {e}")
        raise NcclLibraryError(
            "libnccl not found. Tried, in order:\n"
            + "\n".join(tried)
            + f"\nInstall nvidia-nccl-cu12 (or -cu13), or set {ENV_VAR} to the library's path."
        )


def loaded() -> NcclLibrary | None:
    """The library if already loaded, without loading it."""
    return _loaded
