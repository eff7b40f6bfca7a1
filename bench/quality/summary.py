"""Per-target summary: metrics over seeds, paired differences, selection make-up, the goals."""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import QualityConfig
from .stats import data_multiplier, mean_sd, paired, verdict

# head-to-head comparisons beyond "every method vs random" (a, b): a - b
PAIRS = [("quad-ekfac", "topk-ekfac"), ("quad-ekfac", "cluster-topk-ekfac"), ("quad-gradcos", "quad-ekfac"),
         ("quad-gradcos", "topk-ekfac")]
SEL_KEYS = ["target_domain_share_tokens", "noise_share_tokens", "noise_share_rows", "cluster_entropy_nats",
            "cluster_entropy_norm", "clusters_touched", "scorer_calls", "scored_share", "scoring_seconds_est",
            "selector_seconds", "used_tokens", "selected_rows", "filled_rows"]


def _metric(rec: dict[str, Any], target: str, which: str) -> float:
    ev = rec["eval"]
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


def summarise(cfg: QualityConfig, target: str, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    methods = [m for m in per_seed[seeds[0]] if not m.startswith("_")]
    vals = {m: {k: [_metric(per_seed[s][m], target, k) for s in seeds] for k in METRICS} for m in methods}
    rows: dict[str, Any] = {}
    for m in methods:
        r: dict[str, Any] = {}
        for k in METRICS:
            mu, sd = mean_sd(vals[m][k])
            r[k] = {"mean": mu, "sd": sd, "per_seed": vals[m][k]}
            if m != "random":
                r[f"{k}_vs_random"] = paired(vals[m][k], vals["random"][k])
        sel = [per_seed[s][m]["selection"] for s in seeds]
        r["selection"] = {k: _mean_of([x.get(k) for x in sel]) for k in SEL_KEYS}
        r["selection"]["domain_mix_tokens"] = _mean_mix([x.get("domain_mix_tokens") for x in sel])
        r["selection"]["notes"] = sorted({n for x in sel for n in x.get("notes", [])})
        r["train"] = {k: _mean_of([per_seed[s][m]["train"].get(k) for s in seeds])
                      for k in ("train_seconds", "eval_seconds", "epochs", "windows", "final_train_loss")}
        rows[m] = r
    curve_t = {mult: rows[n]["target_bpb"]["mean"] for n, mult in
               (("random", 1), ("random-2x", 2), ("random-4x", 4)) if n in rows}
    curve_m = {mult: rows[n]["mix_bpb"]["mean"] for n, mult in
               (("random", 1), ("random-2x", 2), ("random-4x", 4)) if n in rows}
    for m, r in rows.items():
        r["multiplier_target"] = data_multiplier(r["target_bpb"]["mean"], curve_t)
        r["multiplier_mix"] = data_multiplier(r["mix_bpb"]["mean"], curve_m)
    pairs = {}
    for a, b in PAIRS:
        if a in vals and b in vals:
            pairs[f"{a} - {b}"] = {k: paired(vals[a][k], vals[b][k]) for k in ("target_bpb", "mix_bpb")}
    scoring = {s: per_seed[s].get("_scoring", {}) for s in seeds}
    return {
        "target": target, "seeds": seeds, "methods": methods, "rows": rows, "pairs": pairs,
        "goals": goals(rows, pairs, cfg.budget_fraction),
        "budget_tokens": {s: per_seed[s]["_budget_tokens"] for s in seeds},
        "pool_tokens": {s: per_seed[s]["_pool_tokens"] for s in seeds},
        "pool_mix": per_seed[seeds[0]]["_pool"],
        "scoring": scoring,
    }


def goals(rows: dict[str, Any], pairs: dict[str, Any], budget_fraction: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    q = rows.get("quad-ekfac")
    if q is not None and "target_bpb_vs_random" in q:
        ci = q["target_bpb_vs_random"]
        out["quad_beats_random_target"] = {"met": verdict(ci) == "better", "ci": ci}
    p = pairs.get("quad-ekfac - topk-ekfac")
    if p is not None:
        ci = p["mix_bpb"]
        v = verdict(ci)
        out["quad_matches_or_beats_topk_mix"] = {"met": v in ("better", "n.s."), "ci": ci,
                                                 "reading": {"better": "beats", "n.s.": "no significant difference",
                                                             "worse": "worse"}[v]}
    if q is not None:
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
