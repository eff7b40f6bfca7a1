"""Selected examples -> Arrow (or Parquet) shards plus ``manifest.json``, crash-safe.

Layout of a run directory::

    RUN/manifest.json              the published manifest (shard paths relative to RUN)
    RUN/selection/part-00000.arrow shards of the current generation
    RUN/selection/manifest.json    a byte-identical copy of the manifest, inside the generation
    RUN/README.md                  a dataset card whose YAML ``configs:`` point ``data_files`` at
                                   the shards, so ``datasets.load_dataset(RUN)`` is the selection

Row order: ``write_order`` gives the seeded shuffled order the job writes rows in (so a trainer
reading the shards front to back does not see them grouped by cluster); it is a pure function of
the rows' pool positions and the seed (a splitmix64 hash, no library RNG), so the same config and
seed give the same order on every machine and numpy version.

Determinism: the manifest holds no timestamps or hostnames, JSON is canonical and shard
boundaries, record batches and row groups depend only on the rows written (and the caps), so
the same rows written in the same batches give byte-identical shards and manifest.

Arrow shards keep the schema exactly; Parquet shards follow Parquet's type rules (e.g.
``timestamp[s]`` is stored as ms, list items are named ``element``), values are unchanged.

Commit protocol (one writer at a time: ``ShardWriter`` holds an ``flock`` on
``RUN/.<manifest>.lock`` and refuses to start while another writer holds it):

1. A new generation is written into ``RUN/.selection.tmp-<tok>/``: every shard goes to a
   temporary name, is fsynced and renamed (``atomic_path``); then the generation's own
   ``manifest.json`` is written atomically and the folder is fsynced.
2. The new top-level manifest is written and fsynced under a temporary name
   (``RUN/.tmp-manifest.json.*``).
3. ``RUN/manifest.json`` -> ``RUN/.manifest.json.old-<tok>`` (the manifest is withdrawn
   BEFORE any shard it describes moves), fsync RUN.
4. ``RUN/selection`` -> ``RUN/.selection.old-<tok>``; ``RUN/.selection.tmp-<tok>`` ->
   ``RUN/selection`` (the commit point), fsync RUN.
5. The temporary manifest of step 2 is renamed onto ``RUN/manifest.json``, fsync RUN.
6. The old generation and the withdrawn manifest are deleted.

Invariant: at every instant, ``RUN/manifest.json`` is either absent or describes a complete,
sha256-verified set of shards: it is withdrawn before the shards move and published only after
the new folder is in place. Steps 1-2 do all the data writing, so a disk-full (ENOSPC) error
there happens before anything visible changed (the temp folder is dropped); an error in steps
3-5 (a rename can fail too) is rolled back in-process, renames undone in reverse order.

Repair (``recover``; also run by every ``ShardWriter`` on start, under the lock): a writer
killed at any point leaves one of these states, each mapped back to a valid one:

- ``RUN/selection`` missing and a ``.selection.old-*`` folder present (killed inside step 4):
  the old folder is renamed back (roll back).
- ``RUN/manifest.json`` missing or not matching ``RUN/selection`` (killed after step 3): if the
  generation in ``RUN/selection`` verifies (sha256 of every shard against its own manifest),
  its manifest is published (roll forward when step 4 completed, roll back otherwise); else a
  withdrawn ``.manifest.json.old-*`` that verifies is restored.
- leftovers (``.selection.tmp-*``, ``.selection.old-*``, ``.manifest.json.old-*``,
  ``.tmp-manifest.json.*``, ``.tmp-README.md.*``) are deleted.
- a dataset card that is missing or stale (another format) is rewritten.

The dataset card depends only on the format and the shard folder (its ``data_files`` is the glob
``selection/part-*.<ext>``, which matches exactly the shards of the live generation), so it is
written once and changes only with ``output.format``; it is replaced (atomically) right after the
manifest is published. It is derived data: a failure to write it is logged, not raised, and the
next writer (or ``recover``) writes it.

Readers (``read_manifest``, ``verify``, ``data_files``) never modify a run directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from quadsel import __version__

from . import faults
from .atomic import (
    TMP_PREFIX,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    fsync_dir,
    remove_stale_temps,
    sha256_file,
)

logger = logging.getLogger(__name__)

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


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, or does not match the shards on disk."""


class SchemaMismatchError(ValueError):
    """A batch given to ``ShardWriter.write`` does not match the writer's schema."""


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


