"""DataInf scorer: equals the dense Sherman–Morrison computation; close to the exact damped inverse
where theory says it must be; batch/padding independence; save/load (tiny Llama and GPT-2, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quadsel.influence.datainf  # noqa: F401  (registers "datainf")
from quadsel.influence import load_scorer, make_scorer
from quadsel.influence.layers import get_modules
from quadsel.influence.testing import random_texts, tiny_influence_model

# small layers (d = out*in <= 1024) so that dense d x d algebra stays cheap
LAYERS = {"llama": ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"],
          "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]}
FIT, REF, CAND = random_texts(6, seed=1), random_texts(3, seed=2), random_texts(5, seed=3) + ["x", ""]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def im(request):
    m = tiny_influence_model(request.param, max_length=24, batch_size=4)
    m.arch = request.param
    return m


def autograd_grads(im, layers, texts) -> list[torch.Tensor]:
    """Per-example per-layer gradients ``[n, out*in]`` (float64), one example at a time."""
    mods = get_modules(im.model, layers)
    out = [[] for _ in layers]
    for ids in im.tokenize(texts):
        for p in im.model.parameters():
            p.grad = None
        x = torch.tensor([ids])
        logits = im.model(input_ids=x).logits[0]
        loss = F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum") if len(ids) > 1 else logits.sum() * 0
        loss.backward()
        for k, (t, m) in enumerate(zip(layers, mods)):
            g = m.weight.grad
            g = torch.zeros(t.out_features, t.in_features) if g is None else (g if t.kind == "linear" else g.T)
            out[k].append(g.detach().double().reshape(-1).clone())
    for p in im.model.parameters():
        p.grad = None
    return [torch.stack(o) for o in out]


@pytest.fixture(scope="module")
def base(im):
    """The default scorer (relative damping) on the small layers, fitted and referenced."""
    return make_scorer("datainf", im, layers=LAYERS[im.arch]).fit(FIT).set_reference(REF)


def refitted(src, **kw):
    """A scorer with other options sharing ``src``'s fit (λ_l and fit texts): no second fit pass."""
    sc = make_scorer("datainf", src.model, layers=src.config.layers, **kw)
    sc.fit_texts, sc.lambdas, sc.is_fitted = src.fit_texts, src.lambdas, True
    return sc


@pytest.fixture(scope="module")
def grads(im):
    layers = make_scorer("datainf", im, layers=LAYERS[im.arch]).layers
    return [autograd_grads(im, layers, t) for t in (FIT, REF, CAND)]


def dense(grads, lambdas):
    """Per layer: (w_DataInf from the dense d x d Sherman–Morrison average, w_exact, α)."""
    gf, gr, _ = grads
    out = []
    for g, r, lam in zip(gf, gr, lambdas):
        n, d = g.shape
        v = r.mean(0)
        m = torch.eye(d, dtype=torch.float64) * n
        for gi in g:
            m -= torch.outer(gi, gi) / (lam + gi @ gi)
        w_sm = m @ v / (n * lam)
        w_ex = torch.linalg.solve(g.T @ g / n + lam * torch.eye(d, dtype=torch.float64), v)
        out.append((w_sm, w_ex, float((g * g).sum(1).max() / lam)))
    return out


def test_equals_dense_sherman_morrison(base, grads):
    sc = base
    # relative damping: λ_l = 0.1 mean‖g_i‖² / d_l
    for lam, g, t in zip(sc.lambdas, grads[0], sc.layers):
        assert lam == pytest.approx(0.1 * float((g * g).sum(1).mean()) / t.numel, rel=1e-5)
    ws = dense(grads, sc.lambdas)
    want = sum((gc @ w_sm).numpy() for gc, (w_sm, _, _) in zip(grads[2], ws))
    got = sc.score(CAND)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert got[-1] == 0.0  # an empty text has no target token, hence no gradient


