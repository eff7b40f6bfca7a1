"""Readers: JSONL, Parquet and Arrow files streamed as validated examples; the public entry points."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from quadsel.core import faults
from quadsel.core.errors import SourceError

from .config import Example, SourceConfig
from .paths import _plan
from .rejects import RejectLog
from .values import _MISSING, _Validator, _values

logger = logging.getLogger(__name__)

_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_WHOLE_FILE_JSON_LIMIT = 2 * 2**30
_BOM = b"\xef\xbb\xbf"

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
