"""What the engine suites (``tests_vllm/``, ``tests_sglang/``: each in its own environment,
``make test-vllm`` / ``make test-sglang``) share: the whole directory skipped with the reason
where the engine does not import, one :class:`tests.gpu_util.RankPool` per world size for the
session (each rank process imports the engine once and keeps its gloo WORLD between jobs; a
pool that a failure killed is replaced for the next test), the gloo WORLD of a job's ranks,
and copies of weight sets."""

from __future__ import annotations

from datetime import timedelta

import pytest


def skip_unless_importable(items, module: str, what: str) -> None:
    """Mark every collected test skipped when ``module`` does not import; the reason is
    ``what`` and the import's error."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or an install that breaks on import
        skip = pytest.mark.skip(reason=f"{what} ({type(e).__name__}: {e})")
        for item in items:
            item.add_marker(skip)


class Pools:
    """``pools(world_size)``: the session's RankPool of that size (rank processes get ``env``)."""

    def __init__(self, env: dict) -> None:
        self.env = dict(env)
        self._pools: dict = {}

    def __call__(self, world_size: int):
        from tests.gpu_util import RankPool

        pool = self._pools.get(world_size)
        if pool is None or pool.broken:
            pool = self._pools[world_size] = RankPool(world_size, env=self.env)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def pools_fixture(env: dict):
    """The suite's session-scoped ``pools`` fixture (assign it in its conftest)."""

    @pytest.fixture(scope="session")
    def pools():
        p = Pools(env)
        yield p
        p.close()

    return pools


def tcp_world(ctx, backend: str = "gloo", timeout: timedelta | None = None) -> tuple[int, int]:
    """The WORLD group of this job's ranks over ``backend`` (made once per rank process, at
    the pool's TCP rendezvous; ``timeout`` None: torch's default): (rank, size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{ctx.host}:{ctx.port}",
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timeout,
        )
    return dist.get_rank(), dist.get_world_size()


def gloo_world(ctx) -> tuple[int, int]:
    """The WORLD gloo group of this job's ranks (made once per rank process): (rank, size)."""
    return tcp_world(ctx, "gloo", timedelta(seconds=60))


def clone(ws):
    """A copy of a weight set (``[layer][tensor]``)."""
    return [[t.clone() for t in layer] for layer in ws]
