"""The pool as a user's run sees it (store, tf-idf embedding, k-means clusters), the proxy model
and its token counts per seed, and the targets' reference sets.

Everything is built with quadsel's own stages (``jobs.stages`` and ``influence``) and cached
under the benchmark's cache folder. ``eval.jsonl`` is NOT read here: only
:mod:`bench.quality.train` reads it, for the final evaluation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quadsel.core.atomic import atomic_write_bytes, stable_hash
from quadsel.pipeline.cluster import ClusterResult
from quadsel.pipeline.embed import sample_rows
from quadsel.pipeline.sources import RejectLog, SourceConfig, iter_batches
from quadsel.pipeline.stage import Stage
from quadsel.pipeline.store import PoolStore

from .config import QualityConfig, base_target

logger = logging.getLogger("quadsel.bench.quality")


@dataclass
class PoolData:
    store: PoolStore
    clusters: ClusterResult
    key: str  # cache key of the pool's sources stage
    domains: np.ndarray  # str per row, MEASUREMENT ONLY (never handed to a selector)
    timings: dict[str, float] = field(default_factory=dict)
    excluded_domain: str | None = None  # leave-domain-out: the domain this pool was built without
    path: Path | None = None  # the pool file read


@dataclass
class SeedModel:
    """The proxy model of one seed: its folder (tokenizer included) and the pool in its tokens."""

    seed: int
    model_dir: Path
    key: str
    lengths: np.ndarray  # tokens per pool row (untruncated, no special tokens): the budget unit
    offsets: np.ndarray  # int64 [N + 1]: row i's tokens are ids[offsets[i]:offsets[i + 1]]
    ids: np.ndarray  # int32, the whole pool tokenized, row after row
    bos_id: int
    seconds: float


def pool_file(cfg: QualityConfig, exclude_domain: str | None = None) -> Path:
    """The pool file a run reads: ``pool.jsonl``, or (leave-domain-out) a copy of it without the
    rows whose ``domain`` is ``exclude_domain``, named by the hash of its content so that every
    stage built on it (embedding, clusters, proxy, tokens, scores) is keyed by that content.
    The bench reads ``domain`` here to BUILD the pool; no selector ever sees it."""
    if not cfg.pool_path.is_file():
        raise FileNotFoundError(f"pool not found: {cfg.pool_path} (set --data-dir)")
    if exclude_domain is None:
        return cfg.pool_path
    kept: list[bytes] = []
    dropped = 0
    with open(cfg.pool_path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                dom = json.loads(line).get("domain")
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg.pool_path}:{n}: not valid JSON ({e})") from None
            if dom == exclude_domain:
                dropped += 1
            else:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    if not dropped:
        raise ValueError(f"leave-domain-out: no pool row has domain {exclude_domain!r} ({cfg.pool_path})")
    body = b"".join(kept)
    digest = hashlib.sha256(body).hexdigest()[:16]
    path = Path(cfg.cache_dir) / "pools" / f"pool-no-{exclude_domain}-{digest}.jsonl"
    if not path.is_file():  # written once: its mtime is part of the sources stage's key
        logger.info("leave-domain-out pool without %r: %d rows kept, %d dropped -> %s",
                    exclude_domain, len(kept), dropped, path)
        atomic_write_bytes(path, body)
    return path


def prepare_pool(cfg: QualityConfig, exclude_domain: str | None = None) -> PoolData:
    """Read, embed and cluster the pool exactly like ``quadsel run`` (cached in ``cache/pool``;
    a leave-domain-out pool in ``cache/pool-no-<domain>``, with the same embedding and k)."""
    from quadsel.jobs.config import JobConfig
    from quadsel.jobs.stages import RunContext, cluster_pool, embed_pool, read_sources

    path = pool_file(cfg, exclude_domain)
    job = JobConfig.model_validate({
        "run_dir": str(Path(cfg.cache_dir) / ("pool" if exclude_domain is None else f"pool-no-{exclude_domain}")),
        "pool": {"path": str(path)},
        "embed": {"kind": "tfidf", "dim": cfg.embed_dim, "fit_sample": cfg.embed_fit_sample},
        "cluster": {"k": cfg.cluster_k},
    })
    ctx = RunContext.create(job)
    store, _ = read_sources(ctx)
    emb = embed_pool(ctx, store)
    clusters = cluster_pool(ctx, emb)
    domains = _domains(store)
    return PoolData(store=store, clusters=clusters, key=ctx.keys["sources"], domains=domains,
                    timings=dict(ctx.timings), excluded_domain=exclude_domain, path=path)


def _domains(store: PoolStore) -> np.ndarray:
    """The ``domain`` field of every row: for measuring what was selected, nothing else."""
    out: list[str] = []
    for b in store.iter_batches(8192, columns=["meta"]):
        for m in b.column(0).to_pylist():
            out.append(str(json.loads(m).get("domain", "?")) if m else "?")
    return np.array(out, dtype=object)


def read_texts(path: Path) -> list[str]:
    """Validated texts of a small JSONL file (a reference set), in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    rejects = RejectLog(None)
    texts = [e.text for b in iter_batches(SourceConfig(path=str(path)), rejects) for e in b]
    if rejects.total:
        logger.warning("%s: %d rows rejected %s", path, rejects.total, rejects.counts)
    if not texts:
        raise ValueError(f"{path}: no valid rows")
    return texts


