"""Reading a run directory for ``quadsel inspect`` / ``quadsel report``.

Everything here only reads the run (files other stages wrote), except the top-terms cache
``clusters/top_terms.json`` (:func:`quadsel.pipeline.cluster.cluster_top_terms`), which is
written atomically the first time it is needed.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from quadsel.core.atomic import atomic_write_json, read_json, sha256_file, stable_hash
from quadsel.core.errors import InspectError
from quadsel.pipeline.cluster import TERM_MAX_CHARS, TERM_MAX_DOCS, TERM_SAMPLE, cluster_top_terms
from quadsel.pipeline.stage import DONE
from quadsel.pipeline.store import PoolStore

from .layout import RunLayout

logger = logging.getLogger(__name__)



def top_terms(run_dir: str | Path, k: int, *, n_terms: int = 8, seed: int = 0) -> list[list[str]] | None:
    """The cached top terms of a run's clusters (computed and cached on first use).

    None when the run no longer has its pool store (``stages/sources/store``).
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    assign_path = layout.assignments
    store_dir = layout.pool_store
    cache = layout.top_terms
    if not assign_path.is_file():
        return None
    key = stable_hash({"v": 1, "assignments": sha256_file(assign_path), "k": k, "n_terms": n_terms,
                       "seed": seed, "sample": TERM_SAMPLE, "docs": TERM_MAX_DOCS,
                       "chars": TERM_MAX_CHARS})
    if cache.is_file():
        try:
            saved = read_json(cache)
            if saved.get("key") == key and len(saved.get("terms", [])) == k:
                return saved["terms"]
        except (OSError, ValueError):
            pass
    if not store_dir.is_dir():
        return None
    logger.info("computing top terms of %d clusters (cached in %s)", k, cache)
    table = pq.read_table(assign_path, columns=["row", "cluster"])
    assignments = np.zeros(table.num_rows, dtype=np.int64)
    assignments[table.column("row").to_numpy()] = table.column("cluster").to_numpy()
    with PoolStore.open(store_dir) as store:
        terms = cluster_top_terms(store, assignments, k, n_terms=n_terms, seed=seed)
    try:
        atomic_write_json(cache, {"key": key, "n_terms": n_terms, "seed": seed, "terms": terms})
    except OSError as e:  # a read-only run directory still gets its terms, just not cached
        logger.warning("could not cache top terms in %s: %s", cache, e)
    return terms


# -- the run directory --------------------------------------------------------------------------
@dataclass
class RunData:
    """What a report shows, read from a run directory; a missing part is None / empty."""

    run_dir: Path
    clusters: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config_text: str | None = None
    history: list[dict[str, Any]] | None = None
    probes: dict[str, np.ndarray] | None = None
    selected: dict[str, np.ndarray] | None = None
    rejects: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    centroids: np.ndarray | None = None
    cluster_job: dict[str, Any] | None = None
    domain_mix: dict[str, dict[str, int]] | None = None

    @property
    def k(self) -> int:
        return len(self.clusters)

    @property
    def is_selection(self) -> bool:
        return self.summary is not None and "selected" in self.summary

    @property
    def has_bandit(self) -> bool:
        return any(h.get("phase") == "bandit" for h in self.history or [])


def summary_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """``clusters/summary.parquet`` as a list of dicts, or a clear error for a non-run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"{run_dir}: no such directory")
    path = RunLayout(run_dir).cluster_summary
    if not path.is_file():
        raise InspectError(f"{run_dir} has no clusters/summary.parquet: is it a quadsel run directory "
                           f"whose cluster stage finished? (run `quadsel cluster` or `quadsel run` first)")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing problem
        raise InspectError(f"{path}: cannot read it ({e})") from None


def _count_domains(pool: PoolStore, rows: np.ndarray | None) -> dict[str, int] | None:
    """Counts of the pool's ``domain`` meta field over ``rows`` (all rows: None); None when a row
    has no such field. Batch by batch: memory stays flat whatever the pool size."""
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


def domain_mix(run_dir: str | Path) -> dict[str, dict[str, int]] | None:
    """``{"pool": counts, "selection": counts}`` of the pool's ``domain`` field (a labelled pool
    such as the demo's or the benchmark's), or None (no such field, or nothing selected yet).
    Measurement only: no selector reads the field."""
    layout = RunLayout(run_dir)
    if not layout.selected.is_file() or not (layout.pool_store / "index.json").is_file():
        return None
    rows = pq.read_table(layout.selected, columns=["row"]).column("row").to_numpy()
    with PoolStore.open(layout.pool_store) as pool:
        mix_pool = _count_domains(pool, None)
        mix_sel = _count_domains(pool, np.sort(rows)) if mix_pool is not None else None
    return None if mix_sel is None else {"pool": mix_pool, "selection": mix_sel}


def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError) as e:
        logger.warning("skipping %s: %s", path, e)
        return None


def _parquet_or_none(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    t = pq.read_table(path)
    return {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}


def read_rejects(path: Path, examples: int = 3) -> dict[str, Any]:
    """Counts by reason and by (file, reason), and the first ``examples`` lines per reason.

    ``truncated`` lines are rows that were kept (shortened), counted apart from rejects.
    """
    by_reason: Counter[str] = Counter()
    by_file: Counter[tuple[str, str]] = Counter()
    ex: dict[str, list[dict[str, Any]]] = {}
    bad = 0
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                reason = str(rec.get("reason", "?"))
                by_reason[reason] += 1
                by_file[(str(rec.get("file", "?")), reason)] += 1
                if len(ex.setdefault(reason, [])) < examples:
                    ex[reason].append(rec)
    return {"present": path.is_file(), "by_reason": dict(by_reason.most_common()),
            "by_file": [[f, r, n] for (f, r), n in by_file.most_common()], "examples": ex,
            "unreadable_lines": bad}


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    rows = summary_rows(run_dir)
    data = RunData(run_dir=run_dir, clusters=rows)
    layout = RunLayout(run_dir)
    data.summary = _json_or_none(layout.summary)
    data.cluster_job = _json_or_none(layout.cluster_job)
    timings = _json_or_none(layout.timings)
    if timings is None:
        timings = (data.summary or data.cluster_job or {}).get("timings_s")
    data.timings = dict(timings or {})
    cfg = layout.config_resolved
    data.config_text = cfg.read_text(encoding="utf-8", errors="replace") if cfg.is_file() else None
    hist = _json_or_none(layout.bandit_history)
    if hist is None:  # a run still selecting (or killed): its last checkpoint
        state = _json_or_none(layout.bandit_state)
        hist = ((state or {}).get("selector") or {}).get("history")
    data.history = hist
    data.probes = _parquet_or_none(layout.probes)
    data.selected = _parquet_or_none(layout.selected)
    data.rejects = read_rejects(layout.rejects)
    data.domain_mix = domain_mix(run_dir)
    stages = layout.stages
    if stages.is_dir():
        for d in sorted(p for p in stages.iterdir() if (p / DONE).is_file()):
            data.stages[d.name] = (_json_or_none(d / DONE) or {}).get("info", {})
    cent = stages / "cluster" / "result" / "centroids.npy"
    if cent.is_file():
        data.centroids = np.load(cent, allow_pickle=False)
    return data
