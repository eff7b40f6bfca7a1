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

from quadsel.core.atomic import read_json

logger = logging.getLogger(__name__)

META = "embedder.json"


class WhitenConfig(BaseModel):
    """ZCA whitening of the vectors before clustering (``embed.whiten``; see :mod:`pipeline.whiten`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    eps: float = Field(
        1e-3, gt=0, description="regularisation: added to every covariance eigenvalue, as a "
                                "fraction of their mean (larger = milder whitening)")
    fit_sample: int = Field(50_000, gt=1, description="rows the mean and covariance are fitted "
                                                      "on (a seeded sample; all rows when fewer)")
    batch_size: int = Field(65_536, gt=0, description="rows per batch when applying it")


# embedders that run a causal LM: ``model`` null means the run's proxy model
MODEL_KINDS = ("hidden", "gradient")


class EmbedConfig(BaseModel):
    """How the pool is embedded (``embed:`` in a job config)."""

    model_config = ConfigDict(extra="forbid")

    # the order only shapes the error message: "… 'tfidf' or 'hf'"
    kind: Literal["hidden", "gradient", "tfidf", "hf"] = "tfidf"
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
    batch_size: int = Field(1024, gt=0, description="pool rows per embedding call (a work unit "
                                                    "of the feature stage)")
    model: str | None = Field(None, description="hf: local path or hub id of an encoder; "
                                                "hidden/gradient: a causal LM (null = the run's "
                                                "proxy model)")
    max_length: int = Field(256, gt=0, description="hf/hidden/gradient: tokens per text (longer "
                                                   "ones are truncated)")
    device: str = Field("auto", description="hf/hidden/gradient: auto (cuda when present), cpu, "
                                            "cuda, cuda:1, …")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hidden/gradient: model weights (auto: float32 on CPU, bfloat16 on GPU)")
    model_batch_size: int = Field(16, gt=0, description="hidden/gradient: texts per forward "
                                                        "(and backward) pass")
    layer: int = Field(-1, description="hidden: hidden-state index (0 = token embeddings, "
                                       "-1 = the last layer's output)")
    projection_dim: int = Field(2048, gt=0, description="gradient: projected gradient features "
                                                        "(an upper bound; see influence.projection)")
    gradient_layers: Literal["attention", "mlp", "all"] = Field(
        "all", description="gradient: which weight matrices the gradient features cover")
    backend: Literal["local", "ray"] = Field(
        "local", description="feature stage: in-process, or a Ray Data actor pool")
    num_actors: int | None = Field(None, gt=0, description="ray backend: actors (null = "
                                                           "ray.num_actors of the job)")
    gpus_per_actor: float | None = Field(None, ge=0, description="ray backend: GPUs per actor "
                                                                 "(null = 1 when the cluster has GPUs)")
    whiten: WhitenConfig = WhitenConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _model_for_hf(self) -> "EmbedConfig":
        if self.kind == "hf" and not self.model:
            raise ValueError("embed.model is required when embed.kind is 'hf' "
                             "(a local folder or a Hugging Face model id)")
        return self

    def with_default_model(self, model: str | Path | None) -> "EmbedConfig":
        """This config with ``model`` set to ``model`` (the run's proxy model) when the kind
        runs a causal LM and no model was given; unchanged otherwise."""
        if self.kind in MODEL_KINDS and not self.model and model is not None:
            return self.model_copy(update={"model": str(model)})
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


ENTRY_POINTS = "quadsel.embedders"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def embedder_kinds() -> dict[str, str]:
    """kind -> "module:Class" of every registered embedder. A package registers its own in its
    metadata (entry-point group ``quadsel.embedders``): quadsel's pyproject registers tfidf and hf
    (this package) and hidden and gradient (:mod:`quadsel.influence.embedders`); a kind's module
    is imported on first use only."""
    return {name: ep.value for name, ep in _entry_points().items()}


def _embedder_class(kind: str) -> type[Embedder]:
    eps = _entry_points()
    if not eps:
        raise RuntimeError(f"no embedders registered (entry-point group {ENTRY_POINTS!r} is empty): quadsel's "
                           "installed metadata is missing or stale; reinstall it (pip install -e . or make install)")
    if kind not in eps:
        known = ", ".join(repr(k) for k in eps)
        raise ValueError(f"unknown embedder kind {kind!r} (expected one of {known})")
    return eps[kind].load()


def make_embedder(cfg: EmbedConfig) -> Embedder:
    """A new (unfitted) embedder of ``cfg.kind``."""
    if cfg.kind in MODEL_KINDS and not cfg.model:
        raise ValueError(f"embed.model is not set for embed.kind = {cfg.kind!r}: give a causal LM "
                         "(local folder or hub id), or let the job pass the run's proxy model "
                         "(EmbedConfig.with_default_model)")
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
