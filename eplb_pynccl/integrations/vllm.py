"""eplb_pynccl as vLLM's EPLB communicator, placement policy and layer loop (vLLM 0.33.0).

vLLM is imported only inside the functions below, never by ``import eplb_pynccl``; this
module itself imports without vLLM.

* :func:`create_communicator` makes vLLM's ``EplbCommunicator`` out of this package: CUDA
  expert weights move through an eplb_pynccl NCCL :class:`~eplb_pynccl.Communicator` of its
  own (its unique id shared over the EP group's gloo ``cpu_group``; vLLM's device group is
  not used), CPU weights through :class:`~eplb_pynccl.TorchTransport` on the ``cpu_group``;
  or, with ``transport="ipc"`` (backend :data:`BACKEND_IPC`), CUDA weights of one node
  through :class:`~eplb_pynccl.IpcTransport` (copy engines, host polls: usable from vLLM's
  async EPLB thread; see ``_vllm_ipc.py``).
* :class:`MigrationAwareEplbPolicy` is vLLM's ``AbstractEplbPolicy`` over
  :func:`eplb_pynccl.rebalance` (placement that keeps most experts where they are).
* :func:`rearrange_expert_weights_inplace` has the signature of vLLM's own and moves every
  layer with :class:`~eplb_pynccl.ExpertShuffler` (transactional, bounded staging, no per-layer
  buffer of vLLM's).
* :func:`register` (the ``vllm.general_plugins`` entry point) makes all three selectable by
  the name ``"eplb_pynccl"`` (:data:`BACKEND`, :data:`POLICY`) in vLLM's ``EPLBConfig``, and
  the IPC communicator by ``"eplb_pynccl_ipc"`` (:data:`BACKEND_IPC`).

Ranks are always EP-group-local, as in vLLM.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .._checks import device_index, to_numpy
from ..communicator import UniqueId
from ..transport import NcclTransport, TorchTransport, Transport
from ._world import ORIGINAL, nccl_communicator, share_unique_id, signature_problems, unwrapped

if TYPE_CHECKING:
    import torch as torch_types

    from .._types import ExpertMapLike, ExpertWeights
    from ..ipc import IpcTransport
    from ..shuffler import RearrangeStats
    from ._vllm_ipc import IpcPath

    Tensors = Sequence[torch_types.Tensor]

__all__ = [
    "BACKEND",
    "BACKEND_IPC",
    "POLICY",
    "TESTED_VLLM_VERSIONS",
    "EplbPyncclCommunicator",  # noqa: F822 (made on first access, with vLLM's base class)
    "MigrationAwareEplbPolicy",  # noqa: F822
    "create_communicator",
    "plugin",
    "rearrange_expert_weights_inplace",
    "register",
]

BACKEND = "eplb_pynccl"
"""The ``EPLBConfig.communicator`` value that selects :func:`create_communicator`."""
BACKEND_IPC = "eplb_pynccl_ipc"
"""The ``EPLBConfig.communicator`` value that selects :func:`create_communicator` with
``transport="ipc"``: the one of this package's communicators that vLLM's async EPLB mode
(``use_async=True``) may use."""
POLICY = "eplb_pynccl"
"""The ``EPLBConfig.policy`` value that selects :class:`MigrationAwareEplbPolicy`."""
TESTED_VLLM_VERSIONS = ("0.33.0",)
LAYER_LOOP_ENV = "EPLB_PYNCCL_VLLM_LAYER_LOOP"

_log = logging.getLogger(__name__)


def _torch() -> Any:  # the torch module
    import torch

    return torch


def _vllm_modules() -> tuple[Any, Any, Any, Any, Any, Any]:
    try:
        import vllm
        import vllm.config.parallel as cp
        import vllm.distributed.eplb.eplb_communicator as ec
        import vllm.distributed.eplb.eplb_state as es
        import vllm.distributed.eplb.policy as pol
        import vllm.distributed.eplb.rebalance_execute as rx
    except ImportError as e:
        raise ImportError(
            f"eplb_pynccl.integrations.vllm needs vLLM (tested with {', '.join(TESTED_VLLM_VERSIONS)}); "
            f"importing it failed: {e}"
        ) from e
    return vllm, ec, es, pol, rx, cp


# ---- the communicator ----------------------------------------------------------------------


class _Op:
    __slots__ = ("peer", "tensors", "row", "key")

    def __init__(self, peer: int, tensors: list[Any], row: int | None, key: tuple[Any, ...]):
        self.peer = peer
        self.tensors = tensors
        self.row = row  # the sender's row of this expert as both sides derive it, or None
        self.key = key


def _follows(prev: int | None, row: int | None) -> bool:
    return prev is not None and row is not None and row == prev + 1


def _runs(rows: list[int | None], keys: list[Any]) -> list[tuple[int, int]]:
    """Split one peer's ops (in call order) into runs ``[a, b)`` that travel as one message per
    tensor: consecutive ops whose sender rows are r, r+1, ... with equal tensor shapes. A row
    of None (no transfer context) never joins a run. Both ranks of a pair call this on the
    same rows (derived from the same old map and expert ids), so their messages match."""
    out = []
    a = 0
    n = len(rows)
    for j in range(1, n + 1):
        if j == n or not _follows(rows[j - 1], rows[j]) or keys[j] != keys[j - 1]:
            out.append((a, j))
            a = j
    return out


def _by_peer(ops: list[_Op]) -> list[tuple[int, list[_Op]]]:
    groups: dict[int, list[_Op]] = {}
    for op in ops:
        groups.setdefault(op.peer, []).append(op)
    return list(groups.items())


def _messages_of(ops: list[_Op]) -> Iterator[tuple[int, list[Any]]]:
    """(peer, tensors) of each message of ``ops``: per peer, per run (:func:`_runs`), per
    tensor index, the run's tensors of that index in call order."""
    for peer, group in _by_peer(ops):
        for a, b in _runs([op.row for op in group], [op.key for op in group]):
            for i in range(len(group[a].tensors)):
                yield peer, [op.tensors[i] for op in group[a:b]]


