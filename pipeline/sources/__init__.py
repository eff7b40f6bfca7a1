"""Read a pool (or a reference set) as validated batches of :class:`Example`.

Inputs: JSONL (``.jsonl``, ``.ndjson``, gzipped ``.jsonl.gz`` / ``.json.gz``), Parquet
(``.parquet``, ``.pq``), Arrow IPC in file or stream format (``.arrow``, ``.feather``,
``.ipc``) and ``datasets`` ``save_to_disk`` folders (their ``data-*.arrow`` files are read
directly with pyarrow). A path may be a file, a folder (every supported file inside, sorted,
recursively; hidden names skipped), a glob, or a list of those.

Everything streams: JSONL line by line in binary, Parquet with ``iter_batches``, Arrow one
memory-mapped record batch at a time. What stays in memory across the whole pool is the
duplicate-id filter: one 8-byte hash per accepted id in a Python set (about 70 bytes a row).

A bad row never stops a run: it becomes one line of ``rejects.jsonl``
(``{"file", "line", "reason", "detail", "id"}``) and a count. Truncated over-long texts are
kept, counted apart (``RejectLog.truncated``) and logged there with reason ``"truncated"``.
A problem with a whole file (missing, unreadable, corrupt, no text column) raises
:class:`SourceError` naming the file.
"""
from quadsel.core.errors import SourceError

from .config import (
    ARROW_EXTS,
    JSONL_EXTS,
    PARQUET_EXTS,
    REJECT_REASONS,
    RESERVED_PREFIX,
    Example,
    SourceConfig,
    content_id,
)
from .paths import resolve_paths
from .readers import iter_batches, iter_examples, read_texts
from .rejects import RejectLog

__all__ = [
    "ARROW_EXTS", "JSONL_EXTS", "PARQUET_EXTS", "REJECT_REASONS", "RESERVED_PREFIX", "Example", "RejectLog",
    "SourceConfig", "SourceError", "content_id", "iter_batches", "iter_examples", "read_texts", "resolve_paths",
]
