"""The cached data stages of a run: sources -> embed -> cluster, and the cluster table.

Each stage's cache key hashes its own config, the keys of the stages before it and (for the
sources) the input files' sizes and modification times, so a rerun with the same config and
inputs reuses the work and any change recomputes exactly what depends on it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from quadsel.core import faults
from quadsel.core.atomic import atomic_path, atomic_write_text, stable_hash
from quadsel.core.errors import JobError
from quadsel.pipeline.cluster import ClusterResult, cluster_store, neighbour_graph, representative_rows
from quadsel.pipeline.embed import EmbeddingStore
from quadsel.pipeline.sources import RejectLog, SourceConfig, iter_batches, resolve_paths
from quadsel.pipeline.stage import Stage
from quadsel.pipeline.store import PoolStore

from .config import JobConfig, dump_config
from .layout import RunLayout

logger = logging.getLogger(__name__)

SNIPPET_CHARS = 160


@dataclass
class RunContext:
    cfg: JobConfig
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # rows per input file

    # a run dir that holds a finished selection keeps describing it (config.resolved.yaml,
    # rejects.jsonl) until a rerun commits a new one: the rerun writes *.pending files first
    pending: bool = False
    command: str = "cluster"  # which job: "run" (a selection) or "cluster"; what preflight checks

    @classmethod
    def create(cls, cfg: JobConfig, *, keep_committed: bool = False, command: str | None = None,
               preflight: bool = True) -> "RunContext":
        """``keep_committed``: a selection job; when the folder already holds a manifest, the
        run-level files are written as pending and promoted by :meth:`promote` at commit.

        The job's up-front checks (``jobs.preflight``) run first: a problem found from the
        config or the input paths stops the job here, before anything is written."""
        from .preflight import config_problems, raise_if

        command = command or ("run" if keep_committed else "cluster")
        if preflight:  # False: the caller ran them already
            raise_if(config_problems(cfg, command))
        run_dir = Path(cfg.run_dir)
        layout = RunLayout(run_dir)
        for sub in (layout.stages, layout.logs, layout.clusters):
            sub.mkdir(parents=True, exist_ok=True)
        ctx = cls(cfg=cfg, run_dir=run_dir, pending=keep_committed and layout.manifest.is_file(), command=command)
        atomic_write_text(ctx.run_file(layout.config_resolved), dump_config(cfg))
        return ctx

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def _described(self) -> tuple[Path, ...]:
        """The run-level files that describe the selection on disk (kept while a rerun works)."""
        return (self.layout.config_resolved, self.layout.rejects)

    def run_file(self, path: Path) -> Path:
        """Where a run-level file is written now (``<name>.pending`` while a selection is kept)."""
        return path.with_name(f"{path.name}.pending") if self.pending else path

    def discard_pending(self) -> None:
        """Nothing new was committed: the run-level files keep describing the selection on disk."""
        if self.pending:
            for path in self._described():
                self.run_file(path).unlink(missing_ok=True)
            self.pending = False

    def promote(self) -> None:
        """The new selection is committed: its config and rejects replace the previous ones."""
        if self.pending:
            for path in self._described():
                src = self.run_file(path)
                if src.is_file():
                    os.replace(src, path)
            self.pending = False

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 3)


def cached_stage(ctx: RunContext, name: str, key: str, build: Callable[[Path], dict[str, Any] | None], *,
                 reused: str | Callable[[Stage], str], key_as: str | None = None,
                 timing: str | None = None, label: str | None = None) -> Stage:
    """Every cached stage of a run: ``stages/<name>`` under ``key``. Done (same key, files
    intact): reused, logged as ``<label>: reusing <reused>`` (label: the stage's name unless
    given); else ``build(tmp)`` writes the stage into a fresh folder and returns its marker's
    info, and the folder is committed in place. ``key_as``: the name the key is recorded under in
    ``ctx.keys`` (what later stages key on); ``timing``: the name its seconds are recorded under
    in ``ctx.timings``."""
    if key_as:
        ctx.keys[key_as] = key
    stage = Stage(ctx.run_dir, name, key)
    t0 = time.monotonic()
    if stage.is_done():
        logger.info("%s: reusing %s", label or name, reused(stage) if callable(reused) else reused)
    else:
        with stage.building() as tmp:
            stage.commit(tmp, build(tmp))
    if timing:
        ctx.timed(timing, t0)
    return stage


def _fingerprint(src: SourceConfig, run_dir: Path) -> list[list[Any]]:
    """Path, size, mtime, inode and ctime of each input file: a file rewritten in place (even
    with its size and mtime put back) changes its ctime, so the sources stage is read again."""
    out = []
    for p in resolve_paths(src, exclude=[run_dir]):
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return out


def _read_source(ctx: RunContext, name: str, src: SourceConfig) -> PoolStore:
    key = stable_hash({"v": 2, "source": src.model_dump(mode="json"), "files": _fingerprint(src, ctx.run_dir)})

    def build(tmp: Path) -> dict[str, Any]:
        with RejectLog(tmp / "rejects.jsonl") as rejects:
            store = PoolStore.write(iter_batches(src, rejects, exclude=[ctx.run_dir]), tmp / "store",
                                    label="read pool" if name == "sources" else f"read {name}")
            summary = rejects.summary()
        if len(store) == 0:
            why = (f"{rejects.total} rejected: {rejects.counts}; see the rejects listed above"
                   if rejects.total else "the input has no rows")
            raise JobError(f"{name}: no valid rows in {src.path!r} ({why})")
        if rejects.total:
            logger.warning("%s: %d rows rejected %s", name, rejects.total, rejects.counts)
        return {"rows": len(store), "rejects": summary}

    stage = cached_stage(ctx, name, key, build, key_as=name, timing=name,
                         reused=lambda st: f"cached stage ({st.info().get('rows')} rows)")
    ctx.inputs[name] = stage.info().get("rejects", {}).get("files", [])
    return PoolStore.open(stage.path / "store")


def model_runtime_key(cfg: JobConfig, model_key: str) -> str:
    """The model's cache key extended by how it runs: dtype, device type and batch size change
    the scores (bf16 against fp32, CUDA kernels against CPU ones), so a rerun that changes one
    recomputes everything scored with the model instead of reusing a selection made otherwise."""
    from quadsel.influence.model import resolve_device, resolve_dtype

    m = cfg.model
    dev = resolve_device(m.device)
    return stable_hash({"model": model_key, "dtype": str(resolve_dtype(m.dtype, dev)), "device": dev.type,
                        "batch_size": m.batch_size})


def state_checksum(state: Any) -> str:
    """sha256 of a selector state as written (canonical JSON): a state file edited by hand, cut
    short or bit-flipped no longer matches it."""
    import hashlib

    from quadsel.core.atomic import canonical_json

    return hashlib.sha256(canonical_json(state).encode("utf-8")).hexdigest()


def read_selector_state(path: Path, key: str) -> dict[str, Any] | None:
    """The saved selector state of ``path`` if it belongs to ``key`` and is intact; otherwise None
    (logged, naming the file): the selection then starts over, which the seed makes give the same
    result as a resume would."""
    import json

    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); starting the selection over", path, e)
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("selector"), dict):
        logger.warning("%s: not a selector state; starting the selection over", path)
        return None
    if saved.get("key") != key:
        logger.warning("%s belongs to another config; starting the selection over", path)
        return None
    if saved.get("sha256") != state_checksum(saved["selector"]):
        logger.warning("%s: checksum mismatch (edited, cut short or corrupt); starting the selection over", path)
        return None
    return saved


def _merge_rejects(ctx: RunContext, names: list[str]) -> None:
    """The run's ``rejects.jsonl``: the rejects of every source stage, in stage order."""
    with atomic_path(ctx.run_file(ctx.layout.rejects)) as tmp, open(tmp, "wb") as out:
        for name in names:
            part = ctx.layout.stage_rejects(name)
            if part.is_file():
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out)