def _span(torch: Any, ts: list[Any]) -> Any:
    """One tensor over the memory of ``ts`` if they are contiguous rows laid end to end in one
    storage (a view, no copy), else None."""
    t0 = ts[0]
    if not all(t.is_contiguous() for t in ts):
        return None
    if len(ts) == 1:
        return t0
    n = t0.nbytes
    if n == 0:
        return None
    base = t0.untyped_storage().data_ptr()
    p0 = t0.data_ptr()
    for j, t in enumerate(ts):
        if t.data_ptr() != p0 + j * n or t.untyped_storage().data_ptr() != base:
            return None
    shape = (len(ts), *t0.shape)
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return torch.as_strided(t0, shape, tuple(reversed(strides)), t0.storage_offset())


def _as_cuda_stream(torch: Any, stream: Any) -> Any:
    """torch.cuda.Stream for vLLM's generic ``torch.Stream`` (async worker), as is otherwise."""
    if stream is None or isinstance(stream, torch.cuda.Stream):
        return stream
    if isinstance(stream, torch.Stream) and stream.device.type == "cuda":  # device_type is an int
        return torch.cuda.Stream(
            stream_id=stream.stream_id,
            device_index=stream.device_index,
            device_type=stream.device_type,
        )
    raise TypeError(f"set_stream() needs a CUDA stream or None, got {stream!r}")


