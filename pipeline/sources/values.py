"""Rows: value coercion and validation of one row into an :class:`Example` (or a counted rejection)."""
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import logging
import math
from typing import Any, Iterable

import pyarrow as pa

from .config import RESERVED_PREFIX, Example, SourceConfig, content_id
from .rejects import RejectLog

logger = logging.getLogger(__name__)

_MISSING = object()
_BAD_UTF8 = object()
# characters that show nothing (zero-width, joiners, BOM, word joiner, Mongolian vowel separator):
# a text of only these and whitespace is blank
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad"
_BLANK = _INVISIBLE + "".join(chr(c) for c in range(0x3001) if chr(c).isspace())

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