# ---------------------------------------------------------------- reading a manifest

def _manifest_path(run_dir_or_manifest_path: str | os.PathLike) -> Path:
    p = Path(run_dir_or_manifest_path)
    return p / "manifest.json" if p.is_dir() else p


def _root_for(mpath: Path, manifest: dict) -> Path:
    """Shard paths are relative to the run dir; the in-generation copy lives one level down."""
    parent = mpath.resolve().parent
    return parent.parent if parent.name == manifest.get("subdir") else parent


def _load(mpath: Path) -> dict:
    if not mpath.is_file():
        hint = ""
        if mpath.parent.is_dir() and any(mpath.parent.glob(".*.tmp-*")):
            hint = " (a write may have been interrupted: quadsel.pipeline.shards.recover(run_dir) repairs)"
        raise ManifestError(f"no manifest at {mpath}{hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {mpath}: {exc}") from exc
    for key in ("shards", "format", "total_rows"):
        if key not in manifest:
            raise ManifestError(f"manifest {mpath} has no '{key}' field")
    if manifest["format"] not in _EXT:
        raise ManifestError(f"manifest {mpath}: unknown format {manifest['format']!r}")
    for shard in manifest["shards"]:
        rel = Path(shard["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ManifestError(
                f"manifest {mpath}: shard path {shard['path']!r} leaves the run dir")
    return manifest


def read_manifest(run_dir_or_manifest_path: str | os.PathLike) -> dict:
    """The manifest of a run directory (or of a manifest file path)."""
    return _load(_manifest_path(run_dir_or_manifest_path))


def data_files(run_dir_or_manifest_path: str | os.PathLike) -> list[str]:
    """Absolute shard paths, in manifest order."""
    mpath = _manifest_path(run_dir_or_manifest_path)
    manifest = _load(mpath)
    root = _root_for(mpath, manifest)
    return [str(root / s["path"]) for s in manifest["shards"]]


def _count_rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path), "r") as mm:
        reader = ipc.open_file(mm)
        if hasattr(reader, "count_rows"):
            return reader.count_rows()
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _check(mpath: Path, manifest: dict, root: Path, *, full: bool) -> None:
    total = 0
    for shard in manifest["shards"]:
        path = root / shard["path"]
        if not path.is_file():
            raise ManifestError(f"{mpath}: shard {shard['path']} is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ManifestError(
                f"{mpath}: shard {shard['path']} has {size} bytes, manifest says {shard['bytes']}")
        total += shard["rows"]
        if not full:
            continue
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ManifestError(f"{mpath}: shard {shard['path']} sha256 mismatch ({digest[:12]}… "
                                f"on disk, {shard['sha256'][:12]}… in manifest)")
        try:
            rows = _count_rows(path, manifest["format"])
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"{mpath}: shard {shard['path']} is unreadable: {exc}") from exc
        if rows != shard["rows"]:
            raise ManifestError(
                f"{mpath}: shard {shard['path']} has {rows} rows, manifest says {shard['rows']}")
    if total != manifest["total_rows"]:
        raise ManifestError(f"{mpath}: shard rows sum to {total}, total_rows is "
                            f"{manifest['total_rows']}")


def verify(run_dir_or_manifest_path: str | os.PathLike) -> None:
    """Raise ``ManifestError`` unless every shard exists with the recorded size, rows, sha256."""
    mpath = _manifest_path(run_dir_or_manifest_path)
    manifest = _load(mpath)
    _check(mpath, manifest, _root_for(mpath, manifest), full=True)


def _ok(mpath: Path, root: Path | None = None, *, full: bool = True) -> bool:
    try:
        manifest = _load(mpath)
        _check(mpath, manifest, root or _root_for(mpath, manifest), full=full)
        return True
    except (ManifestError, OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------- the dataset card

def dataset_card(fmt: str, subdir: str = "selection") -> str:
    """``RUN/README.md``: a Hugging Face dataset card whose ``configs:`` make
    ``datasets.load_dataset(RUN, split="train")`` read exactly the selection's shards."""
    pattern = f"{subdir}/part-*.{_EXT[fmt]}"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {pattern}
---
# quadsel selection

The rows a quadsel run selected ({fmt} shards `{pattern}`, in the
seeded shuffled order they were written in). `manifest.json` lists every shard with its row
count, size and sha256. Each row keeps the pool's columns and adds `quadsel_cluster` (the
cluster it came from), `quadsel_score` (its influence score; null when it was taken with its
cluster unscored) and `quadsel_round` (the bandit round that took it; -1 = fill).

