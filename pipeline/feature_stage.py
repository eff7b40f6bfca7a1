"""The feature stage: pool shards -> feature shards keyed by id, on the one executor.

Work plan (independent of the number of workers): every input pool shard ``part-NNNNN.arrow``
is cut into chunks of ``batch_size`` rows from its start; a chunk is the unit a worker embeds
(``Embedder.transform`` on exactly those texts). The work runs on the executor that scoring
runs on (:mod:`quadsel.pipeline.ray_runtime`: ``LocalPool`` in-process, ``RayPool`` on Ray
actors, each loading the fitted embedder once from ``embedder_dir``, on storage every node
sees); the stage declares what an actor needs (CPUs, GPUs) and the executor does the rest
(connecting to Ray or starting it, retries of chunks whose actor died, shutting down what it
started). The driver reads one pool shard's texts at a time, gets its vectors back in order and
writes ``out_dir/part-NNNNN.arrow`` (ids + vectors, the :mod:`quadsel.pipeline.embed.store` shard
format), then its completion marker ``part-NNNNN.done.json`` (:func:`quadsel.pipeline.stage.write_marker`:
its key, and the shard's checksum). ``index.json`` comes last, so the folder is an
:class:`~quadsel.pipeline.embed.EmbeddingStore` (rows in pool order) that
:func:`quadsel.pipeline.cluster.cluster_store` reads as it is.

- Deterministic: the same chunks are embedded whatever the backend or worker count, and a row is
  placed by its position, so the shards are byte-identical for 1 or N workers, local or Ray.
- Resumable per shard: a rerun skips every shard whose marker matches (same embedder files, same
  input shard, output present with the recorded checksum) and computes only the others.
- Memory: the driver holds one pool shard's texts and vectors at a time.
- Resources: ``num_gpus_per_actor`` > 0 puts each actor on its own GPU share (the embedder's
  ``device: auto`` then picks CUDA); otherwise actors are CPU workers with
  ``num_cpus_per_actor`` torch threads each. The local backend uses the same thread count so
  that both give the same bits.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from quadsel.core import faults
from quadsel.core.atomic import atomic_write_json, read_json, remove_stale_temps, sha256_file
from quadsel.core.progress import Progress

from .arrow_store import INDEX, shard_entry
from .embed import EmbedConfig, EmbeddingStore, load_embedder, make_embedder, sample_rows
from .embed.base import META, MODEL_KINDS
from .embed.store import write_index, write_vector_shard
from .sources import Example
from .stage import read_marker, write_marker
from .store import PoolStore

logger = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"
Backend = Literal["local", "ray"]


def embedder_fingerprint(embedder_dir: str | Path) -> str:
    """sha256 over the names and contents of the files of a saved embedder folder."""
    root = Path(embedder_dir)
    if not (root / META).is_file():
        raise FileNotFoundError(f"{root / META}: no saved embedder here (save the fitted embedder "
                                "with Embedder.save first)")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".tmp-")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Features:
    """What each worker (a Ray actor, or in-process) holds: the fitted embedder, loaded once from
    ``embedder_dir`` (shared storage); ``transform(texts)`` is one chunk's vectors."""

    def __init__(self, embedder_dir: str) -> None:
        self.embedder = load_embedder(embedder_dir)

    def transform(self, texts: list[str]) -> np.ndarray:
        faults.point("embed.batch")
        vecs = np.ascontiguousarray(self.embedder.transform(texts), np.float32)
        if vecs.shape != (len(texts), self.embedder.dim):
            raise ValueError(f"features: {type(self.embedder).__name__} returned shape {vecs.shape} for "
                             f"{len(texts)} texts, expected ({len(texts)}, {self.embedder.dim})")
        return vecs


def _write_shard(store: PoolStore, out: Path, shard: int, ids: list[str], vecs: np.ndarray,
                 marker: dict[str, Any]) -> dict[str, Any]:
    """A finished feature shard, then its completion marker; returns the marker's info."""
    name = shard_name(store, shard)
    write_vector_shard(out / name, ids, vecs)
    info = {"file": name, "rows": len(ids), "zero_rows": int(np.count_nonzero(~vecs.any(axis=1)))}
    write_marker(_marker_path(out, name), _shard_key(store, shard, marker), files=[name], info=info)
    return info


def shard_name(store: PoolStore, shard: int) -> str:
    return str(store.index["shards"][shard]["file"])


def _marker_path(out: Path, name: str) -> Path:
    return out / (Path(name).stem + DONE_SUFFIX)


def _shard_key(store: PoolStore, shard: int, marker: dict[str, Any]) -> dict[str, Any]:
    """What a feature shard depends on: the embedder, the chunking and its input pool shard."""
    s = store.index["shards"][shard]
    return {**marker, "input": {"file": s["file"], "rows": int(s["rows"]), "offset": int(s["offset"]),
                                "bytes": int(s["bytes"])}}


