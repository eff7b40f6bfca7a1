"""Influence scores per (scorer, target, seed), computed lazily and cached per row.

One :class:`ScoreCache` serves every selector of a (scorer, target, seed): topk's full-pool
scan computes each row once and quad / cluster-topk read the same values, while every
selector's own ``scorer_calls`` are still what it asked for. The measured scoring cost
(seconds per scored token, the scorer seeing at most ``proxy.max_length`` tokens per text) lets
a report price each method's calls honestly, whichever method happened to compute them first.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from quadsel.core.atomic import atomic_path, atomic_write_json, read_json, stable_hash

from .config import QualityConfig
from .data import PoolData, SeedModel, job_config

logger = logging.getLogger("quadsel.bench.quality")


def fitted_row_scorer(cfg: QualityConfig, pool: PoolData, model: SeedModel, name: str, target: str,
                      stack: contextlib.ExitStack) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """The job's scorer step for ``scorer.name: <name>`` and ``target``'s reference on this pool
    and proxy (``jobs.selection_run.SelectionRun``: curvature on the job's seeded pool sample, the
    reference collapsed to one vector per layer, scores of pool rows checked and rounded as
    ``quadsel run`` does). Returns (score_rows, seconds to fit and load it)."""
    from quadsel.jobs.selection_run import SelectionRun

    t0 = time.monotonic()
    run = SelectionRun(job_config(cfg, pool.path, pool.excluded_domain, model.seed, target=target, scorer=name))
    run.pool()
    if run.keys["sources"] != pool.key:
        raise RuntimeError("the scorer's run reads another pool than the benchmark's")
    score_rows = stack.enter_context(run.row_scorer())
    return score_rows, time.monotonic() - t0


class ScoreCache:
    """Scores of pool rows under one fitted scorer; NaN = not computed yet. Saved atomically
    after every computation, so an interrupted benchmark resumes without rescoring."""

    def __init__(self, folder: Path, key: str, n_rows: int, truncated_len: np.ndarray,
                 build: Callable[[contextlib.ExitStack], tuple[Callable[[np.ndarray], np.ndarray], float]]) -> None:
        self.folder = folder
        self.key = key
        self.truncated_len = truncated_len
        self._build = build
        self._scorer: Callable[[np.ndarray], np.ndarray] | None = None
        self._stack = contextlib.ExitStack()  # the scorer's workers, shut down by close()
        self.values = np.full(n_rows, np.nan)
        self.stats = {"rows": 0, "tokens": 0, "seconds": 0.0, "fit_seconds": None}
        arr, meta = folder / f"{key}.npy", folder / f"{key}.json"
        if arr.is_file() and meta.is_file():
            vals = np.load(arr)
            if vals.shape == self.values.shape:
                self.values = vals
                self.stats.update(read_json(meta))

    @property
    def seconds_per_token(self) -> float | None:
        return self.stats["seconds"] / self.stats["tokens"] if self.stats["tokens"] else None

    def cost_of(self, rows: np.ndarray) -> float | None:
        """Estimated seconds to score ``rows`` (their truncated tokens x measured cost per token)."""
        spt = self.seconds_per_token
        return None if spt is None else float(self.truncated_len[np.asarray(rows, np.int64)].sum() * spt)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        missing = np.unique(rows[np.isnan(self.values[rows])])
        if missing.size:
            if self._scorer is None:
                self._scorer, fit_s = self._build(self._stack)
                self.stats["fit_seconds"] = round(fit_s, 3)
            t0 = time.monotonic()
            scores = self._scorer(missing)  # the job's score_rows: checked finite, float32 precision
            self.stats["seconds"] += time.monotonic() - t0
            self.stats["rows"] += int(missing.size)
            self.stats["tokens"] += int(self.truncated_len[missing].sum())
            self.values[missing] = scores
            self._save()
        return self.values[rows].copy()

    def close(self) -> None:
        """Shut the scorer's workers down (a later call that needs scores starts them again)."""
        self._stack.close()
        self._scorer = None

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{self.key}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.values, allow_pickle=False)
        atomic_write_json(self.folder / f"{self.key}.json", self.stats)


def score_cache(cfg: QualityConfig, pool: PoolData, model: SeedModel, scorer: str, target: str,
                reference: list[str], seed: int) -> ScoreCache:
    s = cfg.scorer
    # v2: scored by the job's own scorer step (its saved scorer, on its workers' chunks)
    key = stable_hash({"v": 2, "model": model.score_key, "scorer": scorer, "target": target,
                       "reference": stable_hash(reference), "fit_sample": s.fit_sample, "damping": s.damping,
                       "layers": s.layers, "max_length": cfg.proxy.max_length, "seed": seed,
                       **({"options": s.options[scorer]} if s.options.get(scorer) else {})})
    # what the scorer sees: its special tokens (BOS) plus the text, truncated to max_length
    truncated = np.minimum(model.lengths + 1, cfg.proxy.max_length)
    return ScoreCache(Path(cfg.cache_dir) / "scores", f"{scorer}-{target}-s{seed}-{key}", len(pool.store),
                      truncated,
                      build=lambda stack: fitted_row_scorer(cfg, pool, model, scorer, target, stack))
