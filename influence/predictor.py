"""``predictor``: learned extrapolation of an expensive scorer (MATES, NN-CIFT, Influence Distillation).

An expensive *base* scorer (any registered scorer; ``ekfac`` by default) labels a sample of the
pool; a light regressor (ridge default, or a small MLP) learns to map cheap forward-only
features of a text to the base's score, and predicts every other text. Sign and units are the
base's: higher = more worth training on, as the base says.

Features (one forward pass, no gradients, same tokenisation/truncation as the base):
- ``hidden``: the mean over non-padding tokens of ``hidden_states[feature_layer]`` (the pooling of
  :class:`influence.embedders.HiddenStateEmbedder`, without its L2 normalisation: the norm
  carries signal), plus ``log(1 + tokens)``;
- ``hidden+loss``: also the summed token loss, the mean token loss and the token count (the
  logits come from the same forward pass). Gradient scores are sums over tokens, so
  loss/length carry much of their magnitude.
Features and targets are standardised (train-set mean/std); ``target="per_token"`` regresses
``score / tokens`` and multiplies back (fits the length scaling of summed-loss scores exactly).

Flow (the job always calls ``fit`` then ``set_reference``):
- ``fit(texts)``: fits the base on ``texts`` when it needs a fit, and keeps ``texts`` as the pool
  sample to label (the reference is not known yet).
- ``set_reference(ref)``: ``base.set_reference(ref)`` (skipped when the base needs none), then
  the base labels up to ``label_sample`` kept texts (seeded choice); a seeded ``holdout`` share is
  held out, the regressor is fitted on the rest and Spearman/Pearson of its predictions vs the
  base's exact scores on the holdout are measured, with a control (the mean over 5 fits on
  shuffled labels: ~0) and the length-only Spearman; then the regressor is refitted on all
  labelled texts. The numbers are logged, kept in ``scorer.report`` and saved in ``scorer.json``.
- ``score(texts)``: ``regressor(features(texts))`` — one forward pass per text, no backward.

Cost: a forward pass (``hidden``: without the vocabulary projection) instead of the base's
forward + backward with gradient hooks; ``report["timing"]`` holds both per-text costs measured
on the labelled texts, and their ratio (bench/predictor_bench.py measures it on real data).

Persistence: the base scorer is saved by its own ``save`` under ``base/``; the regressor
(standardisation, ridge coefficients or MLP weights) as arrays in ``regressor.npz`` — no pickle;
predictions always use the numpy forward, so a loaded scorer gives identical scores.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .base import Scorer, ScorerConfig, load_scorer, make_scorer, register_scorer
from .model import InfluenceModel, _check_texts

logger = logging.getLogger(__name__)

MIN_LABELS = 20  # fewer labelled texts cannot support a fit plus a holdout measurement
MIN_HOLDOUT = 5
CONTROL_SHUFFLES = 5  # shuffled-label control fits, averaged
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
_FORWARDED = ("layers", "modules", "damping", "damping_mode", "projection_dim", "seed")


@dataclass
class PredictorConfig(ScorerConfig):
    """Options of ``predictor``. ``layers``/``modules``/``damping``/``damping_mode``/``projection_dim``/``seed``
    are forwarded to the base when its config has the field and ``base_options`` does not set it
    (so one job config can switch scorers by name)."""

    base: str = "ekfac"
    base_options: dict = field(default_factory=dict)
    regressor: Literal["ridge", "mlp"] = "ridge"
    alpha: float | None = None  # ridge L2 (standardised units); None: leave-one-out over RIDGE_ALPHAS
    hidden_sizes: tuple[int, ...] = (64,)  # mlp
    mlp_alpha: float = 1e-3  # mlp L2
    max_iter: int = 500  # mlp epochs
    label_sample: int = 512
    holdout: float = 0.2
    features: Literal["hidden", "hidden+loss"] = "hidden+loss"
    feature_layer: int = -1  # hidden-state index: 0 = token embeddings, -1 = last layer
    target: Literal["score", "per_token"] = "score"
    standardize: bool = True
    seed: int = 0
    layers: str = "all"
    modules: list[str] | None = None
    damping: float = 0.1
    damping_mode: Literal["absolute", "relative"] = "relative"
    projection_dim: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        if isinstance(self.projection_dim, list):
            self.projection_dim = tuple(self.projection_dim)
        checks = [
            ("regressor", self.regressor in ("ridge", "mlp"), "'ridge' or 'mlp'"),
            ("features", self.features in ("hidden", "hidden+loss"), "'hidden' or 'hidden+loss'"),
            ("target", self.target in ("score", "per_token"), "'score' or 'per_token'"),
            ("label_sample", self.label_sample >= MIN_LABELS, f">= {MIN_LABELS}"),
            ("holdout", 0.0 <= self.holdout < 1.0, "in [0, 1)"),
            ("alpha", self.alpha is None or self.alpha > 0, "> 0 or null"),
            ("hidden_sizes", len(self.hidden_sizes) > 0 and min(self.hidden_sizes) > 0, "positive widths"),
            ("max_iter", self.max_iter >= 1, ">= 1"),
            ("base_options", isinstance(self.base_options, dict), "a mapping"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"scorer 'predictor': {name} must be {want}, got {getattr(self, name)!r}")
        if self.base == "predictor":
            raise ValueError("scorer 'predictor': base cannot be 'predictor'")


# ====================================================================== features
@torch.no_grad()
def forward_features(im: InfluenceModel, texts: Sequence[str], *, layer: int = -1, with_loss: bool = True,
                     batch_size: int | None = None) -> np.ndarray:
    """``[n, 1 + H (+3)]`` float64 from ONE forward pass per batch, in input order: ``log1p(tokens)``,
    the mean-pooled ``hidden_states[layer]`` (and summed loss, mean loss, tokens)."""
    texts = _check_texts(texts)
    width = 1 + int(im.model.config.hidden_size) + (3 if with_loss else 0)
    out = np.zeros((len(texts), width), dtype=np.float64)
    for b in im.batches(texts, batch_size):
        res = im.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True,
                       use_cache=False, logits_to_keep=0 if with_loss else 1)
        h = res.hidden_states[layer].float()
        mask = b.attention_mask.unsqueeze(-1).to(h.dtype)
        mean = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # HiddenStateEmbedder's pooling
        n_tok = b.attention_mask.sum(dim=1).double()
        cols = [torch.log1p(n_tok)[:, None], mean.double()]
        if with_loss:
            loss = im.summed_loss(res.logits, b.input_ids, b.attention_mask).double()
            cols += [loss[:, None], (loss / (n_tok - 1).clamp(min=1.0))[:, None], n_tok[:, None]]
        out[b.index] = torch.cat(cols, dim=1).cpu().numpy()
    return out


def token_counts(features: np.ndarray) -> np.ndarray:
    """Tokens per text, from column 0 (``log1p(tokens)``) of :func:`forward_features`."""
    return np.rint(np.expm1(features[:, 0]))


# ====================================================================== regressor
@dataclass
class Regressor:
    """A fitted regressor as plain arrays, predicting with a numpy forward pass.

    ``x_mean``/``x_scale``/``y_mean``/``y_scale`` standardise; ``ridge``: ``coef``/``intercept``;
    ``mlp``: ``w0, b0, w1, b1, …`` (ReLU hidden layers, linear output)."""

    kind: str
    target: str
    arrays: dict[str, np.ndarray]

    def predict(self, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        z = (x - a["x_mean"]) / a["x_scale"]
        if self.kind == "ridge":
            out = z @ a["coef"] + a["intercept"][0]
        else:
            n_layers = sum(1 for k in a if k.startswith("w"))
            for i in range(n_layers):
                z = z @ a[f"w{i}"] + a[f"b{i}"]
                if i < n_layers - 1:
                    z = np.maximum(z, 0.0)
            out = z[:, 0]
        out = out * a["y_scale"][0] + a["y_mean"][0]
        if self.target == "per_token":
            out = out * np.maximum(token_counts(x), 1.0)
        return out.astype(np.float64)

    def save(self, path: Path) -> None:
        from quadsel.core.atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **self.arrays)

    @classmethod
    def load(cls, path: Path, kind: str, target: str) -> "Regressor":
        with np.load(path, allow_pickle=False) as z:
            return cls(kind, target, {k: z[k] for k in z.files})


def fit_regressor(x: np.ndarray, y: np.ndarray, cfg: PredictorConfig, seed: int) -> tuple[Regressor, dict]:
    """Fit on features ``x [n, d]`` and base scores ``y [n]``; returns the regressor and fit info."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.neural_network import MLPRegressor

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if cfg.target == "per_token":
        y = y / np.maximum(token_counts(x), 1.0)
    if cfg.standardize:
        x_mean, x_scale = x.mean(0), x.std(0)
        x_scale = np.where(x_scale > 1e-12 * max(1.0, float(np.abs(x_mean).max(initial=0.0))), x_scale, 1.0)
        y_mean, y_scale = float(y.mean()), float(y.std())
        y_scale = y_scale if y_scale > 0 else 1.0
    else:
        x_mean, x_scale, y_mean, y_scale = np.zeros(x.shape[1]), np.ones(x.shape[1]), 0.0, 1.0
    z, t = (x - x_mean) / x_scale, (y - y_mean) / y_scale
    arrays: dict[str, np.ndarray] = {"x_mean": x_mean, "x_scale": x_scale, "y_mean": np.array([y_mean]),
                                     "y_scale": np.array([y_scale])}
    info: dict[str, Any] = {}
    if cfg.regressor == "ridge":
        if cfg.alpha is None:
            reg = RidgeCV(alphas=RIDGE_ALPHAS).fit(z, t)
            info["alpha"] = float(reg.alpha_)
        else:
            reg = Ridge(alpha=cfg.alpha).fit(z, t)
            info["alpha"] = float(cfg.alpha)
        arrays["coef"] = np.asarray(reg.coef_, dtype=np.float64).ravel()
        arrays["intercept"] = np.array([float(reg.intercept_)])
    else:
        reg = MLPRegressor(hidden_layer_sizes=cfg.hidden_sizes, alpha=cfg.mlp_alpha, max_iter=cfg.max_iter,
                           random_state=seed, early_stopping=True, n_iter_no_change=20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reg.fit(z, t)
        for i, (w, b) in enumerate(zip(reg.coefs_, reg.intercepts_)):
            arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(w, np.float64), np.asarray(b, np.float64)
        info["n_iter"] = int(reg.n_iter_)
    out = Regressor(cfg.regressor, cfg.target, arrays)
    # the numpy forward is what scores (and what is saved): it must reproduce the fitted model
    want = reg.predict(z[:64]) * y_scale + y_mean
    got = out.predict(x[:64]) / (np.maximum(token_counts(x[:64]), 1.0) if cfg.target == "per_token" else 1.0)
    if not np.allclose(got, want, rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(want).max(initial=0.0)))):
        raise RuntimeError(f"predictor: the numpy {cfg.regressor} forward does not reproduce scikit-learn's")
    return out, info


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """(Spearman, Pearson); None where undefined (a constant side)."""
    from scipy.stats import pearsonr, spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    return float(spearmanr(a, b).statistic), float(pearsonr(a, b).statistic)


