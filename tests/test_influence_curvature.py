"""K-FAC / EK-FAC against dense computations on tiny models (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quadsel.influence import EKFAC, KFAC, FeatureExtractor, load_curvature, make_curvature, make_scorer
from quadsel.influence.layers import get_modules
from quadsel.influence.testing import random_texts, tiny_influence_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def im(request):
    return tiny_influence_model(request.param, max_length=20, batch_size=4, hidden=16, heads=2)


def dense_covariances(im, layers, texts):
    """A = E_tok[x xᵀ], S = E_tok[δ δᵀ] with ordinary autograd and plain hooks (padding masked)."""
    mods = get_modules(im.model, layers)
    A = [torch.zeros(t.in_features, t.in_features, dtype=torch.float64) for t in layers]
    S = [torch.zeros(t.out_features, t.out_features, dtype=torch.float64) for t in layers]
    n_tok = 0
    for b in im.batches(texts, 3):
        xs, outs = {}, {}
        handles = []
        for i, mod in enumerate(mods):
            def fh(m, inp, out, i=i, xs=xs, outs=outs):
                xs[i] = inp[0].detach()
                out.retain_grad()
                outs[i] = out
            handles.append(mod.register_forward_hook(fh))
        for p in im.model.parameters():
            p.requires_grad_(True)
        loss = im.summed_loss(im.logits(b), b.input_ids, b.attention_mask).sum()
        loss.backward()
        for h in handles:
            h.remove()
        mask = b.attention_mask.bool().reshape(-1)
        for i, t in enumerate(layers):
            x = xs[i].reshape(-1, xs[i].shape[-1])[mask].double()
            if t.bias:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            d = outs[i].grad.reshape(-1, outs[i].shape[-1])[mask].double()
            A[i] += x.T @ x
            S[i] += d.T @ d
        n_tok += int(mask.sum())
    im.model.zero_grad(set_to_none=True)
    return [a / n_tok for a in A], [s / n_tok for s in S]


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_scores_equal_dense_inverse(im, damping):
    fit, ref, cand = random_texts(12, seed=1), random_texts(3, seed=2), random_texts(7, seed=3)
    sc = make_scorer("kfac", im, projection_dim=None, damping=damping, damping_mode="absolute")
    sc.fit(fit).set_reference(ref)
    got = sc.score(cand)

    layers = sc.layers
    A, S = dense_covariances(im, layers, fit)
    exact = FeatureExtractor(im, projection_dim=None)
    g_ref = exact.compute(ref).values.astype(np.float64).mean(0)
    g_cand = exact.compute(cand).values.astype(np.float64)
    want = np.zeros(len(cand))
    for t, slot, a, s in zip(layers, exact.layout.slots, A, S):
        sl = slice(slot.offset, slot.offset + slot.dim)
        # row-major vec of G [out, in]: the curvature acts as S ⊗ A
        M = torch.kron(s, a) + damping * torch.eye(t.numel, dtype=torch.float64)
        v = torch.linalg.solve(M, torch.from_numpy(g_ref[sl])).numpy()
        want += g_cand[:, sl] @ v
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())


def test_ekfac_with_kronecker_eigenvalues_equals_kfac(im):
    fit, ref, cand = random_texts(10, seed=4), random_texts(3, seed=5), random_texts(6, seed=6)
    for mode, damping in (("absolute", 1e-2), ("relative", 0.1)):
        k = make_scorer("kfac", im, projection_dim=None, damping=damping, damping_mode=mode).fit(fit)
        e = make_scorer("ekfac", im, projection_dim=None, damping=damping, damping_mode=mode).fit(fit)
        # EK-FAC's eigenvalues differ from K-FAC's in general ...
        name = e.layers[0].name
        assert not torch.allclose(e.curvature.lam[name], k.curvature.lam[name])
        for t in e.layers:
            e.curvature.lam[t.name] = torch.outer(e.curvature.eig_s[t.name], e.curvature.eig_a[t.name])
        s_k = k.set_reference(ref).score(cand)
        s_e = e.set_reference(ref).score(cand)
        np.testing.assert_allclose(s_e, s_k, rtol=1e-6, atol=1e-9 * np.abs(s_k).max())


def test_ekfac_lambda_equals_dense_definition(im):
    """Λ = mean over examples of (Q_Sᵀ G Q_A)² with per-example gradients from autograd."""
    fit = random_texts(8, seed=7)
    layers = make_scorer("ekfac", im, projection_dim=None).layers
    cur = EKFAC(damping=0.0).fit(im, layers, fit, batch_size=3)
    G = FeatureExtractor(im, projection_dim=None).compute(fit)
    for t in layers[:4]:
        g = torch.from_numpy(G.layer_block(t.name).copy()).double()
        rot = cur.q_s[t.name].double().T @ g @ cur.q_a[t.name].double()
        np.testing.assert_allclose(cur.lam[t.name].numpy(), rot.square().mean(0).numpy(), rtol=1e-4,
                                   atol=1e-7 * float(rot.square().mean(0).max()))


def test_precondition_matches_definition_and_damping_modes(im):
    fit = random_texts(8, seed=8)
    layers = make_scorer("kfac", im).layers
    k = KFAC(damping=0.3, damping_mode="relative").fit(im, layers, fit)
    t = layers[1]
    lam = torch.outer(k.eig_s[t.name], k.eig_a[t.name])
    assert k.damping_for(t.name) == pytest.approx(0.3 * float(lam.mean()))
    v = torch.randn(t.out_features, t.in_features, dtype=torch.float64)
    qs, qa = k.q_s[t.name].double(), k.q_a[t.name].double()
    want = qs @ ((qs.T @ v @ qa) / (lam + 0.3 * lam.mean())) @ qa.T
    torch.testing.assert_close(k.precondition(t.name, v), want)
    ident = make_curvature("identity")
    torch.testing.assert_close(ident.precondition(t.name, v), v)


def test_curvature_save_load_roundtrip(im, tmp_path):
    fit = random_texts(6, seed=9)
    layers = make_scorer("ekfac", im).layers
    cur = EKFAC(damping=0.05, damping_mode="absolute").fit(im, layers, fit)
    cur.save(tmp_path)
    assert (tmp_path / "curvature.safetensors").is_file() and (tmp_path / "curvature.json").is_file()
    back = load_curvature(tmp_path)
    assert isinstance(back, EKFAC) and back.args == cur.args and back.fitted
    v = torch.randn(layers[0].out_features, layers[0].in_features, dtype=torch.float64)
    torch.testing.assert_close(back.precondition(layers[0].name, v), cur.precondition(layers[0].name, v))


def test_curvature_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_curvature("shampoo")
    with pytest.raises(ValueError, match="damping"):
        make_curvature("kfac", damping=-1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        KFAC().precondition("x", torch.zeros(2, 2))


@pytest.mark.parametrize("n", [3, 511, 512, 700, 1024])
def test_blocked_gram_equals_the_full_product(n):
    from quadsel.influence.curvature import gram

    x = torch.randn(37, n, generator=torch.Generator().manual_seed(n))
    got, want = gram(x), x.T @ x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, got.T, rtol=0, atol=0)  # exactly symmetric
