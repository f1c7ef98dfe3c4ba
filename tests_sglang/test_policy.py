"""install(policy="migration_aware"): SGLang's own rebalance_experts (the dispatcher its
ExpertLocationMetadata.init_by_eplb calls) returns eplb_pynccl's placement, fed with the
current map from SGLang's global metadata; the same three outputs, shapes and dtypes as
SGLang's algorithm of the same name."""

from __future__ import annotations

import numpy as np
import pytest

from tests_sglang.util import metadata

ALGOS = ("deepseek", "deepseek_hierarchical", "deepseek_vec", "deepseek_vec_hierarchical")
L, E, N, P = 3, 16, 24, 6  # layers, logical, physical, slots per rank (4 ranks)


@pytest.fixture
def sglang_modules():
    from sglang.srt.eplb import eplb_algorithms as A
    from sglang.srt.eplb import expert_location as el

    from eplb_pynccl.integrations import sglang as S

    yield A, el, S
    S.uninstall()
    el.set_global_expert_location_metadata(None, allow_overwrite=True)


def _tokens(torch, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(1, 1000, size=(2, L, E)))


def _consistent(phy, l2p, cnt):
    phy, l2p, cnt = (x.numpy().astype(np.int64) for x in (phy, l2p, cnt))
    for layer in range(L):
        assert sorted(set(phy[layer].tolist())) == list(range(E))  # every expert held
        for e in range(E):
            slots = np.flatnonzero(phy[layer] == e)
            assert cnt[layer, e] == slots.size
            got = l2p[layer, e]
            assert sorted(got[got >= 0].tolist()) == slots.tolist()
            assert (got[slots.size :] == -1).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_same_outputs_as_sglang(sglang_modules, algo):
    import torch

    A, el, S = sglang_modules
    tokens = _tokens(torch, 1)
    theirs = A.rebalance_experts(tokens, N, P, 4, 2, A.EplbAlgorithm[algo])
    S.install(policy="migration_aware")
    assert A.rebalance_experts is not S.installed() and hasattr(
        A.rebalance_experts, "_eplb_pynccl_original"
    )
    ours = A.rebalance_experts(tokens, N, P, 4, 2, A.EplbAlgorithm[algo])
    assert [tuple(x.shape) for x in ours] == [tuple(x.shape) for x in theirs]
    assert [x.dtype for x in ours] == [x.dtype for x in theirs]
    assert all(x.device.type == "cpu" for x in ours)
    _consistent(*ours)


def test_fed_with_the_current_map(sglang_modules):
    """With SGLang's current map in its global metadata, a small drift changes few slots, at
    the imbalance SGLang's deepseek reaches; uninstall() gives SGLang's algorithm back."""
    import torch

    A, el, S = sglang_modules
    algo = A.EplbAlgorithm.deepseek
    tokens = _tokens(torch, 2)
    cur, _, _ = A.rebalance_experts(tokens, N, P, 4, 1, algo)
    el.set_global_expert_location_metadata(metadata(torch, cur, E, N // P), allow_overwrite=True)
    rng = np.random.default_rng(3)
    drift = tokens * torch.from_numpy(rng.uniform(0.9, 1.1, size=tokens.shape))
    drift = drift.round().to(torch.int64)
    theirs = A.rebalance_experts(drift, N, P, 4, 1, algo)
    S.install(policy="migration_aware")
    ours = A.rebalance_experts(drift, N, P, 4, 1, algo)
    _consistent(*ours)
    load = drift.sum(0).double().numpy()

    def imbalance(phy):
        phy = phy.numpy()
        cnt = np.stack([np.bincount(row, minlength=E) for row in phy])
        per_slot = np.take_along_axis(load / cnt, phy, axis=1)
        ranks = per_slot.reshape(L, N // P, P).sum(-1)
        return (ranks.max(1) / ranks.mean(1)).max()

    changed_ours = int((ours[0].numpy() != cur.numpy()).sum())
    changed_theirs = int((theirs[0].numpy() != cur.numpy()).sum())
    assert changed_ours < changed_theirs
    assert imbalance(ours[0]) <= imbalance(theirs[0]) * 1.05
    S.uninstall()
    back = A.rebalance_experts(drift, N, P, 4, 1, algo)
    assert all(torch.equal(a, b) for a, b in zip(back, theirs))


def test_without_a_current_map(sglang_modules):
    """No global metadata (or one of other shape): a fresh placement, still consistent."""
    import torch

    A, el, S = sglang_modules
    S.install(policy="migration_aware")
    el.set_global_expert_location_metadata(
        metadata(torch, np.tile(np.arange(8) % 8, (L, 1)), 8, 2), allow_overwrite=True
    )
    _consistent(*A.rebalance_experts(_tokens(torch, 4), N, P, None, 1, A.EplbAlgorithm.deepseek))
