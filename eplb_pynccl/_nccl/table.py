"""The tables of the C functions this package binds: NCCL's (:data:`FUNCTIONS`) and the CUDA
driver's (:data:`CUDA_FUNCTIONS`), one declarative style for both.

Each entry is written with the C types of ``csrc_headers/eplb_nccl.h`` (this project's own
declaration of the subset it uses); ``tests/test_header.py`` checks every entry against that
header and the header against the ``nccl.h`` shipped with the installed nvidia-nccl wheel.
The CUDA entries are written with the C types of ``csrc_headers/eplb_cuda.h``, which
``tests/test_header.py`` checks them against. The ctypes argtypes/restype of both are derived
from the C type names by :data:`CTYPES`.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any, NamedTuple


class NcclUniqueIdStruct(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes, passed by value."""

    _fields_ = [("internal", ctypes.c_char * 128)]


UNIQUE_ID_BYTES = 128


class CudaIpcHandle(ctypes.Structure):
    """CUipcMemHandle / CUipcEventHandle: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * 64)]


# C type name (as written in csrc_headers/eplb_nccl.h, without parameter names) -> ctypes type.
CTYPES: dict[str, Any] = {  # C type name -> ctypes type (None for void)
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
    # CUDA driver types (csrc_headers/eplb_cuda.h)
    "CUresult": ctypes.c_int,
    "CUdevice": ctypes.c_int,
    "CUdevice_attribute": ctypes.c_int,
    "CUpointer_attribute": ctypes.c_int,
    "CUstreamCaptureMode": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "cuuint32_t": ctypes.c_uint,
    "unsigned long long": ctypes.c_ulonglong,
    "CUdeviceptr": ctypes.c_uint64,
    "CUcontext": ctypes.c_void_p,
    "CUstream": ctypes.c_void_p,
    "CUevent": ctypes.c_void_p,
    "CUmodule": ctypes.c_void_p,
    "CUfunction": ctypes.c_void_p,
    "CUgraph": ctypes.c_void_p,
    "CUgraphExec": ctypes.c_void_p,
    "CUipcMemHandle": CudaIpcHandle,
    "CUipcEventHandle": CudaIpcHandle,
    "char*": ctypes.c_char_p,
    "const char**": ctypes.c_void_p,
    "size_t*": ctypes.c_void_p,
    "CUdevice*": ctypes.c_void_p,
    "CUdeviceptr*": ctypes.c_void_p,
    "CUcontext*": ctypes.c_void_p,
    "CUstream*": ctypes.c_void_p,
    "CUevent*": ctypes.c_void_p,
    "CUmodule*": ctypes.c_void_p,
    "CUfunction*": ctypes.c_void_p,
    "CUgraph*": ctypes.c_void_p,
    "CUgraphExec*": ctypes.c_void_p,
    "CUuuid*": ctypes.c_void_p,
    "CUipcMemHandle*": ctypes.c_void_p,
    "CUipcEventHandle*": ctypes.c_void_p,
    "CUmemcpyAttributes*": ctypes.c_void_p,
    "CUstreamBatchMemOpParams*": ctypes.c_void_p,
}


class Function(NamedTuple):
    name: str
    restype: str
    args: tuple[tuple[str, str], ...]  # (C type, parameter name)

    @property
    def ctypes_restype(self) -> Any:
        return CTYPES[self.restype]

    @property
    def ctypes_argtypes(self) -> list[Any]:
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

# ---- NCCL's vocabulary, as this package relies on it (checked against both headers by the
# tests): every code, name, size and version is written here once.


class _Coded(enum.IntEnum):
    """An NCCL enum whose members are written ``code, *attributes``: the member is the code,
    the attributes are the class's annotated names, in the order they are annotated."""

    def __new__(cls, code: int, *attributes: object) -> _Coded:
        names = list(cls.__annotations__)
        if len(names) != len(attributes):
            raise TypeError(f"{cls.__name__}: {len(attributes)} attributes for {names}")
        member = int.__new__(cls, code)
        member._value_ = code
        for name, value in zip(names, attributes):
            setattr(member, name, value)
        return member


