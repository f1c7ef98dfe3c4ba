"""The package's argument rules (_checks) and its one wait loop (_deadline)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch

from eplb_pynccl import _checks, _deadline
from eplb_pynccl._checks import (
    check_count,
    check_index,
    check_rank_world,
    check_real,
    check_timeout,
    device_index,
    to_numpy,
)
from eplb_pynccl._deadline import Deadline, default_timeout, poll_until

# ---- timeouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 0.25, 600.0, np.float32(2.5), np.int64(3)])
def test_timeout_accepts_positive_finite_reals(value):
    t = check_timeout(value)
    assert type(t) is float and t == float(value)


@pytest.mark.parametrize(
    "value, message",
    [
        (math.nan, "timeout must be a finite number of seconds, got nan"),
        (math.inf, "timeout must be a finite number of seconds, got inf"),
        (-math.inf, "timeout must be a finite number of seconds, got -inf"),
        (True, "timeout must be a positive number of seconds, got True"),
        (np.bool_(True), "timeout must be a positive number of seconds, got True"),
        (0, "timeout must be a positive number of seconds, got 0"),
        (0.0, "timeout must be a positive number of seconds, got 0.0"),
        (-1, "timeout must be a positive number of seconds, got -1"),
        ("5", "timeout must be a positive number of seconds, got '5'"),
        (None, "timeout must be a positive number of seconds, got None"),
    ],
)
def test_timeout_refuses(value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_timeout(value)


def test_timeout_message_names_the_argument():
    with pytest.raises(ValueError, match=r"^stall must be a finite number of seconds, got nan$"):
        check_timeout(math.nan, "stall")


@pytest.mark.parametrize(
    "raw, message",
    [
        ("nan", "EPLB_PYNCCL_TIMEOUT must be a finite number of seconds, got nan"),
        ("inf", "EPLB_PYNCCL_TIMEOUT must be a finite number of seconds, got inf"),
        ("0", "EPLB_PYNCCL_TIMEOUT must be a positive number of seconds, got 0.0"),
        ("-3", "EPLB_PYNCCL_TIMEOUT must be a positive number of seconds, got -3.0"),
        ("abc", "EPLB_PYNCCL_TIMEOUT='abc' is not a number of seconds"),
        ("", "EPLB_PYNCCL_TIMEOUT='' is not a number of seconds"),
    ],
)
def test_default_timeout_names_the_variable(monkeypatch, raw, message):
    monkeypatch.setenv("EPLB_PYNCCL_TIMEOUT", raw)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        default_timeout()


def test_default_timeout_value(monkeypatch):
    monkeypatch.setenv("EPLB_PYNCCL_TIMEOUT", " 12.5 ")
    assert default_timeout() == 12.5
    monkeypatch.delenv("EPLB_PYNCCL_TIMEOUT")
    assert default_timeout() == _deadline.DEFAULT_TIMEOUT == 600.0


def test_package_exports_the_default_timeout():
    import eplb_pynccl

    assert eplb_pynccl.DEFAULT_TIMEOUT == 600.0


# ---- counts, indices, reals, rank/world ---------------------------------------------------


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2), np.int32(1)])
def test_count_accepts_integers(value):
    v = check_count(value, "n")
    assert type(v) is int and v == int(value)


@pytest.mark.parametrize(
    "value, kind, message",
    [
        (True, TypeError, "n must be an int, got bool"),
        (np.bool_(False), TypeError, "n must be an int, got bool"),
        (2.0, TypeError, "n must be an int, got float"),
        (math.nan, TypeError, "n must be an int, got float"),
        (math.inf, TypeError, "n must be an int, got float"),
        ("2", TypeError, "n must be an int, got str"),
        (None, TypeError, "n must be an int, got NoneType"),
        (0, ValueError, "n must be >= 1, got 0"),
        (-4, ValueError, "n must be >= 1, got -4"),
        (np.int64(0), ValueError, "n must be >= 1, got 0"),
    ],
)
def test_count_refuses(value, kind, message):
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        check_count(value, "n")


def test_count_minimum():
    assert check_count(0, "bytes", minimum=0) == 0
    assert check_count(-9, "offset", minimum=None) == -9
    with pytest.raises(ValueError, match=r"^bytes must be >= 0, got -1$"):
        check_count(-1, "bytes", minimum=0)


def test_index():
    assert check_index(np.int64(2), "peer", 3) == 2
    for bad in (3, -1):
        with pytest.raises(ValueError, match=re.escape(f"peer must be in [0, 3), got {bad}")):
            check_index(bad, "peer", 3)
    with pytest.raises(TypeError, match="^peer must be an int, got bool$"):
        check_index(True, "peer", 3)


def test_real():
    assert check_real(np.float32(0.5), "x", low=0.0, high=1.0) == 0.5
    assert check_real(3, "x") == 3.0
    cases = [
        (math.nan, ValueError, "x must be finite, got nan", {}),
        (math.inf, ValueError, "x must be finite, got inf", {}),
        (True, TypeError, "x must be a real number, got bool", {}),
        ("1", TypeError, "x must be a real number, got str", {}),
        (-0.5, ValueError, "x must be >= 0, got -0.5", {"low": 0.0}),
        (0.0, ValueError, "x must be > 0, got 0", {"low": 0.0, "low_open": True}),
        (2.0, ValueError, "x must be <= 1, got 2", {"high": 1.0}),
    ]
    for value, kind, message, kw in cases:
        with pytest.raises(kind, match=f"^{re.escape(message)}$"):
            check_real(value, "x", **kw)


def test_rank_world():
    assert check_rank_world(np.int64(1), 2) == (1, 2)
    assert check_rank_world(0, 1) == (0, 1)
    cases = [
        ((2, 2), ValueError, "rank must be in [0, 2), got 2"),
        ((-1, 2), ValueError, "rank must be in [0, 2), got -1"),
        ((0, 0), ValueError, "world_size must be >= 1, got 0"),
        ((True, 2), TypeError, "rank must be an int, got bool"),
        ((0, 2.0), TypeError, "world_size must be an int, got float"),
        ((0.0, 2), TypeError, "rank must be an int, got float"),
    ]
    for args, kind, message in cases:
        with pytest.raises(kind, match=f"^{re.escape(message)}$"):
            check_rank_world(*args)


# ---- devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, index",
    [
        (0, 0),
        (7, 7),
        (np.int64(3), 3),
        ("cuda:2", 2),
        (" cuda:5 ", 5),
        ("3", 3),
        (torch.device("cuda", 4), 4),
        (torch.device("cuda:1"), 1),
    ],
)
def test_device_index(device, index):
    assert device_index(device) == index


@pytest.mark.parametrize("device", [None, "cuda", "cuda:", torch.device("cuda")])
def test_device_without_index_is_the_current_one(device):
    assert device_index(device) == _checks.current_device()


@pytest.mark.parametrize(
    "device, kind, message",
    [
        (True, TypeError, "device must be an int, 'cuda:N' or a torch.device, got bool"),
        (1.0, TypeError, "device must be an int, 'cuda:N' or a torch.device, got float"),
        ("cpu", ValueError, "device 'cpu' is not 'cuda:N' or an index"),
        ("cuda:x", ValueError, "device 'cuda:x' is not 'cuda:N' or an index"),
        (torch.device("cpu"), ValueError, "device must be a CUDA device, got cpu"),
        (-1, ValueError, "device index must be >= 0, got -1"),
    ],
)
def test_device_refuses(device, kind, message):
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        device_index(device)


# ---- torch -> numpy -----------------------------------------------------------------------


def test_to_numpy_from_torch_numpy_and_lists():
    t = torch.arange(6).reshape(2, 3)
    for x in (t, t.numpy(), t.tolist(), t.requires_grad_(False)):
        a = to_numpy(x, "m", dtype=np.int64, ndim=2)
        assert a.dtype == np.int64 and a.tolist() == [[0, 1, 2], [3, 4, 5]]
    g = torch.ones(3, requires_grad=True)
    assert to_numpy(g, "g").tolist() == [1.0, 1.0, 1.0]
    b = to_numpy(torch.tensor([1.5, 2.0], dtype=torch.bfloat16), "b", dtype=np.float64)
    assert b.dtype == np.float64 and b.tolist() == [1.5, 2.0]
    # an abstract dtype checks the kind and keeps the array's own dtype
    assert to_numpy(np.arange(3, dtype=np.uint16), "u", dtype=np.integer).dtype == np.uint16
    # [] is float64 in numpy: an empty map passes as integers
    assert to_numpy([], "e", dtype=np.int64).dtype == np.int64


def test_to_numpy_refuses():
    with pytest.raises(TypeError, match=r"^m must be an integer array, got float64$"):
        to_numpy(np.ones(2), "m", dtype=np.int64)
    with pytest.raises(TypeError, match=r"^m must be an integer array, got bool$"):
        to_numpy(np.ones(2, dtype=bool), "m", dtype=np.int64)
    with pytest.raises(TypeError, match=r"^l must be an integer or float array, got <U1$"):
        to_numpy(["a"], "l", dtype=np.float64)
    with pytest.raises(ValueError, match=r"^m must be 2-D, got shape \(3,\)$"):
        to_numpy([1, 2, 3], "m", ndim=2)
    with pytest.raises(ValueError, match=r"^m must be 2-D \[rows, cols\], got shape \(3,\)$"):
        to_numpy([1, 2, 3], "m", ndim=2, dims="[rows, cols]")
    with pytest.raises(ValueError, match=r"^m must be a 2-D integer array: "):
        to_numpy([[1, 2], [3]], "m", dtype=np.int64, ndim=2)


# ---- deadlines and the poll loop ------------------------------------------------------------


def test_deadline():
    d = Deadline(60.0)
    assert not d.expired() and 59.0 < d.remaining() <= 60.0
    past = Deadline(-1.0)
    assert past.expired() and past.remaining() == 0.0


def test_poll_until_returns_the_first_truthy_value():
    calls = []

    def cond():
        calls.append(1)
        return len(calls) >= 4 and "ready"

    assert poll_until(cond, Deadline(60.0), lambda: pytest.fail("timed out")) == "ready"
    assert len(calls) == 4


def test_poll_until_keeps_the_deadline():
    """The wait ends at the deadline (a Deadline or a monotonic float) with on_timeout's error,
    neither before it nor long after it (the last sleep is at most ``cap``)."""
    for make in (Deadline, lambda t: time.monotonic() + t):
        calls = []
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="^still waiting$"):
            poll_until(
                lambda: calls.append(1),
                make(0.2),
                lambda: (_ for _ in ()).throw(TimeoutError("still waiting")),
                cap=1e-3,
            )
        took = time.monotonic() - t0
        assert 0.2 <= took < 0.2 + 2.0, took
        assert len(calls) > 10  # it polled, not slept through


def test_poll_until_raises_if_on_timeout_does_not():
    with pytest.raises(TimeoutError, match="passed its deadline"):
        poll_until(lambda: False, Deadline(0.0), lambda: None)


def test_poll_until_lets_cond_raise():
    def cond():
        raise RuntimeError("peer failed")

    with pytest.raises(RuntimeError, match="^peer failed$"):
        poll_until(cond, Deadline(60.0), lambda: None)


class _Polled:
    """The three calls NcclLibrary.wait_ready makes, answering from a script of result codes."""

    def __init__(self, codes):
        self.codes = list(codes)
        self.aborted = []

    def async_error(self, comm):
        return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]

    def comm_abort(self, comm):
        self.aborted.append(comm)

    def error(self, code, function, comm=None, detail=""):
        return RuntimeError(f"code {code} in {function}")


def test_nccl_wait_ready_goes_through_poll_until():
    from eplb_pynccl._nccl.library import NcclLibrary
    from eplb_pynccl._nccl.table import NCCL_IN_PROGRESS
    from eplb_pynccl.errors import NcclTimeoutError

    ok = _Polled([NCCL_IN_PROGRESS] * 5 + [0])
    NcclLibrary.wait_ready(ok, 7, time.monotonic() + 60, "ncclGroupEnd")
    assert ok.codes == [0] and ok.aborted == []
    bad = _Polled([NCCL_IN_PROGRESS, 3])
    with pytest.raises(RuntimeError, match="^code 3 in ncclGroupEnd$"):
        NcclLibrary.wait_ready(bad, 7, None, "ncclGroupEnd")
    hung = _Polled([NCCL_IN_PROGRESS])
    t0 = time.monotonic()
    with pytest.raises(NcclTimeoutError, match="the communicator was aborted"):
        NcclLibrary.wait_ready(hung, 7, time.monotonic() + 0.2, "ncclGroupEnd")
    assert 0.2 <= time.monotonic() - t0 < 2.2 and hung.aborted == [7]
