"""Data types shared by every selector: the cluster view, budgets, probes, selections.

Nothing here knows about models or files. A selector sees the pool only as row ids grouped
into clusters (``ClusterView``) and learns about rows only through the scores a driver hands
back for the probes it proposed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Unit = Literal["examples", "tokens"]


@dataclass
class ClusterView:
    """The pool as the selectors see it.

    ``members[c]``: pool row ids of cluster ``c`` (int64). Every row id appears in exactly one
    cluster. ``neighbours[c]``: ``(j, d)`` pairs, other cluster ``j`` at cosine distance ``d``
    (the caller keeps pairs with ``d <= gamma``; pairs beyond ``gamma`` get no weight and are
    ignored). ``lengths[row]``: token count of a row; needed for token budgets.
    """

    members: list[np.ndarray]
    neighbours: list[list[tuple[int, float]]]
    lengths: np.ndarray | None = None

    @property
    def n_clusters(self) -> int:
        return len(self.members)

    @property
    def n_rows(self) -> int:
        return int(sum(len(m) for m in self.members))


def members_by_cluster(assignments: np.ndarray, k: int) -> list[np.ndarray]:
    """Row ids of each of ``k`` clusters (int64, ascending), from one cluster id per row."""
    assignments = np.asarray(assignments)
    order = np.argsort(assignments, kind="stable")
    bounds = np.searchsorted(assignments[order], np.arange(k + 1))
    return [order[bounds[c]:bounds[c + 1]].astype(np.int64) for c in range(k)]


@dataclass(frozen=True)
class Budget:
    """How much to select: a number of examples, or a number of tokens (never exceeded)."""

    unit: Unit
    amount: int

    def __post_init__(self) -> None:
        if self.unit not in ("examples", "tokens"):
            raise ValueError(f"budget.unit must be 'examples' or 'tokens', got {self.unit!r}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, (int, np.integer)):
            raise ValueError(f"budget.amount must be an integer, got {self.amount!r}")
        if self.amount < 0:
            raise ValueError(f"budget.amount must be >= 0, got {self.amount}")
        object.__setattr__(self, "amount", int(self.amount))

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "amount": self.amount}


@dataclass
class Probe:
    """One unit of scoring work: score these rows (all from ``cluster``; -1 = mixed)."""

    cluster: int
    rows: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Probe):
            return NotImplemented
        return self.cluster == other.cluster and np.array_equal(self.rows, other.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": int(self.cluster), "rows": [int(r) for r in self.rows]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Probe":
        return Probe(int(d["cluster"]), np.asarray(d["rows"], dtype=np.int64))


@dataclass
class Selection:
    """What a selector chose, in selection order.

    ``rows`` int64 row ids; ``cluster`` int32; ``score`` float64 (the raw score the scorer gave
    the row, NaN if it was never scored); ``round`` int32 (the round whose take added the row,
    -1 for rows added by a fill step); ``fill`` bool (True for rows added without evidence, see
    ``selection.bandit``). ``clusters`` holds per-cluster statistics, ``notes`` what a user
    should be told (budget not met, fill used, ...).
    """

    selector: str
    budget: Budget
    rows: np.ndarray
    cluster: np.ndarray
    score: np.ndarray
    round: np.ndarray
    fill: np.ndarray
    used: int
    budget_met: bool
    scorer_calls: int
    n_rounds: int
    clusters: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.rows))

    def summary(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "budget": self.budget.to_dict(),
            "selected": len(self),
            "used": self.used,
            "budget_met": self.budget_met,
            "scorer_calls": self.scorer_calls,
            "rounds": self.n_rounds,
            "filled": int(self.fill.sum()),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# helpers shared by the selectors


def derive_rng(seed: int, *keys: int) -> np.random.Generator:
    """A Generator(PCG64) that depends only on ``seed`` and ``keys``.

    Selectors never carry RNG state between rounds: each random decision draws from a generator
    derived from (seed, purpose, index), so a resumed selector makes exactly the same draws.
    """
    seq = np.random.SeedSequence([int(seed), *map(int, keys)])
    return np.random.Generator(np.random.PCG64(seq))


def validate_view(
    view: ClusterView, budget: Budget
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Check a view; return (members as int64, all member rows, their clusters), cluster order."""
    if not isinstance(view, ClusterView):
        raise TypeError(f"view must be a ClusterView, got {type(view).__name__}")
    if len(view.neighbours) != len(view.members):
        raise ValueError(
            f"view.neighbours has {len(view.neighbours)} entries but view.members has "
            f"{len(view.members)}: one neighbour list per cluster is required"
        )
    k = len(view.members)
    members: list[np.ndarray] = []
    for c, m in enumerate(view.members):
        m = np.asarray(m)
        if m.ndim != 1 or (m.size and not np.issubdtype(m.dtype, np.integer)):
            raise ValueError(f"view.members[{c}] must be a 1-d integer array of row ids")
        if m.size and m.min() < 0:
            raise ValueError(f"view.members[{c}] contains a negative row id ({int(m.min())})")
        members.append(m.astype(np.int64, copy=False))
    for c, nb in enumerate(view.neighbours):
        for item in nb:
            j, d = item
            if not (0 <= int(j) < k) or int(j) == c:
                raise ValueError(
                    f"view.neighbours[{c}] names cluster {j}: neighbours must be other clusters "
                    f"in 0..{k - 1}"
                )
            if not np.isfinite(float(d)):
                raise ValueError(f"view.neighbours[{c}] has a non-finite distance to cluster {j}")
    rows = np.concatenate(members) if k else np.zeros(0, np.int64)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    clusters = np.repeat(np.arange(k, dtype=np.int32), sizes)
    if rows.size and np.unique(rows).size != rows.size:
        vals, counts = np.unique(rows, return_counts=True)
        dup = vals[counts > 1][:5].tolist()
        raise ValueError(f"view.members lists some row ids in more than one place, e.g. {dup}")
    if budget.unit == "tokens":
        if view.lengths is None:
            raise ValueError("a token budget needs view.lengths (token count per pool row)")
        lengths = np.asarray(view.lengths)
        if rows.size and lengths.shape[0] <= rows.max():
            raise ValueError(
                f"view.lengths has {lengths.shape[0]} entries but row id {int(rows.max())} "
                "is in the pool"
            )
        if rows.size and (lengths[rows] < 0).any():
            raise ValueError("view.lengths has negative token counts")
    return members, rows, clusters


def view_fingerprint(view: ClusterView, budget: Budget) -> str:
    """A short hash of the view's structure, stored in state dicts to catch a mismatched resume."""
    h = hashlib.sha256()
    h.update(np.int64(len(view.members)).tobytes())
    for m in view.members:
        h.update(np.int64(len(m)).tobytes())
        h.update(np.ascontiguousarray(m, dtype=np.int64).tobytes())
    for nb in view.neighbours:
        for j, d in sorted(nb):
            h.update(np.int64(j).tobytes())
            h.update(np.float64(d).tobytes())
        h.update(b"|")
    if budget.unit == "tokens" and view.lengths is not None:
        h.update(np.ascontiguousarray(view.lengths, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def nan_to_none(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def none_to_nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)
