"""Placement's smaller points of issue 22 item 9: rebalance() says when DeepSeek's
hierarchical variant does not apply (num_groups not divisible by num_nodes falls back to the
global variant with a warning, the same map as asking for it), and placement_imbalance's
errors name its own argument."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from eplb_pynccl import rebalance


def test_groups_that_do_not_divide_over_nodes_warn_and_use_the_global_variant():
    loads = np.random.default_rng(0).random((2, 256)) * 100
    message = (
        "num_groups (8) is not divisible by num_nodes (16): DeepSeek's hierarchical variant "
        "does not apply, the global one is used (num_groups ignored; num_groups=None asks for "
        "it without this warning)"
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$") as rec:
        res = rebalance(loads, 384, 128, num_nodes=16, num_groups=8)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = rebalance(loads, 384, 128, num_nodes=16)
    assert np.array_equal(res.new_map, plain.new_map)


def test_groups_that_divide_over_nodes_do_not_warn():
    loads = np.random.default_rng(1).random((2, 64)) * 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebalance(loads, 96, 16, num_nodes=2, num_groups=8)
        rebalance(loads, 96, 16, num_nodes=1, num_groups=8)


@pytest.mark.parametrize(
    "fill, message",
    [
        (
            0,
            "placement: layer 0 holds no replica of expert 1; a placement must hold every "
            "logical expert",
        ),
        (-3, "placement: layer 0, slot 0 holds expert id -3; ids must be >= -1 (-1 = empty slot)"),
        (9, "placement: layer 0, slot 0 holds expert id 9, which is >= num_logical (8)"),
    ],
)
def test_placement_imbalance_names_its_own_argument(fill, message):
    from eplb_pynccl import placement_imbalance

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        placement_imbalance(np.full((2, 8), fill), np.ones((2, 8)), 2)


def test_one_group_is_no_grouping_and_does_not_warn():
    # num_groups=1 (a model without expert groups) over several nodes: the global variant is
    # what was asked for
    loads = np.random.default_rng(2).random((2, 64)) * 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebalance(loads, 96, 16, num_nodes=4, num_groups=1)
