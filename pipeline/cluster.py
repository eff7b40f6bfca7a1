"""Spherical k-means over the pool's embeddings (FAISS), and what the selector needs from it.

- :func:`fit_kmeans` trains centroids (unit norm) on an in-memory sample,
- :func:`assign` streams the whole pool through an inner-product index (nearest centroid and
  its cosine similarity per row),
- :func:`cluster_store` does both for an :class:`~pipeline.embed.EmbeddingStore`: it trains on
  at most ``k * max_points_per_centroid`` rows drawn with the seed from the store (only those
  rows are read, so memory stays flat for pools larger than RAM) and assigns every row,
- :func:`neighbour_graph` links clusters whose centroids are within cosine distance ``gamma``,
- :func:`representatives` lists the members nearest each centroid.

Rows are L2-normalised here whatever the embedder did. ``k`` larger than the number of rows is
an error that names ``cluster.k`` and the row count (no silent clamping). Clusters can end up
empty after the whole pool is assigned (``sizes`` then holds 0 for them).

Backend: FAISS on the GPU when ``cluster.gpu`` allows it, FAISS reports a GPU and a tiny trial
search on it succeeds (so a GPU build that does not support the card's compute capability falls
back); otherwise FAISS on the CPU with as many OpenMP threads as this process may use (CPU
affinity and cgroup quota), restored afterwards. On the CPU the same input, config and thread
count give byte-identical saved results; GPU reductions may differ in the last bits.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quadsel.core.atomic import atomic_path, atomic_write_json, read_json
from quadsel.core.errors import StoreError
from quadsel.core.progress import Progress
from quadsel.selection.types import members_by_cluster

from .embed import EmbeddingStore, l2_normalize
from .store import PoolStore

logger = logging.getLogger(__name__)

RESULT_META = "cluster.json"
_ARRAYS = ("centroids", "assignments", "similarity", "sizes")


class ClusterConfig(BaseModel):
    """Spherical k-means settings (``cluster:`` in a job config)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(200, gt=0, description="number of clusters (at most the number of rows)")
    niter: int = Field(20, gt=0, description="k-means iterations")
    max_points_per_centroid: int = Field(
        256, gt=0, description="training rows per centroid: k-means trains on at most "
                               "k * max_points_per_centroid rows sampled with the seed")
    min_points_per_centroid: int = Field(1, gt=0, description="FAISS warns below k * this many rows")
    seed: int = 0
    gpu: Literal["auto", "on", "off"] = "auto"
    assign_batch: int = Field(65_536, gt=0, description="rows per batch when assigning the pool")
    nredo: int = Field(1, gt=0, description="k-means runs (different seeds); the best is kept")
    threads: int | None = Field(None, gt=0, description="CPU threads for FAISS; null = all this "
                                                        "process may use")


