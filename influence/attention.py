"""AttentionInfluence scorer (arXiv 2505.07293): how much a text relies on retrieval heads.

``fit`` detects retrieval heads of the model on synthetic key-value retrieval prompts built from
its own tokenizer (:mod:`influence.attention_heads`) and keeps the top ``head_fraction`` of all
heads (or the explicit ``heads``). ``score`` runs every text twice, as is and with those heads'
attention made uniform over the allowed (causal, non-padding) positions:

    score = (L_masked - L_base) / L_base

with ``L`` the example's summed token loss (:meth:`InfluenceModel.summed_loss`). Sign: higher =
the text's loss depends more on retrieval heads = more "reasoning/retrieval intensive" = kept
first. Texts with no target token (``L_base = 0``) score 0. The scorer needs no reference set:
``set_reference`` accepts and ignores one. ``fit(texts)`` does not read the texts (the probes are
made from the vocabulary); they are accepted so a job can call every scorer the same way.
Cost: one probe pass in ``fit`` (``probe_prompts`` short prompts, eager attention), then two
forward passes per scored text, no backward.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .attention_heads import HeadMasker, build_probes, find_attention_sites, retrieval_scores, top_heads
from .base import Scorer, ScorerConfig, register_scorer
from .model import InfluenceModel, _check_texts

logger = logging.getLogger(__name__)

HEADS_FILE = "attention_heads.json"


@dataclass
class AttentionConfig(ScorerConfig):
    """Options of the ``attention`` scorer.

    ``head_fraction``: share of all heads kept (top retrieval scores; at least one).
    ``heads``: explicit ``[[layer, head], ...]`` to mask instead (detection still runs in ``fit``
    so that every head's score can be inspected). ``probe_*``: the retrieval prompts (number,
    key-value pairs per prompt, tokens per key and per value); ``seed`` draws them.
    """

    head_fraction: float = 0.05
    heads: list[list[int]] | None = None
    seed: int = 0
    probe_prompts: int = 64
    probe_pairs: int = 16
    probe_key_tokens: int = 2
    probe_value_tokens: int = 3
    # "float32": the two forward passes run with float32 copies of a bf16/fp16 model's weights
    # (the score is a small difference of two losses: in bf16 it is mostly rounding noise;
    # measured Spearman vs fp32 0.22 -> 1.00 on a Llama, 0.08 -> 1.00 on a GPT-2, bench of
    # issue 14); costs a float32 copy of the weights while scoring. "model": the model's dtype.
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "model"):
            raise ValueError("scorer 'attention': compute_dtype must be 'float32' or 'model', "
                             f"got {self.compute_dtype!r}")
        if not (0.0 < float(self.head_fraction) <= 1.0):
            raise ValueError(f"scorer 'attention': head_fraction must be in (0, 1], got {self.head_fraction!r}")
        for f in ("probe_prompts", "probe_pairs", "probe_key_tokens", "probe_value_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"scorer 'attention': {f} must be an integer >= 1, got {v!r}")
        if self.heads is not None:
            bad = [h for h in self.heads if not (isinstance(h, (list, tuple)) and len(h) == 2
                                                 and all(isinstance(x, int) and x >= 0 for x in h))]
            if bad or not self.heads:
                raise ValueError(f"scorer 'attention': heads must be a non-empty list of [layer, head] pairs "
                                 f"of non-negative integers, got {self.heads!r}")
            self.heads = [[int(a), int(b)] for a, b in self.heads]


@contextlib.contextmanager
def float32_weights(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Temporarily give every floating parameter/buffer of ``model`` a float32 copy; the original
    tensors are put back afterwards (bit-exact, whatever happens inside)."""
    saved = []
    if enabled:
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for t in store.values():
                    if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                        saved.append((t, t.data))
                        t.data = t.data.float()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