def read_sources(ctx: RunContext) -> tuple[PoolStore, PoolStore | None]:
    """The pool and the reference, read (or reused); then the checks of the pool's size against
    the job (k, budget, bandit constants), before any expensive stage."""
    from .preflight import pool_problems, raise_if

    pool = _read_source(ctx, "sources", ctx.cfg.pool)
    ref = None
    names = ["sources"]
    if ctx.cfg.reference is not None:
        ref = _read_source(ctx, "reference", ctx.cfg.reference)
        names.append("reference")
    _merge_rejects(ctx, names)
    raise_if(pool_problems(ctx.cfg, len(pool), ctx.command))
    return pool, ref


MODEL_EMBEDDERS = ("hidden", "gradient")


def embed_pool(ctx: RunContext, store: PoolStore, model_dir: str | None = None) -> EmbeddingStore:
    """The embed stage: the feature stage (local or Ray actors; per-shard resumable), optionally
    whitened, committed as ``stages/embed``.

    The feature stage's work folder lives outside the stage's temporary folder so that a killed
    run keeps the shards it finished; it is moved into the stage when complete.
    """
    from quadsel.pipeline.feature_stage import run_feature_stage

    cfg = ctx.cfg.embed
    model_key = ctx.keys.get("model") if cfg.kind in MODEL_EMBEDDERS and cfg.model is None else None
    key = stable_hash({"v": 1, "up": ctx.keys["sources"], "embed": cfg.model_dump(mode="json"),
                       "model": model_key})
    work = ctx.layout.stage(f"embed.work-{key}")

    def build(tmp: Path) -> dict[str, Any]:
        r = ctx.cfg.ray
        emb = run_feature_stage(store, cfg, work, model_path=model_dir, num_actors=r.num_actors,
                                num_cpus_per_actor=r.num_cpus_per_actor, address=r.address)
        shutil.move(str(work / "embedder"), str(tmp / "embedder"))
        shutil.move(str(emb.root), str(tmp / "vectors"))
        if (work / "whitened" / "whitener").is_dir():
            shutil.move(str(work / "whitened" / "whitener"), str(tmp / "whitener"))
        return {"rows": len(emb), "dim": emb.dim, "kind": cfg.kind, "backend": cfg.backend,
                "whitened": cfg.whiten.enabled}

    stage = cached_stage(ctx, "embed", key, build, key_as="embed", timing="embed", reused="cached embeddings")
    shutil.rmtree(work, ignore_errors=True)  # what the commit did not take (or a stale one)
    return EmbeddingStore.open(stage.path / "vectors")


