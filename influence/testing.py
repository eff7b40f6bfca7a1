"""Tiny models built from configs (no downloads) for tests and examples."""
from __future__ import annotations

from typing import Literal

import torch

from .model import InfluenceModel
from .proxy import train_tokenizer

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 plus 30? Answer: 42.",
    "int main(void) { return 0; }",
    "To be, or not to be, that is the question.",
    "Influence functions estimate the effect of training data.",
    "A tiny model is enough to test the math.",
    "for (i = 0; i < n; i++) sum += a[i];",
    "Four score and seven years ago our fathers brought forth.",
    "x",
    "",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
    "The cat sat on the mat and looked at the hat.",
]


def tiny_tokenizer(vocab_size: int = 320, max_length: int = 64):
    corpus = SAMPLE_TEXTS * 4 + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}();=+-*/<>"]
    return train_tokenizer(corpus, vocab_size, max_length)


def tiny_model(arch: Literal["llama", "gpt2"] = "llama", *, vocab_size: int = 320, hidden: int = 32,
               layers: int = 2, heads: int = 4, max_positions: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                          max_position_embeddings=max_positions, tie_word_embeddings=False,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_positions=max_positions, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"arch: expected 'llama' or 'gpt2', got {arch!r}")
    return model.to(dtype).eval()


def tiny_influence_model(arch: Literal["llama", "gpt2"] = "llama", *, max_length: int = 32,
                         batch_size: int = 4, seed: int = 0, **kwargs) -> InfluenceModel:
    tok = tiny_tokenizer(max_length=max_length)
    model = tiny_model(arch, vocab_size=len(tok), seed=seed, **kwargs)
    return InfluenceModel(model, tok, max_length=max_length, batch_size=batch_size, device="cpu")


_WORDS = ("the a of to and in is it that for on with as was at by an be this from or are have not "
          "data model loss train test token layer code math int void return sum add plus answer question "
          "king queen speech nation people war peace film good bad love hate 1 2 3 4 5 6 7 8 9 0 ; { } ( ) = +"
          ).split()


def random_texts(n: int, *, seed: int = 0, min_words: int = 1, max_words: int = 24) -> list[str]:
    """Deterministic pseudo-sentences of mixed lengths over a small vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


# ---------------------------------------------------------------------- an architecture matrix
# Tiny configs of common transformers causal-LM architectures (random init, no downloads).
# ``h``: hidden size, ``L``: layers, ``nh``: attention heads, ``kv``: key-value heads, ``ff``:
# MLP width; each entry maps them onto that config class's own field names.
ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2",
                 "phi", "phi3", "opt", "bloom", "gptj", "falcon", "starcoder2", "gpt_bigcode", "olmo")


def _arch_kwargs(model_type: str, h: int, L: int, nh: int, kv: int, ff: int, pos: int) -> dict:
    llama_like = dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
                      intermediate_size=ff, max_position_embeddings=pos)
    table = {
        "gpt2": dict(n_embd=h, n_layer=L, n_head=nh, n_positions=pos, n_inner=ff),
        "gpt_neox": dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=ff,
                         max_position_embeddings=pos),
        "llama": llama_like, "qwen2": llama_like, "mistral": llama_like, "starcoder2": llama_like,
        "qwen3": dict(llama_like, head_dim=h // nh),
        "mixtral": dict(llama_like, num_local_experts=4, num_experts_per_tok=2),
        "gemma": dict(llama_like, head_dim=h // nh),
        "gemma2": dict(llama_like, head_dim=h // nh, sliding_window=8),
        "phi": dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=ff,
                    max_position_embeddings=pos),
        "phi3": dict(llama_like, original_max_position_embeddings=pos),
        "opt": dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, ffn_dim=ff, word_embed_proj_dim=h,
                    max_position_embeddings=pos),
        "bloom": dict(hidden_size=h, n_layer=L, n_head=nh),
        "gptj": dict(n_embd=h, n_layer=L, n_head=nh, rotary_dim=(h // nh) // 2, n_positions=pos, n_inner=ff),
        "falcon": dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, max_position_embeddings=pos),
        "gpt_bigcode": dict(n_embd=h, n_layer=L, n_head=nh, n_positions=pos, n_inner=ff),
        "olmo": dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=ff,
                     max_position_embeddings=pos),
    }
    if model_type not in table:
        raise ValueError(f"model_type: expected one of {ARCHITECTURES}, got {model_type!r}")
    return table[model_type]


def tiny_arch_config(model_type: str, *, vocab_size: int = 320, hidden: int = 16, layers: int = 2, heads: int = 2,
                     kv_heads: int | None = None, ffn: int | None = None, max_positions: int = 64, **overrides):
    """A tiny ``transformers`` config of ``model_type`` (one of :data:`ARCHITECTURES`)."""
    from transformers import AutoConfig

    kw = _arch_kwargs(model_type, hidden, layers, heads, kv_heads if kv_heads is not None else max(1, heads // 2),
                      ffn or 2 * hidden, max_positions)
    kw.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=0.2,
              tie_word_embeddings=False)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


_TOKENIZERS: dict[int, object] = {}


def tiny_arch_influence_model(model_type: str, *, max_length: int = 24, batch_size: int = 4, seed: int = 0,
                              dtype: torch.dtype = torch.float32, **kwargs) -> InfluenceModel:
    """An :class:`InfluenceModel` around a random tiny ``model_type`` model and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    if max_length not in _TOKENIZERS:  # trained once per process (read-only afterwards)
        _TOKENIZERS[max_length] = tiny_tokenizer(max_length=max_length)
    tok = _TOKENIZERS[max_length]
    cfg = tiny_arch_config(model_type, vocab_size=len(tok), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return InfluenceModel(model, tok, max_length=max_length, batch_size=batch_size, device="cpu")
