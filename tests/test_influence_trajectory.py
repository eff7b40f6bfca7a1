"""el2n / vog scorers: independent per-example computations, batch/padding independence,
checkpoint discovery from a real build_proxy_model run, errors, save/load (tiny models, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quadsel.influence.trajectory  # noqa: F401  (registers "el2n" and "vog")
from quadsel.influence import InfluenceModel, build_proxy_model, load_scorer, make_scorer
from quadsel.influence.testing import random_texts, tiny_influence_model, tiny_model

TEXTS = random_texts(5, seed=21) + ["x", ""]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def ckpt(request, tmp_path_factory):
    """A scoring model saved to a directory + two 'checkpoints' (other seeds, same tokenizer)."""
    root = tmp_path_factory.mktemp(request.param)
    im = tiny_influence_model(request.param, max_length=24, batch_size=3, seed=0)
    dirs = []
    for seed in (1, 2):
        m = tiny_model(request.param, vocab_size=len(im.tokenizer), seed=seed)
        m.save_pretrained(root / f"c{seed}")
        dirs.append(str(root / f"c{seed}"))
    im.model.save_pretrained(root / "final")
    im.tokenizer.save_pretrained(root / "final")
    im.source = str(root / "final")
    return im, dirs


def models_of(im, dirs):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(d).eval() for d in dirs] + [im.model]


def test_el2n_equals_plain_softmax(ckpt):
    im, dirs = ckpt
    sc = make_scorer("el2n", im, checkpoints=dirs + [im.source])
    assert sc.checkpoint_paths[-1] is None  # the final one is the scoring model itself, not reloaded
    want, models = [], models_of(im, dirs)
    for ids in im.tokenize(TEXTS):
        x = torch.tensor(ids)
        per_ckpt = []
        for m in models:
            with torch.no_grad():
                p = torch.softmax(m(input_ids=x[None]).logits[0, :-1].double(), -1)
            onehot = F.one_hot(x[1:], p.shape[-1]).double()
            per_ckpt.append(float((p - onehot).norm(dim=-1).mean()) if len(ids) > 1 else 0.0)
        want.append(np.mean(per_ckpt))
    got = sc.score(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    low = make_scorer("el2n", im, checkpoints=dirs, prefer="low").score(TEXTS)
    np.testing.assert_allclose(-low, make_scorer("el2n", im, checkpoints=dirs).score(TEXTS), rtol=1e-6)


def test_vog_equals_autograd_one_at_a_time(ckpt):
    im, dirs = ckpt
    sc = make_scorer("vog", im, checkpoints=dirs + [im.source])
    want, models = [], models_of(im, dirs)
    for ids in im.tokenize(TEXTS):
        x = torch.tensor(ids)[None]
        gs = []
        for m in models:
            e = m.get_input_embeddings()(x).detach().requires_grad_(True)
            logits = m(inputs_embeds=e).logits[0]
            loss = F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
            gs.append(torch.autograd.grad(loss, e)[0][0].double())  # [T, d]
        want.append(float(torch.stack(gs).var(0, unbiased=False).mean()))
    got = sc.score(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)
    assert got[-1] == 0.0 and np.all(got[:5] > 0)
    assert all(p.grad is None for p in im.model.parameters())


@pytest.mark.parametrize("name", ["el2n", "vog"])
def test_batch_padding_and_chunk_independence(ckpt, name):
    im, dirs = ckpt
    a = make_scorer(name, im, checkpoints=dirs, batch_size=1).score(TEXTS)  # no padding
    b = make_scorer(name, im, checkpoints=dirs, batch_size=4, chunk_size=3).score(TEXTS)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-12)
    c = make_scorer(name, im, checkpoints=dirs, cache_checkpoints=False).score(TEXTS[::-1])
    np.testing.assert_allclose(c[::-1], a, rtol=1e-4, atol=1e-12)
    assert make_scorer(name, im, checkpoints=dirs).score([]).shape == (0,)


def test_save_load_roundtrip(ckpt, tmp_path):
    """Saved config pins the resolved checkpoint dirs; loading (in another process for one
    architecture) gives identical scores."""
    im, dirs = ckpt
    want = {}
    for name in ("el2n", "vog"):
        sc = make_scorer(name, im, checkpoints=dirs, prefer="low")
        want[name] = sc.score(TEXTS)
        sc.save(tmp_path / name)
        meta = json.loads((tmp_path / name / "scorer.json").read_text())
        assert meta["config"]["checkpoints"] == [str(Path(d).resolve()) for d in dirs]
        np.testing.assert_allclose(load_scorer(tmp_path / name).score(TEXTS), want[name], rtol=1e-6, atol=1e-12)
    if im.model.config.model_type != "llama":
        return
    code = ("import json, sys; import influence.trajectory; from influence import load_scorer\n"
            f"texts = {TEXTS!r}\n"
            "print(json.dumps({n: load_scorer(sys.argv[1] + '/' + n).score(texts).tolist() for n in ('el2n', 'vog')}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12)


def test_errors(ckpt, tmp_path):
    im, dirs = ckpt
    with pytest.raises(ValueError, match="at least 2"):
        make_scorer("vog", im, checkpoints=dirs[:1])
    with pytest.raises(ValueError, match="at least 2"):  # discovery: no checkpoints/ beside the model
        make_scorer("vog", im)
    with pytest.raises(ValueError, match="at least 1"):
        make_scorer("el2n", im, include_final=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_scorer("el2n", im, checkpoints=[str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="prefer"):
        make_scorer("el2n", im, checkpoints=dirs, prefer="middle")
    with pytest.raises(ValueError, match="checkpoint_steps"):
        make_scorer("el2n", im, checkpoints=dirs, checkpoint_steps=[1])
    mem = InfluenceModel(im.model, im.tokenizer, max_length=24, device="cpu")  # no source directory
    with pytest.raises(ValueError, match="checkpoints=\\[dirs\\]"):
        make_scorer("el2n", mem)
    # a checkpoint with another vocabulary cannot be scored with the scoring model's tokenizer
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=len(im.tokenizer) + 5).save_pretrained(other)
    with pytest.raises(ValueError, match="vocab_size"):
        make_scorer("el2n", im, checkpoints=[str(other)]).score(TEXTS)


def test_discovery_from_build_proxy_model(tmp_path):
    texts = random_texts(40, seed=5, min_words=4)
    out = build_proxy_model(texts, tmp_path / "proxy", vocab_size=300, hidden_size=16, num_layers=1,
                            num_heads=2, max_length=32, train_length=16, steps=6, batch_size=2,
                            save_checkpoints=2)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_000002", "step_000004"]
    im = InfluenceModel.load(out, max_length=32, batch_size=4, device="cpu")
    vog = make_scorer("vog", im)
    assert vog.needs_checkpoints and not vog.needs_reference and not vog.needs_fit
    assert vog.checkpoint_paths == [str((out / "checkpoints" / s).resolve()) for s in steps] + [None]
    s = vog.score(texts[:4])
    assert s.shape == (4,) and np.all(np.isfinite(s)) and np.all(s > 0)
    early = make_scorer("el2n", im, checkpoint_steps=[2], include_final=False)
    assert early.checkpoint_paths == [str((out / "checkpoints" / "step_000002").resolve())]
    assert np.all(early.score(texts[:4]) > 0)
    with pytest.raises(ValueError, match=r"step\(s\) \[3\].*available: \[2, 4\]"):
        make_scorer("el2n", im, checkpoint_steps=[3])
    with pytest.raises(ValueError, match="at least 2"):
        make_scorer("vog", im, checkpoint_steps=[4], include_final=False)
    assert vog.report == {"checkpoints": steps + ["final (scoring model)"]}
