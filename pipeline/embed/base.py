"""The Embedder interface, its config, and the helpers every embedder shares.

An embedder maps texts to float32 vectors with L2-normalised rows, so that an inner product is
a cosine similarity (what spherical k-means in :mod:`pipeline.cluster` expects). It is fitted
once on a sample of the pool (tf-idf + SVD learns a vocabulary and a projection; a pretrained
encoder learns nothing) and then applied batch by batch in a stream.

A fitted embedder saves itself into a folder (``embedder.json`` last, written atomically) and
:func:`load_embedder` restores it, so that a reference set can later be embedded exactly as
the pool was.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..atomic import read_json

logger = logging.getLogger("quadsel.embed")

META = "embedder.json"


class EmbedConfig(BaseModel):
    """How the pool is embedded (``embed:`` in a job config)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tfidf", "hf"] = "tfidf"
    dim: int = Field(256, gt=0, description="tfidf: SVD components (hf: the encoder's width is used)")
    fit_sample: int = Field(
        20_000, gt=0,
        description="rows the tf-idf vocabulary and SVD are fitted on: a seeded uniform sample "
                    "without replacement, in pool order (all rows when the pool is smaller)")
    n_features: int = Field(2**20, gt=0, description="hashing vectorizer width")
    max_features: int = Field(
        2**14, gt=0,
        description="tfidf: hashed features kept for the SVD, the most document-frequent ones "
                    "that occur in at least 2 fitted documents")
    batch_size: int = Field(1024, gt=0)
    model: str | None = Field(None, description="hf: local path or hub id of an encoder")
    max_length: int = Field(256, gt=0, description="hf: tokens per text (longer ones are truncated)")
    device: str = Field("auto", description="hf: auto (cuda when present), cpu, cuda, cuda:1, …")
    seed: int = 0

    @model_validator(mode="after")
    def _model_for_hf(self) -> "EmbedConfig":
        if self.kind == "hf" and not self.model:
            raise ValueError("embed.model is required when embed.kind is 'hf' "
                             "(a local folder or a Hugging Face model id)")
        return self


class Embedder(ABC):
    """texts -> float32 ``[n, dim]`` with L2-normalised rows (all-zero for a text with no signal)."""

    kind: str
    dim: int

    @abstractmethod
    def fit(self, texts: Sequence[str]) -> None:
        """Learn what the embedder needs from a sample of the pool (may be a no-op)."""

    @abstractmethod
    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; row i belongs to ``texts[i]``. A row never depends on the others."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the fitted embedder into folder ``path`` (``embedder.json`` last)."""

    @classmethod
    @abstractmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "Embedder":
        ...

    @classmethod
    def load(cls, path: str | Path) -> "Embedder":
        """Restore an embedder saved by :meth:`save` (whatever its kind)."""
        return load_embedder(path)

    def describe(self) -> dict[str, Any]:
        """A small JSON-able summary, stored next to the vectors it produced."""
        return {"kind": self.kind, "dim": int(self.dim)}


def _embedder_class(kind: str) -> type[Embedder]:
    if kind == "tfidf":
        from .tfidf import TfidfEmbedder

        return TfidfEmbedder
    if kind == "hf":
        from .hf import HFEmbedder

        return HFEmbedder
    raise ValueError(f"unknown embedder kind {kind!r} (expected 'tfidf' or 'hf')")


def make_embedder(cfg: EmbedConfig) -> Embedder:
    """A new (unfitted) embedder of ``cfg.kind``."""
    return _embedder_class(cfg.kind)(cfg)  # type: ignore[call-arg]


def load_embedder(path: str | Path) -> Embedder:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no saved embedder here (missing {META})")
    meta = read_json(meta_path)
    return _embedder_class(meta.get("kind", ""))._load(path, meta)


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """``min(sample, n)`` distinct rows of ``range(n)``, sorted: all of them when
    ``n <= sample``, else a seeded uniform sample without replacement. Used for the rows an
    embedder is fitted on and the rows k-means trains on."""
    if sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float32 copy of ``x`` with unit rows; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
