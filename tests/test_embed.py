from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from quadsel.pipeline.embed import (
    EmbedConfig,
    Embedder,
    EmbeddingStore,
    EmbeddingStoreError,
    load_embedder,
    make_embedder,
    sample_rows,
)
from quadsel.pipeline.embed.store import write_embeddings
from quadsel.pipeline.feature_stage import embed_texts

WORDS = ("the river runs past old mills and quiet farms while children play near the bridge "
         "markets open early traders sell bread fish cheese and apples to busy crowds").split()
CODE = ["static int foo(struct dev *d) { return d->flags & MASK; }",
        "for (i = 0; i < n; i++) { buf[i] = 0; }",
        "if (!ptr) return -ENOMEM; kfree(ptr);"]


def corpus(n: int = 240, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(CODE[i % 3] + f" /* {i} */")
        else:
            out.append(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))))
    return out


def batches(texts: list[str], size: int, prefix: str = "d"):
    for s in range(0, len(texts), size):
        chunk = texts[s:s + size]
        yield [f"{prefix}{s + i}" for i in range(len(chunk))], chunk


def tfidf(**kw) -> Embedder:
    return make_embedder(EmbedConfig(dim=kw.pop("dim", 16), **kw))


def same_folder(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for name in names_a:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


# -- config --------------------------------------------------------------------------------------
def test_config_rejects_unknown_and_needs_model_for_hf():
    with pytest.raises(ValidationError):
        EmbedConfig(dims=8)
    with pytest.raises(ValidationError, match="embed.model is required"):
        EmbedConfig(kind="hf")
    with pytest.raises(ValidationError):
        EmbedConfig(dim=0)


def test_sample_rows_is_seeded_sorted_and_complete_for_small_pools():
    a = sample_rows(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_rows(1000, 50, seed=3))
    assert not np.array_equal(a, sample_rows(1000, 50, seed=4))
    assert np.array_equal(sample_rows(10, 50, seed=0), np.arange(10))


# -- tf-idf --------------------------------------------------------------------------------------
def test_tfidf_shapes_and_unit_norm():
    texts = corpus()
    emb = tfidf()
    emb.fit(texts)
    x = emb.transform(texts[:37])
    assert x.shape == (37, 16) and x.dtype == np.float32 and emb.dim == 16
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert emb.transform([]).shape == (0, 16)
    # a text with no known feature is an all-zero row, not NaN
    z = emb.transform(["zzzzqqq"])
    assert np.all(z == 0)


def test_tfidf_separates_code_from_prose():
    texts = corpus()
    emb = tfidf()
    emb.fit(texts)
    x = emb.transform(texts)
    is_code = np.array([i % 4 == 3 for i in range(len(texts))])
    sim = x @ x.T
    within = sim[np.ix_(is_code, is_code)].mean()
    across = sim[np.ix_(is_code, ~is_code)].mean()
    assert within > across + 0.3


def test_tfidf_stream_equals_one_shot_and_row_independent():
    texts = corpus()
    emb = tfidf()
    emb.fit(texts)
    whole = emb.transform(texts)
    streamed = np.concatenate([emb.transform(t) for _, t in batches(texts, 7)])
    assert np.array_equal(whole, streamed)
    assert np.array_equal(emb.transform([texts[5]])[0], whole[5])


def test_tfidf_save_load_roundtrip(tmp_path):
    texts = corpus()
    emb = tfidf()
    emb.fit(texts)
    emb.save(tmp_path / "e")
    back = load_embedder(tmp_path / "e")
    assert type(back) is type(emb) and back.dim == emb.dim
    assert np.array_equal(back.transform(texts), emb.transform(texts))
    assert Embedder.load(tmp_path / "e").describe() == emb.describe()
    with pytest.raises(FileNotFoundError, match="embedder.json"):
        load_embedder(tmp_path / "nothing")


def test_tfidf_fits_on_a_seeded_sample_and_clamps_dim():
    texts = corpus(300)
    emb = tfidf(fit_sample=60, dim=200)
    emb.fit(texts)
    assert emb.describe()["n_fit"] == 60
    assert emb.dim < 200  # 60 texts cannot give 200 components: reduced, with a warning
    assert emb.transform(texts[:3]).shape == (3, emb.dim)
    with pytest.raises(RuntimeError, match="not fitted"):
        tfidf().transform(["a"])


def test_tfidf_determinism_byte_identical_files(tmp_path):
    texts = corpus()
    for run in ("a", "b"):
        embed_texts(texts, EmbedConfig(dim=16, seed=7, batch_size=50), tmp_path / run, rows_per_shard=100)
    same_folder(tmp_path / "a", tmp_path / "b")
    assert len(list((tmp_path / "a" / "features").glob("part-*.arrow"))) == 3


# -- store ---------------------------------------------------------------------------------------
class CountingEmbedder(Embedder):
    """Deterministic vectors from the text itself (row i of 'd{i}' is known in advance)."""

    kind = "counting"
    dim = 6

    def fit(self, texts):
        pass

    def transform(self, texts):
        v = np.array([[float(t.count(c)) + 1.0 for c in "abcdef"] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def save(self, path):
        raise NotImplementedError

    @classmethod
    def _load(cls, path, meta):
        raise NotImplementedError


def test_store_roundtrip_ids_vectors_batches(tmp_path):
    texts = corpus(53)
    emb = CountingEmbedder()
    expected = emb.transform(texts)
    store = write_embeddings(tmp_path / "v", [f"d{i}" for i in range(len(texts))], expected, rows_per_shard=20,
                             embedder=emb.describe())
    again = EmbeddingStore.open(tmp_path / "v")
    for st in (store, again):
        assert len(st) == 53 and st.dim == 6
        assert st.ids() == [f"d{i}" for i in range(53)]
        assert np.array_equal(st.vectors(), expected)
        rows = [52, 0, 19, 20, 21, 40, 3]
        assert np.array_equal(st.vectors(rows), expected[rows])
        parts = list(st.iter_batches(7))
        assert all(len(p) <= 7 for p in parts)
        assert np.array_equal(np.concatenate(parts), expected)
    assert [s["rows"] for s in again.index["shards"]] == [20, 20, 13]
    assert again.embedder_info["kind"] == "counting"
    with pytest.raises(IndexError):
        again.vectors([53])


def test_store_single_shard_is_zero_copy(tmp_path):
    texts = corpus(30)
    store = write_embeddings(tmp_path / "v", [f"d{i}" for i in range(30)], CountingEmbedder().transform(texts))
    v = store.vectors()
    assert not v.flags.writeable and not v.flags.owndata  # a view of the mapped file


def test_store_sample_is_seeded_subset(tmp_path):
    texts = corpus(200)
    store = write_embeddings(tmp_path / "v", [f"d{i}" for i in range(200)], CountingEmbedder().transform(texts),
                             rows_per_shard=50)
    s1 = store.sample(40, seed=1)
    assert s1.shape == (40, 6)
    assert np.array_equal(s1, store.sample(40, seed=1))
    assert not np.array_equal(s1, store.sample(40, seed=2))
    assert np.array_equal(s1, store.vectors()[store.sample_rows(40, seed=1)])
    assert np.array_equal(store.sample(500, seed=0), store.vectors())


def test_store_refuses_unfinished_folder_and_bad_input(tmp_path):
    (tmp_path / "v").mkdir()
    with pytest.raises(EmbeddingStoreError, match="index.json"):
        EmbeddingStore.open(tmp_path / "v")
    with pytest.raises(ValueError, match="2 ids for vectors of shape"):
        write_embeddings(tmp_path / "w", ["a", "b"], np.zeros((1, 3), np.float32))
    assert not (tmp_path / "w" / "index.json").exists()
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        embed_texts(["x"], EmbedConfig(dim=4), tmp_path / "t", ids=["a", "b"])


def test_store_refuses_a_changed_or_inconsistent_shard(tmp_path):
    texts = corpus(40)
    write_embeddings(tmp_path / "v", [f"d{i}" for i in range(40)], CountingEmbedder().transform(texts),
                     rows_per_shard=20)
    shard = tmp_path / "v" / "vectors-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(EmbeddingStoreError, match="modified after it was written"):
        EmbeddingStore.open(tmp_path / "v")
    index = tmp_path / "v" / "index.json"
    index.write_text(index.read_text().replace('"rows": 40', '"rows": 41'))
    with pytest.raises(EmbeddingStoreError, match="malformed index"):
        EmbeddingStore.open(tmp_path / "v")


# -- Hugging Face encoder (a tiny local BERT, no downloads) ----------------------------------------
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "code compiles and runs fast",
             "numbers add up to ten", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def hf(path: Path, **kw) -> Embedder:
    return make_embedder(EmbedConfig(kind="hf", model=str(path), device=kw.pop("device", "cpu"), **kw))


def test_hf_shapes_unit_norm_and_input_order(tiny_bert):
    emb = hf(tiny_bert, batch_size=2)
    emb.fit(SENTENCES)  # a no-op
    x = emb.transform(SENTENCES)
    assert x.shape == (5, 32) and x.dtype == np.float32 and emb.dim == 32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # batches are formed longest first, yet rows come back in input order
    for i, s in enumerate(SENTENCES):
        np.testing.assert_allclose(emb.transform([s])[0], x[i], atol=1e-5)


def test_hf_mean_pooling_ignores_padding(tiny_bert):
    emb = hf(tiny_bert, batch_size=8)
    short, long = "the cat", SENTENCES[4] + " " + SENTENCES[1]
    n_short = len(emb.tokenizer(short)["input_ids"])
    n_long = len(emb.tokenizer(long)["input_ids"])
    assert n_long > n_short + 5  # the short text really gets padded in the batch below
    alone = emb.transform([short])[0]
    padded = emb.transform([short, long])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_hf_save_load_and_clear_error(tiny_bert, tmp_path):
    emb = hf(tiny_bert)
    emb.save(tmp_path / "e")
    back = load_embedder(tmp_path / "e")
    assert np.array_equal(back.transform(SENTENCES), emb.transform(SENTENCES))
    with pytest.raises(ValueError, match="embed.model"):
        hf(tmp_path / "no-such-model")


@pytest.mark.gpu
def test_hf_on_gpu_matches_cpu(tiny_bert):
    cpu = hf(tiny_bert).transform(SENTENCES)
    gpu = hf(tiny_bert, device="auto")
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.transform(SENTENCES), cpu, atol=3e-2)
