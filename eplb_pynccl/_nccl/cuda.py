"""The CUDA driver calls the package makes, through libcuda.so.1.

Used to make a device current (the primary context, as the CUDA runtime and torch use), to
find the device of a raw pointer and its allocation, to copy device memory on a stream (the
shuffler's row copies, batched where the driver can), to share memory and events with peer
processes (CUDA IPC, for the copy-engine transport), and to wait on a stream with a timeout
(an event polled beside ncclCommGetAsyncError). Absent on machines without a GPU driver: :func:`driver`
returns None there and callers skip what needs it.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import CudaError
from .table import CUDA_FUNCTIONS, CUDA_OPTIONAL, CUDA_RAW, CudaIpcHandle

_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_READY = 600
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11
_CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12
_CU_EVENT_DISABLE_TIMING = 2


def _handle(out: ctypes.c_void_p) -> int:
    """The handle a successful create wrote into ``out`` (NULL reads as 0)."""
    return out.value or 0


IpcHandle = CudaIpcHandle  # CUipcMemHandle / CUipcEventHandle: 64 bytes by value


_CU_EVENT_INTERPROCESS = 4
_CU_STREAM_NON_BLOCKING = 1
_CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
_CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33
_CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34
_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
_CU_DEVICE_ATTRIBUTE_CC_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_CC_MINOR = 76
_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
_CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP = 0x01 | 0x02
_CU_STREAM_WAIT_VALUE_GEQ = 0
_CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes (CUDA 12.8+)."""

    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


