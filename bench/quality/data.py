"""The pool as a user's run sees it (store, tf-idf embedding, k-means clusters), the proxy model
and its token counts per seed, and the targets' reference sets.

Everything is built by the job itself: :func:`job_config` states the benchmark's settings as a
``quadsel run`` job config and ``jobs.selection_run.SelectionRun`` runs its steps (pool, clusters,
proxy model, token counts; the scorer in :mod:`.scoring`), cached in one run folder per pool
and proxy seed under the benchmark's cache folder. ``eval.jsonl`` is NOT read here: only
:mod:`bench.quality.train` reads it, for the final evaluation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quadsel.core.atomic import atomic_write_bytes, stable_hash
from quadsel.pipeline.cluster import ClusterResult
from quadsel.pipeline.sources import RejectLog, SourceConfig, iter_batches
from quadsel.pipeline.stage import Stage
from quadsel.pipeline.store import PoolStore

from .config import QualityConfig, base_target

if TYPE_CHECKING:
    from quadsel.jobs.config import JobConfig
    from quadsel.jobs.selection_run import SelectionRun

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
    runs: dict[int, SelectionRun] = field(default_factory=dict)  # the job's run per proxy seed


@dataclass
class SeedModel:
    """The proxy model of one seed: its folder (tokenizer included) and the pool in its tokens."""

    seed: int
    model_dir: Path
    key: str  # the proxy's cache key in the benchmark (what the LM trainings depend on)
    lengths: np.ndarray  # tokens per pool row (untruncated, no special tokens): the budget unit
    offsets: np.ndarray  # int64 [N + 1]: row i's tokens are ids[offsets[i]:offsets[i + 1]]
    ids: np.ndarray  # int32, the whole pool tokenized, row after row
    bos_id: int
    seconds: float
    run: SelectionRun | None = None  # the job's run of this pool and proxy seed
    score_key: str = ""  # the model's key with how it runs (dtype, device, batch): what scores depend on


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


def job_config(cfg: QualityConfig, pool: Path, exclude_domain: str | None, seed: int, *,
               target: str | None = None, scorer: str | None = None) -> JobConfig:
    """The ``quadsel run`` job of the benchmark's settings: its pool (tf-idf embedding, k-means,
    the embedding and clustering seeded 0 for every proxy seed), the proxy trained with ``seed``,
    a token budget of ``budget_fraction``; with ``target`` and ``scorer``, that target's
    reference and the scorer as ``scorer.name`` (the common settings each scorer takes)."""
    import quadsel.influence  # noqa: F401 - registers every scorer
    from quadsel.influence.base import scorer_class
    from quadsel.jobs.config import JobConfig

    p = cfg.proxy
    tag = "" if exclude_domain is None else f"-no-{exclude_domain}"
    data: dict[str, Any] = {
        # one run folder per pool (and per proxy seed when each seed has its own proxy)
        "run_dir": str(Path(cfg.cache_dir) / (f"pool{tag}-s{seed}" if p.per_seed else f"pool{tag}")),
        "seed": seed,
        "pool": {"path": str(pool)},
        "embed": {"kind": "tfidf", "dim": cfg.embed_dim, "fit_sample": cfg.embed_fit_sample, "seed": 0},
        "cluster": {"k": cfg.cluster_k, "seed": 0},
        "model": {"path": None, "max_length": p.max_length, "device": cfg.device, "batch_size": p.score_batch,
                  # one proxy for every scorer: its training checkpoints are there for vog / el2n
                  "proxy": {**p.model_dump(exclude={"max_length", "score_batch", "per_seed"}),
                            "checkpoints": min(3, p.steps - 1)}},
        "selection": {"method": "random" if scorer is None else "quad",
                      "budget": {"unit": "tokens", "fraction": cfg.budget_fraction}},
        "ray": {"enabled": False},
    }
    if target is not None:
        data["reference"] = {"path": str(cfg.target_dir(base_target(target)) / "reference.jsonl")}
    if scorer is not None:
        s = cfg.scorer
        allowed = scorer_class(scorer).option_names()
        common = {k: v for k, v in (("layers", s.layers), ("damping", s.damping), ("damping_mode", "relative"))
                  if k in allowed}  # settings shared by every scorer: each takes what it has
        data["scorer"] = {"name": scorer, "fit_sample": s.fit_sample, "options": dict(s.options.get(scorer, {})),
                          **common}
    return JobConfig.model_validate(data)


def seed_run(cfg: QualityConfig, pool: PoolData, seed: int) -> SelectionRun:
    """The job's run of ``pool`` with the proxy of ``seed`` (one per pool and proxy seed)."""
    from quadsel.jobs.selection_run import SelectionRun

    seed = proxy_seed(cfg, seed)
    if seed not in pool.runs:
        pool.runs[seed] = SelectionRun(job_config(cfg, pool.path, pool.excluded_domain, seed))
    return pool.runs[seed]


