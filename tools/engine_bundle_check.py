#!/usr/bin/env python
"""Check that an engine's EPLB modules import and run from an unpacked engine bundle.

Run it on the machine that got the archive of ``tools/engine_bundle.py``, from the repository
root, after unpacking::

    python -m tarfile -e build/vllm-py312.tar.xz build      # -> build/vllm-site
    PYTHONPATH=$PWD/build/vllm-site:$PWD \\
        python tools/engine_bundle_check.py --engine vllm --expect-under build/vllm-site

    python -m tarfile -e build/sglang-py312.tar.xz build    # -> build/sglang-site
    PYTHONPATH=$PWD/build/sglang-site:$PWD \\
        python tools/engine_bundle_check.py --engine sglang --expect-under build/sglang-site

``--engine vllm`` (the default): ``VLLM_TARGET_DEVICE=cpu`` is required wherever the bundle
runs (the script sets it when it is unset): the bundle carries none of vLLM's compiled
extensions, and vLLM's CUDA platform imports ``vllm._C_stable_libtorch`` (built for vLLM's own
torch) as soon as it is selected. The CPU platform only changes what vLLM itself would
allocate (no pinned memory); the EPLB functions checked here run on whatever tensors they are
given, CUDA tensors included. It imports ``vllm.distributed.eplb.{rebalance_execute,
eplb_communicator, eplb_state, policy}`` and ``vllm.config.parallel``, then runs vLLM's
``move_to_buffer`` + ``move_from_buffer`` and then ``transfer_layer`` + ``move_from_buffer``
on a tiny layer (two weights, fp32 and bf16, six local experts, duplicates and an empty slot)
with vLLM's ``TorchDistNcclEplbCommunicator``.

``--engine sglang``: imports ``sglang.srt.eplb.{eplb_algorithms, expert_location,
expert_location_updater}`` and ``eplb_pynccl.integrations.sglang``, then runs SGLang's own
``update_expert_weights_single_layer`` on the same kind of layer (no empty slot: SGLang's maps
have none) and then the same call with eplb_pynccl installed (``install(transport="auto")``),
and SGLang's ``rebalance_experts`` (``deepseek``) on a small load. ``SGLANG_USE_CPU_ENGINE=1``
is set (when unset) where the device is the CPU: SGLang's elastic-EP state otherwise refuses a
machine without CUDA.

Both print the engine's and torch's versions and where the modules came from; the transfers
run on one rank (a one-process torch.distributed group: NCCL on CUDA, gloo otherwise, over
127.0.0.1), on CUDA tensors when CUDA is available (else on CPU, or as ``--device`` says), and
check every filled slot holds its expert. The last line is ``OK ...`` (exit 0) or
``FAIL: <reason>`` (exit 1).

``--expect-under DIR``: fail unless the engine and its dependencies (pydantic, ...) were
imported from DIR (catches an ambient install shadowing the bundle). ``--dump-modules FILE``:
write ``{module: file}`` of everything imported to FILE (``tools/engine_bundle.py`` uses this
to find the packages to bundle).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

# Per engine: the modules to import, the modules --expect-under checks (imported by those),
# the environment set where unset (for "cpu": only where the device is the CPU).
ENGINES = {
    "vllm": {
        "modules": (
            "vllm.distributed.eplb.rebalance_execute",
            "vllm.distributed.eplb.eplb_communicator",
            "vllm.distributed.eplb.eplb_state",
            "vllm.distributed.eplb.policy",
            "vllm.config.parallel",
        ),
        "sample": ("vllm", "pydantic", "pydantic_core", "transformers", "msgspec", "zmq"),
        "env": {"VLLM_TARGET_DEVICE": "cpu"},
        "cpu_env": {},
    },
    "sglang": {
        "modules": (
            "sglang.srt.eplb.eplb_algorithms",
            "sglang.srt.eplb.expert_location",
            "sglang.srt.eplb.expert_location_updater",
            "eplb_pynccl.integrations.sglang",
        ),
        "sample": ("sglang", "pydantic", "pydantic_core", "einops", "orjson", "zmq"),
        "env": {},
        "cpu_env": {"SGLANG_USE_CPU_ENGINE": "1"},
    },
}

NUM_LOCAL = 6
OLD = [0, 1, 2, 3, 4, 5]
NEW = [3, 3, 0, -1, 5, 1]  # a duplicate, an empty slot, experts moving within the rank
NEWER = [1, 5, 3, 0, 0, -1]  # every expert held in NEW (one rank holds them all)
SG_NEW = [3, 3, 0, 4, 5, 1]  # SGLang's maps have no empty slot
SG_NEWER = [1, 5, 3, 0, 0, 4]
SG_LAST = [4, 0, 1, 5, 3, 3]  # every expert held in SG_NEWER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(torch, device, old):
    """Two weights of one layer: row r holds float(expert in slot r) (-1 for an empty slot)."""
    ws = []
    for cols, dtype in ((4, torch.float32), (3, torch.bfloat16)):
        rows = torch.tensor(old, dtype=torch.float32).reshape(-1, 1).repeat(1, cols)
        ws.append(rows.to(device=device, dtype=dtype))
    return ws


def _check(torch, ws, new, what):
    if ws[0].is_cuda:
        torch.cuda.synchronize()
    for i, w in enumerate(ws):
        host = w.float().cpu()
        for r, e in enumerate(new):
            if e >= 0 and not bool((host[r] == float(e)).all()):
                raise AssertionError(
                    f"{what}: weight {i} slot {r} holds {host[r].tolist()}, expected expert {e}"
                )


def _device(torch, device_arg: str) -> str:
    cuda = torch.cuda.is_available()
    if device_arg == "auto":
        return "cuda" if cuda else "cpu"
    if device_arg == "cuda" and not cuda:
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    return device_arg


@contextlib.contextmanager
def _one_rank(torch, device: str):
    """A one-process torch.distributed WORLD (NCCL on CUDA, gloo otherwise); yields it."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)
    print(f"device {device}, torch.distributed backend {backend}, 1 rank")
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _versions(name: str, mod) -> None:
    import numpy as np
    import torch

    print(f"{name} {mod.__version__} from {os.path.dirname(mod.__file__)}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), numpy {np.__version__}")


