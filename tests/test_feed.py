"""pipeline.feed: splitting shards across ranks and workers, and training from them."""
from __future__ import annotations

import math
import random
from collections import Counter

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from quadsel.pipeline.feed import ShardIterableDataset, load_selection
from quadsel.pipeline.shards import ShardConfig, ShardWriter, selection_schema

N_ROWS = 103
SCHEMA = selection_schema(pa.schema([("id", pa.string()), ("text", pa.string()),
                                     ("lang", pa.string())]))
VOCAB = ("the a model learns from data small text bandit cluster influence shard arrow "
         "token reference pool diverse select train loss step").split()


def make_rows(n: int = N_ROWS) -> list[dict]:
    rng = random.Random(0)
    return [{"id": f"r{i:04d}",
             "text": " ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 20))) + ".",
             "lang": "en",
             "quadsel_cluster": i % 5,
             "quadsel_score": None if i % 6 == 0 else rng.random(),
             "quadsel_round": i // 20} for i in range(n)]


def write_run(run, n_shards: int, fmt: str = "arrow", n: int = N_ROWS) -> list[dict]:
    rows = make_rows(n)
    cfg = ShardConfig(format=fmt, max_rows=math.ceil(n / n_shards), max_bytes=None,
                      batch_rows=8)
    with ShardWriter(run, cfg, schema=SCHEMA, seed=0, config_hash="feed") as w:
        w.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    assert len(w.close()["shards"]) == n_shards
    return rows


def consume(run, rank: int, world_size: int, num_workers: int, **kwargs) -> list[str]:
    ds = ShardIterableDataset(run, rank=rank, world_size=world_size, **kwargs)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [row["id"] for row in loader]


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
@pytest.mark.parametrize("n_shards", [1, 3, 5])
def test_two_ranks_two_workers_read_every_row_once(tmp_path, n_shards, fmt):
    rows = write_run(tmp_path, n_shards, fmt)
    seen = []
    for rank in range(2):
        got = consume(tmp_path, rank, 2, num_workers=2, remainder="none", block_rows=16)
        assert got, f"rank {rank} got nothing"
        seen += got
    assert Counter(seen) == Counter(r["id"] for r in rows)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_rows_per_rank_drop_and_pad(tmp_path, fmt, shuffle, world):
    rows = write_run(tmp_path, 3, fmt)  # 103 rows: a remainder for 2, 3 and 4 ranks
    ids = [r["id"] for r in rows]
    for remainder in ("drop", "pad"):
        per_rank = {}
        for rank in range(world):
            per_rank[rank] = consume(tmp_path, rank, world, num_workers=2 if rank == 0 else 0,
                                     remainder=remainder, shuffle=shuffle, seed=5, block_rows=10,
                                     shuffle_buffer=16)
        counts = {len(v) for v in per_rank.values()}
        every = Counter(i for v in per_rank.values() for i in v)
        if remainder == "drop":
            assert counts == {N_ROWS // world}  # equal steps on every rank
            assert set(every.values()) == {1} and len(every) == N_ROWS - N_ROWS % world
        else:
            assert counts == {math.ceil(N_ROWS / world)}
            assert set(every) == set(ids)  # nothing dropped
            assert sum(every.values()) - N_ROWS == world * math.ceil(N_ROWS / world) - N_ROWS
        ds = ShardIterableDataset(tmp_path, rank=0, world_size=world, remainder=remainder)
        assert ds.rows_per_rank() == counts.pop()


def test_shuffled_epochs_cover_everything_in_a_new_order(tmp_path):
    rows = write_run(tmp_path, 8)
    ds = ShardIterableDataset(tmp_path, shuffle=True, seed=3, columns="id", block_rows=4)
    ds.set_epoch(0)
    e0 = list(ds)
    again = ShardIterableDataset(tmp_path, shuffle=True, seed=3, columns="id", block_rows=4)
    assert list(again) == e0  # same seed and epoch: the same order
    ds.set_epoch(1)
    e1 = list(ds)
    assert sorted(e0) == sorted(e1) == sorted(r["id"] for r in rows)
    assert e0 != e1
    ids = []  # shuffled and split: still every row exactly once
    for rank in range(2):
        part = ShardIterableDataset(tmp_path, rank=rank, world_size=2, shuffle=True, seed=3,
                                    remainder="none")
        part.set_epoch(1)
        ids += [r["id"] for r in DataLoader(part, batch_size=None, num_workers=2)]
    assert Counter(ids) == Counter(r["id"] for r in rows)


def test_one_shard_is_shuffled_row_by_row_every_epoch(tmp_path):
    """A selection under max_rows is one shard: rows (not only shards) must move each epoch."""
    rows = write_run(tmp_path, 1, n=500)
    stored = [r["id"] for r in rows]
    ds = ShardIterableDataset(tmp_path, columns="id", shuffle=True, seed=0)  # default buffer, blocks
    epochs = []
    for e in range(3):
        ds.set_epoch(e)
        epochs.append(list(ds))
    for got in epochs:
        assert sorted(got) == sorted(stored) and got != stored
        moved = sum(a != b for a, b in zip(got, stored))
        assert moved > 450  # row-level, not a rotation of a few blocks
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    ds.set_epoch(1)
    assert list(ds) == epochs[1]  # deterministic per (seed, epoch)
    unshuffled = ShardIterableDataset(tmp_path, columns="id")
    assert list(unshuffled) == stored


@pytest.mark.parametrize("context", [None, "spawn"])
def test_set_epoch_reaches_persistent_workers(tmp_path, context):
    write_run(tmp_path, 2, n=200)
    ds = ShardIterableDataset(tmp_path, columns="id", shuffle=True, seed=1, block_rows=8,
                              shuffle_buffer=32)
    workers = 2 if context is None else 1
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True,
                        multiprocessing_context=context)
    seen = []
    for e in range(3):
        ds.set_epoch(e)
        got = list(loader)
        # what a fresh loader (new workers) gives for that epoch: the persistent ones saw it too
        fresh = ShardIterableDataset(tmp_path, columns="id", shuffle=True, seed=1, block_rows=8,
                                     shuffle_buffer=32)
        fresh.set_epoch(e)
        assert got == list(DataLoader(fresh, batch_size=None, num_workers=workers,
                                      multiprocessing_context=context))
        seen.append(got)
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(seen[2])
    assert seen[0] != seen[1] != seen[2]
    assert loader._iterator is not None and loader._iterator._persistent_workers


def test_rank_rows_do_not_depend_on_worker_count(tmp_path):
    write_run(tmp_path, 8)
    for rank in range(2):
        one = consume(tmp_path, rank, 2, num_workers=0)
        two = consume(tmp_path, rank, 2, num_workers=2)
        three = consume(tmp_path, rank, 2, num_workers=1, shuffle=True, seed=2)
        assert sorted(one) == sorted(two)
        assert len(three) == len(one)


def test_bad_options(tmp_path):
    write_run(tmp_path, 1, n=3)
    with pytest.raises(ValueError, match="remainder"):
        ShardIterableDataset(tmp_path, remainder="wrap")
    with pytest.raises(ValueError, match="fewer than world_size"):
        ShardIterableDataset(tmp_path, rank=0, world_size=4)
    assert len(list(ShardIterableDataset(tmp_path, rank=3, world_size=4, remainder="pad"))) == 1


def test_columns_and_distributed_detection(tmp_path, monkeypatch):
    rows = write_run(tmp_path, 3)
    assert list(ShardIterableDataset(tmp_path, columns="text")) == [r["text"] for r in rows]
    picked = list(ShardIterableDataset(tmp_path, columns=["id", "quadsel_score"]))
    assert picked == [{"id": r["id"], "quadsel_score": r["quadsel_score"]} for r in rows]
    assert list(ShardIterableDataset(tmp_path)) == rows
    with pytest.raises(ValueError, match="'body'"):
        ShardIterableDataset(tmp_path, columns=["id", "body"])

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    ds = ShardIterableDataset(tmp_path, columns="id")
    assert (ds.rank, ds.world_size) == (1, 2)
    assert list(ds) == [r["id"] for r in rows[51:102]]  # the second half; row 102 is dropped
    explicit = ShardIterableDataset(tmp_path, columns="id", rank=0, world_size=2)
    assert sorted(list(ds) + list(explicit)) == sorted(r["id"] for r in rows[:102])


def test_load_selection(tmp_path):
    rows = write_run(tmp_path, 3, fmt="parquet")
    assert load_selection(tmp_path, cache_dir=str(tmp_path / "cache")).to_list() == rows
    assert list(load_selection(tmp_path, streaming=True)) == rows


# ------------------------------------------------------------------ training from the shards

BOS, EOS, PAD = 256, 257, 258
MAX_LEN = 48


def byte_collate(texts: list[str]) -> dict[str, torch.Tensor]:
    """Byte-level tokenisation: ids 0-255 are bytes, then BOS/EOS/PAD."""
    seqs = [[BOS, *t.encode("utf-8")[: MAX_LEN - 2], EOS] for t in texts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_tiny_model_trains_from_shards(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    write_run(tmp_path, 4, n=120)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds = ShardIterableDataset(tmp_path, columns="text", shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=byte_collate)

    losses, epoch = [], 0
    model.train()
    while len(losses) < 10:
        ds.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if len(losses) == 10:
                break
        epoch += 1
    assert all(math.isfinite(x) for x in losses)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert sum(losses[-3:]) / 3 < losses[0]
