"""Training-trajectory scorers ``el2n`` and ``vog`` (Anand et al. 2023, "Influence Scores at Scale
for Efficient Language Data Sampling"), from saved checkpoints of the proxy model's training.

Neither uses a reference set or a fit step: they rank examples by how hard (EL2N) or how unstable
(VoG) the model finds them along its training, so they are task-agnostic.

- ``el2n``: per example, the mean over its target tokens (non-padding positions that predict a
  next token) of ``‖softmax(logits_t) − onehot(y_t)‖₂``, averaged over the checkpoints.
- ``vog``: per example, ``G_k = ∂(summed token loss)/∂(input embeddings)`` (``[T, d]``) at each
  checkpoint ``k``; the variance over checkpoints per element (population variance, ``1/K``);
  then the mean over the elements of its non-padding positions (the last real position predicts
  nothing, so its gradient is 0 and it is counted as such). One batched backward gives every
  example its own gradient because the summed losses of different examples do not interact.
  An example of one token has no target: both scores are 0 for it.

Sign: ``prefer="high"`` (default) returns the raw value (higher = harder / less stable = kept
first, as in the papers); ``prefer="low"`` returns its negation. For noisy web data the hardest
examples are often noise (boilerplate, garbled text), so ``"low"`` (or a middle band) may be the
better choice there.

Checkpoints: ``checkpoints=[dirs]`` (Hugging Face model directories, in trajectory order), or
``None``: ``<scoring model dir>/checkpoints/step_*`` sorted by step (as written by
``build_proxy_model(save_checkpoints=N)``), optionally only ``checkpoint_steps`` (e.g. the early
ones), plus the scoring model itself when ``include_final``. ``vog`` needs >= 2, ``el2n`` >= 1.
The checkpoints must share the scoring model's tokenizer (texts are tokenised once, with it).

Cost: ``el2n`` = K forward passes per text, ``vog`` = K forward + backward passes (to the
embeddings only). Checkpoints are loaded once per scorer and kept in host memory
(``cache_checkpoints``; K model copies of RAM); scoring moves ONE of them at a time to the device
(checkpoints outer, batches inner), so the device holds the scoring model + one checkpoint.
``vog`` keeps a per-token accumulator of ``2 × tokens × d_model`` float64 for ``chunk_size``
texts at a time (e.g. 256 texts × 256 tokens × d=128: 134 MB).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .base import Scorer, ScorerConfig, register_scorer
from .hooks import _frozen_params
from .model import Batch, InfluenceModel, _check_texts

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step_(\d+)")


@dataclass
class TrajectoryConfig(ScorerConfig):
    checkpoints: list[str] | None = None  # None: discover <model dir>/checkpoints/step_*
    checkpoint_steps: list[int] | None = None  # with discovery: only these steps
    include_final: bool = True  # with discovery: the scoring model itself is the last checkpoint
    prefer: Literal["high", "low"] = "high"
    chunk_size: int = 256  # texts per chunk (bounds vog's per-token accumulator)
    cache_checkpoints: bool = True  # keep loaded checkpoints in host memory between score calls
    seed: int = 0  # accepted for uniformity; nothing here is random


def discover_checkpoints(model_dir: str | Path, steps: Sequence[int] | None = None) -> list[tuple[int, Path]]:
    """``(step, dir)`` of ``model_dir/checkpoints/step_*`` sorted by step; ``steps`` selects."""
    root = Path(model_dir) / "checkpoints"
    found: dict[int, Path] = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.fullmatch(p.name)
            if m and p.is_dir():
                found[int(m.group(1))] = p
    if steps is not None:
        missing = sorted({int(s) for s in steps} - set(found))
        if missing:
            raise ValueError(f"checkpoint_steps: no checkpoint for step(s) {missing} under {root} "
                             f"(available: {sorted(found)})")
        found = {int(s): found[int(s)] for s in steps}
    return sorted(found.items())


class TrajectoryScorer(Scorer):
    """Shared machinery: checkpoint resolution, loading/caching, the chunk/checkpoint/batch loop."""

    config_cls = TrajectoryConfig
    needs_fit = False
    needs_reference = False
    needs_checkpoints = True  # a job saves proxy checkpoints for it
    min_checkpoints: ClassVar[int] = 1

    def __init__(self, model: InfluenceModel, config: Any = None) -> None:
        super().__init__(model, config)
        c = self.config
        if c.prefer not in ("high", "low"):
            raise ValueError(f"scorer {self.name!r}: prefer must be 'high' or 'low', got {c.prefer!r}")
        if int(c.chunk_size) < 1:
            raise ValueError(f"scorer {self.name!r}: chunk_size must be >= 1, got {c.chunk_size}")
        self.checkpoint_paths: list[str | None] = self._resolve()  # None = the scoring model itself
        self._cache: dict[int, nn.Module] = {}

    # -------------------------------------------------------------- checkpoints
    def _resolve(self) -> list[str | None]:
        c, src = self.config, self.model.source
        same = (lambda p: src is not None and Path(p).resolve() == Path(src).resolve())
        if c.checkpoints is not None:
            if c.checkpoint_steps is not None:
                raise ValueError(f"scorer {self.name!r}: checkpoint_steps selects among discovered "
                                 "checkpoints; with an explicit checkpoints list leave it unset")
            if isinstance(c.checkpoints, str):
                raise TypeError(f"scorer {self.name!r}: checkpoints must be a list of directories")
            paths: list[str | None] = []
            for p in c.checkpoints:
                if not Path(p).is_dir():
                    raise FileNotFoundError(f"scorer {self.name!r}: checkpoint directory {p} does not exist")
                paths.append(None if same(p) else str(Path(p).resolve()))
            where = "the checkpoints list"
        else:
            if src is None or not Path(src).is_dir():
                raise ValueError(f"scorer {self.name!r}: checkpoints is not set and the scoring model has no "
                                 "local directory to find checkpoints/step_* in; pass checkpoints=[dirs]")
            paths = [str(p.resolve()) for _, p in discover_checkpoints(src, c.checkpoint_steps)]
            if c.include_final:
                paths.append(None)
            where = f"{Path(src) / 'checkpoints'} (step_* dirs{', plus the final model' if c.include_final else ''})"
        if len(paths) < self.min_checkpoints:
            raise ValueError(f"scorer {self.name!r} needs at least {self.min_checkpoints} checkpoint(s); "
                             f"found {len(paths)} in {where} (build the proxy with save_checkpoints=N)")
        return paths

    def _resolved_dirs(self) -> list[str]:
        return [str(Path(self.model.source).resolve()) if p is None else p for p in self.checkpoint_paths]

    def _load(self, k: int) -> nn.Module:
        p = self.checkpoint_paths[k]
        if p is None:
            return self.model.model
        if k in self._cache:
            return self._cache[k]
        from transformers import AutoModelForCausalLM

        try:
            m = AutoModelForCausalLM.from_pretrained(p, dtype=self.model.dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(f"scorer {self.name!r}: cannot load checkpoint {p}: {exc}") from exc
        want = getattr(self.model.model.config, "vocab_size", None)
        if getattr(m.config, "vocab_size", None) != want:
            raise ValueError(f"scorer {self.name!r}: checkpoint {p} has vocab_size {m.config.vocab_size}, "
                             f"the scoring model {want}; checkpoints must share its tokenizer")
        m.eval().requires_grad_(False)
        if self.config.cache_checkpoints:
            self._cache[k] = m
        return m

    def _checkpoint_loop(self, ids: list[list[int]], per_batch) -> None:
        """For each checkpoint k (one on the device at a time), ``per_batch(k, model, batch)``."""
        from quadsel.core.progress import Progress

        dev = self.model.device
        K = len(self.checkpoint_paths)
        with Progress(f"{self.name} checkpoints x docs", total=K * len(ids), unit="docs") as prog:
            for k in range(K):
                m = self._load(k).to(dev)
                try:
                    with _frozen_params(m):
                        for b in self.model.batches_from_ids(ids, self.config.batch_size):
                            per_batch(k, m, b)
                            prog.advance(b.size)
                finally:
                    if self.checkpoint_paths[k] is not None and dev.type != "cpu":
                        m.to("cpu")

    @property
    def report(self) -> dict:
        """Shown by a job: the checkpoints used, in trajectory order."""
        return {"checkpoints": [Path(p).name if p else "final (scoring model)" for p in self.checkpoint_paths]}

    # -------------------------------------------------------------- steps
    def set_reference(self, texts: Sequence[str]) -> "TrajectoryScorer":
        """No reference set is used (accepted and ignored)."""
        _check_texts(texts)
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        self._require_ready()
        texts = _check_texts(texts)
        ids = self.model.tokenize(texts)
        out = np.zeros(len(ids), dtype=np.float64)
        cs = int(self.config.chunk_size)
        for s in range(0, len(ids), cs):
            out[s:s + cs] = self._score_chunk(ids[s:s + cs])
        return out if self.config.prefer == "high" else -out

    def _score_chunk(self, ids: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | Path, *, save_model: bool | None = None) -> Path:
        """As :meth:`Scorer.save`, with the resolved checkpoint directories pinned in the saved
        config, so a loaded scorer uses the very same ones (never rediscovers)."""
        cfg = self.config
        self.config = replace(cfg, checkpoints=self._resolved_dirs(), checkpoint_steps=None)
        try:
            return super().save(directory, save_model=save_model)
        finally:
            self.config = cfg

    def _extra_meta(self) -> dict:
        return {"checkpoints_used": self._resolved_dirs()}


def el2n_per_example(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of ``‖softmax(logits_t) − onehot(y_t)‖₂``: ``[B]`` float64.

    Computed as ``sqrt(Σ_{v≠y} p_v² + (1 − p_y)²)`` (no cancellation when ``p_y → 1``)."""
    p = torch.softmax(logits[:, :-1].float(), dim=-1)
    y = input_ids[:, 1:].unsqueeze(-1)
    valid = attention_mask[:, 1:].bool()
    p_y = p.gather(-1, y).squeeze(-1)
    p.square_().scatter_(-1, y, 0.0)
    err = (p.sum(-1) + (1.0 - p_y).square()).sqrt().double() * valid
    return err.sum(1) / valid.sum(1).clamp_min(1)  # 0 for an example without a target


