"""build_proxy_model: the embedded default model when the user gives none.

A tiny Llama-style causal LM with a byte-level BPE tokenizer trained on the spot (``tokenizers``),
trained for a few hundred steps on a sample of the pool, saved as a normal Hugging Face model
directory (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it). Seeded and
deterministic on a given machine; the defaults take well under two minutes on 2 CPU cores for
about 5k short documents.

Training data: the texts are tokenized, joined with ``<|endoftext|>`` separators into one stream,
and each step draws ``batch_size`` random windows of ``train_length`` tokens from it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from quadsel.core.progress import Progress

logger = logging.getLogger(__name__)

BOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class ProxyArgs:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_length: int = 256  # max_position_embeddings and tokenizer model_max_length
    train_length: int = 128  # tokens per training window (<= max_length)
    steps: int = 250
    batch_size: int = 16
    lr: float = 3e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    save_checkpoints: int = 0
    tokenizer_docs: int = 5000  # at most this many texts train the tokenizer

    def validate(self) -> None:
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_length", "train_length",
                  "steps", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"build_proxy_model: {k} must be >= 1, got {getattr(self, k)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"build_proxy_model: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.train_length > self.max_length:
            raise ValueError("build_proxy_model: train_length must be <= max_length")
        if self.save_checkpoints < 0 or self.save_checkpoints >= self.steps:
            raise ValueError("build_proxy_model: save_checkpoints must be in [0, steps)")


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer (GPT-2 style) that prepends ``<|endoftext|>`` as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   model_max_length=max_length)


def _lr_at(step: int, args: ProxyArgs) -> float:
    warm = max(1, int(args.warmup_frac * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    prog = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def _save_dir(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def lm_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
                  clip: float = 1.0) -> float:
    """One causal-LM training step on ``batch`` (token ids, every position a target) at ``lr``:
    mean token loss, backward, gradient-norm clip, optimizer step. Returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.detach())


def build_proxy_model(texts: Sequence[str], out_dir: str | os.PathLike, *, seed: int = 0,
                      vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 2,
                      num_heads: int = 4, intermediate_size: int | None = None, max_length: int = 256,
                      train_length: int = 128, steps: int = 250, batch_size: int = 16, lr: float = 3e-3,
                      save_checkpoints: int = 0, overwrite: bool = False) -> Path:
    """Train the proxy model on ``texts`` and write it to ``out_dir`` (atomically); return the path.

    ``save_checkpoints=N`` also writes N intermediate checkpoints (full model directories) under
    ``out_dir/checkpoints/step_XXXXXX``, evenly spaced over training.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ProxyArgs(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                     num_heads=num_heads, intermediate_size=intermediate_size, max_length=max_length,
                     train_length=train_length, steps=steps, batch_size=batch_size, lr=lr,
                     save_checkpoints=save_checkpoints)
    args.validate()
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise ValueError("build_proxy_model: need at least 2 non-empty texts to train on")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"build_proxy_model: {out} exists and is not empty (pass overwrite=True)")
    t0 = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    tok_texts = texts if len(texts) <= args.tokenizer_docs else \
        [texts[i] for i in sorted(rng.choice(len(texts), args.tokenizer_docs, replace=False))]
    tokenizer = train_tokenizer(tok_texts, vocab_size, max_length)
    t_tok = time.monotonic() - t0
    bos_id, pad_id = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(PAD)

    enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    stream = np.fromiter((t for ids in enc for t in ([bos_id] + list(ids))), dtype=np.int64)
    L = min(args.train_length, max(2, len(stream) - 1))

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=max_length,
        bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=pad_id, tie_word_embeddings=False,
        initializer_range=0.02)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    ckpt_steps = {round(k * steps / (save_checkpoints + 1)) for k in range(1, save_checkpoints + 1)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    losses: list[float] = []
    try:
        with Progress("train proxy", total=steps, unit="steps") as prog:
            for step in range(steps):
                starts = rng.integers(0, len(stream) - L, size=batch_size)
                batch = torch.from_numpy(np.stack([stream[s:s + L] for s in starts]))
                losses.append(lm_train_step(model, opt, batch, _lr_at(step, args)))
                prog.advance(1)
                if (step + 1) in ckpt_steps:
                    model.eval()
                    _save_dir(model, tokenizer, tmp / "checkpoints" / f"step_{step + 1:06d}")
                    model.train()
                if (step + 1) % 50 == 0 or step + 1 == steps:
                    logger.debug("proxy model: step %d/%d loss %.3f (%.1fs)", step + 1, steps,
                                 np.mean(losses[-50:]), time.monotonic() - t0)
        model.eval()
        _save_dir(model, tokenizer, tmp)
        info = {"args": asdict(args), "n_texts": len(texts), "stream_tokens": int(len(stream)),
                "tokenizer_seconds": round(t_tok, 2), "seconds": round(time.monotonic() - t0, 2),
                "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:]))}
        (tmp / "proxy.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("proxy model: %s written in %.1fs (loss %.2f -> %.2f)", out, info["seconds"],
                info["first_loss"], info["final_loss"])
    return out