def cluster_pool(ctx: RunContext, emb: EmbeddingStore) -> ClusterResult:
    cfg = ctx.cfg.cluster
    key = stable_hash({"v": 1, "up": ctx.keys["embed"], "cluster": cfg.model_dump(mode="json")})

    def build(tmp: Path) -> dict[str, Any]:
        if cfg.k > len(emb):
            raise JobError(f"cluster.k = {cfg.k} is larger than the pool ({len(emb)} valid rows); "
                           f"set cluster.k to at most {len(emb)}")
        result = cluster_store(emb, cfg)
        faults.point("cluster.trained")
        result.save(tmp / "result")
        return {"k": cfg.k, "backend": result.backend, "n_train": result.n_train}

    stage = cached_stage(ctx, "cluster", key, build, key_as="cluster", timing="cluster", reused="cached clustering")
    return ClusterResult.load(stage.path / "result")


def snippet(text: str, n: int = SNIPPET_CHARS) -> str:
    s = " ".join(text.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def write_assignments(ctx: RunContext, store: PoolStore, result: ClusterResult) -> Path:
    path = ctx.layout.assignments
    table = pa.table({
        "row": pa.array(np.arange(len(store), dtype=np.int64)),
        "id": store.id_array(),  # zero-copy from the memory-mapped store (no Python list)
        "cluster": pa.array(result.assignments.astype(np.int32)),
        "similarity": pa.array(result.similarity.astype(np.float32)),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def cluster_table(store: PoolStore, result: ClusterResult, gamma: float,
                  extra: dict[str, list[Any]] | None = None) -> pa.Table:
    """One row per cluster: size, neighbours within gamma, representative ids and snippets."""
    graph = neighbour_graph(result.centroids, gamma)
    reps = representative_rows(result, n=3)
    all_rep_rows = np.concatenate([r for r in reps if len(r)]) if any(len(r) for r in reps) else np.array([], int)
    texts = dict(zip(all_rep_rows.tolist(), store.texts(all_rep_rows))) if len(all_rep_rows) else {}
    ids = store.take(all_rep_rows, columns=["id"]).column("id").to_pylist() if len(all_rep_rows) else []
    id_of = dict(zip(all_rep_rows.tolist(), ids))
    sizes = np.bincount(result.assignments, minlength=len(result.centroids))
    mean_sim = np.bincount(result.assignments, weights=result.similarity,
                           minlength=len(result.centroids)) / np.maximum(sizes, 1)
    cols: dict[str, Any] = {
        "cluster": pa.array(np.arange(len(sizes), dtype=np.int32)),
        "size": pa.array(sizes.astype(np.int64)),
        "mean_similarity": pa.array(mean_sim.astype(np.float32)),
        "neighbours": pa.array([[j for j, _ in g] for g in graph], pa.list_(pa.int32())),
        "neighbour_distance": pa.array([[round(d, 6) for _, d in g] for g in graph], pa.list_(pa.float32())),
        "representative_ids": pa.array([[id_of[r] for r in rs.tolist()] for rs in reps], pa.list_(pa.string())),
        "snippets": pa.array([[snippet(texts[r]) for r in rs.tolist()] for rs in reps], pa.list_(pa.string())),
    }
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values)
    return pa.table(cols)


def cluster_summary_matches(ctx: RunContext, result: ClusterResult, *, warn: bool = True) -> bool:
    """Whether ``clusters/summary.parquet`` describes ``result`` (one row per cluster, its sizes).
    ``quadsel cluster`` with other settings may have rewritten it under a finished selection; the
    selection's rerun then writes its own tables again instead of answering "already complete"."""
    path = ctx.layout.cluster_summary
    try:
        sizes = pq.read_table(path, columns=["size"]).column("size").to_numpy()
    except (OSError, pa.ArrowException, KeyError):
        return False
    want = np.bincount(result.assignments, minlength=len(result.centroids))
    ok = len(sizes) == len(want) and bool(np.array_equal(sizes, want))
    if not ok and warn:
        logger.warning("%s does not describe this selection's %d clusters (rewritten by `quadsel cluster` with "
                       "other settings?); writing the selection's tables again", path, len(want))
    return ok


def write_cluster_summary(ctx: RunContext, table: pa.Table) -> Path:
    path = ctx.layout.cluster_summary
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
