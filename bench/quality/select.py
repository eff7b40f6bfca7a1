"""Run one method's selector on the pool and describe what it took.

Selectors are built exactly as ``quadsel run`` builds them (``selection.make_selector`` with a
``ClusterView`` of the tf-idf clusters, a token budget and ``QuadConfig.scaled`` for quad) and
driven by ``selection.run_selector``. Domain labels are looked up only AFTER a selection is
final, to measure it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import METHODS, NOISE_DOMAINS, TARGET_DOMAIN
from .data import PoolData, SeedModel
from .scoring import ScoreCache


@dataclass
class SelectionRecord:
    method: str
    rows: np.ndarray | None  # pool rows; None for "reference" (the target's reference texts)
    budget_tokens: int
    used_tokens: int
    scorer_calls: int
    stats: dict[str, Any] = field(default_factory=dict)


def cluster_view(pool: PoolData, model: SeedModel, budget: int):
    """(ClusterView, QuadConfig) as jobs.run_job._selector_parts makes them for a token budget."""
    from quadsel.pipeline.cluster import neighbour_graph
    from quadsel.selection import Budget, ClusterView, QuadConfig

    assignments, centroids = pool.clusters.assignments, pool.clusters.centroids
    b = Budget(unit="tokens", amount=int(budget))
    quad = QuadConfig.scaled(len(assignments), len(centroids), b, mean_tokens=float(model.lengths.mean()))
    order = np.argsort(assignments, kind="stable")
    bounds = np.searchsorted(assignments[order], np.arange(len(centroids) + 1))
    members = [order[bounds[c]:bounds[c + 1]].astype(np.int64) for c in range(len(centroids))]
    view = ClusterView(members=members, neighbours=neighbour_graph(centroids, quad.gamma),
                       lengths=model.lengths)
    return view, quad


def run_method(method: str, pool: PoolData, model: SeedModel, base_budget: int, seed: int,
               scores: ScoreCache | None, view_quad=None) -> SelectionRecord:
    """Select with ``method`` at its multiple of ``base_budget`` tokens; scores come from
    ``scores`` (a cache shared by the methods of one scorer)."""
    from quadsel.selection import Budget, make_selector, run_selector

    selector_name, scorer_name, mult = METHODS[method]
    budget = base_budget * mult
    view, quad = view_quad if view_quad is not None else cluster_view(pool, model, base_budget)
    if mult != 1:  # the quad constants scale with the budget; only random uses multiples
        view, quad = cluster_view(pool, model, budget)
    if selector_name == "quad-greedy":
        selector_name, quad = "quad", quad.model_copy(update={"allocation": "greedy"})
    sel = make_selector(selector_name, view, Budget(unit="tokens", amount=int(budget)), seed=seed,
                        config=quad if selector_name == "quad" else None)
    timer = {"score": 0.0}
    asked: list[np.ndarray] = []

    def score_rows(rows: np.ndarray) -> np.ndarray:
        if scores is None:
            raise RuntimeError(f"method {method!r} asked for scores but has no scorer")
        t0 = time.monotonic()
        asked.append(np.asarray(rows, dtype=np.int64))
        out = scores(rows)
        timer["score"] += time.monotonic() - t0
        return out

    t0 = time.monotonic()
    result = run_selector(sel, score_rows)
    overhead = time.monotonic() - t0 - timer["score"]
    rows = np.asarray(result.rows, dtype=np.int64)
    probed = np.concatenate(asked) if asked else np.zeros(0, np.int64)
    rec = SelectionRecord(method=method, rows=rows, budget_tokens=int(budget), used_tokens=int(result.used),
                          scorer_calls=int(sel.scorer_calls))
    est = scores.cost_of(probed) if scores is not None and probed.size else (0.0 if scores is None else None)
    rec.stats = {
        "selected_rows": int(len(rows)),
        "scorer_calls": int(sel.scorer_calls),
        "scored_share": round(sel.scorer_calls / max(1, len(pool.store)), 4),
        "selector_seconds": round(overhead, 3),
        "scoring_seconds_est": None if est is None else round(est, 2),
        "scorer_fit_seconds": None if scores is None else scores.stats.get("fit_seconds"),
        "filled_rows": int(np.asarray(result.fill).sum()),
        "notes": list(result.notes),
    }
    if selector_name == "quad":
        rec.stats["quad"] = quad.model_dump(mode="json")
        rec.stats["rounds"] = int(result.n_rounds)
    return rec


def describe(rows: np.ndarray, pool: PoolData, model: SeedModel, target: str) -> dict[str, Any]:
    """Domain mix (share of tokens), noise share, target-domain share, cluster entropy."""
    lengths = model.lengths[rows].astype(np.float64)
    total = float(lengths.sum()) or 1.0
    doms = pool.domains[rows]
    mix: dict[str, float] = {}
    for d in np.unique(doms):
        mix[str(d)] = round(float(lengths[doms == d].sum()) / total, 4)
    noise_rows = np.isin(doms, NOISE_DOMAINS)
    clusters = pool.clusters.assignments[rows]
    k = len(pool.clusters.centroids)
    counts = np.bincount(clusters, minlength=k).astype(np.float64)
    p = counts[counts > 0] / max(1.0, counts.sum())
    entropy = float(-(p * np.log(p)).sum())
    return {
        "domain_mix_tokens": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
        "noise_share_tokens": round(float(lengths[noise_rows].sum()) / total, 4),
        "noise_share_rows": round(float(noise_rows.mean()) if len(rows) else 0.0, 4),
        "target_domain_share_tokens": round(mix.get(TARGET_DOMAIN.get(target, ""), 0.0), 4),
        "cluster_entropy_nats": round(entropy, 4),
        "cluster_entropy_norm": round(entropy / math.log(k), 4) if k > 1 else 0.0,
        "clusters_touched": int((counts > 0).sum()),
    }


def pool_description(pool: PoolData, model: SeedModel, target: str) -> dict[str, Any]:
    return describe(np.arange(len(pool.store), dtype=np.int64), pool, model, target)
