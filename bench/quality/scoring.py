"""Influence scores per (scorer, target, seed), computed lazily and cached per row.

One :class:`ScoreCache` serves every selector of a (scorer, target, seed): topk's full-pool
scan computes each row once and quad / cluster-topk read the same values, while every
selector's own ``scorer_calls`` are still what it asked for. The measured scoring cost
(seconds per scored token, the scorer seeing at most ``proxy.max_length`` tokens per text) lets
a report price each method's calls honestly, whichever method happened to compute them first.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from quadsel.core.atomic import atomic_path, atomic_write_json, read_json, stable_hash
from quadsel.pipeline.embed import sample_rows

from .config import QualityConfig
from .data import PoolData, SeedModel, proxy_checkpoints

logger = logging.getLogger("quadsel.bench.quality")


def make_fitted_scorer(cfg: QualityConfig, pool: PoolData, model: SeedModel, name: str,
                       reference: list[str], seed: int):
    """The scorer as ``jobs.models.fit_scorer`` builds it: curvature on a seeded pool sample,
    the reference set collapsed to one vector per layer. Returns (scorer, seconds)."""
    from quadsel.influence import InfluenceModel, make_scorer
    from quadsel.influence.base import scorer_class
    from quadsel.jobs.config import ScorerConfig
    from quadsel.jobs.models import scorer_kwargs

    t0 = time.monotonic()
    im = InfluenceModel.load(str(model.model_dir), max_length=cfg.proxy.max_length, device=cfg.device,
                             batch_size=cfg.proxy.score_batch)
    s = cfg.scorer
    options = dict(s.options.get(name, {}))
    if scorer_class(name).needs_checkpoints and "checkpoints" not in options:
        options["checkpoints"] = proxy_checkpoints(cfg, pool, model)
    # the options `quadsel run` would pass for `scorer.name: <name>` with these settings
    job_scorer = ScorerConfig.model_validate({"name": name, "layers": s.layers, "damping": s.damping,
                                              "damping_mode": "relative", "options": options})
    # settings shared by every scorer (none set for this one in particular): each takes what it has
    sc = make_scorer(name, im, **scorer_kwargs(job_scorer, seed, explicit=set()))
    if sc.needs_fit:
        sc.fit(pool.store.texts(sample_rows(len(pool.store), s.fit_sample, seed + 2)))
    sc.set_reference(reference)
    return sc, time.monotonic() - t0


class ScoreCache:
    """Scores of pool rows under one fitted scorer; NaN = not computed yet. Saved atomically
    after every computation, so an interrupted benchmark resumes without rescoring."""

    def __init__(self, folder: Path, key: str, n_rows: int, truncated_len: np.ndarray,
                 build: Callable[[], tuple[object, float]], texts: Callable[[np.ndarray], list[str]]) -> None:
        self.folder = folder
        self.key = key
        self.truncated_len = truncated_len
        self._build = build
        self._texts = texts
        self._scorer = None
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
                self._scorer, fit_s = self._build()
                self.stats["fit_seconds"] = round(fit_s, 3)
            t0 = time.monotonic()
            scores = np.asarray(self._scorer.score(self._texts(missing)), dtype=np.float64)
            self.stats["seconds"] += time.monotonic() - t0
            self.stats["rows"] += int(missing.size)
            self.stats["tokens"] += int(self.truncated_len[missing].sum())
            # float32 precision, as quadsel run does: a score must not depend on batch composition
            self.values[missing] = scores.astype(np.float32).astype(np.float64)
            self._save()
        return self.values[rows].copy()

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{self.key}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.values, allow_pickle=False)
        atomic_write_json(self.folder / f"{self.key}.json", self.stats)


def score_cache(cfg: QualityConfig, pool: PoolData, model: SeedModel, scorer: str, target: str,
                reference: list[str], seed: int) -> ScoreCache:
    s = cfg.scorer
    key = stable_hash({"v": 1, "model": model.key, "scorer": scorer, "target": target,
                       "reference": stable_hash(reference), "fit_sample": s.fit_sample, "damping": s.damping,
                       "layers": s.layers, "max_length": cfg.proxy.max_length, "seed": seed,
                       **({"options": s.options[scorer]} if s.options.get(scorer) else {})})
    # what the scorer sees: its special tokens (BOS) plus the text, truncated to max_length
    truncated = np.minimum(model.lengths + 1, cfg.proxy.max_length)
    return ScoreCache(Path(cfg.cache_dir) / "scores", f"{scorer}-{target}-s{seed}-{key}", len(pool.store),
                      truncated,
                      build=lambda: make_fitted_scorer(cfg, pool, model, scorer, reference, seed),
                      texts=pool.store.texts)
