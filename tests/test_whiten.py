"""ZCA whitening (pipeline.whiten): covariance -> identity, streaming apply, save/load, config."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from quadsel.pipeline.cluster import ClusterConfig, cluster_store
from quadsel.pipeline.embed import EmbedConfig, EmbeddingStore, WhitenConfig
from quadsel.pipeline.embed.store import write_embeddings
from quadsel.pipeline.whiten import Whitener, fit_whitener, maybe_whiten, whiten_store


def correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.1, 3.0, d)  # very different scales
    return (rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 5).astype(np.float32)


def make_store(root, x: np.ndarray, rows_per_shard: int) -> EmbeddingStore:
    return write_embeddings(root, [f"v{i}" for i in range(len(x))], x, rows_per_shard=rows_per_shard,
                            embedder={"kind": "test"})


def cov(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    y = y - y.mean(axis=0)
    return y.T @ y / (len(y) - 1)


def test_whitened_sample_covariance_is_identity():
    x = correlated(3000, 12)
    assert np.linalg.cond(cov(x)) > 100
    w = Whitener.fit(x, eps=1e-10)
    y = w.apply(x, normalize=False)
    np.testing.assert_allclose(cov(y), np.eye(12), atol=1e-3)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(w.matrix, w.matrix.T)  # ZCA: symmetric
    # with a real eps the covariance is exactly Λ / (Λ + eps·mean Λ) in the eigenbasis
    lam, u = np.linalg.eigh(cov(x))
    w = Whitener.fit(x, eps=1e-2)
    expect = u @ np.diag(lam / (lam + 1e-2 * lam.mean())) @ u.T
    np.testing.assert_allclose(cov(w.apply(x, normalize=False)), expect, atol=1e-4)


def test_eps_shrinks_small_directions_and_rank_is_reported(caplog):
    x = correlated(400, 8)
    strong = Whitener.fit(x, eps=1e-6).apply(x, normalize=False)
    mild = Whitener.fit(x, eps=10.0).apply(x, normalize=False)
    assert np.trace(cov(mild)) < 0.5 * np.trace(cov(strong))
    low_rank = np.repeat(x[:, :3], 2, axis=1)  # rank 3 in 6 dims
    w = Whitener.fit(low_rank, eps=1e-3)
    assert w.info["rank"] == 3 and "rank 3 < dim 6" in caplog.text
    assert np.isfinite(w.apply(low_rank)).all()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 rows"):
        Whitener.fit(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="whitener dim 4"):
        Whitener.fit(correlated(10, 4)).apply(np.zeros((3, 5)))
    with pytest.raises(ValidationError):
        EmbedConfig(whiten={"eps": 0})
    with pytest.raises(ValidationError):
        WhitenConfig(enable=True)


def test_save_load_roundtrip(tmp_path):
    x = correlated(200, 6)
    w = Whitener.fit(x, eps=1e-3)
    w.save(tmp_path / "w")
    again = Whitener.load(tmp_path / "w")
    np.testing.assert_array_equal(again.apply(x), w.apply(x))
    assert again.info == w.info
    with pytest.raises(FileNotFoundError, match="no saved whitener"):
        Whitener.load(tmp_path / "nothing")


def test_whiten_store_streams_and_matches_in_memory(tmp_path):
    x = correlated(1000, 10, seed=2)
    store = make_store(tmp_path / "in", x, rows_per_shard=300)
    cfg = WhitenConfig(enabled=True, eps=1e-10, fit_sample=600, batch_size=128)
    w = fit_whitener(store, cfg, seed=5)
    assert w.info["n_fit"] == 600
    sample = store.sample(600, 5)
    np.testing.assert_allclose(cov(w.apply(sample, normalize=False)), np.eye(10), atol=1e-3)
    out = whiten_store(store, w, tmp_path / "out", batch_size=cfg.batch_size)
    assert out.ids() == store.ids() and [s["rows"] for s in out.index["shards"]] == [300, 300, 300, 100]
    np.testing.assert_allclose(out.vectors(), w.apply(x), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out.vectors(), axis=1), 1.0, atol=1e-5)
    assert out.index["whiten"]["n_fit"] == 600
    assert cluster_store(out, ClusterConfig(k=4, niter=5, threads=1)).k == 4


def test_maybe_whiten_is_a_no_op_when_off(tmp_path):
    store = make_store(tmp_path / "in", correlated(50, 4), rows_per_shard=50)
    assert maybe_whiten(store, WhitenConfig(), tmp_path / "w") is store
    got = maybe_whiten(store, WhitenConfig(enabled=True), tmp_path / "w")
    assert got.root == tmp_path / "w" / "vectors" and (tmp_path / "w" / "whitener" / "whitener.npz").is_file()
