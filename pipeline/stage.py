"""Cached, atomic pipeline stages inside a run directory.

A stage writes into ``stages/<name>.tmp-*`` and is renamed to ``stages/<name>`` when it has
finished, with ``_DONE.json`` holding its cache key. A rerun whose key matches skips the stage;
a different key (config changed) or a missing marker (killed mid-way) recomputes it. A killed
stage therefore never leaves a half-written ``stages/<name>`` behind.

The marker also lists every file of the stage with its size and sha256, taken at commit: a file
that was truncated, bit-flipped, edited or removed since makes the stage not done (logged, naming
the file), so it is recomputed from the stage before it instead of being trusted.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import faults
from .atomic import atomic_write_json, fsync_dir, read_json, sha256_file

DONE = "_DONE.json"
logger = logging.getLogger(__name__)


def file_sums(root: Path) -> dict[str, list[Any]]:
    """``{relative path: [bytes, sha256]}`` of every file under ``root`` but the marker."""
    return {f.relative_to(root).as_posix(): [f.stat().st_size, sha256_file(f)]
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != DONE}


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


class Stage:
    def __init__(self, run_dir: str | Path, name: str, key: str) -> None:
        self.root = Path(run_dir) / "stages"
        self.name = name
        self.key = key
        self.path = self.root / name

    def is_done(self) -> bool:
        marker = self.path / DONE
        if not marker.is_file():
            return False
        try:
            done = read_json(marker)
            if not isinstance(done, dict) or done.get("key") != self.key:
                return False
        except (OSError, ValueError):
            logger.warning("%s: unreadable stage marker; recomputing stage %r", marker, self.name)
            return False
        sums = done.get("files")
        if isinstance(sums, dict):
            why = damaged_file(self.path, sums)
            if why:
                logger.warning("stage %r is damaged (%s); recomputing it", self.name, why)
                return False
        return True

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
        atomic_write_json(tmp / DONE, {"key": self.key, "stage": self.name, "info": info or {},
                                       "files": file_sums(tmp)})
        faults.point(f"stage.commit.{self.name}")
        if self.path.exists():
            old = self.root / f"{self.name}.old-{tmp.name[-8:]}"
            self.path.rename(old)
            faults.point(f"stage.swap.{self.name}")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(self.path)
        fsync_dir(self.root)
