"""Markdown rendering of the per-target summaries (``bench/results_quality.md``) and a console table."""
from __future__ import annotations

from typing import Any

from .stats import verdict
from .summary import GOAL_RULES

LABEL = {"random": "random", "topk-ekfac": "topk (ekfac)", "cluster-topk-ekfac": "cluster-topk (ekfac)",
         "quad-ekfac": "quad (ekfac)", "quad-gradcos": "quad (grad-cos)", "quad-greedy-ekfac": "quad greedy (ekfac)", "random-2x": "random 2x budget",
         "random-4x": "random 4x budget", "dsir": "DSIR (data-selection)", "reference": "target reference split"}


def _ms(d: dict[str, Any], p: int = 4) -> str:
    return f"{d['mean']:.{p}f} ± {d['sd']:.{p}f}"


def _ci(d: dict[str, Any] | None, p: int = 4) -> str:
    if d is None:
        return "—"
    mark = {"better": " **↓**", "worse": " ↑", "n.s.": ""}[verdict(d)]
    return f"{d['mean']:+.{p}f} [{d['lo']:+.{p}f}, {d['hi']:+.{p}f}]{mark}"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


EV_LABEL = {"neural": "neural LM", "ngram": "byte 5-gram"}
GOAL_LABEL = {
    "quad_beats_random_target": "quad beats random (target)",
    "quad_not_worse_random_mix": "quad not worse than random (mix)",
    "quad_beats_dsir_target": "quad beats DSIR (target)",
    "quad_matches_random2x_target": "quad 1x ≥ random-2x (target)",
    "quad_scores_at_most_10pct": "quad scores ≤ 10% of pool",
}


def _pfx(ev: str) -> str:
    return "" if ev == "neural" else "ng_"


def _evaluators(s: dict[str, Any]) -> list[str]:
    return s.get("evaluators", ["neural"])


def _goal_cell(x: dict[str, Any] | None) -> str:
    if x is None:
        return "—"
    word = "met" if x["met"] else "**NOT met**"
    if "scored_share" in x:
        return f"{word} ({_pct(x['scored_share'])})"
    ci = x["ci"]
    extra = ""
    if "valid_setup" in x:
        if not x["valid_setup"]:
            word = "**NOT met** (setup invalid)"
        extra = f"; × {_mult(x.get('multiplier') or 'n/a')}"
    return f"{word} (Δ {ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]{extra})"


def agreement(s: dict[str, Any], goal: str) -> str:
    """A verdict counts only where both evaluators agree."""
    vals = [s["goals"].get(e, {}).get(goal) for e in _evaluators(s)]
    if any(v is None for v in vals) or len(vals) < 2:
        return "—"
    mets = {bool(v["met"]) for v in vals}
    return ("met" if mets == {True} else "**NOT met**") if len(mets) == 1 else "disagree (no verdict)"


def goals_table(s: dict[str, Any]) -> list[str]:
    evs = _evaluators(s)
    out = [f"Goals for `{s['target']}` (rules: " + "; ".join(f"{GOAL_LABEL[k]}: {v}" for k, v in GOAL_RULES.items())
           + "). A verdict counts only where both evaluators agree.", "",
           "| goal | " + " | ".join(EV_LABEL[e] for e in evs) + (" | both agree |" if len(evs) > 1 else ""),
           "|---|" + "---|" * len(evs) + ("---|" if len(evs) > 1 else "")]
    for k, lab in GOAL_LABEL.items():
        cells = [_goal_cell(s["goals"].get(e, {}).get(k)) for e in evs]
        out.append(f"| {lab} | " + " | ".join(cells) + (f" | {agreement(s, k)} |" if len(evs) > 1 else ""))
    return out