def read_reference(cfg: QualityConfig, target: str) -> list[str]:
    """The reference split a selector may see (never the eval split); ``linux-ood`` reads linux's."""
    return read_texts(cfg.target_dir(base_target(target)) / "reference.jsonl")


def pool_tag(pool: PoolData) -> str:
    """'' for the full pool, '-no-<domain>' for a leave-domain-out pool (stage folder names)."""
    return "" if pool.excluded_domain is None else f"-no-{pool.excluded_domain}"


def proxy_seed(cfg: QualityConfig, seed: int) -> int:
    return seed if cfg.proxy.per_seed else cfg.seeds[0]


def _train_proxy(cfg: QualityConfig, pool: PoolData, seed: int, out: Path, save_checkpoints: int = 0) -> int:
    """``build_proxy_model`` with the benchmark's settings on the seeded pool sample (the rows
    ``jobs.models`` would use); returns how many rows it trained on."""
    from quadsel.influence import build_proxy_model

    p = cfg.proxy
    rows = sample_rows(len(pool.store), p.train_sample, seed + 1)
    build_proxy_model(pool.store.texts(rows), out, seed=seed, vocab_size=p.vocab_size,
                      hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                      max_length=p.max_length, train_length=min(p.train_length, p.max_length),
                      steps=p.steps, batch_size=p.batch_size, lr=p.lr, save_checkpoints=save_checkpoints)
    return len(rows)


def prepare_seed_model(cfg: QualityConfig, pool: PoolData, seed: int) -> SeedModel:
    """The proxy of ``seed`` (trained on a seeded pool sample; cached) and the pool in its tokens."""
    seed = proxy_seed(cfg, seed)
    p = cfg.proxy
    settings = p.model_dump(mode="json", exclude={"score_batch", "per_seed"})
    key = stable_hash({"v": 1, "pool": pool.key, "proxy": settings, "seed": seed})
    cache = Path(cfg.cache_dir)
    tag = pool_tag(pool)  # one stage folder per pool: a leave-domain-out run never evicts the full pool's
    stage = Stage(cache, f"proxy{tag}-s{seed}", key)
    t0 = time.monotonic()
    if not stage.is_done():
        logger.info("seed %d: training the proxy model on %d pool rows", seed, min(p.train_sample, len(pool.store)))
        with stage.building() as tmp:
            n_rows = _train_proxy(cfg, pool, seed, tmp / "model")
            stage.commit(tmp, {"train_rows": n_rows, "seconds": round(time.monotonic() - t0, 2)})
    model_dir = stage.path / "model"
    tok_stage = Stage(cache, f"tokens{tag}-s{seed}", stable_hash({"v": 1, "model": key}))
    if not tok_stage.is_done():
        with tok_stage.building() as tmp:
            offsets, ids = _tokenize_pool(model_dir, pool.store)
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "ids.npy", ids)
            tok_stage.commit(tmp, {"tokens": int(offsets[-1])})
    offsets = np.load(tok_stage.path / "offsets.npy")
    ids = np.load(tok_stage.path / "ids.npy", mmap_mode="r")
    tok = load_tokenizer(model_dir)
    return SeedModel(seed=seed, model_dir=model_dir, key=key, lengths=np.diff(offsets), offsets=offsets,
                     ids=ids, bos_id=int(tok.bos_token_id), seconds=round(time.monotonic() - t0, 2))


def proxy_checkpoints(cfg: QualityConfig, pool: PoolData, model: SeedModel, n: int = 3) -> list[str]:
    """Training checkpoints of ``model``'s proxy (for vog / el2n), oldest first, ending with the
    proxy itself. A second, identical training run that also saves ``n`` checkpoints, cached in
    its own stage, so the proxy every other method uses (and its cached scores) is untouched."""
    stage = Stage(Path(cfg.cache_dir), f"proxy-ckpt{pool_tag(pool)}-s{model.seed}",
                  stable_hash({"v": 1, "model": model.key, "checkpoints": n}))
    if not stage.is_done():
        logger.info("seed %d: training the proxy again to save %d checkpoints (vog / el2n)", model.seed, n)
        with stage.building() as tmp:
            _train_proxy(cfg, pool, model.seed, tmp / "model", save_checkpoints=n)
            stage.commit(tmp, {"checkpoints": n})
    ckpts = sorted((stage.path / "model" / "checkpoints").glob("step_*"))
    return [str(c) for c in ckpts] + [str(model.model_dir)]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: no special tokens, no truncation (what training on it costs;
    the same counts as ``InfluenceModel.count_tokens``)."""
    if not texts:
        return []
    return tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def _tokenize_pool(model_dir: Path, store: PoolStore) -> tuple[np.ndarray, np.ndarray]:
    tok = load_tokenizer(model_dir)
    lengths: list[int] = []
    parts: list[np.ndarray] = []
    for texts in store.iter_texts(2048):
        enc = encode(tok, texts)
        lengths.extend(len(x) for x in enc)
        parts.extend(np.asarray(x, dtype=np.int32) for x in enc)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return offsets, ids
