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
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import faults

logger = logging.getLogger(__name__)

JSONL_EXTS = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_EXTS = (".parquet", ".pq")
ARROW_EXTS = (".arrow", ".feather", ".ipc")
_EXTS = {"jsonl": JSONL_EXTS + (".json",), "parquet": PARQUET_EXTS, "arrow": ARROW_EXTS}
REJECT_REASONS = (
    "empty_text", "whitespace_text", "non_string_text", "null_text", "missing_text_field",
    "invalid_utf8", "malformed_json", "not_an_object", "overlong_text", "duplicate_id", "bad_id",
)
_HF_META = {"state.json", "dataset_info.json", "dataset_dict.json"}
RESERVED_PREFIX = "quadsel_"  # columns quadsel adds to a selection; an input's own are renamed
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_WHOLE_FILE_JSON_LIMIT = 2 * 2**30
_GLOB_CHARS = re.compile(r"[*?\[]")
_MISSING = object()
_BAD_UTF8 = object()
_BOM = b"\xef\xbb\xbf"
# characters that show nothing (zero-width, joiners, BOM, word joiner, Mongolian vowel separator):
# a text of only these and whitespace is blank
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad"
_BLANK = _INVISIBLE + "".join(chr(c) for c in range(0x3001) if chr(c).isspace())


def _no_constant(_name: str) -> None:
    return None  # NaN / Infinity literals in JSONL become null (JSON has no such values)


# strict=False: raw control characters (tabs, newlines) inside strings are accepted
_DECODER = json.JSONDecoder(strict=False, parse_constant=_no_constant)
_SCAN = _DECODER.scan_once


def _loads(s: str) -> Any:
    """json.loads for one line: the C scanner directly, json's own decode (and its error
    messages) for anything unusual (leading whitespace, trailing garbage, errors)."""
    try:
        obj, end = _SCAN(s, 0)
    except (StopIteration, ValueError):
        return _DECODER.decode(s)
    if end != len(s) and not s[end:].isspace():
        return _DECODER.decode(s)
    return obj


class SourceError(ValueError):
    """A problem with an input file the user can fix; the message names the file."""


class SourceConfig(BaseModel):
    """Where a pool comes from and how its rows are validated."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str]
    format: Literal["auto", "jsonl", "parquet", "arrow", "hf"] = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    max_chars: int = Field(100_000, gt=0)
    overlong: Literal["truncate", "reject"] = "truncate"
    batch_size: int = Field(1024, gt=0)
    split: str | None = Field(None, description="the split of a datasets DatasetDict folder "
                              "(save_to_disk of several splits); needed when it has more than one")

    @field_validator("path")
    @classmethod
    def _path_given(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not str(p).strip() for p in items):
            raise ValueError("path must be a non-empty file, folder or glob (or a list of them)")
        return v

    @field_validator("text_field", "id_field")
    @classmethod
    def _field_given(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("field name must not be empty (use null for id_field: content-hash ids)")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "SourceConfig":
        if self.id_field == self.text_field:
            raise ValueError(f"id_field and text_field are both {self.text_field!r}")
        return self


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    text: str
    meta: dict[str, Any]
    source: str
    line: int


def content_id(text: str) -> str:
    """The id of a row without one: ``"h"`` + the first 16 hex digits of sha1(text)."""
    return "h" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RejectLog:
    """Counts bad rows and writes one JSON line per row to ``path`` (None: count only).

    ``counts`` / ``total`` cover rejected rows; ``truncated`` counts kept rows whose text was
    cut to ``max_chars`` (they are written too, with reason ``"truncated"``). ``by_file``
    holds both per input file. The file is written as rows arrive (a run stage makes the
    folder atomic), created empty when nothing is rejected.
    """

    def __init__(self, path: str | Path | None, *, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: dict[str, int] = {}
        self.truncated = 0
        self.by_file: dict[str, Counter[str]] = {}
        self.rows: dict[str, int] = {}  # rows kept per input file, in reading order
        self._fh: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a" if append else "w", encoding="utf-8",
                            errors="backslashreplace")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _write(self, file: str, line: int, reason: str, detail: str, id: str | None) -> None:
        self.by_file.setdefault(file, Counter())[reason] += 1
        if self._fh is not None:
            rec = {"file": file, "line": line, "reason": reason, "detail": detail[:500], "id": id}
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def reject(self, file: str, line: int, reason: str, detail: str = "", id: str | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._write(file, line, reason, detail, id)

    def truncate(self, file: str, line: int, detail: str = "", id: str | None = None) -> None:
        self.truncated += 1
        self._write(file, line, "truncated", detail, id)

    def files(self) -> list[dict[str, Any]]:
        """Per input file: rows kept, rows rejected, rows truncated (every file read, in order)."""
        out = []
        for f in dict.fromkeys([*self.rows, *self.by_file]):
            c = self.by_file.get(f, Counter())
            out.append({"file": f, "rows": self.rows.get(f, 0),
                        "rejected": sum(n for r, n in c.items() if r != "truncated"),
                        "truncated": c.get("truncated", 0)})
        return out

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "truncated": self.truncated, "path": str(self.path) if self.path else None,
                "files": self.files()}

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


# ----------------------------------------------------------------------------- rows

def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    r = repr(v)
    return f"{type(v).__name__} {r[:60]}"


def _jsonable(v: Any) -> Any:
    """A JSON-compatible copy of a value pyarrow produced (dates, bytes, decimals, maps …)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return str(v)
    return str(v)


