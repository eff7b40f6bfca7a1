"""AttentionInfluence scorer: head detection, uniform-attention masking, scores (tiny models, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import quadsel.influence.attention  # noqa: F401  (registers "attention")
from quadsel.influence import load_scorer, make_scorer
from quadsel.influence.attention_heads import (
    HeadMasker,
    build_probes,
    find_attention_sites,
    retrieval_scores,
    uniform_head_output,
)
from quadsel.influence.testing import random_texts, tiny_influence_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAST = {"probe_prompts": 8, "probe_pairs": 4}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def im(request):
    return tiny_influence_model(request.param, max_length=32, batch_size=4)


def _texts(n=7, seed=3):
    return random_texts(n, seed=seed, min_words=1, max_words=20) + ["x"]


# ---------------------------------------------------------------- an independent implementation
def _uniform_eager(heads: dict[int, list[int]]):
    """Eager attention whose probabilities for ``heads[layer]`` are replaced by uniform weights
    over the positions the 4D additive mask allows (written from the definition)."""

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        s = (query @ key.transpose(-1, -2)) * scaling
        T = s.shape[-1]
        if attention_mask is None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
        else:
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        allowed = allowed.expand_as(s)
        p = torch.softmax(s.masked_fill(~allowed, torch.finfo(s.dtype).min), dim=-1)
        for h in heads.get(module.layer_idx, []):
            a = allowed[:, h].to(p.dtype)
            p[:, h] = a / a.sum(-1, keepdim=True).clamp_min(1)
        return (p @ value).transpose(1, 2), p

    return attn


def _independent_losses(im, texts, heads, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    name = "quadsel_test_uniform_heads"
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    monkeypatch.setitem(AttentionInterface._global_mapping, name, _uniform_eager(by_layer))
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, eager_mask)
    old = im.model.config._attn_implementation
    im.model.set_attn_implementation(name)
    try:
        return im.per_example_loss(texts, batch_size=3)
    finally:
        im.model.set_attn_implementation(old)


# ---------------------------------------------------------------- masking
def test_no_heads_is_exactly_zero(im):
    sc = make_scorer("attention", im, heads=[[0, 1]])
    texts = _texts()
    base, masked = sc.losses(texts, heads=[])
    np.testing.assert_array_equal(base, masked)
    np.testing.assert_array_equal(base, im.per_example_loss(texts))
    # hooks installed but idle (outside HeadMasker.logits) change nothing either
    b = next(im.batches(texts, 8))
    with torch.no_grad(), HeadMasker(sc.sites, [(0, 1), (1, 2)]):
        inside = im.logits(b)
    torch.testing.assert_close(inside, im.logits(b).detach(), rtol=0, atol=0)


def test_masked_loss_matches_independent_eager(im, monkeypatch):
    heads = [(0, 1), (1, 0), (1, 3)]
    sc = make_scorer("attention", im, heads=[list(h) for h in heads], batch_size=5)
    texts = _texts()
    base, masked = sc.losses(texts)
    want_masked = _independent_losses(im, texts, heads, monkeypatch)
    want_base = _independent_losses(im, texts, [], monkeypatch)
    np.testing.assert_allclose(base, want_base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(masked, want_masked, rtol=1e-5, atol=1e-5)
    assert np.abs(masked - base).max() > 1e-2  # masking heads changes the loss
    s = sc.score(texts)
    ok = base > 0
    np.testing.assert_allclose(s[ok], (want_masked[ok] - want_base[ok]) / want_base[ok], rtol=1e-4, atol=1e-6)
    assert s[-1] == 0.0  # "x": a single token has no target (L_base = 0)


def test_batch_size_padding_order_and_empty(im):
    sc = make_scorer("attention", im, heads=[[0, 2], [1, 1]])
    texts = _texts(9, seed=5)
    want = sc.score(texts)
    assert want.dtype == np.float64 and want.shape == (len(texts),)
    for bs in (1, 4, 16):
        sc.config = replace(sc.config, batch_size=bs)
        np.testing.assert_allclose(sc.score(texts), want, rtol=1e-5, atol=1e-6)
    rev = sc.score(texts[::-1])[::-1]
    np.testing.assert_allclose(rev, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sc.score([texts[3]]), want[3:4], rtol=1e-5, atol=1e-6)
    assert sc.score([]).shape == (0,)


def test_uniform_output_against_loops():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 7, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])  # right and left padding
    for window in (None, 3):
        got = uniform_head_output(v, mask, window)
        for b in range(2):
            for t in range(7):
                allowed = [s for s in range(t + 1) if mask[b, s] and (window is None or t - s < window)]
                want = v[b, allowed].mean(0) if allowed else torch.zeros(3, 4)
                torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- detection, config, persistence
def test_fit_detects_and_records_every_head(im):
    sc = make_scorer("attention", im, head_fraction=0.25, **FAST)
    with pytest.raises(RuntimeError, match="fit"):
        sc.score(["a b"])
    assert sc.set_reference(["anything"]) is sc and sc.needs_reference is False
    sc.fit([])
    L, H = len(sc.sites), sc.sites[0].n_heads
    assert sc.head_scores.shape == (L, H)
    assert ((sc.head_scores >= 0) & (sc.head_scores <= 1)).all()
    assert len(sc.heads) == round(0.25 * L * H)
    worst_kept = min(sc.head_scores[l, h] for l, h in sc.heads)
    dropped = [sc.head_scores[l, h] for l in range(L) for h in range(H) if (l, h) not in sc.heads]
    assert worst_kept >= max(dropped)
    again = make_scorer("attention", im, head_fraction=0.25, **FAST).fit(["ignored"])
    np.testing.assert_array_equal(again.head_scores, sc.head_scores)  # seeded probes
    assert len(make_scorer("attention", im, **FAST).fit([]).heads) == 1  # 5% of 8 heads: at least one
    # explicit heads: scorable without fit; fit only adds the head scores
    ex = make_scorer("attention", im, heads=[[1, 3], [0, 0]], **FAST)
    assert ex.is_fitted and ex.heads == [(0, 0), (1, 3)]
    assert ex.fit([]).heads == [(0, 0), (1, 3)] and ex.head_scores is not None


def test_config_errors(im):
    with pytest.raises(ValueError, match="head_fraction"):
        make_scorer("attention", im, head_fraction=0.0)
    with pytest.raises(ValueError, match="heads"):
        make_scorer("attention", im, heads=[[0]])
    with pytest.raises(ValueError, match=r"head \[5, 0\] does not exist"):
        make_scorer("attention", im, heads=[[5, 0]])
    with pytest.raises(ValueError, match="probe_pairs"):
        make_scorer("attention", im, probe_pairs=0)
    with pytest.raises(TypeError, match="unknown option"):
        make_scorer("attention", im, head_fractoin=0.1)


def test_probe_layout():
    tok = tiny_tokenizer(max_length=64)
    p = build_probes(tok, n=5, pairs=4, key_tokens=2, value_tokens=3, seed=1, max_length=64)
    ids = p.input_ids
    for i in range(5):
        # the answer is the copied value, and the predicting position is just before it
        np.testing.assert_array_equal(ids[i, p.query_pos[i] + 1], ids[i, p.source_pos[i]])
        assert (p.source_pos[i] < p.query_pos[i, 0]).all()
        # the query key is the key right before the source value (2 key tokens + ':' separator)
        k = p.source_pos[i, 0]
        np.testing.assert_array_equal(ids[i, k - 3:k - 1], ids[i, p.query_pos[i, 0] - 2:p.query_pos[i, 0]])
    assert ids.shape[1] <= 64
    with pytest.raises(ValueError, match="key-value pairs"):
        build_probes(tok, n=1, pairs=4, key_tokens=2, value_tokens=3, seed=1, max_length=8)


def test_save_load_roundtrip_other_process(tmp_path):
    im = tiny_influence_model("llama", max_length=32, batch_size=4)
    sc = make_scorer("attention", im, head_fraction=0.25, **FAST).fit([])
    texts = _texts()
    want = sc.score(texts)
    sc.save(tmp_path / "sc")
    state = json.loads((tmp_path / "sc" / "attention_heads.json").read_text())
    assert np.array_equal(np.array(state["head_scores"]), sc.head_scores)
    back = load_scorer(tmp_path / "sc", device="cpu")
    assert back.heads == sc.heads and np.array_equal(back.head_scores, sc.head_scores)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = ("import json, numpy as np, influence.attention; from influence import load_scorer; "
            f"sc = load_scorer({str(tmp_path / 'sc')!r}, device='cpu'); "
            f"np.save({str(tmp_path / 'got.npy')!r}, sc.score(json.load(open({str(tmp_path / 'texts.json')!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)


# ---------------------------------------------------------------- a trained copy head
def _copy_model(tok, live: tuple[int, int], seed: int = 0):
    """A 2-layer tied-embedding Llama (GQA) in which only head ``live`` writes to the residual
    stream (the other heads' output-projection columns are zero and frozen)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                      initializer_range=0.02)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for site in find_attention_sites(model):
            keep = torch.zeros(site.n_heads * site.head_dim)
            if site.layer == live[0]:
                keep[live[1] * site.head_dim:(live[1] + 1) * site.head_dim] = 1
            w = site.out_module.weight  # [hidden, heads * head_dim]
            w.mul_(keep)
            w.register_hook(lambda g, k=keep: g * k)
    return model


def _train(model, opt, tok, probe, steps: int = 200) -> None:
    for step in range(steps):
        p = build_probes(tok, n=32, seed=1000 + step, **probe)
        ids, q = torch.as_tensor(p.input_ids), torch.as_tensor(p.query_pos)
        rows = torch.arange(len(ids))[:, None]
        lg = model(input_ids=ids).logits[rows, q]
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[rows, q + 1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_detection_finds_the_trained_copy_head():
    """Train (≈200 steps) on the scorer's own probe task with one pair (copy the value of the
    only key); the detector must single out the one head that can copy, and masking it must
    break copying while masking every other head changes nothing."""
    tok = tiny_tokenizer(max_length=64)
    live = (1, 2)
    model = _copy_model(tok, live)
    probe = {"pairs": 1, "key_tokens": 2, "value_tokens": 3, "max_length": 64}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend
    try:
        _train(model, opt, tok, probe)
    finally:
        torch.set_num_threads(threads)
    model.eval()

    from quadsel.influence import InfluenceModel

    im = InfluenceModel(model, tok, max_length=64, batch_size=8, device="cpu")
    sc = make_scorer("attention", im, probe_pairs=1, probe_key_tokens=2, probe_value_tokens=3,
                     probe_prompts=32, head_fraction=0.1).fit([])
    assert sc.heads == [live]
    assert sc.head_scores[live] >= 0.9
    others = np.delete(sc.head_scores.reshape(-1), live[0] * 4 + live[1])
    assert others.max() <= sc.head_scores[live] - 0.3

    # ablation: answer-token loss on fresh probes
    p = build_probes(tok, n=32, seed=7, **probe)
    ids, q = torch.as_tensor(p.input_ids), torch.as_tensor(p.query_pos)
    rows = torch.arange(len(ids))[:, None]

    def answer_loss(heads):
        with torch.no_grad(), HeadMasker(sc.sites, heads) as hm:
            lg = hm.logits(model, ids, torch.ones_like(ids))[rows, q]
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[rows, q + 1].reshape(-1)).item()

    base = answer_loss([])
    rest = [(l, h) for l in range(2) for h in range(4) if (l, h) != live]
    assert answer_loss([live]) > base + 1.0
    assert abs(answer_loss(rest) - base) < 1e-4
    # retrieval_scores agrees with where the head actually looks
    again = retrieval_scores(model, sc.sites, p, batch_size=8, device=torch.device("cpu"))
    assert again[live] >= 0.9


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_scores_rank_like_fp32(arch):
    """The score is a small difference of two losses: a bf16 model scores with float32 copies of
    its weights (compute_dtype="float32", the default) and ranks texts like the fp32 model."""
    import copy

    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM

    from quadsel.influence.model import InfluenceModel
    from quadsel.influence.testing import tiny_arch_config

    tok = tiny_tokenizer(max_length=48)
    cfg = tiny_arch_config(arch, vocab_size=len(tok), hidden=32, layers=2, heads=4, initializer_range=0.02)
    torch.manual_seed(0)
    m32 = AutoModelForCausalLM.from_config(cfg).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    before = {k: v.clone() for k, v in m16.state_dict().items()}
    texts = random_texts(40, seed=5, min_words=8, max_words=30)
    heads = [[0, 1], [1, 2]]
    s32 = make_scorer("attention", InfluenceModel(m32, tok, max_length=48, device="cpu"), heads=heads).score(texts)
    s16 = make_scorer("attention", InfluenceModel(m16, tok, max_length=48, device="cpu"), heads=heads).score(texts)
    assert spearmanr(s32, s16)[0] > 0.95
    after = m16.state_dict()
    for k, v in before.items():  # the float32 copies are gone: the model is exactly as it was
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    with pytest.raises(ValueError, match="compute_dtype"):
        make_scorer("attention", InfluenceModel(m16, tok, device="cpu"), heads=heads, compute_dtype="fp64")
