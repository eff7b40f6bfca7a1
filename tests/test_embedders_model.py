"""The model-based embedders (influence.embedders): hidden-state mean-pool and gradient features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quadsel.influence import FeatureExtractor, InfluenceModel
from quadsel.influence.testing import random_texts, tiny_model, tiny_tokenizer
from quadsel.pipeline.embed import EmbedConfig, EmbeddingStore, l2_normalize, load_embedder, make_embedder
from quadsel.pipeline.embed.base import embedder_kinds
from quadsel.pipeline.feature_stage import run_feature_stage
from quadsel.pipeline.sources import Example
from quadsel.pipeline.store import PoolStore

MAX_LEN = 32
TEXTS = random_texts(23, seed=4) + ["", "x"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory) -> Path:
    tok = tiny_tokenizer(max_length=MAX_LEN)
    model = tiny_model(request.param, vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=1)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cfg(kind: str, model_dir: Path, **kw) -> EmbedConfig:
    return EmbedConfig(kind=kind, model=str(model_dir), max_length=MAX_LEN, device="cpu", dtype="float32",
                       model_batch_size=kw.pop("model_batch_size", 5), **kw)


def direct_mean_pool(model_dir: Path, texts: list[str], layer: int) -> np.ndarray:
    """One text at a time, no padding: a plain forward pass and a mean over its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok([t], add_special_tokens=True, truncation=True, max_length=MAX_LEN)["input_ids"][0]
            ids = ids or [tok.pad_token_id]
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(hs[layer][0].mean(dim=0).numpy())
    return l2_normalize(np.stack(out))


def test_registry_loads_model_embedders_lazily():
    assert all(embedder_kinds()[k].startswith("quadsel.influence.") for k in ("hidden", "gradient"))
    with pytest.raises(ValueError, match="embed.model is not set"):
        make_embedder(EmbedConfig(kind="gradient"))
    c = EmbedConfig(kind="hidden").with_default_model("/models/proxy")
    assert c.model == "/models/proxy"
    assert EmbedConfig(kind="hidden", model="mine").with_default_model("/p").model == "mine"
    assert EmbedConfig().with_default_model("/p").model is None  # tfidf needs no model


@pytest.mark.parametrize("layer", [1, -1])
def test_hidden_matches_a_direct_forward_pass_mean_pool(model_dir, layer):
    emb = make_embedder(cfg("hidden", model_dir, layer=layer))
    assert emb.kind == "hidden" and emb.dim == 32
    got = emb.transform(TEXTS)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct_mean_pool(model_dir, TEXTS, layer), atol=2e-5)


def test_hidden_layer_out_of_range_is_named(model_dir):
    with pytest.raises(ValueError, match="embed.layer = 7"):
        make_embedder(cfg("hidden", model_dir, layer=7))


def test_gradient_matches_the_influence_engine(model_dir):
    emb = make_embedder(cfg("gradient", model_dir, projection_dim=256, seed=3, gradient_layers="mlp"))
    got = emb.transform(TEXTS)
    im = InfluenceModel.load(model_dir, max_length=MAX_LEN, device="cpu", dtype="float32", batch_size=4)
    ref = FeatureExtractor(im, layers="mlp", projection_dim=256, seed=3).compute(TEXTS)
    assert emb.dim == ref.layout.dim == got.shape[1]
    assert emb.describe()["layout_hash"] == ref.layout.hash
    np.testing.assert_allclose(got, l2_normalize(ref.values), atol=1e-5)
    other_seed = make_embedder(cfg("gradient", model_dir, projection_dim=256, seed=4, gradient_layers="mlp"))
    assert not np.allclose(other_seed.transform(TEXTS[:4]), got[:4], atol=1e-3)


def test_save_load_roundtrip_gives_the_same_vectors(model_dir, tmp_path):
    for kind in ("hidden", "gradient"):
        emb = make_embedder(cfg(kind, model_dir, projection_dim=128))
        emb.save(tmp_path / kind)
        again = load_embedder(tmp_path / kind)
        assert type(again) is type(emb) and again.dim == emb.dim
        np.testing.assert_array_equal(again.transform(TEXTS[:7]), emb.transform(TEXTS[:7]))


def test_feature_stage_uses_the_runs_proxy_model(model_dir, tmp_path):
    ex = [Example(id=f"r{i}", text=t, meta={}, source="mem", line=i + 1) for i, t in enumerate(TEXTS)]
    pool = PoolStore.write([ex], tmp_path / "pool", rows_per_shard=10)
    c = EmbedConfig(kind="hidden", max_length=MAX_LEN, device="cpu", dtype="float32", batch_size=4,
                    model_batch_size=4)
    store = run_feature_stage(pool, c, tmp_path / "stage", model_path=model_dir)
    assert isinstance(store, EmbeddingStore) and store.ids() == pool.ids()
    assert len(store.index["shards"]) == 3
    np.testing.assert_allclose(store.vectors(), direct_mean_pool(model_dir, TEXTS, -1), atol=2e-5)