def _values(arr: pa.Array | pa.ChunkedArray, *, raw: bool = False) -> list[Any]:
    """Python values of a column, JSON-compatible unless ``raw`` (text and id columns).

    Invalid UTF-8 becomes _BAD_UTF8 when ``raw``, else a lossy string.
    """
    try:
        vals = arr.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        vals = []
        for i in range(len(arr)):
            try:
                vals.append(arr[i].as_py())
            except (UnicodeDecodeError, pa.ArrowException):
                raw = arr.slice(i, 1).cast(pa.large_binary())[0].as_py()
                vals.append(_BAD_UTF8 if raw else raw.decode("utf-8", "replace"))
    if raw:
        return vals
    t = arr.type
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_boolean(t) or pa.types.is_null(t)):
        return vals
    return [_jsonable(v) for v in vals]


class _Validator:
    """Turns raw rows into Examples or rejects; holds the duplicate-id filter of one read."""

    def __init__(self, cfg: SourceConfig, rejects: RejectLog) -> None:
        self.cfg = cfg
        self.rejects = rejects
        self.max_chars = cfg.max_chars
        self._seen: set[int] = set()
        self._renamed: set[str] = set()

    def rename_reserved(self, file: str, names: Iterable[str]) -> dict[str, str]:
        """New names for the input's ``quadsel_*`` fields (reserved for the columns quadsel adds
        to its selection): ``prev_quadsel_*`` (``prev_prev_…`` if taken). Logged once per file."""
        names = list(names)
        taken = set(names)
        out: dict[str, str] = {}
        for n in names:
            if n.startswith(RESERVED_PREFIX) and n not in (self.cfg.text_field, self.cfg.id_field):
                new = "prev_" + n
                while new in taken:
                    new = "prev_" + new
                taken.add(new)
                out[n] = new
        if out and file not in self._renamed:
            self._renamed.add(file)
            logger.warning("%s: columns %s are reserved for quadsel's own; renamed to %s", file,
                           ", ".join(out), ", ".join(out.values()))
        return out

    def check(self, file: str, line: int, text: Any, raw_id: Any, meta: dict[str, Any]) -> Example | None:
        """An Example for a good row; None (and a reject) for a bad one."""
        if (type(text) is str and 0 < len(text) <= self.max_chars and not text.isspace()
                and text[0] not in _BLANK
                and (raw_id is _MISSING or (type(raw_id) is str and raw_id and not raw_id.isspace()))):
            return self._accept(file, line, text, text, None if raw_id is _MISSING else raw_id, meta)
        return self._check_slow(file, line, text, raw_id, meta)

    def _accept(self, file: str, line: int, text: str, kept: str, ident: str | None,
                meta: dict[str, Any]) -> Example | None:
        # hot path; kept short (and allocation-light) on purpose
        if ident is None:
            ident = content_id(text)
        key = int.from_bytes(hashlib.blake2b(ident.encode("utf-8", "surrogatepass"),
                                             digest_size=8).digest(), "little")
        if key in self._seen:
            self.rejects.reject(file, line, "duplicate_id", "an earlier row has this id (the first is kept)", ident)
            return None
        self._seen.add(key)
        if kept is not text:
            self.rejects.truncate(file, line, f"{len(text):,} chars cut to max_chars {self.max_chars:,}", ident)
        return Example(ident, kept, meta, file, line)

    def _check_slow(self, file: str, line: int, text: Any, raw_id: Any, meta: dict[str, Any]) -> Example | None:
        cfg, rej = self.cfg, self.rejects
        ident: str | None = None
        bad_id: str | None = None
        if raw_id is not _MISSING:
            if isinstance(raw_id, str):
                if raw_id.strip():
                    ident = raw_id
                else:
                    bad_id = "a blank string"
            elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
                ident = str(raw_id)
            else:
                bad_id = _describe(raw_id)
        field = cfg.text_field
        if text is _MISSING:
            fields = ", ".join(sorted(meta))[:200]
            rej.reject(file, line, "missing_text_field", f"no field {field!r} (fields: {fields or 'none'})", ident)
            return None
        if text is _BAD_UTF8:
            rej.reject(file, line, "invalid_utf8", f"field {field!r} is not valid UTF-8", ident)
            return None
        if text is None:
            rej.reject(file, line, "null_text", f"field {field!r} is null", ident)
            return None
        if not isinstance(text, str):
            rej.reject(file, line, "non_string_text", f"field {field!r} is {_describe(text)}, not a string", ident)
            return None
        if not text:
            rej.reject(file, line, "empty_text", f"field {field!r} is empty", ident)
            return None
        if bad_id is not None:
            rej.reject(file, line, "bad_id",
                       f"field {cfg.id_field!r} is {bad_id}; ids must be non-empty strings or integers")
            return None
        kept = text
        if len(text) > cfg.max_chars:
            if cfg.overlong == "reject":
                rej.reject(file, line, "overlong_text", f"{len(text):,} chars > max_chars {cfg.max_chars:,}", ident)
                return None
            kept = text[: cfg.max_chars]
        if kept.isspace() or not kept.strip(_BLANK):  # zero-width / invisible characters only
            rej.reject(file, line, "whitespace_text", f"field {field!r} is only whitespace", ident)
            return None
        return self._accept(file, line, text, kept, ident, meta)


