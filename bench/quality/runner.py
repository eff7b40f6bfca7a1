"""Orchestration: pool -> per seed (proxy, tokens) -> per target (scorers, selections, LMs).

Every expensive artefact is cached under ``cfg.cache_dir`` (pool stages, proxies, token ids,
per-row scores, and each trained LM's evaluation keyed by the selected rows), so a rerun with
the same settings only re-renders the report. One summary per target is written to
``cache/summary/<target>-<config key>.json``; :mod:`bench.quality.report` renders them.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from quadsel.core.atomic import atomic_write_json, read_json, stable_hash

from .config import METHODS, QualityConfig, base_target, excluded_domain
from .data import PoolData, SeedModel, encode, load_tokenizer, prepare_pool, prepare_seed_model, read_reference
from .dsir import select_dsir
from .ngram import fit_and_evaluate
from .scoring import ScoreCache, score_cache
from .select import describe, pool_description, run_method
from .summary import summarise
from .train import EvalSet, load_eval_sets, train_and_evaluate

logger = logging.getLogger("quadsel.bench.quality")

# topk first: its full-pool scan fills the score cache that cluster-topk and quad then read
_ORDER = ["random", "random-2x", "random-4x", "topk-ekfac", "cluster-topk-ekfac", "quad-ekfac",
          "quad-gradcos", "dsir", "reference"]
_ORDER += [m for m in METHODS if m not in _ORDER]  # the other scorers: topk before quad


def config_key(cfg: QualityConfig) -> str:
    """Fingerprint of everything that changes a number (targets, cache and threads excluded)."""
    d = cfg.model_dump(mode="json", exclude={"targets", "cache_dir", "threads", "methods"})
    if not d["scorer"]["options"]:  # absent before scorer options existed: keep earlier keys
        del d["scorer"]["options"]
    return stable_hash(d)


def _train_cached(cfg: QualityConfig, docs: list[np.ndarray], model: SeedModel, seed: int, what: str,
                  eval_sets: dict[str, EvalSet]) -> tuple[dict[str, Any], bool]:
    h = hashlib.sha256()
    for d in docs:
        h.update(np.asarray(d, dtype=np.int32).tobytes())
        h.update(b"|")
    key = stable_hash({"v": 1, "docs": h.hexdigest(), "model": model.key, "lm": cfg.lm.model_dump(mode="json"),
                       "eval": cfg.eval.model_dump(mode="json"), "device": cfg.device, "seed": seed,
                       "eval_sets": {n: [len(e.texts), e.bytes] for n, e in eval_sets.items()}})
    # keyed by content: a selection that does not depend on the target (random) trains once
    path = Path(cfg.cache_dir) / "train" / f"{what}-s{seed}-{key}.json"
    if path.is_file():
        return read_json(path), True
    res = train_and_evaluate(cfg, docs, model.bos_id, model.model_dir, seed, eval_sets)
    atomic_write_json(path, res)
    return res, False


def _ngram_cached(cfg: QualityConfig, texts: list[str], seed: int, what: str,
                  eval_sets: dict[str, EvalSet]) -> dict[str, Any] | None:
    """The n-gram evaluator on a selection's raw texts (keyed by their content; cheap anyway)."""
    if not cfg.ngram.enabled:
        return None
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00|")
    key = stable_hash({"v": 1, "texts": h.hexdigest(), "order": cfg.ngram.order,
                       "eval": cfg.eval.model_dump(mode="json"),
                       "eval_sets": {n: [len(e.texts), e.bytes] for n, e in eval_sets.items()}})
    path = Path(cfg.cache_dir) / "ngram" / f"{what}-s{seed}-{key}.json"
    if path.is_file():
        return read_json(path)
    res = fit_and_evaluate(texts, {n: e.texts for n, e in eval_sets.items()}, order=cfg.ngram.order)
    atomic_write_json(path, res)
    return res


def _selection_docs(model: SeedModel, rows: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(model.ids[model.offsets[r]:model.offsets[r + 1]]) for r in rows.tolist()]


