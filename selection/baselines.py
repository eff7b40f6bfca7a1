"""Baseline selectors behind the same interface as the bandit.

- ``random``: no scorer calls; the pool (sorted row ids) in a seeded random order, taken to the
  budget.
- ``topk``: scores the whole pool (in ascending row id, ``chunk_size`` rows per probe,
  ``chunks_per_round`` probes per round, so a driver can checkpoint and show progress), then
  takes the highest scores (ties: lower row id) to the budget.
- ``cluster-topk``: scores the whole pool likewise, then gives every cluster an equal share of
  the budget and takes its top-scored rows. A cluster smaller than its share is taken whole and
  the rest of its share is redistributed equally over the others (repeated until every remaining
  cluster can use its share). What the integer shares leave over (fewer rows than clusters) goes
  round by round to the clusters whose next-best row scores highest, at most one row per cluster
  per round.

Budgets follow the bandit's rule: examples stop exactly at the budget; tokens take rows in
order while they fit and skip rows that do not, never exceeding the budget.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Selector, logger
from .config import BaselineConfig
from .types import Budget, ClusterView, Probe, derive_rng

_RANDOM_TAG = 0x7A11


class RandomSelector(Selector):
    """Seeded uniform sample of the pool to the budget; scores nothing."""

    name = "random"

    def __init__(
        self, view: ClusterView, budget: Budget, *, seed: int, config: BaselineConfig | None = None
    ) -> None:
        super().__init__(view, budget, seed=seed)
        self.config = config or BaselineConfig()
        order = derive_rng(self.seed, _RANDOM_TAG).permutation(np.sort(self.pool_rows))
        self._take_rows(order, np.full(order.size, np.nan), 0)
        self._finish()

    def _make_probes(self) -> list[Probe]:  # pragma: no cover - finished at construction
        return []

    def _observe(self, probes: list[Probe], scores: list[np.ndarray]) -> None:  # pragma: no cover
        pass

    def _config_dict(self) -> dict[str, Any]:
        return self.config.model_dump()


class _FullScan(Selector):
    """Score every pool row in chunks, then pick (``_pick``) once everything is scored."""

    def __init__(
        self, view: ClusterView, budget: Budget, *, seed: int, config: BaselineConfig | None = None
    ) -> None:
        super().__init__(view, budget, seed=seed)
        if config is None:
            config = BaselineConfig()
        if not isinstance(config, BaselineConfig):
            raise TypeError(f"{self.name} needs a BaselineConfig, got {type(config).__name__}")
        self.config = config
        self.order = np.sort(self.pool_rows)
        self.scores = np.full(self.order.size, np.nan)
        self.cursor = 0
        if self.budget.amount == 0 or self.order.size == 0:
            self._finish()

    def _make_probes(self) -> list[Probe]:
        cs = self.config.chunk_size
        end = min(self.order.size, self.cursor + cs * self.config.chunks_per_round)
        return [
            Probe(-1, self.order[i : min(i + cs, end)].copy()) for i in range(self.cursor, end, cs)
        ]

    def _observe(self, probes: list[Probe], scores: list[np.ndarray]) -> None:
        n = 0
        for s in scores:
            self.scores[self.cursor + n : self.cursor + n + len(s)] = s
            n += len(s)
        self.cursor += n
        self._history.append(
            {
                "phase": "score",
                "round": self.round,
                "scored": n,
                "scored_total": self.cursor,
                "of": int(self.order.size),
                "scorer_calls": self._scorer_calls,
            }
        )
        if self.cursor >= self.order.size:
            self._pick(self.round)
            self._finish()

    def _pick(self, rnd: int) -> None:
        raise NotImplementedError

    def probe_log(self) -> dict[str, np.ndarray]:
        per_round = self.config.chunk_size * self.config.chunks_per_round
        rounds = np.arange(self.cursor) // per_round
        return self._probe_table(self.order[: self.cursor], self.scores[: self.cursor], rounds)

    def score_of(self) -> dict[int, float]:
        return dict(zip(self.order.tolist(), self.scores.tolist()))

    def _config_dict(self) -> dict[str, Any]:
        return self.config.model_dump()

    def _extra_state(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "scores": self.scores[: self.cursor].tolist()}

    def _load_extra_state(self, d: dict[str, Any]) -> None:
        self.cursor = int(d["cursor"])
        self.scores[:] = np.nan
        self.scores[: self.cursor] = np.asarray(d["scores"], dtype=np.float64)


class TopKSelector(_FullScan):
    """Highest scores over the whole pool, to the budget."""

    name = "topk"

    def _pick(self, rnd: int) -> None:
        idx = np.lexsort((self.order, -self.scores))
        self._take_rows(self.order[idx], self.scores[idx], rnd)


class ClusterTopKSelector(_FullScan):
    """An equal share of the budget per cluster, top-scored rows within each cluster."""

    name = "cluster-topk"

    def _pick(self, rnd: int) -> None:
        score = self.score_of()
        tr = self.tracker
        k = len(self.sizes)
        ranked: list[list[int]] = []
        for m in self.members:
            s = np.array([score[int(r)] for r in m], dtype=np.float64)
            ranked.append([int(m[i]) for i in np.lexsort((m, -s))])
        cost = np.array([int(tr.costs(np.asarray(r, dtype=np.int64)).sum()) for r in ranked])
        active = [c for c in range(k) if ranked[c]]
        budget_left = tr.remaining
        whole: list[int] = []
        while active:
            share = budget_left // len(active)
            small = [c for c in active if cost[c] <= share]
            if not small:
                break
            for c in small:
                whole.append(c)
                budget_left -= int(cost[c])
            active = [c for c in active if c not in set(small)]
        share = budget_left // len(active) if active else 0
        self.shares = {c: int(cost[c]) for c in whole}
        self.shares.update({c: int(share) for c in active})
        rest: dict[int, list[int]] = {}
        for c in sorted(whole):
            for row in ranked[c]:
                self._select(row, score[row], rnd)
        for c in active:
            cap = share
            left = []
            for row in ranked[c]:
                cst = tr.cost(row)
                if cst <= cap and tr.fits(row):
                    self._select(row, score[row], rnd)
                    cap -= cst
                else:
                    left.append(row)
            rest[c] = left
        # what integer shares (and token fragmentation) left over: best next row per cluster
        pos = {c: 0 for c in rest}
        extra = 0
        while tr.remaining > 0:
            cands = []
            for c, rows in rest.items():
                i = pos[c]
                while i < len(rows) and not tr.fits(rows[i]):
                    i += 1  # never fits later either: the remainder only shrinks
                pos[c] = i
                if i < len(rows):
                    cands.append((-score[rows[i]], c, rows[i]))
            if not cands:
                break
            for _, c, row in sorted(cands):
                if tr.fits(row):
                    self._select(row, score[row], rnd)
                    extra += 1
                pos[c] += 1
        if whole:
            msg = (
                f"cluster-topk: {len(whole)} of {k} clusters were smaller than their equal share "
                f"and were taken whole; their unused share went to the other clusters"
            )
            self.notes.append(msg)
            logger.info(msg)

    def _extra_state(self) -> dict[str, Any]:
        d = super()._extra_state()
        d["shares"] = sorted([c, s] for c, s in getattr(self, "shares", {}).items())
        return d

    def _load_extra_state(self, d: dict[str, Any]) -> None:
        super()._load_extra_state(d)
        self.shares = {int(c): int(s) for c, s in d.get("shares", [])}

    def cluster_stats(self) -> list[dict[str, Any]]:
        base = super().cluster_stats()
        shares = getattr(self, "shares", {})
        for d in base:
            d["share"] = shares.get(d["cluster"])
        return base
