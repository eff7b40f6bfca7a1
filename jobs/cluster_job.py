"""``quadsel cluster``: sources -> embed -> cluster, writing assignments and the cluster table."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from quadsel.core.atomic import atomic_write_json
from quadsel.core.progress import run_log
from quadsel.pipeline.lock import RunLock

from .config import JobConfig
from .layout import RunLayout
from .stages import (
    MODEL_EMBEDDERS,
    JobError,
    RunContext,
    cluster_pool,
    cluster_summary_matches,
    cluster_table,
    embed_pool,
    read_sources,
    write_assignments,
    write_cluster_summary,
)

logger = logging.getLogger(__name__)


def neighbour_gamma(cfg: JobConfig) -> float:
    from quadsel.selection import QuadConfig

    return float(cfg.selection.quad.get("gamma", QuadConfig.model_fields["gamma"].default))


def run_cluster(cfg: JobConfig) -> dict[str, Any]:
    with RunLock(cfg.run_dir):
        layout = RunLayout(Path(cfg.run_dir))
        layout.logs.mkdir(parents=True, exist_ok=True)
        with run_log(str(layout.cluster_log)):
            return _run_cluster(cfg)


def _run_cluster(cfg: JobConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    # a run dir that holds a finished selection: preflight refused other clustering settings, and
    # the run-level files (config.resolved.yaml, rejects.jsonl) keep describing the selection
    ctx = RunContext.create(cfg, keep_committed=True, command="cluster")
    pool, _ = read_sources(ctx)
    model_dir = None
    if cfg.embed.kind in MODEL_EMBEDDERS and cfg.embed.model is None:
        from .models import prepare_model

        model_dir = prepare_model(ctx, pool)  # hidden/gradient features of the proxy model
    emb = embed_pool(ctx, pool, model_dir)
    result = cluster_pool(ctx, emb)
    if ctx.pending:  # the selection's clusters/ (with its bandit columns) stay as they are
        ctx.discard_pending()
        if not cluster_summary_matches(ctx, result, warn=False):
            raise JobError(
                f"{ctx.run_dir} holds a finished selection whose clusters are not this clustering (the pool's "
                "files changed since it was made?); its clusters/ tables are left as they are: run `quadsel "
                "run` to make a new selection from the pool as it is now, or give this clustering its own "
                "run directory (--run-dir DIR)")
        logger.info("%s holds a finished selection with these clusters: clusters/ already describes them "
                    "(with the selection's columns), left as it is", ctx.run_dir)
    else:
        write_assignments(ctx, pool, result)
        table = cluster_table(pool, result, neighbour_gamma(cfg))
        write_cluster_summary(ctx, table)
    sizes = np.bincount(result.assignments, minlength=len(result.centroids))
    ctx.timings["total"] = round(time.monotonic() - t0, 3)
    summary = {
        "rows": len(pool),
        "clusters": int(len(result.centroids)),
        "backend": result.backend,
        "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "timings_s": ctx.timings,
    }
    atomic_write_json(ctx.layout.cluster_job, summary)
    logger.info("clustered %d rows into %d clusters with %s in %.1fs", len(pool),
                len(result.centroids), result.backend, ctx.timings["total"])
    return summary
