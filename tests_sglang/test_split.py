"""The steps an update is split into when a layer needs more staging than the bound
(``split_maps``, pure): each step changes at most ``quota`` slots per rank and layer
(a cycle of single copies breaks through a helper slot, or without one moves whole), every
map between holds every expert the end placement needs, and the last map is the new one. The byte-exact update tests run these
steps through SGLang's own code (their small rows split into many steps)."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_pynccl.integrations.sglang import split_maps
from tests_sglang.util import sequence


def _check(old, new, per_rank, quota, steps):
    L = old.shape[0]
    assert (old == new).all() if not steps else (steps[-1] == new).all()
    prev = old
    over = 0
    for m in steps:
        for layer in range(L):
            need = set(np.unique(new[layer])) & set(np.unique(old[layer]))
            assert need <= set(np.unique(m[layer])), (layer, need - set(np.unique(m[layer])))
            ch = np.flatnonzero(m[layer] != prev[layer])
            assert ch.size > 0 or (prev[layer] == new[layer]).all()
            # a slot changes to its end, but a helper (a slot already at its end) may hold
            # another expert for a while
            assert ((m[layer][ch] == new[layer][ch]) | (prev[layer][ch] == new[layer][ch])).all()
            per = np.bincount(ch // per_rank, minlength=old.shape[1] // per_rank)
            if (per > quota).any():
                # over the quota only as a cycle of single copies, moved whole
                counts = np.bincount(prev[layer])
                assert (counts[prev[layer][ch]] == 1).all()
                assert sorted(prev[layer][ch]) == sorted(m[layer][ch])
                over += 1
        prev = m
    return over


def test_within_the_quota_where_no_cycle_is_left():
    old = np.array([[0, 0, 1, 1, 2, 2]])  # 2 ranks x 3 rows, duplicates
    new = np.array([[1, 2, 2, 0, 0, 1]])
    steps = split_maps(old, new, 3, 1)
    assert _check(old, new, 3, 1, steps) == 0
    assert len(steps) == 3  # rank 0 changes 3 rows, one per step


@pytest.mark.parametrize("quota", [1, 2, 3])
def test_steps_with_duplicates_stay_within_the_quota(quota):
    for seed in range(40):
        ws, per = 2 + seed % 3, 3 + seed % 4
        N = ws * per
        maps = sequence(seed, 2, 3, N - ws, N)  # every expert held, duplicates
        for a, b in zip(maps, maps[1:]):
            steps = split_maps(a, b, per, quota)
            _check(a, b, per, quota, steps)


def test_a_cycle_of_single_copies_moves_whole_without_a_helper():
    old = np.array([[0, 1, 2, 3]])  # 2 ranks x 2 rows, one copy each
    new = np.array([[1, 2, 3, 0]])
    steps = split_maps(old, new, 2, 1)
    assert len(steps) == 1 and (steps[0] == new).all()  # no step could take a last copy


def test_a_cycle_breaks_through_a_helper_within_the_quota():
    # rank 0 and 1 swap single copies 0..3 around a cycle; expert 4 is held twice (slots 4
    # and 5, on rank 2), so one of them can hold a copy for a while
    old = np.array([[0, 1, 2, 3, 4, 4]])
    new = np.array([[1, 2, 3, 0, 4, 4]])
    steps = split_maps(old, new, 2, 1)
    assert _check(old, new, 2, 1, steps) == 0
    held = [m[0, 4:] for m in steps]
    assert any(sorted(h) != [4, 4] for h in held) and sorted(held[-1]) == [4, 4]


def test_permutations_reach_the_new_map():
    rng = np.random.default_rng(3)
    for _ in range(30):
        old = np.stack([rng.permutation(12) for _ in range(2)])
        new = np.stack([rng.permutation(12) for _ in range(2)])
        _check(old, new, 4, 1, split_maps(old, new, 4, 1))


def test_unchanged_maps_take_no_step():
    m = np.array([[0, 1, 1, 2]])
    assert split_maps(m, m, 2, 1) == []
