"""Rank-side helpers of the SGLang suite: SGLang's gloo WORLD, its ExpertLocationMetadata
built from a map, expert weights with known bytes and sequences of SGLang-style maps (every
logical expert held in every layer, duplicates, no empty slot)."""

from __future__ import annotations

import numpy as np

from tests.engine_suite import clone as clone  # re-exported for the suite's tests
from tests.engine_suite import gloo_world

world = gloo_world  # the WORLD gloo group of a job's ranks (made once per rank process)

TIMEOUT = 150  # seconds for a job of a few updates on 2 shared cores (they take well under 10)


def metadata(torch, phy_map, num_logical: int, ep_size: int):
    """SGLang's ExpertLocationMetadata for ``phy_map`` [layers, physical] (the fields SGLang's
    updater reads and updates; no static dispatch map)."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    phy = torch.as_tensor(np.asarray(phy_map), dtype=torch.int64)
    L, N = phy.shape
    holders = [[[] for _ in range(num_logical)] for _ in range(L)]
    for layer in range(L):
        for s in range(N):
            holders[layer][int(phy[layer, s])].append(s)
    width = max(len(h) for lh in holders for h in lh)
    l2p = torch.full((L, num_logical, N), -1, dtype=torch.int64)
    for layer in range(L):
        for e in range(num_logical):
            l2p[layer, e, : len(holders[layer][e])] = torch.tensor(holders[layer][e])
    del width
    return ExpertLocationMetadata(
        physical_to_logical_map=phy.clone(),
        physical_to_logical_map_cpu=phy.clone(),
        logical_to_all_physical_map=l2p.clone(),
        logical_to_all_physical_map_cpu=l2p.clone(),
        logical_to_all_physical_map_num_valid=(l2p != -1).sum(-1),
        ep_size=ep_size,
        logical_to_rank_dispatch_physical_map=None,
    )


def rebalanced_maps(
    torch,
    loads,
    num_logical: int,
    num_physical: int,
    per_rank: int,
    algorithm: str,
    *,
    num_groups: int | None = None,
    num_nodes: int = 1,
):
    """The maps SGLang's ``rebalance_experts`` makes of ``loads`` (per step an int64 array of
    token counts ``[layers, experts]``), one per step, each fed the previous map as SGLang's
    global metadata: SGLang's ``algorithm``, or ours through it (``"ours"``: its ``deepseek``
    entry with ``install(policy="migration_aware")``). Returns ``steps + 1`` maps, the first one the identity placement."""
    from sglang.srt.eplb import eplb_algorithms as A
    from sglang.srt.eplb import expert_location as el

    from eplb_pynccl.integrations import sglang as S

    cur = np.stack([np.arange(num_physical) % num_logical] * len(loads[0]))
    maps = [cur]
    ours = algorithm == "ours"
    algo = A.EplbAlgorithm["deepseek" if ours else algorithm]
    if ours:
        S.install(policy="migration_aware")
    try:
        for tokens in loads:
            el.set_global_expert_location_metadata(
                metadata(torch, cur, num_logical, num_physical // per_rank), allow_overwrite=True
            )
            tokens = torch.from_numpy(tokens.astype(np.int64))[None]
            phy, _, _ = A.rebalance_experts(
                tokens, num_physical, per_rank, num_groups, num_nodes, algo
            )
            cur = phy.numpy().astype(np.int64)
            maps.append(cur)
    finally:
        el.set_global_expert_location_metadata(None, allow_overwrite=True)
        if ours:
            S.uninstall()
    return maps


def single_layer_update(torch, w, old_row, new_row, per_rank: int, gpus_per_node: int, **kw):
    """SGLang's ``update_expert_weights_single_layer`` (whichever is installed) on one layer's
    weights ``w``, from map row ``old_row`` to ``new_row`` [physical], with fresh temp buffers,
    as SGLang's own updater test calls it; ``kw``: ``rank``, ``world_size`` and optionally
    ``debug``. Returns what it returns."""
    from sglang.srt.eplb import expert_location_updater as U

    return U.update_expert_weights_single_layer(
        routed_experts_weights=w,
        temp_buffers=[torch.empty_like(t) for t in w],
        old_physical_to_logical_map=old_row.tolist(),
        new_physical_to_logical_map=new_row.tolist(),
        num_local_physical_experts=per_rank,
        num_gpu_per_node=gpus_per_node,
        **kw,
    )


def placement(rng, num_layers: int, num_logical: int, num_physical: int) -> np.ndarray:
    """A random map: every logical expert once, the other slots random duplicates."""
    out = np.empty((num_layers, num_physical), dtype=np.int64)
    for layer in range(num_layers):
        extra = rng.integers(0, num_logical, size=num_physical - num_logical)
        out[layer] = rng.permutation(np.concatenate([np.arange(num_logical), extra]))
    return out


def sequence(seed: int, steps: int, num_layers: int, num_logical: int, num_physical: int):
    """``steps + 1`` maps; each step keeps some slots and moves the rest (the same on every
    rank: seeded)."""
    rng = np.random.default_rng(seed)
    maps = [placement(rng, num_layers, num_logical, num_physical)]
    for _ in range(steps):
        nxt = placement(rng, num_layers, num_logical, num_physical)
        keep = rng.random(nxt.shape) < 0.3
        cand = np.where(keep, maps[-1], nxt)
        # a kept slot may drop an expert's last replica: keep only layers that hold them all
        ok = np.array([np.isin(np.arange(num_logical), row).all() for row in cand])
        maps.append(np.where(ok[:, None], cand, nxt))
    return maps


def specs(torch):
    """Tensors of one MoE layer as SGLang holds them: w13 and w2 of different row sizes and
    dtypes, and a small per-expert scale."""
    return [((6, 4), torch.bfloat16), ((5, 3), torch.float32), ((2,), torch.float32)]


def weights(torch, maps0, rank: int, world_size: int, num_layers: int):
    from tests.shuffle_util import make_weights

    return make_weights(torch, [specs(torch)] * num_layers, maps0, rank, world_size, "cpu")


def raw_bytes(torch, ws) -> list:
    """Every tensor's bytes (exact comparison: random bytes hold NaNs)."""
    return [[t.contiguous().view(torch.uint8).numpy().tobytes() for t in layer] for layer in ws]
