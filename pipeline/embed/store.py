"""Embeddings on disk: Arrow IPC shards keyed by id, memory-mapped when read.

Layout of a folder written by :func:`embed_batches`::

    vectors-00000.arrow, vectors-00001.arrow, …   Arrow IPC *file* format, uncompressed,
                                                  one record batch per shard
    index.json                                    {"format", "version", "rows", "dim",
                                                   "shards": [{"file", "rows", "offset"}],
                                                   "zero_rows", "embedder"}

Columns: ``id`` (string) and ``vector`` (``fixed_size_list<float32>[dim]``); rows are in
pool order. Each shard is written atomically and ``index.json`` last, so a folder without
it is an unfinished write and :meth:`EmbeddingStore.open` refuses it. One record batch per
shard makes a shard's vectors one contiguous float32 buffer, which reading maps straight
into a numpy array without a copy. The same inputs give byte-identical files.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..atomic import atomic_path, atomic_write_json, read_json, remove_stale_temps
from ..progress import Progress
from .base import Embedder, sample_rows

logger = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "quadsel-embeddings"
VERSION = 1


class EmbeddingStoreError(ValueError):
    """An embeddings folder that cannot be used (unfinished write, missing or changed shard)."""


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def _shard_name(i: int) -> str:
    return f"vectors-{i:05d}.arrow"


def write_vector_shard(path: Path, ids: Sequence[str], vectors: np.ndarray) -> None:
    """One shard file (``id``, ``vector``; a single record batch), written atomically."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    batch = pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)], schema=_schema(dim))
    with atomic_path(path) as tmp:
        with ipc.new_file(str(tmp), batch.schema) as writer:
            writer.write_batch(batch)


def embed_batches(
    embedder: Embedder,
    batches: Iterable[tuple[Sequence[str], Sequence[str]]],
    out_dir: str | Path,
    *,
    total: int | None = None,
    rows_per_shard: int = 100_000,
) -> "EmbeddingStore":
    """Embed ``(ids, texts)`` batches (pool order) into shards of ``rows_per_shard`` rows.

    Memory stays at one shard of vectors whatever the pool size. Files already in
    ``out_dir`` from an earlier (unfinished) write are replaced.
    """
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    (out / INDEX).unlink(missing_ok=True)  # the folder is unfinished until index.json is back
    for old in out.glob("vectors-*.arrow"):
        old.unlink()
    dim = int(embedder.dim)
    buf = np.zeros((rows_per_shard, dim), dtype=np.float32)
    buf_ids: list[str] = []
    shards: list[dict[str, Any]] = []
    rows = zero_rows = 0

    def flush() -> None:
        nonlocal buf_ids
        if not buf_ids:
            return
        name = _shard_name(len(shards))
        write_vector_shard(out / name, buf_ids, buf[: len(buf_ids)])
        shards.append({"file": name, "rows": len(buf_ids), "offset": rows - len(buf_ids)})
        buf_ids = []

    with Progress("embed", total=total, unit="rows") as progress:
        for ids, texts in batches:
            if len(ids) != len(texts):
                raise ValueError(f"embed: a batch has {len(ids)} ids but {len(texts)} texts")
            vecs = embedder.transform(texts)
            if vecs.shape != (len(texts), dim):
                raise ValueError(f"embed: {type(embedder).__name__} returned shape {vecs.shape}, "
                                 f"expected ({len(texts)}, {dim})")
            zero_rows += int(np.count_nonzero(~vecs.any(axis=1)))
            pos = 0
            while pos < len(ids):
                take = min(rows_per_shard - len(buf_ids), len(ids) - pos)
                buf[len(buf_ids): len(buf_ids) + take] = vecs[pos: pos + take]
                buf_ids.extend(str(i) for i in ids[pos: pos + take])
                pos += take
                rows += take
                if len(buf_ids) == rows_per_shard:
                    flush()
            progress.advance(len(ids))
        flush()
    if zero_rows:
        logger.warning("embed: %d of %d rows have an all-zero vector (no feature the embedder "
                       "knows); they join whichever cluster ties first", zero_rows, rows)
    write_index(out, rows=rows, dim=dim, shards=shards, zero_rows=zero_rows,
                embedder=embedder.describe())
    return EmbeddingStore.open(out)


