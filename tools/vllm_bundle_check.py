#!/usr/bin/env python
"""Check that vLLM's EPLB modules import and run from an unpacked vLLM bundle.

Run it on the machine that got the archive of ``tools/vllm_bundle.py``, from the repository
root, after unpacking::

    python -m tarfile -e build/vllm-py312.tar.xz build      # -> build/vllm-site
    VLLM_TARGET_DEVICE=cpu PYTHONPATH=$PWD/build/vllm-site \\
        python tools/vllm_bundle_check.py --expect-under build/vllm-site

``VLLM_TARGET_DEVICE=cpu`` is required wherever the bundle runs (the script sets it when it is
unset): the bundle carries none of vLLM's compiled extensions, and vLLM's CUDA platform imports
``vllm._C_stable_libtorch`` (built for vLLM's own torch) as soon as it is selected. The CPU
platform only changes what vLLM itself would allocate (no pinned memory); the EPLB functions
checked here run on whatever tensors they are given, CUDA tensors included.

What it does: imports ``vllm.distributed.eplb.{rebalance_execute, eplb_communicator,
eplb_state, policy}`` and ``vllm.config.parallel``, prints vLLM's and torch's versions, the
platform vLLM picked and where the modules came from; then, on one rank (a one-process
torch.distributed group: NCCL on CUDA, gloo otherwise, over 127.0.0.1), runs vLLM's
``move_to_buffer`` + ``move_from_buffer`` and then ``transfer_layer`` + ``move_from_buffer``
on a tiny layer (two weights, fp32 and bf16, six local experts, duplicates and an empty slot)
with vLLM's ``TorchDistNcclEplbCommunicator``, on CUDA tensors when CUDA is available (else on
CPU, or as ``--device`` says), and checks every filled slot holds its expert. The last line is
``OK ...`` (exit 0) or ``FAIL: <reason>`` (exit 1).

``--expect-under DIR``: fail unless vllm and its dependencies (pydantic, transformers, ...) were
imported from DIR (catches an ambient install shadowing the bundle). ``--dump-modules FILE``:
write ``{module: file}`` of everything imported to FILE (``tools/vllm_bundle.py`` uses this to
find the packages to bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

MODULES = (
    "vllm.distributed.eplb.rebalance_execute",
    "vllm.distributed.eplb.eplb_communicator",
    "vllm.distributed.eplb.eplb_state",
    "vllm.distributed.eplb.policy",
    "vllm.config.parallel",
)
# Imported by the modules above; checked by --expect-under.
BUNDLED_SAMPLE = ("vllm", "pydantic", "pydantic_core", "transformers", "msgspec", "zmq")

NUM_LOCAL = 6
OLD = [0, 1, 2, 3, 4, 5]
NEW = [3, 3, 0, -1, 5, 1]  # a duplicate, an empty slot, experts moving within the rank
NEWER = [1, 5, 3, 0, 0, -1]  # every expert held in NEW (one rank holds them all)


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
    for i, w in enumerate(ws):
        host = w.float().cpu()
        for r, e in enumerate(new):
            if e >= 0 and not bool((host[r] == float(e)).all()):
                raise AssertionError(
                    f"{what}: weight {i} slot {r} holds {host[r].tolist()}, expected expert {e}"
                )


def run(device_arg: str) -> str:
    import numpy as np
    import torch
    import torch.distributed as dist
    import vllm
    import vllm.distributed.eplb.rebalance_execute as rx
    from vllm.distributed.eplb.eplb_communicator import TorchDistNcclEplbCommunicator
    from vllm.platforms import current_platform

    for m in MODULES:
        __import__(m)
    print(f"vllm {vllm.__version__} from {os.path.dirname(vllm.__file__)}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), numpy {np.__version__}")
    print(f"vLLM platform: {type(current_platform).__name__}")

    cuda = torch.cuda.is_available()
    if device_arg == "auto":
        device = "cuda" if cuda else "cpu"
    else:
        device = device_arg
        if device == "cuda" and not cuda:
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
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
        group = dist.group.WORLD
        comm = TorchDistNcclEplbCommunicator(ep_group=group)
        ws = _weights(torch, device, OLD)
        buf = [torch.empty_like(w) for w in ws]
        old, new, newer = (np.array(m, dtype=np.int64) for m in (OLD, NEW, NEWER))

        md = rx.move_to_buffer(NUM_LOCAL, old, new, ws, buf, None, 0, comm)
        rx.move_from_buffer(ws, buf, md, new, 0)
        if device == "cuda":
            torch.cuda.synchronize()
        _check(torch, ws, NEW, "move_to_buffer + move_from_buffer")

        md = rx.transfer_layer(torch.from_numpy(new), torch.from_numpy(newer), ws, buf, group, comm)
        rx.move_from_buffer(ws, buf, md, newer, 0)
        if device == "cuda":
            torch.cuda.synchronize()
        _check(torch, ws, NEWER, "transfer_layer + move_from_buffer")
    finally:
        dist.destroy_process_group()
    return f"vllm {vllm.__version__}, torch {torch.__version__}, device {device}"


def _expect_under(root: str) -> None:
    root = os.path.realpath(root)
    bad = []
    for name in BUNDLED_SAMPLE:
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None) if mod else None
        if f is None or not os.path.realpath(f).startswith(root + os.sep):
            bad.append(f"{name} from {f}")
    if bad:
        raise RuntimeError(f"not imported from {root}: " + "; ".join(bad))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--expect-under", metavar="DIR")
    ap.add_argument("--dump-modules", metavar="FILE")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    t0 = time.perf_counter()
    try:
        what = run(args.device)
        if args.expect_under:
            _expect_under(args.expect_under)
    except BaseException as e:  # noqa: BLE001 - the reason is the output
        traceback.print_exc()
        print(f"FAIL: {type(e).__name__}: {e}")
        return 1
    finally:
        if args.dump_modules:
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
            with open(args.dump_modules, "w") as fh:
                json.dump(mods, fh, indent=0, sort_keys=True)
    print(f"OK {what} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