def run_vllm(device: str) -> str:
    import numpy as np
    import torch
    import vllm
    import vllm.distributed.eplb.rebalance_execute as rx
    from vllm.distributed.eplb.eplb_communicator import TorchDistNcclEplbCommunicator
    from vllm.platforms import current_platform

    _versions("vllm", vllm)
    print(f"vLLM platform: {type(current_platform).__name__}")
    with _one_rank(torch, device) as group:
        comm = TorchDistNcclEplbCommunicator(ep_group=group)
        ws = _weights(torch, device, OLD)
        buf = [torch.empty_like(w) for w in ws]
        old, new, newer = (np.array(m, dtype=np.int64) for m in (OLD, NEW, NEWER))

        md = rx.move_to_buffer(NUM_LOCAL, old, new, ws, buf, None, 0, comm)
        rx.move_from_buffer(ws, buf, md, new, 0)
        _check(torch, ws, NEW, "move_to_buffer + move_from_buffer")

        md = rx.transfer_layer(torch.from_numpy(new), torch.from_numpy(newer), ws, buf, group, comm)
        rx.move_from_buffer(ws, buf, md, newer, 0)
        _check(torch, ws, NEWER, "transfer_layer + move_from_buffer")
    return f"vllm {vllm.__version__}, torch {torch.__version__}, device {device}"


