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
import importlib.util
import os
import threading
import time
from pathlib import Path

from ..errors import NcclLibraryError, NcclTimeoutError, error_class
from . import config as _config
from .table import (
    FUNCTIONS,
    NCCL_IN_PROGRESS,
    NCCL_SUCCESS,
    UNIQUE_ID_BYTES,
    NcclUniqueIdStruct,
)

ENV_VAR = "EPLB_PYNCCL_NCCL_SO"
MIN_VERSION = (2, 19, 0)
SONAME = "libnccl.so.2"


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
        p = d / "nccl" / "lib" / SONAME
        out.append(("nvidia.nccl wheel", str(p)))
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
        self._fns: dict[str, object] = {}
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
        self._raw_send = hot["ncclSend"] if "ncclSend" not in self.missing else None
        self._raw_recv = hot["ncclRecv"] if "ncclRecv" not in self.missing else None
        # ncclGroupStart only opens a group (keeps the GIL); ncclGroupEnd may block (it
        # releases it). Both without argtypes: no conversion work per call.
        self._gstart = hot["ncclGroupStart"]
        self._gend = self._cdll["ncclGroupEnd"]
        self._stream_objs: dict[int, ctypes.c_void_p] = {}

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

    def fn(self, name: str):
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

    def error(self, code: int, function: str, comm: int | None = None, detail: str = ""):
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
        spin_until = time.perf_counter() + 2e-4
        delay = 2e-5
        while True:
            r = self.async_error(comm)
            if r == NCCL_SUCCESS:
                return
            if r != NCCL_IN_PROGRESS:
                raise self.error(r, what, comm)
            if deadline is not None and time.monotonic() > deadline:
                self.comm_abort(comm)
                raise NcclTimeoutError(
                    8,
                    "operation timed out",
                    "",
                    what,
                    "the communicator was aborted",
                )
            if time.perf_counter() < spin_until:
                time.sleep(0)
                continue
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)

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

    def stream_obj(self, stream: int) -> ctypes.c_void_p:
        s = self._stream_objs.get(stream)
        if s is None:
            if len(self._stream_objs) > 4096:
                self._stream_objs.clear()
            s = self._stream_objs[stream] = ctypes.c_void_p(stream)
        return s

    def comm_obj(self, comm: int) -> ctypes.c_void_p:
        return ctypes.c_void_p(comm)

    def issue_p2p(self, ops) -> None:
        """Issue a list of p2p ops as bytes: ``(is_send, ptr, nbytes, peer, comm_obj, stream_obj)``.

        ``comm_obj``/``stream_obj`` come from :meth:`comm_obj`/:meth:`stream_obj`. The caller
        brackets the list with group_start/group_end. This is the hot path: no argtypes, one
        reused pointer and one reused size object, everything else prebuilt.
        """
        send, recv = self._raw_send, self._raw_recv
        p = ctypes.c_void_p()
        n = ctypes.c_size_t()
        for is_send, ptr, nbytes, peer, comm, stream in ops:
            p.value = ptr
            n.value = nbytes
            rc = (send if is_send else recv)(p, n, 0, peer, comm, stream)
            if rc != NCCL_SUCCESS and rc != NCCL_IN_PROGRESS:
                raise self.error(rc, "ncclSend" if is_send else "ncclRecv", comm.value)

    def prepare_p2p(self, ops) -> PreparedCalls:
        """Prebuilt calls for ops as for :meth:`issue_p2p`, without the stream (set per issue)."""
        return PreparedCalls(self, ops)

    def all_reduce(self, sptr, rptr, count, dtype, op, comm, stream) -> int:
        return self.check(
            self.fn("ncclAllReduce")(sptr, rptr, count, dtype, op, comm, stream),
            "ncclAllReduce",
            comm,
        )

    def all_gather(self, sptr, rptr, count, dtype, comm, stream) -> int:
        return self.check(
            self.fn("ncclAllGather")(sptr, rptr, count, dtype, comm, stream), "ncclAllGather", comm
        )

    def broadcast(self, sptr, rptr, count, dtype, root, comm, stream) -> int:
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
    """ncclSend/ncclRecv calls with every argument prebuilt; the stream is one shared object
    set by :meth:`set_stream` before :meth:`issue` (which the caller brackets with a group)."""

    __slots__ = ("_lib", "_calls", "_stream")

    def __init__(self, lib: NcclLibrary, ops) -> None:
        self._lib = lib
        self._stream = ctypes.c_void_p(0)
        self._calls = [
            (
                lib._raw_send if is_send else lib._raw_recv,
                (ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), 0, peer, comm, self._stream),
            )
            for is_send, ptr, nbytes, peer, comm in ops
        ]

    def __len__(self) -> int:
        return len(self._calls)

    def set_stream(self, stream: int) -> None:
        self._stream.value = stream

    def issue(self) -> None:
        """The prepared hot loop: one ctypes call per op, nothing else unless one fails."""
        for fn, args in self._calls:
            rc = fn(*args)
            if rc and rc != NCCL_IN_PROGRESS:
                lib = self._lib
                raise lib.error(
                    rc, "ncclSend" if fn is lib._raw_send else "ncclRecv", args[4].value
                )


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