# ====================================================================== scorer
@register_scorer("predictor")
class PredictorScorer(Scorer):
    """A regressor on forward-pass features, trained on a base scorer's labels of a pool sample."""

    config_cls = PredictorConfig
    needs_fit = True
    needs_reference = True

    def __init__(self, model: InfluenceModel, config: Any = None) -> None:
        super().__init__(model, config)
        n_layers = int(getattr(model.model.config, "num_hidden_layers", 0) or 0)
        if n_layers and not -(n_layers + 1) <= self.config.feature_layer <= n_layers:
            raise ValueError(f"scorer 'predictor': feature_layer = {self.config.feature_layer}: the model has "
                             f"{n_layers} layers, so it must be in [{-(n_layers + 1)}, {n_layers}]")
        self.base: Scorer = self._make_base()
        self.regressor: Regressor | None = None
        self.report: dict[str, Any] = {}
        self._pool: list[str] = []
        # the last set_reference's labelled sample (texts, features, base scores) and its
        # (train, holdout) positions: in memory only, for inspection and benchmarks
        self.labelled: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self.split: tuple[np.ndarray, np.ndarray] | None = None

    def _make_base(self) -> Scorer:
        from .base import scorer_class

        c = self.config
        opts = dict(c.base_options)
        cls = scorer_class(c.base)
        if cls is not None:
            have = cls.option_names()  # a base without curvature takes no damping
            for k in (*_FORWARDED, "batch_size"):
                if k in have and k not in opts:
                    opts[k] = getattr(c, k)
        try:
            return make_scorer(c.base, self.model, **opts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"scorer 'predictor': base = {c.base!r}, base_options = {c.base_options!r}: {e}") from e

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        c = self.config
        return forward_features(self.model, texts, layer=c.feature_layer, with_loss=c.features == "hidden+loss",
                                batch_size=c.batch_size)

    # -------------------------------------------------------------- fit / reference
    def fit(self, texts: Sequence[str]) -> "PredictorScorer":
        """Fit the base (when it needs a fit) and keep ``texts`` as the pool sample to label."""
        texts = _check_texts(texts)
        if self.base.needs_fit:
            self.base.fit(texts)
        self._pool = list(texts)
        if self.regressor is not None:
            logger.warning("scorer predictor: refitted after set_reference; call set_reference again")
        self.is_fitted, self.has_reference = True, False
        return self

    def set_reference(self, texts: Sequence[str]) -> "PredictorScorer":
        """Set the base's reference, label the kept pool sample with it, fit and measure the regressor."""
        texts = _check_texts(texts)
        if not self.is_fitted:
            raise RuntimeError("scorer 'predictor': call fit(texts) with a pool sample before set_reference "
                               "(the sample is what the base scorer labels)")
        if self.base.needs_reference:
            self.base.set_reference(texts)
        self._label_and_fit()
        self.has_reference = True
        return self

    def _label_and_fit(self) -> None:
        c = self.config
        pool = self._pool
        if len(pool) < MIN_LABELS:
            raise ValueError(f"scorer 'predictor': fit() got {len(pool)} texts, at least {MIN_LABELS} are needed "
                             f"for the base to label (in a job: raise scorer.fit_sample; a loaded scorer keeps no "
                             "pool sample: call fit again)")
        n = min(c.label_sample, len(pool))
        idx = np.sort(np.random.default_rng(c.seed).choice(len(pool), n, replace=False))
        texts = [pool[i] for i in idx]
        t0 = time.perf_counter()
        y = np.asarray(self.base.score(texts), dtype=np.float64)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = self._features(texts)
        t_feat = time.perf_counter() - t0
        if not np.all(np.isfinite(y)):
            raise ValueError(f"scorer 'predictor': the base {c.base!r} gave {int((~np.isfinite(y)).sum())} "
                             "non-finite scores on the labelled sample")
        n_hold = 0 if c.holdout == 0 else min(max(MIN_HOLDOUT, round(c.holdout * n)), n - 2 * MIN_HOLDOUT)
        perm = np.random.default_rng(c.seed + 1).permutation(n)
        hold, train = perm[:n_hold], perm[n_hold:]
        rep: dict[str, Any] = {"base": c.base, "regressor": c.regressor, "features": c.features,
                               "feature_layer": c.feature_layer, "target": c.target, "pool_sample": len(pool),
                               "n_labelled": n, "n_train": len(train), "n_holdout": n_hold}
        if n_hold:
            reg, _ = fit_regressor(x[train], y[train], c, c.seed)
            rep["holdout_spearman"], rep["holdout_pearson"] = _corr(reg.predict(x[hold]), y[hold])
            ctrl = []
            for k in range(CONTROL_SHUFFLES):
                shuffled = y[train][np.random.default_rng([c.seed, 2, k]).permutation(len(train))]
                r, _ = fit_regressor(x[train], shuffled, c, c.seed)
                ctrl.append(_corr(r.predict(x[hold]), y[hold])[0])
            ok = [v for v in ctrl if v is not None]
            rep["control_spearman_shuffled_labels"] = float(np.mean(ok)) if ok else None
            rep["length_spearman"] = _corr(token_counts(x[hold]), y[hold])[0]
        self.regressor, rep["fit"] = fit_regressor(x, y, c, c.seed)
        self.labelled, self.split = (texts, x, y), (train, hold)
        rep["train_spearman"] = _corr(self.regressor.predict(x), y)[0]
        rep["timing"] = {"base_s_per_text": t_base / n, "features_s_per_text": t_feat / n,
                         "speedup": t_base / t_feat if t_feat > 0 else None}
        self.report = rep
        logger.info("scorer predictor (%s on %s, %s features): %d labelled by %s; holdout (%d) Spearman %s "
                    "Pearson %s (shuffled-label control %s); %.1fx cheaper per text", c.regressor, c.target,
                    c.features, n, c.base, n_hold, _fmt(rep.get("holdout_spearman")),
                    _fmt(rep.get("holdout_pearson")), _fmt(rep.get("control_spearman_shuffled_labels")),
                    rep["timing"]["speedup"] or float("nan"))

    # -------------------------------------------------------------- score
    def score(self, texts: Sequence[str]) -> np.ndarray:
        self._require_ready()
        texts = _check_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        if self.regressor is None:
            raise RuntimeError("scorer 'predictor': no regressor (call set_reference)")
        return self.regressor.predict(self._features(texts))

    # -------------------------------------------------------------- persistence
    def _extra_meta(self) -> dict:
        return {"report": self.report}

    def _save_state(self, directory: Path) -> None:
        self.base.save(directory / "base", save_model=False)
        if self.regressor is not None:
            self.regressor.save(directory / "regressor.npz")

    def _load_state(self, directory: Path, meta: dict) -> None:
        if (directory / "base" / "scorer.json").is_file():
            self.base = load_scorer(directory / "base", model=self.model)
        self.report = dict(meta.get("report") or {})
        reg = directory / "regressor.npz"
        if meta.get("has_reference"):
            if not reg.is_file():
                raise FileNotFoundError(f"{directory}: scorer.json says has_reference but regressor.npz is missing")
            self.regressor = Regressor.load(reg, self.config.regressor, self.config.target)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


__all__ = ["PredictorConfig", "PredictorScorer", "Regressor", "fit_regressor", "forward_features", "MIN_LABELS"]
