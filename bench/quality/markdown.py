"""``bench/results_quality.md``: commands, machine, protocol, one section per target, goals.

A hand-written block between ``<!-- notes -->`` and ``<!-- /notes -->`` in an existing report
is kept when the report is regenerated.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quadsel.core.atomic import atomic_write_text

from .config import QualityConfig
from .report import GOAL_LABEL, agreement, target_section

_NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)


def _protocol(cfg: QualityConfig, any_summary: dict[str, Any]) -> list[str]:
    lm, p = cfg.lm, cfg.proxy
    ev = any_summary["eval_sets"]
    evs = ", ".join(f"{n} {e['docs']}/{e['docs_total']} docs ({e['bytes']:,} B)" for n, e in ev.items())
    return [
        "Protocol (every method, every seed, identical except for the selected data):", "",
        f"- Pool: `pool.jsonl` ({any_summary['pool_rows']:,} docs), read, tf-idf embedded (dim {cfg.embed_dim}) and "
        f"k-means clustered (k = {cfg.cluster_k}) once with quadsel's own stages. `domain` is read only to describe "
        "selections after the fact, and to build the leave-domain-out pools: `<target>-ood` uses the target's "
        "reference and eval files but a pool without the target's own domain (gsm8k: math, linux: c_code, "
        "wikitext: wiki), embedded, clustered (the same k, as the pool loses only one domain; "
        "each section gives its row count), proxied and tokenized on its own (caches keyed by its content).",
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
        "- DSIR: the official `data-selection` package (HashedNgramDSIR with its defaults: word-punct unigrams + "
        "bigrams in 10,000 hashed buckets, examples under 100 words filtered), raw = the pool as jsonl, target = "
        "the target's `reference.jsonl`; rows taken in Gumbel top-k order of the log importance weights (as its "
        "`resample` does, the noise seeded by the bench seed) while they fit the same token budget.",
        f"- Evaluation: mean loss and bits per byte on the target's `eval.jsonl` and on the broad mix (the macro "
        f"average over every target's eval set). Eval docs: {evs}.",
        f"- Second evaluator (no training, deterministic): a byte-level {cfg.ngram.order}-gram LM with interpolated "
        "Witten–Bell smoothing down to a uniform 256-byte base (`bench/quality/ngram.py`), fitted on the UTF-8 "
        "bytes of the selected documents; bits per byte on the same eval texts.",
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
             "python -m bench.quality --target all            # gsm8k, linux, wikitext and their -ood variants",
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
    full = next((x for x in summaries.values() if not x.get("excluded_domain")), any_s)
    lines += _protocol(cfg, full)
    lines += ["### Goals at a glance", "",
              "Each cell: neural LM / byte 5-gram; a verdict counts only where both agree (see each target's "
              "goals table for the numbers and rules).", "",
              "| target | setup valid (2x > 1x) | " + " | ".join(GOAL_LABEL.values()) + " |",
              "|---|---|" + "---|" * len(GOAL_LABEL)]
    for t, s in summaries.items():
        if "evaluators" not in s:  # a summary from before the two evaluators
            continue
        valid = " / ".join({True: "yes", False: "**NO**", None: "?"}[s["validity"][e].get("valid")]
                           for e in s["evaluators"])
        cells = []
        for k in GOAL_LABEL:
            per = [s["goals"].get(e, {}).get(k) for e in s["evaluators"]]
            per_s = " / ".join("—" if x is None else ("met" if x["met"] else "NOT") for x in per)
            cells.append(f"{per_s} → {agreement(s, k)}")
        lines.append(f"| {t} | {valid} | " + " | ".join(cells) + " |")
    lines.append("")
    for t, s in summaries.items():
        if "evaluators" not in s:
            continue
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
