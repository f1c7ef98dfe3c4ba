"""Reading a DLPack capsule's tensor description (pointer, device, shape, strides, dtype)."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

KDL_CUDA = 2
KDL_CUDA_MANAGED = 13


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype = ctypes.c_int
_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


class DLInfo(NamedTuple):
    ptr: int
    device_type: int
    device_id: int
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None  # in elements, None means C-contiguous
    itemsize: int
    dtype_code: int = -1  # DLDataTypeCode (0 int, 1 uint, 2 float, 4 bfloat, 6 bool)
    dtype_bits: int = 0
    dtype_lanes: int = 1


def read_capsule(capsule: object) -> DLInfo:
    """Describe the tensor in a "dltensor" capsule (DLManagedTensor starts with its DLTensor)."""
    if not _is_valid(capsule, b"dltensor"):
        raise TypeError("__dlpack__() did not return an unconsumed 'dltensor' capsule")
    t = _DLTensor.from_address(_get_pointer(capsule, b"dltensor"))
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim))
    strides = tuple(t.strides[i] for i in range(ndim)) if t.strides else None
    itemsize = (t.dtype.bits * t.dtype.lanes + 7) // 8
    return DLInfo(
        (t.data or 0) + t.byte_offset,
        t.device.device_type,
        t.device.device_id,
        shape,
        strides,
        itemsize,
        t.dtype.code,
        t.dtype.bits,
        t.dtype.lanes,
    )
