"""Paths: files, folders (walked without following loops), globs and ``datasets`` folders -> the files to read."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from quadsel.core.errors import SourceError

from .config import ARROW_EXTS, JSONL_EXTS, PARQUET_EXTS, SourceConfig

logger = logging.getLogger(__name__)

_EXTS = {"jsonl": JSONL_EXTS + (".json",), "parquet": PARQUET_EXTS, "arrow": ARROW_EXTS}
_HF_META = {"state.json", "dataset_info.json", "dataset_dict.json"}
_GLOB_CHARS = re.compile(r"[*?\[]")

# ----------------------------------------------------------------------------- paths

def _kind(path: Path, fmt: str, explicit: bool) -> str | None:
    """The reader for ``path`` ("jsonl" / "parquet" / "arrow"), None to skip it in a folder."""
    want = "arrow" if fmt == "hf" else fmt
    name = path.name.lower()
    if want != "auto":
        return want if explicit or name.endswith(_EXTS[want]) else None
    for kind in ("jsonl", "parquet", "arrow"):
        exts = JSONL_EXTS if kind == "jsonl" else _EXTS[kind]
        if name.endswith(exts):
            return kind
    if explicit:
        raise SourceError(
            f"{path}: unsupported file type {''.join(path.suffixes) or '(no extension)'!r}; "
            f"supported: {', '.join(JSONL_EXTS + PARQUET_EXTS + ARROW_EXTS)} "
            "(or set format: jsonl / parquet / arrow to read it anyway)"
        )
    return None


def _is_hf_dir(d: Path) -> bool:
    return ((d / "state.json").is_file() or (d / "dataset_info.json").is_file()) and any(
        d.glob("data-*.arrow"))


def _dataset_dict_split(d: Path, split: str | None) -> Path | None:
    """The split folder of a DatasetDict folder ``d`` (None if ``d`` is not one)."""
    meta = d / "dataset_dict.json"
    if not meta.is_file():
        return None
    try:
        splits = [str(x) for x in json.loads(meta.read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{meta}: unreadable datasets DatasetDict index ({e})") from e
    if split is None:
        if len(splits) != 1:
            raise SourceError(f"{d}: a datasets DatasetDict with splits {splits}; set pool.split "
                              "(or reference.split) to the one to read")
        split = splits[0]
    if split not in splits:
        raise SourceError(f"{d}: no split {split!r} in this DatasetDict (splits: {', '.join(splits)})")
    sd = d / split
    if not _is_hf_dir(sd):
        raise SourceError(f"{sd}: split {split!r} is listed in dataset_dict.json but holds no data-*.arrow")
    return sd


def _hf_files(d: Path) -> list[Path]:
    """A ``save_to_disk`` folder's data files, in the order its state.json lists them."""
    try:
        state = json.loads((d / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(d.glob("data-*.arrow"))
    files = [d / n for n in names]
    for f in files:
        if not f.is_file():
            raise SourceError(f"{d}: state.json lists {f.name}, which is missing")
    return files


def _excluded(p: Path, exclude: tuple[Path, ...]) -> bool:
    """``p`` is one of ``exclude`` (real paths) or inside one."""
    if not exclude:
        return False
    rp = Path(os.path.realpath(p))
    return any(rp == e or e in rp.parents for e in exclude)


def _walk_dirs(root: Path, exclude: tuple[Path, ...]) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk that follows symlinked folders but never loops (each real folder is read once),
    skips hidden folders and the ``exclude`` folders (the run directory), and names a folder it
    cannot read. Folders and names come sorted."""
    seen: set[str] = set()

    def unreadable(e: OSError) -> None:
        raise SourceError(f"cannot read folder {e.filename}: {e.strerror or e}") from e

    for here, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        seen.add(os.path.realpath(here))
        keep = []
        for x in sorted(dirs):
            sub = Path(here) / x
            if x.startswith("."):
                continue
            if _excluded(sub, exclude):
                logger.warning("%s: skipped (it is the run directory, or inside it)", sub)
            elif os.path.realpath(sub) in seen:
                logger.warning("%s: skipped, a symlink to a folder already read (%s): a loop or a second link",
                               sub, os.path.realpath(sub))
            else:
                seen.add(os.path.realpath(sub))
                keep.append(x)
        dirs[:] = keep
        yield Path(here), dirs, sorted(names)


def _walk(root: Path, fmt: str, allow_empty: bool = False, split: str | None = None,
          exclude: tuple[Path, ...] = ()) -> list[tuple[Path, str]]:
    if fmt in ("auto", "arrow", "hf"):
        sd = _dataset_dict_split(root, split)
        if sd is not None:
            return [(f, "arrow") for f in _hf_files(sd)]
        if _is_hf_dir(root):
            return [(f, "arrow") for f in _hf_files(root)]

    groups: list[tuple[tuple[str, ...], list[tuple[Path, str]]]] = []
    skipped: list[str] = []
    for d, dirs, names in _walk_dirs(root, exclude):
        if d != root and fmt in ("auto", "arrow", "hf"):
            sd = _dataset_dict_split(d, split)
            if sd is not None or _is_hf_dir(d):
                groups.append((d.relative_to(root).parts, [(f, "arrow") for f in _hf_files(sd or d)]))
                dirs[:] = []
                continue
        for n in names:
            if n.startswith(".") or n in _HF_META:
                continue
            f = d / n
            if _excluded(f, exclude):
                continue
            kind = _kind(f, fmt, explicit=False)
            if kind is None:
                skipped.append(str(f.relative_to(root)))
                continue
            if not f.exists():  # a dangling symlink: the data it pointed at is gone
                raise SourceError(f"{f}: a symlink to {os.readlink(f)!r}, which does not exist")
            if f.is_file():
                groups.append((f.relative_to(root).parts, [(f, kind)]))
    if skipped:
        logger.warning("%s: %d file(s) skipped, not a supported data file: %s%s", root, len(skipped),
                       ", ".join(skipped[:10]), " …" if len(skipped) > 10 else "")
    out = [item for _, g in sorted(groups, key=lambda t: t[0]) for item in g]
    if not out and not allow_empty:
        raise SourceError(
            f"{root}: no supported data files in this folder (looked recursively for "
            f"{', '.join(JSONL_EXTS + PARQUET_EXTS + ARROW_EXTS)} and datasets save_to_disk folders)"
        )
    return out


def _glob(spec: str, exclude: tuple[Path, ...]) -> list[str]:
    """glob.glob, but a ``**`` walk follows symlinked folders without looping (glob's own walk
    follows symlink loops for ever)."""
    if "**" not in spec:
        return sorted(glob.glob(spec, recursive=True))
    parts = Path(spec).parts
    i = next(k for k, part in enumerate(parts) if _GLOB_CHARS.search(part))
    root = Path(*parts[:i]) if i else Path(".")
    if not root.is_dir():
        return []
    rx = re.compile(_translate(parts[i:]))
    out = []
    for d, dirs, names in _walk_dirs(root, exclude):
        rel = d.relative_to(root)
        for n in [*dirs, *names]:
            if n.startswith("."):
                continue
            r = (rel / n).as_posix()
            if rx.fullmatch(r):
                out.append(str(root / r) if i else r)
    return sorted(out)


def _translate(parts: tuple[str, ...]) -> str:
    """A regex over '/'-joined relative paths for glob segments; ``**`` is any number of folders."""
    out = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, seg = 0, []
        while j < len(part):
            c = part[j]
            if c == "*":
                seg.append("[^/]*")
            elif c == "?":
                seg.append("[^/]")
            elif c == "[" and "]" in part[j + 1:]:
                end = part.index("]", j + 2 if part[j + 1:j + 2] in ("!", "]") else j + 1)
                body = part[j + 1:end]
                seg.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
                j = end
            else:
                seg.append(re.escape(c))
            j += 1
        out.append("".join(seg) + ("" if last else "/"))
    return "".join(out)


def _expand(spec: str, fmt: str, split: str | None = None, exclude: tuple[Path, ...] = ()) -> list[tuple[Path, str]]:
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        return [(p, _kind(p, fmt, explicit=True))]  # type: ignore[list-item]
    if p.is_dir():
        return _walk(p, fmt, split=split, exclude=exclude)
    if _GLOB_CHARS.search(spec):
        matches = _glob(os.path.expanduser(spec), exclude)
        if not matches:
            raise SourceError(f"no file matches {spec!r}")
        out: list[tuple[Path, str]] = []
        for m in map(Path, matches):
            if _excluded(m, exclude):
                continue
            if m.is_dir():
                out += _walk(m, fmt, allow_empty=True, split=split, exclude=exclude)
            elif (kind := _kind(m, fmt, explicit=False)) is not None:
                if not m.exists():
                    raise SourceError(f"{m}: a symlink to {os.readlink(m)!r}, which does not exist")
                out.append((m, kind))
        if not out:
            raise SourceError(f"{spec!r} matches {len(matches)} path(s) but no supported data file")
        return out
    if os.path.islink(p):
        raise SourceError(f"{p}: a symlink to {os.readlink(p)!r}, which does not exist")
    if p.exists():
        raise SourceError(f"{p}: not a regular file or folder")
    raise SourceError(f"{p}: no such file or folder")


def _plan(path: str | os.PathLike | Iterable[str | os.PathLike], fmt: str = "auto", split: str | None = None,
          exclude: Iterable[str | os.PathLike] = ()) -> list[tuple[Path, str]]:
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise SourceError("no input path given")
    ex = tuple(Path(os.path.realpath(os.path.expanduser(os.fspath(e)))) for e in exclude)
    out, seen = [], set()
    for item in items:
        for p, kind in _expand(os.fspath(item), fmt, split, ex):
            key = os.path.realpath(p)
            if key not in seen:  # the same file named twice is read once
                seen.add(key)
                out.append((p, kind))
    return out


def resolve_paths(path: "str | list[str] | SourceConfig", format: str = "auto", *, split: str | None = None,
                  exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The data files ``path`` names, in reading order (raises SourceError if none).

    Given a SourceConfig, its own path, format and split are used. Nothing inside an ``exclude``
    folder (the run directory) is ever part of the input.
    """
    if isinstance(path, SourceConfig):
        path, format, split = path.path, path.format, path.split
    return [p for p, _ in _plan(path, format, split, exclude)]
