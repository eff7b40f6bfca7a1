"""A deterministic second evaluator: a count-based byte-level n-gram LM (no training loop).

Interpolated Witten–Bell smoothing over UTF-8 bytes with a uniform 256-byte base, so every byte
has a nonzero probability in every context::

    P_0(w)      = 1 / 256
    P_k(w | h)  = (c(h w) + T(h) P_{k-1}(w | h')) / (c(h) + T(h))   if c(h) > 0, else P_{k-1}(w | h')

where ``h`` is the last ``k`` symbols before ``w`` (k = 1 .. order - 1), ``h'`` is ``h`` without
its oldest symbol, ``c(h w)`` counts ``w`` after ``h``, ``c(h)`` counts ``h`` as a context and
``T(h)`` is the number of distinct bytes seen after ``h``. The order-1 level (``k = 0``, empty
context) is the unigram ``(c(w) + T P_0) / (N + T)``.

Each document is its own stream: ``order - 1`` boundary symbols (256, never predicted) come
before its bytes, so a context never spans two documents. Contexts are encoded exactly as
base-257 integers (an int64 "hash" without collisions, up to order 7); counts come from
``np.unique`` over the codes, lookups from ``np.searchsorted``. Nothing loops over bytes in
Python.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

BOUNDARY = 256  # the symbol before each document's first byte (a context symbol only)
_BASE = 257
MAX_ORDER = 7  # 257**6 * 256 < 2**63


@dataclass
class _Level:
    """Counts of one context length ``k``: sorted context codes and sorted joint codes."""

    ctx_keys: np.ndarray  # int64, sorted
    ctx_total: np.ndarray  # int64 c(h)
    ctx_types: np.ndarray  # int64 T(h)
    joint_keys: np.ndarray  # int64 code(h) * 256 + w, sorted
    joint_counts: np.ndarray  # int64 c(h w)


def _stream(docs: Iterable[bytes], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one int16 symbol stream (``pad`` boundary symbols before each) and the
    positions of the real bytes (the predicted positions)."""
    parts: list[np.ndarray] = []
    starts: list[int] = []
    lengths: list[int] = []
    pos = 0
    head = np.full(pad, BOUNDARY, dtype=np.int16)
    for d in docs:
        b = np.frombuffer(bytes(d), dtype=np.uint8).astype(np.int16)
        parts.append(head)
        parts.append(b)
        starts.append(pos + pad)
        lengths.append(len(b))
        pos += pad + len(b)
    if not parts:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    stream = np.concatenate(parts)
    n = int(sum(lengths))
    if n == 0:
        return stream, np.zeros(0, np.int64)
    lens = np.asarray(lengths, dtype=np.int64)
    st = np.asarray(starts, dtype=np.int64)
    # positions: for each doc, start .. start + len - 1 (vectorised ragged arange)
    doc_of = np.repeat(np.arange(len(lens)), lens)
    offs = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return stream, st[doc_of] + offs


def _codes(stream: np.ndarray, positions: np.ndarray, k_max: int) -> Iterator[np.ndarray]:
    """Context codes of lengths 0 .. k_max at ``positions``: code_k = code_{k-1} * 257 + s[t-k]
    (one array alive at a time)."""
    code = np.zeros(len(positions), dtype=np.int64)
    yield code
    for k in range(1, k_max + 1):
        code = code * _BASE + stream[positions - k].astype(np.int64)
        yield code