class _CommunicatorImpl:
    """Everything of :class:`EplbPyncclCommunicator` but vLLM's base class (see there).

    ``ipc``: an :class:`~eplb_pynccl.integrations._vllm_ipc.IpcPath` over ``transport`` (an
    IpcTransport with the weights registered): every execute() is then one IPC round, and
    may be called from any thread (vLLM's async EPLB thread). One communicator is driven by
    one thread at a time: its queue and its transport's round numbers are not shared
    between threads."""

    def __init__(
        self,
        transport: Transport,
        expert_weights: ExpertWeights = (),
        expert_buffer: Tensors = (),
        *,
        ipc: IpcPath | None = None,
    ) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(
                f"transport must be an eplb_pynccl Transport, got {type(transport).__name__}"
            )
        self._torch = _torch()
        self.transport = transport
        self.rank = transport.rank
        self.world_size = transport.world_size
        self.device = transport.device
        self.expert_weights = expert_weights
        self.expert_buffer = expert_buffer
        self._nccl = isinstance(transport, NcclTransport)
        self._ipc = ipc
        self._layer: int | None = None  # layer_idx of the transfer context
        self._stream: Any = None  # a torch.cuda.Stream or None
        self._sends: list[_Op] = []
        self._recvs: list[_Op] = []
        # (old layer map, slots per rank, {sender: {expert: first row}})
        self._context: tuple[np.ndarray, int, dict[int, dict[int, int]]] | None = None
        self._thread = threading.get_ident()
        self._shufflers: dict = {}

    # vLLM's interface ------------------------------------------------------------------
    @property
    def needs_profile_buffer_reservation(self) -> bool:
        # vLLM's profile run reserves its own NCCL group's buffers with a dummy all_gather; ours
        # are set up when the communicator is made (connect_peers), so that would only cost a
        # layer's worth of memory for nothing
        return False

    def set_stream(self, stream: Any) -> None:  # a CUDA torch.Stream or None
        self._stream = _as_cuda_stream(self._torch, stream)

    def set_transfer_context(self, old_indices: ExpertMapLike, layer_idx: int) -> None:
        """Remember the layer's old map: each side of a pair derives from it the sender's row of
        every expert (its first slot on the sender, where vLLM reads it), and merges the
        experts whose rows follow each other into one message per tensor."""
        old = np.asarray(old_indices).reshape(-1)
        if old.size == 0 or old.size % self.world_size:
            self._context = self._layer = None
            return
        self._context = (old.astype(np.int64), old.size // self.world_size, {})
        self._layer = int(layer_idx)

    def add_send(self, tensors: Tensors, dst_rank: int, expert_id: int) -> None:
        if self._ipc is None:
            self._sends.append(self._op("add_send", tensors, dst_rank, expert_id, self.rank))
            return
        with self._refusal_aborts():
            layer = self._ipc.check_layer("add_send", self._layer)
            op = self._op("add_send", tensors, dst_rank, expert_id, self.rank)
            self._ipc.check_send(layer, op.row, int(expert_id), op.tensors)
        self._sends.append(op)

    def add_recv(self, tensors: Tensors, src_rank: int, expert_id: int) -> None:
        if self._ipc is None:
            self._recvs.append(self._op("add_recv", tensors, src_rank, expert_id, src_rank))
            return
        with self._refusal_aborts():
            layer = self._ipc.check_layer("add_recv", self._layer)
            op = self._op("add_recv", tensors, src_rank, expert_id, src_rank)
            self._ipc.check_recv(layer, op.row, src_rank, int(expert_id), op.tensors)
        self._recvs.append(op)

    @contextlib.contextmanager
    def _refusal_aborts(self) -> Iterator[None]:
        """IPC: a refused add_send/add_recv aborts the transport (this rank's round will not
        run as its peers expect, and they should hear it now rather than at their timeout)."""
        try:
            yield
        except (TypeError, ValueError) as e:
            self._sends, self._recvs = [], []
            ipc = cast("IpcTransport", self.transport)  # IPC mode: an IpcTransport
            ipc.abort(str(e))  # a second abort (IpcPath.fail's) changes nothing
            raise

    def execute(self) -> None:
        """Post every queued send and receive as one grouped exchange; on return the data is in
        the destination tensors (on CUDA: in the order of the stream given to set_stream, or
        the current stream; the host has seen the exchange complete, within the
        communicator's timeout). Merged runs travel straight from and into the tensors when
        their rows are adjacent in memory, else through a staging copy.

        IPC: one round on every call, also with nothing queued (every rank runs the same
        rounds); returns once this rank's pulls have landed and every peer that reads its
        rows has finished (host polls, the transport's timeout: a peer that died or hangs is
        an error naming it). Any thread; the device is made current first."""
        sends, recvs, layer = self._sends, self._recvs, self._layer
        self._sends, self._recvs, self._context, self._layer = [], [], None, None
        if self._ipc is not None:
            torch = self._torch
            stream = self._stream
            if stream is None and self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
            self._ipc.execute(torch, sends, recvs, layer, stream)
            return
        if not sends and not recvs:
            return
        if self._nccl and threading.get_ident() != self._thread:
            raise RuntimeError(
                "eplb_pynccl: execute() was called from another thread than the one that made "
                "this communicator (vLLM's async EPLB thread?); NCCL kernels of a second "
                "communicator issued from a background thread can deadlock against the forward "
                "pass's NCCL kernels, so the NCCL transport refuses it: set "
                "eplb_config.use_async=false"
            )
        torch = self._torch
        stream = None
        if self.device.type == "cuda":
            stream = (
                self._stream if self._stream is not None else torch.cuda.current_stream(self.device)
            )
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            out, inn, after = self._messages(sends, recvs)
            self.transport.exchange(out, inn, stream)
            if stream is not None:
                self.transport.wait(stream)
            for dst, src in after:
                dst.copy_(src, non_blocking=True)

    # internals -------------------------------------------------------------------------
    def _op(self, what: str, tensors: Any, peer: Any, expert_id: Any, sender: int) -> _Op:
        torch = self._torch
        if type(peer) is not int or not 0 <= peer < self.world_size:
            raise ValueError(f"{what}: rank {peer!r} is not an EP rank in [0, {self.world_size})")
        if (
            isinstance(tensors, torch.Tensor)
            or not hasattr(tensors, "__len__")
            or len(tensors) == 0
        ):
            raise TypeError(f"{what}: tensors must be a non-empty list of tensors")
        tensors = list(tensors)
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{what}: tensors[{i}] must be a torch.Tensor, got {type(t).__name__}"
                )
            self.transport.check_tensor(t, f"{what}: tensors[{i}]")
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        return _Op(peer, tensors, self._row_of(sender, int(expert_id)), key)

    def _row_of(self, sender: int, expert: int) -> int | None:
        ctx = self._context
        if ctx is None:
            return None
        old, per_rank, cache = ctx
        rows = cache.get(sender)
        if rows is None:
            rows = {}
            for r, e in enumerate(old[sender * per_rank : (sender + 1) * per_rank].tolist()):
                if e >= 0:
                    rows.setdefault(e, r)
            cache[sender] = rows
        return rows.get(expert)

    def _messages(
        self, sends: list[_Op], recvs: list[_Op]
    ) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]], list[tuple[Any, Any]]]:
        """(sends, receives) as the transport's (peer, tensor) messages, and the (destination,
        received row) copies to make after the exchange."""
        torch = self._torch
        out: list[tuple[int, Any]] = []
        inn: list[tuple[int, Any]] = []
        after: list[tuple[Any, Any]] = []
        for peer, ts in _messages_of(sends):
            v = _span(torch, ts)
            out.append((peer, v if v is not None else torch.stack(ts)))
        for peer, ts in _messages_of(recvs):
            v = _span(torch, ts)
            if v is None:
                t0 = ts[0]
                v = torch.empty((len(ts), *t0.shape), dtype=t0.dtype, device=t0.device)
                after.extend((t, v[j]) for j, t in enumerate(ts))
            inn.append((peer, v))
        return out, inn, after


_classes: dict[str, type] = {}


def _with_vllm_base(
    name: str, impl: type, base: Callable[[tuple[Any, ...]], type], doc: str
) -> type:
    """``impl`` with vLLM's class ``base(modules)`` as second base, made once (vLLM is imported
    on first use only)."""
    cls = _classes.get(name)
    if cls is None:
        cls = type(name, (impl, base(_vllm_modules())), {"__module__": __name__, "__doc__": doc})
        _classes[name] = cls
    return cls


