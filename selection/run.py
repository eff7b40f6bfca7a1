"""Building selectors by name and driving them round by round."""
from __future__ import annotations

import logging
import time
from typing import Callable, Literal

import numpy as np

from .bandit import QuadSelector
from .base import Selector
from .baselines import ClusterTopKSelector, RandomSelector, TopKSelector
from .config import BaselineConfig, QuadConfig
from .types import Budget, ClusterView, Selection

logger = logging.getLogger(__name__)

SELECTORS: dict[str, type[Selector]] = {
    "quad": QuadSelector,
    "random": RandomSelector,
    "topk": TopKSelector,
    "cluster-topk": ClusterTopKSelector,
}
SelectorName = Literal["quad", "random", "topk", "cluster-topk"]


def make_selector(
    name: SelectorName,
    view: ClusterView,
    budget: Budget,
    *,
    seed: int,
    config: QuadConfig | BaselineConfig | None = None,
) -> Selector:
    """A selector by name. ``config=None``: quad gets ``QuadConfig.scaled`` to the pool, the
    baselines ``BaselineConfig()``."""
    cls = SELECTORS.get(name)
    if cls is None:
        raise ValueError(f"unknown selector {name!r}; choose one of {sorted(SELECTORS)}")
    want = QuadConfig if name == "quad" else BaselineConfig
    if config is not None and not isinstance(config, want):
        raise TypeError(f"selector {name!r} takes a {want.__name__}, got {type(config).__name__}")
    return cls(view, budget, seed=seed, config=config)  # type: ignore[call-arg]  # every subclass takes it


def run_selector(
    sel: Selector,
    score_rows: Callable[[np.ndarray], np.ndarray],
    *,
    on_round: Callable[[Selector], None] | None = None,
) -> Selection:
    """Drive ``sel`` to the end. Per round: all probes' rows concatenated into ONE
    ``score_rows`` call, split back per probe, ``observe``, then ``on_round(sel)`` (the place to
    checkpoint ``sel.state_dict()`` and report progress). Works on a fresh or a resumed selector.
    """
    while not sel.finished:
        probes = sel.propose()
        rows = np.concatenate([p.rows for p in probes]) if probes else np.zeros(0, np.int64)
        t0 = time.perf_counter()
        scores = np.asarray(score_rows(rows), dtype=np.float64).reshape(-1)
        if scores.shape[0] != rows.shape[0]:
            raise ValueError(
                f"score_rows returned {scores.shape[0]} scores for {rows.shape[0]} rows"
            )
        bounds = np.cumsum([len(p.rows) for p in probes])[:-1]
        sel.observe(probes, np.split(scores, bounds))
        logger.debug(
            "%s round %d: scored %d rows in %.2fs (total %d)",
            sel.name, sel.round - 1, rows.size, time.perf_counter() - t0, sel.scorer_calls,
        )
        if on_round is not None:
            on_round(sel)
    return sel.result()
