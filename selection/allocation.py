"""How the softmax allocation shares a budget out among clusters (pure functions).

``QuadSelector`` with ``allocation="softmax"`` gives cluster ``c`` the share

    share_c = cap_c * exp(q_c / T) / sum_j cap_j * exp(q_j / T)      (capped at cap_c)

of the budget, where ``q_c`` is the cluster's mean z-score shrunk towards the typical cluster
(:func:`shrinkage`). It is the allocation that maximises ``E_share[q] - T * KL(share || pool)``;
see ``selection.config`` for the rule and its constants.
"""
from __future__ import annotations

import math

import numpy as np


def shrinkage(ref_n: int, ref_m2: float, within_ss: float, within_df: int) -> float:
    """kappa = within-cluster / between-cluster variance of the exploration probes.

    ``ref_n`` / ``ref_m2``: count and sum of squared deviations of every exploration score (the
    total variance); ``within_ss`` / ``within_df``: the pooled squared deviations of each pull's
    scores from that pull's mean, and their degrees of freedom. A cluster's mean z from ``n``
    scores is then shrunk by ``n / (n + kappa)``: the empirical-Bayes posterior mean of its true
    mean. Probes that do not separate clusters (between-cluster variance ~ 0) give infinity:
    every cluster looks typical. With one probe per pull (no within spread) kappa is 1.
    """
    if ref_n < 2:
        return math.inf
    total = ref_m2 / ref_n
    if within_df <= 0:
        return 1.0
    within = within_ss / within_df
    between = total - within
    if not between > 1e-12 * max(total, 1e-300):
        return math.inf
    return within / between


def shrunken_means(z: np.ndarray, evidence: np.ndarray, kappa: float) -> np.ndarray:
    """``z * n / (n + kappa)`` per cluster (0 where there is no evidence or kappa is infinite)."""
    if not math.isfinite(kappa):
        return np.zeros(len(z))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = z * evidence / (evidence + kappa)
    return np.where(evidence > 0, out, 0.0)


def softmax_shares(capacity: np.ndarray, q: np.ndarray, amount: float, temperature: float) -> np.ndarray:
    """Water-filled shares of ``amount``: ``capacity * exp(q / T)`` scaled to the amount, each
    capped at its capacity, the excess of capped clusters going to the others in proportion to
    their weights. Sums to ``min(amount, capacity.sum())``."""
    cap = np.asarray(capacity, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    w = cap * np.exp(np.clip((q - q.max(initial=0.0)) / temperature, -700.0, 0.0))
    share = np.zeros_like(cap)
    left = float(amount)
    free = cap > 0
    while left > 1e-9 and free.any():
        ws = float(w[free].sum())
        if ws <= 0.0:  # every remaining weight underflowed: share by capacity
            w = np.where(free, cap, 0.0)
            ws = float(w[free].sum())
        give = np.where(free, left * w / ws, 0.0)
        over = free & (share + give >= cap)
        if not over.any():
            share += give
            break
        left -= float((cap[over] - share[over]).sum())
        share[over] = cap[over]
        free &= ~over
    return share
