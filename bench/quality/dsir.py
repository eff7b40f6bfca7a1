"""DSIR baseline (Xie et al. 2023, "Data Selection for Language Models via Importance
Resampling") through the official ``data-selection`` package (PyPI ``data-selection==1.0.3``).

``HashedNgramDSIR`` with the package's own defaults (word-punct unigrams + bigrams hashed into
10,000 buckets; examples under 100 words filtered out) fits a bag-of-n-grams model on the pool
(the raw dataset, written as jsonl with a ``text`` field, one line per pool row in store order)
and on the target's ``reference.jsonl``, and computes one log importance weight per pool row.
The weights are cached per (pool, reference). A selection then takes rows in the order the
package's ``resample`` would sample them (Gumbel top-k on the log importance weights, the
Gumbel noise seeded by the bench seed), skipping rows that do not fit, until the same token
budget as every other method is used. Nothing is downloaded (nltk's WordPunctTokenizer is a
regular expression).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quadsel.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, read_json, stable_hash

from .config import QualityConfig, base_target
from .data import PoolData

logger = logging.getLogger("quadsel.bench.quality")


@dataclass
class DsirWeights:
    log_weights: np.ndarray  # float64 per pool row (store order)
    keep: np.ndarray  # bool per pool row: passes the package's per-example filter (>= 100 words)
    seconds: float  # fit + compute (as measured when computed)
    version: str


def _pool_jsonl(cfg: QualityConfig, pool: PoolData) -> Path:
    """The pool's validated texts as jsonl (``{"text": ...}``), rows in store order."""
    path = Path(cfg.cache_dir) / "dsir" / f"pool-{pool.key}.jsonl"
    if not path.is_file():
        texts = pool.store.texts(np.arange(len(pool.store)))
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts]
        atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return path


def _unshard(parts: list[np.ndarray], num_shards: int, n: int) -> np.ndarray:
    """The package shards one dataset virtually (row i goes to shard i % num_shards) and
    concatenates shard after shard; put the values back in row order."""
    out = np.empty(n, dtype=np.float64)
    for j, part in enumerate(parts):
        out[j::num_shards] = np.asarray(part, dtype=np.float64)
    return out


def dsir_weights(cfg: QualityConfig, pool: PoolData, target: str) -> DsirWeights:
    try:
        import data_selection
        from data_selection import HashedNgramDSIR
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("method 'dsir' needs the data-selection package: "
                          "pip install data-selection==1.0.3 (in quadsel's `test` extra)") from e
    ref_path = cfg.target_dir(base_target(target)) / "reference.jsonl"
    if not ref_path.is_file():
        raise FileNotFoundError(f"dsir: no reference set {ref_path}")
    version = str(getattr(data_selection, "__version__", "?"))
    ref_hash = hashlib.sha256(ref_path.read_bytes()).hexdigest()
    key = stable_hash({"v": 1, "pool": pool.key, "reference": ref_hash, "package": version})
    folder = Path(cfg.cache_dir) / "dsir"
    arr, meta = folder / f"weights-{key}.npz", folder / f"weights-{key}.json"
    if arr.is_file() and meta.is_file():
        z = np.load(arr)
        info = read_json(meta)
        return DsirWeights(z["log_weights"], z["keep"], float(info["seconds"]), info["version"])
    n = len(pool.store)
    raw = _pool_jsonl(cfg, pool)
    P = cfg.dsir.num_proc
    t0 = time.monotonic()
    logger.info("dsir: fitting HashedNgramDSIR (data-selection %s) on %d pool rows and %s", version, n, ref_path)
    with tempfile.TemporaryDirectory(prefix="dsir-", dir=folder) as tmp:
        d = HashedNgramDSIR(raw_datasets=[str(raw)], target_datasets=[str(ref_path)], cache_dir=tmp, num_proc=P)
        d.fit_importance_estimator()
        d.compute_importance_weights()
        shards = d._get_virtually_sharded_datasets(d.raw_datasets)
        num_shards = len(shards)
        lw = [np.load(Path(d.log_importance_weights_dir) / f"{s['overall_idx']}.npy") for s in shards]
        md = [np.load(Path(d.perexample_metadata_dir) / f"{s['overall_idx']}.npy") for s in shards]
        log_w = _unshard(lw, num_shards, n)
        keep = np.asarray(d.perexample_metadata_filter(_unshard(md, num_shards, n)), dtype=bool)
    seconds = round(time.monotonic() - t0, 2)
    with atomic_path(arr) as p:
        with open(p, "wb") as fh:
            np.savez(fh, log_weights=log_w, keep=keep)
    atomic_write_json(meta, {"seconds": seconds, "version": version, "rows": n, "kept": int(keep.sum())})
    logger.info("dsir: weights for %d rows in %.1f s (%d pass the package's length filter)",
                n, seconds, int(keep.sum()))
    return DsirWeights(log_w, keep, seconds, version)


def gumbel_order(w: DsirWeights, seed: int) -> np.ndarray:
    """Rows in the order ``resample`` samples them: Gumbel top-k on the log weights (seeded),
    over the rows that pass the package's filter."""
    rng = np.random.default_rng([seed, 0xD512])
    noisy = w.log_weights + rng.gumbel(size=w.log_weights.shape)
    rows = np.flatnonzero(w.keep)
    return rows[np.argsort(-noisy[rows], kind="stable")]


def take_to_budget(order: np.ndarray, lengths: np.ndarray, budget: int) -> np.ndarray:
    """Rows of ``order`` while they fit in ``budget`` tokens, skipping any that does not."""
    costs = lengths[order].astype(np.int64)
    cum = np.cumsum(costs)
    k = int(np.searchsorted(cum, budget, side="right"))
    chosen = list(order[:k])
    left = budget - (int(cum[k - 1]) if k else 0)
    for r, c in zip(order[k:].tolist(), costs[k:].tolist()):
        if left <= 0:
            break
        if c <= left:
            chosen.append(r)
            left -= c
    return np.asarray(chosen, dtype=np.int64)


def select_dsir(cfg: QualityConfig, pool: PoolData, lengths: np.ndarray, target: str, budget: int,
                seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """DSIR's rows for ``budget`` tokens and the selection's cost statistics."""
    t0 = time.monotonic()
    w = dsir_weights(cfg, pool, target)
    rows = take_to_budget(gumbel_order(w, seed), lengths, budget)
    used = int(lengths[rows].sum())
    notes = []
    if used < 0.99 * budget:
        notes.append(f"dsir: only {used:,} of {budget:,} budget tokens in rows that pass its length filter")
    n = len(pool.store)
    stats = {"selected_rows": int(len(rows)), "scorer_calls": n, "scored_share": 1.0,
             "selector_seconds": round(time.monotonic() - t0, 3), "scoring_seconds_est": w.seconds,
             "scorer_fit_seconds": None, "filled_rows": 0, "notes": notes,
             "dsir": {"package_version": w.version, "rows_passing_filter": int(w.keep.sum())}}
    return rows, {"stats": stats, "used_tokens": used}
