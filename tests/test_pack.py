"""pipeline.pack: a selection -> fixed-length token sequences (numpy memmap + JSON index).

The tokenizer is trained on the spot with the `tokenizers` library (no downloads) and saved as a
Hugging Face tokenizer folder, the way a user passes one by path.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from quadsel.pipeline.pack import PackError, main, open_packed, pack_selection
from quadsel.pipeline.shards import ShardConfig, ShardWriter, selection_schema

SCHEMA = selection_schema(pa.schema([("id", pa.string()), ("text", pa.string())]))
VOCAB = "the a model learns from data small text bandit cluster influence shard token pool".split()


def _texts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture()
def run(tmp_path):
    texts = _texts(60)
    rows = [{"id": f"r{i}", "text": t, "quadsel_cluster": 0, "quadsel_score": None, "quadsel_round": 0}
            for i, t in enumerate(texts)]
    with ShardWriter(tmp_path / "run", ShardConfig(max_rows=25), schema=SCHEMA, seed=0,
                     config_hash="p") as w:
        w.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    return tmp_path / "run", texts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(200), trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("tok") / "tiny-tokenizer"
    fast.save_pretrained(path)
    return path


def _expected(tokenizer_dir, texts) -> tuple[list[int], int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream, tok.eos_token_id, tok.pad_token_id


def test_pack_drop_is_the_document_stream_cut_into_sequences(run, tokenizer_dir):
    run_dir, texts = run
    stream, eos, _ = _expected(tokenizer_dir, texts)
    index = pack_selection(run_dir, tokenizer_dir, seq_len=16)
    out = run_dir / "packed"
    assert json.loads((out / "index.json").read_text()) == index
    assert index["dtype"] == "uint16" and index["seq_len"] == 16 and index["eos_id"] == eos
    n = len(stream) // 16
    assert index["num_sequences"] == n and index["documents"] == 60
    assert index["dropped_tokens"] == len(stream) - 16 * n and index["document_tokens"] == len(stream)
    raw = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert raw.size == 16 * n and raw.tolist() == stream[: 16 * n]
    seqs = open_packed(out)
    assert seqs.shape == (n, 16) and seqs[1].tolist() == stream[16:32]
    assert stream.count(eos) == 60  # EOS between (after) every document
    before = (out / "train.bin").read_bytes(), (out / "index.json").read_bytes()
    pack_selection(run_dir, tokenizer_dir, seq_len=16)  # deterministic, and rewritable in place
    assert ((out / "train.bin").read_bytes(), (out / "index.json").read_bytes()) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_pack_pad_keeps_the_tail(run, tokenizer_dir, tmp_path):
    run_dir, texts = run
    stream, _, pad = _expected(tokenizer_dir, texts)
    index = pack_selection(run_dir, tokenizer_dir, seq_len=32, remainder="pad", out_dir=tmp_path / "p")
    seqs = open_packed(tmp_path / "p")
    assert seqs.shape == (-(-len(stream) // 32), 32)
    flat = seqs.reshape(-1).tolist()
    assert flat[: len(stream)] == stream and set(flat[len(stream):]) <= {pad}
    assert index["padded_tokens"] == 32 * seqs.shape[0] - len(stream) and index["pad_id"] == pad


def test_large_vocabulary_uses_uint32(run, tmp_path):
    class Big:  # a tokenizer object: a vocabulary past uint16
        eos_token_id = 70_000
        name_or_path = "big"

        def __len__(self):
            return 70_001

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[66_000 + len(w) for w in t.split()] for t in texts]}

    run_dir, texts = run
    index = pack_selection(run_dir, Big(), seq_len=8, out_dir=tmp_path / "big")
    assert index["dtype"] == "uint32" and index["tokenizer"] == "big"
    seqs = open_packed(tmp_path / "big")
    assert seqs.dtype == np.uint32 and int(seqs.max()) == 70_000


def test_cli_and_errors(run, tokenizer_dir, tmp_path, capsys):
    run_dir, _ = run
    assert main([str(run_dir), "--tokenizer", str(tokenizer_dir), "--seq-len", "8", "--out",
                 str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 8
    assert main([str(tmp_path / "nowhere"), "--tokenizer", str(tokenizer_dir)]) == 2
    assert "no manifest" in capsys.readouterr().err
    with pytest.raises(PackError, match="no column 'body'"):
        pack_selection(run_dir, tokenizer_dir, text_column="body")
    with pytest.raises(PackError, match="seq_len"):
        pack_selection(run_dir, tokenizer_dir, seq_len=0)


def test_quadsel_pack_command(run, tokenizer_dir, tmp_path, capsys):
    from quadsel.jobs.cli import main as quadsel

    run_dir, _ = run
    assert quadsel(["pack", str(run_dir), "--tokenizer", str(tokenizer_dir), "--seq-len", "8", "--out",
                    str(tmp_path / "cmd"), "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 8
    assert open_packed(tmp_path / "cmd").shape[1] == 8
    assert quadsel(["pack", str(tmp_path / "nowhere"), "--tokenizer", str(tokenizer_dir), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quadsel pack: error:") and "no manifest" in err and "Traceback" not in err
