"""What the selection looks like: its config, its columns, the errors and the seeded write order."""
from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from quadsel.core.errors import SchemaMismatchError

MANIFEST_VERSION = 1
QUADSEL_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("quadsel_cluster", pa.int32(), nullable=False),
    pa.field("quadsel_score", pa.float64(), nullable=True),
    pa.field("quadsel_round", pa.int32(), nullable=False),
)
_BATCH_BYTES = 64 * 2**20  # a record batch / row group never buffers more than this
_EXT = {"arrow": "arrow", "parquet": "parquet"}
CARD_NAME = "README.md"
_ORDER_SALT = 0x71756164_73687566  # "quadshuf": the write order's stream, apart from other seeds


class ShardConfig(BaseModel):
    """How the selection is written (``output:`` in a job config)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["arrow", "parquet"] = "arrow"
    max_rows: int | None = Field(100_000, gt=0, description="rows per shard at most")
    max_bytes: int | None = Field(
        256 * 2**20, gt=0,
        description="uncompressed Arrow size (nbytes) of a shard's rows at most; a single "
                    "larger row goes alone into its own shard")
    compression: Literal["none", "zstd", "lz4"] = "none"
    batch_rows: int = Field(65_536, gt=0, description="rows per record batch / row group")
    shuffle: bool = Field(
        True, description="write the rows in a seeded shuffled order (seed = the run's seed); "
                          "false keeps the selector's order (grouped by cluster)")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def write_order(keys: np.ndarray | list[int], seed: int) -> np.ndarray:
    """A seeded pseudo-random permutation of ``range(len(keys))``: positions sorted by a hash of
    (key, seed). ``keys`` are the rows' pool positions; the order depends only on them and the
    seed (not on numpy's RNG streams), ties (repeated keys) keep their given order."""
    k = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        s = _splitmix64(np.array([int(seed) ^ _ORDER_SALT], dtype=np.uint64))
        h = _splitmix64(k ^ s[0])
    return np.lexsort((np.arange(len(k)), h))


def selection_schema(original: pa.Schema) -> pa.Schema:
    """The pool's schema plus ``quadsel_cluster``, ``quadsel_score`` and ``quadsel_round``."""
    fields = list(original)
    for extra in QUADSEL_COLUMNS:
        idx = original.get_field_index(extra.name)
        if idx >= 0:
            if original.field(idx).type != extra.type:
                raise SchemaMismatchError(
                    f"column '{extra.name}' is reserved for quadsel ({extra.type}) but the pool "
                    f"has it as {original.field(idx).type}; rename or drop it")
            continue  # already a selection schema: idempotent
        fields.append(extra)
    return pa.schema(fields, metadata=original.metadata)


def conform(data: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """``data`` as a table with exactly ``schema``; a clear error naming the column otherwise.

    Columns may come in another order; an all-null column of type ``null`` (what Python lists
    of ``None`` infer to) is cast to the expected type. Anything else must match exactly.
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif not isinstance(data, pa.Table):
        raise TypeError(f"expected a pyarrow Table or RecordBatch, got {type(data).__name__}")
    if data.schema.equals(schema, check_metadata=True):  # common case: check non-nullables only
        for field in schema:
            if not field.nullable and data.column(field.name).null_count:
                break
        else:
            return data
    names = set(data.column_names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise SchemaMismatchError(f"missing column(s) {', '.join(map(repr, missing))}")
    extra = [n for n in data.column_names if schema.get_field_index(n) < 0]
    if extra:
        raise SchemaMismatchError(
            f"unexpected column(s) {', '.join(map(repr, extra))} not in the selection schema")
    if len(names) != len(data.column_names):
        raise SchemaMismatchError("duplicate column names in batch")
    arrays = []
    for field in schema:
        col = data.column(field.name)
        if col.type != field.type:
            if pa.types.is_null(col.type):
                col = col.cast(field.type)
            else:
                raise SchemaMismatchError(
                    f"column '{field.name}': expected type {field.type}, got {col.type}")
        if not field.nullable and col.null_count:
            raise SchemaMismatchError(
                f"column '{field.name}': {col.null_count} null value(s) in a non-nullable column")
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)
