"""DeepSeek's EPLB algorithm written plainly, one layer at a time with Python lists: the oracle
that tests/test_placement.py holds ``rebalance(policy="deepseek")`` to, map for map.

Written here from the algorithm's description and the reference's arithmetic (float32 loads,
float32 group sums, load per replica and pack loads in double precision; items visited in the
order of numpy's default argsort of the negated weights, which is the one primitive shared
with the library: equal weights come in that sort's order, as in vLLM's DefaultEplbPolicy).
It is deliberately structured differently from ``eplb_pynccl.placement``: no batching over
layers, replication one replica at a time, packing one item at a time, explicit node loops."""

from __future__ import annotations

import numpy as np


def _sorted_desc(values: list, dtype) -> list[int]:
    return [int(i) for i in np.argsort(-np.array(values, dtype=dtype))]


def pack(values: list, dtype, num_packs: int) -> list[tuple[int, int]]:
    """(pack, position in pack) of each item: heaviest first to the lightest pack with room."""
    n = len(values)
    per = n // num_packs
    if per == 1:
        return [(i, 0) for i in range(n)]
    load = [0.0] * num_packs
    size = [0] * num_packs
    out: list = [None] * n
    for i in _sorted_desc(values, dtype):
        best = None
        for p in range(num_packs):
            if size[p] < per and (best is None or load[p] < load[best]):
                best = p
        out[i] = (best, size[best])
        load[best] += float(values[i])
        size[best] += 1
    return out


def replicate(values: list, total: int) -> tuple[list[int], list[int]]:
    """(replicas per item, the item of each replica: the items, then the added ones)."""
    count = [1] * len(values)
    items = list(range(len(values)))
    for _ in range(total - len(values)):
        best = 0
        for i in range(1, len(values)):
            if float(values[i]) / count[i] > float(values[best]) / count[best]:
                best = i
        count[best] += 1
        items.append(best)
    return count, items


def deepseek_layer(loads, num_physical: int, ep: int, nodes: int, groups) -> list[int]:
    w = [np.float32(x) for x in loads]
    E = len(w)
    if groups is None or groups % nodes:
        nodes, groups = 1, 1  # the global variant
    size = E // groups
    sums = []
    for g in range(groups):
        s = np.float32(0)
        for x in w[g * size : (g + 1) * size]:
            s = np.float32(s + x)
        sums.append(s)
    where = pack(sums, np.float32, nodes)
    per_node = groups // nodes
    node_experts: list[list[int]] = [[] for _ in range(nodes)]
    for node in range(nodes):
        for rank in range(per_node):
            g = next(g for g in range(groups) if where[g] == (node, rank))
            node_experts[node] += list(range(g * size, (g + 1) * size))
    slots_per_node = num_physical // nodes
    gpus_per_node = ep // nodes
    per_gpu = num_physical // ep
    out = []
    for node in range(nodes):
        experts = node_experts[node]
        local = [w[e] for e in experts]
        count, items = replicate(local, slots_per_node)
        weights = [float(local[i]) / count[i] for i in items]
        placed = pack(weights, np.float64, gpus_per_node)
        slots: list = [None] * slots_per_node
        for j, (p, r) in enumerate(placed):
            slots[p * per_gpu + r] = experts[items[j]]
        out += slots
    return out


def deepseek(loads, num_physical: int, ep: int, nodes: int = 1, groups=None) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    return np.array(
        [deepseek_layer(row, num_physical, ep, nodes, groups) for row in loads], dtype=np.int64
    )
