from __future__ import annotations

import filecmp
import logging
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from quadsel.pipeline.cluster import (
    ClusterConfig,
    ClusterResult,
    assign,
    cluster_store,
    fit_kmeans,
    gpu_usable,
    neighbour_graph,
    representatives,
)
from quadsel.pipeline.embed import EmbedConfig, EmbeddingStore
from quadsel.pipeline.feature_stage import embed_texts

K = 30


@pytest.fixture(scope="module")
def embedded(pool_sample, tmp_path_factory) -> tuple[EmbeddingStore, np.ndarray]:
    """The real pool sample (~1,950 rows) through the default tf-idf embedder; domains kept
    for measurement only."""
    texts = [r["text"] for r in pool_sample]
    ids = [r["id"] for r in pool_sample]
    store = embed_texts(texts, EmbedConfig(), tmp_path_factory.mktemp("emb"), ids=ids)
    return store, np.array([r["domain"] for r in pool_sample])


@pytest.fixture(scope="module")
def result(embedded) -> ClusterResult:
    store, _ = embedded
    return cluster_store(store, ClusterConfig(k=K, gpu="off"))


@pytest.fixture
def cluster_log(caplog):
    """Capture quadsel.cluster records even when the CLI made the quadsel logger not propagate."""
    log = logging.getLogger("quadsel.pipeline.cluster")
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)
    log.setLevel(old)


def same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


# -- coherence on real data -----------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["garbage", "c_code", "spam", "math"])
def test_clusters_are_coherent_by_domain(embedded, result, domain):
    """>= 90% of a domain's documents sit in clusters that are >= 90% that domain.

    ``duplicate`` rows are exact copies of other pool rows (of any domain), so they are left
    out of a cluster's share."""
    _, domains = embedded
    a = result.assignments
    members = domains == domain
    counted = domains != "duplicate"
    in_pure = 0
    for c in np.unique(a[members]):
        in_c = (a == c) & counted
        if (domains[in_c] == domain).mean() >= 0.9:
            in_pure += int(np.count_nonzero(in_c & members))
    assert in_pure / members.sum() >= 0.9, (domain, in_pure, int(members.sum()))


def test_result_shapes_and_invariants(embedded, result):
    store, _ = embedded
    n = len(store)
    assert result.backend == "faiss-cpu" and result.k == K
    assert result.centroids.shape == (K, store.dim) and result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert result.assignments.shape == (n,) and result.assignments.dtype == np.int32
    assert result.similarity.shape == (n,) and result.similarity.dtype == np.float32
    assert result.sizes.dtype == np.int64 and result.sizes.sum() == n
    assert np.array_equal(result.sizes, np.bincount(result.assignments, minlength=K))
    # each row's similarity is the cosine to its own centroid, and that centroid is the nearest
    x = store.vectors()
    sims = x @ result.centroids.T
    np.testing.assert_allclose(result.similarity, sims[np.arange(n), result.assignments], atol=1e-5)
    np.testing.assert_allclose(result.similarity, sims.max(axis=1), atol=1e-5)
    assert result.objective == pytest.approx(float(result.similarity.mean()), rel=1e-6)
    assert result.n_train == n


# -- streaming, determinism, sampling --------------------------------------------------------------
def test_streaming_assign_equals_one_shot(embedded, result):
    store, _ = embedded
    x = store.vectors()
    a1, s1 = assign(result.centroids, [x])
    a2, s2 = assign(result.centroids, (x[i:i + 97] for i in range(0, len(x), 97)))
    a3, s3 = assign(result.centroids, store.iter_batches(64))
    assert np.array_equal(a1, a2) and np.array_equal(a1, a3)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_allclose(s1, s3, atol=1e-6)
    assert np.array_equal(a1, result.assignments)


def test_assign_normalises_its_input():
    c = np.eye(3, dtype=np.float32) * 5.0
    x = np.array([[2.0, 0.1, 0.0], [0.1, 3.0, 0.0], [0.0, 7.0, 7.1]], dtype=np.float32)
    a, s = assign(c, [x])
    assert a.tolist() == [0, 1, 2]
    np.testing.assert_allclose(s[0], 2.0 / np.linalg.norm(x[0]), rtol=1e-6)
    np.testing.assert_allclose(s[2], 7.1 / np.linalg.norm(x[2]), rtol=1e-6)


