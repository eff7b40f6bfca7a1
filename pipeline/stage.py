"""Completion markers, and cached atomic pipeline stages built on them.

A *marker* is the one way quadsel records that some piece of work finished: a JSON file
written atomically after the work's files, holding the work's cache ``key``, an ``info`` dict
and the size and sha256 of every file it covers (taken when it is written).
:func:`read_marker` accepts it only when the key matches and every file still matches its
checksum: a file truncated, bit-flipped, edited or removed since makes the work not done (logged,
naming the file), so it is recomputed instead of being trusted. Stages use one marker per stage
folder (``_DONE.json``); the feature stage one per feature shard (``part-NNNNN.done.json``).

A stage writes into ``stages/<name>.tmp-*`` and is renamed to ``stages/<name>`` when it has
finished, with its marker ``_DONE.json`` covering every file in it. A rerun whose key matches
skips the stage; a different key (config changed), a missing marker (killed mid-way) or a damaged
file recomputes it. A killed stage therefore never leaves a half-written ``stages/<name>``.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from quadsel.core import faults
from quadsel.core.atomic import atomic_write_json, fsync_dir, read_json, sha256_file

DONE = "_DONE.json"
logger = logging.getLogger(__name__)


def file_sums(root: Path, files: Iterable[str] | None = None) -> dict[str, list[Any]]:
    """``{relative path: [bytes, sha256]}`` of ``files`` under ``root`` (default: every file but
    stage markers)."""
    paths = (sorted(f for f in root.rglob("*") if f.is_file() and f.name != DONE) if files is None
             else [root / f for f in files])
    return {f.relative_to(root).as_posix(): [f.stat().st_size, sha256_file(f)] for f in paths}


def damaged_file(root: Path, sums: dict[str, list[Any]]) -> str | None:
    """Why the first file of ``root`` that differs from ``sums`` does (None if all match)."""
    for rel, (size, digest) in sums.items():
        f = root / rel
        try:
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size:,} bytes, {size:,} at commit"
            if sha256_file(f) != digest:
                return f"{f}: content changed since commit (checksum mismatch)"
        except OSError as e:
            return f"{f}: unreadable ({e.strerror or e})"
    return None


def write_marker(path: Path, key: Any, *, root: Path | None = None, files: Iterable[str] | None = None,
                 info: dict[str, Any] | None = None, **fields: Any) -> None:
    """Mark work done: ``path`` records ``key``, ``info`` and the checksums of ``files`` under
    ``root`` (default: the marker's folder; ``files`` default: all of it)."""
    root = path.parent if root is None else root
    atomic_write_json(path, {"key": key, **fields, "info": info or {}, "files": file_sums(root, files)})


def read_marker(path: Path, key: Any, *, root: Path | None = None, what: str = "") -> dict[str, Any] | None:
    """The marker at ``path`` if it is there, holds ``key`` and every file it covers matches;
    None otherwise (a damaged file or an unreadable marker is logged, naming it)."""
    root = path.parent if root is None else root
    what = what or str(path.parent)
    if not path.is_file():
        return None
    try:
        done = read_json(path)
    except (OSError, ValueError):
        logger.warning("%s: unreadable completion marker; recomputing %s", path, what)
        return None
    if not isinstance(done, dict) or done.get("key") != key:
        return None
    sums = done.get("files")
    if not isinstance(sums, dict):
        logger.warning("%s: completion marker without checksums; recomputing %s", path, what)
        return None
    why = damaged_file(root, sums)
    if why:
        logger.warning("%s is damaged (%s); recomputing it", what, why)
        return None
    return done


class Stage:
    def __init__(self, run_dir: str | Path, name: str, key: str) -> None:
        self.root = Path(run_dir) / "stages"
        self.name = name
        self.key = key
        self.path = self.root / name

    def is_done(self) -> bool:
        return read_marker(self.path / DONE, self.key, what=f"stage {self.name!r}") is not None

    def info(self) -> dict[str, Any]:
        return read_json(self.path / DONE).get("info", {})

    @contextlib.contextmanager
    def building(self) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success it becomes the stage's folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in [*self.root.glob(f"{self.name}.tmp-*"), *self.root.glob(f"{self.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed in building / commit
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}.tmp-", dir=self.root))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, tmp: Path, info: dict[str, Any] | None = None) -> None:
        """Mark ``tmp`` done and move it into place (replacing an outdated stage folder)."""
        write_marker(tmp / DONE, self.key, stage=self.name, info=info)
        faults.point(f"stage.commit.{self.name}")
        if self.path.exists():
            old = self.root / f"{self.name}.old-{tmp.name[-8:]}"
            self.path.rename(old)
            faults.point(f"stage.swap.{self.name}")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(self.path)
        fsync_dir(self.root)
