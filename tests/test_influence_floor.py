"""Issue 17 (scoring at the floor): the fast paths compute the same numbers as the plain formulas.

- the score pass folds each layer's core into one of its maps (a per-example dot product of the
  two mapped sides) instead of ``Σ_t (M_out δ_t)ᵀ C (M_in x_t)``;
- layers fed by one tensor (q/k/v, gate/up) share their mapped input, their activation
  covariance and its eigendecomposition (also through save/load);
- EK-FAC's Λ rotates each side per token or per example, whichever is cheaper: same Λ;
- batches without padding skip masking; ``length_buckets`` groups rows by length.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quadsel.influence import InfluenceModel, load_scorer, make_scorer
from quadsel.influence.curvature import EKFAC
from quadsel.influence.hooks import GradientPass
from quadsel.influence.model import length_buckets
from quadsel.influence.testing import random_texts, tiny_influence_model


@pytest.fixture(scope="module")
def texts():
    return random_texts(12, seed=31, max_words=12), random_texts(3, seed=32, min_words=4), \
        random_texts(10, seed=33, max_words=12)


def _unfolded_scores(sc, cand):
    """The pre-issue-17 score formula on the scorer's stored maps and cores."""
    out = np.zeros(len(cand))
    cur = {}

    def consumer(i, x, d):
        c = sc._cores[i]
        s = ((d * c) * x).sum((1, 2)) if c.ndim == 1 else ((d @ c) * x).sum((1, 2))
        cur["dot"] += s.double()

    with torch.no_grad(), GradientPass(sc.model, sc.layers, sc._maps, consumer) as gp:
        for b in sc.model.batches(cand, 3):
            cur["dot"] = torch.zeros(b.size, dtype=torch.float64)
            gp.run(b)
            out[b.index] = cur["dot"].numpy()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", [{}, {"projection_dim": 512}, {"rank": 4}, {"include_bias": True}])
def test_folded_score_equals_plain_formula(arch, kw, texts):
    fit, ref, cand = texts
    im = tiny_influence_model(arch, max_length=24, batch_size=3)
    sc = make_scorer("ekfac", im, **kw).fit(fit).set_reference(ref)
    got = sc.score(cand)
    want = _unfolded_scores(sc, cand)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # grad-dot takes the same path
    gd = make_scorer("grad-dot", im, **kw).set_reference(ref)
    np.testing.assert_allclose(gd.score(cand), _unfolded_scores(gd, cand), rtol=1e-4,
                               atol=1e-6 * np.abs(_unfolded_scores(gd, cand)).max())


def test_shared_inputs_share_factors_and_survive_save_load(texts, tmp_path):
    fit, ref, cand = texts
    im = tiny_influence_model("llama", max_length=24, batch_size=3)
    sc = make_scorer("ekfac", im).fit(fit).set_reference(ref)
    cur = sc.curvature
    names = [t.name for t in sc.layers]
    q, k, v = (next(n for n in names if n.endswith(f"layers.0.self_attn.{p}_proj")) for p in "qkv")
    assert cur.q_a[q] is cur.q_a[k] is cur.q_a[v]  # one eigendecomposition for one input
    gate, up = (next(n for n in names if n.endswith(f"layers.0.mlp.{p}_proj")) for p in ("gate", "up"))
    assert cur.q_a[gate] is cur.q_a[up]
    s0 = sc.score(cand)
    sc.save(tmp_path / "sc")  # safetensors refuses shared memory: the save must unshare
    back = load_scorer(tmp_path / "sc", model=im)
    np.testing.assert_allclose(back.score(cand), s0, rtol=1e-6, atol=1e-9 * np.abs(s0).max())


def test_ekfac_lambda_same_whichever_side_is_rotated_per_example():
    fit = random_texts(8, seed=34, min_words=2, max_words=5)
    short = tiny_influence_model("llama", max_length=24, batch_size=3)
    ids = short.tokenize(fit)
    assert max(map(len, ids)) < 24  # no truncation: both models see the same tokens
    # a huge max_length makes every side cheaper to rotate per example
    long = InfluenceModel(short.model, short.tokenizer, max_length=10 ** 5, batch_size=3, device="cpu")
    sc = make_scorer("ekfac", short)
    a = EKFAC().fit(short, sc.layers, fit)
    b = EKFAC().fit(long, sc.layers, fit)
    for t in sc.layers:
        np.testing.assert_allclose(a.lam[t.name].numpy(), b.lam[t.name].numpy(), rtol=1e-4,
                                   atol=1e-6 * float(a.lam[t.name].abs().max()))


def test_full_batches_skip_masking_with_the_same_scores(texts):
    fit, ref, cand = texts
    im = tiny_influence_model("llama", max_length=24, batch_size=1)  # batch of 1: never padded
    sc = make_scorer("ekfac", im).fit(fit).set_reference(ref)
    alone = sc.score(cand)
    sc.config.batch_size = 5  # mixed lengths: padded, masked
    np.testing.assert_allclose(sc.score(cand), alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())


def test_length_buckets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=57)
    for max_padding in (None, 0.0, 0.1, 0.5):
        groups = length_buckets(lengths, 8, max_padding=max_padding)
        flat = np.concatenate(groups)
        assert sorted(flat.tolist()) == list(range(57))
        assert all(1 <= len(g) <= 8 for g in groups)
        assert np.all(np.diff(lengths[flat]) <= 0)  # decreasing length
        if max_padding is not None:
            for g in groups:
                L = lengths[g]
                assert len(g) == 1 or (L.max() * len(g) - L.sum()) <= max_padding * L.max() * len(g)
    with pytest.raises(ValueError):
        length_buckets(lengths, 0)
    with pytest.raises(ValueError):
        length_buckets(lengths, 4, max_padding=1.5)
    im = tiny_influence_model("llama", max_length=24, batch_size=4)
    ids = im.tokenize(random_texts(9, seed=3))
    got = [b.index.tolist() for b in im.batches_from_ids(ids, 4, max_padding=0.2)]
    assert got == [g.tolist() for g in length_buckets([len(x) for x in ids], 4, max_padding=0.2)]


def test_eigenbases_are_float32_and_a_load_shares_the_input_bases_again(texts, tmp_path):
    """The fit keeps one float32 eigenbasis per distinct input (float64 decomposition), the
    hooks' maps are those very tensors, and a saved curvature loads with its shared input bases
    shared again (safetensors stored them unshared)."""
    from quadsel.influence.curvature import load_curvature

    fit, _, _ = texts
    im = tiny_influence_model("llama", max_length=24, batch_size=3)
    cur = make_scorer("ekfac", im).fit(fit).curvature
    assert all(q.dtype == torch.float32 for q in [*cur.q_a.values(), *cur.q_s.values()])
    assert all(lam.dtype == torch.float64 for lam in cur.lam.values())
    distinct = {id(q) for q in cur.q_a.values()}
    n_layers = len(cur.q_a)
    assert len(distinct) < n_layers  # q/k/v and gate/up share theirs
    cur.save(tmp_path / "cur")
    back = load_curvature(tmp_path / "cur")
    assert len({id(q) for q in back.q_a.values()}) == len(distinct)
    for name in cur.q_a:
        torch.testing.assert_close(back.q_a[name], cur.q_a[name], rtol=0, atol=0)
        torch.testing.assert_close(back.q_s[name], cur.q_s[name], rtol=0, atol=0)
