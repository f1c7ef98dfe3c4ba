"""The one table of NCCL functions this package binds.

Each entry is written with the C types of ``csrc_headers/eplb_nccl.h`` (this project's own
declaration of the subset it uses); ``tests/test_header.py`` checks every entry against that
header and the header against the ``nccl.h`` shipped with the installed nvidia-nccl wheel.
The ctypes argtypes/restype are derived from the C type names by :data:`CTYPES`.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple


class NcclUniqueIdStruct(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes, passed by value."""

    _fields_ = [("internal", ctypes.c_char * 128)]


UNIQUE_ID_BYTES = 128

# C type name (as written in csrc_headers/eplb_nccl.h, without parameter names) -> ctypes type.
CTYPES: dict[str, object] = {
    "ncclResult_t": ctypes.c_int,
    "ncclDataType_t": ctypes.c_int,
    "ncclRedOp_t": ctypes.c_int,
    "int": ctypes.c_int,
    "size_t": ctypes.c_size_t,
    "const char*": ctypes.c_char_p,
    "ncclComm_t": ctypes.c_void_p,
    "const ncclComm_t": ctypes.c_void_p,
    "cudaStream_t": ctypes.c_void_p,
    "void*": ctypes.c_void_p,
    "const void*": ctypes.c_void_p,
    "void**": ctypes.c_void_p,
    "int*": ctypes.c_void_p,
    "ncclResult_t*": ctypes.c_void_p,
    "ncclComm_t*": ctypes.c_void_p,
    "ncclUniqueId*": ctypes.c_void_p,
    "ncclConfig_t*": ctypes.c_void_p,
    "ncclUniqueId": NcclUniqueIdStruct,
}


class Function(NamedTuple):
    name: str
    restype: str
    args: tuple[tuple[str, str], ...]  # (C type, parameter name)

    @property
    def ctypes_restype(self):
        return CTYPES[self.restype]

    @property
    def ctypes_argtypes(self):
        return [CTYPES[t] for t, _ in self.args]


def _f(name: str, restype: str, *args: str) -> Function:
    parsed = []
    for a in args:
        ctype, _, pname = a.rpartition(" ")
        parsed.append((ctype.strip(), pname))
    return Function(name, restype, tuple(parsed))


FUNCTIONS: tuple[Function, ...] = (
    _f("ncclGetVersion", "ncclResult_t", "int* version"),
    _f("ncclGetErrorString", "const char*", "ncclResult_t result"),
    _f("ncclGetLastError", "const char*", "ncclComm_t comm"),
    _f("ncclGetUniqueId", "ncclResult_t", "ncclUniqueId* uniqueId"),
    _f(
        "ncclCommInitRank",
        "ncclResult_t",
        "ncclComm_t* comm",
        "int nranks",
        "ncclUniqueId commId",
        "int rank",
    ),
    _f(
        "ncclCommInitRankConfig",
        "ncclResult_t",
        "ncclComm_t* comm",
        "int nranks",
        "ncclUniqueId commId",
        "int rank",
        "ncclConfig_t* config",
    ),
    _f("ncclCommFinalize", "ncclResult_t", "ncclComm_t comm"),
    _f("ncclCommDestroy", "ncclResult_t", "ncclComm_t comm"),
    _f("ncclCommAbort", "ncclResult_t", "ncclComm_t comm"),
    _f("ncclCommGetAsyncError", "ncclResult_t", "ncclComm_t comm", "ncclResult_t* asyncError"),
    _f("ncclCommCount", "ncclResult_t", "const ncclComm_t comm", "int* count"),
    _f("ncclCommCuDevice", "ncclResult_t", "const ncclComm_t comm", "int* device"),
    _f("ncclCommUserRank", "ncclResult_t", "const ncclComm_t comm", "int* rank"),
    _f(
        "ncclSend",
        "ncclResult_t",
        "const void* sendbuff",
        "size_t count",
        "ncclDataType_t datatype",
        "int peer",
        "ncclComm_t comm",
        "cudaStream_t stream",
    ),
    _f(
        "ncclRecv",
        "ncclResult_t",
        "void* recvbuff",
        "size_t count",
        "ncclDataType_t datatype",
        "int peer",
        "ncclComm_t comm",
        "cudaStream_t stream",
    ),
    _f("ncclGroupStart", "ncclResult_t"),
    _f("ncclGroupEnd", "ncclResult_t"),
    _f(
        "ncclAllReduce",
        "ncclResult_t",
        "const void* sendbuff",
        "void* recvbuff",
        "size_t count",
        "ncclDataType_t datatype",
        "ncclRedOp_t op",
        "ncclComm_t comm",
        "cudaStream_t stream",
    ),
    _f(
        "ncclAllGather",
        "ncclResult_t",
        "const void* sendbuff",
        "void* recvbuff",
        "size_t sendcount",
        "ncclDataType_t datatype",
        "ncclComm_t comm",
        "cudaStream_t stream",
    ),
    _f(
        "ncclBroadcast",
        "ncclResult_t",
        "const void* sendbuff",
        "void* recvbuff",
        "size_t count",
        "ncclDataType_t datatype",
        "int root",
        "ncclComm_t comm",
        "cudaStream_t stream",
    ),
    _f(
        "ncclCommRegister",
        "ncclResult_t",
        "const ncclComm_t comm",
        "void* buff",
        "size_t size",
        "void** handle",
    ),
    _f("ncclCommDeregister", "ncclResult_t", "const ncclComm_t comm", "void* handle"),
    _f("ncclMemAlloc", "ncclResult_t", "void** ptr", "size_t size"),
    _f("ncclMemFree", "ncclResult_t", "void* ptr"),
)

FUNCTIONS_BY_NAME = {f.name: f for f in FUNCTIONS}

# Enums, as this package relies on them (checked against both headers by the tests).
RESULT = {
    "ncclSuccess": 0,
    "ncclUnhandledCudaError": 1,
    "ncclSystemError": 2,
    "ncclInternalError": 3,
    "ncclInvalidArgument": 4,
    "ncclInvalidUsage": 5,
    "ncclRemoteError": 6,
    "ncclInProgress": 7,
    "ncclTimeout": 8,
}
DATATYPE = {
    "ncclInt8": 0,
    "ncclUint8": 1,
    "ncclInt32": 2,
    "ncclUint32": 3,
    "ncclInt64": 4,
    "ncclUint64": 5,
    "ncclFloat16": 6,
    "ncclFloat32": 7,
    "ncclFloat64": 8,
    "ncclBfloat16": 9,
    "ncclFloat8e4m3": 10,
    "ncclFloat8e5m2": 11,
}
REDOP = {"ncclSum": 0, "ncclProd": 1, "ncclMax": 2, "ncclMin": 3, "ncclAvg": 4}

# NCCL versions that first had a datatype (older libraries lack it: such data moves as bytes
# in send/recv, and collectives on it are refused).
DATATYPE_SINCE = {"ncclFloat8e4m3": (2, 24, 0), "ncclFloat8e5m2": (2, 24, 0)}

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
