"""Run one method's selector on the pool and describe what it took.

Selectors are built and driven by the job's own selector step
(``jobs.selection_run.SelectionRun.select``: the ``ClusterView`` of the tf-idf clusters, the token
budget and ``QuadConfig.scaled`` for quad), with each method's ``selection`` settings and seed,
the scores coming from the benchmark's score cache. Domain labels are looked up only AFTER a
selection is final, to measure it.
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


def selection_config(method: str, budget: int):
    """The job's ``selection`` section of ``method`` at ``budget`` tokens."""
    from quadsel.jobs.config import SelectionConfig

    selector_name = METHODS[method][0]
    greedy = selector_name == "quad-greedy"  # Quad's own rule: selection.quad.allocation = greedy
    return SelectionConfig(method="quad" if greedy else selector_name,
                           budget={"unit": "tokens", "amount": int(budget)},
                           quad={"allocation": "greedy"} if greedy else {})


def run_method(method: str, pool: PoolData, model: SeedModel, base_budget: int, seed: int,
               scores: ScoreCache | None) -> SelectionRecord:
    """Select with ``method`` at its multiple of ``base_budget`` tokens; scores come from
    ``scores`` (a cache shared by the methods of one scorer)."""
    _, _, mult = METHODS[method]
    budget = base_budget * mult  # the quad constants scale with the budget; only random uses multiples
    selection = selection_config(method, budget)
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

    _, _, quad = model.run.selector_parts(selection)
    t0 = time.monotonic()
    sel, result = model.run.select(score_rows, selection=selection, seed=seed)
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
    if selection.method == "quad":
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
