"""SGLang's EPLB update through eplb_pynccl over CUDA IPC (``install(transport="ipc")``) on a
GPU: 2, 3 and 4 processes sharing one GPU (CUDA IPC works between processes of one device),
one GPU each where there are more.

Each rank process joins a gloo WORLD (file rendezvous: SGLang's set-up group); SGLang's own
code paths run with eplb_pynccl installed: ``_update_expert_weights_raw`` over a random map
sequence (duplicates, experts moving across ranks and within one; bf16 and fp32 tensors of
several row sizes; the default staging bound, a quarter of a layer, so updates split into
steps), ``update_expert_weights_single_layer`` called directly (as SGLang's own updater test
does), and ``ExpertLocationUpdater.update`` end to end (its global metadata updated). After
every update every row is checked byte for byte against the bytes its new expert was made
with, and the weight tensors must keep their storage. SGLang's own update is not run beside
it here: it moves CUDA tensors over the WORLD group, which is gloo in these processes.

SGLang's EPLB modules must import (SGLang 0.5.23 and the pins of
``tests_sglang/requirements-cpu-sglang-0.5.23.txt``); otherwise every test here is skipped
with that reason, or fails where ``EPLB_PYNCCL_TEST_REQUIRE_SGLANG`` is set. A GPU machine
without SGLang or network gets them as the archive of ``tools/engine_bundle.py`` (SGLang's
modules that its EPLB modules import and the cp312 wheels of the rest; torch, numpy and triton
stay the machine's own). Build it on a machine with network::

    make .venv-sglang/.installed
    python tools/engine_bundle.py --engine sglang .venv-sglang   # -> build/sglang-py312.tar.xz

then, on the GPU machine, from the repository root with ``build/sglang-py312.tar.xz`` carried
(an ignored path)::

    d=$(mktemp -d) && python -m tarfile -e build/sglang-py312.tar.xz "$d"
    EPLB_PYNCCL_TEST_REQUIRE_SGLANG=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.:$d/sglang-site \\
        python -m pytest tests/test_gpu_sglang_ipc.py -q

(``PYTHONPATH=.:$d/sglang-site python tools/engine_bundle_check.py --engine sglang
--expect-under $d/sglang-site`` checks the imports and a one-rank update first.)
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.gpu_util import run_ranks

REQUIRE_SGLANG = "EPLB_PYNCCL_TEST_REQUIRE_SGLANG"
LAYERS, PER_RANK, STEPS = 3, 4, 3


def _sglang_missing() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return (
            "SGLang is not importable (put SGLang 0.5.23 and its pinned EPLB dependencies on "
            "PYTHONPATH; see this module's docstring)"
        )
    return None


_MISSING = None if os.environ.get(REQUIRE_SGLANG) else _sglang_missing()
pytestmark = [
    pytest.mark.gpu(gpus=1),
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]


def _devices(procs):
    import torch

    n = torch.cuda.device_count()
    return [r % n for r in range(procs)]


def _job(ctx, rendezvous, seed):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(ctx.device)
    torch.zeros(1, device=ctx.device)  # CUDA up before the rendezvous
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=ctx.rank, world_size=ctx.world_size
    )
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl.integrations import sglang as S

    rank, n = ctx.rank, ctx.world_size
    dev = torch.device("cuda", ctx.device)
    num_physical = PER_RANK * n
    num_logical = num_physical - 1
    out = {"raw": [], "returns": [], "single": [], "updater": None, "kept": None}

    S.install(transport="ipc")
    try:
        _every_layer_raw(torch, U, dev, seed, rank, n, num_logical, num_physical, out)
        _one_layer_directly(torch, dev, seed, rank, n, num_logical, num_physical, out)
        _updater_end_to_end(torch, el, U, dev, seed, rank, n, num_logical, num_physical, out)
    finally:
        S.uninstall()
    return out


def _every_layer_raw(torch, U, dev, seed, rank, n, num_logical, num_physical, out):
    """Every layer of an update: SGLang's _update_expert_weights_raw."""
    from tests.shuffle_util import check_weights, make_weights
    from tests_sglang.util import metadata, sequence, specs

    layers = list(range(LAYERS))
    maps = sequence(seed, STEPS, LAYERS, num_logical, num_physical)
    metas = [metadata(torch, m, num_logical, n) for m in maps]
    w = make_weights(torch, [specs(torch)] * LAYERS, maps[0], rank, n, dev)
    ptrs = [t.data_ptr() for layer in w for t in layer]
    for a, b, m in zip(metas, metas[1:], maps[1:]):
        got = U._update_expert_weights_raw({i: w[i] for i in layers}, a, b, layers, 1, rank)
        torch.cuda.synchronize(dev)
        out["returns"].append(got)
        out["raw"].append(check_weights(torch, w, m, rank, n))
    out["kept"] = ptrs == [t.data_ptr() for layer in w for t in layer]


def _one_layer_directly(torch, dev, seed, rank, n, num_logical, num_physical, out):
    """One layer: update_expert_weights_single_layer called directly."""
    from tests.shuffle_util import check_weights, make_weights
    from tests_sglang.util import sequence, single_layer_update, specs

    one = sequence(seed + 1, STEPS, 1, num_logical, num_physical)
    w1 = make_weights(torch, [specs(torch)], one[0], rank, n, dev)
    for a, b in zip(one, one[1:]):
        logs = single_layer_update(torch, w1[0], a[0], b[0], PER_RANK, n, rank=rank, world_size=n)
        torch.cuda.synchronize(dev)
        out["single"].append((logs, check_weights(torch, w1, b, rank, n)))


def _updater_end_to_end(torch, el, U, dev, seed, rank, n, num_logical, num_physical, out):
    """SGLang's updater end to end, on a subset of the layers (its global metadata updated)."""
    from tests.shuffle_util import check_weights, make_weights
    from tests_sglang.util import metadata, sequence, specs

    layers = list(range(LAYERS))
    old, new = sequence(seed + 2, 1, LAYERS, num_logical, num_physical)
    w2 = make_weights(torch, [specs(torch)] * LAYERS, old, rank, n, dev)
    el.set_global_expert_location_metadata(
        metadata(torch, old, num_logical, n), allow_overwrite=True
    )
    subset = [2, 0]
    missing = U.ExpertLocationUpdater().update(
        {i: w2[i] for i in layers},
        metadata(torch, new, num_logical, n),
        update_layer_ids=subset,
        nnodes=1,
        rank=rank,
    )
    torch.cuda.synchronize(dev)
    expect = old.copy()
    expect[subset] = new[subset]
    meta = el.get_global_expert_location_metadata()
    out["updater"] = {
        "missing": missing,
        "bad": check_weights(torch, w2, expect, rank, n),
        "map": bool(np.array_equal(meta.physical_to_logical_map_cpu.numpy(), expect)),
    }


@pytest.mark.parametrize("procs", [2, 3, 4])
def test_sglang_update_over_ipc_is_exact(procs, tmp_path):
    results = run_ranks(
        _job, procs, str(tmp_path / "rendezvous"), 60 + procs, timeout=180, devices=_devices(procs)
    )
    for r in results:
        assert r["raw"] == [[]] * STEPS, r["raw"]
        assert r["returns"] == [{}] * STEPS
        assert r["kept"], "weight tensors lost their storage"
        assert r["single"] == [(None, [])] * STEPS, r["single"]
        assert r["updater"] == {"missing": {}, "bad": [], "map": True}, r["updater"]
