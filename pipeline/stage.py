"""Cached, atomic pipeline stages inside a run directory.

A stage writes into ``stages/<name>.tmp-*`` and is renamed to ``stages/<name>`` when it has
finished, with ``_DONE.json`` holding its cache key. A rerun whose key matches skips the stage;
a different key (config changed) or a missing marker (killed mid-way) recomputes it. A killed
stage therefore never leaves a half-written ``stages/<name>`` behind.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import faults
from .atomic import atomic_write_json, fsync_dir, read_json

DONE = "_DONE.json"


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
            return read_json(marker).get("key") == self.key
        except (OSError, ValueError):
            return False

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
        atomic_write_json(tmp / DONE, {"key": self.key, "stage": self.name, "info": info or {}})
        faults.point(f"stage.commit.{self.name}")
        if self.path.exists():
            old = self.root / f"{self.name}.old-{tmp.name[-8:]}"
            self.path.rename(old)
            faults.point(f"stage.swap.{self.name}")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(self.path)
        fsync_dir(self.root)
