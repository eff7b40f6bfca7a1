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
from quadsel.pipeline.store import PoolStore, expand_meta

from .config import JobConfig
from .models import fit_scorer, load_scorer_factory, prepare_model, token_lengths
from .stages import (
    MODEL_EMBEDDERS,
    JobError,
    RunContext,
    cluster_pool,
    cluster_summary_matches,
    cluster_table,
    embed_pool,
    model_runtime_key,
    read_selector_state,
    read_sources,
    state_checksum,
    write_assignments,
    write_cluster_summary,
)

logger = logging.getLogger(__name__)

NOISE_DOMAINS = ("spam", "garbage", "duplicate")


def _check_budget(cfg: JobConfig, n_rows: int, lengths: np.ndarray | None) -> None:
    """A budget larger than the pool is an error (not "select everything"): it usually means the
    rejects ate most of the pool or the amount has a typo, and saying so costs nothing, while
    training a proxy and scoring to select the whole pool would waste the run."""
    b = cfg.selection.budget
    if b.amount is None:  # a fraction is at most the pool
        return
    if b.unit == "examples":
        have, what = n_rows, f"{n_rows:,} valid rows"
    elif lengths is not None:
        have, what = int(lengths.sum()), f"{int(lengths.sum()):,} tokens in {n_rows:,} valid rows"
    else:
        return
    if lengths is not None and len(lengths) and b.amount < int(lengths.min()):
        raise JobError(f"selection.budget.amount = {b.amount:,} tokens is less than the shortest text of the pool "
                       f"({int(lengths.min()):,} tokens): nothing could be selected")
    if b.amount > have:
        raise JobError(
            f"selection.budget.amount = {b.amount:,} {b.unit} is more than the pool holds ({what}, "
            f"see rejects.jsonl for the rows left out); set selection.budget.amount to at most "
            f"{have:,} or use selection.budget.fraction")


def _selector_parts(cfg: JobConfig, assignments: np.ndarray, centroids: np.ndarray,
                    lengths: np.ndarray | None, n_rows: int):
    """The selectors' view of the pool (members per cluster, neighbour graph), budget, constants."""
    from quadsel.pipeline.cluster import neighbour_graph
    from quadsel.selection import Budget, ClusterView, QuadConfig, members_by_cluster

    b = cfg.selection.budget
    if b.amount is not None:
        amount = b.amount
    elif b.unit == "examples":
        amount = max(1, int(round(b.fraction * n_rows)))
    else:
        amount = max(1, int(round(b.fraction * float(lengths.sum()))))
    budget = Budget(unit=b.unit, amount=amount)
    mean_tokens = float(lengths.mean()) if lengths is not None and len(lengths) else None
    try:
        quad = QuadConfig.scaled(n_rows, len(centroids), budget, mean_tokens=mean_tokens,
                                 **cfg.selection.quad)
    except (TypeError, ValueError) as e:
        from .config import ConfigError

        raise ConfigError(f"selection.quad: {e}") from None
    view = ClusterView(members=members_by_cluster(assignments, len(centroids)),
                       neighbours=neighbour_graph(centroids, quad.gamma), lengths=lengths)
    return view, budget, quad


def _score_rows_fn(pool: PoolStore, workers, counter: dict[str, float]):
    def score_rows(rows: np.ndarray) -> np.ndarray:
        t0 = time.monotonic()
        texts = pool.texts(rows)
        scores = workers.score(texts)
        counter["scored"] += len(rows)
        counter["seconds"] += time.monotonic() - t0
        logger.info("scored %d rows in %.1fs (%.1f rows/s; %d so far)", len(rows), time.monotonic() - t0,
                    len(rows) / max(time.monotonic() - t0, 1e-9), counter["scored"],
                    extra={"fields": {"stage": "score", "count": int(counter["scored"])}})
        faults.point("score.call")
        bad = ~np.isfinite(scores)
        if bad.any():  # a NaN score would silently steer (or stall) the bandit
            raise JobError(f"the scorer returned {int(bad.sum())} non-finite score(s) (NaN/inf) for {len(rows)} "
                           "texts: the model's loss or gradients are not finite (a diverged proxy, e.g. a "
                           "too large model.proxy.lr, or float16 overflow: try model.dtype=float32)")
        # float32 precision: scores must not depend on which worker (thread count) computed them
        return scores.astype(np.float32).astype(np.float64)
    return score_rows


