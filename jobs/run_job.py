"""``quadsel run``: pool -> embed -> cluster -> fit scorer -> bandit -> Arrow shards.

Every stage is cached in ``stages/`` (a rerun with the same config reuses embeddings, clusters,
the proxy model and curvature factors). The selector's state is saved atomically to
``bandit/state.json`` after every round; a killed run resumes from there and ends with output
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from quadsel.core import faults
from quadsel.core.atomic import atomic_path, atomic_write_json, read_json, stable_hash
from quadsel.core.progress import Progress, run_log
from quadsel.pipeline.cluster import ClusterResult
from quadsel.pipeline.lock import RunLock
from quadsel.pipeline.shards import ShardWriter, recover, selection_schema, verify, write_order
from quadsel.pipeline.store import PoolStore, expand_meta

from .config import BudgetConfig, JobConfig, SelectionConfig
from .layout import RunLayout
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


def _check_budget(b: BudgetConfig, n_rows: int, lengths: np.ndarray | None) -> None:
    """A budget larger than the pool is an error (not "select everything"): it usually means the
    rejects ate most of the pool or the amount has a typo, and saying so costs nothing, while
    training a proxy and scoring to select the whole pool would waste the run."""
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


def _selector_parts(selection: SelectionConfig, assignments: np.ndarray, centroids: np.ndarray,
                    lengths: np.ndarray | None, n_rows: int):
    """The selectors' view of the pool (members per cluster, neighbour graph), budget, constants."""
    from quadsel.pipeline.cluster import neighbour_graph
    from quadsel.selection import Budget, ClusterView, QuadConfig, members_by_cluster

    b = selection.budget
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
                                 **selection.quad)
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


