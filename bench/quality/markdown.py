"""``bench/results_quality.md``: commands, machine, protocol, one section per target, goals.

A hand-written block between ``<!-- notes -->`` and ``<!-- /notes -->`` in an existing report
is kept when the report is regenerated.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quadsel.pipeline.atomic import atomic_write_text

from .config import QualityConfig
from .report import target_section

_NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)


def _protocol(cfg: QualityConfig, any_summary: dict[str, Any]) -> list[str]:
    lm, p = cfg.lm, cfg.proxy
    ev = any_summary["eval_sets"]
    evs = ", ".join(f"{n} {e['docs']}/{e['docs_total']} docs ({e['bytes']:,} B)" for n, e in ev.items())
    return [
        "Protocol (every method, every seed, identical except for the selected data):", "",
        f"- Pool: `pool.jsonl` ({any_summary['pool_rows']:,} docs), read, tf-idf embedded (dim {cfg.embed_dim}) and "
        f"k-means clustered (k = {cfg.cluster_k}) once with quadsel's own stages. `domain` is read only to describe "
        "selections after the fact.",
        f"- Scoring proxy: `influence.build_proxy_model` trained on {p.train_sample:,} pool docs "
        f"({'one per seed' if p.per_seed else 'one for all seeds'}; Llama {p.num_layers}x{p.hidden_size}, "
        f"BPE vocab {p.vocab_size}, {p.steps} steps); never sees reference or eval text. Scorers: quadsel's defaults "
        f"(EK-FAC fitted on {cfg.scorer.fit_sample} pool docs, relative damping {cfg.scorer.damping}, all layers, "
        f"exact (no projection); grad-cos the same without curvature), reference = the target's `reference.jsonl`, "
        f"texts truncated to {p.max_length} tokens for scoring.",
        f"- Budget: {cfg.budget_fraction:.0%} of the pool's tokens under the proxy tokenizer (unit `tokens`). "
        "Quad runs with `QuadConfig.scaled` (the documented defaults; nothing tuned, neither on eval nor on "
        "reference); topk / cluster-topk / random with their defaults.",
        f"- Trained LM: a fresh Llama {lm.num_layers}x{lm.hidden_size} ({lm.num_heads} heads) with the seed's proxy "
        f"tokenizer, the same initialisation per seed, {lm.steps} steps x {lm.batch_size} windows x {lm.seq_len} "
        f"tokens, AdamW lr {lm.lr} (warmup + cosine). Fixed compute: random 2x / 4x see more distinct data in the "
        "same steps, which is what makes them a data multiplier.",
        f"- Evaluation: mean loss and bits per byte on the target's `eval.jsonl` and on the broad mix (the macro "
        f"average over every target's eval set). Eval docs: {evs}.",
        f"- Seeds {cfg.seeds}: a seed fixes " + ("the proxy and its scores, " if p.per_seed else "") +
        "the selectors' randomness (random's sample, quad's cluster order and member permutations), the LM's "
        "init and data order" + ("" if p.per_seed else "; the proxy and its scores are the same for every seed "
                                 "(seed 0's), so topk / cluster-topk select the same rows each seed and "
                                 "the intervals do not include the proxy's own variance") +
        ". Differences are paired by seed, with a t-interval over seeds.", ""]


def write(path: Path, cfg: QualityConfig, summaries: dict[str, dict[str, Any]], argv: list[str]) -> Path:
    any_s = next(iter(summaries.values()))
    m = any_s["machine"]
    lines = ["## Selection quality: does quadsel's selection train a better model? (issue 5)", "",
             "Commands (each writes this file from every target saved in the cache with the same settings):", "",
             "```", "python -m bench.quality --target gsm8k          # one target, CPU preset",
             "python -m bench.quality --target all            # wikitext, gsm8k, linux",
             "python -m bench.quality --target all --preset gpu --device cuda   # larger LM, 5 seeds",
             "```", "",
             f"This file: `python -m bench.quality {' '.join(argv)}` (preset `{cfg.preset}`, config key "
             f"`{any_s['config_key']}`).", "",
             f"Machine: {m.get('cpus')} CPU cores, torch {m.get('torch')} ({m.get('device')}, "
             f"{m.get('torch_threads')} threads), Python {m.get('python')}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "; no GPU was available in this session")
             + f". Load average at the end: {m.get('load_avg_at_end')}.", ""]
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = _NOTES.search(old)
    lines += [notes.group(0) if notes else "<!-- notes -->\n<!-- /notes -->", ""]
    lines += _protocol(cfg, any_s)
    lines += ["### Goals at a glance", "", "| target | quad beats random (target) | quad ≥ topk (mix) | quad scores ≤ 10% |",
              "|---|---|---|---|"]
    for t, s in summaries.items():
        g = s["goals"]
        cell = lambda k: "—" if k not in g else ("met" if g[k]["met"] else "**NOT met**")  # noqa: E731
        topk = cell("quad_matches_or_beats_topk_mix")
        if "quad_matches_or_beats_topk_mix" in g:  # say what "matches" rests on
            x = g["quad_matches_or_beats_topk_mix"]
            topk += f" ({x['reading']}, Δ {x['ci']['mean']:+.3f} bpb)"
        share = cell("quad_scores_at_most_10pct")
        if "quad_scores_at_most_10pct" in g and g["quad_scores_at_most_10pct"]["scored_share"] is not None:
            share += f" ({g['quad_scores_at_most_10pct']['scored_share']:.1%})"
        lines.append(f"| {t} | {cell('quad_beats_random_target')} | {topk} | {share} |")
    lines.append("")
    for t, s in summaries.items():
        lines += target_section(s)
        tm = s["timings"]
        lines += [f"Timing (`{t}`, as run with targets {s['run_targets']}): target work {s['target_wall_s']:.0f} s "
                  f"wall / {s.get('target_cpu_s', 0):.0f} s CPU (selection + training + evaluation, all seeds); "
                  f"shared setup: pool embed + cluster {tm['pool_embed_cluster_s']:.0f} s, proxies + token ids "
                  f"{sum(tm['proxy_and_tokens_s'].values()):.0f} s; whole command {tm['total_wall_s']:.0f} s wall / "
                  f"{tm.get('total_cpu_s', 0):.0f} s CPU (stages found in the cache count only the time to "
                  "load them).", ""]
    atomic_write_text(path, "\n".join(lines))
    return path
