"""Progress reporting and logging shared by every long stage.

One place decides how progress is shown:
- ``pretty``: rich progress bars with rate and ETA (a terminal),
- ``log``: a log line every few seconds with count, rate and ETA (files, CI, Ray clusters),
- ``quiet``: nothing but warnings,
- a callback of the caller's (:func:`progress_callback`): every step, in any library call, is
  reported to it as :class:`ProgressEvent` and nothing is drawn (a notebook, a UI, a driver that
  forwards progress elsewhere).

Library code reports through :class:`Progress` wherever it runs; it never draws by itself.

Logging can emit JSON lines (``configure_logging(json_lines=True)``) for log collectors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

T = TypeVar("T")
Mode = Literal["auto", "pretty", "log", "quiet"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """One report of a step: ``kind`` is "start", "advance" or "done"; ``depth`` 0 for a job's
    stage, 1+ for a library step inside it."""

    kind: Literal["start", "advance", "done"]
    desc: str
    count: int
    total: int | None
    unit: str
    depth: int


@dataclass
class _Settings:
    mode: Mode = "auto"
    interval_s: float = 5.0
    callback: Callable[[ProgressEvent], None] | None = None


@contextlib.contextmanager
def progress_callback(fn: Callable[[ProgressEvent], None]) -> Iterator[None]:
    """Within: every Progress (any library call: embedding, scoring, fitting …) reports to ``fn``
    instead of drawing or logging."""
    old, _settings.callback = _settings.callback, fn
    try:
        yield
    finally:
        _settings.callback = old


_settings = _Settings()  # process-wide display preference, set once by the CLI


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(
    level: str = "INFO",
    *,
    json_lines: bool = False,
    quiet: bool = False,
    progress: Mode = "auto",
    log_file: str | None = None,
) -> None:
    """Set up the ``quadsel`` logger for a CLI invocation (idempotent)."""
    root = logging.getLogger("quadsel")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.WARNING if quiet else getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    if json_lines:
        fmt: logging.Formatter = JsonFormatter()
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if log_file:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(JsonFormatter())
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
    _settings.mode = "quiet" if quiet else ("log" if json_lines and progress == "auto" else progress)


class run_log:  # noqa: N801 - used as a context manager, like open()
    """Also write every ``quadsel`` log record, as JSON lines, to ``path`` while active.

    Each run keeps its own log under ``RUN_DIR/logs/`` (appended across resumes), whatever the
    console shows.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.handler: logging.Handler | None = None

    def __enter__(self) -> "run_log":
        root = logging.getLogger("quadsel")
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(JsonFormatter())
        self.handler.setLevel(logging.INFO)
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            self._old_level = root.level
            root.setLevel(logging.INFO)
            for h in root.handlers:  # the console keeps its own threshold (e.g. --quiet)
                if h is not self.handler and h.level == logging.NOTSET:
                    h.setLevel(self._old_level or logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger("quadsel")
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()
        if hasattr(self, "_old_level"):
            root.setLevel(self._old_level)


def _resolved_mode() -> Mode:
    mode = _settings.mode
    if mode == "auto":
        return "pretty" if sys.stderr.isatty() else "log"
    return mode


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Display:
    """The one live display of the process, shared by every open Progress.

    The outermost Progress starts it and stops it; a Progress opened inside another (a library
    step inside a job stage: the scorer's per-chunk bar inside the job's select bar) becomes a
    transient line of the same display, removed when it closes, and in log mode logs at DEBUG.
    So library code can report progress wherever it runs without ever nesting live displays
    (which rich refuses with LiveError) or piling finished bars up on the screen.
    """

    rich: Any = None  # a rich.progress.Progress while a display is live
    depth = 0


def _new_rich_display():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


class Progress:
    """A progress counter: ``with Progress("embed", total=n, unit="rows") as p: p.advance(k)``.

    Opened inside another Progress it reports as a sub-step (see ``_Display``)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "rows") -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.count = 0
        self._mode = _resolved_mode()
        self._t0 = time.monotonic()
        self._last = self._t0
        self._rich: Any = None
        self._task = None
        self._nested = False
        self._owner = False
        self._depth = 0
        self._callback = _settings.callback

    def _emit(self, kind: Literal["start", "advance", "done"]) -> None:
        assert self._callback is not None
        self._callback(ProgressEvent(kind, self.desc, self.count, self.total, self.unit, self._depth))

    def __enter__(self) -> "Progress":
        self._nested = _Display.depth > 0
        self._depth = _Display.depth
        _Display.depth += 1
        if self._callback is not None:
            self._emit("start")
        elif self._mode == "pretty":
            if _Display.rich is None:
                _Display.rich = _new_rich_display()
                _Display.rich.start()
                self._owner = True
            self._rich = _Display.rich
            self._task = self._rich.add_task(self.desc, total=self.total, rate="")
        return self

    def rate(self) -> float:
        dt = time.monotonic() - self._t0
        return self.count / dt if dt > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if self._callback is not None:
            self._emit("advance")
        elif self._rich is not None:
            self._rich.update(self._task, advance=n, rate=f"{self.rate():,.0f} {self.unit}/s")
        elif self._mode == "log" and now - self._last >= _settings.interval_s:
            self._last = now
            self._log_line()

    def _log_line(self, final: bool = False) -> None:
        r = self.rate()
        fields = {"stage": self.desc, "count": self.count, "rate": round(r, 2), "unit": self.unit}
        if self.total:
            eta = (self.total - self.count) / r if r > 0 else float("inf")
            fields["total"] = self.total
            fields["eta_s"] = None if eta == float("inf") else round(eta, 1)
            msg = (f"{self.desc}: {self.count:,}/{self.total:,} {self.unit} "
                   f"({r:,.1f}/s, ETA {_fmt_eta(eta)})")
        else:
            msg = f"{self.desc}: {self.count:,} {self.unit} ({r:,.1f}/s)"
        if final:
            msg = f"{self.desc}: done, {self.count:,} {self.unit} in {time.monotonic() - self._t0:.1f}s"
        logger.log(logging.DEBUG if self._nested else logging.INFO, msg, extra={"fields": fields})

    def __exit__(self, *exc) -> None:
        _Display.depth = max(0, _Display.depth - 1)
        if self._callback is not None:
            self._emit("done")
        elif self._rich is not None:
            if self._owner:
                self._rich.stop()
                _Display.rich = None
            else:
                self._rich.remove_task(self._task)
            self._rich = None
        elif self._mode == "log":
            self._log_line(final=True)


def track(it: Iterable[T], desc: str, total: int | None = None, unit: str = "rows") -> Iterator[T]:
    """Iterate with progress; each item counts one."""
    with Progress(desc, total=total, unit=unit) as p:
        for x in it:
            yield x
            p.advance(1)
