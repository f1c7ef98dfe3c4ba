"""Turning user buffers and streams into (pointer, size, device) and stream handles.

Accepted buffers: torch CUDA tensors, cupy arrays, anything with ``__cuda_array_interface__`` or
``__dlpack__``, and raw ``(pointer, nbytes)`` tuples. Accepted streams: None, an int handle,
torch.cuda.Stream, cupy Stream, anything with ``__cuda_stream__``.

Neither torch nor cupy is imported here: they are looked up in ``sys.modules`` (a tensor of a
library that was never imported cannot exist). The adapter for each buffer type is found once
and cached, so the per-op cost is a dict lookup plus the adapter's few attribute reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._nccl import cuda as _cuda
from ._nccl.dlpack import KDL_CUDA, KDL_CUDA_MANAGED, read_capsule
from ._nccl.table import Dtype

if TYPE_CHECKING:
    from ._types import Buffer, StreamSpec

# Stream hints: what stream=None means for a buffer.
HINT_DEFAULT = 0  # the legacy default stream (raw pointers, CAI, DLPack)
HINT_TORCH = 1  # torch's current stream on the buffer's device
HINT_CUPY = 2  # cupy's current stream

Resolved = tuple[int, int, int, int]
"""A buffer as :func:`resolve` gives it: ``(pointer, nbytes, device, stream hint)``."""


def _torch_buffer(t: Any, name: str) -> Resolved:
    dev = t.get_device()
    if dev < 0:
        raise ValueError(
            f"{name} is a CPU tensor; NCCL needs a CUDA tensor (got device {t.device})"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); pass .contiguous()"
        )
    return t.data_ptr(), t.nbytes, dev, HINT_TORCH


def _cupy_buffer(a: Any, name: str) -> Resolved:
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        raise ValueError(f"{name} is not contiguous (shape {a.shape}, strides {a.strides})")
    return a.data.ptr, a.nbytes, a.device.id, HINT_CUPY


def _pointer_device(ptr: int) -> int:
    drv = _cuda.driver()
    if drv is None or not ptr:
        return -1
    d = drv.pointer_device(ptr)
    return -1 if d is None else d


def _contiguous(shape: Sequence[int], strides_bytes: Sequence[int], itemsize: int) -> bool:
    expected = itemsize
    for dim, st in zip(reversed(shape), reversed(strides_bytes)):
        if dim != 1 and st != expected:
            return False
        expected *= dim
    return True


_TYPESTR_NAMES = {
    "i1": "int8",
    "u1": "uint8",
    "i4": "int32",
    "u4": "uint32",
    "i8": "int64",
    "u8": "uint64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
}


def _cai_buffer(obj: Any, name: str) -> Resolved:
    cai = obj.__cuda_array_interface__
    ptr = cai["data"][0]
    shape = tuple(cai["shape"])
    typestr = cai["typestr"]
    itemsize = int(typestr[2:])
    n = 1
    for d in shape:
        n *= d
    strides = cai.get("strides")
    if strides is not None and not _contiguous(shape, strides, itemsize):
        raise ValueError(f"{name} is not contiguous (__cuda_array_interface__ strides {strides})")
    if ptr is None:
        ptr = 0
    if not ptr and n:
        raise ValueError(f"{name} has a null data pointer")
    return ptr, n * itemsize, _pointer_device(ptr), HINT_DEFAULT


def _dlpack_buffer(obj: Any, name: str) -> Resolved:
    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise ValueError(
            f"{name} is not CUDA memory (DLPack device type {dev_type}); NCCL needs device memory"
        )
    info = read_capsule(obj.__dlpack__())
    n = 1
    for d in info.shape:
        n *= d
    if info.strides is not None:
        if not _contiguous(info.shape, [s * info.itemsize for s in info.strides], info.itemsize):
            raise ValueError(f"{name} is not contiguous (DLPack strides {info.strides})")
    return info.ptr, n * info.itemsize, info.device_id, HINT_DEFAULT


def _raw_buffer(t: tuple[Any, ...], name: str) -> Resolved:
    if len(t) != 2:
        raise TypeError(
            f"{name}: a raw buffer is a (pointer, nbytes) tuple, got a tuple of {len(t)}"
        )
    ptr, nbytes = t
    if not isinstance(ptr, int) or not isinstance(nbytes, int):
        raise TypeError(f"{name}: a raw buffer is a (pointer: int, nbytes: int) tuple")
    if nbytes < 0:
        raise ValueError(f"{name}: nbytes must be >= 0, got {nbytes}")
    if ptr <= 0 and nbytes:
        raise ValueError(f"{name}: pointer must be a positive device address, got {ptr}")
    return ptr, nbytes, -2, HINT_DEFAULT  # -2: device not checked (see Communicator)


_Adapter = Callable[[Any, str], Resolved]
_ADAPTERS: dict[type, _Adapter] = {tuple: _raw_buffer}


def _find_adapter(cls: type) -> _Adapter | None:
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(cls, torch.Tensor):
        return _torch_buffer
    cupy = sys.modules.get("cupy")
    if cupy is not None and issubclass(cls, cupy.ndarray):
        return _cupy_buffer
    if hasattr(cls, "__cuda_array_interface__"):
        return _cai_buffer
    if hasattr(cls, "__dlpack__") and hasattr(cls, "__dlpack_device__"):
        return _dlpack_buffer
    return None


def resolve(buf: Buffer, name: str = "buf") -> Resolved:
    """(ptr, nbytes, device, hint). device -1: unknown; -2: raw pointer (checked lazily)."""
    cls = type(buf)
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _find_adapter(cls)
        if adapter is None:
            if hasattr(buf, "__cuda_array_interface__"):  # set on the instance, not the class
                return _cai_buffer(buf, name)
            raise TypeError(
                f"{name} must be a torch CUDA tensor, a cupy array, an object with "
                f"__cuda_array_interface__ or __dlpack__, or a (pointer, nbytes) tuple; got {cls.__name__}"
            )
        _ADAPTERS[cls] = adapter
    return adapter(buf, name)


def dtype_name(buf: Any) -> str | None:  # a Buffer, or anything (then None)
    """The element type of a buffer by name (torch/numpy spelling), None for raw bytes."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        return str(buf.dtype).replace("torch.", "")
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(buf, cupy.ndarray):
        return buf.dtype.name
    if hasattr(buf, "__cuda_array_interface__"):
        ts = buf.__cuda_array_interface__["typestr"]
        return _TYPESTR_NAMES.get(ts[1:], ts)
    if isinstance(buf, tuple):
        return None
    if hasattr(buf, "__dlpack__"):
        info = read_capsule(buf.__dlpack__())
        key = (info.dtype_code, info.dtype_bits)
        known = Dtype.by_dlpack()
        if info.dtype_lanes == 1 and key in known:
            return known[key].array_name
        return f"DLPack(code={info.dtype_code}, bits={info.dtype_bits}, lanes={info.dtype_lanes})"
    return None