@dataclass
class ClusterResult:
    """Centroids and the assignment of every row (in store order).

    ``objective`` is the mean cosine similarity of the rows to their own centroid over the
    whole pool (what spherical k-means maximises; 1 is perfect). ``info`` holds the training
    details (FAISS objective per iteration on the training rows, backend, sampling).
    """

    centroids: np.ndarray   # float32 [k, d], unit rows
    assignments: np.ndarray  # int32 [N]
    similarity: np.ndarray  # float32 [N], cosine to own centroid
    sizes: np.ndarray       # int64 [k]
    backend: str            # "faiss-cpu" | "faiss-gpu"
    n_train: int
    objective: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(len(self.centroids))

    def save(self, path: str | Path) -> None:
        """``<name>.npy`` per array, then ``cluster.json``; every file written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            with atomic_path(path / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, getattr(self, name), allow_pickle=False)
        atomic_write_json(path / RESULT_META, {
            "k": self.k, "dim": int(self.centroids.shape[1]), "rows": int(len(self.assignments)),
            "backend": self.backend, "n_train": int(self.n_train), "objective": float(self.objective),
            "info": self.info,
        })

    @classmethod
    def load(cls, path: str | Path) -> "ClusterResult":
        path = Path(path)
        if not (path / RESULT_META).is_file():
            raise FileNotFoundError(f"{path}: no {RESULT_META}; not a clustering result, or its "
                                    "write did not finish")
        meta = read_json(path / RESULT_META)
        arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        return cls(**arrays, backend=meta["backend"], n_train=meta["n_train"],
                   objective=meta["objective"], info=meta.get("info", {}))


# -- resources --------------------------------------------------------------------------------
def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) // float(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[int]:
    """Run FAISS with ``n`` OpenMP threads (default :func:`cpu_budget`), restored afterwards."""
    import faiss

    n = n or cpu_budget()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        faiss.omp_set_num_threads(old)


def gpu_usable() -> bool:
    """FAISS reports a GPU and a tiny inner-product search on it gives the right answer."""
    import faiss

    try:
        if faiss.get_num_gpus() <= 0:
            return False
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, 8)
        x = np.eye(8, dtype=np.float32)
        index.add(x)
        _, idx = index.search(x, 1)
        return bool((idx[:, 0] == np.arange(8)).all())
    except Exception as e:  # a CPU build, or a GPU build the card is not supported by
        logger.debug("FAISS GPU trial failed: %s", e)
        return False


def use_gpu(mode: str) -> bool:
    if mode == "off":
        return False
    ok = gpu_usable()
    if mode == "on" and not ok:
        raise RuntimeError("cluster.gpu = 'on' but FAISS has no usable GPU (a CPU-only build, no "
                           "CUDA device, or a build that does not support this GPU); install "
                           "faiss-gpu for your CUDA or set cluster.gpu to 'auto' or 'off'")
    return ok


def _check_k(k: int, rows: int) -> None:
    if k > rows:
        raise ValueError(f"cluster.k = {k} is larger than the number of rows ({rows}); "
                         f"set cluster.k to at most {rows}")


# -- k-means ----------------------------------------------------------------------------------
def fit_kmeans(train: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Spherical k-means centroids (float32 ``[k, d]``, unit rows) of the rows of ``train``.

    FAISS subsamples ``train`` (seeded) when it has more than ``k * max_points_per_centroid``
    rows; that is logged. Returns ``(centroids, info)``.
    """
    import faiss

    if np.ndim(train) != 2 or np.shape(train)[1] == 0:
        raise ValueError(f"k-means needs a 2-d array of vectors, got shape {np.shape(train)}")
    x = l2_normalize(train)
    n, d = x.shape
    _check_k(cfg.k, n)
    budget = cfg.k * cfg.max_points_per_centroid
    if n > budget:
        logger.info("k-means: FAISS subsamples the %d training rows to %d (cluster.k %d x "
                    "cluster.max_points_per_centroid %d)", n, budget, cfg.k, cfg.max_points_per_centroid)
    gpu = use_gpu(cfg.gpu)
    backend = "faiss-gpu" if gpu else "faiss-cpu"
    t0 = time.monotonic()
    with faiss_threads(cfg.threads) as threads:
        km = faiss.Kmeans(d, cfg.k, niter=cfg.niter, nredo=cfg.nredo, seed=cfg.seed, spherical=True,
                          max_points_per_centroid=cfg.max_points_per_centroid,
                          min_points_per_centroid=cfg.min_points_per_centroid,
                          verbose=False, gpu=1 if gpu else False)
        km.train(x)
    centroids = l2_normalize(km.centroids)
    obj = [float(v) for v in np.asarray(km.obj)]
    logger.info("k-means (%s, %d threads): %d rows -> %d clusters, %d iterations in %.1fs",
                backend, threads, min(n, budget), cfg.k, cfg.niter, time.monotonic() - t0)
    info = {"backend": backend, "n_train": int(min(n, budget)), "rows_given": int(n),
            "faiss_subsampled": bool(n > budget), "train_objective": obj}
    return centroids, info