def write_index(out: Path, *, rows: int, dim: int, shards: list[dict[str, Any]], zero_rows: int,
                embedder: dict[str, Any], **extra: Any) -> None:
    """``index.json`` (last: it marks the folder finished). ``shards``: ``{"file", "rows",
    "offset"}`` in row order."""
    atomic_write_json(Path(out) / INDEX, {
        "format": FORMAT, "version": VERSION, "rows": rows, "dim": dim, "shards": shards,
        "zero_rows": zero_rows, "embedder": embedder, **extra,
    })


class EmbeddingStore:
    """Read side of an embeddings folder; shards are memory-mapped, nothing is loaded up front."""

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root = root
        self.index = index
        self._dim = int(index["dim"])
        self._shards = index["shards"]
        self._offsets = np.array([s["offset"] for s in self._shards] + [int(index["rows"])], dtype=np.int64)
        self._mapped: list[np.ndarray | None] = [None] * len(self._shards)
        self._tables: list[pa.Table | None] = [None] * len(self._shards)

    @classmethod
    def open(cls, root: str | Path) -> "EmbeddingStore":
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            raise EmbeddingStoreError(f"{root}: no {INDEX}; not an embeddings folder, or its "
                                      "write did not finish (run the embed stage again)")
        index = read_json(path)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise EmbeddingStoreError(f"{path}: not a {FORMAT} v{VERSION} index")
        for s in index["shards"]:
            if not (root / s["file"]).is_file():
                raise EmbeddingStoreError(f"{root / s['file']}: shard listed in {INDEX} is missing")
        return cls(root, index)

    def __len__(self) -> int:
        return int(self.index["rows"])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def embedder_info(self) -> dict[str, Any]:
        return dict(self.index.get("embedder", {}))

    def _table(self, i: int) -> pa.Table:
        if self._tables[i] is None:
            path = self.root / self._shards[i]["file"]
            table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            if table.num_rows != self._shards[i]["rows"] or table.schema != _schema(self._dim):
                raise EmbeddingStoreError(f"{path}: rows or schema differ from {INDEX}")
            self._tables[i] = table
        return self._tables[i]

    def _shard_vectors(self, i: int) -> np.ndarray:
        """Shard i's vectors as a read-only view of the mapped file, ``[rows, dim]``."""
        if self._mapped[i] is None:
            col = self._table(i).column("vector")
            if col.num_chunks != 1:
                col = pa.chunked_array([pa.concat_arrays(col.chunks)])
            flat = col.chunk(0).flatten().to_numpy(zero_copy_only=True)
            self._mapped[i] = flat.reshape(-1, self._dim)
        return self._mapped[i]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_vectors(self, i: int) -> np.ndarray:
        """Shard ``i``'s vectors (a read-only view of the mapped file)."""
        return self._shard_vectors(i)

    def shard_ids(self, i: int) -> list[str]:
        return self._table(i).column("id").to_pylist()

    def ids(self) -> list[str]:
        out: list[str] = []
        for i in range(len(self._shards)):
            out.extend(self._table(i).column("id").to_pylist())
        return out

    def vectors(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 ``[n, dim]``: all rows (a zero-copy view when there is one shard), or the
        given rows in the given order (only their pages are read)."""
        if rows is None:
            if len(self._shards) == 1:
                return self._shard_vectors(0)
            if not self._shards:
                return np.zeros((0, self._dim), dtype=np.float32)
            return np.concatenate([self._shard_vectors(i) for i in range(len(self._shards))])
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for an embedding store of {len(self)} rows")
        out = np.empty((len(rows), self._dim), dtype=np.float32)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self._shard_vectors(int(i))[rows[sel] - self._offsets[i]]
        return out

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Vectors in row order, at most ``batch_size`` rows at a time (views of the mapped
        shards; a batch never spans two shards)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for i in range(len(self._shards)):
            vecs = self._shard_vectors(i)
            for start in range(0, len(vecs), batch_size):
                yield vecs[start:start + batch_size]

    def sample_rows(self, n: int, seed: int) -> np.ndarray:
        """``min(n, len)`` distinct rows, sorted, drawn uniformly with ``seed``."""
        return sample_rows(len(self), n, seed)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Vectors of :meth:`sample_rows` (a copy of only those rows: k-means training data
        for pools larger than memory)."""
        return self.vectors(self.sample_rows(n, seed))
