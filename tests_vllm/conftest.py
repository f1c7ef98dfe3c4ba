"""Configuration of the vLLM suite (``make test-vllm``; ``make test`` never collects it).

Every test here runs vLLM 0.33.0's own EPLB code. Without vLLM importable the whole directory
is skipped with that reason. ``VLLM_TARGET_DEVICE=cpu`` is set for this process and the rank
processes it spawns (vLLM otherwise pins host memory, which a CPU torch cannot).

``pools``: one :class:`tests.gpu_util.RankPool` per world size for the whole session (each
rank process imports vLLM once, ~7 s, and keeps its gloo process group between jobs); a pool
that a failure killed is replaced by a fresh one for the next test.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or an install that breaks on import
        skip = pytest.mark.skip(
            reason=f"vLLM suite: vLLM is not importable ({type(e).__name__}: {e})"
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
            pool = self._pools[world_size] = RankPool(
                world_size, env={"VLLM_TARGET_DEVICE": os.environ["VLLM_TARGET_DEVICE"]}
            )
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = _Pools()
    yield p
    p.close()