class Result(_Coded):
    """``ncclResult_t``; ``exception`` is the :class:`~eplb_pynccl.errors.NcclError` subclass
    an error code raises as."""

    exception_name: str

    ncclSuccess = 0, ""
    ncclUnhandledCudaError = 1, "NcclSystemError"
    ncclSystemError = 2, "NcclSystemError"
    ncclInternalError = 3, "NcclInternalError"
    ncclInvalidArgument = 4, "NcclInvalidError"
    ncclInvalidUsage = 5, "NcclInvalidError"
    ncclRemoteError = 6, "NcclRemoteError"
    ncclInProgress = 7, "NcclError"
    ncclTimeout = 8, "NcclTimeoutError"

    @classmethod
    def of(cls, code: int) -> Result | None:
        """The member for ``code``, None for a code this table does not know."""
        return cls._value2member_map_.get(int(code))  # type: ignore[return-value]

    @property
    def exception(self) -> type:
        from .. import errors  # errors imports this module: looked up on use

        return getattr(errors, self.exception_name or "NcclError")


class Dtype(_Coded):
    """``ncclDataType_t`` with its element size, its name in torch / numpy / cupy spelling,
    its DLPack ``(type code, bits)`` where DLPack has it, and the NCCL version that first had
    it (None: every supported version). Older libraries lack a newer type: such data moves
    as bytes in send/recv, and collectives on it are refused."""

    size: int
    array_name: str
    dlpack: tuple[int, int] | None
    since: tuple[int, int, int] | None

    ncclInt8 = 0, 1, "int8", (0, 8), None
    ncclUint8 = 1, 1, "uint8", (1, 8), None
    ncclInt32 = 2, 4, "int32", (0, 32), None
    ncclUint32 = 3, 4, "uint32", (1, 32), None
    ncclInt64 = 4, 8, "int64", (0, 64), None
    ncclUint64 = 5, 8, "uint64", (1, 64), None
    ncclFloat16 = 6, 2, "float16", (2, 16), None
    ncclFloat32 = 7, 4, "float32", (2, 32), None
    ncclFloat64 = 8, 8, "float64", (2, 64), None
    ncclBfloat16 = 9, 2, "bfloat16", (4, 16), None
    ncclFloat8e4m3 = 10, 1, "float8_e4m3fn", None, (2, 24, 0)
    ncclFloat8e5m2 = 11, 1, "float8_e5m2", None, (2, 24, 0)

    @classmethod
    def by_array_name(cls) -> dict[str, Dtype]:
        """``{"float32": Dtype.ncclFloat32, ...}`` (torch / numpy / cupy spelling)."""
        return _DTYPE_BY_ARRAY_NAME

    @classmethod
    def by_dlpack(cls) -> dict[tuple[int, int], Dtype]:
        """``{(DLDataTypeCode, bits): Dtype}`` for the types DLPack names."""
        return _DTYPE_BY_DLPACK


_DTYPE_BY_ARRAY_NAME = {d.array_name: d for d in Dtype}
_DTYPE_BY_DLPACK = {d.dlpack: d for d in Dtype if d.dlpack is not None}


class RedOp(_Coded):
    """``ncclRedOp_t``; ``short`` is the name :meth:`Communicator.all_reduce` takes."""

    short: str

    ncclSum = 0, "sum"
    ncclProd = 1, "prod"
    ncclMax = 2, "max"
    ncclMin = 3, "min"
    ncclAvg = 4, "avg"

    @classmethod
    def by_short(cls) -> dict[str, RedOp]:
        """``{"sum": RedOp.ncclSum, ...}``."""
        return _REDOP_BY_SHORT


_REDOP_BY_SHORT = {r.short: r for r in RedOp}

# plain ints for the hot paths' comparisons
NCCL_SUCCESS = int(Result.ncclSuccess)
NCCL_IN_PROGRESS = int(Result.ncclInProgress)


