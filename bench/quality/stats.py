"""Seed statistics: mean ± sd, paired differences with a 95% t-interval, data multipliers."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """``a - b`` paired by seed: mean, sd, and the t-interval ``mean ± t_{n-1} sd / sqrt(n)``."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    m = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.inf
    return {"mean": m, "sd": sd, "lo": m - half, "hi": m + half, "n": n}


def verdict(ci: dict[str, float]) -> str:
    """For a difference in bits per byte (lower is better)."""
    if ci["hi"] < 0:
        return "better"
    if ci["lo"] > 0:
        return "worse"
    return "n.s."


def data_multiplier(value: float, curve: dict[int, float]) -> str:
    """How much random data (1x, 2x, 4x) gives ``value`` (bpb, lower is better), by linear
    interpolation in log2(multiplier) on the mean random curve. Only read when the curve falls."""
    pts = sorted(curve.items())
    if len(pts) < 2:
        return "n/a"
    xs = [math.log2(m) for m, _ in pts]
    ys = [v for _, v in pts]
    if not all(y2 < y1 for y1, y2 in zip(ys, ys[1:])):
        return "n/a (random curve not falling)"
    if value >= ys[0]:
        return f"<= {pts[0][0]}x"
    if value <= ys[-1]:
        return f">= {pts[-1][0]}x"
    for (x1, y1), (x2, y2) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y2 <= value <= y1:
            x = x1 + (y1 - value) / (y1 - y2) * (x2 - x1)
            return f"{2 ** x:.2f}x"
    return "n/a"
