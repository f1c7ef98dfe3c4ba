"""The few CUDA driver calls the communicator needs, through libcuda.so.1.

Used to make a device current (the primary context, as the CUDA runtime and torch use), to
find the device of a raw pointer, to copy device memory on a stream (the shuffler's row
copies), and to wait on a stream with a timeout (an event polled beside
ncclCommGetAsyncError). Absent on machines without a GPU driver: :func:`driver`
returns None there and callers skip what needs it.
"""

from __future__ import annotations

import ctypes
import threading

_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_READY = 600
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11
_CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12
_CU_EVENT_DISABLE_TIMING = 2


class CudaError(RuntimeError):
    pass


class Driver:
    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        L = self._lib
        self._fn = {}
        sig = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGetCount": [ctypes.c_void_p],
            "cuDeviceGet": [ctypes.c_void_p, ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.c_void_p, ctypes.c_int],
            "cuCtxSetCurrent": [ctypes.c_void_p],
            "cuCtxGetCurrent": [ctypes.c_void_p],
            "cuCtxGetDevice": [ctypes.c_void_p],
            "cuPointerGetAttribute": [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p],
            "cuEventCreate": [ctypes.c_void_p, ctypes.c_uint],
            "cuEventRecord": [ctypes.c_void_p, ctypes.c_void_p],
            "cuEventQuery": [ctypes.c_void_p],
            "cuEventDestroy_v2": [ctypes.c_void_p],
            "cuStreamQuery": [ctypes.c_void_p],
            "cuMemcpyDtoDAsync_v2": [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p],
            "cuGetErrorString": [ctypes.c_int, ctypes.c_void_p],
        }
        for name, args in sig.items():
            f = getattr(L, name)
            f.restype = ctypes.c_int
            f.argtypes = args
            self._fn[name] = f
        self._check(self._fn["cuInit"](0), "cuInit")
        self._ctx: dict[int, int] = {}

    def _check(self, rc: int, what: str) -> None:
        if rc != _CUDA_SUCCESS:
            s = ctypes.c_char_p()
            self._fn["cuGetErrorString"](rc, ctypes.byref(s))
            msg = s.value.decode() if s.value else "unknown"
            raise CudaError(f"{what} failed: CUDA error {rc} ({msg})")

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
            ctx = self._ctx[device] = c.value
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
        self._check(self._fn["cuEventCreate"](ctypes.byref(e), _CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return e.value

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

    def memcpy_dtod_async(self, copies, stream: int) -> None:
        """Enqueue device-to-device copies ``[(dst, src, nbytes)]`` on ``stream``, in order
        (one driver call each: no tensor views, no dispatcher)."""
        fn = self._fn["cuMemcpyDtoDAsync_v2"]
        for dst, src, n in copies:
            rc = fn(dst, src, n, stream)
            if rc != _CUDA_SUCCESS:
                self._check(rc, "cuMemcpyDtoDAsync")

    def event_destroy(self, event: int) -> None:
        self._fn["cuEventDestroy_v2"](event)


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