# ----------------------------------------------------------------------------- readers

def _sniff(path: Path) -> bytes:
    """The first bytes of a file; turns unreadable files into SourceError."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except PermissionError as e:
        raise SourceError(f"cannot read {path}: permission denied") from e
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def _parse_json_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(object, None, "") for a good line; (None, reason, detail) for a bad one; (None, None, "")
    for a blank line."""
    try:
        obj = _loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"bad byte at offset {e.start}"
    except ValueError as e:
        if not raw.strip() or raw.strip() == _BOM:
            return None, None, ""
        if raw.startswith(_BOM):  # a BOM (first line, or files joined with cat)
            return _parse_json_line(raw[3:])
        return None, "malformed_json", str(e)[:200]
    except RecursionError:
        return None, "malformed_json", "nested too deeply"
    if type(obj) is not dict:
        return None, "not_an_object", f"a JSON {type(obj).__name__}, not an object"
    if b"\\ud" in raw or b"\\uD" in raw:  # lone surrogate escapes cannot be stored as UTF-8
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_utf8", "a \\uD800-\\uDFFF escape that is not a surrogate pair"
    return obj, None, ""


def _split_lines(fh: IO[bytes], sep: bytes) -> Iterator[bytes]:
    """Lines of a binary file split on ``sep`` (for files with CR-only line endings)."""
    rest = b""
    while True:
        block = fh.read(1 << 20)
        if not block:
            break
        parts = (rest + block).split(sep)
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _whole_file_json(path: Path, opener: Any, v: _Validator) -> Iterator[tuple[int, Any]]:
    """(element number, value) of a file holding one JSON array or several multi-line JSON
    values (pretty-printed, not one object per line); SourceError when it is neither."""
    size = path.stat().st_size
    if size > _WHOLE_FILE_JSON_LIMIT:
        raise SourceError(f"{path}: a multi-line JSON document of {size:,} bytes, not JSON Lines; "
                          "convert it to one object per line")
    with opener(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 (bad byte at offset {e.start})") from e
    values, pos, dec = [], 0, json.JSONDecoder(strict=False, parse_constant=_no_constant)
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    try:
        while pos < len(text):
            obj, pos = dec.raw_decode(text, pos)
            values.append(obj)
            pos = ws.match(text, pos).end()
    except ValueError as e:
        raise SourceError(f"{path}: neither JSON Lines (one object per line) nor one JSON document: {e}") from e
    if len(values) == 1 and isinstance(values[0], list):
        logger.warning("%s: a JSON array, not JSON Lines; read its %d elements as rows (row = element number)",
                       path, len(values[0]))
        values = values[0]
    else:
        logger.warning("%s: %d pretty-printed JSON values, not one per line; read each as a row", path, len(values))
    yield from enumerate(values, 1)


def _read_jsonl(path: Path, head: bytes, v: _Validator) -> Iterator[Example]:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SourceError(f"{path}: looks like UTF-16 text; JSONL must be UTF-8")
    file, tf, idf, lineno = str(path), v.cfg.text_field, v.cfg.id_field, 0
    opener = gzip.open if head.startswith(b"\x1f\x8b") else open

    def row(lineno: int, obj: dict[str, Any], raw: bytes | None) -> Example | None:
        text = obj.pop(tf, _MISSING)
        ident = _MISSING if idf is None else obj.pop(idf, _MISSING)
        if raw is None or b'"quadsel_' in raw:
            ren = v.rename_reserved(file, obj)
            if ren:
                obj = {ren.get(k, k): x for k, x in obj.items()}
        return v.check(file, lineno, text, ident, obj)

    try:
        with opener(path, "rb") as fh:
            first = fh.read(1 << 16)
            fh.seek(0)
            lines: Iterable[bytes] = fh
            if b"\r" in first and b"\n" not in first:
                logger.info("%s: CR-only line endings", path)
                lines = _split_lines(fh, b"\r")
            start = first.lstrip(b" \t\r\n").removeprefix(_BOM).lstrip()[:1]
            if start in (b"[", b"{"):
                line1 = first.lstrip().splitlines()[0] if first.strip() else b""
                if _parse_json_line(line1)[1] == "malformed_json":  # a document spread over lines
                    for lineno, obj in _whole_file_json(path, opener, v):
                        if type(obj) is not dict:
                            v.rejects.reject(file, lineno, "not_an_object",
                                             f"element {lineno} is a JSON {type(obj).__name__}, not an object")
                            continue
                        ex = row(lineno, obj, None)
                        if ex is not None:
                            yield ex
                    return
            for lineno, raw in enumerate(lines, 1):
                obj, reason, detail = _parse_json_line(raw)
                if obj is None:
                    if reason is not None:
                        v.rejects.reject(file, lineno, reason, detail)
                    continue
                ex = row(lineno, obj, raw)
                if ex is not None:
                    yield ex
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, PermissionError):
            raise SourceError(f"cannot read {path}: permission denied") from e
        raise SourceError(f"{path}: read failed after line {lineno}: {e}") from e


