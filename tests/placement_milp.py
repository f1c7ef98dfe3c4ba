"""An exact reference for one layer of EPLB placement: the fewest experts received (over all
GPUs) of any placement whose imbalance is within a target, as a mixed-integer program solved
by HiGHS (``scipy.optimize.milp``); and a brute force over every map, for tiny shapes, that
checks the program. Used by tests/test_placement.py and bench/placement_opt.py.

The model, for ``ep`` GPUs of ``P`` slots, experts ``e`` with loads ``lam[e]`` and the
current placement ``old``:

* ``z[e, k]`` (binary): expert ``e`` has ``k`` replicas (``k = 1 .. N - E + 1``), one ``k``
  per expert;
* ``y[g, e, k]`` (integer, ``0 .. min(P, k)``): replicas of ``e`` on GPU ``g`` when it has
  ``k`` (0 otherwise), so GPU ``g``'s load ``sum_{e,k} y[g, e, k] * lam[e] / k`` is linear
  and exact;
* ``p[g, e]`` (binary): GPU ``g`` holds ``e``.

Subject to: ``sum_g y[g, e, k] = k z[e, k]``; ``y[g, e, k] <= min(P, k) z[e, k]``; every
GPU's ``P`` slots filled; ``sum_k y[g, e, k] <= P p[g, e]``; every GPU's load at most
``target x`` the mean GPU load (total load / ep). Objective: the number of pairs ``(g, e)``
with ``p[g, e] = 1`` where ``old`` had no ``e`` on ``g``, which is the sum over ranks of
:attr:`eplb_pynccl.RebalanceResult.experts_received`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optimum:
    received: int | None  # the best placement found (None: none within the time limit)
    bound: float  # a proven lower bound (equal to ``received`` when proven)
    proven: bool
    new_map: np.ndarray | None  # [N] the placement found, GPU by GPU (rows in any order)
    seconds: float


def _held(old: np.ndarray, ep: int, E: int) -> np.ndarray:
    P = old.size // ep
    held = np.zeros((ep, E), dtype=bool)
    for g in range(ep):
        for e in old[g * P : (g + 1) * P]:
            if e >= 0:
                held[g, e] = True
    return held


def min_received(
    loads,
    old,
    ep: int,
    target: float,
    *,
    time_limit: float = 10.0,
    rel_slack: float = 1e-9,
    at_most: int | None = None,
) -> Optimum:
    """The fewest experts received of a placement of ``len(old)`` slots on ``ep`` GPUs,
    holding every expert, with max GPU load <= ``target * (1 + rel_slack)`` x the mean.
    ``at_most``: the received count of a known placement within the target (a cut-off
    that prunes the search; the program stays feasible)."""
    import time

    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    lam = np.asarray(loads, dtype=np.float64)
    old = np.asarray(old, dtype=np.int64)
    E, N = lam.size, old.size
    P = N // ep
    K = N - E + 1
    top = lam.max() if lam.max() > 0 else 1.0
    lam = lam / top
    held = _held(old, ep, E)
    ny, nz, npv = ep * E * K, E * K, ep * E

    def iy(g, e, k):  # k in 1..K
        return (g * E + e) * K + (k - 1)

    def iz(e, k):
        return ny + e * K + (k - 1)

    def ip(g, e):
        return ny + nz + g * E + e

    n = ny + nz + npv
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lb, ub):
        nonlocal r
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)
        r += 1

    ks = range(1, K + 1)
    cap = target * lam.sum() / ep * (1 + rel_slack)
    # a replica weighs lam / k <= cap, so k >= lam / cap; the others' minima bound k above
    kmin = np.maximum(1, np.ceil(lam / cap - 1e-12)).astype(np.int64) if cap > 0 else np.ones(E)
    kmax = N - (kmin.sum() - kmin)
    for e in range(E):
        add([(iz(e, k), 1.0) for k in ks], 1, 1)
        for k in ks:
            add([(iy(g, e, k), 1.0) for g in range(ep)] + [(iz(e, k), -float(k))], 0, 0)
            for g in range(ep):
                add([(iy(g, e, k), 1.0), (iz(e, k), -float(min(P, k)))], -np.inf, 0)
                add([(iy(g, e, k), 1.0), (ip(g, e), -float(min(P, k)))], -np.inf, 0)
    for g in range(ep):
        add([(iy(g, e, k), 1.0) for e in range(E) for k in ks], P, P)
        add([(iy(g, e, k), lam[e] / k) for e in range(E) for k in ks], -np.inf, cap)
        for e in range(E):
            add([(iy(g, e, k), 1.0) for k in ks] + [(ip(g, e), -float(P))], -np.inf, 0)
    ub = np.empty(n)
    for g in range(ep):
        for e in range(E):
            for k in ks:
                ub[iy(g, e, k)] = min(P, k)
    ub[ny:] = 1.0
    for e in range(E):
        for k in ks:
            if not kmin[e] <= k <= kmax[e]:
                ub[iz(e, k)] = 0.0
                for g in range(ep):
                    ub[iy(g, e, k)] = 0.0
    c = np.zeros(n)
    for g in range(ep):
        for e in range(E):
            c[ip(g, e)] = 0.0 if held[g, e] else 1.0
    if at_most is not None:
        add([(i, 1.0) for i in np.flatnonzero(c)], -np.inf, float(at_most))
    A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    res = milp(
        c,
        constraints=LinearConstraint(A, lo, hi),
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), ub),
        options={"time_limit": float(time_limit), "disp": False},
    )
    seconds = time.perf_counter() - t0
    if res.x is None:
        bound = getattr(res, "mip_dual_bound", None)
        return Optimum(None, float(bound or 0.0), False, None, seconds)
    x = np.rint(res.x).astype(np.int64)
    new = []
    for g in range(ep):
        for e in range(E):
            new += [e] * int(sum(x[iy(g, e, k)] for k in ks))
    received = int(round(float(c @ res.x)))
    proven = res.status == 0
    bound = float(received) if proven else float(getattr(res, "mip_dual_bound", 0.0) or 0.0)
    return Optimum(received, bound, proven, np.array(new, dtype=np.int64), seconds)


def layer_figures(new, loads, old, ep: int) -> tuple[float, int]:
    """(imbalance, experts received over all GPUs) of one layer's map ``new``."""
    lam = np.asarray(loads, dtype=np.float64)
    new = np.asarray(new)
    E, N = lam.size, new.size
    P = N // ep
    cnt = np.bincount(new, minlength=E)
    g = np.array([sum(lam[e] / cnt[e] for e in new[q * P : (q + 1) * P]) for q in range(ep)])
    mean = g.sum() / ep
    imb = float(g.max() / mean) if mean > 0 else 1.0
    held = _held(np.asarray(old), ep, E)
    recv = sum(
        len(set(new[q * P : (q + 1) * P].tolist()) - set(np.flatnonzero(held[q])))
        for q in range(ep)
    )
    return imb, int(recv)


def brute_force(loads, old, ep: int, target: float, rel_slack: float = 1e-9) -> int | None:
    """:func:`min_received` by enumeration: every multiset of experts per GPU (tiny shapes
    only: ``E`` experts, ``P`` slots, ``ep`` GPUs)."""
    lam = np.asarray(loads, dtype=np.float64)
    E, N = lam.size, len(old)
    P = N // ep
    packs = list(itertools.combinations_with_replacement(range(E), P))
    best = None
    for choice in itertools.product(packs, repeat=ep):
        flat = [e for pk in choice for e in pk]
        if len(set(flat)) < E:
            continue
        imb, recv = layer_figures(np.array(flat), lam, old, ep)
        if imb <= target * (1 + rel_slack) and (best is None or recv < best):
            best = recv
    return best
