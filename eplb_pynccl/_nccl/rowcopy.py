"""The row-copy kernel: one launch copies a whole device table of ``(src, dst, nbytes)``,
independent entries or waves of them run one after the other (a whole phase of a round).

The kernel's source is ``rowcopy.cu`` beside this file; what ships is its PTX
(``rowcopy.ptx``, made by ``tools/build_rowcopy.py``), which the driver compiles for the GPU
when the module loads (``cuModuleLoadData``): no compiler at run time, no compiled code in the
package, nothing beyond libcuda. A launch is one ``cuLaunchKernel`` with arguments built once
(:class:`Launch`), whatever the number of rows, tensors and layers in the table.

The grid is bounded by ``ctas`` thread blocks (each block walks the entries ``b, b + grid,
...``), so a copy phase leaves the rest of the GPU's multiprocessors to the forward pass.
Between waves every block waits for the others at a grid-wide barrier (two u64 counters in
device memory, zero before and after a launch); that needs every block resident at once, so
a launch of several waves has at most one block per multiprocessor. A block spinning there
holds its multiprocessor only until the last block of its grid arrives; nothing the blocks
wait for depends on other work of the GPU.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import threading

from . import cuda as _cuda

__all__ = [
    "DEFAULT_CTAS",
    "ENTRY_WORDS",
    "SYNC_WORDS",
    "Kernel",
    "Launch",
    "kernel",
    "kernel_error",
]

DEFAULT_CTAS = 16  # thread blocks per launch (of 132 multiprocessors on an H100/H200)
ENTRY_WORDS = 3  # u64 words per table entry: src, dst, nbytes
SYNC_WORDS = 2  # u64 words of barrier counters per launch of several waves
_NAME = "eplb_rowcopy"
_SMALL = 16 << 10  # tables whose largest entry is at most this use 256 threads per block


class Kernel:
    """The module loaded in one device's primary context."""

    def __init__(self, drv: _cuda.Driver, device: int) -> None:
        ptx = importlib.resources.files(__package__).joinpath("rowcopy.ptx").read_bytes()
        prev = drv.current_device()
        drv.set_device(device)
        try:
            self.module = drv.module_load(ptx + b"\0")
            self.function = drv.module_function(self.module, _NAME)
        finally:
            if prev is not None and prev != device:
                drv.set_device(prev)
        self.device = device
        self.drv = drv
        self.multiprocessors = drv.multiprocessors(device)
        self._f = ctypes.c_void_p(self.function)

    def prepare(
        self,
        table_ptr: int,
        count: int,
        ctas: int,
        max_entry: int,
        *,
        starts_ptr: int = 0,
        waves: int = 1,
        sync_ptr: int = 0,
        max_wave: int | None = None,
    ) -> Launch:
        """A launch over ``count`` independent entries at device address ``table_ptr``, or,
        with ``starts_ptr``, over ``waves`` waves: wave ``w`` is entries ``[starts[w],
        starts[w + 1])`` (``waves + 1`` u64 words at ``starts_ptr``), with the barrier's
        :data:`SYNC_WORDS` zeroed words at ``sync_ptr``. ``max_wave``: the most entries of a
        wave (the grid needs no more blocks)."""
        threads = 256 if max_entry <= _SMALL else 1024
        grid = max(1, min(ctas, count if max_wave is None else max_wave))
        if starts_ptr and waves > 1:
            if not sync_ptr:
                raise ValueError("a launch of several waves needs its sync words")
            grid = min(grid, self.multiprocessors)  # every block resident: see the docstring
        return Launch(self, table_ptr, count, starts_ptr, waves, sync_ptr, grid, threads)


class Launch:
    """One prepared kernel launch; ``launch(stream)`` is a single driver call."""

    __slots__ = ("_drv", "_args", "_params", "_head", "_by_stream", "count", "grid", "waves")

    def __init__(
        self,
        k: Kernel,
        table_ptr: int,
        count: int,
        starts_ptr: int,
        waves: int,
        sync_ptr: int,
        grid: int,
        threads: int,
    ) -> None:
        self._drv = k.drv
        self._args = (
            ctypes.c_uint64(table_ptr),
            ctypes.c_uint32(count),
            ctypes.c_uint64(starts_ptr),
            ctypes.c_uint32(waves if starts_ptr else 1),
            ctypes.c_uint64(sync_ptr),
        )
        self._params = (ctypes.c_void_p * len(self._args))(
            *(ctypes.addressof(a) for a in self._args)
        )
        self.count = count
        self.waves = waves if starts_ptr else 1
        self.grid = grid
        self._head = (k._f, grid, 1, 1, threads, 1, 1, 0)
        self._by_stream: dict = {}

    def launch(self, stream: int) -> None:
        args = self._by_stream.get(stream)
        if args is None:
            args = self._by_stream[stream] = (
                *self._head,
                ctypes.c_void_p(stream),
                self._params,
                None,
            )
        self._drv.launch_raw(args)


_lock = threading.Lock()
_kernels: dict = {}
_errors: dict = {}


def kernel(device: int) -> Kernel:
    """The kernel on ``device`` (loaded once per process and device). Raises
    :class:`~eplb_pynccl._nccl.cuda.CudaError` when the driver cannot load it."""
    k = _kernels.get(device)
    if k is not None:
        return k
    with _lock:
        k = _kernels.get(device)
        if k is None:
            drv = _cuda.driver()
            if drv is None:
                raise _cuda.CudaError(f"no CUDA driver: {_cuda.unavailable_reason()}")
            try:
                k = _kernels[device] = Kernel(drv, device)
            except _cuda.CudaError as e:
                _errors[device] = str(e)
                raise
    return k


def kernel_error(device: int) -> str | None:
    """Why the kernel could not load on ``device`` (None if it did or was not tried)."""
    try:
        kernel(device)
    except _cuda.CudaError as e:
        return str(e)
    return None
