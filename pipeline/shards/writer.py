"""The crash-safe writer: a new generation of shards, then the commit protocol of the package docstring."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from quadsel import __version__
from quadsel.core import faults
from quadsel.core.atomic import (
    atomic_path,
    atomic_write_json,
    canonical_json,
    fsync_dir,
)

from .manifest import _write_card
from .repair import _lock, _recover_locked
from .schema import _BATCH_BYTES, _EXT, MANIFEST_VERSION, ShardConfig, conform

logger = logging.getLogger(__name__)

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
        self._lock = _lock(self.run_dir, self.manifest_name)
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
            _write_card(run, self.subdir, manifest)
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