```python
from datasets import load_dataset
ds = load_dataset("path/to/run_dir", split="train")
```

The other files of the run directory (clusters, bandit state, stages) are not part of the
dataset.
"""


def _write_card(run: Path, subdir: str, fmt: str) -> bool:
    """Write ``RUN/README.md`` for ``fmt`` unless it is already there; never raises."""
    path, text = run / CARD_NAME, dataset_card(fmt, subdir)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
        atomic_write_text(path, text)
        return True
    except OSError as exc:  # derived data: the next writer or recover() writes it
        logger.warning("could not write the dataset card %s: %s", path, exc)
        return False


# ---------------------------------------------------------------- repair

class _Lock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.<manifest>.lock`` (released on exit/kill)."""

    def __init__(self, run_dir: Path, manifest_name: str) -> None:
        self.path = run_dir / f".{manifest_name}.lock"
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ManifestError(f"another writer is writing {run_dir} (lock {self.path} held)") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _recover_locked(run: Path, subdir: str, manifest_name: str) -> str:
    live, mpath = run / subdir, run / manifest_name
    actions: list[str] = []
    if not live.exists():
        for old in sorted(run.glob(f".{subdir}.old-*")):
            if _ok_folder(old, manifest_name):
                os.rename(old, live)
                fsync_dir(run)
                actions.append(f"moved {old.name} back to {subdir}")
                break
    inner = live / manifest_name
    consistent = (mpath.is_file() and inner.is_file()
                  and mpath.read_bytes() == inner.read_bytes() and _ok(mpath, full=False))
    if not consistent and not (mpath.is_file() and _ok(mpath, full=True)):
        if live.is_dir() and _ok(inner, full=True):
            atomic_write_bytes(mpath, inner.read_bytes())
            actions.append(f"published {subdir}/{manifest_name}")
        else:
            for withdrawn in sorted(run.glob(f".{manifest_name}.old-*")):
                if _ok(withdrawn, root=run, full=True):
                    os.replace(withdrawn, mpath)
                    fsync_dir(run)
                    actions.append(f"restored {withdrawn.name}")
                    break
            else:
                if mpath.exists():
                    logger.warning("%s does not verify and no complete generation was found",
                                   mpath)
                    actions.append("invalid")
    stale_dirs = list(run.glob(f".{subdir}.tmp-*"))
    stale_files = list(run.glob(f"{TMP_PREFIX}{manifest_name}.*"))
    if manifest_name == "manifest.json":
        stale_files += run.glob(f"{TMP_PREFIX}{CARD_NAME}.*")
    if live.is_dir():  # never delete the last copy of a generation while nothing is live
        stale_dirs += run.glob(f".{subdir}.old-*")
        stale_files += run.glob(f".{manifest_name}.old-*")
        remove_stale_temps(live)
    for stale in stale_dirs:
        shutil.rmtree(stale, ignore_errors=True)
    for stale in stale_files:
        with contextlib.suppress(OSError):
            stale.unlink()
    if manifest_name == "manifest.json" and mpath.is_file():
        with contextlib.suppress(ManifestError, OSError, ValueError, KeyError):
            _write_card(run, subdir, _load(mpath)["format"])
    if actions:
        logger.warning("repaired %s after an interrupted write: %s", run, "; ".join(actions))
    return "; ".join(actions) or "ok"


def _ok_folder(folder: Path, manifest_name: str) -> bool:
    """Does a moved-aside generation folder verify against its own manifest?"""
    try:
        manifest = _load(folder / manifest_name)
        moved = dict(manifest, shards=[dict(s, path=Path(s["path"]).name)
                                       for s in manifest["shards"]])
        _check(folder / manifest_name, moved, folder, full=True)
        return True
    except (ManifestError, OSError, ValueError, KeyError, TypeError):
        return False


def recover(run_dir: str | os.PathLike, *, subdir: str = "selection",
            manifest_name: str = "manifest.json") -> str:
    """Repair a run directory after an interrupted write; return what was done ("ok" if nothing)."""
    run = Path(run_dir)
    if not run.is_dir():
        return "ok"
    lock = _Lock(run, manifest_name)
    try:
        return _recover_locked(run, subdir, manifest_name)
    finally:
        lock.release()


