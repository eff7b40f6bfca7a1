"""Per-target summary: metrics over seeds, paired differences, selection make-up, the goals."""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import QualityConfig, base_target
from .stats import data_multiplier, mean_sd, paired, verdict

# head-to-head comparisons beyond "every method vs random" (a, b): a - b
PAIRS = [("quad-ekfac", "topk-ekfac"), ("quad-ekfac", "cluster-topk-ekfac"), ("quad-ekfac", "dsir"),
         ("quad-ekfac", "random-2x"), ("random-2x", "random"), ("quad-gradcos", "quad-ekfac"),
         ("quad-gradcos", "topk-ekfac"), ("quad-ekfac", "quad-greedy-ekfac")]
SEL_KEYS = ["target_domain_share_tokens", "noise_share_tokens", "noise_share_rows", "cluster_entropy_nats",
            "cluster_entropy_norm", "clusters_touched", "scorer_calls", "scored_share", "scoring_seconds_est",
            "selector_seconds", "used_tokens", "selected_rows", "filled_rows"]
# the two evaluators: the trained neural LM and the training-free byte n-gram LM (bench.quality.ngram)
EVALUATORS = {"neural": "", "ngram": "ng_"}


def _metric(rec: dict[str, Any], target: str, which: str) -> float:
    """``which`` = [ng_]target_bpb | target_loss | mix_bpb | mix_loss; ``target`` an eval-set name."""
    ev = rec["eval"]
    if which.startswith("ng_"):
        ev, which = rec["ngram"]["eval"], which[3:]
    if which == "target_bpb":
        return float(ev[target]["bpb"])
    if which == "target_loss":
        return float(ev[target]["loss"])
    if which == "mix_bpb":  # macro average: every target's eval set weighs the same
        return float(np.mean([e["bpb"] for e in ev.values()]))
    if which == "mix_loss":
        return float(np.mean([e["loss"] for e in ev.values()]))
    raise KeyError(which)


METRICS = ("target_bpb", "target_loss", "mix_bpb", "mix_loss")
NG_METRICS = ("ng_target_bpb", "ng_mix_bpb")


