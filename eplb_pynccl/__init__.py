"""eplb_pynccl: expert-weight transport for MoE inference (EPLB) over NCCL.

The house: two pillars that move bytes, a pure pillar beside them that decides what moves,
then the execution that joins them and the engines' entry points.

* Moving bytes:
  - the binding, ``eplb_pynccl._nccl``: finding libnccl, the declarative ctypes tables of
    NCCL's and the CUDA driver's calls (``table``, checked against ``csrc_headers/``), NCCL's
    vocabulary (results, dtypes, reductions), ncclConfig_t, the row-copy kernel;
  - :class:`Communicator` (:class:`UniqueId`, :func:`group`, :class:`PreparedP2P`): NCCL
    outside torch.distributed;
  - the transports: :class:`Transport` with :class:`NcclTransport`, :class:`TorchTransport`
    (torch.distributed, gloo on the CPU) and :class:`IpcTransport` (copy engines over CUDA IPC).
* Deciding what moves (pure numpy, the same on every rank, no I/O): :func:`rebalance`
  (``placement``: DeepSeek's EPLB and a migration-aware repair), :func:`plan_rearrangement`
  (``planner``), ``schedule`` (every rank's rounds of ops), ``simulate`` (a plan or a
  schedule run on a model of the ranks, for the tests and the bench), :class:`Cluster` and
  :func:`estimate_rearrangement` (a schedule timed on a described cluster).
* Execution: :class:`ExpertShuffler` (``executor.py`` walks one rank's schedule on streams
  through a transport; the async handle).
* ``eplb_pynccl.integrations``: engines (vLLM, SGLang).

The argument rules (``_checks``) and the timeouts and wait loop (``_deadline``) are written
once and used by all of them. Importing the package needs neither torch, cupy, a GPU nor
libnccl; libnccl loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    CudaError,
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

# The names below load on first use (``__getattr__``): importing the package stays cheap and
# needs neither scipy nor torch. Type checkers and readers see them here; tests/test_types.py
# checks that this block and _LAZY name the same things.
if TYPE_CHECKING:
    from . import executor as executor
    from . import ipc as ipc
    from . import placement as placement
    from . import planner as planner
    from . import schedule as schedule
    from . import shuffler as shuffler
    from . import simulate as simulate
    from . import transport as transport
    from .cluster import Cluster
    from .estimate import RearrangementEstimate, estimate_rearrangement
    from .ipc import IpcTransport
    from .placement import RebalanceResult, placement_imbalance, rebalance, should_rebalance
    from .planner import RankPlan, RearrangementPlan, plan_rearrangement
    from .shuffler import ExpertShuffler, RearrangeHandle, RearrangeStats
    from .transport import NcclTransport, TorchTransport, Transport, TransportRound

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
    "CudaError",
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
    # loaded on first use (_LAZY)
    "plan_rearrangement",
    "RearrangementPlan",
    "RankPlan",
    "Transport",
    "NcclTransport",
    "TorchTransport",
    "TransportRound",
    "IpcTransport",
    "ExpertShuffler",
    "RearrangeStats",
    "RearrangeHandle",
    "rebalance",
    "RebalanceResult",
    "should_rebalance",
    "placement_imbalance",
    "Cluster",
    "estimate_rearrangement",
    "RearrangementEstimate",
]


# submodules reachable as attributes without an import of their own (eplb_pynccl.schedule...)
_SUBMODULES = (
    "planner",
    "schedule",
    "simulate",
    "placement",
    "executor",
    "shuffler",
    "transport",
    "ipc",
)


def __dir__() -> list[str]:
    """The loaded names and those that load on first use (tab completion sees them all)."""
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplb_pynccl' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value