def nccl_dtype(buf: Buffer, name: str) -> tuple[int, int]:
    """(ncclDataType_t, element size) for a typed buffer; raw tuples count as uint8 bytes."""
    dn = dtype_name(buf)
    if dn is None:
        return int(Dtype.ncclUint8), 1
    names = Dtype.by_array_name()
    d = names.get(dn)
    if d is None:
        raise TypeError(
            f"{name} has dtype {dn}, which NCCL collectives do not support "
            f"(supported: {', '.join(names)})"
        )
    return int(d), d.size


# ---- streams ------------------------------------------------------------------------------


def torch_current_stream(device: int) -> int:
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device)
    return torch.cuda.current_stream(device).cuda_stream


def cupy_current_stream() -> int:
    return sys.modules["cupy"].cuda.get_current_stream().ptr


def stream_handle(stream: StreamSpec, hint: int, device: int) -> int:
    """An int cudaStream_t for ``stream`` (None -> by the buffer's hint)."""
    if stream is None:
        if hint == HINT_TORCH:
            return torch_current_stream(device)
        if hint == HINT_CUPY:
            return cupy_current_stream()
        return 0
    if type(stream) is int:
        if stream < 0:
            raise ValueError(f"stream handle must be >= 0, got {stream}")
        return stream
    h = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream / ExternalStream
    if isinstance(h, int):
        return h
    proto = getattr(stream, "__cuda_stream__", None)
    if proto is not None:
        v = proto() if callable(proto) else proto
        return int(v[1])
    h = getattr(stream, "ptr", None)  # cupy Stream
    if isinstance(h, int):
        return h
    raise TypeError(
        "stream must be None, an int handle, a torch.cuda.Stream, a cupy Stream or an object "
        f"with __cuda_stream__; got {type(stream).__name__}"
    )


def copy_async(copies: Sequence[tuple[int, int, int]], stream: int) -> None:
    """Device-to-device copies ``[(dst_ptr, src_ptr, nbytes)]`` enqueued in order on the raw
    stream handle ``stream`` (the caller guarantees the pointers: no checks here)."""
    drv = _cuda.driver()
    if drv is None:
        raise RuntimeError(f"device copies need the CUDA driver: {_cuda.unavailable_reason()}")
    drv.memcpy_dtod_async(copies, stream)
