"""eplb_pynccl.integrations without any engine: the module imports, says what it needs, and
its pure parts (message runs, elastic-EP map layout) behave. With vLLM: ``make test-vllm``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from eplb_pynccl.integrations import vllm as V

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_importing_the_package_imports_no_integration():
    code = "import sys, eplb_pynccl; print(sorted(m for m in sys.modules if 'integrations' in m or m == 'vllm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: make test-vllm covers this module")
def test_without_vllm_every_entry_point_says_what_it_needs():
    msg = (
        "eplb_pynccl.integrations.vllm needs vLLM (tested with 0.33.0); importing it failed: "
        "No module named 'vllm'"
    )
    for call in (V.register, lambda: V.EplbPyncclCommunicator, lambda: V.MigrationAwareEplbPolicy):
        with pytest.raises(ImportError) as e:
            call()
        assert str(e.value) == msg
    assert (V.BACKEND, V.POLICY, V.TESTED_VLLM_VERSIONS) == (
        "eplb_pynccl",
        "eplb_pynccl",
        ("0.33.0",),
    )


def test_runs_join_consecutive_sender_rows_only():
    k = [("a",)] * 7
    assert V._runs([], []) == []
    assert V._runs([3], k[:1]) == [(0, 1)]
    assert V._runs([0, 1, 2, 5, 6, None, 7], k) == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert V._runs([None, None], k[:2]) == [(0, 1), (1, 2)]
    assert V._runs([2, 1, 0], k[:3]) == [(0, 1), (1, 2), (2, 3)]  # descending rows do not merge
    assert V._runs([0, 1, 2], [("a",), ("a",), ("b",)]) == [(0, 2), (2, 3)]  # shapes differ


def test_span_is_a_view_only_over_adjacent_rows():
    torch = pytest.importorskip("torch")
    w = torch.arange(24, dtype=torch.float32).view(6, 2, 2)
    v = V._span(torch, [w[1], w[2], w[3]])
    assert v.shape == (3, 2, 2) and v.data_ptr() == w[1].data_ptr() and v.is_contiguous()
    assert torch.equal(v, w[1:4])
    assert V._span(torch, [w[2]]) is not None
    assert V._span(torch, [w[1], w[3]]) is None  # a gap
    assert V._span(torch, [w[2], w[1]]) is None  # out of order
    assert V._span(torch, [w[1], w.clone()[2]]) is None  # another storage
    assert V._span(torch, [w[0][:, 0]]) is None  # not contiguous


def test_rank_mapping_layouts():
    old = np.arange(12).reshape(2, 6)  # 3 ranks x 2 slots
    # scale down 3 -> 2: old rank 1 leaves, old rank 2 becomes rank 1
    new = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    o, n = V._apply_rank_mapping(old, new, {0: 0, 1: -1, 2: 1}, 3)
    assert o is old
    assert n.tolist() == [[10, 11, -1, -1, 12, 13], [20, 21, -1, -1, 22, 23]]
    # scale up 2 -> 3: old rank 1 becomes rank 2, rank 1 is new
    old2 = np.array([[0, 1, 2, 3]])
    o, n = V._apply_rank_mapping(old2, np.zeros((1, 6)), {0: 0, 1: 2}, 3)
    assert o.tolist() == [[0, 1, -1, -1, 2, 3]]