def _communicator_class() -> type:
    return _with_vllm_base(
        "EplbPyncclCommunicator",
        _CommunicatorImpl,
        lambda m: m[1].EplbCommunicator,
        "vLLM's EplbCommunicator over an eplb_pynccl Transport (made by create_communicator). "
        "Each execute() is one grouped exchange; runs of experts whose sender rows are "
        "adjacent go as one message per tensor.",
    )


def _setup_ipc(
    torch: Any, cpu_group: Any, expert_weights: ExpertWeights, timeout: float | None = None
) -> tuple[IpcTransport, IpcPath]:
    """The IPC communicator's transport (weights registered) and path (see
    :func:`create_communicator`, ``transport="ipc"``); collective over ``cpu_group``. Every
    rank learns every rank's problem, so they all refuse together, before anything moves."""
    import pickle
    import socket

    from ..ipc import IpcTransport
    from ._vllm_ipc import IpcPath, WeightRows, layout_disagreements

    rows = WeightRows(expert_weights)
    dev = rows.tensors[0].device
    device = device_index(dev)
    local = rows.problems()
    local += [
        f"expert_weights[{layer}][{i}] is on {t.device}, expert_weights[0][0] on {dev}"
        for layer, ws in enumerate(expert_weights)
        for i, t in enumerate(ws)
        if t.device != dev
    ][:1]
    setup = TorchTransport(cpu_group, timeout=timeout)
    t = IpcTransport(setup=setup, device=device, timeout=timeout, key="eplb_pynccl/vllm_ipc")
    try:
        mine = {"host": socket.gethostname(), "problems": local, "layout": rows.describe()}
        everyone = [pickle.loads(b) for b in t.all_gather_bytes(pickle.dumps(mine))]
        problems = [f"rank {r}: {m}" for r, e in enumerate(everyone) for m in e["problems"]]
        hosts = [e["host"] for e in everyone]
        if len(set(hosts)) > 1:
            problems.append(
                "the EP ranks are on more than one node (hosts by EP rank: "
                + ", ".join(f"{r}: {h}" for r, h in enumerate(hosts))
                + f"); CUDA IPC reaches the GPUs of one node only: use {BACKEND!r} "
                "(eplb_config.use_async=false)"
            )
        if not problems:
            problems = layout_disagreements([e["layout"] for e in everyone])
        if problems:
            raise ValueError(
                f"EPLB communicator {BACKEND_IPC!r}: "
                + "; ".join(problems)
                + "; no communicator was made"
            )
        t.register_buffers(rows.tensors)
    except BaseException:
        t.close()
        raise
    return t, IpcPath(t, rows)


def _share_unique_id(torch: Any, cpu_group: Any) -> UniqueId:
    """EP rank 0 makes a NCCL unique id and every rank gets it over the gloo group; a failure
    there reaches every rank as an error instead of a wait."""
    return share_unique_id(TorchTransport(cpu_group), "EP rank 0")


def create_communicator(
    group_coordinator: Any,
    expert_weights: ExpertWeights,
    expert_buffer: Tensors,
    *,
    timeout: float | None = None,
    max_ctas: int | None = None,
    transport: str = "nccl",
) -> Any:  # an EplbPyncclCommunicator (its class is made when vLLM is imported)
    """vLLM's ``create_eplb_communicator`` less ``backend``: an :class:`EplbPyncclCommunicator`.

    Collective over the EP group (every EP rank calls it, as vLLM does in ``add_model``).
    CUDA ``expert_weights``: a non-blocking eplb_pynccl NCCL communicator over the EP group's
    ranks on the tensors' device (``timeout`` seconds for init and every wait, default
    ``$EPLB_PYNCCL_TIMEOUT`` or 600; ``max_ctas`` as in :class:`~eplb_pynccl.Communicator`),
    peers connected now. Its unique id is broadcast over ``group_coordinator.cpu_group``
    (gloo); vLLM's device group is not used. CPU ``expert_weights`` (or none):
    :class:`~eplb_pynccl.TorchTransport` on the ``cpu_group``. NCCL refuses vLLM's async
    EPLB mode.

    ``transport="ipc"`` (backend :data:`BACKEND_IPC`): CUDA ``expert_weights`` only, every EP
    rank on one node; an :class:`~eplb_pynccl.IpcTransport` (set up over the ``cpu_group``)
    with every layer's weight tensors registered, after checking that every rank's have the
    same shapes, strides and dtypes. Usable from vLLM's async EPLB thread (no NCCL, no SM
    kernel). ``max_ctas`` does not apply.
    """
    if transport not in ("nccl", "ipc"):
        raise ValueError(f"transport must be 'nccl' or 'ipc', got {transport!r}")
    torch = _torch()
    _refuse_stateless(group_coordinator, BACKEND_IPC if transport == "ipc" else BACKEND)
    cpu_group = group_coordinator.cpu_group
    first = next((t for ws in expert_weights for t in ws), None)
    if transport == "ipc":
        if first is None or first.device.type != "cuda":
            where = "none" if first is None else f"on {first.device}"
            raise ValueError(
                f"EPLB communicator {BACKEND_IPC!r} moves CUDA expert weights over CUDA IPC; "
                f"the expert weights are {where} (use {BACKEND!r} for CPU weights)"
            )
        cls = _communicator_class()  # needs vLLM: before any set-up
        t, path = _setup_ipc(torch, cpu_group, expert_weights, timeout)
        return cls(t, expert_weights, expert_buffer, ipc=path)
    if first is None or first.device.type == "cpu":
        mover: Transport = TorchTransport(cpu_group)
    elif first.device.type == "cuda":
        mover = _nccl_mover(cpu_group, first.device, timeout, max_ctas)
    else:
        raise ValueError(
            f"EPLB communicator {BACKEND!r} moves CUDA or CPU tensors; the expert weights are on "
            f"{first.device}"
        )
    return _communicator_class()(mover, expert_weights, expert_buffer)


