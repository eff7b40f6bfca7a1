"""Attention heads of a causal LM: where they are, which ones retrieve, and how to mask them.

- :func:`find_attention_sites`: the self-attention modules of Llama-like models (separate
  ``v_proj``/``o_proj``: Llama, Mistral, Qwen2/3, ...) and GPT-2 (fused ``c_attn`` Conv1D).
- :func:`build_probes` + :func:`retrieval_scores`: synthetic key-value retrieval prompts made of
  the model's own ordinary vocabulary tokens, and per (layer, head) the share of answer tokens for
  which the head's argmax attention (from the position predicting the answer token) is the
  context position holding the token being copied (teacher forced; eager attention).
- :class:`HeadMasker`: replaces the attention probabilities of chosen heads by the uniform
  distribution over the positions the causal + padding mask allows.

Masking is done on the head outputs, not inside the attention kernel: with uniform weights a
head's output at query position t is the mean of its value vectors over the allowed positions
``{s <= t : mask[s] = 1}``, i.e. a masked cumulative mean of V. A forward hook keeps the value
projection's output and a forward pre-hook on the output projection (``o_proj``/``c_proj``, whose
input is the per-head outputs concatenated) swaps the masked heads' slices for that mean. This is
exact, batched, and independent of the attention implementation (sdpa, eager, flash), so scoring
keeps the model's fast kernel; nothing is registered globally in transformers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn


# ====================================================================== sites
@dataclass
class AttentionSite:
    """One self-attention module. ``kind``: "llama" (v_proj/o_proj) or "gpt2" (c_attn/c_proj)."""

    layer: int
    name: str
    module: nn.Module
    kind: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: int | None  # sliding-window size, None = full causal attention

    @property
    def value_module(self) -> nn.Module:
        return self.module.v_proj if self.kind == "llama" else self.module.c_attn

    @property
    def out_module(self) -> nn.Module:
        return self.module.o_proj if self.kind == "llama" else self.module.c_proj

    def values(self, out: torch.Tensor) -> torch.Tensor:
        """The value projection's output -> ``[B, T, n_kv_heads, head_dim]``."""
        if self.kind == "gpt2":
            e = self.n_heads * self.head_dim
            out = out[..., 2 * e:3 * e]
        return out.reshape(*out.shape[:-1], self.n_kv_heads, self.head_dim)


def _window(config, layer: int) -> int | None:
    types = getattr(config, "layer_types", None)
    w = getattr(config, "sliding_window", None)
    if types is not None and layer < len(types):
        return int(w) if (types[layer] == "sliding_attention" and w) else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return int(w) if w else None


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Self-attention modules in layer order; a clear error for unsupported architectures."""
    config = model.config
    sites: list[AttentionSite] = []
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "v_proj", None), nn.Module) and isinstance(getattr(mod, "o_proj", None), nn.Module):
            if getattr(mod, "v_norm", None) is not None:
                raise NotImplementedError(f"{name}: attention with a value norm (v_norm) is not supported")
            hd = int(getattr(mod, "head_dim", 0) or 0)
            if hd <= 0:
                raise NotImplementedError(f"{name}: attention module without a head_dim")
            kind, n_h, n_kv = "llama", mod.o_proj.in_features // hd, mod.v_proj.out_features // hd
        elif isinstance(getattr(mod, "c_attn", None), nn.Module) and isinstance(getattr(mod, "c_proj", None), nn.Module) \
                and hasattr(mod, "num_heads"):
            if getattr(mod, "is_cross_attention", False):
                continue
            kind, n_h, hd = "gpt2", int(mod.num_heads), int(mod.head_dim)
            n_kv = n_h
        else:
            continue
        layer = int(getattr(mod, "layer_idx", None) if getattr(mod, "layer_idx", None) is not None else len(sites))
        sites.append(AttentionSite(layer, name, mod, kind, n_h, n_kv, hd, _window(config, layer)))
    if not sites:
        raise NotImplementedError(
            f"no supported self-attention modules in {type(model).__name__}: the attention scorer supports "
            "Llama-like models (v_proj/o_proj) and GPT-2 (c_attn/c_proj)")
    sites.sort(key=lambda s: s.layer)
    if [s.layer for s in sites] != list(range(len(sites))):
        raise NotImplementedError(f"{type(model).__name__}: attention layer indices are not 0..L-1")
    return sites


# ====================================================================== masking
def uniform_head_output(v: torch.Tensor, attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Output of heads whose attention is uniform over the allowed positions.

    ``v``: ``[B, T, m, d]`` value vectors; ``attention_mask``: ``[B, T]`` (1 = real token).
    Position t averages ``v_s`` over ``s <= t`` with ``mask[s] = 1`` (and ``t - s < window``).
    Accumulated in float32; rows with no allowed position give 0.
    """
    m = attention_mask.to(torch.float32)[:, :, None, None]
    num = torch.cumsum(v.float() * m, dim=1)
    den = torch.cumsum(m, dim=1)
    if window is not None and window < v.shape[1]:
        num = num - torch.nn.functional.pad(num, (0, 0, 0, 0, window, 0))[:, :-window]
        den = den - torch.nn.functional.pad(den, (0, 0, 0, 0, window, 0))[:, :-window]
    return (num / den.clamp_min(1.0)).to(v.dtype)