def _make_workers(cfg: JobConfig, factory):
    from quadsel.pipeline.ray_runtime import LocalPool, RayPool

    if cfg.ray.enabled:
        return RayPool(factory, num_actors=cfg.ray.num_actors, num_cpus=cfg.ray.num_cpus_per_actor,
                       max_restarts=cfg.ray.max_restarts, max_task_retries=cfg.ray.max_task_retries,
                       chunk_size=cfg.model.batch_size, address=cfg.ray.address)
    return LocalPool(factory, chunk_size=cfg.model.batch_size)


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
    bdir = ctx.run_dir / "bandit"
    sel = pa.table({"row": pa.array(np.asarray(result.rows, np.int64)),
                    "cluster": pa.array(np.asarray(result.cluster, np.int32)),
                    "score": pa.array(np.asarray(result.score, np.float64)),
                    "round": pa.array(np.asarray(result.round, np.int32)),
                    "fill": pa.array(np.asarray(result.fill, bool))})
    with atomic_path(bdir / "selected.parquet") as tmp:
        pq.write_table(sel, tmp)
    pr = pa.table({k: pa.array(v) for k, v in probes.items()})
    with atomic_path(bdir / "probes.parquet") as tmp:
        pq.write_table(pr, tmp)


def _domain_mix(pool: PoolStore, rows: np.ndarray | None) -> dict[str, int] | None:
    """Count the pool's ``domain`` meta field (measurement only; no selector reads it)."""
    import json

    # batch by batch: memory stays flat whatever the pool size
    batches = ([pool.take(rows, columns=["meta"]).column("meta")] if rows is not None else
               (b.column("meta") for b in pool.iter_batches(8192, columns=["meta"])))
    counts: dict[str, int] = {}
    for col in batches:
        for m in col.to_pylist():
            d = json.loads(m).get("domain") if m else None
            if d is None:
                return None
            counts[str(d)] = counts.get(str(d), 0) + 1
    return dict(sorted(counts.items()))


