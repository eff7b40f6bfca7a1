"""``quadsel demo``: the embedded default corpus, a config for it, and the main job on it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import atomic_write_text
from pipeline.demo import build_demo_corpus

from .config import load_config

logger = logging.getLogger("quadsel.jobs")


def demo_config(run_dir: Path, pool: Path, reference: Path, seed: int) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir / "run"),
        "seed": seed,
        "pool": {"path": str(pool), "text_field": "text", "id_field": "id", "max_chars": 4000},
        "reference": {"path": str(reference)},
        "embed": {"kind": "tfidf", "dim": 128, "seed": seed},
        "cluster": {"k": 48, "niter": 20, "seed": seed},
    }


def run_demo(run_dir: Path, *, seed: int = 0, overrides: list[str] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    from .cluster_job import run_cluster
    from .inspect import inspect_clusters

    corpus = build_demo_corpus(run_dir / "data", seed=seed)
    cfg_path = run_dir / "demo.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(demo_config(run_dir, corpus.pool, corpus.reference, seed),
                                               sort_keys=False))
    cfg = load_config(cfg_path, overrides)
    logger.info("demo corpus %s -> config %s", corpus.counts, cfg_path)
    summary = run_cluster(cfg)
    if not quiet:
        inspect_clusters(cfg.run_dir, top=20)
    return summary