def _refuse_stateless(group_coordinator: Any, name: str) -> None:
    """ValueError for vLLM's elastic-EP (stateless) group coordinators."""
    vllm_stateless: Any = None
    with contextlib.suppress(ImportError):
        from vllm.distributed.stateless_coordinator import StatelessGroupCoordinator

        vllm_stateless = StatelessGroupCoordinator
    if vllm_stateless is not None and isinstance(group_coordinator, vllm_stateless):
        raise ValueError(
            f"EPLB communicator {name!r} does not support elastic EP (stateless groups); use "
            "'pynccl' or 'nixl' there"
        )


def _nccl_mover(
    cpu_group: Any, device: Any, timeout: float | None, max_ctas: int | None
) -> NcclTransport:
    """The NCCL transport of CUDA weights on ``device``: a non-blocking communicator of the
    ``cpu_group``'s ranks, peers connected; refused under vLLM's async EPLB."""
    cfg = None
    with contextlib.suppress(ImportError):
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.parallel_config.eplb_config.use_async:
        raise ValueError(
            f"EPLB communicator {BACKEND!r} moves CUDA weights with NCCL, which must not run "
            "from vLLM's async EPLB thread (its kernels can deadlock against the forward "
            "pass's NCCL kernels); set eplb_config.use_async=false"
        )
    comm = nccl_communicator(
        TorchTransport(cpu_group),
        "EP rank 0",
        device_index(device),
        blocking=False,
        timeout=timeout,
        max_ctas=max_ctas,
    )
    if comm.world_size > 1:
        comm.connect_peers()
    return NcclTransport(comm)


# ---- the layer loop ------------------------------------------------------------------------


def _apply_rank_mapping(
    old: np.ndarray, new: np.ndarray, rank_mapping: dict[int, int], ep_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's elastic-EP convention: ``rank_mapping`` maps old ranks to new ones (-1: removed).
    Scaling down (as many entries as the EP group, the old one): the new map is laid out on
    the old ranks, -1 on removed ones. Scaling up (the EP group is the new, larger one): the
    old map is laid out on the new ranks, -1 on the added ones."""
    if len(rank_mapping) == ep_size:
        new_ep = sum(1 for v in rank_mapping.values() if v != -1)
        per = new.shape[1] // new_ep
        mapped = np.full((new.shape[0], ep_size * per), -1, dtype=np.int64)
        for r in range(ep_size):
            n = rank_mapping[r]
            if 0 <= n < new_ep:
                mapped[:, r * per : (r + 1) * per] = new[:, n * per : (n + 1) * per]
        return old, mapped
    old_ep = len(rank_mapping)
    per = old.shape[1] // old_ep
    mapped = np.full((old.shape[0], ep_size * per), -1, dtype=np.int64)
    for r in range(old_ep):
        to = rank_mapping.get(r)
        if to is not None and 0 <= to < ep_size:
            mapped[:, to * per : (to + 1) * per] = old[:, r * per : (r + 1) * per]
    return mapped, new


def _sync_allowed() -> contextlib.AbstractContextManager[Any]:
    """vLLM's gpu_sync_allowed() (its opt-in VLLM_GPU_SYNC_CHECK mode turns host syncs outside
    it into errors); a rearrangement reads the maps on the host and waits for its rounds, as
    vLLM's own loop does inside the same context."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        return contextlib.nullcontext()
    return gpu_sync_allowed()


def _shuffler(transport: Transport, weights: ExpertWeights, owner: Any) -> Any:
    from ..shuffler import ExpertShuffler

    key = tuple(
        (t.data_ptr(), tuple(t.shape), t.dtype, str(t.device)) for ws in weights for t in ws
    )
    cache = owner._shufflers if owner is not None else {}
    sh = cache.get(key)
    if sh is None:
        sh = cache[key] = ExpertShuffler(transport, weights)
    return sh


