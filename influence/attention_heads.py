"""Attention heads of a causal LM: where they are, which ones retrieve, and how to mask them.

- :func:`find_attention_sites`: the self-attention modules, with separate value projections
  (``v_proj``: Llama, Mistral, Qwen2/3, Gemma, Phi, OPT, GPT-J, OLMo, StarCoder2, ...) or fused
  q/k/v (GPT-2, GPT-NeoX, Phi-3, BLOOM, Falcon, GPT-BigCode), multi-query and grouped-query
  heads included (see ``LAYOUTS``).
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
# Where a layer's value vectors sit in its value projection's output (``[..., out]``):
#   "split":   a separate v projection: ``[n_kv, d]`` (Llama, Mistral, Qwen, Gemma, Phi, OPT, GPT-J, OLMo, ...)
#   "concat":  fused ``[q (n_h d) | k (n_kv d) | v (n_kv d)]`` (GPT-2's c_attn, Phi-3's qkv_proj,
#              GPT-BigCode's multi-query c_attn)
#   "headwise": fused per head ``[n_h, (q d | k d | v d)]`` (GPT-NeoX, GPT-BigCode without multi-query)
#   "interleaved": fused ``[n_h, 3, d]`` (BLOOM, Falcon without multi-query)
#   "falcon_mq": fused ``[n_h + 2, d]``, the last row the single value head (Falcon multi-query)
#   "grouped": fused ``[n_kv, n_h / n_kv + 2, d]``, the last row of each group its value head
#              (Falcon's new decoder architecture)
# The output projection's input is always the per-head outputs concatenated, ``[n_h, d]``.
LAYOUTS = ("split", "concat", "headwise", "interleaved", "falcon_mq", "grouped")


@dataclass
class AttentionSite:
    """One self-attention module: its value and output projections and the value layout."""

    layer: int
    name: str
    module: nn.Module
    kind: str  # one of LAYOUTS
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: int | None  # sliding-window size, None = full causal attention
    value_module: nn.Module = None  # type: ignore[assignment]
    out_module: nn.Module = None  # type: ignore[assignment]

    def values(self, out: torch.Tensor) -> torch.Tensor:
        """The value projection's output -> ``[B, T, n_kv_heads, head_dim]``."""
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        lead = out.shape[:-1]
        if self.kind == "split":
            return out.reshape(*lead, kv, d)
        if self.kind == "concat":
            off = (h + kv) * d
            return out[..., off:off + kv * d].reshape(*lead, kv, d)
        if self.kind == "headwise":
            return out.reshape(*lead, h, 3 * d)[..., 2 * d:]
        if self.kind == "interleaved":
            return out.reshape(*lead, h, 3, d)[..., 2, :]
        if self.kind == "falcon_mq":
            return out.reshape(*lead, h + 2, d)[..., -1:, :]
        if self.kind == "grouped":
            return out.reshape(*lead, kv, h // kv + 2, d)[..., -1, :]
        raise ValueError(f"unknown attention layout {self.kind!r}")


def _window(config, layer: int) -> int | None:
    types = getattr(config, "layer_types", None)
    w = getattr(config, "sliding_window", None)
    if types is not None and layer < len(types):
        return int(w) if (types[layer] == "sliding_attention" and w) else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return int(w) if isinstance(w, int) and w else None


def _out_features(m: nn.Module) -> int:
    return int(m.out_features) if isinstance(m, nn.Linear) else int(m.weight.shape[-1])  # Conv1D: [in, out]


def _in_features(m: nn.Module) -> int:
    return int(m.in_features) if isinstance(m, nn.Linear) else int(m.weight.shape[0])


def _int(*vals) -> int:
    for v in vals:
        if isinstance(v, int) and v > 0:
            return v
    return 0


def _describe(name: str, mod: nn.Module, config) -> tuple | None:
    """``(kind, value_module, out_module, n_heads, n_kv_heads, head_dim)`` of a self-attention
    module, None when ``mod`` is not one; NotImplementedError for an attention it cannot mask."""
    mt = getattr(config, "model_type", "")
    g = lambda attr: getattr(mod, attr, None)  # noqa: E731
    out = next((g(a) for a in ("o_proj", "out_proj", "dense", "c_proj") if isinstance(g(a), nn.Module)), None)
    if out is None or not hasattr(out, "weight"):
        return None
    n_cfg = _int(getattr(config, "num_attention_heads", None), getattr(config, "n_head", None))
    if isinstance(g("v_proj"), nn.Module):
        if g("v_norm") is not None:
            raise NotImplementedError(f"{name}: attention with a value norm (v_norm) is not supported")
        hd = _int(g("head_dim"), g("head_size"), getattr(config, "head_dim", None))
        if hd <= 0 and n_cfg:
            hd = _in_features(out) // n_cfg
        if hd <= 0:
            raise NotImplementedError(f"{name}: attention module without a head_dim")
        return "split", g("v_proj"), out, _in_features(out) // hd, _out_features(g("v_proj")) // hd, hd
    fused = next((g(a) for a in ("qkv_proj", "query_key_value", "c_attn") if isinstance(g(a), nn.Module)), None)
    if fused is None:
        return None
    if getattr(mod, "is_cross_attention", False):
        return None
    n_h = _int(g("num_heads"), n_cfg)
    hd = _int(g("head_dim"), g("head_size"), (_in_features(out) // n_h) if n_h else 0)
    if not (n_h and hd and n_h * hd == _in_features(out)):
        raise NotImplementedError(f"{name}: cannot tell the heads of {type(mod).__name__} "
                                  f"({n_h} heads of {hd} for an output projection of {_in_features(out)})")
    width = _out_features(fused)
    if mt == "gpt_neox":
        kind, n_kv = "headwise", n_h
    elif mt == "bloom":
        if int(getattr(config, "pretraining_tp", 1) or 1) > 1 and getattr(config, "slow_but_exact", False):
            raise NotImplementedError(f"{name}: BLOOM with pretraining_tp > 1 and slow_but_exact bypasses its "
                                      "dense module; the attention scorer cannot mask its heads")
        kind, n_kv = "interleaved", n_h
    elif mt == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kind, n_kv = "grouped", _int(getattr(config, "num_kv_heads", None))
        elif getattr(config, "multi_query", True):
            kind, n_kv = "falcon_mq", 1
        else:
            kind, n_kv = "interleaved", n_h
    elif mt == "gpt_bigcode":
        kind, n_kv = ("concat", 1) if getattr(config, "multi_query", True) else ("headwise", n_h)
    elif isinstance(g("qkv_proj"), nn.Module):  # Phi-3 and other [q | k | v] fusions
        n_kv = _int(g("num_key_value_heads"), getattr(config, "num_key_value_heads", None), n_h)
        kind = "concat"
    elif mt == "gpt2" or (isinstance(g("c_attn"), nn.Module) and width == 3 * n_h * hd):
        kind, n_kv = "concat", n_h
    else:
        raise NotImplementedError(f"{name}: fused attention projection of {type(mod).__name__} ({mt}) has an "
                                  "unknown q/k/v layout; the attention scorer does not support it")
    if not n_kv or n_h % n_kv:
        raise NotImplementedError(f"{name}: {n_h} heads do not split into {n_kv} key-value heads")
    want = {"headwise": 3 * n_h * hd, "interleaved": 3 * n_h * hd, "falcon_mq": (n_h + 2) * hd,
            "grouped": (n_h + 2 * n_kv) * hd, "concat": (n_h + 2 * n_kv) * hd}[kind]
    if width != want:
        raise NotImplementedError(f"{name}: fused projection width {width} does not match the {kind} layout of "
                                  f"{n_h} heads / {n_kv} key-value heads of {hd} (expected {want})")
    return kind, fused, out, n_h, n_kv, hd


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Self-attention modules in layer order; a clear error for unsupported architectures."""
    config = model.config
    sites: list[AttentionSite] = []
    for name, mod in model.named_modules():
        d = _describe(name, mod, config)
        if d is None:
            continue
        kind, vmod, omod, n_h, n_kv, hd = d
        if n_h <= 0 or n_kv <= 0 or n_h % n_kv:
            raise NotImplementedError(f"{name}: {n_h} heads do not split into {n_kv} key-value heads")
        layer = int(getattr(mod, "layer_idx", None) if getattr(mod, "layer_idx", None) is not None else len(sites))
        sites.append(AttentionSite(layer, name, mod, kind, n_h, n_kv, hd, _window(config, layer), vmod, omod))
    if not sites:
        raise NotImplementedError(
            f"no supported self-attention modules in {type(model).__name__}: the attention scorer supports "
            "attention with a v projection (v_proj) or a fused q/k/v projection (c_attn, qkv_proj, "
            "query_key_value) and an output projection (o_proj, out_proj, dense, c_proj)")
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
