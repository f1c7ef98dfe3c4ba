"""Configuration of the SGLang suite (``make test-sglang``; ``make test`` never collects it).

Every test here runs SGLang 0.5.23's own EPLB code (its updater, its metadata, its
algorithms) with eplb_pynccl installed into it. Without SGLang importable the whole directory
is skipped with that reason.

``pools``: one :class:`tests.gpu_util.RankPool` per world size for the whole session (each
rank process imports SGLang once, ~3 s, and keeps its gloo WORLD between jobs); a pool that a
failure killed is replaced by a fresh one for the next test.
"""

from __future__ import annotations

import pytest

# SGLang's CPU engine switch: its elastic-EP state (which elasticity_aware reads) otherwise
# refuses a machine without CUDA
RANK_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}


def pytest_collection_modifyitems(config, items):
    try:
        import sglang.srt.eplb.expert_location_updater  # noqa: F401
    except Exception as e:  # ImportError, or an install that breaks on import
        skip = pytest.mark.skip(
            reason=f"SGLang suite: SGLang's EPLB modules do not import ({type(e).__name__}: {e})"
        )
        for item in items:
            item.add_marker(skip)


class _Pools:
    def __init__(self) -> None:
        self._pools: dict = {}

    def __call__(self, world_size: int):
        from tests.gpu_util import RankPool

        pool = self._pools.get(world_size)
        if pool is None or pool.broken:
            pool = self._pools[world_size] = RankPool(world_size, env=RANK_ENV)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = _Pools()
    yield p
    p.close()
