"""Scorer base class, registry and persistence (``make_scorer``, ``load_scorer``).

Every scorer has ``fit(texts)``, ``set_reference(texts)`` and ``score(texts) -> float64 [n]``
(higher = training on the text is predicted to lower the reference loss more), a config
dataclass (``config_cls``), and ``save(dir)``; :func:`load_scorer` rebuilds it in another process
or on another machine from the directory (the model is loaded from its recorded path, or from
``dir/model`` when it was copied there).

A new scorer: subclass :class:`Scorer`, give it a config dataclass, implement ``set_reference``/
``score`` (and ``fit``/``_save_state``/``_load_state`` when it has state), and decorate it with
``@register_scorer("name")``; import its module in ``influence/__init__.py``. ``needs_fit`` /
``needs_reference`` say which steps it uses (a VoG or EL2N scorer needs no reference).
"""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .model import InfluenceModel

logger = logging.getLogger(__name__)

SCORER_FORMAT_VERSION = 1
_REGISTRY: dict[str, type["Scorer"]] = {}


def register_scorer(name: str):
    def deco(cls: type[Scorer]) -> type[Scorer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"scorer {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type["Scorer"] | None:
    """The registered scorer class of ``name``, or None (see :func:`available_scorers`)."""
    return _REGISTRY.get(name)


def make_scorer(name: str, model: InfluenceModel | str | Path, **kwargs: Any) -> "Scorer":
    """Build a registered scorer. ``model``: an :class:`InfluenceModel` or a model path / hub id."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {available_scorers()}") from None
    if not isinstance(model, InfluenceModel):
        model = InfluenceModel.load(model)
    return cls(model, cls.make_config(**kwargs))


@dataclass
class ScorerConfig:
    batch_size: int | None = None  # None: the InfluenceModel's batch size


class Scorer(ABC):
    """Base class of every scorer. Subclasses set ``config_cls`` and implement the three steps."""

    name: ClassVar[str] = "?"
    config_cls: ClassVar[type] = ScorerConfig
    needs_fit: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = True
    # reads saved training checkpoints of its model (vog, el2n): a job then saves proxy checkpoints
    needs_checkpoints: ClassVar[bool] = False
    # fit() does not depend on the reference and a fitted scorer saved before set_reference()
    # loads back ready for it: a job then caches the fit apart from the reference side
    reference_free_fit: ClassVar[bool] = False

    def __init__(self, model: InfluenceModel, config: Any = None) -> None:
        self.model = model
        self.config = config if config is not None else self.config_cls()
        self.is_fitted = not self.needs_fit
        self.has_reference = not self.needs_reference

    # fields of the shared config class this scorer has but does not use (set one: an error)
    unused_options: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def option_names(cls) -> set[str]:
        """The options this scorer takes (``make_config`` refuses any other)."""
        return {f.name for f in fields(cls.config_cls)} - cls.unused_options

    @classmethod
    def make_config(cls, **kwargs: Any):
        allowed = cls.option_names()
        bad = sorted(set(kwargs) - allowed)
        if bad:
            raise TypeError(f"scorer {cls.name!r}: unknown option(s) {bad}; allowed: {sorted(allowed)}")
        return cls.config_cls(**kwargs)

    def fit(self, texts: Sequence[str]) -> "Scorer":
        self.is_fitted = True
        return self

    @abstractmethod
    def set_reference(self, texts: Sequence[str]) -> "Scorer":
        ...

    @abstractmethod
    def score(self, texts: Sequence[str]) -> np.ndarray:
        ...

    def _require_ready(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"scorer {self.name!r}: call fit(texts) before scoring")
        if not self.has_reference:
            raise RuntimeError(f"scorer {self.name!r}: call set_reference(texts) before scoring")

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | Path, *, save_model: bool | None = None) -> Path:
        """Write everything a remote worker needs to score: ``scorer.json`` + state files.

        The model is referenced by its source path/id; it is copied into ``directory/model``
        when ``save_model`` is True, or when it has no source (built in memory).
        """
        from quadsel.core.atomic import atomic_write_text, canonical_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        model_info = self.model.describe()
        src = self.model.source
        if save_model or (save_model is None and src is None):
            self.model.model.save_pretrained(d / "model")
            self.model.tokenizer.save_pretrained(d / "model")
            model_info["source"] = "model"  # relative to the scorer directory
        elif src is not None and Path(src).exists():
            model_info["source"] = str(Path(src).resolve())
        self._save_state(d)
        meta = {"format_version": SCORER_FORMAT_VERSION, "scorer": self.name, "config": asdict(self.config),
                "model": model_info, "is_fitted": self.is_fitted, "has_reference": self.has_reference}
        meta.update(self._extra_meta())
        atomic_write_text(d / "scorer.json", canonical_json(meta))
        return d

    def _save_state(self, directory: Path) -> None:
        pass

    def _load_state(self, directory: Path, meta: dict) -> None:
        pass

    def _extra_meta(self) -> dict:
        return {}


def load_scorer(directory: str | Path, *, device: str | torch.device = "auto",
                dtype: str | torch.dtype | None = None, model: InfluenceModel | None = None) -> Scorer:
    """Rebuild a scorer written by :meth:`Scorer.save` (loads its model unless one is given)."""
    d = Path(directory)
    meta_path = d / "scorer.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no scorer.json in {d}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    name = meta.get("scorer")
    if name not in _REGISTRY:
        raise ValueError(f"{meta_path}: unknown scorer {name!r}; available: {available_scorers()}")
    cls = _REGISTRY[name]
    if model is None:
        info = meta["model"]
        src = info.get("source")
        if src is None:
            raise ValueError(f"{meta_path}: the model has no recorded source; pass model=")
        path = d / src if not Path(src).is_absolute() and (d / src).exists() else src
        model = InfluenceModel.load(path, max_length=info.get("max_length", 512),
                                    batch_size=info.get("batch_size", 8), device=device,
                                    dtype=dtype if dtype is not None else info.get("dtype"))
    cfg = meta["config"]
    if isinstance(cfg.get("projection_dim"), list):
        cfg["projection_dim"] = tuple(cfg["projection_dim"])
    sc = cls(model, cls.config_cls(**cfg))  # the whole saved dataclass, unused fields included
    sc._load_state(d, meta)
    sc.is_fitted = bool(meta.get("is_fitted"))
    sc.has_reference = bool(meta.get("has_reference"))
    return sc
