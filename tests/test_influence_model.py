"""InfluenceModel (tokens, batches, summed loss) and build_proxy_model (CPU, seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quadsel.influence import InfluenceModel, build_proxy_model
from quadsel.influence.model import resolve_dtype
from quadsel.influence.testing import SAMPLE_TEXTS, random_texts, tiny_influence_model


@pytest.fixture(scope="module")
def im():
    return tiny_influence_model("llama", max_length=16, batch_size=3)


def test_tokenize_truncates_and_never_empty(im):
    ids = im.tokenize(["", "word " * 100, "a"])
    assert all(len(x) >= 1 for x in ids)
    assert len(ids[1]) == 16
    counts = im.count_tokens(["", "word " * 100, "a"])
    assert counts.dtype == np.int64 and counts[0] == 0 and counts[1] > 16
    assert list(im.count_tokens(["word " * 100], truncate=True)) == [16]
    assert im.count_tokens([]).shape == (0,)
    with pytest.raises(TypeError):
        im.count_tokens("not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        im.tokenize(["ok", None])


def test_batches_right_padded_and_indexed(im):
    texts = random_texts(7, seed=1)
    seen = []
    ids = im.tokenize(texts)
    for b in im.batches(texts, 3):
        assert b.input_ids.shape == b.attention_mask.shape
        for r, j in enumerate(b.index):
            n = len(ids[j])
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()
            assert b.input_ids[r, :n].tolist() == ids[j]
        seen.extend(b.index.tolist())
    assert sorted(seen) == list(range(7))


def test_summed_loss_is_a_sum_and_padding_free(im):
    texts = SAMPLE_TEXTS[:6]
    alone = np.array([im.per_example_loss([t], batch_size=1)[0] for t in texts])
    together = im.per_example_loss(texts, batch_size=6)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    # a sum of token losses, not a mean
    ids = torch.tensor([im.tokenize([texts[0]])[0]])
    logits = im.model(input_ids=ids).logits
    tok = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    assert alone[0] == pytest.approx(float(tok.detach()), rel=1e-5)


def test_dtype_and_device_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot load"):
        InfluenceModel.load(tmp_path / "missing", device="cpu")


SMALL = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, max_length=32, train_length=16,
             steps=6, batch_size=4)


def test_build_proxy_model_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = random_texts(60, seed=2) + SAMPLE_TEXTS
    out = build_proxy_model(texts, tmp_path / "proxy", save_checkpoints=2, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok.pad_token_id is not None and tok.bos_token_id is not None
    assert tok("hello").input_ids[0] == tok.bos_token_id
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_000002", "step_000004"]
    AutoModelForCausalLM.from_pretrained(ckpts[0])
    im = InfluenceModel.load(out, max_length=32, device="cpu")
    assert np.all(np.isfinite(im.per_example_loss(texts[:4])))
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        build_proxy_model(texts, out, **SMALL)


def test_build_proxy_model_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    texts = random_texts(40, seed=3)
    a = build_proxy_model(texts, tmp_path / "a", seed=5, **SMALL)
    b = build_proxy_model(texts, tmp_path / "b", seed=5, **SMALL)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = build_proxy_model(texts, tmp_path / "c", seed=6, **SMALL)
    wc = load_file(str(c / "model.safetensors"))
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_build_proxy_model_validates():
    with pytest.raises(ValueError, match="divisible"):
        build_proxy_model(["a b", "c d"], "/tmp/never", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="at least 2"):
        build_proxy_model(["", "   "], "/tmp/never")