def assign(centroids: np.ndarray, batches: Iterable[np.ndarray], *, gpu: bool = False,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and cosine similarity to it (float32) for every row of the
    batches, in order. Rows and centroids are L2-normalised first; only one batch is in
    memory at a time. Ties go to the lower centroid."""
    import faiss

    c = l2_normalize(centroids)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    if gpu:
        res = faiss.StandardGpuResources()  # must outlive the searches below
        index = faiss.index_cpu_to_gpu(res, 0, index)
    assignments: list[np.ndarray] = []
    similarity: list[np.ndarray] = []
    with faiss_threads(threads):
        for batch in batches:
            x = l2_normalize(batch)
            if x.shape[0] == 0:
                continue
            if x.shape[1] != c.shape[1]:
                raise ValueError(f"assign: vectors have dim {x.shape[1]}, centroids {c.shape[1]}")
            sim, idx = index.search(x, 1)
            assignments.append(idx[:, 0].astype(np.int32))
            similarity.append(sim[:, 0].astype(np.float32))
    if not assignments:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(assignments), np.concatenate(similarity)


def cluster_store(store: EmbeddingStore, cfg: ClusterConfig) -> ClusterResult:
    """Train on a seeded sample of at most ``k * max_points_per_centroid`` rows of ``store``,
    then assign every row in batches of ``assign_batch``."""
    n = len(store)
    _check_k(cfg.k, n)
    budget = cfg.k * cfg.max_points_per_centroid
    if n > budget:
        logger.info("cluster: training k-means on a seeded sample of %d of the %d rows (cluster.k "
                    "%d x cluster.max_points_per_centroid %d); every row is assigned",
                    budget, n, cfg.k, cfg.max_points_per_centroid)
        train = store.sample(budget, cfg.seed)
    else:
        train = store.vectors()
    centroids, info = fit_kmeans(train, cfg)
    del train
    info["store_sampled"] = bool(n > budget)
    gpu = info["backend"] == "faiss-gpu"

    def counted(it: Iterable[np.ndarray], progress: Progress) -> Iterator[np.ndarray]:
        for b in it:
            yield b
            progress.advance(len(b))

    with Progress("assign", total=n, unit="rows") as progress:
        assignments, similarity = assign(centroids, counted(store.iter_batches(cfg.assign_batch), progress),
                                         gpu=gpu, threads=cfg.threads)
    sizes = np.bincount(assignments, minlength=cfg.k).astype(np.int64)
    empty = int(np.count_nonzero(sizes == 0))
    if empty:
        logger.warning("cluster: %d of %d clusters are empty after assigning all %d rows",
                       empty, cfg.k, n)
    objective = float(similarity.astype(np.float64).mean()) if n else 0.0
    logger.info("cluster: %d rows into %d clusters (%s), sizes min %d / median %d / max %d, "
                "mean cosine to centroid %.4f", n, cfg.k, info["backend"], sizes.min(),
                int(np.median(sizes)), sizes.max(), objective)
    return ClusterResult(centroids=centroids, assignments=assignments, similarity=similarity,
                         sizes=sizes, backend=info["backend"], n_train=info["n_train"],
                         objective=objective, info={**info, "config": cfg.model_dump(mode="json")})


# -- what the selector and reports use -----------------------------------------------------------
def neighbour_graph(centroids: np.ndarray, gamma: float, *, block: int = 1024) -> list[list[tuple[int, float]]]:
    """For each cluster i, ``[(j, d_ij), …]`` over clusters j != i with cosine distance
    ``d_ij = 1 - cos(c_i, c_j) <= gamma``, sorted by ``(d, j)``.

    Computed in float64 from the L2-normalised centroids, ``block`` rows at a time (memory
    ``block x k``).
    """
    c = np.asarray(centroids, dtype=np.float64)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    c = np.divide(c, norms, out=np.zeros_like(c), where=norms > 0)
    k = len(c)
    out: list[list[tuple[int, float]]] = []
    for start in range(0, k, block):
        dist = 1.0 - c[start:start + block] @ c.T
        for r in range(dist.shape[0]):
            i = start + r
            row = dist[r]
            js = np.flatnonzero(row <= gamma)
            js = js[js != i]
            js = js[np.lexsort((js, row[js]))]
            out.append([(int(j), float(row[j])) for j in js])
    return out


def representative_rows(result: ClusterResult, n: int = 5) -> list[np.ndarray]:
    """Per cluster, up to ``n`` member rows most similar to its centroid (ties: lower row)."""
    rows = np.arange(len(result.assignments))
    order = np.lexsort((rows, -result.similarity.astype(np.float64), result.assignments))
    starts = np.searchsorted(result.assignments[order], np.arange(result.k + 1))
    return [order[starts[c]:min(starts[c] + n, starts[c + 1])] for c in range(result.k)]


def representatives(result: ClusterResult, ids: Sequence[str], n: int = 5) -> list[list[str]]:
    """Per cluster, the ids of up to ``n`` members nearest its centroid (nearest first)."""
    if len(ids) != len(result.assignments):
        raise ValueError(f"representatives: {len(ids)} ids for {len(result.assignments)} assigned rows")
    return [[ids[int(r)] for r in rows] for rows in representative_rows(result, n)]


WORD_PATTERN = r"(?u)\b[^\W\d_][^\W_]*(?:_[^\W_]+)*\b"  # words and snake_case names, no numbers
TERM_SAMPLE = 48      # members sampled per cluster (fewer when there are many clusters)
TERM_MAX_DOCS = 200_000  # at most this many sampled texts in all
TERM_MAX_CHARS = 4000  # characters of each sampled text looked at


# -- top terms ----------------------------------------------------------------------------------
# The pool's embedder hashes its features, so they have no names. Instead each cluster's terms
# are ranked TF-IDF style on word tokens of a seeded sample of its members: the share of sampled
# members containing a term, times the log inverse of the term's document frequency in the whole
# pool (estimated from the same samples, each cluster weighted by its size). Cheap (one pass over
# ``clusters x sample`` texts) and deterministic given the seed.
def _sample_members(assignments: np.ndarray, k: int, sample: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 0x7E4D])
    out = []
    for members in members_by_cluster(assignments, k):
        if len(members) > sample:
            members = np.sort(rng.choice(members, size=sample, replace=False))
        out.append(members.astype(np.int64))
    return out


def cluster_top_terms(pool_store: PoolStore, assignments: np.ndarray, k: int, n_terms: int = 8,
                      seed: int = 0, *, sample: int = TERM_SAMPLE) -> list[list[str]]:
    """The ``n_terms`` most characteristic words of each of the ``k`` clusters.

    ``assignments[row]`` is the cluster of pool row ``row``. A term needs to occur in at least
    two sampled members of a cluster (one for a cluster of one) to be listed.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    assignments = np.asarray(assignments, dtype=np.int64)
    sample = min(sample, max(4, TERM_MAX_DOCS // max(k, 1)))
    if len(assignments) != len(pool_store):
        raise StoreError(f"cluster assignments cover {len(assignments)} rows but the pool store has "
                           f"{len(pool_store)}: the run's stages are out of step; rerun the job")
    picks = _sample_members(assignments, k, sample, seed)
    rows = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(k), [len(p) for p in picks])
    texts: list[str] = []
    with Progress("top terms: read", total=len(rows), unit="docs") as prog:
        for a in range(0, len(rows), 4096):
            part = pool_store.texts(rows[a:a + 4096])
            texts.extend(t[:TERM_MAX_CHARS] for t in part)
            prog.advance(len(part))
    out: list[list[str]] = [[] for _ in range(k)]
    if not texts:
        return out
    vec = CountVectorizer(token_pattern=WORD_PATTERN, lowercase=True, stop_words="english",
                          binary=True, dtype=np.float64)
    try:
        x = vec.fit_transform(texts).tocsr()
    except ValueError:  # no word at all (e.g. a pool of numbers)
        return out
    import scipy.sparse as sp

    n_sampled = np.bincount(owner, minlength=k).astype(np.float64)
    sizes = np.bincount(assignments, minlength=k).astype(np.float64)
    onehot = sp.csr_matrix((np.ones(len(owner)), (owner, np.arange(len(owner)))), shape=(k, len(owner)))
    df = (onehot @ x).tocsr()  # sampled members of each cluster containing each term
    weight = np.divide(sizes, n_sampled, out=np.zeros(k), where=n_sampled > 0)
    pool_df = np.asarray(df.T @ weight).ravel()  # estimated pool document frequency
    idf = np.log((1.0 + sizes.sum()) / (1.0 + pool_df))
    vocab = vec.get_feature_names_out()
    with Progress("top terms", total=k, unit="clusters") as prog:
        for c in range(k):
            lo, hi = df.indptr[c], df.indptr[c + 1]
            cols, counts = df.indices[lo:hi], df.data[lo:hi]
            keep = counts >= min(2.0, n_sampled[c])
            cols, counts = cols[keep], counts[keep]
            score = counts / max(n_sampled[c], 1.0) * idf[cols]
            best = np.lexsort((cols, -np.round(score, 9)))[:n_terms]  # ties: alphabetical
            out[c] = [str(vocab[j]) for j in cols[best]]
            prog.advance(1)
    return out
