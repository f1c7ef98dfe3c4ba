"""Named types of the public API: what a buffer, a stream, a device and an expert map may be.

For annotations and readers; nothing here runs. torch and cupy are never imported: their
objects match these protocols by what they have (a torch tensor has ``__dlpack__`` and, on
CUDA, ``__cuda_array_interface__``; a torch stream has ``cuda_stream``; a torch device has
``type`` and ``index``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy.typing as npt

__all__ = [
    "RawBuffer",
    "Buffer",
    "StreamSpec",
    "DeviceSpec",
    "ExpertMapLike",
    "ExpertWeights",
]

RawBuffer = tuple[int, int]
"""A raw device buffer: ``(pointer, nbytes)``."""


class CudaArray(Protocol):
    """Anything exposing ``__cuda_array_interface__`` (cupy, numba, torch CUDA tensors)."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...


class DLPackArray(Protocol):
    """Anything exporting a DLPack capsule (torch tensors among them)."""

    def __dlpack__(self) -> Any: ...


Buffer = RawBuffer | CudaArray | DLPackArray
"""What :class:`~eplb_pynccl.Communicator` sends, receives and reduces."""


class TorchStreamLike(Protocol):
    @property
    def cuda_stream(self) -> int: ...


class CudaStreamProtocol(Protocol):
    def __cuda_stream__(self) -> tuple[int, int]: ...


class CupyStreamLike(Protocol):
    @property
    def ptr(self) -> int: ...


StreamSpec = None | int | TorchStreamLike | CudaStreamProtocol | CupyStreamLike
"""None (torch's current stream where torch is loaded, else the default one), a raw
``cudaStream_t`` handle, a torch / cupy stream, or anything with ``__cuda_stream__``."""


class TorchDeviceLike(Protocol):
    @property
    def type(self) -> str: ...

    @property
    def index(self) -> int | None: ...


DeviceSpec = None | int | str | TorchDeviceLike
"""A CUDA device: an index, ``"cuda"`` / ``"cuda:N"``, a torch.device; None = the current one."""

ExpertMapLike = npt.ArrayLike
"""An expert map ``[num_layers, num_physical]`` of logical ids (-1: empty): a numpy array, a
torch tensor on any device, or nested lists."""

ExpertWeights = Sequence[Sequence[Any]]
"""Per MoE layer, the weight tensors of this rank's local experts (leading dimension: rows)."""
