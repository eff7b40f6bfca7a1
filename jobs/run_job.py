"""``quadsel run``: pool -> embed -> cluster -> fit scorer -> bandit -> Arrow shards.

Every stage is cached in ``stages/`` (a rerun with the same config reuses embeddings, clusters,
the proxy model and curvature factors). The selector's state is saved atomically to
``bandit/state.json`` after every round; a killed run resumes from there and ends with output
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from quadsel.core import faults
from quadsel.core.atomic import atomic_path, atomic_write_json, read_json, stable_hash
from quadsel.core.progress import Progress, run_log
from quadsel.pipeline.lock import RunLock
from quadsel.pipeline.shards import ShardWriter, recover, selection_schema, verify, write_order
from quadsel.pipeline.stage import read_marker, write_marker
from quadsel.pipeline.store import PoolStore, expand_meta

from .config import JobConfig
from .layout import RunLayout
from .selection_run import SelectionRun
from .stages import (
    JobError,
    RunContext,
    cluster_summary_matches,
    cluster_table,
    read_selector_state,
    state_checksum,
    write_cluster_summary,
)

logger = logging.getLogger(__name__)

def _write_selection(ctx: RunContext, pool: PoolStore, result, config_hash: str,
                     extra: dict[str, Any]) -> dict[str, Any]:
    cfg = ctx.cfg
    rows = np.asarray(result.rows, dtype=np.int64)
    # a seeded shuffled order (not grouped by cluster), a function of the rows and the seed only
    order = write_order(rows, cfg.seed) if cfg.output.shuffle else np.arange(len(rows))
    rows = rows[order]
    clusters, scores, rounds = (np.asarray(a)[order] for a in (result.cluster, result.score, result.round))
    meta = expand_meta(pool.take(rows, columns=["meta"]))
    id_name, text_name = cfg.pool.id_field or "id", cfg.pool.text_field
    meta = meta.drop_columns([c for c in meta.column_names if c in (id_name, text_name)])
    base = pa.schema([pa.field(id_name, pa.string()), pa.field(text_name, pa.string()), *meta.schema])
    schema = selection_schema(base)
    chunk = 4096
    with ShardWriter(ctx.run_dir, cfg.output, schema=schema, seed=cfg.seed, config_hash=config_hash,
                     extra=extra) as writer, Progress("write shards", total=len(rows), unit="rows") as prog:
        for a in range(0, len(rows), chunk):
            part = pool.take(rows[a:a + chunk], columns=["id", "text"])
            cols = [part.column("id").cast(pa.string()), part.column("text").cast(pa.string())]
            cols += [meta.column(i).slice(a, len(part)) for i in range(meta.num_columns)]
            score = np.asarray(scores[a:a + chunk], dtype=np.float64)
            cols += [pa.array(np.asarray(clusters[a:a + chunk], dtype=np.int32)),
                     pa.array(score, mask=np.isnan(score)),
                     pa.array(np.asarray(rounds[a:a + chunk], dtype=np.int32))]
            writer.write(pa.Table.from_arrays(cols, schema=schema))
            prog.advance(len(part))
        manifest = writer.close()
    return manifest


def _write_bandit_tables(ctx: RunContext, result, probes: dict[str, np.ndarray]) -> None:
    sel = pa.table({"row": pa.array(np.asarray(result.rows, np.int64)),
                    "cluster": pa.array(np.asarray(result.cluster, np.int32)),
                    "score": pa.array(np.asarray(result.score, np.float64)),
                    "round": pa.array(np.asarray(result.round, np.int32)),
                    "fill": pa.array(np.asarray(result.fill, bool))})
    with atomic_path(ctx.layout.selected) as tmp:
        pq.write_table(sel, tmp)
    pr = pa.table({k: pa.array(v) for k, v in probes.items()})
    with atomic_path(ctx.layout.probes) as tmp:
        pq.write_table(pr, tmp)


def run_selection(cfg: JobConfig, *, stop_after_round: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; ``stop_after_round`` is for resume tests."""
    from .preflight import config_problems, raise_if

    raise_if(config_problems(cfg, "run"))  # before the run directory is even created
    run_dir = Path(cfg.run_dir)
    with RunLock(run_dir):
        layout = RunLayout(run_dir)
        layout.logs.mkdir(parents=True, exist_ok=True)
        with run_log(str(layout.run_log)):
            return _run_locked(cfg, stop_after_round)


def _scorer_report(scorer_dir: Path) -> dict[str, Any]:
    """What the fitted scorer recorded about itself (e.g. the predictor's held-out Spearman)."""
    meta = read_json(Path(scorer_dir) / "scorer.json")
    return {"report": meta["report"]} if meta.get("report") else {}


