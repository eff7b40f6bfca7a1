"""InfluenceModel: a transformers causal LM + its tokenizer, batched, with per-example summed loss.

- Texts are tokenized once (the tokenizer's special tokens included, truncated to ``max_length``
  from the left end of the text: the first ``max_length`` tokens are kept).
- Batches are right-padded; padding is masked out of the loss and of every statistic.
- The per-example loss is the SUM of that example's next-token losses (never a batch mean), so
  nothing computed from it depends on batch size, batch composition or padding.
- Examples are batched in order of decreasing length (less padding); results are always
  returned in input order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float32 on CPU, bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or 'auto', got {dtype!r}") from None


@dataclass
class Batch:
    """A right-padded batch. ``index``: positions of these rows in the caller's text list."""

    index: np.ndarray
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


class InfluenceModel:
    """A causal LM wrapped for influence computations.

    Build it with :meth:`load` (a local model directory or a hub id) or :meth:`from_pretrained_objects`
    (a model and tokenizer already in memory).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_length: int = 512,
        batch_size: int = 8,
        device: str | torch.device = "auto",
        source: str | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.source = source
        self.dtype = next(model.parameters()).dtype
        self._fill_id = self._pick_fill_id()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path_or_id: str | Path,
        *,
        max_length: int = 512,
        batch_size: int = 8,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> "InfluenceModel":
        """Load ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a directory or hub id."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        src = str(path_or_id)
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dt, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a causal LM + tokenizer from {src!r}: {exc}") from exc
        return cls(model, tok, max_length=max_length, batch_size=batch_size, device=dev, source=src)

    @classmethod
    def from_pretrained_objects(cls, model: nn.Module, tokenizer, **kwargs) -> "InfluenceModel":
        return cls(model, tokenizer, **kwargs)

    def describe(self) -> dict:
        return {"source": self.source, "max_length": self.max_length, "batch_size": self.batch_size,
                "dtype": str(self.dtype).replace("torch.", ""),
                "model_type": getattr(self.model.config, "model_type", None)}

    def _pick_fill_id(self) -> int:
        tok = self.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
            v = getattr(tok, attr, None)
            if isinstance(v, int):
                return v
        return 0

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: special tokens included, truncated to ``max_length`` (>= 1 token)."""
        texts = _check_texts(texts)
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                             max_length=self.max_length)["input_ids"]
        return [list(ids) if len(ids) else [self._fill_id] for ids in enc]

    def count_tokens(self, texts: Sequence[str], *, truncate: bool = False) -> np.ndarray:
        """Tokens per text (int64). Default: the text's own tokens, no special tokens, no
        truncation (what training on it costs). ``truncate=True``: what the influence model sees."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.int64)
        if truncate:
            return np.array([len(t) for t in self.tokenize(texts)], dtype=np.int64)
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return np.array([len(ids) for ids in enc], dtype=np.int64)

    def batches(self, texts: Sequence[str], batch_size: int | None = None) -> Iterator[Batch]:
        """Right-padded batches in order of decreasing length; ``Batch.index`` maps rows back."""
        ids = self.tokenize(texts)
        yield from self.batches_from_ids(ids, batch_size)

    def batches_from_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None, *,
                         max_padding: float | None = None) -> Iterator[Batch]:
        """Right-padded batches in order of decreasing length. ``max_padding`` (a fraction, e.g.
        0.1): also close a batch early rather than let padding exceed that share of its tokens
        (see :func:`length_buckets`); scores do not depend on batch composition either way."""
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        for idx in length_buckets(lengths, bs, max_padding=max_padding):
            T = int(lengths[idx].max())
            inp = torch.full((len(idx), T), self._fill_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, j in enumerate(idx):
                n = int(lengths[j])
                inp[r, :n] = torch.as_tensor(ids[j], dtype=torch.long)
                mask[r, :n] = 1
            yield Batch(index=idx, input_ids=inp.to(self.device), attention_mask=mask.to(self.device))

    # ------------------------------------------------------------------ loss
    def logits(self, batch: Batch) -> torch.Tensor:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits

    @staticmethod
    def summed_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example SUM of next-token cross-entropies, padding masked: ``[B]`` float32.

        ``labels`` (``[B, T]``, optional) replaces ``input_ids`` as targets (e.g. sampled labels
        for a true-Fisher fit); position 0 is never a target.
        """
        source = input_ids if labels is None else labels
        # position t predicts token t+1; the last position and padding are ignored. Working on
        # the full (contiguous) logits avoids a [B, T, V] slice copy and its zero-filled backward.
        targets = torch.full_like(source, -100)
        targets[:, :-1] = source[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), -100)
        lg = logits if logits.dtype == torch.float32 else logits.float()
        tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="none",
                              ignore_index=-100)
        return tok.view(targets.shape).sum(dim=1)

    @torch.no_grad()
    def per_example_loss(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Summed token loss per text (float64), in input order."""
        out = np.zeros(len(texts), dtype=np.float64)
        for b in self.batches(texts, batch_size):
            out[b.index] = self.summed_loss(self.logits(b), b.input_ids, b.attention_mask).double().cpu().numpy()
        return out


def length_buckets(lengths: Sequence[int], batch_size: int, *, max_padding: float | None = None) -> list[np.ndarray]:
    """Row indices grouped into batches: decreasing length (stable), at most ``batch_size`` rows, and
    with ``max_padding`` (a fraction in [0, 1)) a batch is closed before a row that would make its
    padding exceed that share of the batch's ``rows x longest`` tokens (padding is computed
    through the forward and backward but never scored). ``max_padding=None``: fixed-size chunks of
    the sorted order (what :meth:`InfluenceModel.batches` does). A job does not call ``score`` per
    group: it hands the executor a round's texts longest first (``jobs.selection_run.length_order``),
    so that its chunks of one batch each are already of similar lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_padding is not None and not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding: expected a fraction in [0, 1), got {max_padding}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(-lengths, kind="stable")
    if max_padding is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    out, start, real = [], 0, 0
    for k, j in enumerate(order):
        rows = k - start + 1
        longest = int(lengths[order[start]])
        pad = rows * longest - (real + int(lengths[j]))
        if k > start and (rows > batch_size or pad > max_padding * rows * longest):
            out.append(order[start:k])
            start, real = k, 0
        real += int(lengths[j])
    if start < len(order):
        out.append(order[start:])
    return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
    return out