# ---------------------------------------------------------------- writing

class _HashingSink:
    """A write-only file for pyarrow that hashes and counts what goes through it."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        n = self._fh.write(data)
        self.sha.update(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._fh.close()


def _single_name(value: str, what: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith("."):
        raise ValueError(f"{what} must be a plain file/folder name, got {value!r}")
    return value


class ShardWriter:
    """Write selected rows as shards of ``run_dir/<subdir>`` and publish a manifest atomically.

    ``schema`` is the output schema (normally ``selection_schema(pool_schema)``); every batch is
    checked against it. Use as a context manager: on an exception nothing new becomes visible and
    the previous manifest and shards stay as they were.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: ShardConfig, *, schema: pa.Schema,
                 seed: int, config_hash: str, extra: dict | None = None,
                 subdir: str = "selection", manifest_name: str = "manifest.json") -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.schema = schema
        self.subdir = _single_name(subdir, "subdir")
        self.manifest_name = _single_name(manifest_name, "manifest_name")
        self._meta = {"seed": int(seed), "config_hash": str(config_hash),
                      "extra": json.loads(canonical_json(extra or {}))}  # fails early if not JSON
        self._ext = _EXT[cfg.format]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.run_dir, self.manifest_name)
        try:
            _recover_locked(self.run_dir, self.subdir, self.manifest_name)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.subdir}.tmp-", dir=self.run_dir))
        except BaseException:
            self._lock.release()
            raise
        self._shards: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._shard_rows = 0
        self._shard_bytes = 0
        self._open: tuple[Any, Any, _HashingSink, str] | None = None  # (cm, writer, sink, name)
        self._state = "open"
        self._manifest: dict | None = None

    # -- public API
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        """Append rows; shards are cut at ``max_rows`` / ``max_bytes``."""
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.run_dir} is {self._state}")
        table = conform(data, self.schema)  # a bad batch leaves the writer usable
        try:
            self._append(table)
        except BaseException:
            self.abort()
            raise

    def close(self) -> dict:
        """Finish the last shard, publish the manifest and return it."""
        if self._state == "closed":
            return self._manifest  # type: ignore[return-value]
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.run_dir} is {self._state}")
        try:
            self._finish_shard()
            if not self._shards:  # an empty selection still has its schema on disk
                self._open_shard()
                self._finish_shard()
            manifest = self._build_manifest()
            atomic_write_json(self._tmp / self.manifest_name, manifest)
            fsync_dir(self._tmp)
            self._commit(manifest)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._manifest = manifest
        self._lock.release()
        logger.info("wrote %d rows in %d %s shard(s) to %s", manifest["total_rows"],
                    len(self._shards), self.cfg.format, self.run_dir / self.subdir)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; the run directory keeps its previous state."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._open is not None:
            cm, writer, sink, _ = self._open
            self._open = None
            with contextlib.suppress(Exception):
                writer.close()
            sink.close()
            with contextlib.suppress(Exception):
                cm.__exit__(OSError, OSError("aborted"), None)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._lock.release()

    # -- internals
    def _append(self, table: pa.Table) -> None:
        cfg = self.cfg
        off, n = 0, table.num_rows
        while off < n:
            rest = table.slice(off)
            k = min(n - off, cfg.batch_rows - self._pending_rows)
            if cfg.max_rows is not None:
                k = min(k, cfg.max_rows - self._shard_rows)
            if cfg.max_bytes is not None:
                k = _fit(rest, k, cfg.max_bytes - self._shard_bytes)
                if k == 0:
                    if self._shard_rows:
                        self._finish_shard()
                        continue
                    k = 1  # a single row larger than max_bytes: alone in its own shard
            piece = rest.slice(0, k)
            nbytes = piece.nbytes
            self._pending.append(piece)
            self._pending_rows += k
            self._pending_bytes += nbytes
            self._shard_rows += k
            self._shard_bytes += nbytes
            off += k
            if self._pending_rows >= cfg.batch_rows or self._pending_bytes >= _BATCH_BYTES:
                self._flush_batch()
            if ((cfg.max_rows is not None and self._shard_rows >= cfg.max_rows)
                    or (cfg.max_bytes is not None and self._shard_bytes >= cfg.max_bytes)):
                self._finish_shard()

    def _open_shard(self) -> None:
        name = f"part-{len(self._shards):05d}.{self._ext}"
        cm = atomic_path(self._tmp / name)
        tmp = cm.__enter__()
        sink = _HashingSink(tmp)
        try:
            out = pa.PythonFile(sink, mode="w")
            codec = None if self.cfg.compression == "none" else self.cfg.compression
            if self.cfg.format == "arrow":
                writer = ipc.new_file(out, self.schema,
                                      options=ipc.IpcWriteOptions(compression=codec))
            else:
                writer = pq.ParquetWriter(out, self.schema, compression=codec or "none")
        except BaseException as exc:
            sink.close()
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._open = (cm, writer, sink, name)

    def _flush_batch(self) -> None:
        if not self._pending:
            return
        if self._open is None:
            self._open_shard()
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        assert self._open is not None
        writer = self._open[1]
        if self.cfg.format == "arrow":
            writer.write_table(table)
        else:
            writer.write_table(table, row_group_size=table.num_rows)

    def _finish_shard(self) -> None:
        self._flush_batch()
        if self._open is None:
            return
        cm, writer, sink, name = self._open
        self._open = None
        try:
            writer.close()
            sink.close()
        except BaseException as exc:
            sink.close()
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        cm.__exit__(None, None, None)  # fsync, rename into place, fsync folder
        self._shards.append({"path": f"{self.subdir}/{name}", "rows": self._shard_rows,
                             "bytes": sink.size, "sha256": sink.sha.hexdigest()})
        faults.point("shards.shard")
        self._shard_rows = self._shard_bytes = 0

    def _build_manifest(self) -> dict:
        return {
            "manifest_version": MANIFEST_VERSION,
            "format": self.cfg.format,
            "compression": self.cfg.compression,
            "subdir": self.subdir,
            "shards": self._shards,
            "total_rows": sum(s["rows"] for s in self._shards),
            "total_bytes": sum(s["bytes"] for s in self._shards),
            "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                       for f in self.schema],
            "shard_config": self.cfg.model_dump(),
            "quadsel_version": __version__,
            **self._meta,
        }

    def _commit(self, manifest: dict) -> None:
        run = self.run_dir
        live, mpath = run / self.subdir, run / self.manifest_name
        token = self._tmp.name.rsplit("tmp-", 1)[-1]
        old = run / f".{self.subdir}.old-{token}"
        withdrawn = run / f".{self.manifest_name}.old-{token}"
        done: list[str] = []
        try:
            with atomic_path(mpath) as staged:          # step 2 (published at the with's exit)
                staged.write_bytes((canonical_json(manifest) + "\n").encode("utf-8"))
                if mpath.exists():                      # step 3
                    os.rename(mpath, withdrawn)
                    done.append("withdraw")
                    fsync_dir(run)
                    faults.point("shards.withdrawn")
                if live.exists():                       # step 4
                    os.rename(live, old)
                    done.append("set-aside")
                os.rename(self._tmp, live)
                done.append("install")
                fsync_dir(run)
                faults.point("shards.installed")
            # step 5 happened when the with-block exited: os.replace(staged, manifest.json)
        except BaseException:
            self._rollback(done, live, old, mpath, withdrawn)
            raise
        if self.manifest_name == "manifest.json":       # the dataset card, if it changed
            _write_card(run, self.subdir, self.cfg.format)
        shutil.rmtree(old, ignore_errors=True)          # step 6
        with contextlib.suppress(OSError):
            withdrawn.unlink()

    def _rollback(self, done: list[str], live: Path, old: Path, mpath: Path,
                  withdrawn: Path) -> None:
        undo = {"install": (live, self._tmp), "set-aside": (old, live),
                "withdraw": (withdrawn, mpath)}
        for step in reversed(done):
            src, dst = undo[step]
            try:
                os.rename(src, dst)
            except OSError as exc:  # the next writer's recover() finishes the job
                logger.error("could not undo %s (%s -> %s): %s", step, src, dst, exc)
                return
        fsync_dir(self.run_dir)


def _fit(table: pa.Table, k: int, room: int) -> int:
    """The largest j <= k with table.slice(0, j).nbytes <= room (0 if not even one row fits)."""
    if room <= 0:
        return 0
    if table.slice(0, k).nbytes <= room:
        return k
    lo, hi = 0, k  # invariant: fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table.slice(0, mid).nbytes <= room:
            lo = mid
        else:
            hi = mid
    return lo