def _check_batch(rb: pa.RecordBatch) -> None:
    """Full structural validation (offsets, lengths, buffer sizes) of a batch read from a file:
    damaged bytes would otherwise crash the process (an abort inside Arrow) when converted.
    Strings are checked as binary, so invalid UTF-8 stays a per-row reject, not a file error."""
    for col in rb.columns:
        t = col.type
        if pa.types.is_string(t):
            col = col.view(pa.binary())
        elif pa.types.is_large_string(t):
            col = col.view(pa.large_binary())
        col.validate(full=True)


def _guarded(batches: Iterator[pa.RecordBatch], path: Path, what: str) -> Iterator[pa.RecordBatch]:
    n = 0
    while True:
        try:
            rb = next(batches)
            _check_batch(rb)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: corrupt {what} data after row {n}: {e}") from e
        n += rb.num_rows
        yield rb


def _whole_stream(batches: Iterator[pa.RecordBatch], src: Any, path: Path) -> Iterator[pa.RecordBatch]:
    """The batches of an Arrow stream; an error if bytes follow its end-of-stream marker."""
    yield from batches
    if src.tell() < src.size():
        raise SourceError(f"{path}: {src.size() - src.tell():,} bytes after the Arrow stream's end-of-stream "
                          "marker (several streams joined?); they would not be read")