class HeadMasker:
    """Context manager: hooks that make chosen heads attend uniformly while :meth:`logits` runs.

    Outside :meth:`logits` the hooks pass everything through, so the unmasked model can be run
    inside the same context.
    """

    def __init__(self, sites: Sequence[AttentionSite], heads: Sequence[tuple[int, int]]) -> None:
        self.sites = list(sites)
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            if not (0 <= layer < len(self.sites)) or not (0 <= head < self.sites[layer].n_heads):
                raise ValueError(f"head ({layer}, {head}) does not exist in a model with {len(self.sites)} "
                                 f"layers of {self.sites[0].n_heads} heads")
            self.by_layer.setdefault(int(layer), []).append(int(head))
        self._handles: list = []
        self._values: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def __enter__(self) -> "HeadMasker":
        for layer, heads in self.by_layer.items():
            site = self.sites[layer]
            self._handles.append(site.value_module.register_forward_hook(self._value_hook(site)))
            self._handles.append(site.out_module.register_forward_pre_hook(self._out_hook(site, sorted(set(heads)))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values.clear()
        self._mask = None

    def _value_hook(self, site: AttentionSite):
        def hook(_mod, _inp, out):
            if self._mask is not None:
                self._values[site.layer] = out
        return hook

    def _out_hook(self, site: AttentionSite, heads: list[int]):
        rep = site.n_heads // site.n_kv_heads
        kv_idx = torch.tensor([h // rep for h in heads], dtype=torch.long)

        def hook(_mod, args):
            if self._mask is None:
                return None
            x = args[0]
            v = site.values(self._values.pop(site.layer))[:, :, kv_idx.to(x.device)]
            u = uniform_head_output(v, self._mask, site.window).to(x.dtype)
            x = x.view(*x.shape[:-1], site.n_heads, site.head_dim).clone()
            x[:, :, heads] = u
            return (x.view(*x.shape[:-2], -1),) + tuple(args[1:])
        return hook

    def logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self._handles and self.by_layer:
            raise RuntimeError("HeadMasker.logits: use it inside `with HeadMasker(...)`")
        self._mask = attention_mask
        try:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            self._mask = None
            self._values.clear()


# ====================================================================== probes
@dataclass(frozen=True)
class ProbeSet:
    """Key-value retrieval prompts (all the same length, no padding).

    ``query_pos[i, j]``: the position predicting answer token j of prompt i;
    ``source_pos[i, j]``: the context position holding that token.
    """

    input_ids: np.ndarray  # [n, T] int64
    query_pos: np.ndarray  # [n, v] int64
    source_pos: np.ndarray  # [n, v] int64


def ordinary_tokens(tokenizer) -> np.ndarray:
    """Vocabulary ids of ordinary words: decoded text is ASCII letters, not special.

    Space-prefixed words of >= 2 letters (what a word inside a sentence is) are preferred; bare
    letter pieces are appended after them (used only when a probe needs more distinct tokens).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    words, pieces = [], []
    for i, t in enumerate(texts):
        if i in special or not t or not t.strip().isascii() or not t.strip().isalpha():
            continue
        if t[0] == " " and t[1:].isalpha() and len(t) >= 3:
            words.append(i)
        elif t.isalpha():
            pieces.append(i)
    return np.array(words + pieces, dtype=np.int64)


def _plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before a text (e.g. BOS)."""
    plain = _plain(tokenizer, "hello")
    full = list(tokenizer("hello", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def build_probes(tokenizer, *, n: int, pairs: int, key_tokens: int, value_tokens: int, seed: int,
                 max_length: int) -> ProbeSet:
    """``n`` prompts ``[BOS] k1: v1\\n k2: v2\\n ... kq: vq`` over distinct ordinary tokens.

    Keys are ``key_tokens`` and values ``value_tokens`` random tokens; the query key is a random
    earlier key and the answer ``vq`` is its value. Every token of a prompt's keys and values is
    distinct, so the copied token occurs once in the context. ``pairs`` shrinks to fit
    ``max_length`` and the vocabulary.
    """
    vocab = ordinary_tokens(tokenizer)
    sep, nl, prefix = _plain(tokenizer, ":"), _plain(tokenizer, "\n"), _special_prefix(tokenizer)
    per_pair = key_tokens + len(sep) + value_tokens + len(nl)
    fit = (max_length - len(prefix) - key_tokens - len(sep) - value_tokens) // per_pair
    pairs = min(pairs, fit, len(vocab) // (key_tokens + value_tokens))
    if pairs < 1:
        raise ValueError(f"cannot build retrieval probes: max_length={max_length} and {len(vocab)} ordinary "
                         f"tokens leave room for {pairs} key-value pairs (need >= 1)")
    rng = np.random.default_rng(seed)
    rows, qpos, spos = [], [], []
    for _ in range(n):
        toks = rng.choice(vocab, size=pairs * (key_tokens + value_tokens), replace=False)
        keys = toks[:pairs * key_tokens].reshape(pairs, key_tokens)
        vals = toks[pairs * key_tokens:].reshape(pairs, value_tokens)
        q = int(rng.integers(pairs))
        ids, src = list(prefix), 0
        for i in range(pairs):
            ids += [*keys[i], *sep]
            if i == q:
                src = len(ids)
            ids += [*vals[i], *nl]
        ids += [*keys[q], *sep]
        start = len(ids)
        ids += list(vals[q])
        rows.append(ids)
        qpos.append(np.arange(start - 1, start - 1 + value_tokens))
        spos.append(np.arange(src, src + value_tokens))
    return ProbeSet(np.array(rows, dtype=np.int64), np.array(qpos, dtype=np.int64), np.array(spos, dtype=np.int64))


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch a transformers model to eager attention (attention weights visible)."""
    old = getattr(model.config, "_attn_implementation", None)
    if old == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.no_grad()
def retrieval_scores(model: nn.Module, sites: Sequence[AttentionSite], probes: ProbeSet, *,
                     batch_size: int, device: torch.device) -> np.ndarray:
    """Per (layer, head) share of answer tokens whose source position is the head's argmax
    attention from the predicting position: float64 ``[L, H]``."""
    L, H = len(sites), max(s.n_heads for s in sites)
    hits = torch.zeros(L, H, dtype=torch.float64)
    total = probes.query_pos.size
    with eager_attention(model):
        for s in range(0, len(probes.input_ids), batch_size):
            ids = torch.as_tensor(probes.input_ids[s:s + batch_size], device=device)
            qp = torch.as_tensor(probes.query_pos[s:s + batch_size], device=device)  # [b, v]
            sp = torch.as_tensor(probes.source_pos[s:s + batch_size], device=device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False)
            att = out.attentions
            if att is None or len(att) != L:
                raise RuntimeError(f"{type(model).__name__}: expected attention weights of {L} layers from eager "
                                   f"attention, got {0 if att is None else len(att)}")
            b, v = qp.shape
            for layer, a in enumerate(att):  # a: [b, H, T, T]
                rows = a[torch.arange(b, device=device)[:, None], :, qp]  # [b, v, H, T]
                arg = rows.float().argmax(dim=-1)  # [b, v, H]
                hits[layer, :a.shape[1]] += (arg == sp[:, :, None]).sum((0, 1)).double().cpu()
    return (hits / max(total, 1)).numpy()


def top_heads(scores: np.ndarray, fraction: float) -> list[tuple[int, int]]:
    """The ``max(1, round(fraction * L * H))`` best heads (ties: lower layer, then lower head)."""
    L, H = scores.shape
    k = max(1, int(round(fraction * L * H)))
    flat = scores.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    return sorted((int(i // H), int(i % H)) for i in order)
