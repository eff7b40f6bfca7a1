"""``quadsel demo``: the embedded default corpus, a config for it, and the main job on it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from quadsel.core.atomic import atomic_write_text
from quadsel.pipeline.demo import build_demo_corpus

from .config import load_config

logger = logging.getLogger(__name__)


def demo_config(run_dir: Path, pool: Path, reference: Path, seed: int) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir / "run"),
        "seed": seed,
        "pool": {"path": str(pool), "text_field": "text", "id_field": "id", "max_chars": 4000},
        "reference": {"path": str(reference)},
        "embed": {"kind": "tfidf", "dim": 128, "seed": seed},
        "cluster": {"k": 48, "niter": 20, "seed": seed},
        "model": {"path": None, "max_length": 256, "batch_size": 16,
                  "proxy": {"train_sample": 2000, "steps": 200}},
        "scorer": {"name": "ekfac", "layers": "all", "fit_sample": 256},
        "selection": {"method": "quad", "budget": {"unit": "examples", "fraction": 0.1}},
        "ray": {"enabled": True, "num_actors": 2},
    }


def run_demo(run_dir: Path, *, seed: int = 0, overrides: list[str] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    from .inspect import inspect_clusters
    from .run_job import run_selection

    corpus = build_demo_corpus(run_dir / "data", seed=seed)
    cfg_path = run_dir / "demo.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(demo_config(run_dir, corpus.pool, corpus.reference, seed),
                                               sort_keys=False))
    cfg = load_config(cfg_path, overrides)
    logger.info("demo corpus %s -> config %s", corpus.counts, cfg_path)
    summary = run_selection(cfg)
    if not quiet:
        inspect_clusters(cfg.run_dir, top=12)
        print_summary(summary, cfg.run_dir)
    return summary


def print_summary(summary: dict[str, Any], run_dir: str) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]selected {summary['selected']:,} of {summary['pool_rows']:,} rows[/bold] "
            f"({summary['method']}, budget {summary['budget']['amount']:,} {summary['budget']['unit']}) "
            f"from {summary['clusters_taken']} of {summary['clusters']} clusters; "
            f"scored {summary['scorer_calls']:,} rows ({summary['scored_share']:.1%} of the pool) "
            f"in {summary['rounds']} rounds")
    from quadsel.pipeline.demo import noise_share

    from .report_data import domain_mix

    mix = domain_mix(run_dir)
    if mix is not None:
        ns = noise_share(mix)
        if ns is not None:
            c.print(f"noise (spam, garbage, duplicates): {ns['pool']:.1%} of the pool -> "
                    f"{ns['selection']:.1%} of the selection")
        parts = [f"{d} {mix['selection'].get(d, 0) / max(1, summary['selected']):.0%}"
                 f" (pool {n / summary['pool_rows']:.0%})" for d, n in mix["pool"].items()]
        c.print("selection by domain: " + ", ".join(parts))
    c.print(f"shards: {run_dir}/manifest.json   inspect: quadsel inspect {run_dir}")