def _done_info(store: PoolStore, out: Path, shard: int, marker: dict[str, Any]) -> dict[str, Any] | None:
    name = shard_name(store, shard)
    done = read_marker(_marker_path(out, name), _shard_key(store, shard, marker), what=f"feature shard {name}")
    return None if done is None else done["info"]


def compute_features(
    store: PoolStore,
    embedder_dir: str | Path,
    out_dir: str | Path,
    *,
    backend: Backend = "local",
    num_actors: int = 1,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float | None = 0.0,
    batch_size: int = 1024,
    threads: int | None = None,
    address: str | None = None,
    stats: dict[str, Any] | None = None,
) -> EmbeddingStore:
    """Embed every row of ``store`` with the embedder saved in ``embedder_dir`` into ``out_dir``.

    Shards already done (matching marker) are skipped; see the module docstring. The work runs on
    the executor of :mod:`quadsel.pipeline.ray_runtime` (``LocalPool`` or ``RayPool``, as scoring
    does): with ``backend="ray"`` an existing Ray connection is used, else it connects (and
    shuts down what it started afterwards). ``num_gpus_per_actor=None``: one GPU per actor when
    the cluster has GPUs. ``threads``: torch threads per worker (default: the CPUs per actor for
    Ray CPU actors, unchanged for the local backend; torch embedders give the same bits on both
    backends only with the same thread count). ``stats``, when given, is filled with timings:
    ``rows``, ``seconds``, ``first_result_s`` (start-up: workers loading the embedder, first
    chunk) and ``steady_rows_per_s`` (rows after the first chunk per second).
    """
    from .ray_runtime import LocalPool, RayPool

    t0 = time.perf_counter()
    clock = _Clock(t0)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend: expected 'local' or 'ray', got {backend!r}")
    if num_actors <= 0:
        raise ValueError(f"num_actors must be positive, got {num_actors}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    (out / INDEX).unlink(missing_ok=True)  # unfinished until index.json is written again
    embedder_dir = Path(embedder_dir).resolve()
    meta = read_json(embedder_dir / META) if (embedder_dir / META).is_file() else {}
    marker = {"embedder": embedder_fingerprint(embedder_dir), "batch_size": int(batch_size)}
    n_shards = len(store.index["shards"])
    done = {s: _done_info(store, out, s, marker) for s in range(n_shards)}  # None: to compute
    todo = [s for s, info in done.items() if info is None]
    skipped = n_shards - len(todo)
    if skipped:
        logger.info("features: %d of %d shards already done (markers match); computing %d",
                    skipped, n_shards, len(todo))
    rows_todo = sum(int(store.index["shards"][s]["rows"]) for s in todo)
    if todo:
        factory = functools.partial(Features, str(embedder_dir))
        with contextlib.ExitStack() as stack:
            if backend == "local":
                stack.enter_context(_torch_threads(threads))
                pool: Any = LocalPool(factory, chunk_size=batch_size, method="transform")
            else:
                pool = RayPool(factory, method="transform", num_actors=num_actors, num_cpus=num_cpus_per_actor,
                               num_gpus=num_gpus_per_actor, threads=threads, chunk_size=batch_size, address=address)
            stack.callback(pool.shutdown)
            prog = stack.enter_context(Progress("features", total=rows_todo, unit="rows"))

            def chunk_done(n: int) -> None:
                prog.advance(n)
                clock.tick(n)

            for s in todo:  # chunks of batch_size rows from the start of each shard, as a unit
                off, rows = int(store.index["shards"][s]["offset"]), int(store.index["shards"][s]["rows"])
                table = store.take(np.arange(off, off + rows), ["id", "text"])
                vecs = pool.map(table.column("text").to_pylist(), on_chunk=chunk_done)
                done[s] = _write_shard(store, out, s, table.column("id").to_pylist(), vecs, marker)
    result = _finish(store, out, meta, done)
    if stats is not None:
        stats.update(clock.summary(time.perf_counter() - t0), shards_done_before=skipped,
                     shards_computed=len(todo))
    return result


class _Clock:
    """Start-up time (until the first chunk is back) and the rate after it."""

    def __init__(self, t0: float) -> None:
        self.t0, self.first, self.last, self.rows, self.rows_first = t0, None, None, 0, 0

    def tick(self, n: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.rows_first = now, n
        self.last, self.rows = now, self.rows + n

    def summary(self, seconds: float) -> dict[str, Any]:
        steady = None
        if self.first is not None and self.last is not None and self.last > self.first:
            steady = (self.rows - self.rows_first) / (self.last - self.first)
        return {"rows": self.rows, "seconds": seconds,
                "first_result_s": None if self.first is None else self.first - self.t0,
                "steady_rows_per_s": steady}


def prepare_embedder(store: PoolStore, cfg: EmbedConfig, path: str | Path) -> Path:
    """Fit (on a seeded sample of ``cfg.fit_sample`` rows) and save the embedder into ``path``;
    a folder saved earlier with the same config is reused. Model-based kinds (``hidden``,
    ``gradient``) learn nothing: only their config is written, and the workers load the model
    (so the driver never holds it); the model's files (sizes, mtimes) are recorded so that a
    changed model invalidates the done markers."""
    path = Path(path)
    want = cfg.model_dump(mode="json")
    if (path / META).is_file() and read_json(path / META).get("config") == want:
        return path
    if cfg.kind in MODEL_KINDS:
        if not cfg.model:
            raise ValueError(f"embed.model is not set for embed.kind = {cfg.kind!r} (pass the run's "
                             "proxy model: EmbedConfig.with_default_model)")
        local = Path(os.path.expanduser(cfg.model))
        files = ([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(local.iterdir()) if p.is_file()]
                 if local.is_dir() else None)
        if files is None and (local.is_absolute() or cfg.model.startswith(".")):
            raise ValueError(f"embed.model = {cfg.model!r}: no such folder")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / META, {"kind": cfg.kind, "model": cfg.model, "model_files": files,
                                        "config": want})
        return path
    emb = make_embedder(cfg)
    emb.fit(store.texts(sample_rows(len(store), cfg.fit_sample, cfg.seed)))
    emb.save(path)
    return path


def run_feature_stage(store: PoolStore, cfg: EmbedConfig, out_dir: str | Path, *,
                      model_path: str | Path | None = None, num_actors: int = 1,
                      num_cpus_per_actor: float = 1.0, address: str | None = None) -> EmbeddingStore:
    """The whole embed stage into ``out_dir``: ``embedder/`` (fitted), ``features/`` (per-shard,
    resumable) and, with ``cfg.whiten.enabled``, ``whitened/`` (whitener + whitened vectors).

    ``model_path``: the run's proxy model, used by ``hidden``/``gradient`` when ``cfg.model`` is
    null. ``cfg.backend`` picks local or Ray; ``cfg.num_actors`` / ``cfg.gpus_per_actor``
    override ``num_actors`` / the default (1 GPU per actor when the Ray cluster has GPUs).
    Returns the store to cluster (the whitened one when whitening is on).
    """
    from .whiten import maybe_whiten

    cfg = cfg.with_default_model(model_path)
    out = Path(out_dir)
    emb_dir = prepare_embedder(store, cfg, out / "embedder")
    feats = compute_features(store, emb_dir, out / "features", backend=cfg.backend,
                             num_actors=cfg.num_actors or num_actors, num_cpus_per_actor=num_cpus_per_actor,
                             num_gpus_per_actor=cfg.gpus_per_actor, batch_size=cfg.batch_size, address=address)
    return maybe_whiten(feats, cfg.whiten, out / "whitened", seed=cfg.seed)


def embed_texts(texts: Sequence[str], cfg: EmbedConfig, out_dir: str | Path, *,
                ids: Sequence[str] | None = None, rows_per_shard: int = 50_000) -> EmbeddingStore:
    """Texts in memory through the same embed path a job runs: they are written as a pool store
    (``out_dir/pool``), the embedder is fitted and saved (``out_dir/embedder``) and the feature
    stage embeds them locally (``out_dir/features``, returned)."""
    out = Path(out_dir)
    ids = [f"t{i}" for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(texts):
        raise ValueError(f"embed_texts: {len(ids)} ids for {len(texts)} texts")
    rows = [Example(id=i, text=t, meta={}, source="memory", line=n + 1)
            for n, (i, t) in enumerate(zip(ids, texts))]
    store = PoolStore.write([rows], out / "pool", rows_per_shard=rows_per_shard, label="texts")
    emb_dir = prepare_embedder(store, cfg, out / "embedder")
    return compute_features(store, emb_dir, out / "features", batch_size=cfg.batch_size)


def _finish(store: PoolStore, out: Path, meta: dict[str, Any], done: dict[int, Any]) -> EmbeddingStore:
    """``index.json`` (rows in pool order) over every shard's marker info (``done``: checked or
    just written, so no shard file is read again here)."""
    shards, zero_rows, dim = [], 0, None
    for s in range(len(store.index["shards"])):
        info = done[s]
        zero_rows += int(info["zero_rows"])
        shards.append(shard_entry(out, info["file"], info["rows"], store.index["shards"][s]["offset"]))
    if shards:
        with pa.memory_map(str(out / shards[0]["file"]), "r") as m:
            dim = ipc.open_file(m).schema.field("vector").type.list_size
    dim = int(dim if dim is not None else meta.get("dim", 0))
    if zero_rows:
        logger.warning("features: %d of %d rows have an all-zero vector (no feature the embedder knows); they "
                       "join whichever cluster ties first", zero_rows, len(store))
    write_index(out, rows=len(store), dim=dim, shards=shards, zero_rows=zero_rows,
                embedder={k: v for k, v in meta.items() if k != "config"})
    return EmbeddingStore.open(out)
