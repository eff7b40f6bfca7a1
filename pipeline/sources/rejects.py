"""The reject log: one line of ``rejects.jsonl`` and a count per bad row."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import IO, Any


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
