"""Configuration of the SGLang suite (``make test-sglang``; ``make test`` never collects it).

Every test here runs SGLang 0.5.23's own EPLB code (its updater, its metadata, its
algorithms) with eplb_pynccl installed into it. Without SGLang importable the whole directory
is skipped with that reason.

``pools``: one :class:`tests.gpu_util.RankPool` per world size for the whole session (each
rank process imports SGLang once, ~3 s, and keeps its gloo WORLD between jobs); see
:mod:`tests.engine_suite`.
"""

from __future__ import annotations

from tests.engine_suite import pools_fixture, skip_unless_importable

# SGLang's CPU engine switch: its elastic-EP state (which elasticity_aware reads) otherwise
# refuses a machine without CUDA
RANK_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}


def pytest_collection_modifyitems(config, items):
    skip_unless_importable(
        items,
        "sglang.srt.eplb.expert_location_updater",
        "SGLang suite: SGLang's EPLB modules do not import",
    )


pools = pools_fixture(RANK_ENV)
