"""Repair: a writer killed at any point leaves a state mapped back to a valid one (see the package docstring)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from quadsel.core.atomic import (
    TMP_PREFIX,
    atomic_write_bytes,
    fsync_dir,
    remove_stale_temps,
)
from quadsel.core.errors import ManifestError

from ..lock import FileLock
from .manifest import _check, _load, _ok, _write_card
from .schema import CARD_NAME

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- repair

def _lock(run_dir: Path, manifest_name: str) -> FileLock:
    """The writer's lock on ``RUN/.<manifest>.lock`` (acquired)."""
    return FileLock(run_dir / f".{manifest_name}.lock", lambda pid: ManifestError(
        f"another writer is writing {run_dir} (pid {pid} holds {run_dir / f'.{manifest_name}.lock'})")).acquire()


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
            _write_card(run, subdir, _load(mpath))
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
    lock = _lock(run, manifest_name)
    try:
        return _recover_locked(run, subdir, manifest_name)
    finally:
        lock.release()
