"""eplb_pynccl: expert-weight transport for MoE inference (EPLB) over NCCL.

Layers (each uses only those below it):

1. ``eplb_pynccl._nccl``: finding libnccl, the ctypes table, ncclConfig_t, errors.
2. :class:`Communicator`, :class:`UniqueId`, :func:`group`: NCCL outside torch.distributed.
3. :class:`Transport` with :class:`NcclTransport`, :class:`TorchTransport` and
   :class:`IpcTransport` (copy engines over CUDA IPC).
4. :func:`plan_rearrangement` (pure planner), :mod:`eplb_pynccl.schedule` (every rank's
   rounds of ops, and a virtual cluster that checks them) and :func:`rebalance` (placement
   policies: DeepSeek's EPLB and a migration-aware repair), pure numpy (+ scipy).
5. :class:`ExpertShuffler` (``executor.py`` walks a schedule on streams; the async handle).
6. ``eplb_pynccl.integrations``: engines (vLLM).

Importing the package needs neither torch, cupy, a GPU nor libnccl; libnccl loads on first use.
"""

from __future__ import annotations

from .communicator import (
    DEFAULT_TIMEOUT,
    CapturedP2P,
    Communicator,
    PreparedP2P,
    UniqueId,
    group,
    library_path,
    load_library,
    nccl_version,
)
from .errors import (
    CommunicatorStateError,
    EplbPyncclError,
    NcclError,
    NcclInternalError,
    NcclInvalidError,
    NcclLibraryError,
    NcclRemoteError,
    NcclSystemError,
    NcclTimeoutError,
    RearrangeError,
)

__version__ = "0.1.0"

_LAZY = {
    "plan_rearrangement": ".planner",
    "RearrangementPlan": ".planner",
    "RankPlan": ".planner",
    "Transport": ".transport",
    "NcclTransport": ".transport",
    "TorchTransport": ".transport",
    "TransportRound": ".transport",
    "IpcTransport": ".ipc",
    "ExpertShuffler": ".shuffler",
    "RearrangeStats": ".shuffler",
    "RearrangeHandle": ".shuffler",
    "rebalance": ".placement",
    "RebalanceResult": ".placement",
    "should_rebalance": ".placement",
    "placement_imbalance": ".placement",
    "Cluster": ".cluster",
    "estimate_rearrangement": ".estimate",
    "RearrangementEstimate": ".estimate",
}

__all__ = [
    "DEFAULT_TIMEOUT",
    "CapturedP2P",
    "Communicator",
    "PreparedP2P",
    "CommunicatorStateError",
    "EplbPyncclError",
    "NcclError",
    "NcclInternalError",
    "NcclInvalidError",
    "NcclLibraryError",
    "NcclRemoteError",
    "NcclSystemError",
    "NcclTimeoutError",
    "RearrangeError",
    "UniqueId",
    "group",
    "library_path",
    "load_library",
    "nccl_version",
    *_LAZY,
]


# submodules reachable as attributes without an import of their own (eplb_pynccl.schedule...)
_SUBMODULES = ("planner", "schedule", "placement", "executor", "shuffler", "transport", "ipc")


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplb_pynccl' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value