@register_scorer("attention")
class AttentionInfluenceScorer(Scorer):
    """``(L_masked - L_base) / L_base`` with the model's retrieval heads masked (uniform attention)."""

    config_cls = AttentionConfig
    needs_fit = True
    needs_reference = False

    def __init__(self, model: InfluenceModel, config: Any = None) -> None:
        super().__init__(model, config)
        self.sites = find_attention_sites(model.model)
        self.n_layers = len(self.sites)
        self.n_heads = max(s.n_heads for s in self.sites)
        self.head_scores: np.ndarray | None = None  # [L, H] retrieval score of every head
        self.heads: list[tuple[int, int]] = []
        if self.config.heads is not None:
            self.heads = self._check_heads(self.config.heads, "heads")
            self.is_fitted = True  # explicit heads: fit only adds the (inspection) head scores

    def _check_heads(self, heads, where: str) -> list[tuple[int, int]]:
        out = sorted({(int(a), int(b)) for a, b in heads})
        for layer, head in out:
            if layer >= self.n_layers or head >= self.sites[layer].n_heads:
                raise ValueError(f"scorer 'attention': {where}: head [{layer}, {head}] does not exist; the model "
                                 f"has {self.n_layers} layers of {self.n_heads} heads")
        return out

    @property
    def bs(self) -> int:
        return int(self.config.batch_size or self.model.batch_size)

    # -------------------------------------------------------------- fit / reference
    def fit(self, texts: Sequence[str] = ()) -> "AttentionInfluenceScorer":
        """Detect retrieval heads (``texts`` are not read; see the module docstring)."""
        _check_texts(texts)
        c, im = self.config, self.model
        max_len = min(im.max_length, int(getattr(im.model.config, "max_position_embeddings", im.max_length)))
        probes = build_probes(im.tokenizer, n=c.probe_prompts, pairs=c.probe_pairs, key_tokens=c.probe_key_tokens,
                              value_tokens=c.probe_value_tokens, seed=c.seed, max_length=max_len)
        self.head_scores = retrieval_scores(im.model, self.sites, probes, batch_size=self.bs, device=im.device)
        if c.heads is None:
            self.heads = top_heads(self.head_scores, c.head_fraction)
        best = ", ".join(f"L{l}H{h}={self.head_scores[l, h]:.2f}" for l, h in self.heads[:8])
        logger.info("attention scorer: %d probe prompts of %d tokens; masking %d of %d heads (%s%s)",
                    len(probes.input_ids), probes.input_ids.shape[1], len(self.heads), self.n_layers * self.n_heads,
                    best, ", ..." if len(self.heads) > 8 else "")
        self.is_fitted = True
        return self

    def set_reference(self, texts: Sequence[str]) -> "AttentionInfluenceScorer":
        """No reference set is used; accepted (and ignored) for a uniform scorer interface."""
        _check_texts(texts)
        return self

    # -------------------------------------------------------------- score
    @torch.no_grad()
    def losses(self, texts: Sequence[str],
               heads: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(L_base, L_masked)`` per text (float64, input order); ``heads`` default: the selected ones."""
        from quadsel.core.progress import Progress

        texts = _check_texts(texts)
        heads = self.heads if heads is None else self._check_heads(heads, "heads")
        im = self.model
        base = np.zeros(len(texts), dtype=np.float64)
        masked = np.zeros(len(texts), dtype=np.float64)
        upcast = self.config.compute_dtype == "float32"
        with float32_weights(im.model, enabled=upcast), HeadMasker(self.sites, heads) as hm, \
                Progress(f"{self.name} scores", total=len(texts), unit="docs") as prog:
            for b in im.batches(texts, self.bs):
                lb = im.summed_loss(im.logits(b), b.input_ids, b.attention_mask)
                base[b.index] = lb.double().cpu().numpy()
                if heads:
                    logits = hm.logits(im.model, b.input_ids, b.attention_mask)
                    lm = im.summed_loss(logits, b.input_ids, b.attention_mask)
                    masked[b.index] = lm.double().cpu().numpy()
                else:
                    masked[b.index] = base[b.index]
                prog.advance(b.size)
        return base, masked

    def score(self, texts: Sequence[str]) -> np.ndarray:
        self._require_ready()
        base, masked = self.losses(texts)
        ok = base > 0
        return np.where(ok, (masked - base) / np.where(ok, base, 1.0), 0.0)

    # -------------------------------------------------------------- persistence
    def _extra_meta(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "n_layers": self.n_layers, "n_heads": self.n_heads}

    def _save_state(self, directory: Path) -> None:
        from quadsel.core.atomic import atomic_write_text, canonical_json

        scores = None if self.head_scores is None else [[float(x) for x in row] for row in self.head_scores]
        state = {"n_layers": self.n_layers, "n_heads": self.n_heads, "heads": [list(h) for h in self.heads],
                 "head_scores": scores}
        atomic_write_text(directory / HEADS_FILE, canonical_json(state))

    def _load_state(self, directory: Path, meta: dict) -> None:
        path = directory / HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: missing {HEADS_FILE} (the attention scorer's heads)")
        state = json.loads(path.read_text(encoding="utf-8"))
        if (state.get("n_layers"), state.get("n_heads")) != (self.n_layers, self.n_heads):
            raise ValueError(f"{path}: saved for {state.get('n_layers')} layers x {state.get('n_heads')} heads, "
                             f"the model has {self.n_layers} x {self.n_heads}")
        self.heads = self._check_heads(state["heads"], str(path))
        hs = state.get("head_scores")
        self.head_scores = None if hs is None else np.array(hs, dtype=np.float64)


__all__ = ["AttentionConfig", "AttentionInfluenceScorer"]
