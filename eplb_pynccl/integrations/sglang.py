"""eplb_pynccl inside SGLang's EPLB (SGLang 0.5.23): its weight update and, optionally, its policy.

SGLang is imported only inside the functions below, never by ``import eplb_pynccl``; this
module itself imports without SGLang.

:func:`install` replaces, in this process, the module-level functions of
``sglang.srt.eplb.expert_location_updater`` that SGLang looks up at call time:

* ``_update_expert_weights_raw`` (every layer of an update; called by
  ``ExpertLocationUpdater.update`` and by its canary variant): all the layers go through one
  :class:`~eplb_pynccl.ExpertShuffler`, in rounds of whole layers within a bounded staging
  buffer (default a quarter of one layer; an update where a layer needs more is split into
  steps that each fit, see :func:`split_maps` and :func:`install`), instead of SGLang's
  one-layer-at-a-time P2P with a whole layer of temp buffers. Returns SGLang's
  ``{layer_id: [missing logical ids]}`` (empty: no rank is missing).
* ``update_expert_weights_single_layer`` (one layer; SGLang's own updater test calls it
  directly): the same for one layer. Returns SGLang's value: ``None``, or with
  ``debug=True`` a list of log lines (ours, describing what moved). ``temp_buffers`` is not
  used (the shuffler stages within its own bound).
* ``ExpertLocationUpdater.update``: SGLang's own method (it still updates the metadata);
  only its first call's ``torch.get_device_module().empty_cache()`` is skipped where the
  device module has none (CPU torch), so the updater runs on CPU processes too.

and, with ``policy="migration_aware"``, ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``:
:func:`eplb_pynccl.rebalance` fed with the current map (SGLang's global expert location
metadata), which keeps most experts where they are within :data:`POLICY_SLACK` of DeepSeek's
balance per layer; the same three
outputs as SGLang's (``physical_to_logical_map`` ``[layers, physical]``,
``logical_to_all_physical_map`` ``[layers, logical, max replicas]`` padded with -1,
``expert_count`` ``[layers, logical]``; int64 CPU tensors).

SGLang's maps are used as given: slot ``s`` of ``physical_to_logical_map`` is row
``s % num_local_physical_experts`` on rank ``s // num_local_physical_experts``. SGLang moves
weights between WORLD ranks and passes its TP rank as the WORLD peer; so does this module
(the ``rank`` argument must be this process's WORLD rank, and the maps' ranks the WORLD's).

Transports (made once per process, on the first update, and reused): ``"torch"``:
:class:`~eplb_pynccl.TorchTransport` on the WORLD group (gloo moves CPU weights, and CUDA
ones staged through the host); ``"nccl"``: an eplb_pynccl :class:`~eplb_pynccl.Communicator`
of the WORLD's ranks (its unique id shared over a gloo group made once); ``"ipc"``:
:class:`~eplb_pynccl.IpcTransport` (copy engines between the GPUs of a node, set up over the
same gloo group; the communicator carries peers on other nodes); ``"auto"``: ``"torch"`` for
CPU weights, ``"nccl"`` for CUDA ones.

With SGLang's elastic EP and a rank marked inactive, the update is SGLang's own (it drops
the dead ranks' transfers and reports what is missing); eplb_pynccl needs every rank.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from .._deadline import process_alive
from ..errors import RearrangeError
from ..transport import Transport
from ._world import ORIGINAL, nccl_communicator, signature_problems

__all__ = [
    "POLICIES",
    "TESTED_SGLANG_VERSIONS",
    "TRANSPORTS",
    "install",
    "installed",
    "plugin",
    "uninstall",
]

TESTED_SGLANG_VERSIONS = ("0.5.23",)
TRANSPORTS = ("auto", "nccl", "ipc", "torch")
POLICIES = (None, "migration_aware")
ENV = "EPLB_PYNCCL_SGLANG"  # plugin(): a transport name (or "1" for auto); unset: do nothing
POLICY_ENV = "EPLB_PYNCCL_SGLANG_POLICY"
# policy="migration_aware": each layer's imbalance target is DeepSeek's on the same loads
# times this (the bound: <= 1.01x DeepSeek's imbalance)
POLICY_SLACK = 1.01
_CACHE_SIZE = 8  # shufflers kept per process (one per weight set: all-layer, per-layer, canary)
_log = logging.getLogger(__name__)

# What SGLang's functions take (their parameters, in order): install() refuses a SGLang whose
# functions differ, whatever its version says.
_EXPECTED_PARAMS = {
    "expert_location_updater.update_expert_weights_single_layer": [
        "routed_experts_weights",
        "temp_buffers",
        "old_physical_to_logical_map",
        "new_physical_to_logical_map",
        "num_local_physical_experts",
        "num_gpu_per_node",
        "rank",
        "world_size",
        "missing_logical_experts_info",
        "debug",
        "log_metrics",
    ],
    "expert_location_updater._update_expert_weights_raw": [
        "routed_experts_weights_of_layer",
        "old_expert_location_metadata",
        "new_expert_location_metadata",
        "update_layer_ids",
        "nnodes",
        "rank",
    ],
    "expert_location_updater.ExpertLocationUpdater.update": [
        "self",
        "routed_experts_weights_of_layer",
        "new_expert_location_metadata",
        "update_layer_ids",
        "nnodes",
        "rank",
        "use_flat_topology",
    ],
    "eplb_algorithms.rebalance_experts": [
        "tokens_per_expert",
        "num_physical_experts",
        "num_local_physical_experts",
        "num_groups",
        "num_nodes",
        "algorithm",
    ],
}
_METADATA_FIELDS = ("physical_to_logical_map_cpu", "ep_size")

_lock = threading.RLock()
_state: dict[str, Any] = {"config": None, "originals": None}
_world: dict[Any, Any] = {}  # transports and the set-up group, made once per process
_shufflers: collections.OrderedDict = collections.OrderedDict()


# ---- SGLang's modules ----------------------------------------------------------------------


def _sglang_modules():
    try:
        import sglang
        import sglang.srt.eplb.eplb_algorithms as algos
        import sglang.srt.eplb.expert_location as loc
        import sglang.srt.eplb.expert_location_updater as upd
    except ImportError as e:
        raise ImportError(
            "eplb_pynccl.integrations.sglang needs SGLang (tested with "
            f"{', '.join(TESTED_SGLANG_VERSIONS)}); importing it failed: {e}"
        ) from e
    return sglang, upd, algos, loc


def _version(sglang) -> str:
    v = getattr(sglang, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version("sglang")
        except Exception:  # noqa: BLE001 - no metadata: the version is unknown
            v = "unknown"
    return str(v)


def _interface_problems(upd, algos, loc) -> list[str]:
    mods = {"expert_location_updater": upd, "eplb_algorithms": algos}
    problems = signature_problems("sglang.srt.eplb", mods, _EXPECTED_PARAMS)
    fields = getattr(getattr(loc, "ExpertLocationMetadata", None), "__dataclass_fields__", {})
    for f in _METADATA_FIELDS:
        if f not in fields:
            problems.append(f"sglang.srt.eplb.expert_location.ExpertLocationMetadata has no {f}")
    if not callable(getattr(loc, "get_global_expert_location_metadata", None)):
        problems.append(
            "sglang.srt.eplb.expert_location.get_global_expert_location_metadata is missing"
        )
    return problems


# ---- install / uninstall -------------------------------------------------------------------


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not np.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    return float(timeout)


def _check_args(transport, policy, timeout, staging_bytes) -> dict:
    """install()'s arguments checked (no SGLang needed): the configuration, or an error
    naming the argument."""
    if not isinstance(transport, str):
        raise TypeError(
            f"transport must be a str, one of {TRANSPORTS}, got {type(transport).__name__}"
        )
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if policy is not None and not isinstance(policy, str):
        raise TypeError(f"policy must be None or 'migration_aware', got {type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be None or 'migration_aware', got {policy!r}")
    timeout = _check_timeout(timeout)
    if staging_bytes is not None:
        if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, (int, np.integer)):
            raise TypeError(
                f"staging_bytes must be None or an int, got {type(staging_bytes).__name__}"
            )
        if staging_bytes < 0:
            raise ValueError(f"staging_bytes must be >= 0, got {staging_bytes}")
        staging_bytes = int(staging_bytes)
    return {
        "transport": transport,
        "policy": policy,
        "timeout": timeout,
        "staging_bytes": staging_bytes,
    }


def install(
    *,
    transport: str = "auto",
    policy: str | None = None,
    timeout: float | None = None,
    staging_bytes: int | None = None,
) -> None:
    """Make SGLang's EPLB weight update (and with ``policy``, its rebalance) eplb_pynccl's.

    Args:
        transport: ``"auto"`` (CPU weights: ``"torch"``; CUDA weights: ``"nccl"``),
            ``"nccl"``, ``"ipc"`` or ``"torch"`` (see the module docstring).
        policy: None (SGLang's algorithms) or ``"migration_aware"``
            (``rebalance_experts`` returns :func:`eplb_pynccl.rebalance`'s placement, fed
            with the current map).
        timeout: seconds any wait of an update may take (default ``$EPLB_PYNCCL_TIMEOUT`` or
            600); past it the transport is aborted and the update raises
            :class:`~eplb_pynccl.RearrangeError`.
        staging_bytes: bound on the extra memory of an update (default: a quarter of the
            largest layer's local experts). Rounds pack as many whole layers as fit. Rounds
            hold whole layers, so a rank that receives k changed rows of one layer stages k
            rows: where that exceeds the bound, the update is split into steps (each a
            transactional rearrangement of at most bound // row changed rows per rank and
            layer, every expert still held between steps; :func:`split_maps`), so a
            failure may leave a layer between the old and the new placement (the
            RearrangeError names such layers). A step that still needs more (rare: row
            indices, a cycle with no helper slot) gets the least it needs. Fewer, larger
            rounds are faster over gloo: a larger bound trades memory for time. CPU weights
            move with torch's intra-op threads set to 1 during the update (restored after):
            the copies are memory bound, and threads on cores that the other ranks share
            made each one wait for the scheduler. Over gloo they are sent straight from the
            rows (``pack_threshold=0``: no staging on the sending side, so the bound holds
            received rows only).

    Call it in every SGLang process that holds expert weights (the scheduler processes),
    before the first update; or let SGLang's plugin loader call :func:`plugin`. Raises
    RuntimeError, patching nothing, on a SGLang version other than
    :data:`TESTED_SGLANG_VERSIONS` or one whose functions differ. A second call replaces the
    configuration (the transports made so far are kept when ``transport`` and ``timeout``
    are unchanged).
    """
    cfg = _check_args(transport, policy, timeout, staging_bytes)
    with _lock:
        sglang, upd, algos, loc = _sglang_modules()
        _check_sglang(sglang, upd, algos, loc)
        old = _state["config"]
        if old is not None and (old["transport"], old["timeout"]) != (
            cfg["transport"],
            cfg["timeout"],
        ):
            _drop_world()
        if _state["originals"] is None:
            _state["originals"] = {
                "single": upd.update_expert_weights_single_layer,
                "raw": upd._update_expert_weights_raw,
                "update": upd.ExpertLocationUpdater.update,
                "rebalance": algos.rebalance_experts,
            }
        _state["config"] = cfg
        _patch(upd, algos, _state["originals"], cfg["policy"])


def _check_sglang(sglang, upd, algos, loc) -> None:
    """RuntimeError (nothing patched) on a SGLang version this module was not tested with,
    or one whose EPLB functions take other parameters."""
    version = _version(sglang)
    if version not in TESTED_SGLANG_VERSIONS:
        raise RuntimeError(
            "eplb_pynccl.integrations.sglang supports SGLang "
            f"{', '.join(TESTED_SGLANG_VERSIONS)}; this is SGLang {version}, whose EPLB "
            "updater it has not been checked against. Nothing was patched."
        )
    problems = _interface_problems(upd, algos, loc)
    if problems:
        raise RuntimeError(
            f"eplb_pynccl.integrations.sglang: SGLang {version}'s EPLB functions differ from "
            "the ones this module was written for: "
            + "; ".join(problems)
            + ". Nothing was patched."
        )


def _patch(upd, algos, orig: dict, policy: str | None) -> None:
    """SGLang's update functions (and with ``policy``, its rebalance) replaced by ours;
    ``orig``: SGLang's own."""
    # SGLang's own update where elastic EP marks a rank inactive (it drops the dead
    # ranks' transfers and reports what is missing; eplb_pynccl needs every rank), and its
    # own elasticity-aware algorithms
    upd.update_expert_weights_single_layer = _wrap(
        update_expert_weights_single_layer, orig["single"], _elastic_inactive
    )
    upd._update_expert_weights_raw = _wrap(
        update_expert_weights_raw, orig["raw"], _elastic_inactive
    )
    upd.ExpertLocationUpdater.update = _update_wrapper(orig["update"])
    algos.rebalance_experts = (
        _wrap(rebalance_experts, orig["rebalance"], _elasticity_algorithm)
        if policy == "migration_aware"
        else orig["rebalance"]
    )


def installed() -> dict | None:
    """The configuration :func:`install` put in force (a copy), or None."""
    cfg = _state["config"]
    return None if cfg is None else dict(cfg)


def uninstall() -> None:
    """Put SGLang's own functions back and drop this module's transports and shufflers (an
    IPC transport is closed; a NCCL communicator is aborted: no collective). Idempotent."""
    with _lock:
        orig = _state["originals"]
        if orig is not None:
            _, upd, algos, _ = _sglang_modules()
            upd.update_expert_weights_single_layer = orig["single"]
            upd._update_expert_weights_raw = orig["raw"]
            upd.ExpertLocationUpdater.update = orig["update"]
            algos.rebalance_experts = orig["rebalance"]
        _state["originals"] = None
        _state["config"] = None
        _drop_world()


def plugin() -> None:
    """SGLang's general plugin (entry point group ``sglang.srt.plugins``, loaded by every
    SGLang process): :func:`install` when ``$EPLB_PYNCCL_SGLANG`` names a transport
    (``auto``, ``nccl``, ``ipc``, ``torch``; ``1`` means ``auto``), with
    ``$EPLB_PYNCCL_SGLANG_POLICY`` (``migration_aware``) as the policy; unset, nothing is
    patched. An install that fails (another SGLang version) is logged and leaves SGLang as
    it is."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "0", "off", "none"):
        return
    transport = "auto" if value in ("1", "on", "true", "yes") else value
    policy = os.environ.get(POLICY_ENV, "").strip().lower() or None
    try:
        install(transport=transport, policy=policy)
    except (RuntimeError, ValueError, TypeError, ImportError) as e:
        _log.warning("eplb_pynccl SGLang plugin: not installed: %s", e)


def _wrap(ours, original, use_original=None):
    """``ours`` in place of SGLang's ``original`` (same signature); SGLang's own where
    ``use_original(arguments by name)`` says so."""
    sig = inspect.signature(original)

    def call(*args, **kwargs):
        if use_original is not None and use_original(sig.bind(*args, **kwargs).arguments):
            return original(*args, **kwargs)
        return ours(*args, **kwargs)

    call.__name__ = call.__qualname__ = original.__name__
    call.__doc__ = f"eplb_pynccl's {original.__name__} (eplb_pynccl.integrations.sglang)."
    call.__signature__ = sig
    setattr(call, ORIGINAL, original)
    return call


def _update_wrapper(original):
    def update(self, *args, **kwargs):
        if getattr(self, "_first_execution", False):
            torch = _torch()
            if not callable(getattr(torch.get_device_module(), "empty_cache", None)):
                # CPU torch: nothing to empty; SGLang's first call would raise here
                self._first_execution = False
        return original(self, *args, **kwargs)

    update.__name__ = update.__qualname__ = "update"
    update.__doc__ = original.__doc__
    update.__signature__ = inspect.signature(original)
    setattr(update, ORIGINAL, original)
    return update


def _torch():
    import torch

    return torch


def _config() -> dict:
    cfg = _state["config"]
    if cfg is None:
        raise RuntimeError("eplb_pynccl.integrations.sglang is not installed (call install())")
    return cfg


# ---- transports ------------------------------------------------------------------------------


def _is_ipc(t) -> bool:
    return type(t).__name__ == "IpcTransport"


def _close_ipc(t) -> None:
    """Close ``t`` if it is an IpcTransport: dropping, best effort, whatever it raises (the
    close is local; a communicator under it is shared and left open)."""
    if _is_ipc(t):
        with contextlib.suppress(Exception):
            t.close()


def _drop_ipc(t) -> None:
    """Forget and close the IpcTransport of a dropped weight set (other transports are
    shared by every weight set and stay)."""
    if not _is_ipc(t):
        return
    for k in [k for k, v in _world.items() if v is t]:
        del _world[k]
    _close_ipc(t)


def _drop_world() -> None:
    for t in list(_world.values()):  # dropping: best effort, whatever each one raises
        _close_ipc(t)
        comm = getattr(t, "comm", None)
        if comm is not None and hasattr(comm, "abort"):
            with contextlib.suppress(Exception):
                comm.abort()
    _world.clear()
    _shufflers.clear()


def _dist():
    torch = _torch()
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "SGLang's expert update through eplb_pynccl needs torch.distributed initialised "
            "(SGLang's WORLD group)"
        )
    return dist


def _setup_group():
    """A gloo group of the WORLD's ranks for set-up exchanges (made once: collective)."""
    g = _world.get("setup_group")
    if g is None:
        dist = _dist()
        g = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _world["setup_group"] = g
    return g


def _setup_transport(timeout):
    from ..transport import TorchTransport

    t = _world.get("setup")
    if t is None:
        t = _world["setup"] = TorchTransport(_setup_group(), timeout=timeout)
    return t


def _peer_table(timeout) -> list[tuple[str, int]]:
    """(host name, pid) of every WORLD rank, exchanged once: a failed update names the ranks
    on this host whose process is gone."""
    tab = _world.get("peers")
    if tab is None:
        me = f"{socket.gethostname()}\0{os.getpid()}".encode()[:240].ljust(256, b"\0")
        got = _setup_transport(timeout).all_gather_bytes(me)
        tab = []
        for b in got:
            host, pid = b.rstrip(b"\0").split(b"\0")
            tab.append((host.decode(), int(pid)))
        _world["peers"] = tab
    return tab


def _nccl_comm(device, timeout):
    comm = _world.get("comm")
    if comm is None:
        setup = _setup_transport(timeout)
        comm = _world["comm"] = nccl_communicator(setup, "WORLD rank 0", device, timeout=timeout)
    return comm


def _transport(device, ranks_per_node: int, weight_set: tuple = ()) -> Transport:
    """This process's transport for weights on ``device`` (made once, then reused). An
    IpcTransport exports one weight set (``register_buffers``), so over IPC each weight set
    (``weight_set``: the shuffler's key) has its own, closed when its shuffler is dropped."""
    cfg = _config()
    kind = cfg["transport"]
    if kind == "auto":
        kind = "nccl" if device.type == "cuda" else "torch"
    key = (kind, str(device)) + ((ranks_per_node, weight_set) if kind == "ipc" else ())
    t = _world.get(key)
    if t is not None:
        return t
    timeout = cfg["timeout"]
    _peer_table(timeout)
    if kind == "torch":
        from ..transport import TorchTransport

        t = TorchTransport(None, timeout=timeout)
    elif kind == "nccl":
        from ..transport import NcclTransport

        if device.type != "cuda":
            raise ValueError(f"transport='nccl' moves CUDA weights; these are on {device}")
        t = NcclTransport(_nccl_comm(device, timeout))
    else:
        from ..ipc import IpcTransport

        if device.type != "cuda":
            raise ValueError(f"transport='ipc' moves CUDA weights; these are on {device}")
        setup = _setup_transport(timeout)
        comm = _nccl_comm(device, timeout) if ranks_per_node < setup.world_size else None
        t = IpcTransport(
            setup=setup,
            communicator=comm,
            device=device,
            ranks_per_node=ranks_per_node,
            timeout=timeout,
        )
    _world[key] = t
    return t


# ---- the update --------------------------------------------------------------------------------


def _shuffler(device, weights, ranks_per_node: int):
    """The shuffler of this weight set (made once, then reused: on IPC its construction is
    collective). Its staging bound is set per update (:func:`_bound`)."""
    from ..shuffler import ExpertShuffler

    weight_set = tuple(
        (t.data_ptr(), tuple(t.shape), t.dtype, str(t.device)) for ws in weights for t in ws
    )
    transport = _transport(device, ranks_per_node, weight_set)
    key = (id(transport), ranks_per_node, weight_set)
    sh = _shufflers.get(key)
    if sh is None:
        sh = ExpertShuffler(
            transport,
            weights,
            staging_bytes=_quarter(weights),
            ranks_per_node=ranks_per_node,
            **_host_options(transport, weights),
        )
        _shufflers[key] = sh
        while len(_shufflers) > _CACHE_SIZE:  # the same calls on every rank: the same drops
            _, dropped = _shufflers.popitem(last=False)
            _drop_ipc(dropped.transport)
    else:
        _shufflers.move_to_end(key)
    return sh


def _host_options(transport, weights) -> dict:
    """CPU weights over a host exchange (gloo): nothing packed. gloo sends a run of rows
    straight from the weights; packing would stage the sent rows too, inside the same bound,
    so a round would carry fewer rows and the update take more rounds (each a few ms of
    host latency on busy cores, whatever its size; bench ``sglang``)."""
    if getattr(transport, "host_exchange", False) and weights[0][0].device.type == "cpu":
        return {"pack_threshold": 0}
    return {}


def _quarter(weights) -> int:
    """A quarter of the largest layer's local experts (all its tensors): a quarter of
    SGLang's temp buffers."""
    return max(sum(t.nbytes for t in ws) for ws in weights) // 4


def _need(sh, old, new, bound: int) -> int | None:
    """None when the update's schedule fits ``bound``; otherwise the staging it needs (the
    schedule's ``required``; the same on every rank: the schedule is pure). Bad maps: None
    (``rearrange()`` then refuses them, naming the argument)."""
    sh.staging_bytes = bound
    try:
        sh.schedule(sh.plan(old, new))
    except ValueError as e:
        return getattr(e, "required", None)
    return None


def split_maps(old, new, per_rank: int, quota: int) -> list:
    """Maps from ``old`` to ``new`` (``[layers, physical]``) in steps that each change at most
    ``quota`` slots of every rank in every layer: the maps after each step, the last one
    ``new``. Every map holds every expert that ``new`` holds in the layer and ``old`` does
    (a step never takes the last copy of one away), so every step's rows have a source.
    Where every change left in a layer would take a last copy away (cycles of single
    copies), a helper slot whose expert is held twice takes a copy of one of them for a
    while (two rows more to move) and gives it back later; without a helper, the cycle
    moves whole in one step, over the quota if it must. Pure: the same steps on every
    rank."""
    cur = np.array(old, dtype=np.int64, copy=True)
    new = np.asarray(new, dtype=np.int64)
    size = int(max(cur.max(initial=0), new.max(initial=0))) + 1
    changed = int((cur != new).reshape(len(cur), -1, per_rank).sum(-1).max(initial=0))
    cap = 4 * (changed + 2) + 16  # steps; past it the rest goes in one (never reached in tests)
    out: list = []
    while True:
        todo = [np.flatnonzero(cur[layer] != new[layer]) for layer in range(len(cur))]
        if not any(d.size for d in todo):
            return out
        if len(out) >= cap:
            out.append(new.copy())
            return out
        nxt = cur.copy()
        for layer, d in enumerate(todo):
            if d.size:
                for slot, expert in _step_slots(cur[layer], new[layer], d, per_rank, quota, size):
                    nxt[layer, slot] = expert
        cur = nxt
        out.append(cur.copy())


def _step_slots(cur, new, todo, per_rank: int, quota: int, size: int) -> list:
    """One layer's (slot, expert) changes in this step (see :func:`split_maps`)."""
    count = np.bincount(cur, minlength=size)
    needed = np.bincount(new, minlength=size) > 0  # experts the end placement holds
    used: collections.Counter = collections.Counter()
    picked: list = []
    taken = set(int(x) for x in todo)  # slots that may not serve as helpers
    left = [int(x) for x in todo]

    def take(slot: int, expert: int) -> None:
        count[cur[slot]] -= 1
        count[expert] += 1
        used[slot // per_rank] += 1
        picked.append((slot, expert))

    while left:
        grew = True
        while grew and left:
            grew = False
            keep = []
            for slot in left:
                if used[slot // per_rank] < quota and (
                    count[cur[slot]] > 1 or not needed[cur[slot]]
                ):
                    take(slot, int(new[slot]))
                    grew = True
                else:
                    keep.append(slot)
            left = keep
        # what is left takes last copies away (or waits for its rank's quota): break a
        # cycle through a helper where a slot of it has its rank's quota left
        s0 = next((x for x in left if used[x // per_rank] < quota), None)
        if s0 is None or any(count[cur[x]] > 1 or not needed[cur[x]] for x in left):
            break
        r0 = s0 // per_rank

        def room(h: int) -> bool:  # the helper's rank has quota left (two if it is s0's)
            r = h // per_rank
            return used[r] + (2 if r == r0 else 1) <= quota

        helper = next(
            (h for h in range(len(cur)) if h not in taken and count[cur[h]] > 1 and room(h)),
            None,
        )
        if helper is None:
            break
        taken.add(helper)
        take(helper, int(cur[s0]))  # a second copy of s0's expert, for a while
        take(s0, int(new[s0]))
        left.remove(s0)
    return picked if picked else _whole_cycle(cur, new, left)


def _whole_cycle(cur, new, left: list) -> list:
    """No helper: one cycle of ``left`` (slot -> the slot that receives the expert it gives
    up), followed from its first slot, as (slot, expert) changes that move it whole."""
    gives = {int(new[t]): t for t in left}
    cycle = [left[0]]
    while True:
        nxt = gives[int(cur[cycle[-1]])]
        if nxt == cycle[0]:
            return [(t, int(new[t])) for t in cycle]
        cycle.append(nxt)


def _plan_steps(sh, weights, old, new, bound: int) -> list:
    """The maps of this update's steps: ``[new]`` when it fits ``bound``, else those of
    :func:`split_maps`, as many changed rows per rank and layer as fit ``bound`` (one fewer
    when the first step does not fit: row indices and alignment take a little)."""
    if _need(sh, old, new, bound) is None:
        return [new]
    per = weights[0][0].shape[0]
    row = max(sum(t[0].nbytes for t in ws) for ws in weights) if per else 1
    quota = max(1, bound // max(row, 1))
    maps = split_maps(old, new, per, quota)
    if quota > 1 and _need(sh, old, maps[0], bound) is not None:
        maps = split_maps(old, new, per, quota - 1)
    return maps


def _step(sh, a, b, bound: int, first: bool):
    """One step's rearrangement within ``bound``, or where it needs more, the least it
    needs (the schedule refuses before anything moves, on every rank alike: pure). Steps
    after the first are not verified again: they are a pure function of the verified maps."""
    sh.staging_bytes = bound
    verify = None if first else False
    try:
        return sh.rearrange(a, b, verify=verify)
    except ValueError as e:
        need = getattr(e, "required", None)
        if need is None:
            raise
    sh.staging_bytes = need
    return sh.rearrange(a, b, verify=False)


def _combined(stats: list):
    """One RearrangeStats for the steps of an update: sums, and the peak of the largest."""
    from dataclasses import fields

    from ..shuffler import RearrangeStats

    total = RearrangeStats()
    for f in fields(RearrangeStats):
        vals = [getattr(st, f.name) for st in stats]
        if f.name in ("peak_extra_bytes", "staging_bound", "table_bytes"):
            setattr(total, f.name, max(vals))
        elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            setattr(total, f.name, sum(vals))
        elif isinstance(vals[0], list):
            setattr(total, f.name, [x for v in vals for x in v])
        elif isinstance(vals[0], str):
            setattr(total, f.name, vals[-1])
    total.layers_changed = sorted(set(total.layers_changed))
    return total


@contextlib.contextmanager
def _one_thread(device):
    """CPU weights: torch's intra-op threads off during the update. Its copies are memory
    bound; split over threads on cores the other ranks already use, each copy of a run of
    rows waits for descheduled threads (measured: 4 gloo ranks on 2 cores, ~11 ms per
    200 KB copy instead of ~30 us; updates 10x slower than SGLang's)."""
    if device.type != "cpu":
        yield
        return
    torch = _torch()
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _elasticity_algorithm(args) -> bool:
    """``rebalance_experts`` was asked for one of SGLang's elasticity-aware algorithms."""
    algorithm = args.get("algorithm")
    return "elasticity" in getattr(algorithm, "name", str(algorithm))


def _elastic_inactive(args=None) -> bool:
    """SGLang's elastic EP is on and some rank is marked inactive."""
    try:
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    except ImportError:
        return False
    st = ElasticEPStateManager.instance()
    if st is None:
        return False
    active = getattr(st, "active_ranks_cpu", None)
    if active is None:
        return False
    return not bool(_torch().as_tensor(active).bool().all())


def _dead_peers(peers) -> list[int]:
    """Ranks of ``peers`` on this host whose process has exited."""
    tab = _world.get("peers") or []
    host = socket.gethostname()
    return [p for p in peers if p < len(tab) and tab[p][0] == host and not process_alive(tab[p][1])]


def _rearrange(weights, old, new, ranks_per_node: int, layer_ids, rank: int):
    """Move ``weights`` (one list of tensors per layer) from ``old`` to ``new`` (int64
    ``[len(weights), num_physical]``, WORLD ranks) through the shuffler; returns its stats."""
    cfg = _config()
    dist = _dist()
    device = weights[0][0].device
    world = dist.get_world_size()
    per = weights[0][0].shape[0]
    if old.shape[1] != per * world:
        raise ValueError(
            f"the maps have {old.shape[1]} physical experts, but {world} WORLD ranks of "
            f"{per} local experts hold {per * world}: eplb_pynccl moves SGLang's experts between "
            "the WORLD's ranks, as SGLang does"
        )
    if rank != dist.get_rank():
        raise ValueError(
            f"rank {rank} (SGLang's TP rank, used by SGLang as the WORLD peer) is not this "
            f"process's WORLD rank {dist.get_rank()}"
        )
    sh = _shuffler(device, weights, ranks_per_node)
    bound = cfg["staging_bytes"]
    bound = _quarter(weights) if bound is None else bound
    t0 = time.monotonic()
    steps = _plan_steps(sh, weights, old, new, bound)
    stats: list = []
    at = old  # the placement the weights hold (every step that completed)
    try:
        with _one_thread(device):
            for b in steps:
                stats.append(_step(sh, at, b, bound, first=not stats))
                at = b
    except (ValueError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - every failure of an update: one RearrangeError
        # the step that failed leaves each layer at its start or its end (transactional)
        b = steps[len(stats)]
        at = np.array(at, copy=True)
        for i in getattr(e, "completed_layers", []):
            at[i] = b[i]
        done = [i for i in range(len(weights)) if (at[i] == new[i]).all()]
        pending = [i for i in range(len(weights)) if (at[i] == old[i]).all()]
        between = sorted(set(range(len(weights))) - set(done) - set(pending))
        peers = list(getattr(e, "peers", []) or range(world))
        dead = _dead_peers(sorted(set(range(world)) - {rank}))
        what = f"; rank(s) {dead} exited" if dead else ""
        if between:
            what += (
                f"; layers {[layer_ids[i] for i in between]} are between the old and the new "
                f"placement (step {len(stats) + 1} of {len(steps)}: every expert still held)"
            )
        raise RearrangeError(
            f"SGLang expert update on WORLD rank {rank} failed after "
            f"{time.monotonic() - t0:.1f} s{what}: {type(e).__name__}: {e}",
            [layer_ids[i] for i in done],
            [layer_ids[i] for i in pending],
            sorted(set(peers) | set(dead)),
            e,
        ) from e
    return stats[0] if len(stats) == 1 else _combined(stats)


def _as_map(m) -> np.ndarray:
    torch = _torch()
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    return np.asarray(m, dtype=np.int64)


def update_expert_weights_raw(
    routed_experts_weights_of_layer,
    old_expert_location_metadata,
    new_expert_location_metadata,
    update_layer_ids,
    nnodes,
    rank,
):
    """SGLang's ``_update_expert_weights_raw`` (same arguments and return value) through one
    :class:`~eplb_pynccl.ExpertShuffler` rearrangement of every layer in ``update_layer_ids``."""
    layer_ids = list(dict.fromkeys(int(x) for x in update_layer_ids))
    if not layer_ids:
        return {}
    dist = _dist()
    world = dist.get_world_size()
    if isinstance(nnodes, bool) or not isinstance(nnodes, int) or nnodes < 1 or world % nnodes:
        raise ValueError(
            f"nnodes must be a positive int dividing the WORLD size {world}, got {nnodes!r}"
        )
    old_all = _as_map(old_expert_location_metadata.physical_to_logical_map_cpu)
    new_all = _as_map(new_expert_location_metadata.physical_to_logical_map_cpu)
    weights = [list(routed_experts_weights_of_layer[i]) for i in layer_ids]
    _rearrange(weights, old_all[layer_ids], new_all[layer_ids], world // nnodes, layer_ids, rank)
    return {}


def update_expert_weights_single_layer(
    routed_experts_weights,
    temp_buffers,
    old_physical_to_logical_map,
    new_physical_to_logical_map,
    num_local_physical_experts,
    num_gpu_per_node,
    rank,
    world_size=None,
    missing_logical_experts_info=None,
    debug=False,
    log_metrics=False,
):
    """SGLang's ``update_expert_weights_single_layer`` (same arguments and return value: None,
    or with ``debug`` a list of log lines) through :class:`~eplb_pynccl.ExpertShuffler`.
    ``temp_buffers`` is not used."""
    weights = list(routed_experts_weights)
    bad = [tuple(t.shape) for t in weights if t.shape[0] != num_local_physical_experts]
    if bad:
        raise ValueError(
            f"routed_experts_weights must have num_local_physical_experts="
            f"{num_local_physical_experts} rows each, got shapes {bad}"
        )
    old = _as_map(old_physical_to_logical_map).reshape(1, -1)
    new = _as_map(new_physical_to_logical_map).reshape(1, -1)
    if old.shape != new.shape:
        raise ValueError(
            f"old_physical_to_logical_map has {old.shape[1]} entries, "
            f"new_physical_to_logical_map {new.shape[1]}"
        )
    stats = _rearrange([weights], old, new, int(num_gpu_per_node), [0], rank)
    line = (
        f"eplb_pynccl: rank {rank}: {stats.experts_received} experts received, "
        f"{stats.experts_sent} sent, {stats.local_copies} local copies, "
        f"{stats.bytes_received} B in, {stats.bytes_sent} B out, {stats.messages} messages, "
        f"{stats.rounds} rounds, {stats.seconds * 1e3:.2f} ms"
    )
    if log_metrics:
        logging.getLogger("sglang.srt.eplb.expert_location_updater").info(
            "[ExpertLocationUpdater] %s", line
        )
    return [line] if debug else None


# ---- the policy ---------------------------------------------------------------------------------


def _current_map(num_layers: int, num_physical: int, num_logical: int):
    """SGLang's current physical_to_logical_map when it is a placement of these experts."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
    except Exception:  # noqa: BLE001 - no SGLang runtime context: no current map
        return None
    if meta is None:
        return None
    m = _as_map(meta.physical_to_logical_map_cpu)
    if m.shape != (num_layers, num_physical):
        return None
    experts = np.arange(num_logical)
    if not all(np.isin(experts, row).all() for row in m):
        return None
    return m


def rebalance_experts(
    tokens_per_expert,
    num_physical_experts,
    num_local_physical_experts,
    num_groups,
    num_nodes,
    algorithm,
):
    """SGLang's ``rebalance_experts`` (same arguments; the same three int64 CPU tensors) from
    :func:`eplb_pynccl.rebalance`, fed with the current map. SGLang's elasticity-aware
    algorithms stay SGLang's."""
    from ..placement import rebalance

    torch = _torch()
    t = torch.as_tensor(tokens_per_expert)
    loads = (t.sum(dim=0) if t.dim() == 3 else t).detach().double().cpu().numpy()
    L, E = loads.shape
    N = int(num_physical_experts)
    ep = N // int(num_local_physical_experts)
    hierarchical = "hierarchical" in getattr(algorithm, "name", str(algorithm))
    nodes = int(num_nodes) if num_nodes else 1
    if ep % nodes:
        nodes = 1
    groups = int(num_groups) if (hierarchical and num_groups) else None
    if groups is not None and (E % groups or groups % nodes):
        groups = None
    old = _current_map(L, N, E)
    target = None
    if old is not None:
        # DeepSeek's balance per layer, within POLICY_SLACK: what the slack buys is fewer
        # slots changed (the repair stops as soon as a layer is within its target)
        ref = rebalance(loads, N, ep, num_nodes=nodes, num_groups=groups, policy="deepseek")
        target = np.maximum(1.0, np.asarray(ref.imbalance, dtype=np.float64) * POLICY_SLACK)
    res = rebalance(
        loads, N, ep, old_map=old, num_nodes=nodes, num_groups=groups, max_imbalance=target
    )
    phy = np.array(res.new_map, dtype=np.int64, copy=True)
    count = np.zeros((L, E), dtype=np.int64)
    np.add.at(count, (np.repeat(np.arange(L), N), phy.ravel()), 1)
    name = getattr(algorithm, "name", str(algorithm))
    # SGLang's vectorised algorithms pad to the most replicas possible and return int32
    # (deepseek_vec_hierarchical its physical map as int64), the others to the most replicas
    # used, int64: the same shapes and dtypes as the algorithm replaced
    vec = "vec" in name
    width = N - E + 1 if vec else int(count.max())
    dt = (
        _torch().int64 if (not vec or hierarchical) else _torch().int32,
        *([_torch().int32] * 2 if vec else [_torch().int64] * 2),
    )
    log2phy = np.full((L, E, width), -1, dtype=np.int64)
    order = np.argsort(phy, axis=1, kind="stable")  # slots of each expert, ascending
    sorted_e = np.take_along_axis(phy, order, axis=1)
    starts = np.cumsum(count, axis=1) - count
    rank_in = np.arange(N)[None, :] - np.take_along_axis(starts, sorted_e, axis=1)
    log2phy[np.repeat(np.arange(L), N), sorted_e.ravel(), rank_in.ravel()] = order.ravel()
    return tuple(torch.from_numpy(a).to(d) for a, d in zip((phy, log2phy, count), dt))
