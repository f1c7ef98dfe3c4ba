"""Rank-side helpers of the vLLM suite: a gloo world, vLLM's own GroupCoordinator over it,
expert weights with known bytes, and sequences of random vLLM-style maps."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from eplb_pynccl.transport import Transport
from tests.engine_suite import clone as clone  # re-exported for the suite's tests
from tests.engine_suite import gloo_world

TIMEOUT = 120  # seconds for a job of a few rearrangements on 2 cores (they take well under 10)
# the shape the side-by-side jobs move: layers, slots per EP rank, rearrangements in a row
NUM_LAYERS, PER_RANK, STEPS = 3, 4, 4


def coordinator(ctx, groups=None):
    """vLLM's GroupCoordinator (gloo device and cpu groups) over ``groups`` of this job's ranks
    (default: one group of all), made once per rank process and kept in ``ctx.cache``."""
    from vllm.distributed.parallel_state import GroupCoordinator

    gloo_world(ctx)
    groups = groups or [list(range(ctx.world_size))]
    key = ("coordinator", repr(groups))
    gc = ctx.cache.get(key)
    if gc is None:
        gc = ctx.cache[key] = GroupCoordinator(
            groups,
            local_rank=ctx.rank,
            torch_distributed_backend="gloo",
            use_device_communicator=False,
            group_name="eplb_pynccl_test",
        )
    return gc


def specs(torch, dtype: str):
    """Tensors of one MoE layer (every layer has the same, as vLLM's expert_buffer needs):
    two weights of different row sizes in ``dtype``, or one fp32 and one bf16 (``mixed``)."""
    if dtype == "mixed":
        return [((6, 4), torch.float32), ((5, 3), torch.bfloat16)]
    dt = getattr(torch, dtype)
    return [((6, 4), dt), ((5, 3), dt)]


def weights(torch, layer_spec, num_layers, old, ep_rank, ep_size):
    from tests.shuffle_util import make_weights

    return make_weights(torch, [layer_spec] * num_layers, old, ep_rank, ep_size, "cpu")


def buffer(torch, ws):
    return [torch.empty_like(t) for t in ws[0]]


def sequence(seed: int, steps: int, num_layers: int, ep_size: int, per_rank: int, *, empty=0.15):
    """``steps + 1`` maps [num_layers, ep_size * per_rank]: random placements with duplicate
    replicas, -1 slots, unchanged slots, experts moving across ranks and within one; every
    expert a map uses is held somewhere in the map before it (as vLLM's policy guarantees).
    The same on every rank (seeded)."""
    from tests.shuffle_util import random_maps, restrict_to_held

    rng = np.random.default_rng(seed)
    num_logical = max(2, ep_size * per_rank - 2)
    cur, _ = random_maps(rng, num_layers, num_logical, ep_size, per_rank, empty_frac=empty)
    maps = [cur]
    for _ in range(steps):
        _, nxt = random_maps(rng, num_layers, num_logical, ep_size, per_rank, empty_frac=empty)
        restrict_to_held(cur, nxt)
        maps.append(nxt)
        cur = nxt
    return maps


class SideBySide(NamedTuple):
    """The start of a job that runs vLLM's loop and ours on the same maps (see side_by_side)."""

    gc: Any
    maps: list
    ref: list
    ours: list
    ref_buf: list
    our_buf: list
    ref_comm: Any


def side_by_side(ctx, torch, seed: int, dtype: str, groups=None) -> SideBySide:
    """vLLM's GroupCoordinator, ``STEPS + 1`` maps (``NUM_LAYERS`` layers, ``PER_RANK`` slots
    per rank), the reference weights with vLLM's torch_nccl communicator, our copy of them, and
    a buffer for each."""
    from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator

    gc = coordinator(ctx, groups)
    ep_rank, ep_size = gc.rank_in_group, gc.world_size
    maps = sequence(seed, STEPS, NUM_LAYERS, ep_size, PER_RANK)
    ref = weights(torch, specs(torch, dtype), NUM_LAYERS, maps[0], ep_rank, ep_size)
    ours = clone(ref)
    ref_buf, our_buf = buffer(torch, ref), buffer(torch, ours)
    ref_comm = create_eplb_communicator(gc, "torch_nccl", ref, ref_buf)
    return SideBySide(gc, maps, ref, ours, ref_buf, our_buf, ref_comm)


def row_bytes(torch, ws) -> list:
    """Every row of every tensor as bytes: [layer][tensor][row]."""
    out = []
    for layer in ws:
        lt = []
        for t in layer:
            host = t.contiguous().view(torch.uint8).view(t.shape[0], -1).numpy()
            lt.append([host[r].tobytes() for r in range(t.shape[0])])
        out.append(lt)
    return out


def differences(torch, a, b, new_map, ep_rank, ep_size) -> dict:
    """Rows that differ between weight sets ``a`` and ``b``: {"filled": [...], "empty": [...]}
    (empty: the slot is -1 in ``new_map``)."""
    per = a[0][0].shape[0]
    ra, rb = row_bytes(torch, a), row_bytes(torch, b)
    out = {"filled": [], "empty": []}
    for layer in range(len(ra)):
        for i in range(len(ra[layer])):
            for r in range(per):
                if ra[layer][i][r] != rb[layer][i][r]:
                    kind = "empty" if new_map[layer, ep_rank * per + r] < 0 else "filled"
                    out[kind].append((layer, i, r))
    return out


class CountingTransport(Transport):
    """A real transport (the one given) that also records the messages of each exchange."""

    def __init__(self, inner):
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.exchanges: list = []

    @property
    def device(self):
        return self.inner.device

    def check_tensor(self, t, name):
        self.inner.check_tensor(t, name)

    def exchange(self, sends, recvs, stream=None):
        self.exchanges.append(
            ([(p, t.nbytes) for p, t in sends], [(p, t.nbytes) for p, t in recvs])
        )
        self.inner.exchange(sends, recvs, stream)

    def wait(self, stream=None, timeout=None):
        self.inner.wait(stream, timeout)

    def all_gather_bytes(self, data):
        return self.inner.all_gather_bytes(data)
