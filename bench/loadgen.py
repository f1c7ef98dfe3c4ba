"""Seeded sequences of per-expert loads for EPLB benchmarks: what an engine's rebalancer sees.

An engine counts the tokens routed to each logical expert of each MoE layer over a window
(thousands of forward steps) and rebalances from those counts. This module makes such counts,
one ``[num_layers, num_experts]`` array per rebalance, from a model with these parts:

* **Popularity** (per layer, drawn once): heavy-tailed. A fraction ``zipf_frac`` of the layers
  (chosen at random) are Zipf: the expert of popularity rank ``k`` (a random permutation of
  the experts) gets weight ``k ** -s`` with ``s`` uniform in ``zipf_s``; the others are
  log-normal: log-weight normal with a standard deviation uniform in ``lognormal_sigma``.
* **Drift** between rebalances: the log-weights follow a mean-reverting random walk,
  ``x[t] = mu + rho * (x[t-1] - mu) + sigma * N(0, 1)`` per expert, with ``rho`` =
  ``revert`` (so the popularity stays heavy-tailed instead of diffusing away) and ``sigma``
  the drift level: multiplicative noise of about ``exp(sigma)`` per rebalance.
* **Bursts** (``burst_prob``): per rebalance, each expert of each layer independently has its
  weight multiplied by a factor uniform in ``burst_gain`` for that window only (a hot topic,
  a batch of one kind of request).
* **Regime shifts** (``regime_every``, ``regime_frac``): every ``regime_every`` rebalances,
  a fraction ``regime_frac`` of the layers (chosen at random) draws a new popularity
  (a new kind of workload), and its walk restarts there.
* **Counts**: ``tokens * top_k`` expert assignments per layer and window, split by the
  weights, where no expert may get more than one ``top_k``-th of them (a token picks
  ``top_k`` distinct experts); rounded to integers.

Drift levels (:data:`DRIFTS`):

=========  =====  ===========  =====================  ===============================
level      sigma  burst_prob   regime                 meant as
=========  =====  ===========  =====================  ===============================
steady     0.03   0            none                   a stable workload
moderate   0.10   0            none                   a slowly changing mix
bursty     0.25   0.01, x2-x6  none                   noisy windows with hot spots
regime     0.03   0            all layers every 5th   workload changes between windows
=========  =====  ===========  =====================  ===============================

Run ``python -m bench.loadgen`` for a summary of one sequence.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Drift:
    """Parameters of a load sequence (see the module docstring)."""

    sigma: float = 0.10
    revert: float = 0.9
    burst_prob: float = 0.0
    burst_gain: tuple[float, float] = (2.0, 6.0)
    regime_every: int = 0
    regime_frac: float = 1.0
    zipf_frac: float = 0.5
    zipf_s: tuple[float, float] = (0.5, 0.9)
    lognormal_sigma: tuple[float, float] = (0.5, 1.0)


DRIFTS: dict[str, Drift] = {
    "steady": Drift(sigma=0.03),
    "moderate": Drift(sigma=0.10),
    "bursty": Drift(sigma=0.25, burst_prob=0.01),
    "regime": Drift(sigma=0.03, regime_every=5, regime_frac=1.0),
}


def _popularity(rng: np.random.Generator, num_experts: int, d: Drift) -> np.ndarray:
    """Log-weights of one layer."""
    if rng.random() < d.zipf_frac:
        s = rng.uniform(*d.zipf_s)
        rank = rng.permutation(num_experts) + 1
        return -s * np.log(rank)
    return rng.normal(0.0, rng.uniform(*d.lognormal_sigma), num_experts)


def _counts(x: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Integer loads [L, E] from log-weights: shares capped at 1/top_k, then rounded."""
    w = np.exp(x - x.max(axis=1, keepdims=True))
    share = w / w.sum(axis=1, keepdims=True)
    cap = 1.0 / top_k
    for _ in range(8):  # water-filling: what the capped experts lose goes to the others
        over = share > cap
        if not over.any():
            break
        excess = (share - cap).clip(min=0).sum(axis=1, keepdims=True)
        free = np.where(over, 0.0, share)
        share = np.where(over, cap, share + excess * free / free.sum(axis=1, keepdims=True))
    return np.rint(share * tokens * top_k)


def load_sequence(
    num_layers: int,
    num_experts: int,
    steps: int,
    drift: str | Drift = "moderate",
    *,
    seed: int = 0,
    top_k: int = 8,
    tokens: int = 1 << 20,
) -> np.ndarray:
    """``[steps, num_layers, num_experts]`` float64 loads (token counts), reproducible from
    ``seed``. ``drift`` is a name in :data:`DRIFTS` or a :class:`Drift`; ``tokens`` per
    window, each routed to ``top_k`` experts."""
    d = DRIFTS[drift] if isinstance(drift, str) else drift
    if not isinstance(d, Drift):
        raise TypeError(f"drift must be a name in DRIFTS or a Drift, got {type(drift).__name__}")
    if steps < 1 or num_layers < 1 or num_experts < 1:
        raise ValueError("steps, num_layers and num_experts must be >= 1")
    top_k = max(1, min(top_k, num_experts))
    rng = np.random.default_rng(seed)
    mu = np.stack([_popularity(rng, num_experts, d) for _ in range(num_layers)])
    x = mu.copy()
    out = np.empty((steps, num_layers, num_experts))
    for t in range(steps):
        if t:
            x = mu + d.revert * (x - mu) + d.sigma * rng.standard_normal(mu.shape)
            if d.regime_every and t % d.regime_every == 0:
                shift = rng.random(num_layers) < d.regime_frac
                for layer in np.flatnonzero(shift):
                    mu[layer] = _popularity(rng, num_experts, d)
                    x[layer] = mu[layer]
        xb = x
        if d.burst_prob:
            hit = rng.random(mu.shape) < d.burst_prob
            xb = x + np.where(hit, np.log(rng.uniform(*d.burst_gain, mu.shape)), 0.0)
        out[t] = _counts(xb, tokens, top_k)
    return out


def regime_steps(steps: int, drift: str | Drift) -> list[int]:
    """The steps of a sequence at which a regime shift happens."""
    d = DRIFTS[drift] if isinstance(drift, str) else drift
    if not d.regime_every:
        return []
    return [t for t in range(1, steps) if t % d.regime_every == 0]


def main() -> None:
    ap = argparse.ArgumentParser(description="Summary of a seeded EPLB load sequence")
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--drift", default="moderate", choices=list(DRIFTS))
    ap.add_argument("--sigma", type=float, default=None, help="override the drift level")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    d = DRIFTS[a.drift] if a.sigma is None else replace(DRIFTS[a.drift], sigma=a.sigma)
    seq = load_sequence(a.layers, a.experts, a.steps, d, seed=a.seed)
    share = seq / seq.sum(axis=2, keepdims=True)
    top = np.sort(share, axis=2)[:, :, ::-1]
    change = np.abs(np.diff(share, axis=0)).sum(axis=2) / 2  # total-variation distance
    print(
        f"{a.drift}: {seq.shape}, hottest expert {top[:, :, 0].mean():.1%} of a layer's load "
        f"(max {top[:, :, 0].max():.1%}), top 10% experts {top[:, :, : a.experts // 10].sum(2).mean():.1%}, "
        f"load moved between windows {change.mean():.1%} (max {change.max():.1%})"
    )


if __name__ == "__main__":
    main()