class Driver:
    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        L = self._lib
        self._fn = {}
        # one declarative table (table.CUDA_FUNCTIONS, checked against csrc_headers/eplb_cuda.h)
        for f in CUDA_FUNCTIONS:
            fn = getattr(L, f.name, None)
            if fn is None:
                if f.name in CUDA_OPTIONAL:
                    continue
                raise AttributeError(f"libcuda.so.1 has no {f.name}")
            fn.restype = f.ctypes_restype
            if f.name not in CUDA_RAW:
                fn.argtypes = f.ctypes_argtypes
            self._fn[f.name] = fn
        for name in ("cuStreamWaitValue32", "cuStreamWriteValue32", "cuStreamBatchMemOp"):
            chosen = self._fn.get(name + "_v2") or self._fn.get(name)
            if chosen is not None:
                self._fn[name] = chosen
        # hot path: the kernel launch without argtypes (prebuilt ctypes values, no conversion
        # checks)
        self._launch = self._fn["cuLaunchKernel"]
        self._check(self._fn["cuInit"](0), "cuInit")
        self._ctx: dict[int, int] = {}
        # set once a capture of cuMemcpyBatchAsync was refused (CUDA 13.0: error 900), so
        # later CopyGraphs capture per-copy copies at once instead of failing first
        self.batch_capture_refused = False

    def _check(self, rc: int, what: str) -> None:
        if rc != _CUDA_SUCCESS:
            s = ctypes.c_char_p()
            self._fn["cuGetErrorString"](rc, ctypes.byref(s))
            msg = s.value.decode() if s.value else "unknown"
            raise CudaError(f"{what} failed: CUDA error {rc} ({msg})", rc)

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._check(self._fn["cuDeviceGetCount"](ctypes.byref(n)), "cuDeviceGetCount")
        return n.value

    def current_device(self) -> int | None:
        ctx = ctypes.c_void_p()
        self._check(self._fn["cuCtxGetCurrent"](ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            return None
        d = ctypes.c_int()
        self._check(self._fn["cuCtxGetDevice"](ctypes.byref(d)), "cuCtxGetDevice")
        return d.value

    def set_device(self, device: int) -> None:
        """Make the device's primary context current on this thread (like cudaSetDevice)."""
        ctx = self._ctx.get(device)
        if ctx is None:
            dev = ctypes.c_int()
            self._check(self._fn["cuDeviceGet"](ctypes.byref(dev), device), "cuDeviceGet")
            c = ctypes.c_void_p()
            self._check(
                self._fn["cuDevicePrimaryCtxRetain"](ctypes.byref(c), dev.value),
                "cuDevicePrimaryCtxRetain",
            )
            ctx = self._ctx[device] = _handle(c)
        self._check(self._fn["cuCtxSetCurrent"](ctx), "cuCtxSetCurrent")

    def pointer_device(self, ptr: int) -> int | None:
        """The device ordinal of a device pointer, or None if CUDA does not know it."""
        d = ctypes.c_int()
        rc = self._fn["cuPointerGetAttribute"](
            ctypes.byref(d), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr
        )
        return d.value if rc == _CUDA_SUCCESS else None

    def pointer_range(self, ptr: int) -> tuple[int, int, int] | None:
        """(start, size, device) of the allocation holding ``ptr``, or None if CUDA does not
        know the pointer."""
        d = ctypes.c_int()
        fn = self._fn["cuPointerGetAttribute"]
        if fn(ctypes.byref(d), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr) != _CUDA_SUCCESS:
            return None
        start = ctypes.c_void_p()
        size = ctypes.c_size_t()
        if fn(ctypes.byref(start), _CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptr) != _CUDA_SUCCESS:
            return ptr, 1, d.value
        if fn(ctypes.byref(size), _CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptr) != _CUDA_SUCCESS:
            return ptr, 1, d.value
        return start.value or 0, size.value, d.value

    def event_create(self) -> int:
        e = ctypes.c_void_p()
        self._check(
            self._fn["cuEventCreate"](ctypes.byref(e), _CU_EVENT_DISABLE_TIMING), "cuEventCreate"
        )
        return _handle(e)

    def event_record(self, event: int, stream: int) -> None:
        self._check(self._fn["cuEventRecord"](event, stream), "cuEventRecord")

    def event_done(self, event: int) -> bool:
        rc = self._fn["cuEventQuery"](event)
        if rc == _CUDA_SUCCESS:
            return True
        if rc == _CUDA_ERROR_NOT_READY:
            return False
        self._check(rc, "cuEventQuery")
        return False

    def memcpy_dtod_async(self, copies: Sequence[tuple[int, int, int]], stream: int) -> None:
        """Enqueue device-to-device copies ``[(dst, src, nbytes)]`` on ``stream``, in order
        (one driver call each: no tensor views, no dispatcher)."""
        fn = self._fn["cuMemcpyDtoDAsync_v2"]
        for dst, src, n in copies:
            rc = fn(dst, src, n, stream)
            if rc != _CUDA_SUCCESS:
                self._check(rc, "cuMemcpyDtoDAsync")

    def event_destroy(self, event: int) -> None:
        self._fn["cuEventDestroy_v2"](event)

    # ---- devices ---------------------------------------------------------------------
    def _device(self, device: int) -> int:
        d = ctypes.c_int()
        self._check(self._fn["cuDeviceGet"](ctypes.byref(d), device), "cuDeviceGet")
        return d.value

    def device_info(self, device: int) -> dict:
        """Name, UUID (hex), compute capability and PCI bus id of a device."""
        d = self._device(device)
        name = ctypes.create_string_buffer(256)
        self._check(self._fn["cuDeviceGetName"](name, 256, d), "cuDeviceGetName")
        uuid = ctypes.create_string_buffer(16)
        self._check(self._fn["cuDeviceGetUuid_v2"](uuid, d), "cuDeviceGetUuid")
        out: dict[str, Any] = {"name": name.value.decode(errors="replace"), "uuid": uuid.raw.hex()}
        for key, attr in (
            ("cc_major", _CU_DEVICE_ATTRIBUTE_CC_MAJOR),
            ("cc_minor", _CU_DEVICE_ATTRIBUTE_CC_MINOR),
            ("pci_bus", _CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
        ):
            v = ctypes.c_int()
            self._check(
                self._fn["cuDeviceGetAttribute"](ctypes.byref(v), attr, d), "cuDeviceGetAttribute"
            )
            out[key] = v.value
        return out

    def device_by_uuid(self, uuid_hex: str) -> int | None:
        """The ordinal of the visible device with this UUID, or None."""
        for i in range(self.device_count()):
            if self.device_info(i)["uuid"] == uuid_hex:
                return i
        return None

    def can_access_peer(self, device: int, peer: int) -> bool:
        if device == peer:
            return True
        v = ctypes.c_int()
        self._check(
            self._fn["cuDeviceCanAccessPeer"](
                ctypes.byref(v), self._device(device), self._device(peer)
            ),
            "cuDeviceCanAccessPeer",
        )
        return bool(v.value)

    # ---- streams and events ------------------------------------------------------------
    def stream_create(self) -> int:
        """A non-blocking stream on the current context."""
        s = ctypes.c_void_p()
        self._check(
            self._fn["cuStreamCreate"](ctypes.byref(s), _CU_STREAM_NON_BLOCKING), "cuStreamCreate"
        )
        return _handle(s)

    def stream_destroy(self, stream: int) -> None:
        self._fn["cuStreamDestroy_v2"](stream)

    def stream_wait_event(self, stream: int, event: int) -> None:
        self._check(self._fn["cuStreamWaitEvent"](stream, event, 0), "cuStreamWaitEvent")

    # ---- stream memory operations on registered host memory ----------------------------
    def has_stream_memops(self) -> bool:
        """Whether this driver exports 32-bit stream waits/writes and host registration."""
        need = ("cuStreamWaitValue32", "cuStreamWriteValue32", "cuMemHostRegister_v2")
        return all(n in self._fn for n in (*need, "cuMemHostUnregister"))

    def host_register(self, ptr: int, nbytes: int) -> int:
        """Page-lock ``nbytes`` of host memory at ``ptr`` for every context and map it for
        the device; returns its device address."""
        self._check(
            self._fn["cuMemHostRegister_v2"](ptr, nbytes, _CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP),
            "cuMemHostRegister",
        )
        d = ctypes.c_uint64()
        rc = self._fn["cuMemHostGetDevicePointer_v2"](ctypes.byref(d), ptr, 0)
        if rc != _CUDA_SUCCESS:
            self._fn["cuMemHostUnregister"](ptr)
            self._check(rc, "cuMemHostGetDevicePointer")
        return d.value

    def host_unregister(self, ptr: int) -> None:
        self._fn["cuMemHostUnregister"](ptr)

    def write_value(self, stream: int, addr: int, value: int) -> None:
        """Enqueue a 32-bit write of ``value`` at device address ``addr`` on ``stream``
        (after the stream's earlier work, with a memory barrier)."""
        rc = self._fn["cuStreamWriteValue32"](stream, addr, value, 0)
        if rc != _CUDA_SUCCESS:
            self._check(rc, "cuStreamWriteValue32")

    def wait_value(self, stream: int, addr: int, value: int) -> None:
        """Enqueue a wait on ``stream`` until the 32-bit word at ``addr`` reaches ``value``
        (``(int32)(*addr - value) >= 0``, so sequence numbers may wrap)."""
        rc = self._fn["cuStreamWaitValue32"](stream, addr, value, _CU_STREAM_WAIT_VALUE_GEQ)
        if rc != _CUDA_SUCCESS:
            self._check(rc, "cuStreamWaitValue32")

    def batch_memops(self, stream: int, params: int, count: int) -> None:
        """Enqueue ``count`` stream memory operations (CUstreamBatchMemOpParams at host
        address ``params``, read during the call) on ``stream`` in one driver call."""
        rc = self._fn["cuStreamBatchMemOp"](stream, count, params, 0)
        if rc != _CUDA_SUCCESS:
            self._check(rc, "cuStreamBatchMemOp")

    def event_create_ipc(self) -> int:
        """An event other processes can open (interprocess, no timing)."""
        e = ctypes.c_void_p()
        self._check(
            self._fn["cuEventCreate"](
                ctypes.byref(e), _CU_EVENT_DISABLE_TIMING | _CU_EVENT_INTERPROCESS
            ),
            "cuEventCreate",
        )
        return _handle(e)

    def ipc_event_handle(self, event: int) -> bytes:
        h = IpcHandle()
        self._check(self._fn["cuIpcGetEventHandle"](ctypes.byref(h), event), "cuIpcGetEventHandle")
        return ctypes.string_at(ctypes.addressof(h), 64)

    def ipc_open_event(self, handle: bytes) -> int:
        h = IpcHandle.from_buffer_copy(handle)
        e = ctypes.c_void_p()
        self._check(self._fn["cuIpcOpenEventHandle"](ctypes.byref(e), h), "cuIpcOpenEventHandle")
        return _handle(e)

    # ---- IPC memory ----------------------------------------------------------------------
    def ipc_capable(self, ptr: int) -> bool:
        """Whether ``ptr``'s allocation can be exported with cuIpcGetMemHandle (False for
        cuMem/VMM allocations, e.g. torch's expandable segments)."""
        v = ctypes.c_int()
        rc = self._fn["cuPointerGetAttribute"](
            ctypes.byref(v), _CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr
        )
        return rc == _CUDA_SUCCESS and bool(v.value)

    def ipc_mem_handle(self, base: int) -> bytes:
        """The IPC handle of the allocation starting at ``base``."""
        h = IpcHandle()
        self._check(self._fn["cuIpcGetMemHandle"](ctypes.byref(h), base), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(h), 64)

    def ipc_open_mem(self, handle: bytes) -> int:
        h = IpcHandle.from_buffer_copy(handle)
        p = ctypes.c_uint64()
        self._check(
            self._fn["cuIpcOpenMemHandle_v2"](
                ctypes.byref(p), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
            ),
            "cuIpcOpenMemHandle",
        )
        return p.value

    def ipc_close_mem(self, ptr: int) -> None:
        self._check(self._fn["cuIpcCloseMemHandle"](ptr), "cuIpcCloseMemHandle")

    # ---- batched copies --------------------------------------------------------------------
    @property
    def has_memcpy_batch(self) -> bool:
        return "cuMemcpyBatchAsync_v2" in self._fn or "cuMemcpyBatchAsync" in self._fn

    def memcpy_batch(
        self, dsts: Any, srcs: Any, sizes: Any, stream: int, prefer_ce: bool = True
    ) -> None:
        """Copies ``[(dst, src, nbytes)]`` as one batch (``cuMemcpyBatchAsync``, unordered
        within the batch), with the hint that prefers copy engines (overlap with compute);
        one cuMemcpyDtoDAsync each where the driver lacks it. ``dsts``/``srcs``/``sizes``
        are ctypes arrays (see :func:`copy_arrays`)."""
        n = len(sizes)
        if not n:
            return
        fn = self._fn.get("cuMemcpyBatchAsync_v2")
        attrs = MemcpyAttributes(
            _CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            _MemLocation(0, 0),
            _MemLocation(0, 0),
            _CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE if prefer_ce else 0,
        )
        idx = ctypes.c_size_t(0)
        if fn is not None:
            rc = fn(dsts, srcs, sizes, n, ctypes.byref(attrs), ctypes.byref(idx), 1, stream)
            self._check(rc, "cuMemcpyBatchAsync")
            return
        fn = self._fn.get("cuMemcpyBatchAsync")
        if fn is not None:
            fail = ctypes.c_size_t(0)
            rc = fn(
                dsts,
                srcs,
                sizes,
                n,
                ctypes.byref(attrs),
                ctypes.byref(idx),
                1,
                ctypes.byref(fail),
                stream,
            )
            self._check(rc, "cuMemcpyBatchAsync")
            return
        self.memcpy_dtod_async(list(zip(dsts, srcs, sizes)), stream)

    # ---- modules and kernels ----------------------------------------------------------------
    def module_load(self, image: bytes) -> int:
        """Load a module (PTX text or a cubin, NUL-terminated) into the current context."""
        m = ctypes.c_void_p()
        self._check(self._fn["cuModuleLoadData"](ctypes.byref(m), image), "cuModuleLoadData")
        return _handle(m)

    def module_function(self, module: int, name: str) -> int:
        f = ctypes.c_void_p()
        self._check(
            self._fn["cuModuleGetFunction"](ctypes.byref(f), module, name.encode()),
            "cuModuleGetFunction",
        )
        return _handle(f)

    def module_unload(self, module: int) -> None:
        self._fn["cuModuleUnload"](module)

    def multiprocessors(self, device: int) -> int:
        v = ctypes.c_int()
        self._check(
            self._fn["cuDeviceGetAttribute"](
                ctypes.byref(v), _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self._device(device)
            ),
            "cuDeviceGetAttribute",
        )
        return v.value

    def launch_raw(self, args: tuple) -> None:
        """``cuLaunchKernel(*args)`` with prebuilt ctypes arguments (see
        :class:`~eplb_pynccl._nccl.rowcopy.Launch`): one foreign call, no conversion."""
        rc = self._launch(*args)
        if rc != _CUDA_SUCCESS:
            self._check(rc, "cuLaunchKernel")

    # ---- graphs ---------------------------------------------------------------------------
    def begin_capture(self, stream: int) -> None:
        self._check(
            self._fn["cuStreamBeginCapture_v2"](stream, _CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "cuStreamBeginCapture",
        )

    def end_capture(self, stream: int) -> int:
        g = ctypes.c_void_p()
        self._check(self._fn["cuStreamEndCapture"](stream, ctypes.byref(g)), "cuStreamEndCapture")
        return _handle(g)

    def graph_instantiate(self, graph: int) -> int:
        e = ctypes.c_void_p()
        self._check(
            self._fn["cuGraphInstantiateWithFlags"](ctypes.byref(e), graph, 0), "cuGraphInstantiate"
        )
        return _handle(e)

    def graph_upload(self, exec_: int, stream: int) -> None:
        """Upload an instantiated graph's work to the device ahead of its first launch (which
        would otherwise do it, on the launching thread)."""
        self._check(self._fn["cuGraphUpload"](exec_, stream), "cuGraphUpload")

    def graph_launch(self, exec_: int, stream: int) -> None:
        rc = self._fn["cuGraphLaunch"](exec_, stream)
        if rc != _CUDA_SUCCESS:
            self._check(rc, "cuGraphLaunch")

    def graph_destroy(self, exec_: int | None, graph: int | None) -> None:
        if exec_:
            self._fn["cuGraphExecDestroy"](exec_)
        if graph:
            self._fn["cuGraphDestroy"](graph)


class CopyGraph:
    """Copies ``[(dst, src, nbytes)]`` captured once as a CUDA graph of copy-engine copies:
    ``launch(stream)`` is one ``cuGraphLaunch``, whatever their number (the driver's per-copy
    work, ~4.5 us each through ``cuMemcpyBatchAsync``, is done once, at capture).

    Captured from one ``cuMemcpyBatchAsync`` (unordered copies, preferring copy engines), or,
    where the driver refuses that call while capturing (CUDA 13.0 does, error 900), from one
    ``cuMemcpyDtoDAsync`` per copy (copy nodes one after the other). On one H200 (CUDA 13,
    2026-12-02) a launch of 300 captured 4 KiB copies took 2.5 us of host time, against
    1.03 ms for one ``cuMemcpyBatchAsync`` of them.
    The graph is uploaded to the device when it is made, so its first launch costs what any
    launch does. ``close()`` frees it (a launch in flight completes first); until then the
    memory it copies must stay mapped."""

    __slots__ = ("_drv", "_exec", "_graph", "count", "how")

    def __init__(self, drv: Driver, copies: list[tuple[int, int, int]]) -> None:
        self._drv = drv
        self._exec: int | None = None
        self._graph: int | None = None
        self.how = ""
        self.count = len(copies)
        arrays = copy_arrays(copies)
        s = drv.stream_create()
        try:
            for how in ("dtod",) if drv.batch_capture_refused else ("batch", "dtod"):
                drv.begin_capture(s)
                graph, refused = None, False
                try:
                    if how == "batch":
                        drv.memcpy_batch(*arrays, s, prefer_ce=True)
                    else:
                        drv.memcpy_dtod_async(copies, s)
                except CudaError:
                    refused = True  # e.g. CUDA 13: no cuMemcpyBatchAsync while capturing (900)
                    if how == "batch":
                        drv.batch_capture_refused = True
                finally:
                    try:
                        graph = drv.end_capture(s)
                    except CudaError:
                        graph = None  # the capture was invalidated: try the next way
                if graph and refused:  # a graph without the copies: never launch it
                    drv.graph_destroy(None, graph)
                    graph = None
                if graph:
                    try:
                        self._exec = drv.graph_instantiate(graph)
                    except CudaError:
                        drv.graph_destroy(None, graph)
                        continue
                    self._graph, self.how = graph, how
                    drv.graph_upload(self._exec, s)  # at set-up, not at the round's launch
                    return
            raise CudaError("could not capture the copies as a CUDA graph")
        finally:
            drv.stream_destroy(s)

    def launch(self, stream: int) -> None:
        if self._exec is None:
            raise RuntimeError("this CopyGraph was closed")
        self._drv.graph_launch(self._exec, stream)

    def close(self) -> None:
        ex, g = self._exec, self._graph
        self._exec = self._graph = None
        if ex or g:
            self._drv.graph_destroy(ex, g)


# CUstreamBatchMemOpParams (cuda.h): a 48-byte union; the wait/write members are operation
# (u32), address (u64 at 8), value (u32 at 16), flags (u32 at 24), alias (u64 at 32)
_MEMOP_LAYOUT: Any = {
    "names": ["operation", "address", "value", "flags"],
    "formats": ["<u4", "<u8", "<u4", "<u4"],
    "offsets": [0, 8, 16, 24],
    "itemsize": 48,
}
_MEM_OP_WAIT_VALUE_32, _MEM_OP_WRITE_VALUE_32 = 1, 2


class MemOps:
    """32-bit stream waits ("at least value", ``CU_STREAM_WAIT_VALUE_GEQ``) or writes at
    fixed addresses with one value per run: ``run(stream, value)`` is one
    ``cuStreamBatchMemOp`` (one call per address where the driver lacks it)."""

    __slots__ = ("_drv", "_ops", "_ptr", "_single", "addresses")

    def __init__(self, drv: Driver, kind: str, addresses: Sequence[int]) -> None:
        import numpy as np  # here: the binding's discovery must import without numpy

        self._drv = drv
        self.addresses = [int(a) for a in addresses]
        self._ops = np.zeros(len(self.addresses), dtype=np.dtype(_MEMOP_LAYOUT))
        self._ops["operation"] = _MEM_OP_WAIT_VALUE_32 if kind == "wait" else _MEM_OP_WRITE_VALUE_32
        self._ops["address"] = self.addresses
        self._ops["flags"] = _CU_STREAM_WAIT_VALUE_GEQ  # 0: also the writes' default
        self._ptr = self._ops.ctypes.data
        self._single = None
        if "cuStreamBatchMemOp" not in drv._fn:
            self._single = drv.wait_value if kind == "wait" else drv.write_value

    def __len__(self) -> int:
        return len(self.addresses)

    def run(self, stream: int, value: int) -> None:
        if not self.addresses:
            return
        if self._single is not None:
            for a in self.addresses:
                self._single(stream, a, value)
            return
        self._ops["value"] = value
        self._drv.batch_memops(stream, self._ptr, len(self.addresses))


def copy_arrays(copies: Sequence[tuple[int, int, int]]) -> tuple[Any, Any, Any]:
    """ctypes (dsts, srcs, sizes) arrays for :meth:`Driver.memcpy_batch` from
    ``[(dst, src, nbytes)]`` (built once, reused for every launch)."""
    n = len(copies)
    dsts = (ctypes.c_uint64 * n)(*(c[0] for c in copies))
    srcs = (ctypes.c_uint64 * n)(*(c[1] for c in copies))
    sizes = (ctypes.c_size_t * n)(*(c[2] for c in copies))
    return dsts, srcs, sizes


_lock = threading.Lock()
_driver: Driver | None = None
_failed: str | None = None


def driver() -> Driver | None:
    """The CUDA driver, or None when libcuda is missing or cuInit fails (no GPU)."""
    global _driver, _failed
    if _driver is not None or _failed is not None:
        return _driver
    with _lock:
        if _driver is None and _failed is None:
            try:
                _driver = Driver()
            except (OSError, CudaError, AttributeError) as e:
                _failed = str(e)
    return _driver


def unavailable_reason() -> str | None:
    driver()
    return _failed
