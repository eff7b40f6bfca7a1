"""Model-side stages of a run: the proxy model, token counts and the fitted scorer.

Each is a cached stage: the proxy model and the fitted scorer (curvature factors and the
preconditioned reference) are reused by a rerun with the same config.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from pipeline import faults
from pipeline.atomic import stable_hash
from pipeline.progress import Progress
from pipeline.stage import Stage
from pipeline.store import PoolStore

from pipeline.embed import sample_rows

from .stages import JobError, RunContext

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(mcfg) -> None:
    """``model.path`` must be an existing local path or look like a hub id ("org/name").

    A path that cannot be a hub id (absolute, ``./``, ``~``, several folders) and does not
    exist is named at once, before any stage runs.
    """
    p = mcfg.path
    if p is None or Path(os.path.expanduser(p)).exists():
        return
    if not _HUB_ID.match(p):
        raise JobError(f"model.path: {p!r} does not exist (a local folder with config.json, or a "
                       "Hugging Face model id like 'org/name'; null trains a proxy model)")

logger = logging.getLogger("quadsel.jobs")


def prepare_model(ctx: RunContext, pool: PoolStore) -> str:
    """The model to score with: ``model.path`` as given, or a proxy trained on a pool sample."""
    mcfg = ctx.cfg.model
    if mcfg.path is not None:
        ctx.keys["model"] = stable_hash({"path": mcfg.path})
        return mcfg.path
    from influence import build_proxy_model

    p = mcfg.proxy
    key = stable_hash({"v": 1, "up": ctx.keys["sources"], "proxy": p.model_dump(mode="json"),
                       "max_length": mcfg.max_length, "seed": ctx.cfg.seed})
    ctx.keys["model"] = key
    stage = Stage(ctx.run_dir, "proxy", key)
    t0 = time.monotonic()
    if stage.is_done():
        logger.info("proxy model: reusing cached model")
    else:
        rows = sample_rows(len(pool), p.train_sample, ctx.cfg.seed + 1)
        with stage.building() as tmp:
            build_proxy_model(pool.texts(rows), tmp / "model", seed=ctx.cfg.seed, vocab_size=p.vocab_size,
                              hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                              max_length=mcfg.max_length,
                              train_length=min(p.train_length, mcfg.max_length), steps=p.steps, batch_size=p.batch_size, lr=p.lr)
            faults.point("proxy.trained")
            stage.commit(tmp, {"train_rows": len(rows)})
    ctx.timed("proxy", t0)
    return str(stage.path / "model")


def _load_model(ctx: RunContext, model_dir: str):
    from influence import InfluenceModel

    m = ctx.cfg.model
    try:
        return InfluenceModel.load(model_dir, max_length=m.max_length, device=m.device, dtype=m.dtype,
                                   batch_size=m.batch_size)
    except ValueError as e:  # not a model folder, or a hub id that cannot be fetched
        raise JobError(f"model.path: {e}") from None


def token_lengths(ctx: RunContext, pool: PoolStore, model_dir: str) -> np.ndarray:
    """Tokens per pool row under the scoring model's tokenizer (for token budgets)."""
    key = stable_hash({"v": 1, "up": ctx.keys["sources"], "model": ctx.keys["model"],
                       "max_length": ctx.cfg.model.max_length})
    stage = Stage(ctx.run_dir, "tokens", key)
    if not stage.is_done():
        im = _load_model(ctx, model_dir)
        with stage.building() as tmp:
            parts = []
            with Progress("count tokens", total=len(pool), unit="rows") as prog:
                for texts in pool.iter_texts(4096):
                    parts.append(im.count_tokens(texts))
                    prog.advance(len(texts))
            lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
            np.save(tmp / "lengths.npy", lengths)
            stage.commit(tmp, {"tokens": int(lengths.sum())})
    return np.load(stage.path / "lengths.npy")


def fit_scorer(ctx: RunContext, pool: PoolStore, ref: PoolStore, model_dir: str) -> Path:
    """Fit the scorer (curvature on a sample) and set the reference; saved for the workers."""
    from influence import make_scorer

    s = ctx.cfg.scorer
    key = stable_hash({"v": 1, "model": ctx.keys["model"], "ref": ctx.keys["reference"],
                       "up": ctx.keys["sources"], "scorer": s.model_dump(mode="json"),
                       "max_length": ctx.cfg.model.max_length, "seed": ctx.cfg.seed})
    ctx.keys["scorer"] = key
    stage = Stage(ctx.run_dir, "scorer", key)
    t0 = time.monotonic()
    if stage.is_done():
        logger.info("scorer: reusing fitted %s scorer", s.name)
    else:
        im = _load_model(ctx, model_dir)
        sc = make_scorer(s.name, im, layers=s.layers, damping=s.damping, damping_mode=s.damping_mode,
                         projection_dim=s.projection_dim, seed=ctx.cfg.seed, **s.options)
        if s.fit_on == "reference":
            fit_texts = ref.texts(sample_rows(len(ref), s.fit_sample, ctx.cfg.seed + 2))
        else:
            fit_texts = pool.texts(sample_rows(len(pool), s.fit_sample, ctx.cfg.seed + 2))
        sc.fit(fit_texts)
        faults.point("scorer.fitted")
        sc.set_reference(ref.texts(np.arange(len(ref))))
        with stage.building() as tmp:
            sc.save(tmp / "scorer")
            stage.commit(tmp, {"scorer": s.name, "fit_rows": len(fit_texts), "reference_rows": len(ref)})
    ctx.timed("fit_scorer", t0)
    return stage.path / "scorer"


def load_scorer_factory(ctx_or_cfg, scorer_dir: Path):
    """A picklable factory that loads the fitted scorer inside a worker (any machine)."""
    from influence import load_scorer

    cfg = getattr(ctx_or_cfg, "cfg", ctx_or_cfg)
    return functools.partial(load_scorer, str(scorer_dir), device=cfg.model.device)
