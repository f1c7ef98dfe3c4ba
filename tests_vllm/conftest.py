"""Configuration of the vLLM suite (``make test-vllm``; ``make test`` never collects it).

Every test here runs vLLM 0.33.0's own EPLB code. Without vLLM importable the whole directory
is skipped with that reason. ``VLLM_TARGET_DEVICE=cpu`` is set for this process and the rank
processes it spawns (vLLM otherwise pins host memory, which a CPU torch cannot).

``pools``: one :class:`tests.gpu_util.RankPool` per world size for the whole session (each
rank process imports vLLM once, ~7 s, and keeps its gloo process group between jobs); see
:mod:`tests.engine_suite`.
"""

from __future__ import annotations

import os

from tests.engine_suite import pools_fixture, skip_unless_importable

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    skip_unless_importable(items, "vllm", "vLLM suite: vLLM is not importable")


pools = pools_fixture({"VLLM_TARGET_DEVICE": os.environ["VLLM_TARGET_DEVICE"]})