# ---- the CUDA driver calls (libcuda.so.1), declared in csrc_headers/eplb_cuda.h -------------

CUDA_FUNCTIONS: tuple[Function, ...] = (
    _f("cuInit", "CUresult", "unsigned int Flags"),
    _f("cuDeviceGetCount", "CUresult", "int* count"),
    _f("cuDeviceGet", "CUresult", "CUdevice* device", "int ordinal"),
    _f("cuDeviceGetAttribute", "CUresult", "int* pi", "CUdevice_attribute attrib", "CUdevice dev"),
    _f("cuDeviceGetName", "CUresult", "char* name", "int len", "CUdevice dev"),
    _f("cuDeviceGetUuid_v2", "CUresult", "CUuuid* uuid", "CUdevice dev"),
    _f(
        "cuDeviceCanAccessPeer",
        "CUresult",
        "int* canAccessPeer",
        "CUdevice dev",
        "CUdevice peerDev",
    ),
    _f("cuDevicePrimaryCtxRetain", "CUresult", "CUcontext* pctx", "CUdevice dev"),
    _f("cuCtxSetCurrent", "CUresult", "CUcontext ctx"),
    _f("cuCtxGetCurrent", "CUresult", "CUcontext* pctx"),
    _f("cuCtxGetDevice", "CUresult", "CUdevice* device"),
    _f(
        "cuPointerGetAttribute",
        "CUresult",
        "void* data",
        "CUpointer_attribute attribute",
        "CUdeviceptr ptr",
    ),
    _f("cuGetErrorString", "CUresult", "CUresult error", "const char** pStr"),
    _f("cuEventCreate", "CUresult", "CUevent* phEvent", "unsigned int Flags"),
    _f("cuEventRecord", "CUresult", "CUevent hEvent", "CUstream hStream"),
    _f("cuEventQuery", "CUresult", "CUevent hEvent"),
    _f("cuEventDestroy_v2", "CUresult", "CUevent hEvent"),
    _f("cuStreamCreate", "CUresult", "CUstream* phStream", "unsigned int Flags"),
    _f("cuStreamDestroy_v2", "CUresult", "CUstream hStream"),
    _f("cuStreamQuery", "CUresult", "CUstream hStream"),
    _f("cuStreamWaitEvent", "CUresult", "CUstream hStream", "CUevent hEvent", "unsigned int Flags"),
    _f("cuStreamBeginCapture_v2", "CUresult", "CUstream hStream", "CUstreamCaptureMode mode"),
    _f("cuStreamEndCapture", "CUresult", "CUstream hStream", "CUgraph* phGraph"),
    _f(
        "cuGraphInstantiateWithFlags",
        "CUresult",
        "CUgraphExec* phGraphExec",
        "CUgraph hGraph",
        "unsigned long long flags",
    ),
    _f("cuGraphUpload", "CUresult", "CUgraphExec hGraphExec", "CUstream hStream"),
    _f("cuGraphLaunch", "CUresult", "CUgraphExec hGraphExec", "CUstream hStream"),
    _f("cuGraphExecDestroy", "CUresult", "CUgraphExec hGraphExec"),
    _f("cuGraphDestroy", "CUresult", "CUgraph hGraph"),
    _f("cuIpcGetMemHandle", "CUresult", "CUipcMemHandle* pHandle", "CUdeviceptr dptr"),
    _f(
        "cuIpcOpenMemHandle_v2",
        "CUresult",
        "CUdeviceptr* pdptr",
        "CUipcMemHandle handle",
        "unsigned int Flags",
    ),
    _f("cuIpcCloseMemHandle", "CUresult", "CUdeviceptr dptr"),
    _f("cuIpcGetEventHandle", "CUresult", "CUipcEventHandle* pHandle", "CUevent event"),
    _f("cuIpcOpenEventHandle", "CUresult", "CUevent* phEvent", "CUipcEventHandle handle"),
    _f(
        "cuMemcpyDtoDAsync_v2",
        "CUresult",
        "CUdeviceptr dstDevice",
        "CUdeviceptr srcDevice",
        "size_t ByteCount",
        "CUstream hStream",
    ),
    _f("cuModuleLoadData", "CUresult", "CUmodule* module", "const void* image"),
    _f("cuModuleGetFunction", "CUresult", "CUfunction* hfunc", "CUmodule hmod", "const char* name"),
    _f("cuModuleUnload", "CUresult", "CUmodule hmod"),
    _f(
        "cuLaunchKernel",
        "CUresult",
        "CUfunction f",
        "unsigned int gridDimX",
        "unsigned int gridDimY",
        "unsigned int gridDimZ",
        "unsigned int blockDimX",
        "unsigned int blockDimY",
        "unsigned int blockDimZ",
        "unsigned int sharedMemBytes",
        "CUstream hStream",
        "void** kernelParams",
        "void** extra",
    ),
    _f(
        "cuMemcpyBatchAsync_v2",
        "CUresult",
        "CUdeviceptr* dsts",
        "CUdeviceptr* srcs",
        "size_t* sizes",
        "size_t count",
        "CUmemcpyAttributes* attrs",
        "size_t* attrsIdxs",
        "size_t numAttrs",
        "CUstream hStream",
    ),
    _f(
        "cuMemcpyBatchAsync",
        "CUresult",
        "CUdeviceptr* dsts",
        "CUdeviceptr* srcs",
        "size_t* sizes",
        "size_t count",
        "CUmemcpyAttributes* attrs",
        "size_t* attrsIdxs",
        "size_t numAttrs",
        "size_t* failIdx",
        "CUstream hStream",
    ),
    _f(
        "cuStreamWaitValue32_v2",
        "CUresult",
        "CUstream stream",
        "CUdeviceptr addr",
        "cuuint32_t value",
        "unsigned int flags",
    ),
    _f(
        "cuStreamWriteValue32_v2",
        "CUresult",
        "CUstream stream",
        "CUdeviceptr addr",
        "cuuint32_t value",
        "unsigned int flags",
    ),
    _f(
        "cuStreamWaitValue32",
        "CUresult",
        "CUstream stream",
        "CUdeviceptr addr",
        "cuuint32_t value",
        "unsigned int flags",
    ),
    _f(
        "cuStreamWriteValue32",
        "CUresult",
        "CUstream stream",
        "CUdeviceptr addr",
        "cuuint32_t value",
        "unsigned int flags",
    ),
    _f(
        "cuStreamBatchMemOp_v2",
        "CUresult",
        "CUstream stream",
        "unsigned int count",
        "CUstreamBatchMemOpParams* paramArray",
        "unsigned int flags",
    ),
    _f(
        "cuStreamBatchMemOp",
        "CUresult",
        "CUstream stream",
        "unsigned int count",
        "CUstreamBatchMemOpParams* paramArray",
        "unsigned int flags",
    ),
    _f("cuMemHostRegister_v2", "CUresult", "void* p", "size_t bytesize", "unsigned int Flags"),
    _f("cuMemHostUnregister", "CUresult", "void* p"),
    _f(
        "cuMemHostGetDevicePointer_v2",
        "CUresult",
        "CUdeviceptr* pdptr",
        "void* p",
        "unsigned int Flags",
    ),
)
# bound when the driver exports them (newer drivers)
CUDA_OPTIONAL = frozenset(
    {
        "cuMemcpyBatchAsync_v2",
        "cuMemcpyBatchAsync",
        "cuStreamWaitValue32_v2",
        "cuStreamWriteValue32_v2",
        "cuStreamWaitValue32",
        "cuStreamWriteValue32",
        "cuStreamBatchMemOp_v2",
        "cuStreamBatchMemOp",
        "cuMemHostRegister_v2",
        "cuMemHostUnregister",
        "cuMemHostGetDevicePointer_v2",
    }
)
# bound without argtypes: the hot path passes prebuilt ctypes values
CUDA_RAW = frozenset({"cuLaunchKernel"})