def run_target_seed(cfg: QualityConfig, pool: PoolData, model: SeedModel, target: str, seed: int,
                    reference: list[str], eval_sets: dict[str, EvalSet]) -> dict[str, Any]:
    """Every method for one (target, seed): selection stats, training, evaluation, timings."""
    base = base_target(target)  # the eval set of the target (linux-ood is evaluated on linux)
    base_budget = model.run.selector_parts()[1].amount  # the job's budget: budget_fraction of the pool's tokens
    caches: dict[str, ScoreCache] = {}
    out: dict[str, Any] = {}
    for method in [m for m in _ORDER if m in cfg.methods]:
        t0 = time.monotonic()
        selector, scorer, _ = METHODS[method]
        texts: list[str]
        if selector == "reference":
            docs = [np.asarray(x, dtype=np.int32) for x in encode(load_tokenizer(model.model_dir), reference)]
            texts = list(reference)
            sel = {"selected_rows": len(docs), "used_tokens": int(sum(len(d) for d in docs)),
                   "budget_tokens": None, "scorer_calls": 0, "scored_share": 0.0,
                   "note": "the target's reference split"}
        elif selector == "dsir":
            rows, info = select_dsir(cfg, pool, model.lengths, target, base_budget, seed)
            docs = _selection_docs(model, rows)
            texts = pool.store.texts(rows)
            sel = {**info["stats"], "budget_tokens": base_budget, "used_tokens": info["used_tokens"],
                   **describe(rows, pool, model, base)}
        else:
            cache = None
            if scorer is not None:
                if scorer not in caches:
                    # the scorer belongs to the proxy: with one proxy for all seeds, one score cache too
                    caches[scorer] = score_cache(cfg, pool, model, scorer, target, reference, model.seed)
                cache = caches[scorer]
            rec = run_method(method, pool, model, base_budget, seed, cache)
            docs = _selection_docs(model, rec.rows)
            texts = pool.store.texts(rec.rows)
            sel = {**rec.stats, "budget_tokens": rec.budget_tokens, "used_tokens": rec.used_tokens,
                   **describe(rec.rows, pool, model, base)}
        t_sel = time.monotonic() - t0
        what = method if selector == "random" else f"{target}-{method}"
        res, cached = _train_cached(cfg, docs, model, seed, what, eval_sets)
        ng = _ngram_cached(cfg, texts, seed, what, eval_sets)
        out[method] = {"selection": sel, "train": {k: v for k, v in res.items() if k != "eval"},
                       "eval": res["eval"], "selection_wall_s": round(t_sel, 2), "train_cached": cached}
        if ng is not None:
            out[method]["ngram"] = ng
        ev = res["eval"]
        logger.info("%s seed %d %-20s target bpb %.4f  mix bpb %.4f%s  (scored %s rows, select %.1fs, train %.1fs%s)",
                    target, seed, method, ev[base]["bpb"], float(np.mean([e["bpb"] for e in ev.values()])),
                    "" if ng is None else f"  | n-gram target {ng['eval'][base]['bpb']:.4f} mix "
                    f"{np.mean([e['bpb'] for e in ng['eval'].values()]):.4f} ({ng['seconds']:.1f}s)",
                    sel.get("scorer_calls"), t_sel, res.get("train_seconds", 0.0), " cached" if cached else "")
    for c in caches.values():
        c.close()
    out["_scoring"] = {name: {**c.stats, "seconds_per_token": c.seconds_per_token, "full_pool_seconds_est":
                              c.cost_of(np.arange(len(pool.store)))} for name, c in caches.items()}
    out["_budget_tokens"] = base_budget
    out["_pool_tokens"] = int(model.lengths.sum())
    out["_pool"] = pool_description(pool, model, base)
    out["_pool_rows"] = len(pool.store)
    out["_excluded_domain"] = pool.excluded_domain
    return out


def run(cfg: QualityConfig) -> dict[str, dict[str, Any]]:
    """Run the benchmark for ``cfg.targets``; return (and save) one summary per target."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for t in cfg.targets:
        if not (cfg.target_dir(base_target(t)) / "reference.jsonl").is_file():
            raise FileNotFoundError(f"target {t!r}: no {cfg.target_dir(base_target(t)) / 'reference.jsonl'}")
    t_start, c_start = time.monotonic(), time.process_time()
    timings: dict[str, Any] = {"pool_embed_cluster_s": 0.0, "proxy_and_tokens_s": {}}
    eval_sets = load_eval_sets(cfg)
    refs = {t: read_reference(cfg, t) for t in cfg.targets}
    per: dict[str, dict[int, Any]] = {t: {} for t in cfg.targets}
    target_wall = {t: 0.0 for t in cfg.targets}
    target_cpu = {t: 0.0 for t in cfg.targets}
    groups: dict[str | None, list[str]] = {}  # one pool per excluded domain (None: the full pool)
    for t in cfg.targets:
        groups.setdefault(excluded_domain(t), []).append(t)
    for dom, targets in groups.items():
        t0 = time.monotonic()
        pool = prepare_pool(cfg, dom)
        timings["pool_embed_cluster_s"] = round(timings["pool_embed_cluster_s"] + time.monotonic() - t0, 2)
        label = "pool" if dom is None else f"pool-no-{dom}"
        for seed in cfg.seeds:
            t0 = time.monotonic()
            model = prepare_seed_model(cfg, pool, seed)
            timings["proxy_and_tokens_s"][f"{label} s{seed}"] = round(time.monotonic() - t0, 2)
            for target in targets:
                t0, c0 = time.monotonic(), time.process_time()
                per[target][seed] = run_target_seed(cfg, pool, model, target, seed, refs[target], eval_sets)
                target_wall[target] += time.monotonic() - t0
                target_cpu[target] += time.process_time() - c0
    timings["total_wall_s"] = round(time.monotonic() - t_start, 2)
    timings["total_cpu_s"] = round(time.process_time() - c_start, 2)  # this process, all threads
    key = config_key(cfg)
    meta = {"config": cfg.model_dump(mode="json"), "config_key": key, "machine": machine(cfg),
            "eval_sets": {n: {"docs": len(e.texts), "docs_total": e.n_docs_total, "bytes": e.bytes}
                          for n, e in eval_sets.items()},
            "clusters": cfg.cluster_k, "run_targets": list(cfg.targets), "timings": timings}
    out = {}
    for target in cfg.targets:
        summary = summarise(cfg, target, per[target])
        summary.update(meta)
        first = per[target][cfg.seeds[0]]
        summary["pool_rows"] = first["_pool_rows"]
        summary["excluded_domain"] = first["_excluded_domain"]
        summary["target_wall_s"] = round(target_wall[target], 2)
        summary["target_cpu_s"] = round(target_cpu[target], 2)
        atomic_write_json(Path(cfg.cache_dir) / "summary" / f"{target}-{key}.json", summary)
        out[target] = summary
    return out


def load_summaries(cfg: QualityConfig) -> dict[str, dict[str, Any]]:
    """Every target's saved summary for this configuration (targets run earlier included)."""
    key = config_key(cfg)
    out = {}
    for t in cfg.all_variants():
        p = Path(cfg.cache_dir) / "summary" / f"{t}-{key}.json"
        if p.is_file():
            out[t] = read_json(p)
    return out


def machine(cfg: QualityConfig) -> dict[str, Any]:
    import os

    import torch

    from quadsel.pipeline.cluster import cpu_budget

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": cfg.device,
            "cpus": cpu_budget(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
