"""Scorer interface, sign convention, registry, persistence (tiny models, CPU)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from quadsel.influence import (
    FeatureExtractor,
    LayoutMismatchError,
    Scorer,
    ScorerConfig,
    available_scorers,
    load_scorer,
    make_scorer,
    register_scorer,
)
from quadsel.influence.layers import get_modules
from quadsel.influence.testing import random_texts, tiny_influence_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def im(request):
    return tiny_influence_model(request.param, max_length=24, batch_size=4)


def test_registry():
    assert {"grad-dot", "grad-cos", "kfac", "ekfac"} <= set(available_scorers())
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("nope", tiny_influence_model())
    with pytest.raises(TypeError, match="unknown option"):
        make_scorer("grad-dot", tiny_influence_model(), dampng=0.1)
    # an option a scorer would ignore is refused too: grad-dot has no curvature to damp
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['damping', 'damping_mode'\]"):
        make_scorer("grad-dot", tiny_influence_model(), damping=0.1, damping_mode="absolute")
    make_scorer("ekfac", tiny_influence_model(), damping=0.1, damping_mode="absolute")


def test_register_a_new_scorer():
    @dataclass
    class LenConfig(ScorerConfig):
        sign: float = 1.0

    @register_scorer("test-length")
    class LengthScorer(Scorer):
        config_cls = LenConfig
        needs_reference = False

        def set_reference(self, texts):
            return self

        def score(self, texts):
            self._require_ready()
            return self.config.sign * self.model.count_tokens(texts).astype(np.float64)

    sc = make_scorer("test-length", tiny_influence_model(), sign=-1.0)
    assert "test-length" in available_scorers()
    assert sc.score(["a b c", "a"])[0] < sc.score(["a b c", "a"])[1]


def test_sign_gradient_step_lowers_reference_loss(im):
    """score = <ḡ_ref, g_cand>: a step -η g_cand on the tracked weights changes the mean
    reference loss by ≈ -η·score."""
    import copy

    ref, cand = random_texts(4, seed=1, min_words=6), random_texts(3, seed=2, min_words=6)
    sc = make_scorer("grad-dot", im).set_reference(ref)
    scores = sc.score(cand)
    base = im.per_example_loss(ref).mean()
    eta = 1e-4
    for j, text in enumerate(cand):
        g = FeatureExtractor(im, projection_dim=None).compute([text])
        model = copy.deepcopy(im.model)
        mods = get_modules(model, sc.layers)
        with torch.no_grad():
            for slot, mod in zip(g.layout.slots, mods):
                grad = torch.from_numpy(g.layer_block(slot.name)[0].copy())
                mod.weight -= eta * (grad if slot.kind == "linear" else grad.T)
        im2 = copy.copy(im)
        im2.model = model
        delta = im2.per_example_loss(ref).mean() - base
        assert delta == pytest.approx(-eta * scores[j], rel=0.05, abs=1e-6)


def test_grad_cos_is_mean_cosine(im):
    ref, cand = random_texts(4, seed=3), random_texts(6, seed=4)
    for pdim in (None, 512):
        sc = make_scorer("grad-cos", im, projection_dim=pdim, seed=5).set_reference(ref)
        fe = FeatureExtractor(im, projection_dim=pdim, seed=5)
        assert fe.layout.hash == sc.layout.hash
        r, c = fe.compute(ref).values.astype(np.float64), fe.compute(cand).values.astype(np.float64)
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        np.testing.assert_allclose(sc.score(cand), (c @ r.T).mean(1), rtol=1e-4, atol=1e-6)
        assert np.all(np.abs(sc.score(cand)) <= 1 + 1e-6)


def test_projected_scores_equal_feature_inner_products(im):
    """Fast path (no stored features) == mean inner product of stored projected features."""
    ref, cand = random_texts(3, seed=6), random_texts(5, seed=7)
    sc = make_scorer("grad-dot", im, projection_dim=1024, seed=2).set_reference(ref)
    fe = FeatureExtractor(im, projection_dim=1024, seed=2)
    want = fe.compute(cand).dot(fe.compute(ref)).mean(1)
    np.testing.assert_allclose(sc.score(cand), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_low_rank_reference(im):
    fit, ref, cand = random_texts(8, seed=8), random_texts(3, seed=9), random_texts(8, seed=10)
    exact = make_scorer("ekfac", im).fit(fit).set_reference(ref)
    full_rank = make_scorer("ekfac", im, rank=10_000)
    full_rank.curvature, full_rank.is_fitted = exact.curvature, True
    np.testing.assert_allclose(full_rank.set_reference(ref).score(cand), exact.score(cand), rtol=1e-4)
    low = make_scorer("ekfac", im, rank=4)
    low.curvature, low.is_fitted = exact.curvature, True
    s_low = low.set_reference(ref).score(cand)
    assert np.corrcoef(s_low, exact.score(cand))[0, 1] > 0.5
    with pytest.raises(ValueError, match="rank"):
        make_scorer("grad-cos", im, rank=4)


def test_step_order_errors(im):
    sc = make_scorer("ekfac", im)
    with pytest.raises(RuntimeError, match="fit"):
        sc.set_reference(["a b"])
    with pytest.raises(RuntimeError, match="fit"):
        sc.score(["a b"])
    g = make_scorer("grad-dot", im)
    with pytest.raises(RuntimeError, match="set_reference"):
        g.score(["a b"])
    with pytest.raises(ValueError, match="empty"):
        g.set_reference([])
    with pytest.raises(TypeError, match="texts"):
        g.set_reference("a single string")


@pytest.mark.parametrize("name", ["grad-dot", "grad-cos", "kfac", "ekfac"])
def test_save_load_roundtrip(im, name, tmp_path):
    fit, ref, cand = random_texts(8, seed=11), random_texts(3, seed=12), random_texts(5, seed=13)
    kw = {"projection_dim": 256} if name.startswith("grad") else {"rank": 3}
    sc = make_scorer(name, im, **kw)
    sc.fit(fit).set_reference(ref)
    want = sc.score(cand)
    sc.save(tmp_path / "sc")  # in-memory model: copied into sc/model
    assert (tmp_path / "sc" / "model" / "config.json").is_file()
    back = load_scorer(tmp_path / "sc", device="cpu")
    assert type(back) is type(sc) and back.layout.hash == sc.layout.hash
    np.testing.assert_allclose(back.score(cand), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # a scorer saved from a model directory references it instead of copying it
    sc.model.model.save_pretrained(tmp_path / "m")
    sc.model.tokenizer.save_pretrained(tmp_path / "m")
    sc.model.source = str(tmp_path / "m")
    sc.save(tmp_path / "sc2")
    assert not (tmp_path / "sc2" / "model").exists()
    np.testing.assert_allclose(load_scorer(tmp_path / "sc2").score(cand), want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())
    sc.model.source = None


def test_load_checks_layout(im, tmp_path):
    sc = make_scorer("grad-dot", im, projection_dim=256).set_reference(random_texts(2, seed=14))
    sc.save(tmp_path)
    import json

    meta = json.loads((tmp_path / "scorer.json").read_text())
    meta["config"]["seed"] = 99  # the recorded layout no longer matches the config
    (tmp_path / "scorer.json").write_text(json.dumps(meta))
    with pytest.raises(LayoutMismatchError):
        load_scorer(tmp_path)


def test_fit_on_reference_set_and_true_fisher(im):
    ref, cand = random_texts(5, seed=15), random_texts(4, seed=16)
    a = make_scorer("ekfac", im, fisher="true", seed=0).fit(ref).set_reference(ref).score(cand)
    b = make_scorer("ekfac", im, fisher="true", seed=0).fit(ref).set_reference(ref).score(cand)
    np.testing.assert_allclose(a, b)  # seeded label sampling: deterministic
    assert np.all(np.isfinite(a))
