"""Embedding the pool: one L2-normalised float32 vector per example, stored as Arrow shards.

- :mod:`.base`   ``EmbedConfig``, the ``Embedder`` interface, ``make_embedder`` / ``load_embedder``
- :mod:`.tfidf`  hashed word+symbol n-grams -> tf-idf -> truncated SVD (default, no model)
- :mod:`.hf`     any Hugging Face encoder, mean-pooled over non-padding tokens
- :mod:`.store`  ``embed_batches`` (stream -> shards) and ``EmbeddingStore`` (memory-mapped reads)
"""
from .base import EmbedConfig, Embedder, l2_normalize, load_embedder, make_embedder, sample_rows
from .store import EmbeddingStore, EmbeddingStoreError, embed_batches

__all__ = [
    "EmbedConfig", "Embedder", "EmbeddingStore", "EmbeddingStoreError", "embed_batches",
    "l2_normalize", "load_embedder", "make_embedder", "sample_rows",
]