def rearrange_expert_weights_inplace(
    old_global_expert_indices: ExpertMapLike,
    new_global_expert_indices: ExpertMapLike,
    expert_weights: ExpertWeights,
    expert_buffer: Tensors,
    ep_group: Any,
    communicator: Any,
    is_profile: bool = False,
    rank_mapping: dict[int, int] | None = None,
) -> RearrangeStats | None:
    """vLLM's ``rearrange_expert_weights_inplace`` (same arguments), done by
    :class:`~eplb_pynccl.ExpertShuffler` for all layers at once.

    ``old/new_global_expert_indices``: ``[num_moe_layers, num_physical_experts]``, slot ``s``
    on EP rank ``s // P``, row ``s % P`` (``P`` local experts per rank), -1 empty: the same
    convention as :func:`~eplb_pynccl.plan_rearrangement`. ``expert_weights[layer]``: the
    layer's tensors ``[P, ...]``, rewritten in place. ``expert_buffer`` is not used (the
    shuffler stages within one layer's worth of memory of its own). The transport is the
    communicator's when it is an :class:`EplbPyncclCommunicator`, else
    ``TorchTransport(ep_group)``. ``is_profile``: nothing moves; on CUDA the shuffler's
    staging size is allocated once so vLLM's memory profile sees it. ``rank_mapping``:
    vLLM's elastic-EP mapping. Returns the :class:`~eplb_pynccl.RearrangeStats` (vLLM ignores
    it); a failure raises :class:`~eplb_pynccl.RearrangeError` with every layer entirely old
    or entirely new.
    """
    torch = _torch()
    ours = isinstance(communicator, _CommunicatorImpl)
    if ours and communicator._ipc is not None:
        raise ValueError(
            f"rearrange_expert_weights_inplace: the {BACKEND_IPC!r} communicator moves one "
            "execute() at a time over its registered weights; use vLLM's layer loop with it "
            "(register() keeps vLLM's loop for it)"
        )
    transport = communicator.transport if ours else TorchTransport(ep_group)
    if transport.rank != ep_group.rank() or transport.world_size != ep_group.size():
        raise ValueError(
            f"the communicator's ranks ({transport.rank} of {transport.world_size}) are not "
            f"ep_group's ({ep_group.rank()} of {ep_group.size()})"
        )
    weights = [list(ws) for ws in expert_weights]
    sh = _shuffler(transport, weights, communicator if ours else None)
    if is_profile:
        if sh.device.type == "cuda" and sh.staging_bytes:
            # freed at once into torch's caching allocator, where the profile counts it
            torch.empty(sh.staging_bytes, dtype=torch.uint8, device=sh.device)
        return None
    with _sync_allowed():
        old = to_numpy(old_global_expert_indices, "old_global_expert_indices")
        new = to_numpy(new_global_expert_indices, "new_global_expert_indices")
        old, new = old.astype(np.int64, copy=False), new.astype(np.int64, copy=False)
        if rank_mapping is not None:
            old, new = _apply_rank_mapping(old, new, rank_mapping, ep_group.size())
        return sh.rearrange(old, new)


# ---- the policy ----------------------------------------------------------------------------