def validity_lines(s: dict[str, Any]) -> list[str]:
    out = []
    for e in _evaluators(s):
        v = s.get("validity", {}).get(e)
        if not v or v.get("valid") is None:
            out.append(f"- data multiplier ({EV_LABEL[e]}): random-2x not run, setup validity unknown")
            continue
        ci = v["ci"]
        txt = f"random-2x − random on the target {ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] bpb"
        if v["valid"]:
            out.append(f"- data multiplier ({EV_LABEL[e]}): valid, {txt}")
        else:
            out.append(f"- **SETUP INVALID for `{s['target']}` / {EV_LABEL[e]}: random-2x does not beat random-1x "
                       f"with a 95% interval excluding 0 ({txt}); more data does not help at this setting, so "
                       "verdicts against random mean little here.**")
    return out


def target_section(s: dict[str, Any]) -> list[str]:
    t = s["target"]
    rows = s["rows"]
    n = len(s["seeds"])
    evs = _evaluators(s)
    budget = sum(s["budget_tokens"].values()) / len(s["budget_tokens"])
    pool_tok = sum(s["pool_tokens"].values()) / len(s["pool_tokens"])
    if s.get("excluded_domain"):
        pool_txt = (f"pool without domain `{s['excluded_domain']}` ({s['pool_rows']:,} docs; evaluated on "
                    f"`{s.get('base_target', t)}`)")
    else:
        pool_txt = f"full pool ({s.get('pool_rows', 0):,} docs)"
    out = [f"### Target `{t}`", "",
           f"{pool_txt}. Seeds {s['seeds']} (n = {n}); budget {budget:,.0f} tokens = {budget / pool_tok:.1%} of "
           f"the pool's {pool_tok:,.0f} tokens (proxy tokenizer, mean over seeds). Bits per byte (lower is better); "
           f"Δ = method − random, paired by seed, 95% t-interval; **↓** = interval below 0.", ""]
    out += validity_lines(s) + [""]
    for e in evs:
        px = _pfx(e)
        out += [f"{EV_LABEL[e]} evaluator:", "",
                "| method | target bpb | Δ target vs random | mix bpb | Δ mix vs random "
                "| × random data (target / mix) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in s["methods"]:
            r = rows[m]
            out.append(f"| {LABEL.get(m, m)} | {_ms(r[px + 'target_bpb'])} | "
                       f"{_ci(r.get(px + 'target_bpb_vs_random'))} | "
                       f"{_ms(r[px + 'mix_bpb'])} | {_ci(r.get(px + 'mix_bpb_vs_random'))} | "
                       f"{_mult(r[px + 'multiplier_target'])} / {_mult(r[px + 'multiplier_mix'])} |")
        out.append("")
    out += ["× random data: the random budget multiple (1x, 2x, 4x, interpolated in log2) with the same mean "
            "bpb; n/a where the mean random curve does not fall from 1x to 2x to 4x.", ""]
    out += ["Mean loss (nats / token, proxy tokenizer) on the target's eval set (neural LM): " + "; ".join(
        f"{LABEL.get(m, m)} {_ms(rows[m]['target_loss'], 3)}" for m in s["methods"]) + ".", ""]
    if s["pairs"]:
        hdr = " | ".join(f"{EV_LABEL[e]} target | {EV_LABEL[e]} mix" for e in evs)
        out += ["Head to head (a − b, bits per byte, paired by seed, 95% t-interval):", "",
                f"| a − b | {hdr} |", "|---|" + "---:|---:|" * len(evs)]
        for name, p in s["pairs"].items():
            out.append(f"| {name} | " + " | ".join(f"{_ci(p[_pfx(e) + 'target_bpb'])} | {_ci(p[_pfx(e) + 'mix_bpb'])}"
                                                  for e in evs) + " |")
        out.append("")
    pm = s["pool_mix"]
    out += ["What each selection holds and what it cost (mean over seeds; `domain` read only for this table). "
            "Noise = spam, garbage, duplicate. Cluster entropy over the selection's k-means clusters (nats; "
            "normalised by ln k). Scorer calls: rows the method scored (DSIR computes an importance weight for "
            "every pool row); selection s: the method's wall time including (estimated) scoring.", "",
            "| method | target-domain tokens | noise tokens / rows | cluster entropy (norm.) | clusters | "
            "scorer calls (share of pool) | scoring s (est.) | selection s | top domains (token share) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| *pool* | {pm['target_domain_share_tokens']:.1%} | {pm['noise_share_tokens']:.1%} / "
            f"{pm['noise_share_rows']:.1%} | {pm['cluster_entropy_nats']:.2f} ({pm['cluster_entropy_norm']:.2f}) | "
            f"{pm['clusters_touched']} | — | — | — | {_top(pm['domain_mix_tokens'])} |"]
    for m in s["methods"]:
        sel = rows[m]["selection"]
        if m == "reference":
            out.append(f"| {LABEL[m]} | (target text) | — | — | — | 0 | — | — | "
                       f"{sel.get('used_tokens') or 0:,.0f} tokens |")
            continue
        calls = sel.get("scorer_calls")
        calls_s = "0" if not calls else f"{calls:,.0f} ({sel.get('scored_share', 0):.1%})"
        out.append(f"| {LABEL.get(m, m)} | {_pct(sel.get('target_domain_share_tokens'))} | "
                   f"{_pct(sel.get('noise_share_tokens'))} / {_pct(sel.get('noise_share_rows'))} | "
                   f"{_num(sel.get('cluster_entropy_nats'), '{:.2f}')} "
                   f"({_num(sel.get('cluster_entropy_norm'), '{:.2f}')}) | "
                   f"{_num(sel.get('clusters_touched'), '{:.0f}')} | {calls_s} | "
                   f"{_num(sel.get('scoring_seconds_est'), '{:.0f}')} | "
                   f"{_num(sel.get('selection_wall_s'), '{:.1f}')} | "
                   f"{_top(sel.get('domain_mix_tokens') or {})} |")
    out.append("")
    out += _cost_lines(s) + [""] + goals_table(s) + [""]
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
        out.append(f"- seed {seed}: " + ("; ".join(parts) or "no scorer"))
    tr = [s["rows"][m]["train"] for m in s["methods"]]
    secs = [x["train_seconds"] for x in tr if x.get("train_seconds") is not None]
    if secs:
        out.append(f"- one LM training: {min(secs):.0f}–{max(secs):.0f} s; evaluation "
                   f"{_num(tr[0].get('eval_seconds'), '{:.0f}')} s; epochs over the selection: " +
                   ", ".join(f"{LABEL.get(m, m)} {s['rows'][m]['train'].get('epochs') or 0:.2f}" for m in s["methods"]))
    ng = [s["rows"][m].get("ngram") for m in s["methods"]]
    if all(ng):
        out.append("- n-gram evaluator (fit on the selection's bytes + score every eval set), seconds per selection: " +
                   ", ".join(f"{LABEL.get(m, m)} {x['seconds']:.1f} ({x['train_bytes'] / 1e6:.1f} MB)"
                             for m, x in zip(s["methods"], ng)))
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
        lines.append(f"  {'method':22s} {'target bpb':>17s} {'Δ target':>30s} {'mix bpb':>17s} {'Δ mix':>30s} "
                     f"{'scored':>7s}")
        for m in s["methods"]:
            r = s["rows"][m]
            share = r["selection"].get("scored_share")
            lines.append(f"  {LABEL.get(m, m):22s} {_ms(r['target_bpb']):>17s} "
                         f"{_ci(r.get('target_bpb_vs_random')):>30s} "
                         f"{_ms(r['mix_bpb']):>17s} {_ci(r.get('mix_bpb_vs_random')):>30s} {_pct(share):>7s}")
        for e in _evaluators(s):
            if "ng_target_bpb" in s["rows"]["random"] and e == "ngram":
                lines.append("  n-gram evaluator: " + "; ".join(
                    f"{m} {s['rows'][m]['ng_target_bpb']['mean']:.4f}/{s['rows'][m]['ng_mix_bpb']['mean']:.4f}"
                    for m in s["methods"]))
            for k, x in s["goals"].get(e, {}).items():
                lines.append(f"  goal [{e}] {k}: {'met' if x['met'] else 'NOT met'}")
    return "\n".join(lines)
