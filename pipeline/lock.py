"""The one inter-process lock: an exclusive, non-blocking ``flock`` on a file.

The lock is held for as long as its descriptor is open, so a killed process releases it at
once (no stale lock to clean up) and a second holder refuses clearly, naming the pid that holds
it. :class:`RunLock` is one run per run directory (``RUN_DIR/.lock``); the shard writer locks its
manifest with the same class (:mod:`quadsel.pipeline.shards`).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

from quadsel.core.errors import RunLockedError


class FileLock:
    """``with FileLock(path, busy): ...``; ``busy(holder_pid)`` builds the error raised when
    another process holds the lock."""

    def __init__(self, path: str | Path, busy: Callable[[str], Exception]) -> None:
        self.path = Path(path)
        self._busy = busy
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise self._busy(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(FileLock):
    """One run per run directory: ``RUN_DIR/.lock``."""

    def __init__(self, run_dir: str | Path) -> None:
        where = Path(run_dir)
        super().__init__(where / ".lock", lambda pid: RunLockedError(
            f"{where.resolve()} is in use by another quadsel run (pid {pid}); wait for it to finish or "
            "choose another run_dir"))
