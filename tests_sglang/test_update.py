"""SGLang 0.5.23's own EPLB update paths with eplb_pynccl installed, against SGLang's own
update on the same gloo WORLD, the same maps and the same starting bytes: byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from tests_sglang.util import (
    TIMEOUT,
    clone,
    metadata,
    raw_bytes,
    rebalanced_maps,
    sequence,
    single_layer_update,
    weights,
    world,
)

NUM_LAYERS, PER_RANK, STEPS = 3, 4, 3
ALGORITHMS = (
    "deepseek",
    "deepseek_hierarchical",
    "deepseek_vec",
    "deepseek_vec_hierarchical",
    "elasticity_aware",
    "elasticity_aware_hierarchical",
)


def _maps(torch, source, seed, num_logical, num_physical, nnodes):
    """The map sequence: random placements, or what an SGLang algorithm (or ours, fed with
    the current map through SGLang's global metadata) makes of drifting loads."""
    if source == "random":
        return sequence(seed, STEPS, NUM_LAYERS, num_logical, num_physical)
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.7, size=(NUM_LAYERS, num_logical))
    loads = []
    for _ in range(STEPS):
        base = base * rng.lognormal(0, 0.3, size=base.shape)
        loads.append((base * 1000).astype(np.int64))
    return rebalanced_maps(
        torch, loads, num_logical, num_physical, PER_RANK, source, num_groups=2, num_nodes=nnodes
    )


def raw_job(ctx, seed, nnodes, source):
    """Every step: SGLang's _update_expert_weights_raw (SGLang's own, then eplb_pynccl's,
    then SGLang's again after uninstall()), each on its own copy of the weights."""
    import torch
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl.integrations import sglang as S
    from tests.shuffle_util import check_weights

    rank, ws = world(ctx)
    num_physical = PER_RANK * ws
    num_logical = num_physical - 2
    maps = _maps(torch, source, seed, num_logical, num_physical, nnodes)
    metas = [metadata(torch, m, num_logical, ws) for m in maps]
    start = weights(torch, maps[0], rank, ws, NUM_LAYERS)
    layers = list(range(NUM_LAYERS))
    original = U._update_expert_weights_raw

    def run(w):
        out = []
        for a, b in zip(metas, metas[1:]):
            got = U._update_expert_weights_raw(
                {i: w[i] for i in layers}, a, b, layers, nnodes, rank
            )
            out.append((got, raw_bytes(torch, w)))
        return out

    ref = run(clone(start))
    S.install(transport="torch")
    assert U._update_expert_weights_raw is not original
    ours_w = clone(start)
    ptrs = [t.data_ptr() for layer in ours_w for t in layer]
    ours = run(ours_w)
    S.uninstall()
    restored = U._update_expert_weights_raw is original
    again = run(clone(start))
    checks = []
    w = clone(start)
    for a, b, m in zip(metas, metas[1:], maps[1:]):
        S.install(transport="torch")
        U._update_expert_weights_raw({i: w[i] for i in layers}, a, b, layers, nnodes, rank)
        S.uninstall()
        checks += check_weights(torch, w, m, rank, ws)
    changed = sum(int((x != y).sum()) for x, y in zip(maps, maps[1:]))
    return {
        "same": [r == o for r, o in zip(ref, ours)],
        "returns": [o[0] for o in ours],
        "again": [r == g for r, g in zip(ref, again)],
        "restored": restored,
        "in_place": ptrs == [t.data_ptr() for layer in ours_w for t in layer],
        "checks": checks,
        "changed": changed,
    }


@pytest.mark.parametrize(
    "world_size,nnodes,source",
    [
        (2, 1, "random"),
        (2, 2, "random"),
        (3, 1, "random"),
        (4, 1, "random"),
        (4, 2, "random"),
        (4, 4, "random"),
        (4, 2, "ours"),
        *[(4, 2, a) for a in ALGORITHMS],
    ],
)
def test_raw_update_byte_exact(pools, world_size, nnodes, source):
    res = pools(world_size).run(raw_job, 7 + world_size + nnodes, nnodes, source, timeout=TIMEOUT)
    for r in res:
        assert r["same"] == [True] * STEPS
        assert r["returns"] == [{}] * STEPS
        assert r["again"] == [True] * STEPS
        assert r["restored"] and r["in_place"]
        assert r["checks"] == []
    assert res[0]["changed"] > 0  # the maps moved experts


def single_job(ctx, seed, num_gpu_per_node):
    """update_expert_weights_single_layer called directly (as SGLang's own updater test
    does), SGLang's vs eplb_pynccl's, with temp buffers and debug output."""
    import torch

    from eplb_pynccl.integrations import sglang as S

    rank, ws = world(ctx)
    num_physical = PER_RANK * ws
    maps = sequence(seed, STEPS, 1, num_physical - 1, num_physical)
    start = weights(torch, maps[0], rank, ws, 1)[0]

    def run(w, debug):
        out = []
        for a, b in zip(maps, maps[1:]):
            logs = single_layer_update(
                torch,
                w,
                a[0],
                b[0],
                PER_RANK,
                num_gpu_per_node,
                rank=rank,
                world_size=ws,
                debug=debug,
            )
            out.append(([t.view(torch.uint8).numpy().tobytes() for t in w], logs))
        return out

    ref = run([t.clone() for t in start], False)
    S.install()
    ours = run([t.clone() for t in start], False)
    dbg = run([t.clone() for t in start], True)
    S.uninstall()
    return {
        "same": [r[0] == o[0] for r, o in zip(ref, ours)],
        "ref_logs": [r[1] for r in ref],
        "logs": [o[1] for o in ours],
        "debug_same": [r[0] == d[0] for r, d in zip(ref, dbg)],
        "debug_logs": [d[1] for d in dbg],
    }


@pytest.mark.parametrize("world_size,gpus_per_node", [(2, 1), (2, 2), (4, 2)])
def test_single_layer_byte_exact(pools, world_size, gpus_per_node):
    res = pools(world_size).run(single_job, 3 + world_size, gpus_per_node, timeout=TIMEOUT)
    for r in res:
        assert r["same"] == [True] * STEPS
        assert r["debug_same"] == [True] * STEPS
        assert r["logs"] == r["ref_logs"] == [None] * STEPS
        for lines in r["debug_logs"]:
            assert isinstance(lines, list) and lines
            assert all(isinstance(x, str) and x.startswith("eplb_pynccl: rank ") for x in lines)
