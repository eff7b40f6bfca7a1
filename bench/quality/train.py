"""Train a fresh small LM on a selection and evaluate it on the held-out eval sets.

Identical for every method of a seed: the seed's proxy tokenizer, a Llama-style model with the
same initialisation (``torch.manual_seed(seed)``), the same number of steps, batch, sequence
length and learning-rate schedule. Documents are joined (``BOS`` + tokens each, in a seeded
random order) into one stream cut into ``seq_len`` windows; steps draw windows without
replacement, starting a new (reshuffled) epoch when a selection runs out. Fixed compute for all
methods means that the 2x / 4x random selections see more distinct data in the same steps.

Evaluation (the only place ``eval.jsonl`` is read): every document is tokenized with ``BOS``
first and cut into windows of ``seq_len + 1`` tokens that overlap by one, so every token of the
text is predicted exactly once. Mean loss = nats / predicted tokens; bits per byte = nats / ln 2
/ UTF-8 bytes of the evaluated texts (comparable across tokenizers, i.e. across seeds).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quadsel.influence.proxy import lm_train_step

from .config import QualityConfig
from .data import encode, load_tokenizer, read_texts


@dataclass
class EvalSet:
    name: str
    texts: list[str]
    n_docs_total: int
    bytes: int


def load_eval_sets(cfg: QualityConfig) -> dict[str, EvalSet]:
    """Every target's eval split (a fixed, seeded document subset when the config caps bytes)."""
    out: dict[str, EvalSet] = {}
    for name in cfg.all_targets():
        texts = read_texts(cfg.target_dir(name) / "eval.jsonl")
        cap = cfg.eval.max_bytes_per_target
        chosen = texts
        if cap is not None:
            order = np.random.default_rng(12345).permutation(len(texts))
            chosen, used = [], 0
            for i in order.tolist():
                b = len(texts[i].encode("utf-8"))
                if used + b > cap and chosen:
                    continue
                chosen.append(texts[i])
                used += b
                if used >= cap:
                    break
        out[name] = EvalSet(name, chosen, len(texts), sum(len(t.encode("utf-8")) for t in chosen))
    return out


def pack_windows(docs: list[np.ndarray], bos_id: int, seq_len: int, seed: int) -> np.ndarray:
    """``[n_windows, seq_len]`` int64: documents in a seeded order, BOS before each, cut into
    non-overlapping windows (the tail shorter than a window is dropped; at least one window)."""
    order = np.random.default_rng([seed, 0xDA7A]).permutation(len(docs))
    parts = []
    for i in order.tolist():
        parts.append(np.array([bos_id], dtype=np.int64))
        parts.append(np.asarray(docs[i], dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.array([bos_id], dtype=np.int64)
    if len(stream) < seq_len:
        stream = np.resize(stream, seq_len)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def build_lm(cfg: QualityConfig, vocab: int, bos_id: int, pad_id: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = cfg.lm
    conf = LlamaConfig(vocab_size=vocab, hidden_size=lm.hidden_size, intermediate_size=4 * lm.hidden_size,
                       num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                       num_key_value_heads=lm.num_heads, max_position_embeddings=lm.seq_len + 1,
                       bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=pad_id,
                       tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(10_000 + seed)  # the same initialisation for every method of a seed
    return LlamaForCausalLM(conf)


def _lr(step: int, cfg: QualityConfig) -> float:
    lm = cfg.lm
    warm = max(1, int(lm.warmup_frac * lm.steps))
    if step < warm:
        return lm.lr * (step + 1) / warm
    prog = (step - warm) / max(1, lm.steps - warm)
    return lm.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def train_lm(cfg: QualityConfig, windows: np.ndarray, model_dir: Path, seed: int):
    """Train the seed's fresh LM on ``windows``; returns (model, info)."""
    tok = load_tokenizer(model_dir)
    dev = torch.device(cfg.device)
    model = build_lm(cfg, len(tok), int(tok.bos_token_id), int(tok.pad_token_id), seed).to(dev)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.lm.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lm.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng([seed, 0x57E9])  # the same draw order for every method
    bs = cfg.lm.batch_size
    perm, pos, epochs = rng.permutation(len(windows)), 0, 1
    data = torch.from_numpy(windows)
    t0 = time.monotonic()
    losses = []
    for step in range(cfg.lm.steps):
        idx = []
        while len(idx) < bs:
            if pos >= len(perm):
                perm, pos, epochs = rng.permutation(len(windows)), 0, epochs + 1
            take = min(bs - len(idx), len(perm) - pos)
            idx.extend(perm[pos:pos + take].tolist())
            pos += take
        losses.append(lm_train_step(model, opt, data[idx].to(dev), _lr(step, cfg)))
    model.eval()
    seen = cfg.lm.steps * bs
    info = {"train_seconds": round(time.monotonic() - t0, 2), "windows": int(len(windows)),
            "epochs": round(seen / max(1, len(windows)), 3), "final_train_loss": round(float(np.mean(losses[-20:])), 4)}
    return model, info


@torch.no_grad()
def evaluate(cfg: QualityConfig, model, tok, ev: EvalSet) -> dict[str, float]:
    """Mean loss (nats / token) and bits per byte of ``model`` on an eval set."""
    dev = torch.device(cfg.device)
    L = cfg.lm.seq_len
    bos = int(tok.bos_token_id)
    chunks: list[list[int]] = []
    for ids in encode(tok, ev.texts):
        seq = [bos] + list(ids)
        for s in range(0, len(seq) - 1, L):
            chunks.append(seq[s:s + L + 1])
    chunks.sort(key=len, reverse=True)
    nats, count = 0.0, 0
    bs = cfg.eval.batch_size
    for a in range(0, len(chunks), bs):
        part = chunks[a:a + bs]
        T = len(part[0])
        inp = torch.zeros((len(part), T), dtype=torch.long)
        mask = torch.zeros((len(part), T), dtype=torch.bool)
        for r, c in enumerate(part):
            inp[r, :len(c)] = torch.as_tensor(c)
            mask[r, :len(c)] = True
        inp, mask = inp.to(dev), mask.to(dev)
        logits = model(input_ids=inp[:, :-1], attention_mask=mask[:, :-1].long(), use_cache=False).logits.float()
        tgt, valid = inp[:, 1:], mask[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                               reduction="none").view(tgt.shape)
        nats += float((ce * valid).sum())
        count += int(valid.sum())
    return {"loss": nats / max(1, count), "bpb": nats / math.log(2) / max(1, ev.bytes), "tokens": count}


def train_and_evaluate(cfg: QualityConfig, docs: list[np.ndarray], bos_id: int, model_dir: Path, seed: int,
                       eval_sets: dict[str, EvalSet]) -> dict:
    windows = pack_windows(docs, bos_id, cfg.lm.seq_len, seed)
    model, info = train_lm(cfg, windows, model_dir, seed)
    tok = load_tokenizer(model_dir)
    t0 = time.monotonic()
    info["eval"] = {name: evaluate(cfg, model, tok, ev) for name, ev in eval_sets.items()}
    info["eval_seconds"] = round(time.monotonic() - t0, 2)
    return info
