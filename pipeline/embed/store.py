"""Embeddings on disk: Arrow IPC shards keyed by id, memory-mapped when read.

A :mod:`quadsel.pipeline.arrow_store` store (format ``quadsel-embeddings``) with columns ``id``
(string) and ``vector`` (``fixed_size_list<float32>[dim]``), rows in pool order; ``index.json``
also holds ``dim``, ``zero_rows`` and the ``embedder`` that wrote it. It is written by the
feature stage (:mod:`quadsel.pipeline.feature_stage`: one vector shard per pool shard) and by
whitening. One record batch per shard makes a shard's vectors one contiguous float32 buffer,
which reading maps straight into a numpy array without a copy. The same inputs give
byte-identical files.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from quadsel.core.errors import EmbeddingStoreError

from ..arrow_store import INDEX, ShardedStore, shard_entry, write_ipc_file
from .base import sample_rows

logger = logging.getLogger(__name__)

FORMAT = "quadsel-embeddings"
VERSION = 1


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def write_vector_shard(path: Path, ids: Sequence[str], vectors: np.ndarray) -> None:
    """One shard file (``id``, ``vector``; a single record batch), written atomically."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    batch = pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)], schema=_schema(dim))
    write_ipc_file(path, batch.schema, [batch])


def write_index(out: Path, *, rows: int, dim: int, shards: list[dict[str, Any]], zero_rows: int,
                embedder: dict[str, Any], **extra: Any) -> None:
    """``index.json`` of an embeddings folder (last: it marks the folder finished).
    ``shards``: ``{"file", "rows", "offset", "bytes"}`` in row order."""
    EmbeddingStore.write_index(out, rows=rows, shards=shards, dim=dim, zero_rows=zero_rows,
                               embedder=embedder, **extra)


def write_embeddings(out_dir: str | Path, ids: Sequence[str], vectors: np.ndarray, *,
                     rows_per_shard: int = 100_000, embedder: dict[str, Any] | None = None) -> "EmbeddingStore":
    """Vectors already in memory (your own embeddings, or a test's) as an embeddings folder.

    ``vectors`` float32 ``[n, dim]`` in pool order, ``ids`` their ids; ``embedder`` describes
    where they came from (kept in ``index.json``)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"write_embeddings: {len(ids)} ids for vectors of shape {vectors.shape}")
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    shards = []
    for i, a in enumerate(range(0, len(vectors), rows_per_shard)):
        name = f"vectors-{i:05d}.arrow"
        part = vectors[a:a + rows_per_shard]
        write_vector_shard(out / name, [str(x) for x in ids[a:a + rows_per_shard]], part)
        shards.append(shard_entry(out, name, len(part), a))
    write_index(out, rows=len(vectors), dim=vectors.shape[1], shards=shards,
                zero_rows=int(np.count_nonzero(~vectors.any(axis=1))), embedder=embedder or {})
    return EmbeddingStore.open(out)


class EmbeddingStore(ShardedStore):
    """Read side of an embeddings folder; shards are memory-mapped, nothing is loaded up front."""

    FORMAT = FORMAT
    VERSION = VERSION
    WHAT = "embeddings folder"
    error = EmbeddingStoreError

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        super().__init__(root, index)
        self._dim = int(index["dim"])
        self._mapped: list[np.ndarray | None] = [None] * len(self._shards)

    def expected_schema(self) -> pa.Schema:
        return _schema(self._dim)

    def close(self) -> None:
        self._mapped = [None] * len(self._shards)
        super().close()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def embedder_info(self) -> dict[str, Any]:
        return dict(self.index.get("embedder", {}))

    def shard_vectors(self, i: int) -> np.ndarray:
        """Shard ``i``'s vectors as a read-only view of the mapped file, ``[rows, dim]``."""
        if self._mapped[i] is None:
            col = self.table(i).column("vector")
            if col.num_chunks != 1:
                col = pa.chunked_array([pa.concat_arrays(col.chunks)])
            flat = col.chunk(0).flatten().to_numpy(zero_copy_only=True)
            self._mapped[i] = flat.reshape(-1, self._dim)
        return self._mapped[i]

    def shard_ids(self, i: int) -> list[str]:
        return self.table(i).column("id").to_pylist()

    def ids(self) -> list[str]:
        out: list[str] = []
        for i in range(len(self._shards)):
            out.extend(self.table(i).column("id").to_pylist())
        return out

    def vectors(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 ``[n, dim]``: all rows (a zero-copy view when there is one shard), or the
        given rows in the given order (only their pages are read)."""
        if rows is None:
            if len(self._shards) == 1:
                return self.shard_vectors(0)
            if not self._shards:
                return np.zeros((0, self._dim), dtype=np.float32)
            return np.concatenate([self.shard_vectors(i) for i in range(len(self._shards))])
        rows = self.check_rows(rows)
        out = np.empty((len(rows), self._dim), dtype=np.float32)
        shard_of = self.shard_of(rows)
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self.shard_vectors(int(i))[rows[sel] - self._offsets[i]]
        return out

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Vectors in row order, at most ``batch_size`` rows at a time (views of the mapped
        shards; a batch never spans two shards)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for i in range(len(self._shards)):
            vecs = self.shard_vectors(i)
            for start in range(0, len(vecs), batch_size):
                yield vecs[start:start + batch_size]

    def sample_rows(self, n: int, seed: int) -> np.ndarray:
        """``min(n, len)`` distinct rows, sorted, drawn uniformly with ``seed``."""
        return sample_rows(len(self), n, seed)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Vectors of :meth:`sample_rows` (a copy of only those rows: k-means training data
        for pools larger than memory)."""
        return self.vectors(self.sample_rows(n, seed))