def prepare_pool(cfg: QualityConfig, exclude_domain: str | None = None) -> PoolData:
    """Read, embed and cluster the pool with ``quadsel run``'s own steps (a leave-domain-out pool
    in its own run folder, with the same embedding and k). The job's order is pool, model,
    embedding: the first seed's proxy is trained here."""
    from quadsel.jobs.selection_run import SelectionRun

    path = pool_file(cfg, exclude_domain)
    seed = proxy_seed(cfg, cfg.seeds[0])
    run = SelectionRun(job_config(cfg, path, exclude_domain, seed))
    store, clusters = run.pool(), run.clusters()
    return PoolData(store=store, clusters=clusters, key=run.keys["sources"], domains=_domains(store),
                    timings=dict(run.ctx.timings), excluded_domain=exclude_domain, path=path, runs={seed: run})


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


def prepare_seed_model(cfg: QualityConfig, pool: PoolData, seed: int) -> SeedModel:
    """The proxy of ``seed`` and the pool's token counts (the job's model and token steps), and
    the pool in the proxy's tokens for training the evaluated LMs (cached)."""
    t0 = time.monotonic()
    run = seed_run(cfg, pool, seed)
    if run.keys["cluster"] != pool.runs[next(iter(pool.runs))].keys["cluster"]:
        raise RuntimeError("the pool's clustering differs between proxy seeds (embed / cluster seeds must be fixed)")
    model_dir = Path(run.model_dir())
    lengths = run.token_lengths()
    seed = proxy_seed(cfg, seed)
    # the benchmark's name of this proxy (the LM trainings' cache key): a function of what the
    # job's proxy key hashes too (the pool, the proxy settings, max_length, the seed)
    key = stable_hash({"v": 1, "pool": pool.key, "seed": seed,
                       "proxy": cfg.proxy.model_dump(mode="json", exclude={"score_batch", "per_seed"})})
    # the training ids of each row, in the proxy's tokenizer (one stage folder per pool and seed)
    tok_stage = Stage(Path(cfg.cache_dir), f"tokens{pool_tag(pool)}-s{seed}", stable_hash({"v": 1, "model": key}))
    if not tok_stage.is_done():
        with tok_stage.building() as tmp:
            offsets, ids = _tokenize_pool(model_dir, pool.store)
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "ids.npy", ids)
            tok_stage.commit(tmp, {"tokens": int(offsets[-1])})
    offsets = np.load(tok_stage.path / "offsets.npy")
    ids = np.load(tok_stage.path / "ids.npy", mmap_mode="r")
    if not np.array_equal(np.diff(offsets), lengths):  # what the budget counts is what an LM trains on
        raise RuntimeError(f"{tok_stage.path}: the training tokens differ from the job's token counts")
    tok = load_tokenizer(model_dir)
    return SeedModel(seed=seed, model_dir=model_dir, key=key, lengths=lengths, offsets=offsets,
                     ids=ids, bos_id=int(tok.bos_token_id), seconds=round(time.monotonic() - t0, 2), run=run,
                     score_key=run.keys["model"])


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