def _open_table(path: Path, kind: str, head: bytes, batch_size: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch], Any]:
    """(schema, record batches, closable) of a Parquet or Arrow file."""
    if kind == "parquet":
        try:
            pf = pq.ParquetFile(str(path), memory_map=True)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: not a readable Parquet file ({e})") from e
        return schema, _guarded(pf.iter_batches(batch_size=batch_size), path, "Parquet"), pf
    if head.startswith(b"FEA1"):  # Feather v1 has no streaming reader
        import pyarrow.feather as feather

        try:
            table = feather.read_table(str(path))
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: not a readable Feather file ({e})") from e
        return table.schema, _guarded(iter(table.to_batches(max_chunksize=batch_size)), path, "Feather"), None
    try:
        src = pa.memory_map(str(path))
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e}") from e
    try:
        if head.startswith(b"ARROW1"):
            reader = ipc.open_file(src)
            batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            size = src.size()
            src.seek(max(0, size - len(_ARROW_EOS)))
            tail = src.read(len(_ARROW_EOS))
            src.seek(0)
            if tail != _ARROW_EOS:
                raise SourceError(f"{path}: Arrow IPC stream without its end-of-stream marker (cut short: "
                                  "the writer was killed or the copy is incomplete); rewrite or re-copy it")
            reader = ipc.open_stream(src)
            batches = _whole_stream(iter(reader), src, path)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        src.close()
        raise SourceError(f"{path}: not a valid Arrow IPC file or stream ({e})") from e
    except SourceError:
        src.close()
        raise
    return reader.schema, _guarded(batches, path, "Arrow"), src


