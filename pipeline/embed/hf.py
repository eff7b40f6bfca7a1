"""A Hugging Face encoder as embedder: mean of the last hidden states over non-padding tokens.

Any model ``AutoModel`` can load works (BERT-style encoders, or a decoder used as a proxy):
``embed.model`` is a local folder or a hub id (hub ids need network access or a warm cache;
tests and the demo use local folders only). Texts are sorted by length (longest first) before
batching, so that a batch pads little; the vectors come back in input order. On a GPU the
model runs in bf16 (fp16 where bf16 is unsupported) and the pooling is done in float32.

Nothing is learned: ``fit`` is a no-op, and ``save`` records the model reference and settings
(not the weights).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quadsel.core.atomic import atomic_write_json

from .base import META, EmbedConfig, Embedder, l2_normalize

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"embed.device = {device!r} but no CUDA device is available")
    return device


class HFEmbedder(Embedder):
    kind = "hf"

    def __init__(self, cfg: EmbedConfig) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not cfg.model:
            raise ValueError("embed.model is required when embed.kind is 'hf'")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModel.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise ValueError(f"embed.model = {cfg.model!r}: cannot load an encoder and tokenizer "
                             f"from it ({e})") from e
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"embed.model = {cfg.model!r}: the tokenizer has no pad, eos or "
                                 "unk token to pad batches with")
            self.tokenizer.pad_token = fallback
        self.dtype = torch.float32
        if self.device.startswith("cuda"):
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.dim = int(model.config.hidden_size)
        logger.info("hf embedder: %s on %s (%s), dim %d", cfg.model, self.device,
                    str(self.dtype).replace("torch.", ""), self.dim)

    def fit(self, texts: Sequence[str]) -> None:
        """A pretrained encoder learns nothing from the pool."""

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for start in range(0, n, bs):
                rows = order[start:start + bs]
                enc = self.tokenizer([texts[int(i)] for i in rows], padding=True, truncation=True,
                                     max_length=self.cfg.max_length, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                mean = summed / mask.sum(dim=1).clamp(min=1.0)
                out[rows] = mean.cpu().numpy()
        return l2_normalize(out)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.cfg.model, "max_length": self.cfg.max_length,
                "pooling": "mean"}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / META, {**self.describe(), "config": self.cfg.model_dump(mode="json")})

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "HFEmbedder":
        return cls(EmbedConfig(**meta["config"]))
