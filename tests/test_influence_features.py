"""Per-example gradient features: exactness, projection, layout, layer selection (tiny models, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quadsel.influence import FeatureExtractor, LayoutMismatchError, find_layers, make_scorer
from quadsel.influence.layers import get_modules
from quadsel.influence.projection import Projector
from quadsel.influence.testing import SAMPLE_TEXTS, random_texts, tiny_influence_model

ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def im(request):
    return tiny_influence_model(request.param, max_length=24, batch_size=5)


def autograd_per_example(im, layers, texts):
    """Reference: one backward per example with ordinary weight grads ([out, in] orientation)."""
    mods = get_modules(im.model, layers)
    rows = []
    for ids in im.tokenize(texts):
        x = torch.tensor([ids])
        m = torch.ones_like(x)
        im.model.zero_grad(set_to_none=True)
        for p in im.model.parameters():
            p.requires_grad_(True)
        loss = im.summed_loss(im.model(input_ids=x, attention_mask=m).logits, x, m).sum()
        loss.backward()
        parts = []
        for t, mod in zip(layers, mods):
            w = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
            g = w if t.kind == "linear" else w.T
            if t.bias:
                b = mod.bias.grad if mod.bias.grad is not None else torch.zeros_like(mod.bias)
                g = torch.cat([g, b[:, None]], dim=1)
            parts.append(g.reshape(-1))
        rows.append(torch.cat(parts).detach().numpy())
    im.model.zero_grad(set_to_none=True)
    return np.stack(rows)


@pytest.mark.parametrize("include_bias", [False, True])
def test_identity_features_equal_autograd(im, include_bias):
    texts = SAMPLE_TEXTS + random_texts(6, seed=1)  # mixed lengths, an empty text, truncation
    fe = FeatureExtractor(im, projection_dim=None, include_bias=include_bias)
    assert fe.layout.exact
    feats = fe.compute(texts, batch_size=5)  # batches of 5: padding in every batch
    ref = autograd_per_example(im, fe.layers, texts)
    assert feats.values.dtype == np.float32
    assert feats.values.shape == ref.shape
    np.testing.assert_allclose(feats.values, ref, atol=1e-5, rtol=1e-4)
    assert np.abs(ref).max() > 1e-2  # not trivially zero


def test_features_do_not_depend_on_batch_size(im):
    texts = random_texts(9, seed=2)
    fe = FeatureExtractor(im, projection_dim=512)
    a = fe.compute(texts, batch_size=1).values
    b = fe.compute(texts, batch_size=4).values
    c = fe.compute(texts[::-1], batch_size=9).values[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)


def test_projected_features_are_factored_projections_of_exact(im):
    texts = random_texts(5, seed=3)
    exact = FeatureExtractor(im, projection_dim=None).compute(texts)
    fe = FeatureExtractor(im, projection_dim=(5, 7), seed=11)
    proj = fe.compute(texts)
    pr = Projector(fe.layout)
    for s in fe.layout.slots:
        g = torch.from_numpy(exact.layer_block(s.name).copy())
        want = torch.stack([pr.project_matrix(s, gi) for gi in g]).numpy()
        np.testing.assert_allclose(proj.layer_block(s.name), want, atol=1e-4, rtol=1e-3)


def test_projected_inner_products_unbiased(im):
    texts = random_texts(3, seed=4, min_words=8)
    exact = FeatureExtractor(im, projection_dim=None).compute(texts)
    true = exact.dot(exact)[0, 1:]  # <g0, g1>, <g0, g2>
    norms = np.sqrt(np.diag(exact.dot(exact)))
    layout_proto = FeatureExtractor(im, projection_dim=(4, 4)).layout
    estimates = []
    for seed in range(300):
        lay = type(layout_proto)(slots=layout_proto.slots, seed=seed, projection_dim=(4, 4))
        pr = Projector(lay)
        vals = np.zeros(2)
        for s in lay.slots:
            blk = torch.from_numpy(exact.layer_block(s.name).copy())
            p = [pr.project_matrix(s, blk[i]).double() for i in range(3)]
            vals += np.array([(p[0] * p[1]).sum().item(), (p[0] * p[2]).sum().item()])
        estimates.append(vals)
    est = np.array(estimates)
    mean, se = est.mean(0), est.std(0) / np.sqrt(len(est))
    assert np.all(np.abs(mean - true) < 4 * se + 1e-6), (mean, true, se)
    # JL scale: single-projection error is bounded by the norms, not by a blow-up
    assert np.all(est.std(0) < 2.0 * norms[0] * norms[1:])


def test_bigger_projection_is_more_accurate(im):
    texts = random_texts(6, seed=5, min_words=6)
    exact = FeatureExtractor(im, projection_dim=None).compute(texts).dot(
        FeatureExtractor(im, projection_dim=None).compute(texts))
    errs = []
    for dim in (64, 2048):
        f = FeatureExtractor(im, projection_dim=dim, seed=3).compute(texts)
        errs.append(np.abs(f.dot(f) - exact).mean() / np.abs(exact).mean())
    assert errs[1] < errs[0]
    assert errs[1] < 0.5


def test_layer_groups_and_lm_head(im):
    model = im.model
    att = find_layers(model, "attention")
    mlp = find_layers(model, "mlp")
    allg = find_layers(model, "all")
    assert att and mlp
    assert {t.group for t in att} == {"attention"} and {t.group for t in mlp} == {"mlp"}
    assert [t.name for t in allg] == sorted([t.name for t in att + mlp], key=[t.name for t in allg].index)
    assert len(allg) == len(att) + len(mlp)
    head = model.get_output_embeddings()
    names = [t.name for t in allg]
    assert not any(dict(model.named_modules())[n] is head for n in names)
    with_head = find_layers(model, "all", include_lm_head=True)
    assert len(with_head) == len(allg) + 1 and with_head[-1].group == "lm_head"
    arch = model.config.model_type
    expect_att = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj"}, "gpt2": {"c_attn", "c_proj"}}[arch]
    expect_mlp = {"llama": {"gate_proj", "up_proj", "down_proj"}, "gpt2": {"c_fc", "c_proj"}}[arch]
    assert {t.name.rsplit(".", 1)[1] for t in att} == expect_att
    assert {t.name.rsplit(".", 1)[1] for t in mlp} == expect_mlp
    if arch == "gpt2":
        assert {t.kind for t in allg} == {"conv1d"}
    # explicit names
    pick = find_layers(model, [att[0].name, mlp[-1].name])
    assert [t.name for t in pick] == [att[0].name, mlp[-1].name]
    with pytest.raises(ValueError, match="no Linear/Conv1D module"):
        find_layers(model, ["nope.q_proj"])
    with pytest.raises(ValueError, match="layers"):
        find_layers(model, "everything")


def test_lm_head_features_match_autograd(im):
    """lm_head block = the output projection's own gradient (for tied embeddings: that use only)."""
    import copy

    texts = random_texts(4, seed=6)
    im = copy.copy(im)
    im.model = copy.deepcopy(im.model)
    head = im.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie for the autograd reference
    fe = FeatureExtractor(im, layers="mlp", projection_dim=None, include_lm_head=True)
    feats = fe.compute(texts, batch_size=3)
    np.testing.assert_allclose(feats.values, autograd_per_example(im, fe.layers, texts), atol=1e-5, rtol=1e-4)


