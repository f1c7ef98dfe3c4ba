"""Expert placement for EPLB: which logical expert each physical slot holds.

:func:`rebalance` turns per-expert loads (tokens routed to each logical expert, per MoE
layer) into a placement map ``[num_layers, num_physical]`` (slot -> logical expert) in the
convention of :func:`eplb_pynccl.plan_rearrangement`: slot ``s`` lives on rank ``s // P``,
row ``s % P``, ``P = num_physical // ep_size``. A GPU's load is the sum over its slots of
``loads[layer, expert] / replicas(expert)``; a layer's *imbalance* is the largest GPU load
divided by the mean GPU load (1.0 is perfect; 1.0 too for a layer without load).

Policies
--------
``"deepseek"``
    DeepSeek's EPLB algorithm, the same map as its reference implementations (DeepSeek's
    ``eplb.py``, vLLM's ``DefaultEplbPolicy``) on every input, ties included; written here,
    vectorised over layers. Hierarchical whenever ``num_groups`` is given and ``num_nodes``
    divides it (one node with several groups included): pack the expert groups (sums of
    their loads) onto nodes, renumber the experts node by node in that order, replicate
    within each node, pack each node's replicas onto its GPUs. Otherwise the global variant
    (replicate over all slots, pack onto all GPUs). Replication: while slots are left, add a
    replica to the expert with the largest load per replica (ties: the lowest index in the
    node-local order). Balanced packing: items in decreasing weight order, each to the least
    loaded pack that still has room (ties: the lowest pack); with one item per pack, item
    ``i`` goes to pack ``i``. The arithmetic is the reference's: float32 loads and group
    sums, load per replica and pack loads in float64, and items of equal weight in the
    order of numpy's default ``argsort`` of the negated weights (vLLM's sort; deterministic
    for one numpy build and CPU). It ignores ``old_map`` (only used for the figures).
``"deepseek_relabelled"``
    The same packs, placed to move as little as possible: packs are assigned to GPUs (and,
    in the hierarchical variant, node packs to nodes first) by solving an assignment problem
    (``scipy.optimize.linear_sum_assignment``) whose cost is, lexicographically, experts
    crossing nodes, then experts received, then rows changed; within a GPU, each replica
    goes to a row that already holds its expert where there is one (for items that are
    identical per expert this is an exact solution of the row assignment problem: it keeps
    ``sum_e min(new_e, old_e)`` rows, the most possible). Same imbalance as ``"deepseek"``.
``"migration_aware"`` (the default when ``old_map`` is given)
    Per layer: a layer whose ``old_map`` imbalance under the new loads is already within the
    target is kept as it is. Otherwise an incremental repair of ``old_map``, in rounds (all
    layers at once). Candidates, for the most loaded GPU ``A``: a swap of one of its slots
    with a slot of one of the 8 least loaded GPUs; a replica move (one of 16 donor slots,
    whose expert has several replicas, becomes a further replica of one of the 6 heaviest
    experts on ``A``). From EP 128, for up to 15 further GPUs above the target: a swap with
    one of 2 light GPUs of their own (no two share one), applied beside ``A``'s operation
    when it scores at least half as high and touches nothing ``A``'s operation changes.
    With more than 24 slots per GPU, a swap is scored for the pairs worth it only (for each slot of
    the heavy GPU, the two partner slots whose weights bracket the most balancing swap, and
    the pairs with the slots changed so far). Each operation is scored by how much it
    reduces the layer's excess over the target (the sum over GPUs of load above it) per
    unit of movement cost. An operation is allowed only when it lowers its heavy GPU and
    every GPU it raises ends below that GPU's current load, so the sorted load vector
    decreases at every step and the repair terminates. Movement cost per slot written: 0
    when a slot gets its old expert back (reverting an earlier step counts negative), 0.05
    for an expert its GPU already held (a local copy), ``1 + 3 R / (R_mean + 1)`` for a
    network transfer to a GPU that receives ``R`` slots so far over all the layers being
    repaired (updated every round; ``R_mean`` over the GPUs: the busiest receiver sets the
    transfer time, so the layers' receives are spread over the GPUs; 1 below 8 GPUs), 1
    more when no GPU of the receiver's node held the expert (``num_nodes > 1``). Empty slots of
    ``old_map`` are first given the expert with the largest load per replica. The repair
    stops at the target or when nothing helps ``A``. A layer that missed the target is
    repaired again from a map built from ``old_map`` with the reference's replica counts
    (DeepSeek's packing, except that a replica stays on a GPU that held its expert when
    that GPU is nearly as light as the lightest); the second repair is taken where it
    meets the target. The layer then takes the repair if it
    met the target and changed no more slots than the relabelled reference (or neither met
    it and the repair is no worse), else the relabelled reference. So no layer changes more
    slots than the reference. Finally, if the largest number of experts any rank receives
    (summed over layers) exceeds the reference's, layers are switched to the reference,
    largest excess on the worst rank first, until it does not (only layers where the
    reference meets the target): with the default target it never moves more bytes than
    the reference. The relabelled reference (an assignment problem per layer) is computed
    only for the layers where a lower bound on its rows and bytes does not settle these
    comparisons. The repair ignores ``num_groups``: it may move an expert to another
    node's GPUs, at the cross-node cost above.

Target (``max_imbalance``): by default, per layer, the imbalance ``"deepseek"`` reaches on
these loads; a number (or one per layer) otherwise. ``RebalanceResult.target_met`` says
where it was reached.

Determinism: the result is a pure function of the arguments (numpy and scipy only, ties to
the lower index, no randomness), so every rank computes the same map from the same loads.
The migration-aware repair and the figures work on loads scaled per layer by their maximum
(imbalance is scale-free); DeepSeek's packs are computed from the loads as given.

The gate: ``RebalanceResult.old_imbalance`` is the imbalance of ``old_map`` under the new
loads; :func:`should_rebalance` says whether the gain is worth the bytes (rule there).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._checks import check_count, check_ids, check_real, expert_map, to_numpy

__all__ = [
    "POLICIES",
    "RebalanceResult",
    "placement_imbalance",
    "rebalance",
    "should_rebalance",
]

POLICIES = ("deepseek", "deepseek_relabelled", "migration_aware")

_I64 = np.int64
_TOL = 1e-9  # relative slack on imbalance comparisons (the same sums taken in another order)
_LOCAL_COST = 0.05  # repair cost of writing an expert the GPU already held (a local copy)
_NODE_COST = 1.0  # extra repair cost of an expert no GPU of the receiver's node held
_MIN_COST = 0.01  # floor of an operation's cost in the score (reverting a change is < 0)
_SWAP_GPUS = 8  # swaps: partners of the most loaded GPU (the least loaded GPUs)
_SWAP_MORE = 2  # swaps: partners of each further GPU above the target handled in a round
_AS_GOOD = 0.5  # swaps of further heavy GPUs: at least this fraction of the heaviest's score
_HEAVY_MAX = 16  # swaps: GPUs above the target handled in one round (each with its partners)
_ALL_PAIRS = 24  # swaps: every pair of slots scored up to this many slots per GPU
# swaps: further heavy GPUs beside the heaviest from this EP size (measured: EP64 slower and
# +20% bytes; EP128-256 2-4x faster for +5-10% bytes)
_MORE_FROM_EP = 128
# transfers to a GPU cost 1 + _SPREAD * (slots it receives, all layers) / (mean over GPUs + 1):
# the busiest receiver sets the transfer time. Measured on 32 bench sequences (4 rebalances
# each): its bytes -9.9% on average at 3, none worse (1: -8.7%, 2 worse; 10: -0.4%, 14 worse);
# from 8 GPUs (bench part placement, 10 rebalances: EP8-32 -2..-21%; at EP4 +0.7..+4.2%)
_SPREAD = 3.0
_SPREAD_FROM_EP = 8
_DONORS = 16  # replica moves: candidate donor slots per step
_RECEIVERS = 6  # replica moves: heaviest slots of the most loaded GPU to replicate


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class RebalanceResult:
    """What :func:`rebalance` decided, with the figures an engine needs to judge it.

    Per-layer arrays have ``num_layers`` entries. Fields that compare with the current
    placement (``old_imbalance``, ``slots_changed``, ``experts_received``, ...) are ``None``
    when no ``old_map`` was given; the byte figures are ``None`` without ``row_bytes``.

    * ``new_map``: int64 ``[num_layers, num_physical]``, every slot filled; feeds
      :func:`eplb_pynccl.plan_rearrangement` and :class:`eplb_pynccl.ExpertShuffler` as is.
    * ``replicas``: int64 ``[num_layers, num_logical]``, replicas of each expert in it.
    * ``imbalance``: max GPU load / mean GPU load under ``new_map``.
    * ``old_imbalance``: the same for ``old_map`` under these loads (the rebalance gate).
    * ``target``, ``target_met``: the imbalance aimed at, and where ``imbalance`` is within it.
    * ``layer_source``: per layer ``"deepseek"``, ``"reference"`` (the relabelled packs),
      ``"repaired"`` or ``"kept"`` (``old_map`` unchanged).
    * ``slots_changed``: slots whose expert changes (the rows the shuffler writes).
    * ``experts_received``: ``[num_layers, ep_size]``, experts each rank receives over the
      network: those it needs and did not hold (duplicates on a rank are local copies).
    * ``internode_received``: the part of those that no rank of the receiver's node held, so
      they cross nodes (``plan_rearrangement(..., ranks_per_node=ep_size // num_nodes)``
      sends the others from the receiver's node); zeros when ``num_nodes == 1``.
    * ``bytes_received_max``: ``row_bytes`` x the most experts any rank receives, summed
      over layers: the bytes of the busiest receiver for the whole rearrangement.
    * ``internode_bytes_max``, ``internode_bytes_total``: bytes crossing nodes, busiest
      receiver and all ranks together.
    * ``gain``: fraction of MoE time saved, if each layer's time follows its most loaded
      GPU: ``1 - sum_l imbalance[l] * mean_l / sum_l old_imbalance[l] * mean_l`` with the
      mean GPU load ``mean_l`` of each layer (layers with more tokens weigh more). ``None``
      without ``old_map``; 0.0 when nothing carries load.
    * ``seconds``: time spent in :func:`rebalance`; ``repair_rounds``: rounds of the
      repair (each applies at most one set of operations per layer; a diagnostic).
    """

    policy: str
    new_map: np.ndarray
    replicas: np.ndarray
    imbalance: np.ndarray
    target: np.ndarray
    target_met: np.ndarray
    layer_source: tuple[str, ...]
    ep_size: int
    num_nodes: int
    row_bytes: int | None
    old_imbalance: np.ndarray | None
    slots_changed: np.ndarray | None
    experts_received: np.ndarray | None
    internode_received: np.ndarray | None
    gain: float | None
    seconds: float
    repair_rounds: int = 0

    @property
    def reached_target(self) -> bool:
        """True when every layer is within its target."""
        return bool(self.target_met.all())

    @property
    def bytes_received_max(self) -> int | None:
        if self.experts_received is None or self.row_bytes is None:
            return None
        return int(self.experts_received.sum(0).max()) * self.row_bytes

    @property
    def internode_bytes_max(self) -> int | None:
        if self.internode_received is None or self.row_bytes is None:
            return None
        return int(self.internode_received.sum(0).max()) * self.row_bytes

    @property
    def internode_bytes_total(self) -> int | None:
        if self.internode_received is None or self.row_bytes is None:
            return None
        return int(self.internode_received.sum()) * self.row_bytes

    def __repr__(self) -> str:
        parts = [
            f"policy={self.policy!r}",
            f"imbalance mean {float(self.imbalance.mean()):.4f} max {float(self.imbalance.max()):.4f}",
        ]
        if self.old_imbalance is not None and self.slots_changed is not None:
            parts.append(f"old max {float(self.old_imbalance.max()):.4f}")
            parts.append(f"slots_changed={int(self.slots_changed.sum())}")
        if self.bytes_received_max is not None:
            parts.append(f"bytes_received_max={self.bytes_received_max}")
        if not self.reached_target:
            parts.append(f"target missed in {int((~self.target_met).sum())} layer(s)")
        return "RebalanceResult(" + ", ".join(parts) + ")"


def _gain(new_cost: float, old_cost: float) -> float:
    if old_cost <= 0:
        return 0.0
    return 1.0 - new_cost / old_cost


def should_rebalance(
    result: RebalanceResult, *, min_gain: float = 0.02, max_bytes: int | None = None
) -> bool:
    """Whether applying ``result`` is worth it.

    The rule: rebalance when ``result.gain`` (the fraction of MoE time the new placement
    saves, taking each layer's time as its most loaded GPU's load) is at least ``min_gain``
    (default 2%), and, when ``max_bytes`` is given, the busiest receiver gets at most that
    many bytes (``result.bytes_received_max``, which then needs ``row_bytes``). Without an
    ``old_map`` there is nothing to keep: always True.
    """
    if not isinstance(result, RebalanceResult):
        raise TypeError(f"result must be a RebalanceResult, got {type(result).__name__}")
    mg = check_real(min_gain, "min_gain")
    if max_bytes is not None:
        max_bytes = check_count(max_bytes, "max_bytes", minimum=0)
        if result.row_bytes is None:
            raise ValueError("max_bytes needs a result computed with row_bytes")
    if result.old_imbalance is None or result.gain is None:
        return True
    if result.gain < mg:
        return False
    return max_bytes is None or (result.bytes_received_max or 0) <= max_bytes


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


def _as_loads(x) -> np.ndarray:
    arr = to_numpy(x, "loads", dtype=np.number, ndim=2, dims="[num_layers, num_logical]")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"loads must have at least one layer and one expert, got shape {tuple(arr.shape)}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        layer, e = divmod(int(np.argmax(bad.ravel())), arr.shape[1])
        raise ValueError(
            f"loads: layer {layer}, expert {e} is {arr[layer, e]}; loads must be finite"
        )
    if (arr < 0).any():
        layer, e = divmod(int(np.argmax((arr < 0).ravel())), arr.shape[1])
        raise ValueError(f"loads: layer {layer}, expert {e} is {arr[layer, e]}; loads must be >= 0")
    return arr


def _check_old_map(
    old_map, num_layers: int, num_physical: int, num_logical: int, name: str = "old_map"
) -> np.ndarray:
    old = expert_map(old_map, name)
    if old.shape != (num_layers, num_physical):
        raise ValueError(
            f"{name} must have shape ({num_layers}, {num_physical}) "
            f"(loads' layers x num_physical), got {tuple(old.shape)}"
        )
    check_ids(old, name, num_logical)
    held = np.zeros((num_layers, num_logical + 1), dtype=bool)
    held[np.arange(num_layers)[:, None], old] = True  # -1 lands in the last column
    missing = ~held[:, :num_logical]
    if missing.any():
        layer, e = divmod(int(np.argmax(missing.ravel())), num_logical)
        raise ValueError(
            f"{name}: layer {layer} holds no replica of expert {e}; a placement must hold "
            "every logical expert"
        )
    return old


def _targets(max_imbalance, num_layers: int) -> np.ndarray | None:
    if max_imbalance is None:
        return None
    if isinstance(max_imbalance, numbers.Real) and not isinstance(max_imbalance, (bool, np.bool_)):
        t = np.full(num_layers, check_real(max_imbalance, "max_imbalance"))
    else:
        try:
            t = to_numpy(max_imbalance, "max_imbalance")
        except ValueError as exc:
            raise ValueError(f"max_imbalance must be a number or one per layer ({exc})") from None
        if t.dtype.kind not in "iuf":
            raise TypeError(
                f"max_imbalance must be a real number or an array of them, got {t.dtype}"
            )
        if t.shape != (num_layers,):
            raise ValueError(
                f"max_imbalance must be a number or have shape ({num_layers},) (one per "
                f"layer), got shape {tuple(t.shape)}"
            )
        t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise ValueError(f"max_imbalance must be finite, got {t[~np.isfinite(t)][0]}")
    if (t < 1.0).any():
        raise ValueError(
            f"max_imbalance must be >= 1 (max / mean GPU load), got {float(t[t < 1.0][0])}"
        )
    return t


# ---------------------------------------------------------------------------------------
# the public entry points
# ---------------------------------------------------------------------------------------


def rebalance(
    loads,
    num_physical: int,
    ep_size: int,
    *,
    old_map=None,
    num_nodes: int = 1,
    num_groups: int | None = None,
    policy: str | None = None,
    max_imbalance=None,
    row_bytes: int | None = None,
) -> RebalanceResult:
    """A placement of experts onto ``num_physical`` slots over ``ep_size`` GPUs.

    Args:
        loads: ``[num_layers, num_logical]`` non-negative finite loads (tokens per expert);
            numpy, torch or nested lists.
        num_physical: slots per layer (``>= num_logical``, divisible by ``ep_size``).
        ep_size: expert-parallel ranks (GPUs).
        old_map: the current placement ``[num_layers, num_physical]`` (``-1``: empty slot),
            holding every logical expert in every layer.
        num_nodes: nodes the ranks span (rank ``r`` is on node ``r // (ep_size //
            num_nodes)``); must divide ``ep_size``.
        num_groups: expert groups (consecutive ids) for DeepSeek's hierarchical variant;
            must divide ``num_logical``. Hierarchical when ``num_nodes`` divides it.
        policy: ``"deepseek"``, ``"deepseek_relabelled"`` or ``"migration_aware"`` (default:
            ``"migration_aware"`` with ``old_map``, else ``"deepseek"``).
        max_imbalance: target (a number >= 1 or one per layer); default: per layer what
            ``"deepseek"`` reaches on these loads.
        row_bytes: bytes of one expert (all its tensors), for the byte figures.

    Returns:
        A :class:`RebalanceResult`. The module docstring says how each policy decides.

    Raises:
        TypeError, ValueError: bad input, with a message naming the argument.
    """
    t0 = time.perf_counter()
    args = _rebalance_args(
        loads,
        num_physical,
        ep_size,
        old_map,
        num_nodes,
        num_groups,
        policy,
        max_imbalance,
        row_bytes,
    )
    return _result(args, _decide(args), t0)


class _Args(NamedTuple):
    """:func:`rebalance`'s arguments, checked: loads as float64, counts as ints, old_map as
    an int64 map (or None), the policy resolved, the target as given (None: DeepSeek's)."""

    lam_raw: np.ndarray
    N: int
    ep: int
    nodes: int
    groups: int | None
    policy: str
    old: np.ndarray | None
    target: np.ndarray | None
    row_bytes: int | None


def _rebalance_args(
    loads, num_physical, ep_size, old_map, num_nodes, num_groups, policy, max_imbalance, row_bytes
) -> _Args:
    """Checks :func:`rebalance`'s arguments (its messages name each one), warns when the
    hierarchical variant does not apply (pointing at rebalance's caller), resolves the policy."""
    lam_raw = _as_loads(loads)
    L, E = lam_raw.shape
    N = check_count(num_physical, "num_physical")
    ep = check_count(ep_size, "ep_size")
    nodes = check_count(num_nodes, "num_nodes")
    groups = None if num_groups is None else check_count(num_groups, "num_groups")
    if N < E:
        raise ValueError(
            f"num_physical ({N}) must be >= the number of logical experts ({E}, the "
            "second dimension of loads)"
        )
    if N % ep:
        raise ValueError(f"num_physical ({N}) is not divisible by ep_size ({ep})")
    if ep % nodes:
        raise ValueError(f"ep_size ({ep}) is not divisible by num_nodes ({nodes})")
    if groups is not None and E % groups:
        raise ValueError(
            f"the number of logical experts ({E}, loads.shape[1]) is not divisible by "
            f"num_groups ({groups})"
        )
    if groups is not None and groups > 1 and not _hierarchical(groups, nodes):
        warnings.warn(
            f"num_groups ({groups}) is not divisible by num_nodes ({nodes}): DeepSeek's "
            "hierarchical variant does not apply, the global one is used (num_groups ignored; "
            "num_groups=None asks for it without this warning)",
            stacklevel=3,  # rebalance's caller
        )
    if policy is not None and not isinstance(policy, str):
        raise TypeError(f"policy must be a str or None, got {type(policy).__name__}")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    old = None if old_map is None else _check_old_map(old_map, L, N, E)
    if policy is None:
        policy = "deepseek" if old is None else "migration_aware"
    if old is None and policy != "deepseek":
        raise ValueError(f"policy {policy!r} needs old_map (the current placement)")
    target = _targets(max_imbalance, L)
    rb = None if row_bytes is None else check_count(row_bytes, "row_bytes")
    return _Args(lam_raw, N, ep, nodes, groups, policy, old, target, rb)


class _Decision(NamedTuple):
    """What a policy decided, with the figures :func:`_result` reports: loads scaled per
    layer (``scale``: each layer's max load), costs in those scaled units."""

    new: np.ndarray
    imb: np.ndarray
    cost: np.ndarray
    source: list[str]
    rounds: int
    recv: np.ndarray | None
    inter: np.ndarray | None
    target: np.ndarray
    old_imb: np.ndarray | None
    old_cost: np.ndarray | None
    scale: np.ndarray


def _decide(a: _Args) -> _Decision:
    """DeepSeek's placement (the reference and the default target), then the policy's:
    the reference itself, its packs relabelled onto the old GPUs, or the migration-aware
    choice per layer (the module docstring says how)."""
    L, E = a.lam_raw.shape
    scale = a.lam_raw.max(1)
    scale[scale == 0] = 1.0
    lam = a.lam_raw / scale[:, None]

    ref, nodes_h = _deepseek(_ds_weights(a.lam_raw), a.N, a.ep, a.nodes, a.groups)
    ref_imb, ref_cost = _imbalance(ref, lam, a.ep)
    target = ref_imb if a.target is None else a.target
    old, old_imb, old_cost = a.old, None, None
    if old is not None:
        old_imb, old_cost = _imbalance(old, lam, a.ep)

    rounds = 0
    recv = inter = None
    if a.policy == "deepseek":
        new, imb, cost = ref, ref_imb, ref_cost
        source = ["deepseek"] * L
    elif a.policy == "deepseek_relabelled":
        gpu_of_pack = _relabel(ref, old, a.ep, a.nodes, nodes_h, E)[0]
        new, imb, cost = _relabel_maps(ref, old, gpu_of_pack, np.arange(L)), ref_imb, ref_cost
        source = ["reference"] * L
    else:
        new, imb, cost, source, rounds, recv, inter = _migration_aware(
            old, ref, lam, target, ref_imb, old_imb, old_cost, ref_cost, a.ep, a.nodes, nodes_h
        )
    return _Decision(new, imb, cost, source, rounds, recv, inter, target, old_imb, old_cost, scale)


def _result(a: _Args, d: _Decision, t0: float) -> RebalanceResult:
    """The frozen :class:`RebalanceResult` of decision ``d``: replica counts, the figures
    against ``old_map`` (slots changed, experts received, gain), ``seconds`` since ``t0``."""
    E = a.lam_raw.shape[1]
    old, recv, inter = a.old, d.recv, d.inter
    replicas = _expert_counts(d.new, E)
    sc = None
    if old is not None:
        sc = ((d.new != old) & (d.new != -1)).sum(1).astype(_I64)
        if recv is None:
            recv, inter = _received(old, d.new, a.ep, a.nodes, E)
    return RebalanceResult(
        policy=a.policy,
        new_map=_frozen(d.new),
        replicas=_frozen(replicas),
        imbalance=_frozen(d.imb.copy()),
        target=_frozen(np.asarray(d.target, dtype=np.float64).copy()),
        target_met=_frozen(d.imb <= d.target * (1 + _TOL)),
        layer_source=tuple(d.source),
        ep_size=a.ep,
        num_nodes=a.nodes,
        row_bytes=a.row_bytes,
        old_imbalance=None if d.old_imb is None else _frozen(d.old_imb.copy()),
        slots_changed=None if sc is None else _frozen(sc),
        experts_received=None if recv is None else _frozen(recv),
        internode_received=None if inter is None else _frozen(inter),
        repair_rounds=d.rounds,
        # from the sums over layers of the max GPU load (unscaled), new and old
        gain=None
        if d.old_cost is None
        else _gain(float((d.cost * d.scale).sum()), float((d.old_cost * d.scale).sum())),
        seconds=time.perf_counter() - t0,
    )


def placement_imbalance(placement, loads, ep_size: int) -> np.ndarray:
    """Per layer: max GPU load / mean GPU load of ``placement`` under ``loads``.

    A GPU's load is the sum over its slots of ``loads[layer, e] / replicas(e)``; a layer
    without load has imbalance 1.0. ``placement`` must hold every expert of ``loads``."""
    lam = _as_loads(loads)
    L, E = lam.shape
    ep = check_count(ep_size, "ep_size")
    amap = expert_map(placement, "placement")
    if amap.shape[0] != L:
        raise ValueError(f"placement has {amap.shape[0]} layers, loads has {L}")
    N = amap.shape[1]
    if N == 0 or N % ep:
        raise ValueError(f"num_physical ({N}) is not divisible by ep_size ({ep})")
    _check_old_map(amap, L, N, E, "placement")  # the same rule as old_map's
    scale = lam.max(1)
    scale[scale == 0] = 1.0
    return _imbalance(amap, lam / scale[:, None], ep)[0]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------
# load and movement figures
# ---------------------------------------------------------------------------------------


def _slot_weights(amap: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Per slot: its expert's load / replicas (0 for an empty slot)."""
    L, N = amap.shape
    E = lam.shape[1]
    cnt = _expert_counts(amap, E)
    per = np.zeros((L, E + 1))  # the last column serves empty slots (-1)
    held = cnt > 0
    per[:, :E][held] = lam[held] / cnt[held]
    return per[np.arange(L)[:, None], amap]


def _expert_counts(amap: np.ndarray, E: int) -> np.ndarray:
    """int [L, E]: replicas of each expert per layer (empty slots not counted)."""
    L, N = amap.shape
    key = np.repeat(np.arange(L), N) * (E + 1) + amap.ravel() + 1
    return np.bincount(key, minlength=L * (E + 1)).reshape(L, E + 1)[:, 1:]


def _imbalance(amap: np.ndarray, lam: np.ndarray, ep: int) -> tuple[np.ndarray, np.ndarray]:
    """(imbalance per layer, max GPU load per layer) of a placement."""
    L, N = amap.shape
    g = _slot_weights(amap, lam).reshape(L, ep, N // ep).sum(2)
    gmax = g.max(1)
    mean = g.mean(1)
    imb = np.ones(L)
    pos = mean > 0
    imb[pos] = gmax[pos] / mean[pos]
    return imb, gmax


def _gpu_presence(amap: np.ndarray, ep: int, E: int) -> np.ndarray:
    """bool [L, ep, E]: GPU holds expert."""
    L, N = amap.shape
    P = N // ep
    pres = np.zeros((L, ep, E + 1), dtype=bool)
    lr = np.repeat(np.arange(L * ep), P)
    pres.reshape(L * ep, E + 1)[lr, amap.ravel()] = True
    return pres[:, :, :E]


def _gpu_counts(amap: np.ndarray, ep: int, E: int) -> np.ndarray:
    """int [L, ep, E]: replicas of each expert on each GPU (empty slots not counted)."""
    L, N = amap.shape
    P = N // ep
    key = np.repeat(np.arange(L * ep), P) * (E + 1) + amap.ravel() + 1  # -1 -> column 0
    cnt = np.bincount(key, minlength=L * ep * (E + 1)).reshape(L, ep, E + 1)
    return cnt[:, :, 1:]


def _received(old, new, ep, nodes, E):
    """(experts received per [layer, rank], of which crossing nodes)."""
    po = _gpu_presence(old, ep, E)
    pn = _gpu_presence(new, ep, E)
    need = pn & ~po
    recv = need.sum(2).astype(_I64)
    if nodes == 1:
        return recv, np.zeros_like(recv)
    L = old.shape[0]
    gpn = ep // nodes
    node_pres = po.reshape(L, nodes, gpn, E).any(2)
    on_node = np.repeat(node_pres, gpn, axis=1)
    inter = (need & ~on_node).sum(2).astype(_I64)
    return recv, inter


# ---------------------------------------------------------------------------------------
# DeepSeek's algorithm, as its reference implementations compute it
# ---------------------------------------------------------------------------------------
#
# The reference (DeepSeek's eplb.py; vLLM's DefaultEplbPolicy) works on float32 loads: group
# sums in float32, load per replica as float32 / count in float64, pack loads accumulated in
# float64. Its packing visits items in the order of numpy's default argsort of the negated
# weights, so equal weights come in that sort's order. The functions below take the same
# values in the same order (vectorised over layers), so they return the same map, ties
# included; tests/test_placement.py checks them against a plain re-implementation and
# tests_vllm/test_policy.py against vLLM's own.

_GREEDY_REPLICAS = 64  # up to this many redundant slots: one argmax per slot; above: bisection


def _ds_weights(lam_raw: np.ndarray) -> np.ndarray:
    """The loads as the reference sees them (float32), scaled by a power of two where
    float32 would overflow (exact: no order or tie changes)."""
    top = float(lam_raw.max())
    if top > 1e38:
        lam_raw = lam_raw * 2.0 ** -(math.frexp(top)[1] - 120)
    return lam_raw.astype(np.float32)


def _replicate(w: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's replication of ``n`` items into ``total`` replicas per row: each further
    replica goes to the item with the largest ``w / count`` (float64; ties: lowest index).

    Returns ``(count [B, n], chosen [B, total - n])``: the item of each further replica, in
    the order they are added. Few replicas: one argmax each. Many: the added replicas are the
    ``total - n`` largest values of ``{w_i / k : k >= 1}`` (largest value first, equal values
    by lowest index), selected among the few near the threshold a proportional share
    brackets."""
    B, n = w.shape
    R = total - n
    cnt = np.ones((B, n), dtype=_I64)
    if R <= _GREEDY_REPLICAS:
        rows = np.arange(B)
        chosen = np.empty((B, R), dtype=_I64)
        for i in range(R):
            c = np.argmax(w / cnt, axis=1)
            chosen[:, i] = c
            cnt[rows, c] += 1
        return cnt, chosen
    wf = w.astype(np.float64)
    k = _extra_replicas(wf, R)
    cnt += k
    return cnt, _greedy_order(wf, k, R)


def _replicas_above(wf: np.ndarray, t: np.ndarray, R: int) -> np.ndarray:
    """[B, n]: how many k >= 1 have ``wf / k > t`` (t > 0 per row), at most ``R``."""
    k = np.floor(np.minimum(wf / t[:, None], R + 1.0))
    for _ in range(2):  # the floor of a rounded quotient is off by at most one
        k = np.where((k < R + 1) & (wf / (k + 1) > t[:, None]), k + 1, k)
        k = np.where((k >= 1) & ~(wf / np.maximum(k, 1) > t[:, None]), k - 1, k)
    return np.minimum(k, R).astype(_I64)


def _extra_replicas(wf: np.ndarray, R: int) -> np.ndarray:
    """int [B, n]: how many of the ``R`` further replicas of each row each item gets (the
    ``R`` largest ``wf_i / k``, equal values by lowest index)."""
    B, n = wf.shape
    # The R-th largest value lies in (lo, hi]: fewer than R values exceed W / R and at
    # least R exceed W / (R + n) (n: items with load). Every value in between is a
    # candidate (about n per row); sorting them finishes the selection.
    tot = wf.sum(1)
    live = tot > 0
    pos_n = (wf > 0).sum(1)
    hi = np.where(live, tot / R * (1 + 1e-9), 1.0)
    lo = np.where(live, tot / (R + pos_n + 1) * (1 - 1e-9), 0.5)
    k_hi, k_lo = _replicas_above(wf, hi, R), _replicas_above(wf, lo, R)
    if (k_hi.sum(1)[live] >= R).any() or (k_lo.sum(1)[live] < R).any():  # pragma: no cover
        raise AssertionError("replication bracket")  # cannot happen: bounds are loose
    extra = k_lo - k_hi  # candidates per item: its replicas k_hi + 1 .. k_lo
    rows_c = np.repeat(np.arange(B), extra.sum(1))
    item_c = np.repeat(np.tile(np.arange(n), B), extra.ravel())
    start = np.repeat((np.cumsum(extra.ravel()) - extra.ravel()), extra.ravel())
    kc = np.arange(item_c.size) - start + np.repeat(k_hi.ravel(), extra.ravel()) + 1
    vc = wf[rows_c, item_c] / kc
    order = np.lexsort((item_c, -vc, rows_c))
    rank = np.arange(order.size) - np.repeat(np.cumsum(extra.sum(1)) - extra.sum(1), extra.sum(1))
    take = order[rank < (R - k_hi.sum(1))[rows_c]]
    k = k_hi.copy()
    np.add.at(k, (rows_c[take], item_c[take]), 1)
    zero = ~live  # nothing loaded: every argmax is item 0
    k[zero] = 0
    k[zero, 0] = R
    return k


def _greedy_order(wf: np.ndarray, k: np.ndarray, R: int) -> np.ndarray:
    """int [B, R]: the items of the ``R`` further replicas of each row (``k`` [B, n] of
    each item, ``wf`` the float64 loads) in the order the greedy adds them: value
    descending, then lowest item first."""
    B, n = wf.shape
    item = np.repeat(np.tile(np.arange(n), B), k.ravel()).reshape(B, R)
    first = np.cumsum(k, axis=1) - k  # where each item's run starts
    kk = np.arange(R)[None, :] - np.take_along_axis(first, item, 1) + 1  # k-th extra replica
    val = np.take_along_axis(wf, item, 1) / kk
    order = np.lexsort((item, -val), axis=1)
    return np.take_along_axis(item, order, 1)


def _pack(w: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's balanced packing of each row's ``n`` items into ``num_packs`` packs of
    ``n / num_packs``: items in the order of numpy's argsort of ``-w``, each to the least
    loaded pack with room (float64 loads; ties: lowest pack index). One item per pack: item
    ``i`` in pack ``i``. Returns (pack, position in the pack) per item.

    Several items are placed per step: after sorting the packs by (load, index), the k-th
    next item goes to the k-th pack as long as that pack stays lighter than every pack that
    took an item earlier in the step (strictly; an equal load ends the step), which is what
    placing them one by one would do."""
    B, n = w.shape
    cap = n // num_packs
    if cap == 1:
        return np.broadcast_to(np.arange(n), (B, n)).copy(), np.zeros((B, n), dtype=_I64)
    order = np.argsort(-w, axis=-1)
    ws = np.take_along_axis(w, order, 1).astype(np.float64)
    K = num_packs
    load = np.zeros((B, K))
    fill = np.zeros((B, K), dtype=_I64)
    pack_s = np.empty((B, n), dtype=_I64)  # per sorted item
    pos_s = np.empty((B, n), dtype=_I64)
    ptr = np.zeros(B, dtype=_I64)
    jj = np.arange(K)
    a = np.arange(B)
    while a.size:
        la = load[a]
        q = np.argsort(la, axis=1, kind="stable")  # full packs (inf) last
        ar = a[:, None]
        lq = la[np.arange(a.size)[:, None], q]
        idx = ptr[a][:, None] + jj
        valid = idx < n
        np.minimum(idx, n - 1, out=idx)
        after = lq + ws[ar, idx]
        fq = fill[ar, q]
        after[fq + 1 == cap] = np.inf
        prev = np.minimum.accumulate(after, axis=1)
        ok = valid & (lq < np.inf)
        ok[:, 1:] &= lq[:, 1:] < prev[:, :-1]
        m = np.logical_and.accumulate(ok, axis=1)  # the first items of the step
        r, j = np.nonzero(m)
        rows, it, pk = a[r], idx[r, j], q[r, j]
        pack_s[rows, it] = pk
        pos_s[rows, it] = fq[r, j]
        load[rows, pk] = after[r, j]
        fill[rows, pk] += 1
        ptr[a] += m.sum(1)
        a = a[ptr[a] < n]
    pack = np.empty((B, n), dtype=_I64)
    pos = np.empty((B, n), dtype=_I64)
    np.put_along_axis(pack, order, pack_s, 1)
    np.put_along_axis(pos, order, pos_s, 1)
    return pack, pos


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), 1)
    return inv


def _hierarchical(num_groups: int | None, nodes: int) -> bool:
    """The reference's rule: hierarchical whenever the groups divide over the nodes (one
    node with several groups included); the global variant otherwise."""
    return num_groups is not None and num_groups % nodes == 0


def _deepseek(w, N, ep, nodes, groups) -> tuple[np.ndarray, int]:
    """DeepSeek's EPLB placement [L, N] of float32 loads ``w`` (see :func:`_ds_weights`),
    and the node count of its hierarchy (1: global)."""
    L, E = w.shape
    hier = _hierarchical(groups, nodes)
    nh, G = (nodes, groups) if hier else (1, 1)
    gs, gpn, Nn, En, P = E // G, ep // nh, N // nh, E // nh, N // ep
    # groups onto nodes; experts renumbered node by node, groups in their packing order
    gpack, gpos = _pack(w.reshape(L, G, gs).sum(-1), nh)
    group_at = _inverse(gpack * (G // nh) + gpos)  # [L, G]: the group at each position
    experts = (group_at[:, :, None] * gs + np.arange(gs)).reshape(L, E)
    B = L * nh
    wn = np.take_along_axis(w, experts, 1).reshape(B, En)
    cnt, chosen = _replicate(wn, Nn)
    phy = np.concatenate([np.broadcast_to(np.arange(En), (B, En)), chosen], axis=1)
    pack, pos = _pack(np.take_along_axis(wn / cnt, phy, 1), gpn)
    local = np.empty((B, Nn), dtype=_I64)
    np.put_along_axis(local, pack * P + pos, phy, 1)  # node-local expert of each slot
    local += (np.arange(B) % nh)[:, None] * En
    return np.take_along_axis(experts, local.reshape(L, N), 1), nh


# ---------------------------------------------------------------------------------------
# relabelling: the reference's packs onto GPUs and rows that keep the most in place
# ---------------------------------------------------------------------------------------


def _lsa():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - scipy is in the placement/test extras
        raise ImportError(
            "policies 'deepseek_relabelled' and 'migration_aware' need scipy "
            "(pip install 'eplb-pynccl[placement]')"
        ) from exc
    return linear_sum_assignment


def _relabel(ref, old, ep, nodes, nodes_h, E):
    """Where ``ref``'s GPU packs (and node packs when ``nodes_h > 1``) go to minimise,
    lexicographically, experts crossing nodes, experts received, rows changed.

    Returns ``(gpu_of_pack [L, ep], changed [L], recv [L, ep], inter [L, ep])``: the
    assignment and, read off its cost matrices, the rows the relabelled map changes and
    the experts each GPU receives (of which across nodes). :func:`_relabel_maps` builds
    the maps themselves, only for the layers that need them."""
    L, N = ref.shape
    P = N // ep
    gpn = ep // nodes
    items = ref.reshape(L, ep, P)  # pack p = the reference's GPU p
    occ = _occurrence(items.reshape(L * ep, P)).reshape(L, ep, P)
    distinct = (occ == 0).sum(2)[:, :, None]
    shared = _shared(items, occ, old, ep, 1)  # [L, pack, gpu]: experts both hold
    recv = distinct - shared  # experts the GPU lacks
    kept = _rows_kept(items, occ, shared, _gpu_counts(old, ep, E))
    cost = recv * (P + 1) + (P - kept)
    cross = None
    if nodes > 1:
        cross = distinct - _shared(items, occ, old, ep, gpn)  # [L, pack, node]
        cost += np.repeat(cross, gpn, axis=2) * (P + 1) ** 2
    gpu_of_pack = _assign_packs(cost.astype(np.float64), nodes_h, gpn)
    rows = np.arange(L)[:, None]
    pack_of_gpu = np.empty_like(gpu_of_pack)
    pack_of_gpu[rows, gpu_of_pack] = np.arange(ep)
    gpus = np.arange(ep)
    changed = (P - kept[rows, pack_of_gpu, gpus]).sum(1)
    recv_g = recv[rows, pack_of_gpu, gpus]
    inter_g = np.zeros_like(recv_g)
    if cross is not None:
        inter_g = cross[rows, pack_of_gpu, gpus // gpn]
    return gpu_of_pack, changed, recv_g, inter_g


def _rows_kept(items: np.ndarray, occ: np.ndarray, shared: np.ndarray, co: np.ndarray):
    """int [L, pack, gpu]: the rows a GPU keeps if it takes the pack, sum_e min(new_e, old_e):
    the shared experts, plus each further copy of an expert in the pack that the GPU also
    held more than once (rare: counted one by one). ``co``: the old map's per-GPU counts."""
    kept = shared.copy()
    dl, dp, dj = np.nonzero(occ > 0)
    if dl.size:
        more = co[dl, :, items[dl, dp, dj]] > occ[dl, dp, dj][:, None]  # [dups, gpu]
        np.add.at(kept, (dl, dp), more.astype(_I64))
    return kept


def _assign_packs(costf: np.ndarray, nodes_h: int, gpn: int) -> np.ndarray:
    """int [L, ep]: the GPU of each pack minimising ``costf`` [L, pack, gpu]; with
    ``nodes_h > 1`` node packs go whole to nodes: the best GPU assignment inside node b for
    every (node pack a, b), then the best assignment of node packs to nodes on those optima."""
    lsa = _lsa()
    L, ep, _ = costf.shape
    gpu_of_pack = np.empty((L, ep), dtype=_I64)
    if nodes_h == 1:
        for layer in range(L):
            gpu_of_pack[layer] = lsa(costf[layer])[1]
        return gpu_of_pack
    blocks = np.ascontiguousarray(
        costf.reshape(L, nodes_h, gpn, nodes_h, gpn).transpose(0, 1, 3, 2, 4)
    )  # [L, a, b, pack in a, gpu in b]
    inner = np.empty((L, nodes_h, nodes_h, gpn), dtype=_I64)
    for layer in range(L):
        for a in range(nodes_h):
            for b in range(nodes_h):
                inner[layer, a, b] = lsa(blocks[layer, a, b])[1]
    val = np.take_along_axis(blocks, inner[..., None], 4)[..., 0].sum(3)  # [L, a, b]
    for layer in range(L):
        node = lsa(val[layer])[1]
        gpu_of_pack[layer] = (node[:, None] * gpn + inner[layer, np.arange(nodes_h), node]).ravel()
    return gpu_of_pack


def _shared(items: np.ndarray, occ: np.ndarray, old: np.ndarray, ep: int, size: int) -> np.ndarray:
    """int [L, packs, ep // size]: distinct experts of each pack (``items`` [L, packs, P],
    ``occ`` their :func:`_occurrence`) that ``old`` holds on each block of ``size``
    consecutive GPUs. Counted pair by pair (pack item, holder of its expert), no BLAS."""
    L, K, P = items.shape
    N = old.shape[1]
    nb = ep // size
    E1 = int(max(items.max(), old.max())) + 1
    # distinct (layer, expert, block) holders in old (empty slots hold nothing), sorted
    lr, sr = np.nonzero(old >= 0)
    key = np.unique((lr * E1 + old[lr, sr]) * nb + sr // (N // nb))
    hold_le, hold_b = np.divmod(key, nb)
    start = np.searchsorted(hold_le, np.arange(L * E1 + 1))
    m = occ.ravel() == 0
    le = (np.repeat(np.arange(L), K * P) * E1 + items.ravel())[m]
    pk = np.tile(np.repeat(np.arange(K), P), L)[m] + np.repeat(np.arange(L), K * P)[m] * K
    n = start[le + 1] - start[le]
    first = np.repeat(start[le], n)
    at = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + first
    out = np.bincount(np.repeat(pk, n) * nb + hold_b[at], minlength=L * K * nb)
    return out.reshape(L, K, nb)


def _relabel_maps(ref, old, gpu_of_pack, layers) -> np.ndarray:
    """The relabelled maps [len(layers), N] of the given layers."""
    L, N = ref.shape
    ep = gpu_of_pack.shape[1]
    P = N // ep
    items = ref[layers].reshape(len(layers), ep, P)
    placed = np.empty_like(items)
    placed[np.arange(len(layers))[:, None], gpu_of_pack[layers]] = items
    return _place_rows(placed, old[layers])


def _occurrence(a: np.ndarray) -> np.ndarray:
    """Per entry of each row: how many earlier entries of the row hold the same value."""
    R, P = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    sv = np.take_along_axis(a, order, 1)
    j = np.broadcast_to(np.arange(P), (R, P))
    start = np.ones((R, P), dtype=bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    run = np.maximum.accumulate(np.where(start, j, 0), axis=1)
    occ = np.empty((R, P), dtype=_I64)
    np.put_along_axis(occ, order, j - run, 1)
    return occ


def _place_rows(items: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Map [L, N] with GPU g holding the multiset ``items[:, g]``: each item takes a row that
    held its expert (the k-th copy the k-th such row), the rest fill the other rows in
    order. Keeps ``sum_e min(new_e, old_e)`` rows per GPU, the most possible."""
    L, ep, P = items.shape
    R = L * ep
    it = items.reshape(R, P)
    ol = old.reshape(R, P)
    E1 = int(max(it.max(), ol.max())) + 2
    base = np.arange(R)[:, None] * E1
    key_it = ((base + it) * P + _occurrence(it)).ravel()
    key_ol = ((base + ol) * P + _occurrence(ol)).ravel()
    key_ol[ol.ravel() < 0] = -1  # an empty row matches nothing
    srt = np.argsort(key_ol, kind="stable")
    ks = key_ol[srt]
    p = np.minimum(np.searchsorted(ks, key_it), ks.size - 1)
    hit = ks[p] == key_it
    out = np.empty((R, P), dtype=_I64)
    taken = np.zeros(R * P, dtype=bool)
    dst = srt[p[hit]]
    taken[dst] = True
    flat_out = out.ravel()
    flat_out[dst] = it.ravel()[hit]
    flat_out[np.flatnonzero(~taken)] = it.ravel()[~hit]  # both in (gpu, order): aligned
    return out.reshape(L, ep * P)


# ---------------------------------------------------------------------------------------
# migration-aware: keep, repair, or fall back to the relabelled reference
# ---------------------------------------------------------------------------------------


class _Relabelling:
    """The relabelled reference (:func:`_relabel`), computed layer by layer when needed:
    its assignment costs one assignment problem of ``ep x ep`` per layer, the largest part
    of the policy's time at EP 128-256, and most layers never need it."""

    _at_least: np.ndarray | None

    def __init__(self, ref, old, ep, nodes, nodes_h, E):
        L = ref.shape[0]
        self.args = (ref, old, ep, nodes, nodes_h, E)
        self.have = np.zeros(L, dtype=bool)
        self.gpu_of_pack = np.zeros((L, ep), dtype=_I64)
        self.changed = np.zeros(L, dtype=_I64)
        self.recv = np.zeros((L, ep), dtype=_I64)
        self.inter = np.zeros((L, ep), dtype=_I64)
        self._at_least = None

    def at_least(self) -> np.ndarray:
        """[L]: :func:`_reference_at_least` of every layer (computed once)."""
        if self._at_least is None:
            ref, old, ep = self.args[:3]
            self._at_least = _reference_at_least(ref, old, ep)
        return self._at_least

    def need(self, layers) -> None:
        layers = np.asarray(layers, dtype=_I64)
        layers = layers[~self.have[layers]]
        if layers.size == 0:
            return
        ref, old, ep, nodes, nodes_h, E = self.args
        out = _relabel(ref[layers], old[layers], ep, nodes, nodes_h, E)
        self.gpu_of_pack[layers], self.changed[layers], self.recv[layers], self.inter[layers] = out
        self.have[layers] = True


def _reference_at_least(ref, old, ep) -> np.ndarray:
    """[L]: a lower bound on both the rows the relabelled reference changes and the experts
    it sends (all GPUs together), whatever GPU each of its packs goes to: pack ``p`` on GPU
    ``q`` receives ``distinct(p) - shared(p, q)`` experts and changes at least as many rows,
    so every assignment costs at least ``sum_p distinct(p) - max_q shared(p, q)``. Counted
    over the (pack item, old holder) pairs, without the dense ``[ep, ep]`` matrices."""
    L, N = ref.shape
    P = N // ep
    E1 = int(max(ref.max(), old.max())) + 1
    # distinct (layer, expert, GPU) holders in old, sorted; empty slots hold nothing
    lr, sr = np.nonzero(old >= 0)
    hold = _distinct((lr * E1 + old[lr, sr]) * ep + sr // P)
    hold_le, hold_g = np.divmod(hold, ep)
    start = np.zeros(L * E1 + 1, dtype=_I64)
    np.cumsum(np.bincount(hold_le, minlength=L * E1), out=start[1:])
    # distinct (layer, pack, expert) of the reference, and the old holders of each
    lp, e = np.divmod(_distinct(np.arange(L * ep).repeat(P) * E1 + ref.ravel()), E1)
    le = (lp // ep) * E1 + e
    lo = start[le]
    n = start[le + 1] - lo
    at = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    # the most experts a pack shares with one GPU: runs of equal (pack, GPU) keys, sorted
    key = np.sort(np.repeat(lp, n) * ep + hold_g[at])
    best = np.zeros(L * ep, dtype=_I64)
    if key.size:
        first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        run = np.diff(first, append=key.size)
        pack = key[first] // ep  # sorted: the runs of each pack are consecutive
        head = np.flatnonzero(np.concatenate(([True], pack[1:] != pack[:-1])))
        best[pack[head]] = np.maximum.reduceat(run, head)
    distinct = np.bincount(lp, minlength=L * ep)
    return (distinct - best).reshape(L, ep).sum(1)


def _distinct(keys: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an int array (a sort, no hashing)."""
    k = np.sort(keys)
    return k[np.concatenate(([True], k[1:] != k[:-1]))] if k.size else k


def _migration_aware(
    old, ref, lam, target, ref_imb, old_imb, old_cost, ref_cost, ep, nodes, nodes_h
):
    L, N = old.shape
    E = lam.shape[1]
    rel = _Relabelling(ref, old, ep, nodes, nodes_h, E)
    t = target * (1 + _TOL)
    keep = (old_imb <= t) & (old >= 0).all(1)
    todo = np.flatnonzero(~keep)
    new = old.copy()
    imb = old_imb.copy()
    cost = old_cost.copy()
    source = np.array(["kept"] * L, dtype=object)
    rounds = 0
    if todo.size:
        rep, rep_imb, rep_cost, rounds = _repaired(old[todo], lam[todo], target[todo], ep, nodes)
        rep_met = rep_imb <= t[todo]
        stuck = np.flatnonzero(~rep_met)
        if stuck.size:  # repair again, from the reference's replica counts placed near old
            lay = todo[stuck]
            start = _restart_maps(old[lay], lam[lay], ref[lay], ep)
            again = _repaired(old[lay], lam[lay], target[lay], ep, nodes, start)
            better = again[1] <= t[lay]
            for a, b in zip((rep, rep_imb, rep_cost), again[:3]):
                a[stuck[better]] = b[better]
            rounds += again[3]
            rep_met = rep_imb <= t[todo]
        rep_changed = (rep != old[todo]).sum(1)
        # the reference is needed where the repair missed, or may have changed more rows
        unsure = ~rep_met | (rep_changed > rel.at_least()[todo])
        rel.need(todo[unsure])
        ok = ~unsure | (rep_changed <= rel.changed[todo])
        ref_met = ref_imb[todo] <= t[todo]
        use_rep = ok & (rep_met | (~ref_met & (rep_imb <= ref_imb[todo])))
        new[todo] = rep  # the layers that take the reference get its map below
        imb[todo] = np.where(use_rep, rep_imb, ref_imb[todo])
        cost[todo] = np.where(use_rep, rep_cost, ref_cost[todo])
        source[todo] = np.where(use_rep, "repaired", "reference")
    recv, inter = _received(old, new, ep, nodes, E)
    _limit_to_reference(recv, inter, rel, source, ref_imb <= t)
    for a, b in ((imb, ref_imb), (cost, ref_cost)):
        a[source == "reference"] = b[source == "reference"]
    layers = np.flatnonzero(source == "reference")
    if layers.size:
        new[layers] = _relabel_maps(ref, old, rel.gpu_of_pack, layers)
    return new, imb, cost, source.tolist(), rounds, recv, inter


def _repaired(old, lam, target, ep, nodes, start=None):
    """:func:`_repair`, rows placed to keep each GPU's experts where they were (the fewest
    rows written for its multiset): (maps, imbalance, max GPU load, rounds)."""
    L, N = old.shape
    rep, rounds = _repair(old, lam, target, ep, nodes, start)
    rep = _place_rows(rep.reshape(L, ep, N // ep), old)
    imb, cost = _imbalance(rep, lam, ep)
    return rep, imb, cost, rounds


def _restart_maps(old, lam, ref, ep) -> np.ndarray:
    """Where the repair of ``old`` got stuck, a map to repair again, built from ``old``
    rather than from the reference's packs: the reference's replica counts, placed as
    DeepSeek packs them (heaviest first, each on the least loaded GPU with room), except
    that a replica goes to a GPU that held its expert in ``old`` (one per old replica) when
    that GPU is loaded at most half the replica's weight above the least loaded one.
    Replica by replica, all layers at once."""
    L, N = old.shape
    E = lam.shape[1]
    P = N // ep
    cnt = _expert_counts(ref, E)
    w = lam / np.maximum(cnt, 1)
    items = np.repeat(np.tile(np.arange(E), L), cnt.ravel()).reshape(L, N)
    items = np.take_along_axis(
        items, np.argsort(-w[np.arange(L)[:, None], items], axis=1, kind="stable"), 1
    )
    have = np.ascontiguousarray(_gpu_counts(old, ep, E).transpose(0, 2, 1))  # [L, E, ep]
    load = np.zeros((L, ep))
    fill = np.zeros((L, ep), dtype=_I64)
    slots = np.empty((L, ep, P), dtype=_I64)
    rows = np.arange(L)
    for i in range(N):
        e = items[:, i]
        we = w[rows, e]
        free = np.where(fill < P, load, np.inf)
        low = free.min(1)
        near = np.where((have[rows, e] > 0) & (free <= (low + we / 2)[:, None]), free, np.inf)
        q = np.where(np.isfinite(near.min(1)), np.argmin(near, 1), np.argmin(free, 1))
        have[rows, e, q] = np.maximum(have[rows, e, q] - 1, 0)
        slots[rows, q, fill[rows, q]] = e
        load[rows, q] += we
        fill[rows, q] += 1
    return slots.reshape(L, N)


def _limit_to_reference(recv, inter, rel, source, ref_ok) -> None:
    """Never more bytes for the busiest receiver than the relabelled reference: while the
    most experts a rank receives (summed over layers) exceeds the reference's, switch the
    layer with the largest excess on that rank to the reference (only layers where the
    reference meets the target). Updates ``recv``, ``inter`` and ``source`` in place. The
    reference's figure is bounded from below first (its exact layers, and per layer
    :func:`_reference_at_least` spread over the ranks); the rest of it is computed only when
    the bound does not settle the question."""
    ep = rel.args[2]
    is_ref = source == "reference"
    recv[is_ref], inter[is_ref] = rel.recv[is_ref], rel.inter[is_ref]
    tot = recv.sum(0)
    if not rel.have.all():
        lo = np.where(rel.have, rel.recv.sum(1), 0)
        rest = np.flatnonzero(~rel.have)
        lo[rest] = rel.at_least()[rest]
        bound = max(int(rel.recv[rel.have].sum(0).max(initial=0)), -(-int(lo.sum()) // ep))
        if tot.max() <= bound:
            return
        rel.need(np.arange(recv.shape[0]))
    limit = rel.recv.sum(0).max()
    switchable = ~is_ref & ref_ok
    while tot.max() > limit:
        r = int(np.argmax(tot))
        excess = np.where(switchable, recv[:, r] - rel.recv[:, r], 0)
        layer = int(np.argmax(excess))
        if excess[layer] <= 0:
            break
        tot += rel.recv[layer] - recv[layer]
        recv[layer], inter[layer] = rel.recv[layer], rel.inter[layer]
        source[layer] = "reference"
        switchable[layer] = False


# ---------------------------------------------------------------------------------------
# the repair
# ---------------------------------------------------------------------------------------


class _RepairState:
    """What the repair of a set of layers carries from round to round: the current map, the
    replica counts per expert and per (expert, GPU), and the cost of each slot's content
    (see the module docstring: 0 for its old expert, else what writing it there costs)."""

    def __init__(self, old, lam, ep, nodes, start=None):
        L, N = old.shape
        E = lam.shape[1]
        self.old, self.lam, self.ep, self.nodes = old, lam, ep, nodes
        self.P = N // ep
        self.gpn = ep // nodes
        self.cur = (old if start is None else start).copy()
        self.cnt = _expert_counts(self.cur, E).astype(_I64)
        _fill_empty(self.cur, lam, self.cnt)
        # replicas per (layer, expert, GPU): expert-major, so an expert's holders are one row
        key = (np.arange(L)[:, None] * E + self.cur) * ep + np.arange(N) // self.P
        self.H = np.bincount(key.ravel(), minlength=L * E * ep).astype(np.int32).reshape(L, E, ep)
        self.held = np.ascontiguousarray(_gpu_presence(old, ep, E))  # GPU held it in old
        if nodes > 1:
            self.node_held = np.ascontiguousarray(self.held.reshape(L, nodes, self.gpn, E).any(2))
        rows = np.broadcast_to(np.arange(L)[:, None], (L, N))
        self.transfer = np.ones(ep)  # cost of a transfer to each GPU (see spread())
        self.ccur = np.zeros((L, N))
        self.set_cost(rows, np.broadcast_to(np.arange(N), (L, N)))

    def recv_cost(self, li, g, e):
        """Cost of writing expert ``e`` to a slot of GPU ``g`` of layer ``li`` (that did not
        hold it before): a local copy, a transfer, or a transfer across nodes."""
        c = np.where(self.held[li, g, e], _LOCAL_COST, self.transfer[g])
        if self.nodes > 1:
            c += np.where(self.node_held[li, g // self.gpn, e], 0.0, _NODE_COST)
        return c

    def flat_write_cost(self, fs, e):
        """:meth:`write_cost` of flat slot indices ``layer * N + slot`` (``fs // P`` is the
        flat (layer, GPU), ``fs // (P * gpn)`` the flat (layer, node))."""
        E = self.held.shape[2]
        t = self.transfer[(fs // self.P) % self.ep]
        c = np.where(np.take(self.held, fs // self.P * E + e), _LOCAL_COST, t)
        if self.nodes > 1:
            on = np.take(self.node_held, fs // (self.P * self.gpn) * E + e)
            c += np.where(on, 0.0, _NODE_COST)
        c[np.take(self.old, fs) == e] = 0.0
        return c

    def spread(self) -> None:
        """Transfer costs from what each GPU receives so far, summed over the layers (slots
        written by a transfer): ``1 + _SPREAD * R_g / (mean_g R + 1)``, so that layers
        repaired together send their experts to different GPUs. From ``_SPREAD_FROM_EP``
        GPUs (with fewer, every repair reaches most of them anyway)."""
        if self.ep < _SPREAD_FROM_EP:
            return
        L, N = self.cur.shape
        recv = (self.ccur >= 0.5).reshape(L, self.ep, self.P).sum((0, 2))
        self.transfer = 1.0 + _SPREAD * recv / (recv.mean() + 1.0)

    def write_cost(self, li, s, e):
        """Cost of slot ``s`` holding ``e``: 0 when it is its old expert."""
        return np.where(self.old[li, s] == e, 0.0, self.recv_cost(li, s // self.P, e))

    def set_cost(self, li, s) -> None:
        self.ccur[li, s] = self.write_cost(li, s, self.cur[li, s])

    def swap(self, li, sa, sb) -> None:
        xa, xb = self.cur[li, sa], self.cur[li, sb]
        self.cur[li, sa], self.cur[li, sb] = xb, xa
        ga, gb = sa // self.P, sb // self.P
        self.H[li, xa, ga] -= 1
        self.H[li, xb, ga] += 1
        self.H[li, xb, gb] -= 1
        self.H[li, xa, gb] += 1
        self.set_cost(li, sa)
        self.set_cost(li, sb)

    def replace(self, li, s, y) -> None:
        x = self.cur[li, s]
        self.cur[li, s] = y
        self.cnt[li, x] -= 1
        self.cnt[li, y] += 1
        self.H[li, x, s // self.P] -= 1
        self.H[li, y, s // self.P] += 1
        self.set_cost(li, s)


class _Round:
    """The active layers' loads at the start of a round (every candidate is scored on them)."""

    def __init__(self, st: _RepairState, idx, w, g, limit):
        self.idx, self.w, self.g, self.limit = idx, w, g, limit
        self.c = st.cur[idx]
        self.r_ = np.arange(idx.size)[:, None]


def _repair(old, lam, target, ep, nodes, start=None):
    """Incremental repair of ``old`` (see the module docstring), all layers at once. Each
    round, per layer still above its target: for each of its GPUs above the target (up to
    ``_HEAVY_MAX``, heaviest first) the best swap with one of its own light partners (the
    partner sets are disjoint, so these swaps do not interact), and for the heaviest GPU
    the best replica move instead when that scores higher. ``start``: the maps to repair
    (default ``old``; costs are always counted from ``old``). Returns the maps and the
    rounds."""
    L, N = old.shape
    st = _RepairState(old, lam, ep, nodes, start)
    if ep == 1:
        return st.cur, 0
    idx = np.arange(L)
    rounds = 0
    for _ in range(4 * N):
        w = (lam[idx] / st.cnt[idx])[np.arange(idx.size)[:, None], st.cur[idx]]
        g = w.reshape(idx.size, ep, st.P).sum(2)
        limit = target[idx] * g.mean(1) * (1 + _TOL)
        go = g.max(1) > limit
        idx, w, g, limit = idx[go], w[go], g[go], limit[go]
        if idx.size == 0:
            break
        rounds += 1
        st.spread()
        rd = _Round(st, idx, w, g, limit)
        first, more = _partners(g, limit, ep)
        swaps = _best_swaps(st, rd, *first)
        if more is not None:
            swaps.add(_best_swaps(st, rd, *more))
        moved = _apply(st, rd, swaps, _best_move(st, rd))
        idx = idx[moved]  # nothing helps the heaviest GPU: stuck
    return st.cur, rounds


class _Ops:
    """Best candidates of a round (fields as named by whoever fills it: swaps fill score,
    sa, sb, heavy; moves score, s, x, y, touched)."""

    score: np.ndarray
    sa: np.ndarray
    sb: np.ndarray
    heavy: np.ndarray
    s: np.ndarray
    x: np.ndarray
    y: np.ndarray
    touched: np.ndarray

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def add(self, more: _Ops) -> None:
        """Appends another set of heavy GPUs' swaps (fields [La, H])."""
        for k, v in more.__dict__.items():
            self.__dict__[k] = np.concatenate([self.__dict__[k], v], axis=1)


def _partners(g, limit, ep):
    """Heavy GPUs and their swap partners, disjoint. The most loaded GPU: the
    ``_SWAP_GPUS`` least loaded. The next GPUs above the target (up to ``_HEAVY_MAX`` in
    all): ``_SWAP_MORE`` each among the next least loaded, heavy GPU ``i`` the light GPUs
    ``K0 + (i - 1) + (h - 1) * k`` (0 = the lightest, ``h`` heavy GPUs in the layer).
    Returns two (heavy [La, H], partners [La, H, K], valid [La, H, K]), the second None
    when no layer has a second GPU above the target."""
    La = g.shape[0]
    order = np.argsort(-g, axis=1, kind="stable")
    K0 = min(_SWAP_GPUS, ep - 1)
    first = (order[:, :1], order[:, ::-1][:, None, :K0], np.ones((La, 1, K0), dtype=bool))
    h = np.minimum((g > limit[:, None]).sum(1), _HEAVY_MAX if ep >= _MORE_FROM_EP else 1)
    h = np.minimum(h, 1 + np.maximum(ep - 1 - K0, 0) // (_SWAP_MORE + 1))
    Hm = int(h.max())
    if Hm < 2:
        return first, None
    hl = h[:, None, None]
    i = np.arange(1, Hm)[None, :, None]
    pos = K0 + (i - 1) + (hl - 1) * np.arange(_SWAP_MORE)
    valid = (i < hl) & (pos < ep - hl)
    light = ep - 1 - np.minimum(pos, ep - 1)
    partners = np.take_along_axis(order, light.reshape(La, -1), 1).reshape(La, Hm - 1, -1)
    return first, (order[:, 1:Hm], partners, valid)


def _best_swaps(st: _RepairState, rd: _Round, heavy, partners, valid) -> _Ops:
    """Per heavy GPU ``A`` (see :func:`_partners`): the best swap of one of its slots with
    a slot of one of its partners ``B``, among every pair of slots (``P <= _ALL_PAIRS``,
    :func:`_all_pair_scores`) or among those of :func:`_some_pairs`."""
    if st.P <= _ALL_PAIRS:
        score, sa, sb = _all_pair_scores(st, rd, heavy, partners, valid)
    else:
        sa, sb, k = _some_pairs(st, rd, heavy, partners)
        score = _swap_scores(st, rd, heavy, sa, sb, np.take_along_axis(valid, k, 2))
    best = np.argmax(score, axis=2)[..., None]
    return _Ops(
        heavy=heavy,
        score=np.take_along_axis(score, best, 2)[..., 0],
        sa=np.take_along_axis(sa, best, 2)[..., 0],
        sb=np.take_along_axis(sb, best, 2)[..., 0],
    )


def _all_pair_scores(st: _RepairState, rd: _Round, heavy, partners, valid):
    """:func:`_swap_scores` of every (slot of ``A``, slot of a partner) pair, by
    broadcasting over ``[La, H, P, K * P]`` (cheaper per pair than gathering them).
    Returns (score, sa, sb) [La, H, P * K * P]."""
    g, w, c, r_, P = rd.g, rd.w, rd.c, rd.r_, st.P
    La, Hm, K = partners.shape
    r3 = r_[:, :, None]
    li = rd.idx[:, None, None]
    sA = heavy[:, :, None] * P + np.arange(P)  # [La, H, P]
    sB = (partners[..., None] * P + np.arange(P)).reshape(La, Hm, K * P)
    gA = g[r_, heavy]
    gb = np.repeat(g[r3, partners], P, axis=2)  # [La, H, K * P]
    d = w[r3, sA][..., None] - w[r3, sB][:, :, None, :]
    gain = (gA[:, :, None] - gb)[:, :, None, :] - d
    np.minimum(gain, d, out=gain)
    b4 = (gb - rd.limit[:, None, None])[:, :, None, :]
    red = np.minimum(d, (gA - rd.limit[:, None])[:, :, None, None])
    red += np.maximum(b4, 0.0)
    d += b4
    np.maximum(d, 0.0, out=d)
    red -= d
    del d
    ea, eb = c[r3, sA], c[r3, sB]
    # A writes eb over ea, B writes ea over eb; a slot's current cost is refunded
    cost = np.where(
        st.old[li, sA][..., None] == eb[:, :, None, :],
        0.0,
        st.recv_cost(li, heavy[:, :, None], eb)[:, :, None, :],
    )
    cost -= st.ccur[li, sA][..., None]
    rcB = st.recv_cost(li[..., None], partners[:, :, None, :], ea[..., None])  # [La, H, P, K]
    cost += np.where(st.old[li, sB][:, :, None, :] == ea[..., None], 0.0, np.repeat(rcB, P, 3))
    cost -= st.ccur[li, sB][:, :, None, :]
    np.copyto(gain, -np.inf, where=~np.repeat(valid, P, axis=2)[:, :, None, :])
    lim = rd.limit[:, None, None, None]
    score = _score(gain, red, cost, lim * _TOL).reshape(La, Hm, -1)
    n = P * K * P
    sa = np.broadcast_to(np.repeat(sA, K * P, axis=2), (La, Hm, n))
    sb = np.broadcast_to(np.tile(sB, (1, 1, P)), (La, Hm, n))
    return score, sa, sb


def _some_pairs(st: _RepairState, rd: _Round, heavy, partners):
    """The pairs worth scoring when GPUs have many slots (``6 P K`` of the ``P^2 K``):
    for each slot of ``A`` and each partner ``B``, the two slots of ``B`` whose weights
    bracket the one that would split the gap between them (``wb = wa - (gA - gB) / 2``,
    the most balancing swap); each slot of ``A`` with the two changed slots of each
    partner that cost the most (moving them back is cheap); and the two such slots of
    ``A`` with every slot of the partners. Returns (sa, sb, partner index) [La, H, C]."""
    g, w, P = rd.g, rd.w, st.P
    La, Hm, K = partners.shape
    r4 = rd.r_[:, :, None, None]
    li4 = rd.idx[:, None, None, None]
    sa = heavy[..., None] * P + np.arange(P)  # [La, H, P]
    sbk = partners[..., None] * P + np.arange(P)  # [La, H, K, P]
    wbk = w[r4, sbk]
    o = np.argsort(wbk, axis=3)
    sbs, wbs = np.take_along_axis(sbk, o, 3), np.take_along_axis(wbk, o, 3)
    half = (g[rd.r_, heavy][..., None] - g[rd.r_[:, :, None], partners]) / 2  # [La, H, K]
    t = np.clip(w[rd.r_[:, :, None], sa][..., None] - half[:, :, None, :], -1.0, 2.0)
    off = 4.0 * np.arange(La * Hm * K).reshape(La, Hm, 1, K)  # weights are in [0, 1]
    pos = np.searchsorted((wbs + off[:, :, 0, :, None]).ravel(), (t + off).ravel())
    pos = pos.reshape(La, Hm, P, K) - (off / 4.0).astype(_I64) * P
    near = np.stack([np.clip(pos - 1, 0, P - 1), np.clip(pos, 0, P - 1)], axis=-1)
    k_near = np.broadcast_to(np.arange(K)[:, None], near.shape)
    sb_near = sbs[r4[..., None], np.arange(Hm)[:, None, None, None], k_near, near]
    # changed slots, most costly first
    cb = np.argpartition(-st.ccur[li4, sbk], 1, axis=3)[..., :2]  # [La, H, K, 2]
    sb_chg = np.take_along_axis(sbk, cb, 3)
    ca = np.argpartition(-st.ccur[rd.idx[:, None, None], sa], 1, axis=2)[..., :2]  # [La, H, 2]
    sa_chg = np.take_along_axis(sa, ca, 2)
    C1 = P * K * 2
    sa_all = np.concatenate(
        [
            np.repeat(sa, 2 * K, axis=2),
            np.repeat(sa, 2 * K, axis=2),
            np.repeat(sa_chg, K * P, axis=2),
        ],
        axis=2,
    )
    sb_all = np.concatenate(
        [
            sb_near.reshape(La, Hm, C1),
            np.tile(sb_chg.reshape(La, Hm, 2 * K), (1, 1, P)),
            np.tile(sbk.reshape(La, Hm, K * P), (1, 1, 2)),
        ],
        axis=2,
    )
    k_all = np.concatenate(
        [
            np.tile(np.repeat(np.arange(K), 2), P),
            np.tile(np.repeat(np.arange(K), 2), P),
            np.tile(np.repeat(np.arange(K), P), 2),
        ]
    )
    return sa_all, sb_all, np.broadcast_to(k_all, sa_all.shape)


def _swap_scores(st: _RepairState, rd: _Round, heavy, sa, sb, ok) -> np.ndarray:
    """Scores [La, H, C] of swapping slot ``sa`` (of heavy GPU ``A``) with ``sb`` (of
    ``B``), -inf where not ``ok``. ``A`` gives ``d = wa - wb`` to ``B``; the peak gain is
    ``min(d, gA - gB - d)``, the excess reduction (``a = gA - limit``, ``b = gB - limit``)
    ``min(d, a) + max(b, 0) - max(b + d, 0)``. Cost: ``A`` writes ``eb`` over ``ea``,
    ``B`` writes ``ea`` over ``eb``, and each slot's current cost is refunded. (Flat
    indices and ``take``: these are the repair's largest gathers.)"""
    g, P, N = rd.g, st.P, st.cur.shape[1]
    row = rd.r_[:, :, None] * N  # into the round's arrays
    lay = rd.idx[:, None, None] * N  # into the state's
    gA = g[rd.r_, heavy][..., None]
    gb = np.take(g, rd.r_[:, :, None] * st.ep + sb // P)
    lim = rd.limit[:, None, None]
    d = np.take(rd.w, row + sa) - np.take(rd.w, row + sb)
    gain = np.minimum(d, gA - gb - d)
    b = gb - lim
    red = np.minimum(d, gA - lim) + np.maximum(b, 0.0) - np.maximum(b + d, 0.0)
    ea, eb = np.take(rd.c, row + sa), np.take(rd.c, row + sb)
    cost = st.flat_write_cost(lay + sa, eb) + st.flat_write_cost(lay + sb, ea)
    cost -= np.take(st.ccur, lay + sa) + np.take(st.ccur, lay + sb)
    np.copyto(gain, -np.inf, where=~ok)
    return _score(gain, red, cost, lim * _TOL)


def _best_move(st: _RepairState, rd: _Round) -> _Ops:
    """For the heaviest GPU ``A``: the best replica move, a donor slot (its expert ``x``
    has >= 2 replicas) becoming a replica of ``y``, one of the heaviest experts on ``A``.
    ``A`` loses; the donor's GPU and ``x``'s other holders may gain; ``y``'s other holders
    only lose (left out of the peak)."""
    g, c, r_ = rd.g, rd.c, rd.r_
    idx, limit = rd.idx, rd.limit
    li = idx[:, None]
    A = np.argmax(g, axis=1)
    gA = g[r_[:, 0], A]
    cn, lm = st.cnt[idx], st.lam[idx]
    y, ds, dok = _move_candidates(st, rd, cn, lm, A)
    x = c[r_, ds]
    rs = ds // st.P
    dx, wx_new, Hx, xpeak, x_over = _donor_side(st, rd, cn[r_, x], lm[r_, x], A, x, rs, dok)
    cy, ly = cn[r_, y], lm[r_, y]
    wy_new = ly / (cy + 1)
    dy = ly / cy - wy_new
    hxA = st.H[li, x, A[:, None]]  # [La, Kd]
    hyA = st.H[li, y, A[:, None]]  # [La, Ky]
    hx_rs = st.H[li, x, rs]  # [La, Kd]
    hy_rs = st.H[li[:, :, None], y[:, :, None], rs[:, None, :]]  # [La, Ky, Kd]
    delta = wy_new[:, :, None] - wx_new[:, None, :]  # at the donor's GPU
    at_A = (rs == A[:, None])[:, None, :]
    newA = (gA[:, None] - hyA * dy)[:, :, None] + (hxA * dx)[:, None, :]
    newA = newA + np.where(at_A, delta, 0.0)
    g_rs = g[r_, rs]
    new_rs = (g_rs + hx_rs * dx)[:, None, :] - hy_rs * dy[:, :, None] + delta
    peak = np.maximum(np.maximum(newA, new_rs), xpeak[:, None, :])
    gain = gA[:, None, None] - peak
    lim3 = limit[:, None, None]
    red = (gA - limit)[:, None, None] - np.maximum(newA - lim3, 0) - x_over[:, None, :]
    red += np.where(
        at_A, 0.0, np.maximum(g_rs - limit[:, None], 0)[:, None, :] - np.maximum(new_rs - lim3, 0)
    )
    gain = np.where(dok[:, None, :] & (x[:, None, :] != y[:, :, None]), gain, -np.inf)
    cost = st.write_cost(li[:, :, None], ds[:, None, :], y[:, :, None])  # [La, Ky, Kd]
    cost -= st.ccur[li, ds][:, None, :]
    La, Kd = ds.shape
    score = _score(gain, red, cost, lim3 * _TOL).reshape(La, -1)
    best = np.argmax(score, axis=1)
    mi, mj = np.divmod(best, Kd)
    ar = np.arange(La)
    xm, ym = x[ar, mj], y[ar, mi]
    touched = (Hx[ar, mj] > 0) | (st.H[idx, ym] > 0)
    touched[ar, rs[ar, mj]] = True
    return _Ops(score=score[ar, best], s=ds[ar, mj], x=xm, y=ym, touched=touched)


def _move_candidates(st: _RepairState, rd: _Round, cn, lm, A: np.ndarray):
    """The candidates of :func:`_best_move`: ``y`` [La, Ky], the heaviest experts on ``A``;
    ``ds`` [La, Kd], the donor slots (sorted) whose GPU's load without them plus their
    expert's rise is smallest; ``dok``: which donors can give (their expert has >= 2).
    ``cn``, ``lm``: the active layers' replica counts and loads."""
    g, w, c, r_, P = rd.g, rd.w, rd.c, rd.r_, st.P
    La, N = w.shape
    sA = A[:, None] * P + np.arange(P)
    Ky, Kd = min(P, _RECEIVERS), min(_DONORS, N)
    ys = sA[r_, np.argsort(-w[r_, sA], axis=1, kind="stable")[:, :Ky]]
    y = c[r_, ys]  # [La, Ky]
    cnt_slot = cn[r_, c]
    dx_slot = np.where(cnt_slot > 1, lm[r_, c] / np.maximum(cnt_slot - 1, 1) - w, np.inf)
    key = g[:, np.arange(N) // P] - w + dx_slot  # donor GPU's load without it, plus x's rise
    ds = np.argpartition(key, Kd - 1, axis=1)[:, :Kd] if Kd < N else np.tile(np.arange(N), (La, 1))
    ds.sort(axis=1)
    return y, ds, np.isfinite(key[r_, ds])


def _donor_side(st: _RepairState, rd: _Round, cx, lx, A, x, rs, dok):
    """What giving up a replica of each donor's expert ``x`` (on GPU ``rs``) does to ``x``'s
    other holders: ``(dx, wx_new, Hx, xpeak, x_over)`` - the per-replica rise, the new
    per-replica load, ``x``'s replicas per GPU [La, Kd, ep], the peak load of its other
    holders and the excess over the limit they gain [La, Kd]. ``cx``, ``lx``: ``x``'s
    replica count and load."""
    g, li, limit = rd.g, rd.idx[:, None], rd.limit
    wx_new = lx / np.maximum(cx - 1, 1)
    dx = np.where(dok, wx_new - lx / cx, 0.0)
    Hx = st.H[li, x]  # [La, Kd, ep]
    # x's replicas on its other holders (neither the donor's GPU nor A): where none, the
    # load is g exactly (g + 0 * dx), so the excess they gain sums to the same without a mask
    Ho = Hx.copy()
    La, Kd = x.shape
    ar2, ak = np.arange(La)[:, None], np.arange(Kd)[None, :]
    Ho[ar2, ak, rs] = 0
    Ho[ar2, ak, A[:, None]] = 0
    gxn = g[:, None, :] + Ho * dx[:, :, None]  # x's other holders after the drop
    xpeak = np.where(Ho > 0, gxn, -np.inf).max(2)
    x_over = np.maximum(gxn - limit[:, None, None], 0)
    x_over -= np.maximum(g - limit[:, None], 0)[:, None, :]
    return dx, wx_new, Hx, xpeak, x_over.sum(2)


def _apply(st: _RepairState, rd: _Round, sw: _Ops, mv: _Ops) -> np.ndarray:
    """Applies the round's operations; returns, per active layer, whether the heaviest GPU
    had one. The heaviest takes its replica move or its swap, whichever scores higher
    (scores above -1 only); the other heavy GPUs their swaps that reduce the excess at
    least ``_AS_GOOD`` as well per cost and touch none of the GPUs or experts of a move
    (a move changes the weights of its experts and so the loads of their holders)."""
    r_ = rd.r_
    use_m = (mv.score > -1) & (mv.score > sw.score[:, 0])
    use_s = ~use_m & (sw.score[:, 0] > -1)
    moved = use_m | use_s
    # the other heavy GPUs' swaps: only those nearly as good as the heaviest one's operation
    # (any swap that reduces the excess moved 1.4x the bytes at Qwen3 EP16; half as good:
    # 1.03x the bytes of one operation per round, in 0.4x the time at EP128)
    first = np.where(use_m, mv.score, sw.score[:, 0])
    ok = (sw.score > 0) & moved[:, None] & (sw.score >= _AS_GOOD * first[:, None])
    ok[:, 0] = use_s
    if use_m.any():
        ea, eb = rd.c[r_, sw.sa], rd.c[r_, sw.sb]
        xy = mv.x[:, None], mv.y[:, None]
        clash = mv.touched[r_, sw.heavy] | mv.touched[r_, sw.sb // st.P]
        clash |= (ea == xy[0]) | (ea == xy[1]) | (eb == xy[0]) | (eb == xy[1])
        ok &= ~(use_m[:, None] & clash)
    lay, k = np.nonzero(ok)
    if lay.size:
        st.swap(rd.idx[lay], sw.sa[lay, k], sw.sb[lay, k])
    if use_m.any():
        st.replace(rd.idx[use_m], mv.s[use_m], mv.y[use_m])
    return moved


def _fill_empty(cur: np.ndarray, lam: np.ndarray, cnt: np.ndarray) -> None:
    """Give every empty slot (in slot order) a replica of the expert with the largest load
    per replica, as DeepSeek's replication would."""
    for layer in np.flatnonzero((cur < 0).any(1)):
        for s in np.flatnonzero(cur[layer] < 0):
            e = int(np.argmax(lam[layer] / np.maximum(cnt[layer], 1)))
            cur[layer, s] = e
            cnt[layer, e] += 1


def _score(gain, reduction, cost, tol):
    """How much an operation reduces the layer's excess over the target (sum over GPUs of
    load above it) per unit of movement cost, plus a tie-break on the load it removes from
    the heaviest GPU. An operation must lower that GPU and leave every GPU it raises below
    that GPU's load (``gain > tol``, a relative ``_TOL`` of the limit; -inf otherwise: a
    swap of two equal weights gains a rounding error, and repeating it never ended). One
    that does not reduce the excess (a step out of a dead end: it lowers the peak, the next
    one may reduce the excess) scores in (-1, 0), by peak lowered per cost: below every
    operation that reduces it.
    Overwrites ``reduction``."""
    bad = gain <= tol
    flat = reduction <= 0
    np.maximum(cost, _MIN_COST, out=cost)
    reduction /= cost
    gain /= cost
    side = np.maximum(gain, 0.0)
    den = side + 1.0
    np.divide(side, den, out=side)
    side -= 1.0
    gain *= 1e-6
    reduction += gain
    # masked copies, not boolean indexing (these are the repair's largest arrays)
    np.copyto(reduction, side, where=flat)
    np.copyto(reduction, -np.inf, where=bad)
    return reduction
