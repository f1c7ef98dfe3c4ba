"""register() and the vllm.general_plugins entry point, each in a fresh interpreter (register
changes vLLM in its process), and vLLM's factory handing out our communicator by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests_vllm.util import TIMEOUT, buffer, coordinator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh(code: str, env: dict | None = None):
    """Run ``code`` in a new interpreter of this environment; it prints one JSON line last."""
    # the repo first, then whatever the caller's path holds (e.g. a carried vLLM bundle)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    full = dict(os.environ, VLLM_TARGET_DEVICE="cpu", PYTHONPATH=path)
    full.update(env or {})
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=full,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


PRELUDE = """
import json, warnings
import pydantic
import vllm.config.parallel as cp
import vllm.distributed.eplb.eplb_communicator as ec
import vllm.distributed.eplb.eplb_state as es
import vllm.distributed.eplb.policy as pol
import vllm.distributed.eplb.rebalance_execute as rx
from eplb_pynccl.integrations import vllm as V

def refused(**kw):
    try:
        cp.EPLBConfig(**kw)
    except (pydantic.ValidationError, ValueError) as e:
        return type(e).__name__
    return None
"""


def test_register_patches_what_it_says_once():
    out = fresh(
        PRELUDE
        + """
factory, loop, rx_loop = ec.create_eplb_communicator, es.rearrange_expert_weights_inplace, rx.rearrange_expert_weights_inplace
r = {"before": [refused(communicator="eplb_pynccl", use_async=False), refused(policy="eplb_pynccl", use_async=False),
               refused(communicator="eplb_pynccl_ipc", use_async=True)]}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    V.register()
    first = ec.create_eplb_communicator
    V.register()
r["warnings"] = [str(w.message) for w in caught]
r["idempotent"] = ec.create_eplb_communicator is first
r["wraps_vllms"] = getattr(ec.create_eplb_communicator, "_eplb_pynccl_original") is factory
r["eplb_state_same"] = es.create_eplb_communicator is ec.create_eplb_communicator
r["loop_wraps_vllms"] = getattr(es.rearrange_expert_weights_inplace, "_eplb_pynccl_original") is loop
r["rx_untouched"] = rx.rearrange_expert_weights_inplace is rx_loop
r["policies"] = {k: v.__name__ for k, v in pol.EPLB_POLICIES.items()}
r["policy_is_vllm_policy"] = issubclass(pol.EPLB_POLICIES["eplb_pynccl"], pol.AbstractEplbPolicy)
c = cp.EPLBConfig(communicator="eplb_pynccl", policy="eplb_pynccl", use_async=False)
r["config"] = [c.communicator, c.policy]
pc = cp.ParallelConfig(eplb_config={"communicator": "eplb_pynccl", "use_async": False})
r["parallel_config"] = pc.eplb_config.communicator
ipc = cp.EPLBConfig(communicator="eplb_pynccl_ipc", use_async=True)  # vLLM's default policy
r["ipc_config"] = [ipc.communicator, ipc.policy, ipc.use_async]
pc = cp.ParallelConfig(eplb_config={"communicator": "eplb_pynccl_ipc"})
r["ipc_parallel_config"] = [pc.eplb_config.communicator, pc.eplb_config.use_async]
r["after"] = [refused(communicator="nope", use_async=False), refused(policy="nope", use_async=False)]
try:
    cp.EPLBConfig(policy="eplb_pynccl", use_async=True)
except pydantic.ValidationError as e:
    r["async_policy"] = e.errors()[0]["msg"]
d = cp.EPLBConfig()
r["default"] = [d.communicator, d.policy, d.use_async]
print(json.dumps(r))
"""
    )
    assert out == {
        "before": ["ValidationError", "ValidationError", "ValidationError"],
        "warnings": [],
        "idempotent": True,
        "wraps_vllms": True,
        "eplb_state_same": True,
        "loop_wraps_vllms": True,
        "rx_untouched": True,
        "policies": {"default": "DefaultEplbPolicy", "eplb_pynccl": "MigrationAwareEplbPolicy"},
        "policy_is_vllm_policy": True,
        "config": ["eplb_pynccl", "eplb_pynccl"],
        "parallel_config": "eplb_pynccl",
        "ipc_config": ["eplb_pynccl_ipc", "default", True],
        "ipc_parallel_config": ["eplb_pynccl_ipc", True],
        "after": ["ValidationError", "ValidationError"],
        # vLLM's own rule still holds: async EPLB takes only its default policy
        "async_policy": "Value error, Async EPLB is only supported with the default policy.",
        "default": [None, "default", True],
    }


@pytest.mark.parametrize("allow", [None, "eplb_pynccl"], ids=["all_plugins", "VLLM_PLUGINS"])
def test_vllms_plugin_loader_registers_us(allow):
    env = {} if allow is None else {"VLLM_PLUGINS": allow}
    out = fresh(
        PRELUDE
        + """
from vllm.plugins import load_general_plugins
load_general_plugins()
print(json.dumps([hasattr(es.create_eplb_communicator, "_eplb_pynccl_original"),
                  "eplb_pynccl" in pol.EPLB_POLICIES, refused(communicator="eplb_pynccl", use_async=False)]))