def test_determinism_byte_identical(embedded, tmp_path):
    store, _ = embedded
    cfg = ClusterConfig(k=K, gpu="off", seed=3, assign_batch=500)
    cluster_store(store, cfg).save(tmp_path / "a")
    cluster_store(store, cfg).save(tmp_path / "b")
    same_folder(tmp_path / "a", tmp_path / "b")
    other = cluster_store(store, cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(other.centroids, ClusterResult.load(tmp_path / "a").centroids)


def test_store_sampling_is_logged_and_bounded(embedded, cluster_log):
    store, _ = embedded
    res = cluster_store(store, ClusterConfig(k=10, max_points_per_centroid=20, gpu="off"))
    assert res.n_train == 200
    assert res.info["store_sampled"] is True
    assert len(res.assignments) == len(store)
    assert f"seeded sample of 200 of the {len(store)} rows" in cluster_log.text


def test_faiss_subsampling_is_logged(embedded, cluster_log):
    store, _ = embedded
    centroids, info = fit_kmeans(store.vectors(), ClusterConfig(k=10, max_points_per_centroid=20, gpu="off"))
    assert centroids.shape == (10, store.dim)
    assert info["faiss_subsampled"] is True and info["n_train"] == 200
    assert f"FAISS subsamples the {len(store)} training rows to 200" in cluster_log.text


def test_k_larger_than_rows_is_a_clear_error(embedded):
    store, _ = embedded
    n = len(store)
    with pytest.raises(ValueError, match=rf"cluster.k = {n + 1} is larger than the number of rows \({n}\)"):
        cluster_store(store, ClusterConfig(k=n + 1, gpu="off"))
    with pytest.raises(ValueError, match=r"cluster.k = 5 is larger than the number of rows \(4\)"):
        fit_kmeans(np.eye(4, 8, dtype=np.float32), ClusterConfig(k=5, gpu="off"))


def test_k_equal_rows_works():
    x = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    centroids, info = fit_kmeans(x, ClusterConfig(k=12, niter=5, gpu="off"))
    a, s = assign(centroids, [x])
    assert centroids.shape == (12, 5)
    assert s.min() > 0.99 and len(set(a.tolist())) == 12


def test_save_load_roundtrip(result, tmp_path):
    result.save(tmp_path / "r")
    back = ClusterResult.load(tmp_path / "r")
    for name in ("centroids", "assignments", "similarity", "sizes"):
        got, want = getattr(back, name), getattr(result, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert (back.backend, back.n_train, back.objective) == (result.backend, result.n_train, result.objective)
    assert back.info == result.info
    assert not list(tmp_path.joinpath("r").glob(".tmp-*"))
    with pytest.raises(FileNotFoundError, match="cluster.json"):
        ClusterResult.load(tmp_path / "nothing")


# -- neighbour graph, representatives ----------------------------------------------------------------
def brute_force_graph(centroids: np.ndarray, gamma: float) -> list[list[tuple[int, float]]]:
    c = centroids.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = []
    for i in range(len(c)):
        row = []
        for j in range(len(c)):
            d = 1.0 - float(c[i] @ c[j])
            if j != i and d <= gamma:
                row.append((d, j))
        out.append([(j, d) for d, j in sorted(row)])
    return out


def assert_same_graph(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [j for j, _ in g] == [j for j, _ in w]
        np.testing.assert_allclose([d for _, d in g], [d for _, d in w], atol=1e-12)


def test_neighbour_graph_matches_brute_force(result):
    c = result.centroids
    dists = 1.0 - (c.astype(np.float64) @ c.T.astype(np.float64))
    for gamma in (0.0, float(np.quantile(dists, 0.1)), float(np.median(dists)), 2.0):
        got = neighbour_graph(c, gamma, block=7)
        assert_same_graph(got, brute_force_graph(c, gamma))
    assert all(len(g) == K - 1 for g in neighbour_graph(c, 2.0))


def test_neighbour_graph_ties_sorted_by_index_and_unnormalised_input():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((20, 4))
    c[7] = c[3] * 2.0   # same direction as 3: distance 0 to 3
    c[12] = c[3] * 0.5  # and to 7
    got = neighbour_graph(c.astype(np.float32), 0.8)
    assert_same_graph(got, brute_force_graph(c.astype(np.float32), 0.8))
    assert [j for j, _ in got[3][:2]] == [7, 12]
    assert all(i not in [j for j, _ in g] for i, g in enumerate(got))


def test_representatives(result, embedded, pool_sample):
    ids = [r["id"] for r in pool_sample]
    reps = representatives(result, ids, n=5)
    assert len(reps) == K
    row_of = {i: r for r, i in enumerate(ids)}
    for c, rep in enumerate(reps):
        assert len(rep) == min(5, int(result.sizes[c]))
        rows = [row_of[i] for i in rep]
        assert all(result.assignments[r] == c for r in rows)
        sims = result.similarity[rows]
        assert np.all(np.diff(sims) <= 0)
        members = np.flatnonzero(result.assignments == c)
        if len(rows):
            assert sims[0] == result.similarity[members].max()
    with pytest.raises(ValueError, match="ids"):
        representatives(result, ids[:-1])


# -- config and backend ------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValidationError):
        ClusterConfig(k=0)
    with pytest.raises(ValidationError):
        ClusterConfig(kk=3)
    with pytest.raises(ValidationError):
        ClusterConfig(gpu="maybe")


def test_gpu_on_without_gpu_is_a_clear_error():
    if gpu_usable():
        pytest.skip("a usable FAISS GPU is present")
    with pytest.raises(RuntimeError, match="cluster.gpu = 'on'"):
        fit_kmeans(np.eye(8, dtype=np.float32), ClusterConfig(k=2, gpu="on"))


@pytest.mark.gpu
def test_gpu_backend_agrees_with_cpu(embedded, result):
    if not gpu_usable():
        pytest.skip("FAISS has no usable GPU (CPU build or unsupported card)")
    store, _ = embedded
    gpu = cluster_store(store, ClusterConfig(k=K, gpu="on"))
    assert gpu.backend == "faiss-gpu"
    a, _ = assign(gpu.centroids, [store.vectors()])
    assert np.mean(a == gpu.assignments) > 0.999