def run_selection(cfg: JobConfig, *, stop_after_round: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; ``stop_after_round`` is for resume tests."""
    from .preflight import config_problems, raise_if

    raise_if(config_problems(cfg, "run"))  # before the run directory is even created
    run_dir = Path(cfg.run_dir)
    with RunLock(run_dir):
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        with run_log(str(run_dir / "logs" / "run.jsonl")):
            return _run_locked(cfg, stop_after_round)


def _scorer_report(scorer_dir: Path) -> dict[str, Any]:
    """What the fitted scorer recorded about itself (e.g. the predictor's held-out Spearman)."""
    meta = read_json(Path(scorer_dir) / "scorer.json")
    return {"report": meta["report"]} if meta.get("report") else {}


def _run_locked(cfg: JobConfig, stop_after_round: int | None) -> dict[str, Any]:
    from quadsel.selection import make_selector, run_selector

    t_start = time.monotonic()
    # preflight (jobs.preflight): the config, paths, model, device and scorer are checked before
    # anything is written, the pool's size against k / budget / bandit right after it is read
    ctx = RunContext.create(cfg, keep_committed=True, command="run", preflight=False)
    pool, ref = read_sources(ctx)
    uses_model = (cfg.selection.method != "random" or cfg.selection.budget.unit == "tokens"
                  or (cfg.embed.kind in MODEL_EMBEDDERS and cfg.embed.model is None))
    model_dir = prepare_model(ctx, pool) if uses_model else None
    if model_dir is not None:  # how the model runs is part of what it scores: every later key has it
        ctx.keys["model"] = model_runtime_key(cfg, ctx.keys["model"])
    emb = embed_pool(ctx, pool, model_dir)
    clusters = cluster_pool(ctx, emb)
    write_assignments(ctx, pool, clusters)

    lengths = token_lengths(ctx, pool, model_dir) if cfg.selection.budget.unit == "tokens" else None
    _check_budget(cfg, len(pool), lengths)
    view, budget, quad = _selector_parts(cfg, clusters.assignments, clusters.centroids, lengths, len(pool))
    scorer_dir = fit_scorer(ctx, pool, ref, model_dir) if cfg.selection.method != "random" else None

    run_key = stable_hash({"stages": ctx.keys, "selection": cfg.selection.model_dump(mode="json"),
                           "quad": quad.model_dump(mode="json"), "budget": [budget.unit, budget.amount],
                           "seed": cfg.seed, "output": cfg.output.model_dump(mode="json")})
    # what the manifest records: the job config (run_dir aside), so the same job gives the same bytes
    config_hash = stable_hash(cfg.model_dump(mode="json", exclude={"run_dir"}))
    manifest_path = ctx.run_dir / "manifest.json"
    recover(ctx.run_dir)  # finish or roll back a shard commit that a kill interrupted
    if manifest_path.is_file():
        try:
            verify(ctx.run_dir)
            done = ctx.run_dir / "summary.json"
            if (done.is_file() and read_json(done).get("run_key") == run_key
                    and cluster_summary_matches(ctx, clusters)):
                logger.info("run already complete: %s (delete it to run again)", manifest_path)
                ctx.discard_pending()  # config.resolved.yaml keeps the config the selection was made with
                return read_json(ctx.run_dir / "summary.json")
        except Exception:  # noqa: BLE001 - an invalid or outdated manifest is simply rewritten
            pass

    def new_selector():
        return make_selector(cfg.selection.method, view, budget, seed=cfg.seed,
                             config=quad if cfg.selection.method == "quad" else None)

    selector = new_selector()
    state_path = ctx.run_dir / "bandit" / "state.json"
    saved = read_selector_state(state_path, run_key)  # None: absent, another config's, or damaged
    if saved is not None:
        try:
            selector.load_state_dict(saved["selector"])
            logger.info("resuming the selection from round %d", saved.get("round", 0))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            logger.warning("%s: does not fit this selection (%s: %s); starting the selection over",
                           state_path, type(e).__name__, e)
            selector = new_selector()

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

    counter = {"scored": 0, "seconds": 0.0}
    t0 = time.monotonic()
    workers = None
    try:
        if scorer_dir is not None:
            workers = _make_workers(cfg, load_scorer_factory(cfg, scorer_dir))
            score_rows = _score_rows_fn(pool, workers, counter)
        else:
            def score_rows(rows):  # random never scores
                raise JobError("the random selector asked for scores")
        with progress:
            result = run_selector(selector, score_rows, on_round=checkpoint)
    except _StopForTest:
        return {"stopped_after_round": rounds["n"]}
    finally:
        if workers is not None:
            workers.shutdown()
    ctx.timed("select", t0)
    faults.point("select.done")

    _write_bandit_tables(ctx, result, selector.probe_log())
    atomic_write_json(ctx.run_dir / "bandit" / "history.json", selector.history())
    stats = selector.cluster_stats()
    base = cluster_table(pool, clusters, quad.gamma)
    extra_cols = {k: [st.get(k) for st in stats]
                  for k in ("pulls", "mean_reward", "reward_sd", "cs", "selected", "probed")}
    extra_cols["pulls"] = [p or 0 for p in extra_cols["pulls"]]
    extra_cols["probed"] = [p or 0 for p in extra_cols["probed"]]
    write_cluster_summary(ctx, _append_columns(base, extra_cols))

    rows = np.asarray(result.rows, dtype=np.int64)
    pool_mix, sel_mix = _domain_mix(pool, None), _domain_mix(pool, rows)
    summary: dict[str, Any] = {
        "method": cfg.selection.method,
        "pool_rows": len(pool),
        **result.summary(),
        "selected_tokens": int(lengths[rows].sum()) if lengths is not None else None,
        "clusters": int(len(clusters.centroids)),
        "clusters_taken": int(len(np.unique(np.asarray(result.cluster)))) if len(rows) else 0,
        "scored_share": round(selector.scorer_calls / max(1, len(pool)), 4),
        "scoring_seconds": round(counter["seconds"], 2),
        "quad": quad.model_dump(mode="json") if cfg.selection.method == "quad" else None,
        "inputs": ctx.inputs,  # per input file: rows kept, rejected, truncated
    }
    if scorer_dir is not None:
        summary["scorer"] = {"name": cfg.scorer.name, **_scorer_report(scorer_dir)}
    for note in result.notes:
        logger.warning("selection: %s", note)
    if pool_mix is not None and sel_mix is not None:
        noise = lambda mix: sum(mix.get(d, 0) for d in NOISE_DOMAINS) / max(1, sum(mix.values()))  # noqa: E731
        summary["domain_mix"] = {"pool": pool_mix, "selection": sel_mix,
                                 "note": "from the pool's `domain` field; the selector never reads it"}
        summary["noise_share"] = {"pool": round(noise(pool_mix), 4), "selection": round(noise(sel_mix), 4)}
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
    atomic_write_json(ctx.run_dir / "summary.json", summary)
    atomic_write_json(ctx.run_dir / "timings.json", ctx.timings)
    return summary


def _append_columns(table: pa.Table, cols: dict[str, list[Any]]) -> pa.Table:
    for name, values in cols.items():
        table = table.append_column(name, pa.array(values))
    return table


class _StopForTest(Exception):
    """Raised after a checkpoint when ``stop_after_round`` asks the run to stop early."""