def embedding_gradients(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``∂ Σ_b loss_b / ∂ e`` for the input embeddings ``e`` (``[B, T, d]`` float32, padding 0):
    row ``b`` is example b's own gradient (examples do not interact)."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError("the model has no input embedding module (get_input_embeddings() is None)")
    with torch.enable_grad():
        e = emb(batch.input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=e, attention_mask=batch.attention_mask, use_cache=False).logits
        loss = InfluenceModel.summed_loss(logits, batch.input_ids, batch.attention_mask)
        (g,) = torch.autograd.grad(loss.sum(), e)
    return g.float() * batch.attention_mask.unsqueeze(-1).to(torch.float32)


@register_scorer("el2n")
class EL2NScorer(TrajectoryScorer):
    """EL2N: mean token error norm, averaged over checkpoints (higher = harder)."""

    min_checkpoints = 1

    @torch.no_grad()
    def _score_chunk(self, ids: list[list[int]]) -> np.ndarray:
        acc = torch.zeros(len(ids), dtype=torch.float64)

        def per_batch(k, m, b):
            logits = m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            acc[torch.as_tensor(b.index)] += el2n_per_example(logits, b.input_ids, b.attention_mask).cpu()

        self._checkpoint_loop(ids, per_batch)
        return (acc / len(self.checkpoint_paths)).numpy()


@register_scorer("vog")
class VoGScorer(TrajectoryScorer):
    """VoG: variance over checkpoints of the input-embedding gradient (higher = less stable)."""

    min_checkpoints = 2

    def _score_chunk(self, ids: list[list[int]]) -> np.ndarray:
        dev = self.model.device
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        d_model = int(self.model.model.get_input_embeddings().weight.shape[1])
        mean = torch.zeros(int(offsets[-1]), d_model, dtype=torch.float64, device=dev)
        m2 = torch.zeros_like(mean)

        def per_batch(k, m, b):
            g = embedding_gradients(m, b)
            rows = g[b.attention_mask.bool()].double()  # row-major: example by example, in order
            dest = torch.as_tensor(np.concatenate([np.arange(offsets[j], offsets[j] + lengths[j]) for j in b.index]),
                                   device=dev)
            delta = rows - mean[dest]  # Welford over checkpoints
            mean[dest] += delta / (k + 1)
            m2[dest] += delta * (rows - mean[dest])

        self._checkpoint_loop(ids, per_batch)
        per_token = (m2 / len(self.checkpoint_paths)).mean(1).cpu()
        seg = torch.zeros(len(ids), dtype=torch.float64).index_add_(
            0, torch.as_tensor(np.repeat(np.arange(len(ids)), lengths)), per_token)
        return (seg / torch.as_tensor(lengths, dtype=torch.float64)).numpy()


__all__ = ["TrajectoryConfig", "TrajectoryScorer", "EL2NScorer", "VoGScorer", "discover_checkpoints",
           "el2n_per_example", "embedding_gradients"]
