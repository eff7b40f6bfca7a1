"""The one on-disk store format of quadsel's intermediate data: memory-mapped Arrow shards.

Both the validated pool (:class:`quadsel.pipeline.store.PoolStore`) and the embeddings
(:class:`quadsel.pipeline.embed.EmbeddingStore`) are a folder of this form::

    <shard>.arrow, …   Arrow IPC *file* format, uncompressed, each written atomically
    index.json         {"format", "version", "rows",
                        "shards": [{"file", "rows", "offset", "bytes"}], …store's own fields}

``index.json`` is written last: a folder without it is an unfinished write and ``open``
refuses it. Opening checks that every listed shard is there with the recorded size; a shard is
memory-mapped on first use (zero-copy: column buffers point into the map) and checked against
its index entry (rows, column names). Row ``r`` of the store is row ``r - offset`` of the shard
whose ``[offset, offset + rows)`` holds it. A store pickles as its path, so Ray workers reopen
it instead of shipping its data.

A concrete store names its ``FORMAT``, ``VERSION`` and what it is (``WHAT``, for messages) and
reads its columns through :meth:`ShardedStore.table`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from quadsel.core.atomic import atomic_path, atomic_write_json, read_json
from quadsel.core.errors import StoreError

INDEX = "index.json"

S = TypeVar("S", bound="ShardedStore")


def write_ipc_file(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """One shard: the record batches as an Arrow IPC file, written atomically; its size in bytes."""
    with atomic_path(path) as tmp:
        with ipc.new_file(str(tmp), schema) as writer:
            for b in batches:
                writer.write_batch(b)
    return path.stat().st_size


def shard_entry(root: Path, file: str, rows: int, offset: int) -> dict[str, Any]:
    """The index entry of a written shard."""
    return {"file": file, "rows": int(rows), "offset": int(offset), "bytes": (root / file).stat().st_size}


class ShardedStore:
    """Read side shared by the stores. See the module docstring."""

    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "store"
    error: ClassVar[type[StoreError]] = StoreError

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root = root
        self.index = index
        self._shards: list[dict[str, Any]] = index["shards"]
        self._offsets = np.array([s["offset"] for s in self._shards] + [int(index["rows"])], dtype=np.int64)
        self._tables: list[pa.Table | None] = [None] * len(self._shards)
        self._maps: list[pa.MemoryMappedFile | None] = [None] * len(self._shards)

    # ------------------------------------------------------------------ write / open
    @classmethod
    def write_index(cls, out: Path, *, rows: int, shards: list[dict[str, Any]], **fields: Any) -> None:
        """``index.json`` (last: it marks the folder finished)."""
        atomic_write_json(Path(out) / INDEX, {"format": cls.FORMAT, "version": cls.VERSION, "rows": int(rows),
                                              "shards": shards, **fields})

    @classmethod
    def open(cls: type[S], dir: str | Path) -> S:
        root = Path(dir)
        path = root / INDEX
        if not path.is_file():
            what = "does not exist" if not root.exists() else f"has no {INDEX}"
            raise cls.error(f"{root}: not a finished {cls.WHAT} ({what}; the write did not complete or "
                            "this is not a store folder: run its stage again)")
        try:
            index = read_json(path)
        except (OSError, ValueError) as e:
            raise cls.error(f"{path}: unreadable ({e})") from e
        if not isinstance(index, dict) or index.get("format") != cls.FORMAT:
            raise cls.error(f"{path}: not a {cls.FORMAT} index")
        if index.get("version") != cls.VERSION:
            raise cls.error(f"{path}: {cls.WHAT} version {index.get('version')}, this quadsel reads "
                            f"version {cls.VERSION}")
        try:
            shards = index["shards"]
            offset = 0
            for s in shards:
                if int(s["offset"]) != offset:
                    raise ValueError(f"shard {s['file']} starts at row {s['offset']}, expected {offset}")
                offset += int(s["rows"])
            if offset != int(index["rows"]):
                raise ValueError(f"shards hold {offset} rows, the index says {index['rows']}")
        except (KeyError, TypeError, ValueError) as e:
            raise cls.error(f"{path}: malformed index ({e})") from e
        for s in shards:
            p = root / s["file"]
            if not p.is_file():
                raise cls.error(f"{p}: shard listed in {INDEX} is missing")
            if "bytes" in s and p.stat().st_size != s["bytes"]:
                raise cls.error(f"{p}: {p.stat().st_size} bytes, {INDEX} says {s['bytes']} "
                                "(the store was modified after it was written)")
        return cls(root, index)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles as its path (Ray workers reopen it)
        return (type(self).open, (str(self.root),))

    def close(self) -> None:
        self._tables = [None] * len(self._shards)
        for m in self._maps:
            if m is not None:
                m.close()
        self._maps = [None] * len(self._shards)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, rows={len(self)}, shards={len(self._shards)})"

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.index["rows"])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def expected_schema(self) -> pa.Schema:
        raise NotImplementedError

    def table(self, i: int) -> pa.Table:
        """Shard ``i`` as a zero-copy table over its memory map (checked against the index)."""
        t = self._tables[i]
        if t is None:
            path = self.root / self._shards[i]["file"]
            try:
                m = pa.memory_map(str(path))
                t = ipc.open_file(m).read_all()
            except (OSError, pa.ArrowException) as e:
                raise self.error(f"{path}: unreadable shard ({e})") from e
            if t.num_rows != self._shards[i]["rows"] or not t.schema.equals(self.expected_schema()):
                m.close()
                raise self.error(f"{path}: shard does not match {INDEX} (rows or columns differ)")
            self._maps[i], self._tables[i] = m, t
        return t

    def check_rows(self, rows: Any) -> np.ndarray:
        """``rows`` as a flat int64 array, every one in range (TypeError / IndexError otherwise)."""
        r = np.asarray(rows)
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise TypeError(f"rows must be integers, got {r.dtype}")
        r = r.astype(np.int64, copy=False).ravel()
        if r.size and (r.min() < 0 or r.max() >= len(self)):
            bad = int(r[(r < 0) | (r >= len(self))][0])
            raise IndexError(f"row {bad} out of range for a {self.WHAT} of {len(self)} rows")
        return r

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """The shard holding each (checked) row."""
        return np.searchsorted(self._offsets, rows, side="right") - 1

    def offset(self, i: int) -> int:
        return int(self._offsets[i])