def summarise(cfg: QualityConfig, target: str, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    base = base_target(target)
    methods = [m for m in per_seed[seeds[0]] if not m.startswith("_")]
    has_ng = all("ngram" in per_seed[s][m] for s in seeds for m in methods)
    metrics = METRICS + (NG_METRICS if has_ng else ())
    vals = {m: {k: [_metric(per_seed[s][m], base, k) for s in seeds] for k in metrics} for m in methods}
    rows: dict[str, Any] = {}
    for m in methods:
        r: dict[str, Any] = {}
        for k in metrics:
            mu, sd = mean_sd(vals[m][k])
            r[k] = {"mean": mu, "sd": sd, "per_seed": vals[m][k]}
            if m != "random":
                r[f"{k}_vs_random"] = paired(vals[m][k], vals["random"][k])
        sel = [per_seed[s][m]["selection"] for s in seeds]
        r["selection"] = {k: _mean_of([x.get(k) for x in sel]) for k in SEL_KEYS}
        r["selection"]["selection_wall_s"] = _mean_of([per_seed[s][m].get("selection_wall_s") for s in seeds])
        r["selection"]["domain_mix_tokens"] = _mean_mix([x.get("domain_mix_tokens") for x in sel])
        r["selection"]["notes"] = sorted({n for x in sel for n in x.get("notes", [])})
        r["train"] = {k: _mean_of([per_seed[s][m]["train"].get(k) for s in seeds])
                      for k in ("train_seconds", "eval_seconds", "epochs", "windows", "final_train_loss")}
        if has_ng:
            r["ngram"] = {k: _mean_of([per_seed[s][m]["ngram"].get(k) for s in seeds])
                          for k in ("seconds", "fit_seconds", "eval_seconds", "train_bytes")}
        rows[m] = r
    for prefix in [p for p in EVALUATORS.values() if p == "" or has_ng]:
        curve_t = {mult: rows[n][f"{prefix}target_bpb"]["mean"] for n, mult in
                   (("random", 1), ("random-2x", 2), ("random-4x", 4)) if n in rows}
        curve_m = {mult: rows[n][f"{prefix}mix_bpb"]["mean"] for n, mult in
                   (("random", 1), ("random-2x", 2), ("random-4x", 4)) if n in rows}
        for r in rows.values():
            r[f"{prefix}multiplier_target"] = data_multiplier(r[f"{prefix}target_bpb"]["mean"], curve_t)
            r[f"{prefix}multiplier_mix"] = data_multiplier(r[f"{prefix}mix_bpb"]["mean"], curve_m)
    pairs = {}
    for a, b in PAIRS:
        if a in vals and b in vals:
            keys = ("target_bpb", "mix_bpb") + (("ng_target_bpb", "ng_mix_bpb") if has_ng else ())
            pairs[f"{a} - {b}"] = {k: paired(vals[a][k], vals[b][k]) for k in keys}
    scoring = {s: per_seed[s].get("_scoring", {}) for s in seeds}
    evaluators = [e for e, p in EVALUATORS.items() if p == "" or has_ng]
    return {
        "target": target, "base_target": base, "seeds": seeds, "methods": methods, "rows": rows, "pairs": pairs,
        "evaluators": evaluators,
        "validity": {e: validity(pairs, EVALUATORS[e]) for e in evaluators},
        "goals": {e: goals(rows, pairs, EVALUATORS[e]) for e in evaluators},
        "budget_tokens": {s: per_seed[s]["_budget_tokens"] for s in seeds},
        "pool_tokens": {s: per_seed[s]["_pool_tokens"] for s in seeds},
        "pool_mix": per_seed[seeds[0]]["_pool"],
        "scoring": scoring,
    }


def validity(pairs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The data-multiplier check of the setup: random-2x must beat random-1x on the target with a
    95% paired interval excluding 0 (else more data does not help at this training length and a
    "quad vs random" verdict means little)."""
    p = pairs.get("random-2x - random")
    if p is None:
        return {"valid": None, "reason": "random-2x not run"}
    ci = p[f"{prefix}target_bpb"]
    return {"valid": verdict(ci) == "better", "ci": ci, "mix_ci": p[f"{prefix}mix_bpb"]}


# the goals and their rules (bits per byte: lower is better; intervals are 95% paired over seeds)
GOAL_RULES = {
    "quad_beats_random_target": "quad − random on the target: interval entirely below 0",
    "quad_not_worse_random_mix": "quad − random on the broad mix: interval not entirely above 0 "
                                 "(not significantly worse)",
    "quad_beats_dsir_target": "quad − dsir on the target: interval entirely below 0",
    "quad_matches_random2x_target": "quad (1x) − random-2x on the target: interval not entirely above 0 "
                                    "(matches or beats: multiplier ≥ 2), counted only where the setup is valid",
    "quad_scores_at_most_10pct": "quad's scorer calls ≤ 10% of the pool's rows",
}


def goals(rows: dict[str, Any], pairs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    q = rows.get("quad-ekfac")
    if q is None:
        return out
    if f"{prefix}target_bpb_vs_random" in q:
        ci = q[f"{prefix}target_bpb_vs_random"]
        out["quad_beats_random_target"] = {"met": verdict(ci) == "better", "ci": ci}
        ci = q[f"{prefix}mix_bpb_vs_random"]
        out["quad_not_worse_random_mix"] = {"met": verdict(ci) != "worse", "ci": ci}
    p = pairs.get("quad-ekfac - dsir")
    if p is not None:
        ci = p[f"{prefix}target_bpb"]
        out["quad_beats_dsir_target"] = {"met": verdict(ci) == "better", "ci": ci}
    p = pairs.get("quad-ekfac - random-2x")
    if p is not None:
        ci = p[f"{prefix}target_bpb"]
        valid = validity(pairs, prefix).get("valid")
        out["quad_matches_random2x_target"] = {
            "met": bool(valid) and verdict(ci) != "worse", "ci": ci, "valid_setup": valid,
            "multiplier": q.get(f"{prefix}multiplier_target")}
    share = q["selection"]["scored_share"]
    out["quad_scores_at_most_10pct"] = {"met": share is not None and share <= 0.10, "scored_share": share}
    return out


def _mean_of(xs: list[Any]) -> float | None:
    nums = [float(x) for x in xs if isinstance(x, (int, float)) and x is not None]
    return float(np.mean(nums)) if nums and len(nums) == len(xs) else None


def _mean_mix(mixes: list[dict[str, float] | None]) -> dict[str, float]:
    mixes = [m for m in mixes if m]
    if not mixes:
        return {}
    keys = sorted({k for m in mixes for k in m})
    avg = {k: float(np.mean([m.get(k, 0.0) for m in mixes])) for k in keys}
    return dict(sorted(avg.items(), key=lambda kv: -kv[1]))