def _read_table(path: Path, kind: str, head: bytes, v: _Validator) -> Iterator[Example]:
    cfg, file = v.cfg, str(path)
    schema, batches, closable = _open_table(path, kind, head, cfg.batch_size)
    try:
        try:
            names = schema.names
        except UnicodeDecodeError as e:  # a damaged schema message
            raise SourceError(f"{path}: corrupt schema (a column name is not UTF-8: {e})") from e
        if cfg.text_field not in names:
            raise SourceError(f"{path}: no column {cfg.text_field!r} (text_field); columns found: "
                              f"{', '.join(names) or 'none'}")
        ti = names.index(cfg.text_field)
        ii = names.index(cfg.id_field) if cfg.id_field in names else None
        if cfg.id_field is not None and ii is None:
            logger.info("%s: no column %r; using content-hash ids", path, cfg.id_field)
        mi = [i for i in range(len(names)) if i not in (ti, ii)]
        ren = v.rename_reserved(file, [names[i] for i in mi])
        meta_names = {i: ren.get(names[i], names[i]) for i in mi}
        row = 0
        for rb in batches:
            for off in range(0, rb.num_rows, cfg.batch_size):
                part = rb.slice(off, cfg.batch_size)
                texts = _values(part.column(ti), raw=True)
                ids = _values(part.column(ii), raw=True) if ii is not None else None
                metas = [(meta_names[i], _values(part.column(i))) for i in mi]
                for j, text in enumerate(texts):
                    meta = {name: col[j] for name, col in metas}
                    ex = v.check(file, row + j + 1, text, ids[j] if ids is not None else _MISSING, meta)
                    if ex is not None:
                        yield ex
                row += part.num_rows
    finally:
        if closable is not None and hasattr(closable, "close"):
            closable.close()


def _read_file(path: Path, kind: str, v: _Validator) -> Iterator[Example]:
    head = _sniff(path)
    v.rejects.rows.setdefault(str(path), 0)
    if not head:
        logger.warning("%s: empty file, nothing read", path)
        return
    before = sum(v.rejects.by_file.get(str(path), Counter()).values())
    n = 0
    reader = _read_jsonl(path, head, v) if kind == "jsonl" else _read_table(path, kind, head, v)
    for ex in reader:
        n += 1
        yield ex
    v.rejects.rows[str(path)] = n
    got = v.rejects.by_file.get(str(path), Counter())
    if sum(got.values()) > before:
        rejected = {k: c for k, c in sorted(got.items()) if k != "truncated"}
        msg = f"{path}: kept {n:,} rows, rejected {sum(rejected.values()):,} {rejected}"
        if got.get("truncated"):
            msg += f", truncated {got['truncated']:,} to {v.cfg.max_chars:,} chars"
        logger.warning(msg)
    elif n == 0:
        logger.warning("%s: no rows in file", path)


def iter_examples(cfg: SourceConfig, rejects: RejectLog | None = None, *,
                  exclude: Iterable[str | os.PathLike] = ()) -> Iterator[Example]:
    """Every valid example of ``cfg``'s files, in file order then line order (nothing inside an
    ``exclude`` folder)."""
    plan = _plan(cfg.path, cfg.format, cfg.split, exclude)
    return _examples(plan, _Validator(cfg, rejects if rejects is not None else RejectLog(None)))


def _examples(plan: list[tuple[Path, str]], v: _Validator) -> Iterator[Example]:
    for path, kind in plan:
        faults.point("sources.file")
        yield from _read_file(path, kind, v)


def iter_batches(cfg: SourceConfig, rejects: RejectLog | None = None, *,
                 exclude: Iterable[str | os.PathLike] = ()) -> Iterator[list[Example]]:
    """Valid examples in lists of ``cfg.batch_size`` (the last may be shorter).

    Paths are resolved when this is called, so a missing file raises here, before any row.
    """
    return _batched(iter_examples(cfg, rejects, exclude=exclude), cfg.batch_size)


def _batched(examples: Iterator[Example], size: int) -> Iterator[list[Example]]:
    buf: list[Example] = []
    for ex in examples:
        buf.append(ex)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def read_texts(cfg: SourceConfig, rejects: RejectLog | None = None, limit: int | None = None) -> list[Example]:
    """All valid examples (or the first ``limit``) as one list: for small sets like references."""
    out: list[Example] = []
    it = iter_examples(cfg, rejects)
    try:
        if limit is None or limit > 0:
            for ex in it:
                out.append(ex)
                if limit is not None and len(out) >= limit:
                    break
    finally:
        it.close()  # type: ignore[attr-defined]
    return out