def test_close_to_exact_inverse_when_alpha_small(im, grads):
    """‖w_DataInf − w_exact‖/‖w_exact‖ ≤ α²(1+α), α = max_i‖g_i‖²/λ (see the module docstring)."""
    gmax = max(float((g * g).sum(1).max()) for g in grads[0])
    lam = 3.0 * gmax  # α <= 1/3 on every layer
    sc = make_scorer("datainf", im, layers=LAYERS[im.arch], damping=lam, damping_mode="absolute")
    got = sc.fit(FIT).set_reference(REF).score(CAND)
    ws = dense(grads, sc.lambdas)
    for w_sm, w_ex, alpha in ws:
        assert alpha <= 1 / 3 + 1e-9
        assert float((w_sm - w_ex).norm() / w_ex.norm()) <= alpha ** 2 * (1 + alpha)
    exact = sum((gc @ w_ex).numpy() for gc, (_, w_ex, _) in zip(grads[2], ws))
    # per candidate: |Δs| ≤ Σ_l ‖w_sm − w_ex‖ ‖g_cand‖ (Cauchy–Schwarz) — checked against the scorer
    bound = sum((w_sm - w_ex).norm().item() * gc.norm(dim=1).numpy() for gc, (w_sm, w_ex, _) in zip(grads[2], ws))
    assert np.all(np.abs(got - exact) <= bound * 1.001 + 1e-6 * np.abs(exact).max())


def test_batch_and_padding_independence(base):
    """batch size 1 (no padding) for fit, reference and candidates == batch size 4 (padded)."""
    a = make_scorer("datainf", base.model, layers=base.config.layers, batch_size=1).fit(FIT).set_reference(REF)
    assert a.lambdas == pytest.approx(base.lambdas, rel=1e-5)
    sa = a.score(CAND)
    tol = dict(rtol=1e-4, atol=1e-6 * np.abs(sa).max())
    np.testing.assert_allclose(base.score(CAND), sa, **tol)
    np.testing.assert_allclose(base.score(CAND[::-1]), sa[::-1], **tol)
    assert a.score([]).shape == (0,)


def test_all_layers_projection_and_rank(im):
    full = make_scorer("datainf", im).fit(FIT).set_reference(REF)
    s = full.score(CAND)
    assert np.all(np.isfinite(s)) and np.abs(s).max() > 0
    big_rank = refitted(full, rank=10_000).set_reference(REF)
    np.testing.assert_allclose(big_rank.score(CAND), s, rtol=1e-4, atol=1e-6 * np.abs(s).max())
    proj = refitted(full, projection_dim=4096, seed=3).set_reference(REF).score(CAND)
    assert np.corrcoef(proj, s)[0, 1] > 0.5


def test_errors(im):
    sc = make_scorer("datainf", im, layers=LAYERS[im.arch])
    with pytest.raises(RuntimeError, match="fit"):
        sc.set_reference(REF)
    with pytest.raises(ValueError, match="empty"):
        sc.fit([])
    with pytest.raises(ValueError, match="damping"):
        make_scorer("datainf", im, damping=0.0)
    with pytest.raises(ValueError, match="fisher"):
        make_scorer("datainf", im, fisher="true")


def test_save_load_roundtrip(base, tmp_path):
    sc = base
    want = sc.score(CAND)
    sc.save(tmp_path / "sc")
    back = load_scorer(tmp_path / "sc", device="cpu")
    assert type(back) is type(sc) and back.lambdas == pytest.approx(sc.lambdas)
    np.testing.assert_allclose(back.score(CAND), want, rtol=1e-5, atol=1e-7 * np.abs(want).max())
    # the fit state travels too: a loaded scorer takes a new reference set
    other = random_texts(2, seed=9)
    want2 = refitted(sc).set_reference(other).score(CAND)
    np.testing.assert_allclose(back.set_reference(other).score(CAND), want2, rtol=1e-5,
                               atol=1e-7 * np.abs(want2).max())
    # fitted, no reference yet
    refitted(sc).save(tmp_path / "fit_only")
    b2 = load_scorer(tmp_path / "fit_only", device="cpu")
    assert b2.is_fitted and not b2.has_reference and b2.report["fit_size"] == len(FIT)
    with pytest.raises(RuntimeError, match="set_reference"):
        b2.score(CAND)