def run_sglang(device: str) -> str:
    import numpy as np
    import sglang
    import torch
    from sglang.srt.eplb import eplb_algorithms as A
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl.integrations import sglang as S
    from tests_sglang.util import metadata  # this repository's: run from its root

    _versions("sglang", sglang)

    def layer_update(ws, old, new):
        return U.update_expert_weights_single_layer(
            routed_experts_weights=ws,
            temp_buffers=[torch.empty_like(w) for w in ws],
            old_physical_to_logical_map=old,
            new_physical_to_logical_map=new,
            num_local_physical_experts=NUM_LOCAL,
            num_gpu_per_node=1,
            rank=0,
            world_size=1,
        )

    with _one_rank(torch, device):
        ws = _weights(torch, device, OLD)
        layer_update(ws, OLD, SG_NEW)
        _check(torch, ws, SG_NEW, "SGLang's update_expert_weights_single_layer")
        S.install(transport="auto")
        try:
            layer_update(ws, SG_NEW, SG_NEWER)
        finally:
            S.uninstall()
        _check(torch, ws, SG_NEWER, "update_expert_weights_single_layer with eplb_pynccl")
        # SGLang's updater end to end (it updates the global metadata), eplb_pynccl installed
        el.set_global_expert_location_metadata(
            metadata(torch, np.array([SG_NEWER]), NUM_LOCAL, 1), allow_overwrite=True
        )
        S.install(transport="auto")
        try:
            missing = U.ExpertLocationUpdater().update(
                {0: ws}, metadata(torch, np.array([SG_LAST]), NUM_LOCAL, 1), [0], 1, 0
            )
        finally:
            S.uninstall()
            el.set_global_expert_location_metadata(None, allow_overwrite=True)
        _check(torch, ws, SG_LAST, "ExpertLocationUpdater.update with eplb_pynccl")
        if missing:
            raise AssertionError(f"ExpertLocationUpdater.update: missing {missing}")
    tokens = torch.tensor([[[5, 1, 9, 2]]], dtype=torch.int64)  # [steps, layers, experts]
    phy, _, _ = A.rebalance_experts(tokens, 6, 3, None, 1, A.EplbAlgorithm.deepseek)
    held = sorted(set(phy[0].tolist()))
    if held != [0, 1, 2, 3]:
        raise AssertionError(f"rebalance_experts: map {phy.tolist()} does not hold every expert")
    return f"sglang {sglang.__version__}, torch {torch.__version__}, device {device}"


RUNS = {"vllm": run_vllm, "sglang": run_sglang}


def _expect_under(root: str, sample) -> None:
    root = os.path.realpath(root)
    bad = []
    for name in sample:
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None) if mod else None
        if f is None or not os.path.realpath(f).startswith(root + os.sep):
            bad.append(f"{name} from {f}")
    if bad:
        raise RuntimeError(f"not imported from {root}: " + "; ".join(bad))


def _dump_modules(path: str) -> None:
    mods = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not isinstance(f, str):
            try:  # a namespace package has a __path__ and no __file__
                f = next(iter(mod.__path__), None)
            except Exception:
                f = None
        if isinstance(f, str):
            mods[name] = f
    with open(path, "w") as fh:
        json.dump(mods, fh, indent=0, sort_keys=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=sorted(ENGINES), default="vllm")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--expect-under", metavar="DIR")
    ap.add_argument("--dump-modules", metavar="FILE")
    args = ap.parse_args(argv)
    spec = ENGINES[args.engine]
    for k, v in spec["env"].items():
        os.environ.setdefault(k, v)
    t0 = time.perf_counter()
    try:
        import torch

        device = _device(torch, args.device)
        if device == "cpu":
            for k, v in spec["cpu_env"].items():
                os.environ.setdefault(k, v)
        for m in spec["modules"]:
            __import__(m)
        what = RUNS[args.engine](device)
        if args.expect_under:
            _expect_under(args.expect_under, spec["sample"])
    except BaseException as e:  # noqa: BLE001 - the reason is the output
        traceback.print_exc()
        print(f"FAIL: {type(e).__name__}: {e}")
        return 1
    finally:
        if args.dump_modules:
            _dump_modules(args.dump_modules)
    print(f"OK {what} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
