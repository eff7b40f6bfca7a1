"""ZCA whitening of embeddings (TAROT-style), fitted on a sample, applied in streaming batches.

Fit (float64, on a seeded sample of at most ``fit_sample`` rows of an
:class:`~pipeline.embed.EmbeddingStore`): mean ``μ``, covariance ``C = XcᵀXc / (n-1)``,
eigendecomposition ``C = U Λ Uᵀ``, and

    W = U diag(1 / sqrt(Λ + ε)) Uᵀ,   ε = eps · mean(Λ)

(ZCA: the whitened vectors stay as close as possible to the originals). ``apply`` maps
``x -> (x - μ) W`` and, by default, re-normalises rows to unit length for spherical k-means
and cosine distances. Without the re-normalisation the whitened sample's covariance is the
identity up to the regularisation (``Λ / (Λ + ε)`` on the diagonal of the eigenbasis).

Saved as ``whitener.npz`` (mean, matrix) + ``whitener.json`` (last). The same whitener must be
applied to anything compared with the whitened pool (reference vectors for distance-based
scoring): :meth:`Whitener.load` + :meth:`Whitener.apply`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadsel.core.atomic import atomic_path, atomic_write_json, read_json, remove_stale_temps
from quadsel.core.progress import Progress

from .arrow_store import INDEX, shard_entry
from .embed import EmbeddingStore, WhitenConfig, l2_normalize
from .embed.store import write_index, write_vector_shard

logger = logging.getLogger(__name__)

META = "whitener.json"
ARRAYS = "whitener.npz"


@dataclass
class Whitener:
    mean: np.ndarray    # float64 [d]
    matrix: np.ndarray  # float64 [d, d], symmetric
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-3) -> "Whitener":
        """ZCA whitener of the rows of ``x`` (``[n, d]``, n >= 2)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"whiten: need at least 2 rows of vectors to fit, got shape {x.shape}")
        if eps <= 0:
            raise ValueError(f"embed.whiten.eps must be positive, got {eps}")
        n, d = x.shape
        mean = x.mean(axis=0)
        xc = x - mean
        cov = (xc.T @ xc) / (n - 1)
        lam, u = np.linalg.eigh(cov)
        lam = np.clip(lam, 0.0, None)
        reg = eps * float(lam.mean()) if lam.mean() > 0 else eps
        matrix = (u / np.sqrt(lam + reg)) @ u.T
        matrix = (matrix + matrix.T) / 2
        rank = int(np.count_nonzero(lam > 1e-10 * max(float(lam.max()), 1e-300)))
        if rank < d:
            logger.warning("whiten: the sample covariance has rank %d < dim %d (%d rows); the %d null "
                           "directions are scaled by 1/sqrt(eps * mean eigenvalue)", rank, d, n, d - rank)
        info = {"n_fit": n, "dim": d, "eps": eps, "reg": reg, "rank": rank,
                "eig_min": float(lam.min()), "eig_max": float(lam.max()), "eig_mean": float(lam.mean())}
        return cls(mean=mean, matrix=matrix, info=info)

    def apply(self, x: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Whitened float32 rows of ``x``; unit length when ``normalize`` (row-wise, so a row's
        result does not depend on the other rows of the batch beyond float rounding)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"whiten: vectors have shape {x.shape}, the whitener dim {self.dim}")
        y = ((x - self.mean) @ self.matrix).astype(np.float32)
        return l2_normalize(y) if normalize else y

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / ARRAYS) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, matrix=self.matrix)
        atomic_write_json(path / META, {"kind": "zca", "info": self.info})

    @classmethod
    def load(cls, path: str | Path) -> "Whitener":
        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path / META}: no saved whitener here")
        meta = read_json(path / META)
        with np.load(path / ARRAYS, allow_pickle=False) as z:
            return cls(mean=z["mean"], matrix=z["matrix"], info=meta.get("info", {}))


def fit_whitener(store: EmbeddingStore, cfg: WhitenConfig, seed: int = 0) -> Whitener:
    """Fit on a seeded sample of at most ``cfg.fit_sample`` rows of ``store`` (only those are read)."""
    rows = store.sample_rows(cfg.fit_sample, seed)
    if len(rows) < len(store):
        logger.info("whiten: fitting on a seeded sample of %d of the %d rows", len(rows), len(store))
    w = Whitener.fit(store.vectors(rows), cfg.eps)
    w.info["seed"] = seed
    return w


def whiten_store(store: EmbeddingStore, whitener: Whitener, out_dir: str | Path, *,
                 batch_size: int = 65_536) -> EmbeddingStore:
    """Write ``store`` whitened and re-normalised into ``out_dir`` (same shards, ids and order),
    one shard in memory at a time, ``index.json`` last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    (out / INDEX).unlink(missing_ok=True)
    shards, zero_rows = [], 0
    with Progress("whiten", total=len(store), unit="rows") as prog:
        for i, s in enumerate(store.index["shards"]):
            vecs = store.shard_vectors(i)
            parts = []
            for a in range(0, len(vecs), batch_size):
                parts.append(whitener.apply(vecs[a:a + batch_size]))
                prog.advance(len(parts[-1]))
            w = np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)
            ids = store.shard_ids(i)
            write_vector_shard(out / s["file"], ids, w)
            zero_rows += int(np.count_nonzero(~w.any(axis=1)))
            shards.append(shard_entry(out, s["file"], len(ids), s["offset"]))
    write_index(out, rows=len(store), dim=store.dim, shards=shards, zero_rows=zero_rows,
                embedder=store.embedder_info, whiten=whitener.info)
    return EmbeddingStore.open(out)


def maybe_whiten(store: EmbeddingStore, cfg: WhitenConfig, out_dir: str | Path, seed: int = 0) -> EmbeddingStore:
    """``store`` itself when whitening is off; else fit on a sample, save the whitener to
    ``out_dir/whitener`` and return the whitened store in ``out_dir/vectors``."""
    if not cfg.enabled:
        return store
    out = Path(out_dir)
    w = fit_whitener(store, cfg, seed)
    w.save(out / "whitener")
    logger.info("whiten: ZCA on %d rows, dim %d, rank %d, eps %.3g", w.info["n_fit"], w.dim,
                w.info["rank"], cfg.eps)
    return whiten_store(store, w, out / "vectors", batch_size=cfg.batch_size)
