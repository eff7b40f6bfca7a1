"""``predictor`` scorer: learned extrapolation of a base scorer (tiny models, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from quadsel.influence import Scorer, ScorerConfig, make_scorer, register_scorer
from quadsel.influence.predictor import MIN_LABELS, PredictorScorer, fit_regressor, forward_features
from quadsel.influence.testing import random_texts, tiny_influence_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def im(request):
    return tiny_influence_model(request.param, max_length=24, batch_size=8)


@pytest.fixture(scope="module")
def llama():
    return tiny_influence_model("llama", max_length=24, batch_size=8)


def _pool(n: int, seed: int) -> list[str]:
    return random_texts(n, seed=seed, min_words=2, max_words=20)


@pytest.fixture(scope="module")
def fitted(llama):
    """grad-dot base (no curvature fit: fast), 160 labelled texts."""
    sc = make_scorer("predictor", llama, base="grad-dot", label_sample=160, seed=3)
    return sc.fit(_pool(200, seed=11)).set_reference(random_texts(6, seed=12, min_words=4))


def test_features_match_hidden_embedder_and_loss(im):
    from quadsel.influence.embedders import HiddenStateEmbedder
    from quadsel.pipeline.embed.base import EmbedConfig

    texts = _pool(9, seed=1) + [""]
    for layer in (-1, 1):
        x = forward_features(im, texts, layer=layer, with_loss=True, batch_size=3)
        emb = HiddenStateEmbedder(EmbedConfig(kind="hidden", layer=layer, model_batch_size=4), im=im).transform(texts)
        h = x[:, 1:-3]
        np.testing.assert_allclose(h / np.linalg.norm(h, axis=1, keepdims=True), emb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x[:, -3], im.per_example_loss(texts), rtol=1e-5, atol=1e-5)
        n = np.array([len(t) for t in im.tokenize(texts)])
        np.testing.assert_array_equal(x[:, -1], n)
        np.testing.assert_allclose(np.expm1(x[:, 0]), n, rtol=1e-12)
        # features="hidden" skips the vocabulary projection but pools the very same states
        np.testing.assert_allclose(forward_features(im, texts, layer=layer, with_loss=False), x[:, :-3],
                                   rtol=1e-5, atol=1e-6)


def test_predicts_base_on_unseen_texts_and_shuffled_labels_do_not(fitted):
    """Predictions track the base's exact scores on texts never labelled; the same pipeline fitted
    on shuffled labels does not (so the agreement is learned, not an artefact of the features)."""
    test = _pool(150, seed=21)
    exact = fitted.base.score(test)
    pred = fitted.score(test)
    rho = spearmanr(pred, exact).statistic
    assert rho > 0.45  # measured 0.55-0.60 over pool/reference seeds
    texts, x, y = fitted.labelled
    xt = forward_features(fitted.model, test)
    ctrl = [spearmanr(fit_regressor(x, y[np.random.default_rng(s).permutation(len(y))], fitted.config, 0)[0]
                      .predict(xt), exact).statistic for s in range(4)]
    assert abs(np.mean(ctrl)) < 0.2 and rho > np.mean(ctrl) + 0.3


def test_report_is_present_and_honest(fitted, tmp_path):
    rep = fitted.report
    assert rep["base"] == "grad-dot" and rep["n_labelled"] == 160 and rep["pool_sample"] == 200
    assert rep["n_train"] + rep["n_holdout"] == 160 and rep["n_holdout"] == 32
    texts, x, y = fitted.labelled
    train, hold = fitted.split
    assert len(set(train) | set(hold)) == 160 and not set(train) & set(hold)
    # the labels are the base's exact scores, the features a plain forward pass
    np.testing.assert_allclose(y[:24], fitted.base.score(texts[:24]), rtol=1e-5, atol=1e-6 * np.abs(y).max())
    np.testing.assert_allclose(x[:24], forward_features(fitted.model, texts[:24]), rtol=1e-5, atol=1e-6)
    # holdout numbers: a fit on the train part only, evaluated on the untouched holdout
    reg, _ = fit_regressor(x[train], y[train], fitted.config, fitted.config.seed)
    p = reg.predict(x[hold])
    assert rep["holdout_spearman"] == pytest.approx(spearmanr(p, y[hold]).statistic, abs=1e-9)
    assert rep["holdout_pearson"] == pytest.approx(np.corrcoef(p, y[hold])[0, 1], abs=1e-9)
    assert rep["holdout_spearman"] > 0.4
    assert set(rep["timing"]) == {"base_s_per_text", "features_s_per_text", "speedup"}
    fitted.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "scorer.json").read_text())["report"] == json.loads(json.dumps(rep))


def test_save_load_round_trip_in_another_process(fitted, tmp_path):
    texts = _pool(20, seed=31)
    want = fitted.score(texts)
    d = fitted.save(tmp_path / "sc")
    assert (d / "base" / "scorer.json").is_file() and (d / "regressor.npz").is_file()
    np.load(d / "regressor.npz", allow_pickle=False).close()
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = ("import json, sys, numpy as np; from influence import load_scorer; import influence.predictor; "
            f"sc = load_scorer({str(d)!r}, device='cpu'); "
            f"np.save({str(tmp_path / 'got.npy')!r}, sc.score(json.load(open({str(tmp_path / 'texts.json')!r})))); "
            "print(type(sc.base).__name__, sc.report['n_labelled'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["GradDotScorer", "160"]
    # another process may run with another number of BLAS threads: equal up to float rounding
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=1e-6)


def test_batch_size_order_and_empty(fitted):
    texts = _pool(23, seed=41)
    want = fitted.score(texts)
    old = fitted.config
    try:
        for bs in (1, 5):
            fitted.config = replace(old, batch_size=bs)
            np.testing.assert_allclose(fitted.score(texts), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    finally:
        fitted.config = old
    perm = np.random.default_rng(0).permutation(len(texts))
    np.testing.assert_allclose(fitted.score([texts[i] for i in perm]), want[perm], rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())
    out = fitted.score([])
    assert out.shape == (0,) and out.dtype == np.float64


def test_mlp_per_token_ekfac_default_and_determinism(im):
    """Default base (ekfac, fitted on the pool sample), MLP on a per-token target, both archs."""
    pool, ref, test = _pool(30, seed=51), random_texts(4, seed=52, min_words=4), _pool(10, seed=53)
    kw = dict(regressor="mlp", target="per_token", hidden_sizes=[16], max_iter=200, label_sample=24, seed=1)
    a = make_scorer("predictor", im, **kw).fit(pool).set_reference(ref)
    assert a.base.name == "ekfac" and a.base.is_fitted and a.report["n_labelled"] == 24
    assert a.config.hidden_sizes == (16,) and a.report["fit"]["n_iter"] >= 1
    assert np.all(np.isfinite(a.score(test)))
    _, x, y = a.labelled  # the regressor fit is seeded: refitting gives the same arrays
    again, _ = fit_regressor(x, y, a.config, a.config.seed)
    for k, v in a.regressor.arrays.items():
        np.testing.assert_array_equal(again.arrays[k], v)


def test_errors(llama):
    with pytest.raises(ValueError, match=f"label_sample must be >= {MIN_LABELS}"):
        make_scorer("predictor", llama, label_sample=MIN_LABELS - 1)
    with pytest.raises(ValueError, match="holdout"):
        make_scorer("predictor", llama, holdout=1.0)
    with pytest.raises(ValueError, match="regressor"):
        make_scorer("predictor", llama, regressor="forest")
    with pytest.raises(ValueError, match="base = 'nope'"):
        make_scorer("predictor", llama, base="nope")
    with pytest.raises(ValueError, match="base_options"):
        make_scorer("predictor", llama, base="grad-dot", base_options={"dampng": 1})
    with pytest.raises(ValueError, match="feature_layer = 5"):
        make_scorer("predictor", llama, feature_layer=5)
    with pytest.raises(TypeError, match="unknown option"):
        make_scorer("predictor", llama, lable_sample=100)
    sc = make_scorer("predictor", llama, base="grad-dot")
    with pytest.raises(RuntimeError, match="call fit"):
        sc.set_reference(["a b"])
    with pytest.raises(RuntimeError, match="fit"):
        sc.score(["a b"])
    with pytest.raises(ValueError, match="fit_sample"):
        sc.fit(_pool(MIN_LABELS - 1, seed=1)).set_reference(["a b c"])


def test_base_options_forwarding(llama):
    # job-level options reach the base; base_options win over them
    sc = make_scorer("predictor", llama, base="grad-dot", layers="mlp", seed=7)
    assert sc.base.config.layers == "mlp" and sc.base.config.seed == 7
    sc = make_scorer("predictor", llama, base="grad-dot", layers="mlp", base_options={"layers": "attention"})
    assert sc.base.config.layers == "attention"


@dataclass
class _LenConfig(ScorerConfig):
    seed: int = 0


@register_scorer("test-predictor-neglen")
class _NegLength(Scorer):
    """A base that needs neither fit nor reference: minus the token count."""

    config_cls = _LenConfig
    needs_reference = False

    def set_reference(self, texts):
        raise AssertionError("not called for a base without a reference")

    def score(self, texts):
        return -self.model.count_tokens(texts, truncate=True).astype(np.float64)


def test_base_without_reference_still_labels(llama):
    sc = make_scorer("predictor", llama, base="test-predictor-neglen", label_sample=60)
    sc.fit(_pool(80, seed=61)).set_reference([])
    assert isinstance(sc, PredictorScorer) and sc.report["n_labelled"] == 60
    assert sc.report["holdout_pearson"] > 0.95  # -length is a linear function of a feature
    test = _pool(30, seed=62)
    assert np.corrcoef(sc.score(test), sc.base.score(test))[0, 1] > 0.95
