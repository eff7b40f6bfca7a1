"""Embedding the pool: one L2-normalised float32 vector per example, stored as Arrow shards.

- :mod:`.base`   ``EmbedConfig`` (+ ``WhitenConfig``), the ``Embedder`` interface, the kind
                 registry (``embedder_kinds``: entry points ``quadsel.embedders``),
                 ``make_embedder`` / ``load_embedder``
- :mod:`.tfidf`  hashed word+symbol n-grams -> tf-idf -> truncated SVD (default, no model)
- :mod:`.hf`     any Hugging Face encoder, mean-pooled over non-padding tokens
- ``hidden`` / ``gradient`` (a causal LM's mean-pooled hidden state / projected per-example
  gradients) live in :mod:`quadsel.influence.embedders`, registered by that package and imported
  by kind on first use
- :mod:`.store`  ``EmbeddingStore`` (memory-mapped reads); vectors are written by
                 :mod:`quadsel.pipeline.feature_stage`, the one embed path
"""
from .base import EmbedConfig, Embedder, WhitenConfig, l2_normalize, load_embedder, make_embedder, sample_rows
from .store import EmbeddingStore, EmbeddingStoreError

__all__ = [
    "EmbedConfig", "Embedder", "EmbeddingStore", "EmbeddingStoreError",
    "l2_normalize", "load_embedder", "make_embedder", "sample_rows", "WhitenConfig",
]
