"""Exceptions raised by eplb_pynccl.

Two families:

* Errors found by this package before anything reaches NCCL (bad arguments, a closed
  communicator, a missing library) are ordinary Python exceptions: ``ValueError``,
  ``TypeError``, :class:`CommunicatorStateError`, :class:`NcclLibraryError`; a failed CUDA
  driver call is :class:`CudaError`.
* Errors NCCL itself reports are :class:`NcclError` (``.code``, NCCL's error string and the
  text of ``ncclGetLastError``), narrowed to a subclass callers can act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._nccl.table import Result

__all__ = [
    "EplbPyncclError",
    "NcclLibraryError",
    "CommunicatorStateError",
    "NcclError",
    "NcclInvalidError",
    "NcclSystemError",
    "NcclInternalError",
    "NcclRemoteError",
    "NcclTimeoutError",
    "RearrangeError",
    "CudaError",
]


class EplbPyncclError(Exception):
    """Base class of every exception this package defines."""


class NcclLibraryError(EplbPyncclError, OSError):
    """libnccl could not be found, could not be loaded, or is too old."""


class CommunicatorStateError(EplbPyncclError, RuntimeError):
    """The communicator was closed or aborted (or an async handle already failed)."""


class NcclError(EplbPyncclError):
    """NCCL returned an error code.

    Attributes:
        code: the ``ncclResult_t`` value.
        name: its enum name, e.g. ``"ncclInvalidUsage"``.
        error_string: ``ncclGetErrorString(code)``.
        last_error: ``ncclGetLastError`` text ("" when NCCL gave none).
        function: the NCCL function (or operation) that failed.
    """

    def __init__(
        self,
        code: int,
        error_string: str = "",
        last_error: str = "",
        function: str = "",
        detail: str = "",
    ) -> None:
        self.code = int(code)
        known = Result.of(self.code)
        self.name = known.name if known is not None else f"ncclResult({self.code})"
        self.error_string = error_string
        self.last_error = last_error
        self.function = function
        self.detail = detail
        parts = [f"{function} failed: " if function else "", f"{self.name} ({self.code})"]
        if error_string:
            parts.append(f": {error_string}")
        if last_error:
            parts.append(f"; NCCL last error: {last_error}")
        if detail:
            parts.append(f"; {detail}")
        super().__init__("".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:  # keep the attributes through pickling
        return (
            type(self),
            (self.code, self.error_string, self.last_error, self.function, self.detail),
        )


class NcclInvalidError(NcclError, ValueError):
    """ncclInvalidArgument / ncclInvalidUsage: the call was wrong; retrying will not help."""


class NcclSystemError(NcclError):
    """ncclUnhandledCudaError / ncclSystemError: CUDA, the driver or the OS failed."""


class NcclInternalError(NcclError):
    """ncclInternalError."""


class NcclRemoteError(NcclError):
    """ncclRemoteError: a peer failed or went away."""


class NcclTimeoutError(NcclError, TimeoutError):
    """An operation did not finish within its timeout (the communicator was aborted)."""


def error_class(code: int) -> type[NcclError]:
    """The NcclError subclass for an ncclResult_t code (NcclError for unknown codes)."""
    known = Result.of(code)
    return NcclError if known is None else known.exception


class CudaError(EplbPyncclError, RuntimeError):
    """A CUDA driver call failed (``.code``: the CUresult)."""

    def __init__(self, msg: str, code: int = 0) -> None:
        super().__init__(msg)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.code))


class RearrangeError(EplbPyncclError, RuntimeError):
    """A rearrangement failed part-way: in the collective verification before anything
    moved (every layer still old), or in the exchange. The transport is aborted and the
    shuffler refuses every later call with a RearrangeError (make a new transport and
    shuffler), so no retry can pair with a late peer's first call.

    Attributes:
        completed_layers: layers whose weights are entirely new (the engine should switch
            its routing map for exactly these).
        pending_layers: layers whose weights are entirely old.
        peers: ranks involved in the failed exchange (may be empty when unknown).
        cause: the underlying exception.
    """

    def __init__(
        self,
        message: str,
        completed_layers: Iterable[int] = (),
        pending_layers: Iterable[int] = (),
        peers: Iterable[int] = (),
        cause: BaseException | None = None,
    ) -> None:
        self.completed_layers = sorted(int(x) for x in completed_layers)
        self.pending_layers = sorted(int(x) for x in pending_layers)
        self.peers = sorted(int(x) for x in peers)
        self.cause = cause
        self.message = message
        super().__init__(
            f"{message} (layers complete: {self.completed_layers}; layers still old: "
            f"{self.pending_layers}; peers involved: {self.peers})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.message, self.completed_layers, self.pending_layers, self.peers, None),
        )