class _PolicyImpl:
    """Everything of :class:`MigrationAwareEplbPolicy` but vLLM's base class (see there)."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: ExpertMapLike,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: ExpertMapLike | None = None,
    ) -> Any:  # an int64 CPU torch.Tensor
        torch = _torch()
        try:
            from ..placement import rebalance
        except ImportError as e:
            raise RuntimeError(
                f"the {POLICY!r} EPLB policy needs eplb_pynccl.rebalance (eplb_pynccl.placement), "
                f"which this install lacks: {e}"
            ) from e
        loads = to_numpy(weight, "weight").astype(np.float64)
        old = None
        if old_global_expert_indices is not None:
            o = to_numpy(old_global_expert_indices, "old_global_expert_indices").astype(np.int64)
            # a resize (elastic EP) changes num_replicas, and a map that lost an expert is no
            # placement of these experts: then there is nothing to keep, DeepSeek's algorithm
            if o.shape == (loads.shape[0], num_replicas) and all(
                np.isin(np.arange(loads.shape[1]), row).all() for row in o
            ):
                old = o
        groups, nodes = None, 1
        if num_groups and num_nodes and num_groups % num_nodes == 0:
            # vLLM's rule: hierarchical balancing when groups divide over nodes, else global
            groups, nodes = num_groups, num_nodes
        res = rebalance(
            loads, num_replicas, num_ranks, old_map=old, num_nodes=nodes, num_groups=groups
        )
        # a copy: the result's arrays are read-only (torch warns on a tensor over them)
        return torch.from_numpy(np.array(res.new_map, dtype=np.int64, order="C", copy=True))


def _policy_class() -> type:
    return _with_vllm_base(
        "MigrationAwareEplbPolicy",
        _PolicyImpl,
        lambda m: m[3].AbstractEplbPolicy,
        "vLLM's AbstractEplbPolicy over eplb_pynccl.rebalance: from the current map "
        "(old_global_expert_indices) it keeps most experts in place at the balance "
        "DeepSeek's algorithm reaches; without one, that algorithm. Returns an int64 "
        "CPU tensor [layers, num_replicas], as DefaultEplbPolicy.",
    )


def __getattr__(name: str) -> type:
    if name == "EplbPyncclCommunicator":
        return _communicator_class()
    if name == "MigrationAwareEplbPolicy":
        return _policy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- register: the vLLM plugin -------------------------------------------------------------

_EXPECTED_PARAMS = {
    "eplb_communicator.create_eplb_communicator": [
        "group_coordinator",
        "backend",
        "expert_weights",
        "expert_buffer",
    ],
    "rebalance_execute.rearrange_expert_weights_inplace": [
        "old_global_expert_indices",
        "new_global_expert_indices",
        "expert_weights",
        "expert_buffer",
        "ep_group",
        "communicator",
        "is_profile",
        "rank_mapping",
    ],
    "policy.AbstractEplbPolicy.rebalance_experts": [
        "weight",
        "num_replicas",
        "num_groups",
        "num_nodes",
        "num_ranks",
        "old_global_expert_indices",
    ],
    "eplb_communicator.EplbCommunicator.add_send": ["self", "tensors", "dst_rank", "expert_id"],
    "eplb_communicator.EplbCommunicator.add_recv": ["self", "tensors", "src_rank", "expert_id"],
    "eplb_communicator.EplbCommunicator.execute": ["self"],
    "eplb_communicator.EplbCommunicator.set_transfer_context": ["self", "old_indices", "layer_idx"],
    "eplb_communicator.EplbCommunicator.set_stream": ["self", "stream"],
}

_lock = threading.Lock()
_state: dict[str, Any] = {"layer_loop": True}


def _interface_problems(ec: Any, es: Any, pol: Any, rx: Any, cp: Any) -> list[str]:
    """What of vLLM differs from the interfaces this module was written against (empty: none)."""
    mods = {"eplb_communicator": ec, "rebalance_execute": rx, "policy": pol}
    problems = signature_problems("vllm.distributed.eplb", mods, _EXPECTED_PARAMS)
    base = getattr(ec, "EplbCommunicator", None)
    if base is not None:
        abstract = set(getattr(base, "__abstractmethods__", ()))
        if abstract != {"add_send", "add_recv", "execute"}:
            problems.append(f"EplbCommunicator's abstract methods are {sorted(abstract)}")
        if not isinstance(
            inspect.getattr_static(base, "needs_profile_buffer_reservation", None), property
        ):
            problems.append("EplbCommunicator.needs_profile_buffer_reservation is not a property")
    if not isinstance(getattr(pol, "EPLB_POLICIES", None), dict):
        problems.append("vllm.distributed.eplb.policy.EPLB_POLICIES is not a dict")
    for name, mod in (("create_eplb_communicator", ec), ("rearrange_expert_weights_inplace", rx)):
        bound = getattr(es, name, None)
        if bound is None or unwrapped(bound) is not unwrapped(getattr(mod, name, None)):
            problems.append(f"vllm.distributed.eplb.eplb_state does not use {mod.__name__}.{name}")
    cfg = getattr(cp, "EPLBConfig", None)
    fields = getattr(cfg, "__dataclass_fields__", {})
    for f in ("policy", "communicator"):
        if f not in fields or _literal_values(fields[f].type) is None:
            problems.append(f"vllm.config.parallel.EPLBConfig.{f} is not a Literal field")
    return problems


def _literal_values(tp: Any) -> tuple[tuple[Any, ...], bool] | None:
    """(values, optional) of ``Literal[...]`` or ``Literal[...] | None``; None otherwise."""
    import typing

    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp), False
    args = typing.get_args(tp)
    lits = [a for a in args if typing.get_origin(a) is typing.Literal]
    if len(lits) == 1 and len(args) == 2 and type(None) in args:
        return typing.get_args(lits[0]), True
    return None


def _accept_name(cp: Any, field: str, name: str) -> bool:
    """Let EPLBConfig.<field> (and ParallelConfig, which nests it) accept ``name``."""
    import typing

    cls = cp.EPLBConfig
    lit = _literal_values(cls.__dataclass_fields__[field].type)
    if lit is None:  # _interface_problems refuses such a vLLM before this runs
        raise RuntimeError(f"vllm.config.parallel.EPLBConfig.{field} is not a Literal field")
    values, optional = lit
    if name in values:
        return False
    tp: Any = typing.Literal.__getitem__((*values, name))  # Literal[*values, name], at runtime
    if optional:
        tp = tp | None
    cls.__dataclass_fields__[field].type = tp
    cls.__annotations__[field] = tp
    return True


def _rebuild(cp: Any) -> None:
    import pydantic

    pydantic.dataclasses.rebuild_dataclass(cp.EPLBConfig, force=True)
    pydantic.dataclasses.rebuild_dataclass(cp.ParallelConfig, force=True)


def _factory_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_eplb_communicator(
        group_coordinator: Any, backend: str, expert_weights: Any, expert_buffer: Any
    ) -> Any:
        if backend == BACKEND:
            return create_communicator(group_coordinator, expert_weights, expert_buffer)
        if backend == BACKEND_IPC:
            return create_communicator(
                group_coordinator, expert_weights, expert_buffer, transport="ipc"
            )
        return original(group_coordinator, backend, expert_weights, expert_buffer)

    create_eplb_communicator.__doc__ = (
        f"vLLM's factory, plus backends {BACKEND!r} and {BACKEND_IPC!r} "
        "(eplb_pynccl.integrations.vllm.create_communicator)."
    )
    setattr(create_eplb_communicator, ORIGINAL, original)
    return create_eplb_communicator


def _loop_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def rearrange(
        old_global_expert_indices: Any,
        new_global_expert_indices: Any,
        expert_weights: Any,
        expert_buffer: Any,
        ep_group: Any,
        communicator: Any,
        is_profile: bool = False,
        rank_mapping: dict[int, int] | None = None,
    ) -> Any:
        fn = original
        if (
            _state["layer_loop"]
            and isinstance(communicator, _CommunicatorImpl)
            and communicator._ipc is None
        ):
            fn = rearrange_expert_weights_inplace
        return fn(
            old_global_expert_indices,
            new_global_expert_indices,
            expert_weights,
            expert_buffer,
            ep_group,
            communicator,
            is_profile,
            rank_mapping,
        )

    rearrange.__name__ = rearrange.__qualname__ = "rearrange_expert_weights_inplace"
    rearrange.__doc__ = (
        "vLLM's layer loop, or eplb_pynccl's ExpertShuffler when the communicator is "
        "eplb_pynccl's NCCL or CPU one (the IPC one keeps vLLM's loop)."
    )
    setattr(rearrange, ORIGINAL, original)
    return rearrange


def register(*, layer_loop: bool | None = None) -> None:
    """Make eplb_pynccl selectable in vLLM by name; idempotent (a second call patches nothing).

    Patches, in this process only, after checking that vLLM's interfaces are the ones this
    module was written for (vLLM 0.33.0; on a version whose interfaces differ it raises
    RuntimeError naming each difference and patches nothing; on another version with the
    same interfaces it warns and patches):

    1. ``vllm.distributed.eplb.policy.EPLB_POLICIES[POLICY] = MigrationAwareEplbPolicy``;
    2. ``vllm.distributed.eplb.eplb_communicator.create_eplb_communicator`` and the name
       ``eplb_state`` imported from it: backends ``BACKEND`` and ``BACKEND_IPC`` go to
       :func:`create_communicator` (``transport="nccl"`` / ``"ipc"``), every other backend to
       vLLM's factory;
    3. ``vllm.distributed.eplb.eplb_state.rearrange_expert_weights_inplace`` (vLLM's
       synchronous rearrangement): :func:`rearrange_expert_weights_inplace` when the
       communicator is ours and not the IPC one, vLLM's loop otherwise (``layer_loop=False``, or
       ``$EPLB_PYNCCL_VLLM_LAYER_LOOP=vllm``, keeps vLLM's loop for ours too);
    4. ``vllm.config.parallel.EPLBConfig``'s ``policy`` and ``communicator`` Literal types
       gain ``"eplb_pynccl"``, and ``communicator`` ``"eplb_pynccl_ipc"`` too (pydantic
       schemas of EPLBConfig and ParallelConfig rebuilt).

    vLLM loads it in every process as a ``vllm.general_plugins`` entry point (:func:`plugin`).
    Call it yourself before making an ``EPLBConfig`` with these names in a process where vLLM
    has not loaded its plugins yet (e.g. before ``vllm.LLM(...)``).
    """
    if layer_loop is None:
        env = os.environ.get(LAYER_LOOP_ENV, "eplb_pynccl").strip().lower()
        if env not in ("eplb_pynccl", "vllm"):
            raise ValueError(f"{LAYER_LOOP_ENV}={env!r}: expected 'eplb_pynccl' or 'vllm'")
        layer_loop = env == "eplb_pynccl"
    with _lock:
        _state["layer_loop"] = bool(layer_loop)
        vllm, ec, es, pol, rx, cp = _vllm_modules()
        patched = (
            hasattr(ec.create_eplb_communicator, ORIGINAL)
            and hasattr(es.create_eplb_communicator, ORIGINAL)
            and hasattr(es.rearrange_expert_weights_inplace, ORIGINAL)
            and pol.EPLB_POLICIES.get(POLICY) is _policy_class()
        )
        if patched:
            return
        _check_vllm(vllm, ec, es, pol, rx, cp)
        _patch(ec, es, pol, cp)


def _check_vllm(vllm: Any, ec: Any, es: Any, pol: Any, rx: Any, cp: Any) -> None:
    """RuntimeError (nothing patched) where vLLM's interfaces differ from the ones this module
    was written for; a RuntimeWarning, for :func:`register`'s caller, where only the version
    does."""
    version = getattr(vllm, "__version__", "unknown")
    problems = _interface_problems(ec, es, pol, rx, cp)
    if problems:
        raise RuntimeError(
            f"eplb_pynccl.integrations.vllm was written for vLLM {', '.join(TESTED_VLLM_VERSIONS)}; "
            f"vLLM {version} differs: " + "; ".join(problems) + ". Nothing was patched."
        )
    if version not in TESTED_VLLM_VERSIONS:
        warnings.warn(
            f"eplb_pynccl.integrations.vllm is tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}; "
            f"vLLM {version} has the same interfaces, patching it",
            RuntimeWarning,
            stacklevel=3,  # register()'s caller
        )


def _patch(ec: Any, es: Any, pol: Any, cp: Any) -> None:
    """register()'s patches 1-4, each made once."""
    changed = [
        _accept_name(cp, "policy", POLICY),
        _accept_name(cp, "communicator", BACKEND),
        _accept_name(cp, "communicator", BACKEND_IPC),
    ]
    if any(changed):
        _rebuild(cp)
    pol.EPLB_POLICIES[POLICY] = _policy_class()
    if not hasattr(ec.create_eplb_communicator, ORIGINAL):
        ec.create_eplb_communicator = _factory_wrapper(ec.create_eplb_communicator)
    es.create_eplb_communicator = ec.create_eplb_communicator
    if not hasattr(es.rearrange_expert_weights_inplace, ORIGINAL):
        es.rearrange_expert_weights_inplace = _loop_wrapper(es.rearrange_expert_weights_inplace)


def plugin() -> None:
    """The ``vllm.general_plugins`` entry point: :func:`register`, except that on a vLLM whose
    interfaces differ it logs register's message and leaves vLLM as it is (every vLLM user
    with this package installed loads the plugin, also those who never select it)."""
    try:
        register()
    except RuntimeError as e:
        _log.warning("%s", e)
        warnings.warn(str(e), RuntimeWarning, stacklevel=2)
