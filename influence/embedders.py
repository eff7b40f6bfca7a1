"""Embedders that run the (proxy) causal LM, behind :class:`pipeline.embed.Embedder`.

- ``hidden``:   the mean over non-padding tokens of the hidden state at ``embed.layer``
                (``hidden_states[layer]`` of a transformers model: 0 = token embeddings,
                -1 = the last layer's output), pooled in float32;
- ``gradient``: projected per-example gradient features (``FeatureExtractor`` with its seeded
                factored projection, ``embed.projection_dim`` wide, over ``embed.gradient_layers``)
                — "influence-aware clustering": examples whose training would move the model
                the same way land in the same cluster.

Both tokenise exactly as :class:`~influence.model.InfluenceModel` does (special tokens,
``embed.max_length``), batch by decreasing length, and return L2-normalised float32 rows in
input order. Nothing is learned (``fit`` is a no-op); ``save`` writes the config (model path,
layer, projection seed and dimension), so a worker that loads the folder rebuilds the very
same embedder from the model on shared storage.

``pipeline.embed.make_embedder`` imports this module lazily by kind: pipeline knows the names
only, never the math.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from quadsel.core.atomic import atomic_write_json
from quadsel.pipeline.embed.base import META, EmbedConfig, Embedder, l2_normalize

from .features import FeatureExtractor
from .model import InfluenceModel

logger = logging.getLogger(__name__)

__all__ = ["HiddenStateEmbedder", "GradientEmbedder"]


def _load_model(cfg: EmbedConfig) -> InfluenceModel:
    if not cfg.model:
        raise ValueError(f"embed.model is not set for embed.kind = {cfg.kind!r} (a causal LM folder "
                         "or hub id; the job passes the run's proxy model when it is null)")
    try:
        return InfluenceModel.load(cfg.model, max_length=cfg.max_length, batch_size=cfg.model_batch_size,
                                   device=cfg.device, dtype=cfg.dtype)
    except ValueError as e:
        raise ValueError(f"embed.model = {cfg.model!r}: {e}") from e


class _ModelEmbedder(Embedder):
    def __init__(self, cfg: EmbedConfig, im: InfluenceModel | None = None) -> None:
        if cfg.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs embed.kind = {self.kind!r}, got {cfg.kind!r}")
        self.cfg = cfg
        self.im = im if im is not None else _load_model(cfg)

    def fit(self, texts: Sequence[str]) -> None:
        """The model is given; nothing is learned from the pool."""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.cfg.model, "max_length": self.cfg.max_length,
                "model_type": getattr(self.im.model.config, "model_type", None)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / META, {**self.describe(), "config": self.cfg.model_dump(mode="json")})

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "_ModelEmbedder":
        return cls(EmbedConfig(**meta["config"]))


class HiddenStateEmbedder(_ModelEmbedder):
    """Mean-pooled hidden state of one layer of the causal LM (non-padding tokens only)."""

    kind = "hidden"

    def __init__(self, cfg: EmbedConfig, im: InfluenceModel | None = None) -> None:
        super().__init__(cfg, im)
        n_layers = int(getattr(self.im.model.config, "num_hidden_layers", 0) or 0)
        if n_layers and not -(n_layers + 1) <= cfg.layer <= n_layers:
            raise ValueError(f"embed.layer = {cfg.layer}: the model has {n_layers} layers, so the "
                             f"hidden-state index must be in [{-(n_layers + 1)}, {n_layers}]")
        self.dim = int(self.im.model.config.hidden_size)

    @torch.no_grad()
    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        for b in self.im.batches(list(texts), self.cfg.model_batch_size):
            res = self.im.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                output_hidden_states=True, use_cache=False)
            h = res.hidden_states[self.cfg.layer].float()
            mask = b.attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            out[b.index] = mean.cpu().numpy()
        return l2_normalize(out)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layer": self.cfg.layer, "pooling": "mean"}


class GradientEmbedder(_ModelEmbedder):
    """Projected per-example gradient features of the causal LM (``influence.FeatureExtractor``)."""

    kind = "gradient"

    def __init__(self, cfg: EmbedConfig, im: InfluenceModel | None = None) -> None:
        super().__init__(cfg, im)
        try:
            self.extractor = FeatureExtractor(self.im, layers=cfg.gradient_layers,
                                              projection_dim=cfg.projection_dim, seed=cfg.seed)
        except ValueError as e:
            raise ValueError(f"embed.projection_dim / embed.gradient_layers: {e}") from e
        self.dim = int(self.extractor.layout.dim)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        feats = self.extractor.compute(list(texts), batch_size=self.cfg.model_batch_size)
        return l2_normalize(feats.values)

    def describe(self) -> dict[str, Any]:
        lay = self.extractor.layout
        return {**super().describe(), "projection_dim": self.cfg.projection_dim, "layers": self.cfg.gradient_layers,
                "layout_hash": lay.hash, "n_layers": len(lay.slots), "seed": self.cfg.seed}
