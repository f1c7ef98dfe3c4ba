"""eplb_pynccl: expert-weight transport for MoE inference (EPLB) over NCCL.

Layers (each uses only those below it):

1. ``eplb_pynccl._nccl``: finding libnccl, the ctypes table, ncclConfig_t, errors.
2. :class:`Communicator`, :class:`UniqueId`, :func:`group`: NCCL outside torch.distributed.
3. :class:`Transport` with :class:`NcclTransport` and :class:`TorchTransport`.
4. :func:`plan_rearrangement` (pure planner), :class:`ExpertShuffler` (executor) and
   :func:`rebalance` (placement policies: DeepSeek's EPLB and a migration-aware repair).

Importing the package needs neither torch, cupy, a GPU nor libnccl; libnccl loads on first use.
"""

from __future__ import annotations

from .communicator import (
    DEFAULT_TIMEOUT,
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
    "ExpertShuffler": ".shuffler",
    "RearrangeStats": ".shuffler",
    "RearrangeHandle": ".shuffler",
    "rebalance": ".placement",
    "RebalanceResult": ".placement",
    "should_rebalance": ".placement",
    "placement_imbalance": ".placement",
}

__all__ = [
    "DEFAULT_TIMEOUT",
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


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplb_pynccl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value