""",
        env,
    )
    assert out == [True, True, None]


def test_a_vllm_with_other_interfaces_is_refused_and_nothing_patched():
    # vLLM 0.33.0 is the only vLLM here: a later one is emulated by changing the factory's
    # signature as a version that renamed an argument would
    out = fresh(
        PRELUDE
        + """
def create_eplb_communicator(group_coordinator, backend, expert_weights):
    pass
ec.create_eplb_communicator = es.create_eplb_communicator = create_eplb_communicator
import vllm.distributed.eplb.eplb_communicator as m
r = {}
try:
    V.register()
except RuntimeError as e:
    r["error"] = str(e)
r["patched"] = [ec.create_eplb_communicator is create_eplb_communicator, sorted(pol.EPLB_POLICIES),
                refused(communicator="eplb_pynccl", use_async=False)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    V.plugin()  # the entry point: warns, leaves vLLM as it is
r["plugin"] = [str(w.message) for w in caught]
print(json.dumps(r))
"""
    )
    msg = (
        "eplb_pynccl.integrations.vllm was written for vLLM 0.33.0; vLLM 0.33.0 differs: "
        "vllm.distributed.eplb.eplb_communicator.create_eplb_communicator takes "
        "(group_coordinator, backend, expert_weights), not (group_coordinator, backend, "
        "expert_weights, expert_buffer). Nothing was patched."
    )
    assert out == {"error": msg, "patched": [True, ["default"], "ValidationError"], "plugin": [msg]}


def test_an_untested_version_with_the_same_interfaces_is_patched_with_a_warning():
    out = fresh(
        PRELUDE
        + """
import vllm
vllm.__version__ = "0.34.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    V.register()
print(json.dumps([[str(w.message) for w in caught], "eplb_pynccl" in pol.EPLB_POLICIES]))
"""
    )
    assert out == [
        [
            "eplb_pynccl.integrations.vllm is tested with vLLM 0.33.0; vLLM 0.34.0 has the same "
            "interfaces, patching it"
        ],
        True,
    ]


def test_layer_loop_env_is_checked():
    out = fresh(
        PRELUDE
        + """
try:
    V.register()
except ValueError as e:
    print(json.dumps([str(e), sorted(pol.EPLB_POLICIES)]))
""",
        {"EPLB_PYNCCL_VLLM_LAYER_LOOP": "fast"},
    )
    assert out == [
        "EPLB_PYNCCL_VLLM_LAYER_LOOP='fast': expected 'eplb_pynccl' or 'vllm'",
        ["default"],
    ]


def factory_job(ctx, layer_loop):
    import numpy as np
    import torch
    import vllm.distributed.eplb.eplb_state as es

    from eplb_pynccl.integrations import vllm as V
    from tests.shuffle_util import check_weights, make_weights

    V.register(layer_loop=layer_loop)
    gc = coordinator(ctx)
    old = np.array([[0, 1, 2, 3, 4, 5]])
    new = np.array([[3, 4, 5, 0, 1, 2]])
    ws = make_weights(torch, [[((3, 2), torch.float32)]], old, gc.rank_in_group, 2, "cpu")
    buf = buffer(torch, ws)
    # the name vLLM's EplbState.add_model / create_communicator calls
    ours = es.create_eplb_communicator(gc, "eplb_pynccl", ws, buf)
    theirs = es.create_eplb_communicator(gc, "torch_nccl", ws, buf)
    try:
        es.create_eplb_communicator(gc, "nope", ws, buf)
    except ValueError as e:
        unknown = str(e)
    try:  # the IPC name reaches create_communicator(transport="ipc"), which needs CUDA weights
        es.create_eplb_communicator(gc, "eplb_pynccl_ipc", ws, buf)
        ipc = None
    except ValueError as e:
        ipc = str(e)
    stats = es.rearrange_expert_weights_inplace(
        torch.from_numpy(old), torch.from_numpy(new), ws, buf, gc.device_group, ours
    )
    V.register()  # back to the default for the next job in this process
    return (
        type(ours).__name__,
        type(theirs).__name__,
        unknown,
        ipc,
        type(stats).__name__,
        check_weights(torch, ws, new, gc.rank_in_group, 2),
    )


@pytest.mark.parametrize("layer_loop", [True, False])
def test_vllms_factory_hands_out_ours_by_name(pools, layer_loop):
    loop = "RearrangeStats" if layer_loop else "NoneType"  # ours returns stats, vLLM's None
    for res in pools(2).run(factory_job, layer_loop, timeout=TIMEOUT):
        assert res == (
            "EplbPyncclCommunicator",
            "TorchDistNcclEplbCommunicator",
            "Unknown EPLB communicator backend: nope",
            "EPLB communicator 'eplb_pynccl_ipc' moves CUDA expert weights over CUDA IPC; the "
            "expert weights are on cpu (use 'eplb_pynccl' for CPU weights)",
            loop,
            [],
        )
