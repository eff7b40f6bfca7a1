"""The validated pool, materialised once as memory-mapped Arrow shards.

Later stages address an example by its global row (0..N-1, the order the sources streamed)
and fetch texts by row without reading the rest. Layout of a store folder::

    part-00000.arrow, part-00001.arrow, …   Arrow IPC *file* format, uncompressed
    index.json                              {"rows", "shards": [{"file", "rows", "offset",
                                             "bytes"}], "schema", "format", "version"}

Columns: ``id`` string, ``text`` large_string, ``meta`` string (compact JSON of the row's
other fields, sorted keys), ``n_chars`` int64, ``source`` string (input file), ``line`` int64
(1-based line or row in it). Record batches inside a shard hold ``RECORD_BATCH_ROWS`` rows
whatever batches came in, so the same examples always give byte-identical files.

The folder is a :mod:`quadsel.pipeline.arrow_store` store (the format, commit order, checks on
open and memory-mapped reads are that module's): opening costs nothing and resident memory is
what is touched.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from quadsel.core import faults
from quadsel.core.atomic import atomic_path, fsync_dir, remove_stale_temps
from quadsel.core.progress import Progress

from .arrow_store import INDEX, ShardedStore, StoreError, shard_entry
from .sources import Example

logger = logging.getLogger(__name__)

__all__ = ["PoolStore", "StoreError", "SCHEMA", "expand_meta"]

FORMAT = "quadsel-pool"
VERSION = 1
RECORD_BATCH_ROWS = 1024
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.large_string()),
    ("meta", pa.string()),
    ("n_chars", pa.int64()),
    ("source", pa.string()),
    ("line", pa.int64()),
])


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _record_batch(rows: list[Example]) -> pa.RecordBatch:
    text = pa.array([e.text for e in rows], pa.large_string())
    return pa.RecordBatch.from_arrays([
        pa.array([e.id for e in rows], pa.string()),
        text,
        pa.array([_meta_json(e.meta) for e in rows], pa.string()),
        pc.utf8_length(text).cast(pa.int64()),
        pa.array([e.source for e in rows], pa.string()),
        pa.array([e.line for e in rows], pa.int64()),
    ], schema=SCHEMA)


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.arrow"


class _ShardWriter:
    """Writes shards of ``rows_per_shard`` rows, record batch by record batch (flat memory)."""

    def __init__(self, out_dir: Path, rows_per_shard: int) -> None:
        self.out_dir = out_dir
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        self._ctx: Any = None
        self._writer: ipc.RecordBatchFileWriter | None = None
        self._in_shard = 0

    def _open(self) -> None:
        path = self.out_dir / _shard_name(len(self.shards))
        self._ctx = atomic_path(path)
        tmp = self._ctx.__enter__()
        self._writer = ipc.new_file(str(tmp), SCHEMA)
        self._in_shard = 0

    def _close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        self._ctx.__exit__(None, None, None)
        self.shards.append(shard_entry(self.out_dir, _shard_name(len(self.shards)), self._in_shard,
                                       self.rows - self._in_shard))

    def write(self, rows: list[Example]) -> None:
        """Append up to RECORD_BATCH_ROWS rows as one record batch (splitting at shard ends)."""
        while rows:
            if self._writer is None:
                self._open()
            take = min(len(rows), self.rows_per_shard - self._in_shard)
            self._writer.write_batch(_record_batch(rows[:take]))  # type: ignore[union-attr]
            self._in_shard += take
            self.rows += take
            rows = rows[take:]
            if self._in_shard >= self.rows_per_shard:
                self._close()

    def finish(self) -> None:
        if self._writer is not None:
            self._close()

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class PoolStore(ShardedStore):
    """Random and sequential access to a written pool. See the module docstring."""

    FORMAT = FORMAT
    VERSION = VERSION
    WHAT = "pool store"

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        super().__init__(root, index)
        self._n_chars: np.ndarray | None = None

    def expected_schema(self) -> pa.Schema:
        return SCHEMA

    # -------------------------------------------------------------------- write
    @classmethod
    def write(cls, batches: Iterable[list[Example]], out_dir: str | Path, *,
              rows_per_shard: int = 50_000, label: str = "read pool") -> "PoolStore":
        """Write the examples of ``batches`` (in order) as a store in ``out_dir``; return it opened."""
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if (out / INDEX).exists():  # an old store here: invalidate it before touching shards
            (out / INDEX).unlink()
            fsync_dir(out)
        remove_stale_temps(out)
        writer = _ShardWriter(out, rows_per_shard)
        buf: list[Example] = []
        try:
            with Progress(label, unit="rows") as prog:
                for batch in batches:
                    buf.extend(batch)
                    full = len(buf) - len(buf) % RECORD_BATCH_ROWS
                    for i in range(0, full, RECORD_BATCH_ROWS):
                        writer.write(buf[i:i + RECORD_BATCH_ROWS])
                    del buf[:full]
                    prog.advance(len(batch))
                    faults.point("store.batch")
                writer.write(buf)
                writer.finish()
        except BaseException:
            writer.abort()
            raise
        keep = {s["file"] for s in writer.shards}
        for old in out.glob("part-*.arrow"):
            if old.name not in keep:
                old.unlink()
        cls.write_index(out, rows=writer.rows, shards=writer.shards,
                        schema=[{"name": f.name, "type": str(f.type)} for f in SCHEMA])
        return cls.open(out)

    # -------------------------------------------------------------------- access
    def _columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(SCHEMA.names)
        unknown = [c for c in columns if c not in SCHEMA.names]
        if unknown:
            raise KeyError(f"unknown column(s) {unknown}; a pool store has {SCHEMA.names}")
        return list(columns)

    def take(self, rows: Sequence[int] | np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The given rows (any order, repeats allowed) as a table, in the order given."""
        cols = self._columns(columns)
        r = self.check_rows(rows)
        empty = SCHEMA.empty_table().select(cols)
        if r.size == 0:
            return empty
        shard = self.shard_of(r)
        order = np.argsort(shard, kind="stable")
        sorted_shard = shard[order]
        parts = []
        for s in np.unique(sorted_shard):
            lo, hi = np.searchsorted(sorted_shard, [s, s + 1])
            local = r[order[lo:hi]] - self._offsets[s]
            parts.append(self.table(int(s)).select(cols).take(pa.array(local)))
        out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if not np.all(order[1:] > order[:-1]):  # put rows back in the order asked for
            out = out.take(pa.array(np.argsort(order, kind="stable")))
        return out.combine_chunks()

    def texts(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the given rows, in the order given (repeats allowed)."""
        return self.take(rows, ["text"]).column(0).to_pylist()

    def iter_batches(self, batch_size: int = 4096, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of ``batch_size`` rows (the last may be shorter) in row order."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        cols = self._columns(columns)
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            parts = []
            s = int(np.searchsorted(self._offsets, start, side="right") - 1)
            while start < stop:
                off = int(self._offsets[s])
                t = self.table(s)
                k = min(stop, off + t.num_rows) - start
                parts.append(t.select(cols).slice(start - off, k))
                start += k
                s += 1
            t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            yield t.combine_chunks().to_batches()[0]

    def iter_texts(self, batch_size: int = 4096) -> Iterator[list[str]]:
        for b in self.iter_batches(batch_size, ["text"]):
            yield b.column(0).to_pylist()

    def id_array(self) -> pa.ChunkedArray:
        """All ids in row order, zero-copy (prefer this to :meth:`ids` for large pools)."""
        if not self._shards:
            return pa.chunked_array([], pa.string())
        return pa.chunked_array([c for i in range(len(self._shards))
                                 for c in self.table(i).column("id").chunks], pa.string())

    def ids(self) -> list[str]:
        """All ids in row order as a Python list (row i has id ``ids()[i]``)."""
        return self.id_array().to_pylist()

    def n_chars(self) -> np.ndarray:
        """Text length (Unicode code points) of every row, int64, read-only."""
        if self._n_chars is None:
            parts = [self.table(i).column("n_chars").to_numpy() for i in range(len(self._shards))]
            arr = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
            arr.flags.writeable = False
            self._n_chars = arr
        return self._n_chars

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id (int64, in the order given); KeyError names an unknown id."""
        want = pa.array(list(ids), pa.string())
        pos = pc.index_in(want, value_set=self.id_array().combine_chunks())
        if pos.null_count:
            missing = want.filter(pc.is_null(pos))[0].as_py()
            raise KeyError(f"id {missing!r} is not in the pool store at {self.root}")
        return pos.to_numpy(zero_copy_only=False).astype(np.int64)


# ------------------------------------------------------------------------ meta -> columns

def _infer(values: list[Any], name: str = "") -> pa.Array:
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int" if -(2**63) <= v < 2**63 else "json")
        elif isinstance(v, float):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            kinds.add("json")
    if kinds == {"str"}:
        return pa.array(values, pa.string())
    if kinds == {"bool"}:
        return pa.array(values, pa.bool_())
    if kinds == {"int"}:
        return pa.array(values, pa.int64())
    if kinds and kinds <= {"int", "float"}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if not kinds:
        return pa.nulls(len(values), pa.string())
    if len(kinds) > 1:  # said once per field, never a silent rewrite
        logger.warning("meta field %r has values of several types (%s) across rows: written as a string "
                       "column (strings as they are, other values as their JSON text, e.g. 3 -> \"3\")",
                       name, ", ".join(sorted(kinds)))
    # a string stays itself ("a", never '"a"'); anything else is its JSON text (3 -> "3", True -> "true")
    return pa.array([None if v is None else v if isinstance(v, str) else
                     json.dumps(v, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                     for v in values], pa.string())


def expand_meta(table: pa.Table) -> pa.Table:
    """Replace the ``meta`` JSON column with one column per key (the rows' original fields).

    One type per key over the whole table: all str -> string, all int -> int64, int and/or
    float -> float64, all bool -> bool; anything else (lists, objects, ints beyond int64) or a
    mix of types -> string: strings as they are, other values as their compact JSON text (so a
    field that is "a" in one row and 3 in another reads back as "a" and "3"; a logged warning
    names the field). A key missing in a row, or null, is null; a key no row has a
    value for is an all-null string column. New columns come after the others, keys sorted;
    a key named like an existing column (e.g. a row field ``source``) replaces that column,
    since the original field is what a reader of the output expects.
    """
    if "meta" not in table.column_names:
        raise KeyError(f"no 'meta' column (columns: {table.column_names})")
    metas = [json.loads(s) if s else {} for s in table.column("meta").to_pylist()]
    keys = sorted(set().union(*metas)) if metas else []
    out = table.drop_columns(["meta"])
    clash = [k for k in keys if k in out.column_names]
    if clash:
        out = out.drop_columns(clash)
    for k in keys:
        out = out.append_column(k, _infer([m.get(k) for m in metas], k))
    return out
