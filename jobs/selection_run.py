"""The selection job as composable steps: :class:`SelectionRun`.

``quadsel run`` (:mod:`quadsel.jobs.run_job`) is these steps plus the per-round checkpoints and
the output; the quality benchmark (``bench/quality``) drives the same steps and hands
:meth:`SelectionRun.select` its own score function.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from quadsel.core import faults
from quadsel.core.atomic import stable_hash
from quadsel.pipeline.cluster import ClusterResult
from quadsel.pipeline.store import PoolStore

from .config import BudgetConfig, JobConfig, SelectionConfig
from .models import fit_scorer, load_scorer_factory, prepare_model, token_lengths
from .stages import (
    MODEL_EMBEDDERS,
    JobError,
    RunContext,
    cluster_pool,
    embed_pool,
    model_runtime_key,
    read_sources,
    write_assignments,
)

logger = logging.getLogger(__name__)


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


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices of ``texts`` by decreasing length in characters (stable: ties keep their order)."""
    return np.argsort(-np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")


def _score_rows_fn(pool: PoolStore, workers, counter: dict[str, float]):
    def score_rows(rows: np.ndarray) -> np.ndarray:
        t0 = time.monotonic()
        texts = pool.texts(rows)
        # The executor cuts the texts into chunks of model.batch_size in the order given, and a
        # chunk is one batch padded to its longest row. A round's rows (the probes of many
        # clusters, of any length) in their own order would pad most batches to max_length:
        # longest first, each chunk holds rows of similar length. A row's score does not depend
        # on the rows batched with it, and the order is a function of the texts (deterministic).
        order = length_order(texts)
        scores = np.empty(len(texts), dtype=np.float64)
        scores[order] = workers.score([texts[i] for i in order])
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
