"""The selector interface and the bookkeeping every selector shares.

A selector is a small state machine driven in rounds::

    while not sel.finished:
        probes = sel.propose()            # this round's scoring work ([] when finished)
        scores = [score(p.rows) for p in probes]   # anywhere: in-process, a Ray actor pool, ...
        sel.observe(probes, scores)
        checkpoint(sel.state_dict())      # JSON; load_state_dict() resumes exactly

``propose()`` is a pure function of the state (calling it twice returns the same probes), and
no random number generator state is carried between rounds: every random choice is drawn from
a generator derived from (seed, purpose, index). A selector restored with ``load_state_dict``
therefore makes exactly the decisions the uninterrupted one would have made.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .types import (
    Budget,
    ClusterView,
    Probe,
    Selection,
    nan_to_none,
    none_to_nan,
    validate_view,
    view_fingerprint,
)

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class BudgetTracker:
    """Budget accounting: examples count 1 each, tokens count ``lengths[row]`` each."""

    def __init__(self, budget: Budget, lengths: np.ndarray | None) -> None:
        self.budget = budget
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.budget.amount - self.used

    def cost(self, row: int) -> int:
        if self.budget.unit == "examples" or self.lengths is None:  # validate_view: tokens need lengths
            return 1
        return int(self.lengths[row])

    def costs(self, rows: np.ndarray) -> np.ndarray:
        if self.budget.unit == "examples" or self.lengths is None:
            return np.ones(len(rows), dtype=np.int64)
        return self.lengths[np.asarray(rows, dtype=np.int64)]

    def fits(self, row: int) -> bool:
        return self.cost(row) <= self.remaining


class Selector(ABC):
    """Common state: the selection so far, rounds, scorer calls, history, notes."""

    name: str = "selector"

    def __init__(self, view: ClusterView, budget: Budget, *, seed: int) -> None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
        self.view = view
        self.budget = budget
        self.seed = int(seed)
        self.members, self.pool_rows, self.pool_clusters = validate_view(view, budget)
        self.sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        self.fingerprint = view_fingerprint(view, budget)
        self.tracker = BudgetTracker(budget, view.lengths)
        n_ids = int(self.pool_rows.max()) + 1 if self.pool_rows.size else 0
        self.row_cluster = np.full(n_ids, -1, dtype=np.int32)
        self.row_cluster[self.pool_rows] = self.pool_clusters
        self.selected_mask = np.zeros(n_ids, dtype=bool)
        # the selection so far (parallel lists)
        self._sel_rows: list[int] = []
        self._sel_score: list[float] = []
        self._sel_round: list[int] = []
        self._sel_fill: list[bool] = []
        self.round = 0
        self._finished = False
        self._scorer_calls = 0
        self._history: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self._pending: list[Probe] | None = None

    # ---- the interface ----------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def scorer_calls(self) -> int:
        """Rows scored so far (each row of each observed probe counts once)."""
        return self._scorer_calls

    def propose(self) -> list[Probe]:
        """This round's probes; [] once finished. Idempotent until ``observe`` is called."""
        if self._finished:
            return []
        if self._pending is None:
            self._pending = self._make_probes()
        return [Probe(p.cluster, p.rows.copy()) for p in self._pending]

    def observe(self, probes: list[Probe], scores: list[np.ndarray]) -> None:
        """Feed back the scores of exactly the probes ``propose`` returned, in the same order."""
        if self._finished:
            raise RuntimeError(f"{self.name}: observe() called on a finished selector")
        expected = self.propose()
        if len(probes) != len(expected) or any(a != b for a, b in zip(probes, expected)):
            raise ValueError(
                f"{self.name}: observe() got probes that differ from the ones propose() returned "
                f"for round {self.round}; pass back exactly the proposed probes, in order"
            )
        if len(scores) != len(probes):
            raise ValueError(f"{self.name}: {len(probes)} probes but {len(scores)} score arrays")
        clean: list[np.ndarray] = []
        for p, s in zip(probes, scores):
            s = np.asarray(s, dtype=np.float64).reshape(-1)
            if s.shape[0] != len(p.rows):
                raise ValueError(
                    f"{self.name}: probe of cluster {p.cluster} has {len(p.rows)} rows but "
                    f"{s.shape[0]} scores"
                )
            bad = ~np.isfinite(s)
            if bad.any():
                raise ValueError(
                    f"{self.name}: the scorer returned {int(bad.sum())} non-finite scores, e.g. "
                    f"for row ids {p.rows[bad][:5].tolist()}"
                )
            clean.append(s)
        self._scorer_calls += int(sum(len(p.rows) for p in probes))
        self._pending = None
        self._observe(probes, clean)
        self.round += 1

    def result(self) -> Selection:
        rows = np.asarray(self._sel_rows, dtype=np.int64)
        met = self._budget_met()
        return Selection(
            selector=self.name,
            budget=self.budget,
            rows=rows,
            cluster=self.row_cluster[rows].astype(np.int32) if rows.size else np.zeros(0, np.int32),
            score=np.asarray(self._sel_score, dtype=np.float64),
            round=np.asarray(self._sel_round, dtype=np.int32),
            fill=np.asarray(self._sel_fill, dtype=bool),
            used=self.tracker.used,
            budget_met=met,
            scorer_calls=self._scorer_calls,
            n_rounds=self.round,
            clusters=self.cluster_stats(),
            notes=list(self.notes),
        )

    def probe_log(self) -> dict[str, np.ndarray]:
        """Every scored row so far, in scoring order: row (int64), cluster (int32), score
        (float64), round (int32). For reports (e.g. a probes table next to the selection)."""
        rows = np.zeros(0, dtype=np.int64)
        return self._probe_table(rows, np.zeros(0), np.zeros(0, dtype=np.int32))

    def _probe_table(self, rows: np.ndarray, scores: np.ndarray, rounds: np.ndarray):
        rows = np.asarray(rows, dtype=np.int64)
        return {
            "row": rows,
            "cluster": self.row_cluster[rows].astype(np.int32),
            "score": np.asarray(scores, dtype=np.float64),
            "round": np.asarray(rounds, dtype=np.int32),
        }

    def history(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self._history]

    def cluster_stats(self) -> list[dict[str, Any]]:
        sel_per_cluster = np.bincount(
            self.row_cluster[np.asarray(self._sel_rows, dtype=np.int64)],
            minlength=len(self.sizes),
        ) if self._sel_rows else np.zeros(len(self.sizes), dtype=np.int64)
        return [
            {"cluster": c, "size": int(self.sizes[c]), "selected": int(sel_per_cluster[c])}
            for c in range(len(self.sizes))
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "selector": self.name,
            "seed": self.seed,
            "budget": self.budget.to_dict(),
            "view": self.fingerprint,
            "config": self._config_dict(),
            "round": self.round,
            "finished": self._finished,
            "scorer_calls": self._scorer_calls,
            "used": self.tracker.used,
            "selected": {
                "rows": list(self._sel_rows),
                "score": [nan_to_none(s) for s in self._sel_score],
                "round": list(self._sel_round),
                "fill": list(self._sel_fill),
            },
            "history": self.history(),
            "notes": list(self.notes),
            "pending": None if self._pending is None else [p.to_dict() for p in self._pending],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported selector state format {d.get('format')!r}")
        checks = {
            "selector": self.name,
            "seed": self.seed,
            "budget": self.budget.to_dict(),
            "view": self.fingerprint,
            "config": self._config_dict(),
        }
        for key, mine in checks.items():
            if d.get(key) != mine:
                raise ValueError(
                    f"cannot resume: the checkpoint's {key} ({d.get(key)!r}) differs from this "
                    f"selector's ({mine!r})"
                )
        sel = d["selected"]
        self._sel_rows = [int(r) for r in sel["rows"]]
        self._sel_score = [none_to_nan(s) for s in sel["score"]]
        self._sel_round = [int(r) for r in sel["round"]]
        self._sel_fill = [bool(f) for f in sel["fill"]]
        self.selected_mask[:] = False
        if self._sel_rows:
            self.selected_mask[np.asarray(self._sel_rows, dtype=np.int64)] = True
        self.tracker.used = int(d["used"])
        self.round = int(d["round"])
        self._finished = bool(d["finished"])
        self._scorer_calls = int(d["scorer_calls"])
        self._history = [dict(h) for h in d["history"]]
        self.notes = list(d["notes"])
        self._pending = None if d["pending"] is None else [Probe.from_dict(p) for p in d["pending"]]
        self._load_extra_state(d["extra"])

    # ---- for subclasses ---------------------------------------------------------------------

    @abstractmethod
    def _make_probes(self) -> list[Probe]:
        """Compute this round's probes from the state (never empty while not finished)."""

    @abstractmethod
    def _observe(self, probes: list[Probe], scores: list[np.ndarray]) -> None:
        """Update the state with this round's (validated) scores."""

    def _config_dict(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, d: dict[str, Any]) -> None:
        pass

    def _select(self, row: int, score: float, rnd: int, fill: bool = False) -> None:
        self._select_many(np.asarray([row], dtype=np.int64), np.asarray([score]), rnd, fill)

    def _select_many(
        self, rows: np.ndarray, scores: np.ndarray, rnd: int, fill: bool = False
    ) -> None:
        n = int(len(rows))
        if n == 0:
            return
        self._sel_rows.extend(int(r) for r in rows)
        self._sel_score.extend(float(x) for x in scores)
        self._sel_round.extend([int(rnd)] * n)
        self._sel_fill.extend([bool(fill)] * n)
        self.selected_mask[rows] = True
        self.tracker.used += int(self.tracker.costs(rows).sum())

    def _take_rows(
        self, rows: np.ndarray, scores: np.ndarray, rnd: int, fill: bool = False
    ) -> int:
        """Select ``rows`` in order while they fit, skipping rows that do not; return the count.

        Examples: the first ``remaining`` rows. Tokens: rows are taken in order while they fit;
        a row that does not fit is skipped (it never fits later: the remainder only shrinks).
        """
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        rem = self.tracker.remaining
        if rem <= 0 or rows.size == 0:
            return 0
        costs = self.tracker.costs(rows)
        cum = np.cumsum(costs)
        k = int(np.searchsorted(cum, rem, side="right"))  # longest prefix that fits
        keep = np.zeros(rows.size, dtype=bool)
        keep[:k] = True
        if k < rows.size and self.budget.unit == "tokens":
            left = rem - (int(cum[k - 1]) if k else 0)
            suffix_min = np.minimum.accumulate(costs[::-1])[::-1]
            for i in range(k, rows.size):
                if left <= 0 or suffix_min[i] > left:
                    break
                if costs[i] <= left:
                    keep[i] = True
                    left -= int(costs[i])
        self._select_many(rows[keep], scores[keep], rnd, fill)
        return int(keep.sum())

    def _free_rows(self) -> np.ndarray:
        return self.pool_rows[~self.selected_mask[self.pool_rows]]

    def _nothing_fits(self) -> bool:
        """True when no unselected pool row fits into what is left of the budget."""
        remaining = self.tracker.remaining
        if remaining <= 0:
            return True
        free = self._free_rows()
        if free.size == 0:
            return True
        return bool(self.tracker.costs(free).min() > remaining)

    def _budget_met(self) -> bool:
        """Exactly met, or (tokens) as full as it can get: rows are left but none fits."""
        if self.tracker.remaining == 0:
            return True
        free = self._free_rows()
        return bool(free.size and self.tracker.costs(free).min() > self.tracker.remaining)

    def _finish(self) -> None:
        self._finished = True
        self._pending = None
        b = self.budget
        if not self._budget_met():
            why = (
                "the pool has no rows left"
                if self._free_rows().size == 0
                else "the selector stopped before the budget was met"
            )
            msg = (
                f"{self.name}: selected {len(self._sel_rows)} rows using {self.tracker.used} of "
                f"{b.amount} {b.unit}: {why}"
            )
            self.notes.append(msg)
            logger.warning(msg)
