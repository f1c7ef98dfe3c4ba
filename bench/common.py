"""Helpers the bench parts share: model layouts, placements, expert contents made and checked
on the device, and the comma-list flags.

The parts (``bench/eplb.py``, ``bench/eplb_sequence.py``, ``bench/stress.py``,
``bench/ipc_bench.py``) and the GPU tests import from here; this module imports no part, so
there is no import circle between them.
"""

from __future__ import annotations

import numpy as np

MiB = 1 << 20

# ---- model layouts: (shape of one expert row, dtype name) per weight tensor ------------------

# DeepSeek-V3 fp8: w13 [4096, 7168] and w2 [7168, 2048] float8_e4m3fn, their fp32 block scales
DSV3 = (
    ((4096, 7168), "float8_e4m3fn"),
    ((7168, 2048), "float8_e4m3fn"),
    ((32, 56), "float32"),
    ((56, 16), "float32"),
)
# the same four tensors shrunk for gloo on the CPU
DSV3_CPU = (
    ((64, 112), "float8_e4m3fn"),
    ((112, 32), "float8_e4m3fn"),
    ((2, 4), "float32"),
    ((4, 2), "float32"),
)
# Qwen3-30B-A3B bf16: w13 [1536, 2048], w2 [2048, 768]
QWEN3 = (((1536, 2048), "bfloat16"), ((2048, 768), "bfloat16"))
QWEN3_CPU = (((48, 64), "bfloat16"), ((64, 24), "bfloat16"))

_ITEMSIZE = {"float8_e4m3fn": 1, "bfloat16": 2, "float16": 2, "float32": 4, "int32": 4}


def row_bytes(spec) -> int:
    """Bytes of one expert row (all its tensors) of a layout."""
    return sum(int(np.prod(shape)) * _ITEMSIZE[dt] for shape, dt in spec)


def layers_of(a, model: str, cpu: bool) -> int:
    """--eplb-layers-<model> when given (every case of that model, CPU ones included), else
    the case's default: 4 (dsv3) or 8 (qwen3) layers on GPUs, 2 for the CPU cases."""
    v = getattr(a, f"eplb_layers_{model}", None)
    if v is not None:
        return int(v)
    return 2 if cpu else {"dsv3": 4, "qwen": 8}[model]


def listed(args, flag: str) -> list[str]:
    """The non-empty items of a comma-list flag (``args.<flag>``; missing or empty: [])."""
    return [x.strip() for x in (getattr(args, flag, "") or "").split(",") if x.strip()]


def make_weights(torch, spec, layers: int, rows: int, device) -> list[list]:
    """``layers`` layers of ``rows`` expert rows of the layout ``spec`` (uninitialised)."""
    tspec = [(shape, getattr(torch, dt)) for shape, dt in spec]
    return [
        [torch.empty((rows, *shape), dtype=dt, device=device) for shape, dt in tspec]
        for _ in range(layers)
    ]


# ---- placements -----------------------------------------------------------------------------


def greedy_placement(loads: np.ndarray, num_physical: int, ep: int) -> np.ndarray:
    """Slot -> expert: replicate the hottest experts, then place heaviest replicas first on the
    least loaded rank that has room (and does not hold that expert yet, where possible)."""
    num_logical = len(loads)
    reps = np.ones(num_logical, dtype=np.int64)
    for _ in range(num_physical - num_logical):
        reps[np.argmax(loads / reps)] += 1
    per = num_physical // ep
    items = sorted(
        ((loads[e] / reps[e], e) for e in range(num_logical) for _ in range(reps[e])),
        key=lambda x: (-x[0], x[1]),
    )
    rank_load = np.zeros(ep)
    rank_rows: list[list[int]] = [[] for _ in range(ep)]
    for load, e in items:
        order = np.argsort(rank_load, kind="stable")
        choice = None
        for r in order:
            if len(rank_rows[r]) < per and e not in rank_rows[r]:
                choice = r
                break
        if choice is None:
            choice = next(r for r in order if len(rank_rows[r]) < per)
        rank_rows[choice].append(e)
        rank_load[choice] += load
    return np.array([e for rows in rank_rows for e in rows], dtype=np.int64)


def make_maps(seed: int, layers: int, num_logical: int, num_physical: int, ep: int):
    """Old and new maps: greedy placements of Zipf(1.5) loads, different seeded loads each."""
    rng = np.random.default_rng(seed)
    old = np.empty((layers, num_physical), dtype=np.int64)
    new = np.empty_like(old)
    ranks = np.arange(1, num_logical + 1)
    for layer in range(layers):
        for m in (old, new):
            loads = (1.0 / ranks**1.5)[rng.permutation(num_logical)] * 1e6
            m[layer] = greedy_placement(loads, num_physical, ep)
    return old, new


# ---- weights: a per-(layer, expert, tensor) byte pattern made and checked on the device -------
# The one oracle of expert contents for the bench and the tests (tests/shuffle_util.py reads it
# on the host): byte j of tensor ``index`` of ``expert`` in ``layer`` is a 32-bit hash of j and
# of a key hashed from the three, so every (layer, expert, tensor) has its own bytes and a row
# moved to the wrong slot, shifted or cut short differs. The same integer steps run on int64
# torch tensors (on the device) and numpy arrays.

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit mixing hash (xorshift-multiply) of ints, int64 arrays or tensors alike."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def pattern_key(layer: int, expert: int, index: int) -> int:
    """The 32-bit key of tensor ``index`` of ``expert`` in ``layer``."""
    return _mix32(_mix32(_mix32(layer + 1) + expert + 1) + index + 1)


def _pattern_bytes(idx, key: int):
    """Bytes of the pattern at positions ``idx`` (int64) for ``key``."""
    return _mix32(idx * 0x9E3779B1 + key) & 0xFF


def pattern(torch, n: int, layer: int, expert: int, index: int, device):
    """The ``n`` bytes of tensor ``index`` of ``expert`` in ``layer`` (uint8, on ``device``)."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return _pattern_bytes(idx, pattern_key(layer, expert, index)).to(torch.uint8)


def pattern_np(n: int, layer: int, expert: int, index: int) -> np.ndarray:
    """:func:`pattern` on the host: the same ``n`` bytes as a numpy uint8 array."""
    idx = np.arange(n, dtype=np.int64)
    return _pattern_bytes(idx, pattern_key(layer, expert, index)).astype(np.uint8)


def expert_rows(torch, weights, amap, rank, P, first_layer):
    """(byte row, layer, expert, tensor index) for every row; ``weights[k]`` is layer
    ``first_layer + k`` and ``amap[k]`` its map."""
    for k, ws in enumerate(weights):
        for i, t in enumerate(ws):
            v = t.view(torch.uint8).view(P, -1)
            for r in range(P):
                yield v[r], first_layer + k, int(amap[k, rank * P + r]), i


def fill(torch, weights, amap, rank, P, first_layer=0):
    """Write each row's expert pattern (empty slots get expert 0's)."""
    for row, layer, e, i in expert_rows(torch, weights, amap, rank, P, first_layer):
        row.copy_(pattern(torch, row.numel(), layer, max(e, 0), i, row.device))


def check(torch, weights, amap, rank, P, first_layer=0) -> bool:
    """Whether every non-empty row holds its expert's pattern."""
    return all(
        e < 0 or torch.equal(row, pattern(torch, row.numel(), layer, e, i, row.device))
        for row, layer, e, i in expert_rows(torch, weights, amap, rank, P, first_layer)
    )
