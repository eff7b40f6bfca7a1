"""Model-side stages of a run: the proxy model, token counts and the fitted scorer.

Each is a cached stage: the proxy model and the fitted scorer (curvature factors and the
preconditioned reference) are reused by a rerun with the same config.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from quadsel.core import faults
from quadsel.core.atomic import stable_hash
from quadsel.core.progress import Progress
from quadsel.pipeline.embed import sample_rows
from quadsel.pipeline.stage import Stage
from quadsel.pipeline.store import PoolStore

from .stages import JobError, RunContext, cached_stage

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

logger = logging.getLogger(__name__)


def prepare_model(ctx: RunContext, pool: PoolStore) -> str:
    """The model to score with: ``model.path`` as given, or a proxy trained on a pool sample."""
    mcfg = ctx.cfg.model
    if mcfg.path is not None:
        ctx.keys["model"] = stable_hash({"path": mcfg.path})
        return mcfg.path
    from quadsel.influence import build_proxy_model

    p = mcfg.proxy
    n_ckpt = p.checkpoints
    if n_ckpt is None:
        needs = ctx.cfg.selection.method != "random" and scorer_class(ctx.cfg.scorer).needs_checkpoints
        n_ckpt = min(3, p.steps - 1) if needs else 0
    key = stable_hash({"v": 1, "up": ctx.keys["sources"], "proxy": p.model_dump(mode="json", exclude={"checkpoints"}),
                       "max_length": mcfg.max_length, "seed": ctx.cfg.seed,
                       **({"checkpoints": n_ckpt} if n_ckpt else {})})

    def build(tmp: Path) -> dict[str, Any]:
        rows = sample_rows(len(pool), p.train_sample, ctx.cfg.seed + 1)
        build_proxy_model(pool.texts(rows), tmp / "model", seed=ctx.cfg.seed, vocab_size=p.vocab_size,
                          hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads,
                          max_length=mcfg.max_length,
                          train_length=min(p.train_length, mcfg.max_length), steps=p.steps,
                          batch_size=p.batch_size, lr=p.lr, save_checkpoints=n_ckpt)
        faults.point("proxy.trained")
        return {"train_rows": len(rows)}

    stage = cached_stage(ctx, "proxy", key, build, key_as="model", timing="proxy", reused="cached model",
                         label="proxy model")
    return str(stage.path / "model")


def _load_model(ctx: RunContext, model_dir: str):
    from quadsel.influence import InfluenceModel

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

    def build(tmp: Path) -> dict[str, Any]:
        im = _load_model(ctx, model_dir)
        parts = []
        with Progress("count tokens", total=len(pool), unit="rows") as prog:
            for texts in pool.iter_texts(4096):
                parts.append(im.count_tokens(texts))
                prog.advance(len(texts))
        lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        np.save(tmp / "lengths.npy", lengths)
        return {"tokens": int(lengths.sum())}

    stage = cached_stage(ctx, "tokens", key, build, reused="cached token counts")
    return np.load(stage.path / "lengths.npy")


# ScorerConfig fields passed to every scorer that has an option of that name
_COMMON = ("layers", "modules", "damping", "damping_mode", "projection_dim")


def scorer_class(scfg):
    """The registered scorer class of ``scorer.name`` (a JobError naming the choices otherwise)."""
    import quadsel.influence  # noqa: F401 - registers every scorer
    from quadsel.influence.base import available_scorers
    from quadsel.influence.base import scorer_class as registered

    cls = registered(scfg.name)
    if cls is None:
        raise JobError(f"scorer.name: unknown scorer {scfg.name!r}; available: {', '.join(available_scorers())}")
    return cls


def scorer_kwargs(scfg, seed: int, *, explicit: set[str] | None = None) -> dict:
    """make_scorer options from the job's ``scorer`` section, checked against the scorer.

    The common fields go to the scorers that have them; one the user set explicitly (``explicit``,
    default: the fields set in the config) for a scorer without it is an error, as is an unknown
    key in ``scorer.options``.
    """
    cls = scorer_class(scfg)
    allowed = cls.option_names()
    kwargs = {"seed": seed} if "seed" in allowed else {}
    for name in _COMMON:
        if name in allowed:
            kwargs[name] = getattr(scfg, name)
        elif name in (scfg.model_fields_set if explicit is None else explicit):
            raise JobError(f"scorer.{name}: the {scfg.name!r} scorer has no such option "
                           f"(its options: {', '.join(sorted(allowed - {'seed'}))})")
    bad = sorted(set(scfg.options) - allowed)
    if bad:
        raise JobError(f"scorer.options: unknown option(s) {bad} for the {scfg.name!r} scorer; "
                       f"allowed: {', '.join(sorted(allowed))}")
    kwargs.update(scfg.options)
    try:
        cls.make_config(**kwargs)
    except (TypeError, ValueError) as e:
        raise JobError(f"scorer.options: {e}") from None
    return kwargs


def fit_scorer(ctx: RunContext, pool: PoolStore, ref: PoolStore | None, model_dir: str) -> Path:
    """Fit the scorer (curvature on a sample) and set the reference; saved for the workers.

    For scorers whose fit does not read the reference (``reference_free_fit``: the gradient
    scorers) the fitted curvature is a stage of its own, ``stages/curvature``, whose key leaves
    the reference out: a rerun that changes only the reference reuses the factors and only
    recomputes the reference side (``stages/scorer``).
    """
    s = ctx.cfg.scorer
    cls = scorer_class(s)
    fit_key = stable_hash({"v": 1, "model": ctx.keys["model"], "up": ctx.keys["sources"],
                           "scorer": s.model_dump(mode="json"), "max_length": ctx.cfg.model.max_length,
                           "seed": ctx.cfg.seed,
                           "fit_ref": ctx.keys.get("reference") if s.fit_on == "reference" else None})
    split = cls.reference_free_fit
    key = stable_hash({"v": 2, "fit": fit_key, "ref": ctx.keys.get("reference"), "split": split})

    def build(tmp: Path) -> dict[str, Any]:
        if split:
            curvature = _fitted_curvature(ctx, fit_key, pool, ref, model_dir)
            from quadsel.influence import load_scorer

            sc = load_scorer(curvature.path / "fitted", model=_load_model(ctx, model_dir))
            fit_rows = curvature.info().get("fit_rows")
        else:
            sc, fit_rows = _new_fitted_scorer(ctx, pool, ref, model_dir)
        ref_texts = ref.texts(np.arange(len(ref))) if ref is not None else []
        sc.set_reference(ref_texts)
        report = getattr(sc, "report", None)
        if report:
            logger.info("scorer %s: %s", s.name, report)
        sc.save(tmp / "scorer")
        return {"scorer": s.name, "fit_rows": fit_rows, "reference_rows": len(ref_texts),
                **({"report": report} if report else {})}

    stage = cached_stage(ctx, "scorer", key, build, key_as="scorer", timing="fit_scorer",
                         reused=f"fitted {s.name} scorer")
    return stage.path / "scorer"


def _new_fitted_scorer(ctx: RunContext, pool: PoolStore, ref: PoolStore | None, model_dir: str):
    """A scorer fitted on its sample (no reference yet), and the number of fit texts."""
    from quadsel.influence import make_scorer

    s = ctx.cfg.scorer
    sc = make_scorer(s.name, _load_model(ctx, model_dir), **scorer_kwargs(s, ctx.cfg.seed))
    if s.fit_on == "reference" and ref is not None:
        fit_texts = ref.texts(sample_rows(len(ref), s.fit_sample, ctx.cfg.seed + 2))
    else:
        fit_texts = pool.texts(sample_rows(len(pool), s.fit_sample, ctx.cfg.seed + 2))
    sc.fit(fit_texts)
    faults.point("scorer.fitted")
    return sc, len(fit_texts)


def _fitted_curvature(ctx: RunContext, fit_key: str, pool: PoolStore, ref: PoolStore | None,
                      model_dir: str) -> Stage:
    """The ``curvature`` stage: the scorer fitted on its sample, before any reference is set."""

    def build(tmp: Path) -> dict[str, Any]:
        sc, fit_rows = _new_fitted_scorer(ctx, pool, ref, model_dir)
        sc.save(tmp / "fitted")
        return {"scorer": sc.name, "fit_rows": fit_rows}

    return cached_stage(ctx, "curvature", fit_key, build, label="scorer",
                        reused=f"the fitted {ctx.cfg.scorer.name} curvature (it does not depend on the reference)")


def load_scorer_factory(ctx_or_cfg, scorer_dir: Path):
    """A picklable factory that loads the fitted scorer inside a worker (any machine)."""
    from quadsel.influence import load_scorer

    cfg = getattr(ctx_or_cfg, "cfg", ctx_or_cfg)
    return functools.partial(load_scorer, str(scorer_dir), device=cfg.model.device)
