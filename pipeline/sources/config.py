"""What a source is: its config, the example it yields, the file kinds and reject reasons."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JSONL_EXTS = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_EXTS = (".parquet", ".pq")
ARROW_EXTS = (".arrow", ".feather", ".ipc")
REJECT_REASONS = (
    "empty_text", "whitespace_text", "non_string_text", "null_text", "missing_text_field",
    "invalid_utf8", "malformed_json", "not_an_object", "overlong_text", "duplicate_id", "bad_id",
)
RESERVED_PREFIX = "quadsel_"  # columns quadsel adds to a selection; an input's own are renamed


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
