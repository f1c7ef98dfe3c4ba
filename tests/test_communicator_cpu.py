"""Layer 2 on the CPU: argument validation, buffer and stream adapters, dtypes, group().

Validation must happen before any NCCL call; the subprocess test proves it for Communicator by
checking that libnccl was never even loaded. group() is exercised with the real library's
ncclGroupStart/ncclGroupEnd (they work without a GPU) and deferred callables in the queue.
The last section checks the multi-process harness the GPU suite relies on (tests/gpu_util.py):
results, failures with tracebacks, and that a hung rank is killed instead of hanging the run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from eplb_pynccl import Communicator, NcclInvalidError, UniqueId, _buffers, group
from eplb_pynccl import communicator as comm_mod
from eplb_pynccl._checks import current_device, device_index
from eplb_pynccl._nccl import library, table
from eplb_pynccl._nccl.dlpack import KDL_CUDA, read_capsule
from tests.gpu_util import libcuda_loadable

REPO = Path(__file__).resolve().parent.parent
UID = UniqueId(bytes(range(128)))


# ---- Communicator argument validation ----------------------------------------------------------

COMM_ARG_ERRORS = [
    (
        ("x", 0, 1),
        {},
        TypeError,
        "unique_id must be a UniqueId or its 128 bytes (bytes, bytearray), got str",
    ),
    (
        (None, 0, 1),
        {},
        TypeError,
        "unique_id must be a UniqueId or its 128 bytes (bytes, bytearray), got NoneType",
    ),
    ((bytes(5), 0, 1), {}, ValueError, "unique id must be 128 bytes, got 5"),
    ((bytearray(200), 0, 1), {}, ValueError, "unique id must be 128 bytes, got 200"),
    ((UID, "0", 2), {}, TypeError, "rank must be an int, got str"),
    ((UID, True, 2), {}, TypeError, "rank must be an int, got bool"),
    ((UID, 0, 2.0), {}, TypeError, "world_size must be an int, got float"),
    ((UID, 0, 0), {}, ValueError, "world_size must be >= 1, got 0"),
    ((UID, 0, -3), {}, ValueError, "world_size must be >= 1, got -3"),
    ((UID, 2, 2), {}, ValueError, "rank must be in [0, 2), got 2"),
    ((UID, -1, 4), {}, ValueError, "rank must be in [0, 4), got -1"),
    (
        (UID, 0, 1),
        {"timeout": 0},
        ValueError,
        "timeout must be a positive number of seconds, got 0",
    ),
    (
        (UID, 0, 1),
        {"timeout": -1.5},
        ValueError,
        "timeout must be a positive number of seconds, got -1.5",
    ),
    (
        (UID, 0, 1),
        {"timeout": "3"},
        ValueError,
        "timeout must be a positive number of seconds, got '3'",
    ),
    (
        (UID, 0, 1),
        {"timeout": True},
        ValueError,
        "timeout must be a positive number of seconds, got True",
    ),
    (
        (UID, 0, 1),
        {"timeout": float("nan")},
        ValueError,
        "timeout must be a finite number of seconds, got nan",
    ),
    (
        (UID, 0, 1),
        {"timeout": float("inf")},
        ValueError,
        "timeout must be a finite number of seconds, got inf",
    ),
    ((UID, 0, 1), {"max_ctas": 0}, ValueError, "max_ctas must be >= 1, got 0"),
    ((UID, 0, 1), {"max_ctas": True}, TypeError, "max_ctas must be an int, got bool"),
    ((UID, 0, 1), {"min_ctas": "2"}, TypeError, "min_ctas must be an int, got str"),
    ((UID, 0, 1), {"max_ctas": 2.5}, TypeError, "max_ctas must be an int, got float"),
    (
        (UID, 0, 1),
        {"min_ctas": 8, "max_ctas": 4},
        ValueError,
        "min_ctas (8) must be <= max_ctas (4)",
    ),
    ((UID, 0, 1, "cpu"), {}, ValueError, "device 'cpu' is not 'cuda:N' or an index"),
    ((UID, 0, 1, "cuda:x"), {}, ValueError, "device 'cuda:x' is not 'cuda:N' or an index"),
    ((UID, 0, 1, "gpu0"), {}, ValueError, "device 'gpu0' is not 'cuda:N' or an index"),
    ((UID, 0, 1, "cuda:-1"), {}, ValueError, "device index must be >= 0, got -1"),
    ((UID, 0, 1, -2), {}, ValueError, "device index must be >= 0, got -2"),
    (
        (UID, 0, 1, 1.0),
        {},
        TypeError,
        "device must be an int, 'cuda:N' or a torch.device, got float",
    ),
    (
        (UID, 0, 1, True),
        {},
        TypeError,
        "device must be an int, 'cuda:N' or a torch.device, got bool",
    ),
    (
        (UID, 0, 1, [0]),
        {},
        TypeError,
        "device must be an int, 'cuda:N' or a torch.device, got list",
    ),
]


@pytest.mark.parametrize("args, kwargs, exc, msg", COMM_ARG_ERRORS)
def test_communicator_argument_errors(args, kwargs, exc, msg):
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        Communicator(*args, **kwargs)


def test_communicator_torch_device_arguments():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^device must be a CUDA device, got cpu$"):
        Communicator(UID, 0, 1, torch.device("cpu"))
    assert device_index(torch.device("cuda", 3)) == 3
    assert device_index(torch.device("cuda")) == current_device()


def test_timeout_environment_variable(monkeypatch):
    monkeypatch.setenv("EPLB_PYNCCL_TIMEOUT", "abc")
    with pytest.raises(ValueError, match=r"^EPLB_PYNCCL_TIMEOUT='abc' is not a number of seconds$"):
        Communicator(UID, 0, 1)
    monkeypatch.setenv("EPLB_PYNCCL_TIMEOUT", "0")
    with pytest.raises(
        ValueError, match=r"^EPLB_PYNCCL_TIMEOUT must be a positive number of seconds, got 0.0$"
    ):
        Communicator(UID, 0, 1)
    monkeypatch.setenv("EPLB_PYNCCL_TIMEOUT", "nan")
    with pytest.raises(
        ValueError, match=r"^EPLB_PYNCCL_TIMEOUT must be a finite number of seconds, got nan$"
    ):
        Communicator(UID, 0, 1)


def test_validation_happens_before_libnccl_is_even_loaded():
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_communicator_cpu import COMM_ARG_ERRORS
        from eplb_pynccl import Communicator
        from eplb_pynccl._nccl import library as L
        n = 0
        for args, kwargs, exc, msg in COMM_ARG_ERRORS:
            try:
                Communicator(*args, **kwargs)
            except exc as e:
                assert str(e) == msg, (str(e), msg)
                n += 1
        print("RESULT", n, L.loaded() is None, "torch" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "EPLB_PYNCCL_TIMEOUT"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == ["RESULT", str(len(COMM_ARG_ERRORS)), "True", "False"]


def test_from_store_argument_errors():
    with pytest.raises(TypeError, match=r"^store must have set\(\) and get\(\), got object$"):
        Communicator.from_store(object(), 0, 1)
    store = _DictStore()
    with pytest.raises(ValueError, match=re.escape("rank must be in [0, 2), got 2")):
        Communicator.from_store(store, 2, 2)
    with pytest.raises(ValueError, match=re.escape("rank must be in [0, 2), got -1")):
        Communicator.from_store(store, -1, 2)
    assert store.data == {}  # nothing was published


class _DictStore:
    """A real in-process key-value store with the set/get contract from_store needs."""

    def __init__(self, as_str: bool = False):
        self.data: dict[str, bytes] = {}
        self.as_str = as_str

    def set(self, key, value):
        self.data[key] = bytes(value)

    def get(self, key):
        v = self.data[key]
        return v.decode("latin-1") if self.as_str else v


@pytest.mark.skipif(libcuda_loadable(), reason="a CUDA driver is present: the init would succeed")
@pytest.mark.parametrize("as_str", [False, True])
def test_from_store_publishes_and_reads_the_id(as_str):
    from eplb_pynccl import NcclSystemError

    store = _DictStore(as_str)
    with pytest.raises(
        NcclSystemError, match=r"^ncclCommInitRank failed: ncclUnhandledCudaError \(1\)"
    ):
        Communicator.from_store(store, 0, 2, key="k/1")
    assert len(store.data["k/1"]) == 128
    uid = UniqueId(store.data["k/1"])
    # rank 1 reads the same key (str values are latin-1 decoded back to bytes); its init then
    # fails in NCCL, after the id was accepted.
    with pytest.raises(NcclSystemError, match=r"^ncclCommInitRank failed"):
        Communicator.from_store(store, 1, 2, key="k/1")
    assert UniqueId(store.data["k/1"]) == uid


@pytest.mark.skipif(libcuda_loadable(), reason="a CUDA driver is present")
def test_from_store_with_torch_tcpstore():
    pytest.importorskip("torch")
    from datetime import timedelta

    from torch.distributed import TCPStore

    from eplb_pynccl import NcclSystemError

    store = TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    with pytest.raises(NcclSystemError):
        Communicator.from_store(store, 0, 1, key="eplb/uid")
    raw = store.get("eplb/uid")
    assert isinstance(raw, bytes) and len(raw) == 128 and any(raw)


# ---- buffers -----------------------------------------------------------------------------------


class CudaArrayLike:
    """A small object exposing __cuda_array_interface__ (v3) over a given pointer, as a
    property of its class (as numba and cupy do)."""

    def __init__(self, ptr, shape, typestr="<f4", strides=None):
        self._cai = {
            "data": (ptr, False),
            "shape": shape,
            "typestr": typestr,
            "strides": strides,
            "version": 3,
        }

    @property
    def __cuda_array_interface__(self):
        return self._cai


class CudaArrayAttr:
    """The same protocol set as a plain instance attribute (the class does not have it)."""

    def __init__(self, ptr, shape, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = CudaArrayLike(ptr, shape, typestr, strides)._cai


class NotABuffer:
    pass


class DLPackOnly:
    """An object known only through DLPack (wrapping a numpy/torch array)."""

    def __init__(self, arr, device=None):
        self._arr = arr
        self._device = device

    def __dlpack__(self, stream=None):
        return self._arr.__dlpack__()

    def __dlpack_device__(self):
        return self._device if self._device is not None else self._arr.__dlpack_device__()


def test_resolve_cpu_torch_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(
        ValueError, match=r"^buf is a CPU tensor; NCCL needs a CUDA tensor \(got device cpu\)$"
    ):
        _buffers.resolve(torch.zeros(4))
    with pytest.raises(ValueError, match=r"^out is a CPU tensor"):
        _buffers.resolve(torch.zeros(4, 4).t(), "out")


def test_resolve_cuda_array_interface():
    # contiguous: row-major strides given explicitly, or omitted
    assert _buffers.resolve(CudaArrayLike(0x10000, (2, 3), "<f4", (12, 4))) == (
        0x10000,
        24,
        -1,
        _buffers.HINT_DEFAULT,
    )
    assert _buffers.resolve(CudaArrayLike(0x20000, (5,), "|u1")) == (
        0x20000,
        5,
        -1,
        _buffers.HINT_DEFAULT,
    )
    assert _buffers.resolve(CudaArrayLike(0x20000, (4, 1, 2), "<f8", (16, 999, 8)))[:2] == (
        0x20000,
        64,
    )
    assert _buffers.resolve(CudaArrayLike(0, (0,), "<f4")) == (0, 0, -1, _buffers.HINT_DEFAULT)
    with pytest.raises(
        ValueError,
        match=re.escape("buf is not contiguous (__cuda_array_interface__ strides (4, 8))"),
    ):
        _buffers.resolve(CudaArrayLike(0x10000, (2, 3), "<f4", (4, 8)))
    with pytest.raises(
        ValueError,
        match=re.escape("x is not contiguous (__cuda_array_interface__ strides (24, 8))"),
    ):
        _buffers.resolve(CudaArrayLike(0x10000, (2, 2), "<f8", (24, 8)), "x")
    with pytest.raises(ValueError, match=r"^buf has a null data pointer$"):
        _buffers.resolve(CudaArrayLike(None, (3,), "<f4"))
    with pytest.raises(ValueError, match=r"^buf has a null data pointer$"):
        _buffers.resolve(CudaArrayLike(0, (3,), "<f4"))


def test_resolve_cuda_array_interface_set_on_the_instance():
    assert _buffers.resolve(CudaArrayAttr(0x30000, (3, 2), "<f8")) == (
        0x30000,
        48,
        -1,
        _buffers.HINT_DEFAULT,
    )
    with pytest.raises(
        ValueError,
        match=re.escape("buf is not contiguous (__cuda_array_interface__ strides (8, 24))"),
    ):
        _buffers.resolve(CudaArrayAttr(0x30000, (3, 2), "<f8", (8, 24)))
    # the per-instance protocol must not be cached for the class: a plain instance is refused
    with pytest.raises(TypeError, match=r"got NotABuffer$"):
        _buffers.resolve(NotABuffer())
    x = NotABuffer()
    x.__cuda_array_interface__ = CudaArrayLike(0x40000, (7,), "|u1")._cai
    assert _buffers.resolve(x)[:2] == (0x40000, 7)
    with pytest.raises(TypeError, match=r"got NotABuffer$"):
        _buffers.resolve(NotABuffer())


@pytest.mark.parametrize(
    "buf, exc, msg",
    [
        ((1, 2, 3), TypeError, "buf: a raw buffer is a (pointer, nbytes) tuple, got a tuple of 3"),
        ((1,), TypeError, "buf: a raw buffer is a (pointer, nbytes) tuple, got a tuple of 1"),
        ((1.0, 2), TypeError, "buf: a raw buffer is a (pointer: int, nbytes: int) tuple"),
        ((4096, "8"), TypeError, "buf: a raw buffer is a (pointer: int, nbytes: int) tuple"),
        ((4096, -1), ValueError, "buf: nbytes must be >= 0, got -1"),
        ((0, 16), ValueError, "buf: pointer must be a positive device address, got 0"),
        ((-4096, 16), ValueError, "buf: pointer must be a positive device address, got -4096"),
    ],
)
def test_resolve_raw_tuple_errors(buf, exc, msg):
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        _buffers.resolve(buf)


def test_resolve_raw_tuple():
    assert _buffers.resolve((0x7F0000001000, 4096)) == (
        0x7F0000001000,
        4096,
        -2,
        _buffers.HINT_DEFAULT,
    )
    assert _buffers.resolve((0, 0)) == (0, 0, -2, _buffers.HINT_DEFAULT)


@pytest.mark.parametrize(
    "buf, tname",
    [(3.5, "float"), ([1, 2], "list"), ("abc", "str"), (None, "NoneType"), (b"xy", "bytes")],
)
def test_resolve_unsupported_type(buf, tname):
    msg = (
        "buf must be a torch CUDA tensor, a cupy array, an object with __cuda_array_interface__ "
        f"or __dlpack__, or a (pointer, nbytes) tuple; got {tname}"
    )
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        _buffers.resolve(buf)


def test_resolve_dlpack_cpu_memory_is_refused():
    np = pytest.importorskip("numpy")
    with pytest.raises(
        ValueError,
        match=r"^buf is not CUDA memory \(DLPack device type 1\); NCCL needs device memory$",
    ):
        _buffers.resolve(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"^buf is not CUDA memory \(DLPack device type 1\)"):
        _buffers.resolve(DLPackOnly(np.zeros(4)))


def test_read_capsule_describes_the_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    info = read_capsule(t.__dlpack__())
    assert (info.ptr, info.device_type, info.shape, info.itemsize) == (t.data_ptr(), 1, (3, 4), 4)
    assert info.strides in (None, (4, 1))
    assert (info.dtype_code, info.dtype_bits, info.dtype_lanes) == (2, 32, 1)
    tt = t.t()
    info = read_capsule(tt.__dlpack__())
    assert (info.shape, info.strides) == ((4, 3), (1, 4))
    s = t[1:]
    assert read_capsule(s.__dlpack__()).ptr == s.data_ptr() == t.data_ptr() + 16
    with pytest.raises(
        TypeError, match=r"^__dlpack__\(\) did not return an unconsumed 'dltensor' capsule$"
    ):
        read_capsule(object())


def test_resolve_dlpack_claiming_cuda_reads_the_capsule():
    # The adapter's parsing, fed a real capsule: a CPU tensor relabelled as CUDA memory. Only the
    # description is read (nothing is dereferenced), so the result must match the tensor.
    torch = pytest.importorskip("torch")
    t = torch.arange(24, dtype=torch.int16).reshape(4, 6)
    # (the device index comes from the capsule's DLDevice, here the CPU tensor's 0)
    assert _buffers.resolve(DLPackOnly(t, (KDL_CUDA, 3))) == (
        t.data_ptr(),
        48,
        0,
        _buffers.HINT_DEFAULT,
    )
    assert _buffers.resolve(DLPackOnly(t[1:], (KDL_CUDA, 0)))[:2] == (t.data_ptr() + 12, 36)
    with pytest.raises(
        ValueError, match=re.escape("buf is not contiguous (DLPack strides (1, 6))")
    ):
        _buffers.resolve(DLPackOnly(t.t(), (KDL_CUDA, 0)))
    with pytest.raises(ValueError, match=r"^buf is not CUDA memory \(DLPack device type 4\)"):
        _buffers.resolve(DLPackOnly(t, (4, 0)))


# ---- streams -----------------------------------------------------------------------------------


class TorchLikeStream:
    def __init__(self, h):
        self.cuda_stream = h


class ProtocolStream:
    def __init__(self, h):
        self.h = h

    def __cuda_stream__(self):
        return (0, self.h)


class CupyLikeStream:
    def __init__(self, h):
        self.ptr = h


def test_stream_handle():
    sh = _buffers.stream_handle
    assert sh(None, _buffers.HINT_DEFAULT, 0) == 0
    assert sh(0, _buffers.HINT_TORCH, 0) == 0
    assert sh(0x55AA00, _buffers.HINT_DEFAULT, 0) == 0x55AA00
    assert sh(TorchLikeStream(777), _buffers.HINT_DEFAULT, 0) == 777
    assert sh(ProtocolStream(888), _buffers.HINT_DEFAULT, 0) == 888
    assert sh(CupyLikeStream(999), _buffers.HINT_DEFAULT, 0) == 999


@pytest.mark.parametrize(
    "stream, exc, tname",
    [
        (-1, ValueError, None),
        ("abc", TypeError, "str"),
        (1.5, TypeError, "float"),
        (True, TypeError, "bool"),
        (TorchLikeStream(None), TypeError, "TorchLikeStream"),
        (CupyLikeStream("x"), TypeError, "CupyLikeStream"),
    ],
)
def test_stream_handle_errors(stream, exc, tname):
    if exc is ValueError:
        msg = "stream handle must be >= 0, got -1"
    else:
        msg = (
            "stream must be None, an int handle, a torch.cuda.Stream, a cupy Stream or an object "
            f"with __cuda_stream__; got {tname}"
        )
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        _buffers.stream_handle(stream, _buffers.HINT_DEFAULT, 0)


# ---- dtypes ------------------------------------------------------------------------------------

# torch dtype name -> (ncclDataType_t name, element size)
EXPECTED_DTYPES = {
    "int8": ("ncclInt8", 1),
    "uint8": ("ncclUint8", 1),
    "int32": ("ncclInt32", 4),
    "uint32": ("ncclUint32", 4),
    "int64": ("ncclInt64", 8),
    "uint64": ("ncclUint64", 8),
    "float16": ("ncclFloat16", 2),
    "float32": ("ncclFloat32", 4),
    "float64": ("ncclFloat64", 8),
    "bfloat16": ("ncclBfloat16", 2),
    "float8_e4m3fn": ("ncclFloat8e4m3", 1),
    "float8_e5m2": ("ncclFloat8e5m2", 1),
}
SUPPORTED_LIST = "int8, uint8, int32, uint32, int64, uint64, float16, float32, float64, bfloat16, float8_e4m3fn, float8_e5m2"


@pytest.mark.parametrize("name", list(EXPECTED_DTYPES))
def test_nccl_dtype_for_torch_dtypes(name):
    torch = pytest.importorskip("torch")
    dt = getattr(torch, name, None)
    if dt is None:
        pytest.skip(f"this torch has no torch.{name}")
    t = torch.empty(3, dtype=dt)
    nccl_name, size = EXPECTED_DTYPES[name]
    assert _buffers.nccl_dtype(t, "buf") == (table.Dtype[nccl_name], size)
    assert size == t.element_size()


@pytest.mark.parametrize("name", ["complex64", "bool", "int16"])
def test_nccl_dtype_unsupported(name):
    torch = pytest.importorskip("torch")
    t = torch.empty(3, dtype=getattr(torch, name))
    msg = (
        f"buf has dtype {name}, which NCCL collectives do not support (supported: {SUPPORTED_LIST})"
    )
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        _buffers.nccl_dtype(t, "buf")


def test_nccl_dtype_for_raw_cai_and_dlpack_buffers():
    assert _buffers.nccl_dtype((4096, 64), "buf") == (table.Dtype["ncclUint8"], 1)
    assert _buffers.nccl_dtype(CudaArrayLike(4096, (4,), "<f2"), "buf") == (
        table.Dtype["ncclFloat16"],
        2,
    )
    assert _buffers.nccl_dtype(CudaArrayLike(4096, (4,), "<i8"), "buf") == (
        table.Dtype["ncclInt64"],
        8,
    )
    with pytest.raises(
        TypeError, match=r"^buf has dtype <c8, which NCCL collectives do not support"
    ):
        _buffers.nccl_dtype(CudaArrayLike(4096, (4,), "<c8"), "buf")
    np = pytest.importorskip("numpy")
    # A buffer known only through DLPack keeps its element type (not silently bytes).
    for npdt, nccl_name, size in [
        (np.float32, "ncclFloat32", 4),
        (np.int64, "ncclInt64", 8),
        (np.uint8, "ncclUint8", 1),
        (np.float16, "ncclFloat16", 2),
    ]:
        assert _buffers.nccl_dtype(DLPackOnly(np.zeros(3, npdt)), "buf") == (
            table.Dtype[nccl_name],
            size,
        )
    with pytest.raises(
        TypeError, match=r"^buf has dtype DLPack\(code=5, bits=64, lanes=1\), which NCCL"
    ):
        _buffers.nccl_dtype(DLPackOnly(np.zeros(3, np.complex64)), "buf")


# ---- group() -----------------------------------------------------------------------------------


def _op(log, name):
    """A deferred op as the queue holds collectives: issued by calling it at the outermost exit."""
    return (None, lambda: log.append(name), None)


def _assert_idle(st):
    assert (st.depth, st.ops, st.comms) == (0, [], {})


def test_group_nesting_depth():
    st = comm_mod._state()
    _assert_idle(st)
    with group() as g1:
        assert st.depth == 1
        with group():
            assert st.depth == 2
            with group():
                assert st.depth == 3
            assert st.depth == 2
        assert st.depth == 1
    assert isinstance(g1, group)
    _assert_idle(st)


def test_group_issues_everything_once_at_the_outermost_exit():
    # Real ncclGroupStart/ncclGroupEnd around the queue.
    st = comm_mod._state()
    log = []
    with group():
        with group():
            st.ops.append(_op(log, "inner"))
        assert log == []  # a nested exit issues nothing
        assert len(st.ops) == 1
        st.ops.append(_op(log, "outer"))
    assert log == ["inner", "outer"]
    _assert_idle(st)


def test_exception_in_inner_group_discards_only_its_ops():
    st = comm_mod._state()
    log = []
    with group():
        st.ops.append(_op(log, "a"))
        with pytest.raises(RuntimeError, match="^boom$"):
            with group():
                st.ops.append(_op(log, "b"))
                with group():
                    st.ops.append(_op(log, "c"))
                st.ops.append(_op(log, "d"))
                raise RuntimeError("boom")
        assert st.depth == 1
        assert len(st.ops) == 1
        st.ops.append(_op(log, "e"))
    assert log == ["a", "e"]
    _assert_idle(st)


def test_exception_in_outermost_group_issues_nothing():
    st = comm_mod._state()
    log = []
    with pytest.raises(KeyError):
        with group():
            st.ops.append(_op(log, "a"))
            st.comms[12345] = "a non-blocking communicator"
            with group():
                st.ops.append(_op(log, "b"))
            raise KeyError("x")
    assert log == []
    _assert_idle(st)
    # and the next group works normally
    with group():
        st.ops.append(_op(log, "z"))
    assert log == ["z"]


def test_failure_while_issuing_still_ends_the_nccl_group():
    st = comm_mod._state()
    log = []

    def failing():
        raise NcclInvalidError(4, "invalid argument", "", "ncclAllReduce")

    with pytest.raises(NcclInvalidError, match=r"^ncclAllReduce failed"):
        with group():
            st.ops.append(_op(log, "first"))
            st.ops.append((None, failing, None))
            st.ops.append(_op(log, "never"))
    assert log == ["first"]
    _assert_idle(st)
    # If _issue had not called ncclGroupEnd, NCCL would still be inside a group and this bare
    # ncclGroupEnd would succeed.
    lib = library.load()
    with pytest.raises(NcclInvalidError, match="not in a group call"):
        lib.group_end()


def test_empty_group_does_not_touch_libnccl():
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from eplb_pynccl import group
        from eplb_pynccl._nccl import library as L
        with group():
            with group():
                pass
        print("RESULT", L.loaded() is None)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["RESULT", "True"]


def test_group_state_is_thread_local():
    st = comm_mod._state()
    log = []
    seen = {}

    def other():
        st2 = comm_mod._state()
        seen["same"] = st2 is st
        seen["depth_before"] = st2.depth
        with group():
            st2.ops.append(_op(log, "thread"))
        seen["depth_after"] = st2.depth

    with group():
        st.ops.append(_op(log, "main"))
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        # the thread's group was issued on its own exit; the main thread's op is still queued
        assert log == ["thread"]
        assert len(st.ops) == 1 and st.depth == 1
    assert log == ["thread", "main"]
    assert seen == {"same": False, "depth_before": 0, "depth_after": 0}
    _assert_idle(st)


# ---- the multi-process harness of the GPU suite -------------------------------------------------


def test_harness_results_env_and_pool_reuse():
    from tests import gpu_util

    with gpu_util.RankPool(2) as pool:
        r1 = pool.run(gpu_util.selftest_job, "ok", timeout=60)
        r2 = pool.run(gpu_util.selftest_job, "count", timeout=60)
        r3 = pool.run(gpu_util.selftest_job, "count", timeout=60)
        pids = pool.pids
    assert [r["rank"] for r in r1] == [0, 1]
    assert [r["device"] for r in r1] == [0, 1]
    assert all(r["world_size"] == 2 for r in r1)
    assert [r["pid"] for r in r1] == pids and os.getpid() not in pids
    assert all(r["env"] == gpu_util.NCCL_ENV for r in r1)
    assert r2 == [1, 1] and r3 == [2, 2]  # same processes, cache kept between jobs
    assert not any(pool.alive())


def test_harness_reports_a_failing_rank_with_its_traceback():
    from tests import gpu_util

    with pytest.raises(gpu_util.RankFailure) as info:
        gpu_util.run_ranks(gpu_util.selftest_job, 3, "raise", timeout=60)
    msg = str(info.value)
    assert msg.startswith(
        "1 of 3 ranks failed in selftest_job:\nrank 2 raised ValueError: boom from rank 2\n"
    )
    assert "Traceback (most recent call last)" in msg and 'raise ValueError(f"boom from rank' in msg


def test_harness_kills_ranks_that_hang():
    from tests import gpu_util

    pool = gpu_util.RankPool(2)
    t0 = time.monotonic()
    with pytest.raises(
        gpu_util.RankTimeout, match=r"^selftest_job: ranks \[0\] of 2 did not finish within 2 s"
    ):
        pool.run(gpu_util.selftest_job, "hang", timeout=2)
    assert time.monotonic() - t0 < 15
    assert pool.broken and not any(pool.alive())
    with pytest.raises(RuntimeError, match="killed after an earlier failure"):
        pool.run(gpu_util.selftest_job, "ok")
    # after a failure, the other ranks get `grace` seconds, then everything is killed
    t0 = time.monotonic()
    with pytest.raises(gpu_util.RankFailure) as info:
        gpu_util.run_ranks(gpu_util.selftest_job, 2, "raise_and_hang", timeout=60, grace=1)
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "rank 0 raised KeyError: 'rank 0 gave up'" in msg
    assert (
        "ranks [1] had not finished 1 s after the first failure; all rank processes were killed"
        in msg
    )


def test_harness_reports_a_rank_that_dies():
    from tests import gpu_util

    with pytest.raises(
        gpu_util.RankFailure, match=r"rank 1 exited \(exit code 3\) without reporting a result"
    ):
        gpu_util.run_ranks(gpu_util.selftest_job, 2, "die", timeout=60)


def test_harness_tcpstore():
    pytest.importorskip("torch")
    from tests import gpu_util

    assert (
        gpu_util.run_ranks(gpu_util.selftest_job, 2, "store", timeout=90) == [b"\x00\xffhello"] * 2
    )
