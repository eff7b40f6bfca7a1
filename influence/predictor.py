"""``predictor``: learned extrapolation of an expensive scorer (MATES, NN-CIFT, Influence Distillation).

An expensive *base* scorer (any registered scorer; ``ekfac`` by default) labels a sample of the
pool; a light regressor (ridge default, or a small MLP) learns to map cheap forward-only
features of a text to the base's score, and predicts every other text. Sign and units are the
base's: higher = more worth training on, as the base says.

Features (one forward pass, no gradients, same tokenisation/truncation as the base):
- ``hidden``: the mean over non-padding tokens of ``hidden_states[feature_layer]`` (the pooling of
  :class:`influence.embedders.HiddenStateEmbedder`, without its L2 normalisation: the norm
  carries signal), plus ``log(1 + tokens)``;
- ``hidden+loss``: also the summed token loss, the mean token loss and the token count (the
  logits come from the same forward pass). Gradient scores are sums over tokens, so
  loss/length carry much of their magnitude.
Features and targets are standardised (train-set mean/std); ``target="per_token"`` regresses
``score / tokens`` and multiplies back (fits the length scaling of summed-loss scores exactly).

Flow (the job always calls ``fit`` then ``set_reference``):
- ``fit(texts)``: fits the base on ``texts`` when it needs a fit, and keeps ``texts`` as the pool
  sample to label (the reference is not known yet).
- ``set_reference(ref)``: ``base.set_reference(ref)`` (skipped when the base needs none), then
  the base labels up to ``label_sample`` kept texts (seeded choice); a seeded ``holdout`` share is
  held out, the regressor is fitted on the rest and Spearman/Pearson of its predictions vs the
  base's exact scores on the holdout are measured — with a shuffled-label control fit, which
  should give ~0; then the regressor is refitted on all labelled texts. The numbers are logged,
  kept in ``scorer.report`` and saved in ``scorer.json`` (``"report"``).
- ``score(texts)``: ``regressor(features(texts))`` — one forward pass per text, no backward.

Cost: a forward pass (``hidden``: without the vocabulary projection) instead of the base's
forward + backward with gradient hooks; ``report["timing"]`` holds both per-text costs measured
on the labelled texts, and their ratio (bench/predictor_bench.py measures it on real data).

Persistence: the base scorer is saved by its own ``save`` under ``base/``; the regressor
(standardisation, ridge coefficients or MLP weights) as arrays in ``regressor.npz`` — no pickle;
predictions always use the numpy forward, so a loaded scorer gives identical scores.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .base import Scorer, ScorerConfig, load_scorer, make_scorer, register_scorer
from .model import InfluenceModel, _check_texts

logger = logging.getLogger("quadsel.influence")

MIN_LABELS = 20  # fewer labelled texts cannot support a fit plus a holdout measurement
MIN_HOLDOUT = 5
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
_FORWARDED = ("layers", "damping", "damping_mode", "projection_dim", "seed")


@dataclass
class PredictorConfig(ScorerConfig):
    """Options of ``predictor``. ``layers``/``damping``/``damping_mode``/``projection_dim``/``seed``
    are forwarded to the base when its config has the field and ``base_options`` does not set it
    (so one job config can switch scorers by name)."""

    base: str = "ekfac"
    base_options: dict = field(default_factory=dict)
    regressor: Literal["ridge", "mlp"] = "ridge"
    alpha: float | None = None  # ridge L2 (standardised units); None: leave-one-out over RIDGE_ALPHAS
    hidden_sizes: tuple[int, ...] = (64,)  # mlp
    mlp_alpha: float = 1e-3  # mlp L2
    max_iter: int = 500  # mlp epochs
    label_sample: int = 512
    holdout: float = 0.2
    features: Literal["hidden", "hidden+loss"] = "hidden+loss"
    feature_layer: int = -1  # hidden-state index: 0 = token embeddings, -1 = last layer
    target: Literal["score", "per_token"] = "score"
    standardize: bool = True
    seed: int = 0
    layers: str = "all"
    damping: float = 0.1
    damping_mode: Literal["absolute", "relative"] = "relative"
    projection_dim: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        if isinstance(self.projection_dim, list):
            self.projection_dim = tuple(self.projection_dim)
        checks = [
            ("regressor", self.regressor in ("ridge", "mlp"), "'ridge' or 'mlp'"),
            ("features", self.features in ("hidden", "hidden+loss"), "'hidden' or 'hidden+loss'"),
            ("target", self.target in ("score", "per_token"), "'score' or 'per_token'"),
            ("label_sample", self.label_sample >= MIN_LABELS, f">= {MIN_LABELS}"),
            ("holdout", 0.0 <= self.holdout < 1.0, "in [0, 1)"),
            ("alpha", self.alpha is None or self.alpha > 0, "> 0 or null"),
            ("hidden_sizes", len(self.hidden_sizes) > 0 and min(self.hidden_sizes) > 0, "positive widths"),
            ("max_iter", self.max_iter >= 1, ">= 1"),
            ("base_options", isinstance(self.base_options, dict), "a mapping"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"scorer 'predictor': {name} must be {want}, got {getattr(self, name)!r}")
        if self.base == "predictor":
            raise ValueError("scorer 'predictor': base cannot be 'predictor'")


# ====================================================================== features
@torch.no_grad()
def forward_features(im: InfluenceModel, texts: Sequence[str], *, layer: int = -1, with_loss: bool = True,
                     batch_size: int | None = None) -> np.ndarray:
    """``[n, 1 + H (+3)]`` float64 from ONE forward pass per batch, in input order: ``log1p(tokens)``,
    the mean-pooled ``hidden_states[layer]`` (and summed loss, mean loss, tokens)."""
    texts = _check_texts(texts)
    width = 1 + int(im.model.config.hidden_size) + (3 if with_loss else 0)
    out = np.zeros((len(texts), width), dtype=np.float64)
    for b in im.batches(texts, batch_size):
        res = im.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True,
                       use_cache=False, logits_to_keep=0 if with_loss else 1)
        h = res.hidden_states[layer].float()
        mask = b.attention_mask.unsqueeze(-1).to(h.dtype)
        mean = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # HiddenStateEmbedder's pooling
        n_tok = b.attention_mask.sum(dim=1).double()
        cols = [torch.log1p(n_tok)[:, None], mean.double()]
        if with_loss:
            loss = im.summed_loss(res.logits, b.input_ids, b.attention_mask).double()
            cols += [loss[:, None], (loss / (n_tok - 1).clamp(min=1.0))[:, None], n_tok[:, None]]
        out[b.index] = torch.cat(cols, dim=1).cpu().numpy()
    return out


def token_counts(features: np.ndarray) -> np.ndarray:
    """Tokens per text, from column 0 (``log1p(tokens)``) of :func:`forward_features`."""
    return np.rint(np.expm1(features[:, 0]))
