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


@dataclass(frozen=True)
class _Columns:
    """The program's variables, in order: every ``y[g, e, k]``, every ``z[e, k]``, every
    ``p[g, e]`` (``k`` in ``1 .. K``)."""

    ep: int
    E: int
    K: int

    @property
    def ny(self) -> int:
        return self.ep * self.E * self.K

    @property
    def nz(self) -> int:
        return self.E * self.K

    @property
    def n(self) -> int:
        return self.ny + self.nz + self.ep * self.E

    def iy(self, g, e, k):  # k in 1..K
        return (g * self.E + e) * self.K + (k - 1)

    def iz(self, e, k):
        return self.ny + e * self.K + (k - 1)

    def ip(self, g, e):
        return self.ny + self.nz + g * self.E + e


class _Rows:
    """Linear constraints ``lo <= a . x <= hi``, one row at a time (a sparse matrix in COO)."""

    def __init__(self):
        self.rows, self.cols, self.vals, self.lo, self.hi = [], [], [], [], []
        self.r = 0

    def add(self, entries, lb, ub):
        for c, v in entries:
            self.rows.append(self.r)
            self.cols.append(c)
            self.vals.append(v)
        self.lo.append(lb)
        self.hi.append(ub)
        self.r += 1

    def constraint(self, n):
        from scipy.optimize import LinearConstraint
        from scipy.sparse import coo_matrix

        A = coo_matrix((self.vals, (self.rows, self.cols)), shape=(self.r, n)).tocsr()
        return LinearConstraint(A, self.lo, self.hi)


def _add_model(rows: _Rows, col: _Columns, lam, P: int, cap: float) -> None:
    """The model's constraints: replica counts per expert, the GPUs' slots and loads."""
    ep, E = col.ep, col.E
    ks = range(1, col.K + 1)
    for e in range(E):
        rows.add([(col.iz(e, k), 1.0) for k in ks], 1, 1)
        for k in ks:
            rows.add(
                [(col.iy(g, e, k), 1.0) for g in range(ep)] + [(col.iz(e, k), -float(k))], 0, 0
            )
            for g in range(ep):
                rows.add([(col.iy(g, e, k), 1.0), (col.iz(e, k), -float(min(P, k)))], -np.inf, 0)
                rows.add([(col.iy(g, e, k), 1.0), (col.ip(g, e), -float(min(P, k)))], -np.inf, 0)
    for g in range(ep):
        rows.add([(col.iy(g, e, k), 1.0) for e in range(E) for k in ks], P, P)
        rows.add([(col.iy(g, e, k), lam[e] / k) for e in range(E) for k in ks], -np.inf, cap)
        for e in range(E):
            rows.add([(col.iy(g, e, k), 1.0) for k in ks] + [(col.ip(g, e), -float(P))], -np.inf, 0)


def _upper_bounds(col: _Columns, lam, P: int, N: int, cap: float) -> np.ndarray:
    """Each variable's upper bound; replica counts ``k`` no placement within ``cap`` can have
    are fixed at 0."""
    ep, E = col.ep, col.E
    ks = range(1, col.K + 1)
    # a replica weighs lam / k <= cap, so k >= lam / cap; the others' minima bound k above
    kmin = np.maximum(1, np.ceil(lam / cap - 1e-12)).astype(np.int64) if cap > 0 else np.ones(E)
    kmax = N - (kmin.sum() - kmin)
    ub = np.empty(col.n)
    for g in range(ep):
        for e in range(E):
            for k in ks:
                ub[col.iy(g, e, k)] = min(P, k)
    ub[col.ny :] = 1.0
    for e in range(E):
        for k in ks:
            if not kmin[e] <= k <= kmax[e]:
                ub[col.iz(e, k)] = 0.0
                for g in range(ep):
                    ub[col.iy(g, e, k)] = 0.0
    return ub


def _received_cost(col: _Columns, held: np.ndarray) -> np.ndarray:
    """The objective: 1 for each ``p[g, e]`` where ``old`` had no ``e`` on GPU ``g``."""
    c = np.zeros(col.n)
    for g in range(col.ep):
        for e in range(col.E):
            c[col.ip(g, e)] = 0.0 if held[g, e] else 1.0
    return c


def _optimum(res, col: _Columns, c: np.ndarray, seconds: float) -> Optimum:
    """The solver's answer as an :class:`Optimum` (the map GPU by GPU, expert by expert)."""
    if res.x is None:
        bound = getattr(res, "mip_dual_bound", None)
        return Optimum(None, float(bound or 0.0), False, None, seconds)
    x = np.rint(res.x).astype(np.int64)
    ks = range(1, col.K + 1)
    new = []
    for g in range(col.ep):
        for e in range(col.E):
            new += [e] * int(sum(x[col.iy(g, e, k)] for k in ks))
    received = int(round(float(c @ res.x)))
    proven = res.status == 0
    bound = float(received) if proven else float(getattr(res, "mip_dual_bound", 0.0) or 0.0)
    return Optimum(received, bound, proven, np.array(new, dtype=np.int64), seconds)


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

    from scipy.optimize import Bounds, milp

    t0 = time.perf_counter()
    lam = np.asarray(loads, dtype=np.float64)
    old = np.asarray(old, dtype=np.int64)
    E, N = lam.size, old.size
    P = N // ep
    top = lam.max() if lam.max() > 0 else 1.0
    lam = lam / top
    held = _held(old, ep, E)
    col = _Columns(ep, E, N - E + 1)
    cap = target * lam.sum() / ep * (1 + rel_slack)
    rows = _Rows()
    _add_model(rows, col, lam, P, cap)
    ub = _upper_bounds(col, lam, P, N, cap)
    c = _received_cost(col, held)
    if at_most is not None:
        rows.add([(i, 1.0) for i in np.flatnonzero(c)], -np.inf, float(at_most))
    n = col.n
    res = milp(
        c,
        constraints=rows.constraint(n),
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), ub),
        options={"time_limit": float(time_limit), "disp": False},
    )
    return _optimum(res, col, c, time.perf_counter() - t0)


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