def test_layout_mismatch_raises(im):
    texts = random_texts(3, seed=7)
    a = FeatureExtractor(im, projection_dim=256, seed=0).compute(texts)
    same = FeatureExtractor(im, projection_dim=256, seed=0).compute(texts)
    assert a.layout.hash == same.layout.hash
    a.dot(same)
    for other in (FeatureExtractor(im, projection_dim=256, seed=1),
                  FeatureExtractor(im, layers="mlp", projection_dim=256, seed=0),
                  FeatureExtractor(im, projection_dim=512, seed=0)):
        with pytest.raises(LayoutMismatchError):
            a.dot(other.compute(texts))


def test_float16_output(im):
    f = FeatureExtractor(im, projection_dim=128, dtype="float16").compute(random_texts(2, seed=8))
    assert f.values.dtype == np.float16 and f.values.shape == (2, f.layout.dim)
    assert f.layout.dim <= 128


@pytest.mark.parametrize("name", ["grad-dot", "grad-cos", "kfac", "ekfac"])
@pytest.mark.parametrize("projection_dim", [None, 256])
def test_scores_do_not_depend_on_batch_size_or_padding(im, name, projection_dim):
    fit, ref, cand = random_texts(10, seed=9), random_texts(4, seed=10), random_texts(9, seed=11)
    sc = make_scorer(name, im, projection_dim=projection_dim, batch_size=4)
    sc.fit(fit)
    sc.set_reference(ref)
    base = sc.score(cand)
    sc.config.batch_size = 1  # no padding at all
    one = sc.score(cand)
    sc.config.batch_size = 9  # everything padded to the longest
    allb = sc.score(cand)
    # a candidate scored next to very long texts (much more padding) scores the same
    long_pad = sc.score(cand + ["word " * 40, "token " * 40])[:len(cand)]
    scale = np.abs(base).max()
    for other in (one, allb, long_pad):
        np.testing.assert_allclose(other, base, rtol=1e-4, atol=1e-5 * scale)
