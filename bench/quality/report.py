"""Markdown rendering of the per-target summaries (``bench/results_quality.md``) and a console table."""
from __future__ import annotations

from typing import Any

from .stats import verdict

LABEL = {"random": "random", "topk-ekfac": "topk (ekfac)", "cluster-topk-ekfac": "cluster-topk (ekfac)",
         "quad-ekfac": "quad (ekfac)", "quad-gradcos": "quad (grad-cos)", "random-2x": "random 2x budget",
         "random-4x": "random 4x budget", "reference": "target reference split"}


def _ms(d: dict[str, Any], p: int = 4) -> str:
    return f"{d['mean']:.{p}f} ± {d['sd']:.{p}f}"


def _ci(d: dict[str, Any] | None, p: int = 4) -> str:
    if d is None:
        return "—"
    mark = {"better": " **↓**", "worse": " ↑", "n.s.": ""}[verdict(d)]
    return f"{d['mean']:+.{p}f} [{d['lo']:+.{p}f}, {d['hi']:+.{p}f}]{mark}"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def target_section(s: dict[str, Any]) -> list[str]:
    t = s["target"]
    rows = s["rows"]
    n = len(s["seeds"])
    budget = sum(s["budget_tokens"].values()) / len(s["budget_tokens"])
    pool_tok = sum(s["pool_tokens"].values()) / len(s["pool_tokens"])
    out = [f"### Target `{t}`", "",
           f"Seeds {s['seeds']} (n = {n}); budget {budget:,.0f} tokens = {budget / pool_tok:.1%} of the pool's "
           f"{pool_tok:,.0f} tokens (proxy tokenizer, mean over seeds). Bits per byte (lower is better); "
           f"Δ = method − random, paired by seed, 95% t-interval; **↓** = interval below 0.", "",
           "| method | target bpb | Δ target vs random | mix bpb | Δ mix vs random | × random data (target / mix) "
           "| scorer calls (share of pool) | scoring s (est.) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in s["methods"]:
        r = rows[m]
        sel = r["selection"]
        calls = sel.get("scorer_calls")
        calls_s = "0" if not calls else f"{calls:,.0f} ({sel.get('scored_share', 0):.1%})"
        out.append(f"| {LABEL.get(m, m)} | {_ms(r['target_bpb'])} | {_ci(r.get('target_bpb_vs_random'))} | "
                   f"{_ms(r['mix_bpb'])} | {_ci(r.get('mix_bpb_vs_random'))} | {_mult(r['multiplier_target'])} / "
                   f"{_mult(r['multiplier_mix'])} | {calls_s} | {_num(sel.get('scoring_seconds_est'), '{:.0f}')} |")
    out += ["", "× random data: the random budget multiple (1x, 2x, 4x, interpolated in log2) with the same mean "
            "bpb; n/a where the mean random curve does not fall from 1x to 2x to 4x (then more random data "
            "did not help at this training length and the multiplier cannot be read)."]
    out += ["", "Mean loss (nats / token, proxy tokenizer) on the target's eval set: " + "; ".join(
        f"{LABEL.get(m, m)} {_ms(rows[m]['target_loss'], 3)}" for m in s["methods"]) + ".", ""]
    if s["pairs"]:
        out += ["Head to head (a − b, bits per byte, paired by seed, 95% t-interval):", "",
                "| a − b | target | broad mix |", "|---|---:|---:|"]
        for name, p in s["pairs"].items():
            out.append(f"| {name} | {_ci(p['target_bpb'])} | {_ci(p['mix_bpb'])} |")
        out.append("")
    pm = s["pool_mix"]
    out += ["What each selection holds (mean over seeds; `domain` read only for this table). Noise = spam, "
            "garbage, duplicate. Cluster entropy over the selection's k-means clusters (nats; normalised by ln k).", "",
            "| method | target-domain tokens | noise tokens / rows | cluster entropy (norm.) | clusters | "
            "top domains (token share) |", "|---|---:|---:|---:|---:|---|",
            f"| *pool* | {pm['target_domain_share_tokens']:.1%} | {pm['noise_share_tokens']:.1%} / "
            f"{pm['noise_share_rows']:.1%} | {pm['cluster_entropy_nats']:.2f} ({pm['cluster_entropy_norm']:.2f}) | "
            f"{pm['clusters_touched']} | {_top(pm['domain_mix_tokens'])} |"]
    for m in s["methods"]:
        sel = rows[m]["selection"]
        if m == "reference":
            out.append(f"| {LABEL[m]} | (target text) | — | — | — | {sel.get('used_tokens') or 0:,.0f} tokens |")
            continue
        out.append(f"| {LABEL.get(m, m)} | {_pct(sel.get('target_domain_share_tokens'))} | "
                   f"{_pct(sel.get('noise_share_tokens'))} / {_pct(sel.get('noise_share_rows'))} | "
                   f"{_num(sel.get('cluster_entropy_nats'), '{:.2f}')} ({_num(sel.get('cluster_entropy_norm'), '{:.2f}')}) | "
                   f"{_num(sel.get('clusters_touched'), '{:.0f}')} | {_top(sel.get('domain_mix_tokens') or {})} |")
    out.append("")
    out += _cost_lines(s) + [""] + _goal_lines(s) + [""]
    notes = sorted({n for m in s["methods"] for n in rows[m]["selection"].get("notes", [])})
    if notes:
        out += ["Selector notes:", ""] + [f"- {n}" for n in notes] + [""]
    return out


def _cost_lines(s: dict[str, Any]) -> list[str]:
    out = ["Selection cost: scorer calls are each method's own; seconds are estimated as the method's scored "
           "tokens × the measured scoring cost per token of that (scorer, target, seed), so a method that "
           "reused cached scores is still charged for them. Fitting a scorer (curvature + reference) is extra:"]
    for seed, sc in s["scoring"].items():
        parts = []
        for name, st in sc.items():
            full = st.get("full_pool_seconds_est")
            parts.append(f"{name}: fit {_num(st.get('fit_seconds'), '{:.1f}')} s, full pool "
                         f"{_num(full, '{:.0f}')} s ({st.get('rows', 0):,} rows computed)")
        out.append(f"- seed {seed}: " + "; ".join(parts))
    tr = [s["rows"][m]["train"] for m in s["methods"]]
    secs = [x["train_seconds"] for x in tr if x.get("train_seconds") is not None]
    if secs:
        out.append(f"- one LM training: {min(secs):.0f}–{max(secs):.0f} s; evaluation "
                   f"{_num(tr[0].get('eval_seconds'), '{:.0f}')} s; epochs over the selection: " +
                   ", ".join(f"{LABEL.get(m, m)} {s['rows'][m]['train'].get('epochs') or 0:.2f}" for m in s["methods"]))
    return out


def _goal_lines(s: dict[str, Any]) -> list[str]:
    g = s["goals"]
    out = ["Goals:", ""]
    if "quad_beats_random_target" in g:
        x = g["quad_beats_random_target"]
        out.append(f"- quad (ekfac) beats random on `{s['target']}`: **{'met' if x['met'] else 'NOT met'}** "
                   f"(Δ {_ci(x['ci'])})")
    if "quad_matches_or_beats_topk_mix" in g:
        x = g["quad_matches_or_beats_topk_mix"]
        out.append(f"- quad (ekfac) matches or beats topk (ekfac) on the broad mix: **{'met' if x['met'] else 'NOT met'}** "
                   f"({x['reading']}; Δ {_ci(x['ci'])})")
    if "quad_scores_at_most_10pct" in g:
        x = g["quad_scores_at_most_10pct"]
        out.append(f"- quad scores at most 10% of the pool: **{'met' if x['met'] else 'NOT met'}** "
                   f"({_pct(x['scored_share'])} scored)")
    return out


def _mult(x: str) -> str:
    return "n/a" if x.startswith("n/a") else x


def _pct(x: Any) -> str:
    return "—" if x is None else f"{x:.1%}"


def _top(mix: dict[str, float], n: int = 4) -> str:
    top = sorted(mix.items(), key=lambda kv: (-kv[1], kv[0]))[:n]  # saved JSON has its keys sorted
    return ", ".join(f"{k} {v:.0%}" for k, v in top)


def console_table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = []
    for t, s in summaries.items():
        lines.append(f"target {t} (seeds {s['seeds']}): bpb mean ± sd; Δ vs random [95% CI]")
        lines.append(f"  {'method':22s} {'target bpb':>17s} {'Δ target':>30s} {'mix bpb':>17s} {'Δ mix':>30s} {'scored':>7s}")
        for m in s["methods"]:
            r = s["rows"][m]
            share = r["selection"].get("scored_share")
            lines.append(f"  {LABEL.get(m, m):22s} {_ms(r['target_bpb']):>17s} {_ci(r.get('target_bpb_vs_random')):>30s} "
                         f"{_ms(r['mix_bpb']):>17s} {_ci(r.get('mix_bpb_vs_random')):>30s} {_pct(share):>7s}")
        for k, x in s["goals"].items():
            lines.append(f"  goal {k}: {'met' if x['met'] else 'NOT met'}")
    return "\n".join(lines)