@dataclass
class ByteNgramLM:
    order: int = 5
    levels: list[_Level] = field(default_factory=list)
    train_bytes: int = 0

    @classmethod
    def fit(cls, docs: Iterable[bytes], order: int = 5) -> "ByteNgramLM":
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"ngram order must be in 1..{MAX_ORDER}, got {order}")
        stream, pos = _stream(docs, order - 1)
        targets = stream[pos].astype(np.int64)
        lm = cls(order=order, train_bytes=int(len(pos)))
        for code in _codes(stream, pos, order - 1):
            joint = code * 256 + targets
            jk, jc = np.unique(joint, return_counts=True)
            # contexts of the distinct joints: T(h) = distinct joints per context; c(h) = sum of counts
            ctx_of_joint = jk // 256  # codes are >= 0, so floor division recovers code(h)
            ck, first, types = np.unique(ctx_of_joint, return_index=True, return_counts=True)
            total = np.add.reduceat(jc, first) if len(jc) else np.zeros(0, np.int64)
            lm.levels.append(_Level(ck, total.astype(np.int64), types.astype(np.int64), jk, jc.astype(np.int64)))
            del joint
        return lm

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros(len(query), dtype=np.int64)
        i = np.searchsorted(keys, query)
        i_c = np.minimum(i, len(keys) - 1)
        hit = keys[i_c] == query
        return np.where(hit, values[i_c], 0)

    def _probs(self, codes: Iterable[np.ndarray], targets: np.ndarray) -> np.ndarray:
        p = np.full(len(targets), 1.0 / 256.0)
        for lv, code in zip(self.levels, codes):
            c_h = self._lookup(lv.ctx_keys, lv.ctx_total, code).astype(np.float64)
            t_h = self._lookup(lv.ctx_keys, lv.ctx_types, code).astype(np.float64)
            c_hw = self._lookup(lv.joint_keys, lv.joint_counts, code * 256 + targets).astype(np.float64)
            seen = c_h > 0
            denom = np.where(seen, c_h + t_h, 1.0)
            p = np.where(seen, (c_hw + t_h * p) / denom, p)
        return p

    def next_byte_probs(self, context: bytes, at_start: bool = False) -> np.ndarray:
        """P(w | context) for all 256 bytes (``at_start``: the context follows a document boundary)."""
        pad = self.order - 1
        ctx = np.frombuffer(bytes(context), dtype=np.uint8).astype(np.int16)
        if at_start or len(ctx) < pad:
            ctx = np.concatenate([np.full(pad, BOUNDARY, np.int16), ctx])
        ctx = ctx[len(ctx) - pad:] if pad else ctx[:0]
        stream = np.concatenate([ctx, np.zeros(1, np.int16)])
        pos = np.full(256, len(stream) - 1, dtype=np.int64)
        codes = _codes(stream, pos, pad)
        return self._probs(codes, np.arange(256, dtype=np.int64))

    def bits(self, docs: Iterable[bytes]) -> tuple[float, int]:
        """Total bits (-log2 P of every byte of every document) and the number of bytes."""
        stream, pos = _stream(docs, self.order - 1)
        if len(pos) == 0:
            return 0.0, 0
        targets = stream[pos].astype(np.int64)
        p = self._probs(_codes(stream, pos, self.order - 1), targets)
        return float(-np.log2(p).sum()), int(len(pos))


def utf8(texts: Iterable[str]) -> list[bytes]:
    return [t.encode("utf-8") for t in texts]


def fit_and_evaluate(train_texts: Iterable[str], eval_sets: dict[str, list[str]], order: int = 5) -> dict:
    """Fit on ``train_texts`` (a selection), report bits per byte on each eval set and seconds."""
    t0 = time.monotonic()
    lm = ByteNgramLM.fit(utf8(train_texts), order=order)
    fit_s = time.monotonic() - t0
    t1 = time.monotonic()
    ev = {}
    for name, texts in eval_sets.items():
        bits, n = lm.bits(utf8(texts))
        ev[name] = {"bpb": bits / max(1, n), "bytes": n, "nats_per_byte": bits * math.log(2) / max(1, n)}
    return {"eval": ev, "order": order, "train_bytes": lm.train_bytes, "fit_seconds": round(fit_s, 3),
            "eval_seconds": round(time.monotonic() - t1, 3), "seconds": round(time.monotonic() - t0, 3)}
