"""Reading a published selection (never modifies a run directory) and its dataset card."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from quadsel.core.atomic import (
    atomic_write_text,
    sha256_file,
)
from quadsel.core.errors import ManifestError

from .schema import _EXT, CARD_NAME

logger = logging.getLogger(__name__)

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

def card_generation(manifest: dict) -> str:
    """What names the selection in its dataset card: a digest of its shards' checksums."""
    digest = hashlib.sha256("\n".join(str(s.get("sha256")) for s in manifest.get("shards", [])).encode())
    return digest.hexdigest()[:12]


def dataset_card(fmt: str, subdir: str = "selection", generation: str = "default") -> str:
    """``RUN/README.md``: a Hugging Face dataset card whose ``configs:`` make
    ``datasets.load_dataset(RUN, split="train")`` read exactly the selection's shards.

    The config is named after the selection's content (``generation``, see
    :func:`card_generation`): ``datasets`` caches a folder's table and features under its name and
    config, not its path, so two run directories of the same name (``runs/a/run``,
    ``runs/b/run``), or one run directory after a new selection, would otherwise be read from
    the cache of the other."""
    pattern = f"{subdir}/part-*.{_EXT[fmt]}"
    name = generation if generation == "default" else f"selection-{generation}"
    return f"""---
configs:
- config_name: {name}
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


def _write_card(run: Path, subdir: str, manifest: dict) -> bool:
    """Write ``RUN/README.md`` for the published ``manifest`` unless it is already there; never raises."""
    path, text = run / CARD_NAME, dataset_card(manifest["format"], subdir, card_generation(manifest))
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
        atomic_write_text(path, text)
        return True
    except OSError as exc:  # derived data: the next writer or recover() writes it
        logger.warning("could not write the dataset card %s: %s", path, exc)
        return False