def _run_locked(cfg: JobConfig, stop_after_round: int | None) -> dict[str, Any]:
    t_start = time.monotonic()
    # preflight (jobs.preflight): the config, paths, model, device and scorer are checked before
    # anything is written, the pool's size against k / budget / bandit right after it is read
    run = SelectionRun(cfg, preflight=False)
    ctx = run.ctx
    pool = run.pool()
    view, budget, quad = run.selector_parts()  # model, embed, cluster, tokens, budget check
    clusters, lengths = run.clusters(), run.token_lengths()
    scorer_dir = run.scorer_dir()

    run_key = stable_hash({"stages": ctx.keys, "selection": cfg.selection.model_dump(mode="json"),
                           "quad": quad.model_dump(mode="json"), "budget": [budget.unit, budget.amount],
                           "seed": cfg.seed, "output": cfg.output.model_dump(mode="json")})
    # what the manifest records: the job config (run_dir aside), so the same job gives the same bytes
    config_hash = stable_hash(cfg.model_dump(mode="json", exclude={"run_dir"}))
    manifest_path = ctx.layout.manifest
    recover(ctx.run_dir)  # finish or roll back a shard commit that a kill interrupted
    if manifest_path.is_file():
        try:
            verify(ctx.run_dir)
            if (read_marker(ctx.layout.done, run_key, root=ctx.run_dir, what="the selection") is not None
                    and cluster_summary_matches(ctx, clusters)):
                logger.info("run already complete: %s (delete it to run again)", manifest_path)
                ctx.discard_pending()  # config.resolved.yaml keeps the config the selection was made with
                return read_json(ctx.layout.summary)
        except Exception:  # noqa: BLE001 - an invalid or outdated manifest is simply rewritten
            pass

    selector = run.selector()
    state_path = ctx.layout.bandit_state
    saved = read_selector_state(state_path, run_key)  # None: absent, another config's, or damaged
    if saved is not None:
        try:
            selector.load_state_dict(saved["selector"])
            logger.info("resuming the selection from round %d", saved.get("round", 0))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            logger.warning("%s: does not fit this selection (%s: %s); starting the selection over",
                           state_path, type(e).__name__, e)
            selector = run.selector()

    rounds = {"n": 0}
    progress = Progress("select", total=budget.amount, unit=budget.unit)
    done_before = {"used": 0}

    def checkpoint(sel) -> None:
        rounds["n"] += 1
        used = sel.tracker.used
        progress.advance(used - done_before["used"])
        done_before["used"] = used
        faults.point("round.before_save")
        state = sel.state_dict()
        atomic_write_json(state_path, {"key": run_key, "round": len(sel.history()), "selector": state,
                                       "sha256": state_checksum(state)})
        faults.point("round.saved")
        if stop_after_round is not None and rounds["n"] >= stop_after_round:
            raise _StopForTest()

    t0 = time.monotonic()
    try:
        with progress:
            _, result = run.select(selector=selector, on_round=checkpoint)
    except _StopForTest:
        return {"stopped_after_round": rounds["n"]}
    ctx.timed("select", t0)
    faults.point("select.done")

    _write_bandit_tables(ctx, result, selector.probe_log())
    atomic_write_json(ctx.layout.bandit_history, selector.history())
    stats = selector.cluster_stats()
    base = cluster_table(pool, clusters, quad.gamma)
    extra_cols = {k: [st.get(k) for st in stats]
                  for k in ("pulls", "mean_reward", "reward_sd", "cs", "selected", "probed")}
    extra_cols["pulls"] = [p or 0 for p in extra_cols["pulls"]]
    extra_cols["probed"] = [p or 0 for p in extra_cols["probed"]]
    write_cluster_summary(ctx, _append_columns(base, extra_cols))

    rows = np.asarray(result.rows, dtype=np.int64)
    summary: dict[str, Any] = {
        "method": cfg.selection.method,
        "pool_rows": len(pool),
        **result.summary(),
        "selected_tokens": int(lengths[rows].sum()) if lengths is not None else None,
        "clusters": int(len(clusters.centroids)),
        "clusters_taken": int(len(np.unique(np.asarray(result.cluster)))) if len(rows) else 0,
        "scored_share": round(selector.scorer_calls / max(1, len(pool)), 4),
        "scoring_seconds": round(run.scoring["seconds"], 2),
        "quad": quad.model_dump(mode="json") if cfg.selection.method == "quad" else None,
        "inputs": ctx.inputs,  # per input file: rows kept, rejected, truncated
    }
    if scorer_dir is not None:
        summary["scorer"] = {"name": cfg.scorer.name, **_scorer_report(scorer_dir)}
    for note in result.notes:
        logger.warning("selection: %s", note)
    try:
        manifest = _write_selection(ctx, pool, result, config_hash,
                                    extra={"selected": summary["selected"], "method": summary["method"]})
    except OSError as e:  # disk full, quota, I/O error: the commit protocol kept the old state
        raise JobError(f"writing the selection into {ctx.run_dir} failed: {e}; the previous manifest "
                       "and shards (if any) are unchanged; fix the cause and rerun to resume") from e
    ctx.promote()  # the run-level config and rejects now describe the new selection
    summary["shards"] = len(manifest["shards"])
    faults.point("run.before_summary")
    ctx.timings["total"] = round(time.monotonic() - t_start, 3)
    summary["timings_s"] = ctx.timings
    summary["run_key"] = run_key
    atomic_write_json(ctx.layout.summary, summary)
    atomic_write_json(ctx.layout.timings, ctx.timings)
    # the selection's completion marker, like every stage's: its key and the files it covers
    write_marker(ctx.layout.done, run_key, root=ctx.run_dir,
                 files=[ctx.layout.manifest.name, ctx.layout.summary.name], info={"selected": summary["selected"]})
    return summary


def _append_columns(table: pa.Table, cols: dict[str, list[Any]]) -> pa.Table:
    for name, values in cols.items():
        table = table.append_column(name, pa.array(values))
    return table


class _StopForTest(Exception):
    """Raised after a checkpoint when ``stop_after_round`` asks the run to stop early."""