class SelectionRun:
    """One selection job as composable steps: :meth:`pool`, :meth:`model_dir`, :meth:`clusters`,
    :meth:`token_lengths`, :meth:`selector_parts`, :meth:`scorer_dir` / :meth:`row_scorer`,
    :meth:`selector` and :meth:`select`.

    Each step runs (or reuses) its cached stage in ``cfg.run_dir`` once per run object and the
    steps it needs before it, in the order ``quadsel run`` takes them (a later step calls the
    earlier ones). :func:`run_selection` is these steps plus the resumable checkpoints and the
    output; the quality benchmark drives the same steps and hands :meth:`select` its own score
    function (a per-row score cache) and selection settings (method, budget, seed).
    """

    def __init__(self, cfg: JobConfig, *, preflight: bool = True) -> None:
        if preflight:  # False: the caller ran the up-front checks already
            from .preflight import config_problems, raise_if

            raise_if(config_problems(cfg, "run"))
        self.cfg = cfg
        self.ctx = RunContext.create(cfg, keep_committed=True, command="run", preflight=False)
        self.scoring = {"scored": 0, "seconds": 0.0}  # rows scored by row_scorer() and the time it took
        self._done: dict[str, Any] = {}
        self._parts: dict[str, Any] = {}
        self.model_key: str | None = None  # the model's own key (before model_runtime_key)

    def _step(self, name: str, build):
        if name not in self._done:
            self._done[name] = build()
        return self._done[name]

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    @property
    def keys(self) -> dict[str, str]:
        """Cache keys of the steps run so far (``sources``, ``model``, ``embed``, ``scorer`` …)."""
        return self.ctx.keys

    @property
    def uses_model(self) -> bool:
        cfg = self.cfg
        return (cfg.selection.method != "random" or cfg.selection.budget.unit == "tokens"
                or (cfg.embed.kind in MODEL_EMBEDDERS and cfg.embed.model is None))

    def pool(self) -> PoolStore:
        """The validated pool (the ``sources`` stage); the reference is read with it."""
        return self._step("sources", lambda: read_sources(self.ctx))[0]

    def reference(self) -> PoolStore | None:
        self.pool()
        return self._done["sources"][1]

    def model_dir(self) -> str | None:
        """``model.path``, or the proxy trained on a pool sample (None when nothing needs a model)."""
        def build() -> str | None:
            if not self.uses_model:
                return None
            model_dir = prepare_model(self.ctx, self.pool())
            self.model_key = self.ctx.keys["model"]  # the model itself (e.g. the proxy's stage key)
            # how the model runs is part of what it scores: every later key has it
            self.ctx.keys["model"] = model_runtime_key(self.cfg, self.model_key)
            return model_dir
        return self._step("model", build)

    def clusters(self) -> ClusterResult:
        """Embed and cluster the pool (``clusters/assignments.parquet`` written). Only a model-based
        embedder without a model of its own waits for the model: otherwise the pool is embedded
        first, so a pool the embedder cannot embed fails before any model is trained."""
        def build() -> ClusterResult:
            e = self.cfg.embed
            pool = self.pool()
            model_dir = self.model_dir() if e.kind in MODEL_EMBEDDERS and e.model is None else None
            clusters = cluster_pool(self.ctx, embed_pool(self.ctx, pool, model_dir))
            write_assignments(self.ctx, pool, clusters)
            return clusters
        return self._step("clusters", build)

    def token_lengths(self) -> np.ndarray | None:
        """Tokens per pool row under the scoring model's tokenizer (token budgets only; else None)."""
        def build() -> np.ndarray | None:
            self.clusters()
            if self.cfg.selection.budget.unit != "tokens":
                return None
            return token_lengths(self.ctx, self.pool(), self.model_dir())
        return self._step("tokens", build)

    def selector_parts(self, selection: SelectionConfig | None = None):
        """(ClusterView, Budget, QuadConfig) of ``selection`` (default: the job's), the budget
        checked against the pool."""
        selection = selection or self.cfg.selection
        key = stable_hash(selection.model_dump(mode="json"))
        if key not in self._parts:
            pool, clusters, lengths = self.pool(), self.clusters(), self.token_lengths()
            if selection.budget.unit == "tokens" and lengths is None:
                raise JobError("a token budget needs the job's selection.budget.unit to be tokens "
                               "(the token counts are a step of the job)")
            _check_budget(selection.budget, len(pool), lengths)
            self._parts[key] = _selector_parts(selection, clusters.assignments, clusters.centroids,
                                               lengths if selection.budget.unit == "tokens" else None, len(pool))
        return self._parts[key]

    def scorer_dir(self) -> Path | None:
        """The fitted scorer (curvature and the reference side; None for ``random``)."""
        def build() -> Path | None:
            self.selector_parts()
            if self.cfg.selection.method == "random":
                return None
            return fit_scorer(self.ctx, self.pool(), self.reference(), self.model_dir())
        return self._step("scorer", build)

    @contextlib.contextmanager
    def row_scorer(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """``score_rows(rows) -> float64`` on the job's workers (Ray actors or in-process):
        checked finite, rounded to float32 precision, counted in :attr:`scoring`."""
        scorer_dir = self.scorer_dir()
        if scorer_dir is None:
            def no_scores(rows: np.ndarray) -> np.ndarray:  # random never scores
                raise JobError("the random selector asked for scores")
            yield no_scores
            return
        workers = _make_workers(self.cfg, load_scorer_factory(self.cfg, scorer_dir))
        try:
            yield _score_rows_fn(self.pool(), workers, self.scoring)
        finally:
            workers.shutdown()

    def selector(self, *, selection: SelectionConfig | None = None, seed: int | None = None):
        """A fresh selector of ``selection`` (default: the job's) seeded with ``seed`` (default: the job's)."""
        from quadsel.selection import make_selector

        selection = selection or self.cfg.selection
        view, budget, quad = self.selector_parts(selection)
        return make_selector(selection.method, view, budget, seed=self.cfg.seed if seed is None else seed,
                             config=quad if selection.method == "quad" else None)

    def select(self, score_fn: Callable[[np.ndarray], np.ndarray] | None = None, *, selector=None,
               on_round=None, selection: SelectionConfig | None = None, seed: int | None = None):
        """Drive ``selector`` (default: a fresh :meth:`selector`) to its end; scores come from
        ``score_fn`` (rows -> scores) or, without one, from :meth:`row_scorer`. Returns
        ``(selector, selection result)``."""
        from quadsel.selection import run_selector

        sel = selector if selector is not None else self.selector(selection=selection, seed=seed)
        if score_fn is not None:
            return sel, run_selector(sel, score_fn, on_round=on_round)
        with self.row_scorer() as score_rows:
            return sel, run_selector(sel, score_rows, on_round=on_round)


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
            done = ctx.layout.summary
            if (done.is_file() and read_json(done).get("run_key") == run_key
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
    pool_mix, sel_mix = _domain_mix(pool, None), _domain_mix(pool, rows)
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
    atomic_write_json(ctx.layout.summary, summary)
    atomic_write_json(ctx.layout.timings, ctx.timings)
    return summary


def _append_columns(table: pa.Table, cols: dict[str, list[Any]]) -> pa.Table:
    for name, values in cols.items():
        table = table.append_column(name, pa.array(values))
    return table


class _StopForTest(Exception):
    """Raised after a checkpoint when ``stop_after_round`` asks the run to stop early."""
