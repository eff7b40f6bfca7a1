"""The feature stage: per-shard feature files, local vs a 2-node Ray cluster, resumability."""
from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from quadsel.pipeline.cluster import ClusterConfig, cluster_store
from quadsel.pipeline.embed import EmbedConfig, EmbeddingStore, load_embedder
from quadsel.pipeline.feature_stage import (
    DONE_SUFFIX,
    compute_features,
    embedder_fingerprint,
    prepare_embedder,
    run_feature_stage,
)
from quadsel.pipeline.sources import Example
from quadsel.pipeline.store import PoolStore

WORDS = ("the river runs past old mills and quiet farms while children play near the bridge "
         "markets open early traders sell bread fish cheese and apples to busy crowds").split()
CODE = ["static int foo(struct dev *d) { return d->flags & MASK; }",
        "for (i = 0; i < n; i++) { buf[i] = 0; }",
        "if (!ptr) return -ENOMEM; kfree(ptr);"]
N = 700
BATCH = 64
CFG = EmbedConfig(dim=16, batch_size=BATCH, fit_sample=500)
KM = ClusterConfig(k=6, niter=8, threads=1)


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [CODE[i % 3] + f" /* {i} */" if i % 4 == 3 else " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))))
            for i in range(n)]


def write_pool(root: Path, n: int = N, rows_per_shard: int = 300) -> PoolStore:
    texts = corpus(n)
    ex = [Example(id=f"d{i:04d}", text=t, meta={}, source="mem", line=i + 1) for i, t in enumerate(texts)]
    return PoolStore.write([ex[i:i + 100] for i in range(0, n, 100)], root, rows_per_shard=rows_per_shard)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def assert_same_folder(a: Path, b: Path) -> None:
    assert files(a) == files(b)
    for name in files(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> PoolStore:
    return write_pool(tmp_path_factory.mktemp("pool") / "store")


@pytest.fixture(scope="module")
def embedder_dir(pool, tmp_path_factory) -> Path:
    return prepare_embedder(pool, CFG, tmp_path_factory.mktemp("emb") / "embedder")


@pytest.fixture(scope="module")
def local_run(pool, embedder_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "features"
    compute_features(pool, embedder_dir, out, backend="local", batch_size=BATCH, threads=1)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- local --------------------------------------------------------------------------------------
def test_one_feature_shard_per_pool_shard_in_pool_order(pool, local_run):
    emb = EmbeddingStore.open(local_run)
    pool_files = [s["file"] for s in pool.index["shards"]]
    assert [s["file"] for s in emb.index["shards"]] == pool_files == ["part-00000.arrow", "part-00001.arrow",
                                                                       "part-00002.arrow"]
    assert all((local_run / (Path(f).stem + DONE_SUFFIX)).is_file() for f in pool_files)
    assert emb.ids() == pool.ids() and len(emb) == N and emb.dim == 16
    assert [s["offset"] for s in emb.index["shards"]] == [s["offset"] for s in pool.index["shards"]]
    np.testing.assert_allclose(np.linalg.norm(emb.vectors(), axis=1), 1.0, atol=1e-5)


def test_same_vectors_as_the_embedder_on_all_texts(pool, embedder_dir, local_run):
    embedder = load_embedder(embedder_dir)
    got = EmbeddingStore.open(local_run)
    assert got.ids() == pool.ids()
    want = np.concatenate([embedder.transform(t) for t in pool.iter_texts(BATCH)])
    assert np.array_equal(got.vectors(), want)  # bit for bit: chunks are the batches


def test_local_resume_recomputes_only_the_missing_shard(pool, embedder_dir, local_run, tmp_path):
    out = tmp_path / "features"
    compute_features(pool, embedder_dir, out, batch_size=BATCH, threads=1)
    before = {n: (out / n).stat() for n in files(out)}
    (out / "part-00001.arrow").unlink()
    (out / ("part-00001" + DONE_SUFFIX)).unlink()
    compute_features(pool, embedder_dir, out, batch_size=BATCH, threads=1)
    for name in ("part-00000.arrow", "part-00002.arrow"):
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns), name
    assert_same_folder(out, local_run)


def test_marker_of_another_embedder_or_batch_size_is_not_reused(pool, embedder_dir, tmp_path):
    out = tmp_path / "features"
    compute_features(pool, embedder_dir, out, batch_size=BATCH)
    other = prepare_embedder(pool, CFG.model_copy(update={"dim": 8}), tmp_path / "other")
    assert embedder_fingerprint(other) != embedder_fingerprint(embedder_dir)
    assert compute_features(pool, other, out, batch_size=BATCH).dim == 8
    assert compute_features(pool, other, out, batch_size=2 * BATCH).dim == 8


def test_errors_name_what_is_missing(pool, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved embedder"):
        compute_features(pool, tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ValueError, match="backend"):
        compute_features(pool, tmp_path, tmp_path / "out", backend="spark")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embed.model is not set"):
        prepare_embedder(pool, EmbedConfig(kind="hidden"), tmp_path / "e")


def test_run_feature_stage_with_whitening(pool, tmp_path):
    cfg = EmbedConfig(**{**CFG.model_dump(), "whiten": {"enabled": True, "eps": 1e-3, "fit_sample": 400}})
    got = run_feature_stage(pool, cfg, tmp_path / "stage")
    assert got.root == tmp_path / "stage" / "whitened" / "vectors"
    assert (tmp_path / "stage" / "whitened" / "whitener" / "whitener.json").is_file()
    assert got.ids() == pool.ids()
    np.testing.assert_allclose(np.linalg.norm(got.vectors(), axis=1), 1.0, atol=1e-5)
    assert cluster_store(got, KM).k == 6
    again = run_feature_stage(pool, cfg, tmp_path / "stage")  # everything reused
    assert np.array_equal(again.vectors(), got.vectors())


# -- Ray: a 2-node local cluster ----------------------------------------------------------------
def test_ray_two_nodes_match_the_local_run_and_resume(pool, embedder_dir, local_run, ray_cluster, tmp_path):
    out = tmp_path / "ray"
    got = compute_features(pool, embedder_dir, out, backend="ray", num_actors=2, batch_size=BATCH)
    assert_same_folder(out, local_run)  # byte-identical shards, markers and index
    a = cluster_store(got, KM)
    b = cluster_store(EmbeddingStore.open(local_run), KM)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.centroids, b.centroids)

    # resume with another worker count: only the deleted shard is computed again
    before = {n: (out / n).stat() for n in files(out)}
    (out / "part-00002.arrow").unlink()
    (out / ("part-00002" + DONE_SUFFIX)).unlink()
    compute_features(pool, embedder_dir, out, backend="ray", num_actors=1, batch_size=BATCH)
    for name in ("part-00000.arrow", "part-00001.arrow"):
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns), name
    assert_same_folder(out, local_run)
