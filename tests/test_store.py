"""pipeline.store: write/open round trip, random access, order, determinism, expand_meta."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from quadsel.pipeline.sources import Example, SourceConfig, iter_batches
from quadsel.pipeline.store import INDEX, PoolStore, StoreError, expand_meta


def examples(n: int, start: int = 0) -> list[Example]:
    return [Example(id=f"e{i}", text=f"text {i} " + "é" * (i % 7), meta={"k": i % 3, "tag": f"t{i}"},
                    source="pool.jsonl", line=i + 1) for i in range(start, start + n)]


def batched(rows: list[Example], size: int) -> list[list[Example]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@pytest.fixture
def rows() -> list[Example]:
    return examples(2500)


@pytest.fixture
def store(tmp_path, rows) -> PoolStore:
    return PoolStore.write(batched(rows, 333), tmp_path / "store", rows_per_shard=1000)


def test_write_open_roundtrip(tmp_path, rows, store):
    assert len(store) == 2500
    reopened = PoolStore.open(tmp_path / "store")
    assert len(reopened) == 2500
    assert reopened.ids() == [e.id for e in rows]
    assert reopened.n_chars().dtype == np.int64
    assert reopened.n_chars().tolist() == [len(e.text) for e in rows]
    index = json.loads((tmp_path / "store" / INDEX).read_text())
    assert index["rows"] == 2500
    assert [(s["file"], s["rows"], s["offset"]) for s in index["shards"]] == [
        ("part-00000.arrow", 1000, 0), ("part-00001.arrow", 1000, 1000), ("part-00002.arrow", 500, 2000)]
    assert [c["name"] for c in index["schema"]] == ["id", "text", "meta", "n_chars", "source", "line"]
    # shards are plain Arrow IPC files any reader can open
    with pa.memory_map(str(tmp_path / "store" / "part-00001.arrow")) as m:
        t = pa.ipc.open_file(m).read_all()
    assert t.column("id")[0].as_py() == "e1000"
    assert json.loads(t.column("meta")[0].as_py()) == rows[1000].meta
    assert t.column("meta")[0].as_py() == '{"k":1,"tag":"t1000"}'  # canonical: sorted, compact


def test_random_access_any_order_with_repeats(rows, store):
    order = [2499, 0, 1500, 999, 1000, 999, 7, 2499]
    assert store.texts(order) == [rows[i].text for i in order]
    assert store.texts(np.array(order, dtype=np.int32)) == [rows[i].text for i in order]
    assert store.texts([]) == []
    t = store.take(order, columns=["line", "id"])
    assert t.column_names == ["line", "id"]
    assert t.column("id").to_pylist() == [rows[i].id for i in order]
    assert t.column("line").to_pylist() == [rows[i].line for i in order]
    rng = np.random.default_rng(0)
    sample = rng.integers(0, len(rows), size=500)
    assert store.texts(sample) == [rows[i].text for i in sample]
    with pytest.raises(IndexError, match="2500"):
        store.texts([2500])
    with pytest.raises(IndexError):
        store.texts([-1])
    with pytest.raises(KeyError, match="nope"):
        store.take([0], columns=["nope"])


def test_iteration_order(rows, store):
    batches = list(store.iter_batches(batch_size=700))
    assert [b.num_rows for b in batches] == [700, 700, 700, 400]  # batches span shard ends
    assert [i for b in batches for i in b.column("id").to_pylist()] == [e.id for e in rows]
    texts = [t for chunk in store.iter_texts(batch_size=256) for t in chunk]
    assert texts == [e.text for e in rows]
    only = next(store.iter_batches(10, columns=["n_chars"]))
    assert only.schema.names == ["n_chars"]


def test_rows_of_ids(store):
    assert store.rows_of(["e5", "e2000", "e5"]).tolist() == [5, 2000, 5]
    with pytest.raises(KeyError, match="missing"):
        store.rows_of(["missing"])


def test_deterministic_bytes(tmp_path, rows):
    a = PoolStore.write(batched(rows, 333), tmp_path / "a", rows_per_shard=1000)
    b = PoolStore.write(batched(rows, 1024), tmp_path / "b", rows_per_shard=1000)  # other batching
    names = sorted(p.name for p in a.root.iterdir())
    assert names == sorted(p.name for p in b.root.iterdir())
    assert names == ["index.json", "part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    for n in names:
        assert (a.root / n).read_bytes() == (b.root / n).read_bytes(), n


def test_store_from_sources(tmp_path):
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}", "lang": "en"}) + "\n"
                           for i in range(50)))
    store = PoolStore.write(iter_batches(SourceConfig(path=str(src), batch_size=16)), tmp_path / "s")
    assert store.ids() == [f"d{i}" for i in range(50)]
    t = store.take([3])
    assert t.column("source")[0].as_py() == str(src) and t.column("line")[0].as_py() == 4
    assert expand_meta(t.select(["id", "meta"])).to_pylist() == [{"id": "d3", "lang": "en"}]


def test_empty_pool(tmp_path):
    store = PoolStore.write([], tmp_path / "empty")
    again = PoolStore.open(tmp_path / "empty")
    assert len(again) == 0 and again.ids() == [] and again.n_chars().shape == (0,)
    assert again.take([]).num_rows == 0 and list(again.iter_batches()) == []
    assert len(store) == 0


def test_unfinished_or_changed_store_is_refused(tmp_path, rows):
    with pytest.raises(StoreError, match="does not exist"):
        PoolStore.open(tmp_path / "nowhere")

    def failing():
        yield rows[:1500]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        PoolStore.write(failing(), tmp_path / "half", rows_per_shard=1000)
    assert not (tmp_path / "half" / INDEX).exists()
    assert not [p for p in (tmp_path / "half").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(StoreError, match="index.json"):
        PoolStore.open(tmp_path / "half")

    store = PoolStore.write(batched(rows, 500), tmp_path / "s", rows_per_shard=1000)
    (store.root / INDEX).unlink()
    with pytest.raises(StoreError, match="index.json"):
        PoolStore.open(store.root)

    store = PoolStore.write(batched(rows, 500), tmp_path / "t", rows_per_shard=1000)
    (store.root / "part-00001.arrow").write_bytes(b"x")
    with pytest.raises(StoreError, match="part-00001.arrow"):
        PoolStore.open(store.root)


def test_rewrite_replaces_old_store(tmp_path, rows):
    PoolStore.write(batched(rows, 500), tmp_path / "s", rows_per_shard=1000)
    smaller = PoolStore.write([rows[:10]], tmp_path / "s", rows_per_shard=1000)
    assert sorted(p.name for p in smaller.root.iterdir()) == ["index.json", "part-00000.arrow"]
    assert PoolStore.open(tmp_path / "s").ids() == [e.id for e in rows[:10]]


def test_pickles_as_its_path(store):
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone) == len(store) and clone.texts([42]) == store.texts([42])


def test_expand_meta_types():
    metas = [
        {"s": "a", "i": 1, "f": 1.5, "if": 1, "b": True, "mix": "x", "obj": {"z": 1, "a": [1]}, "only0": 1},
        {"s": "b", "i": 2, "f": None, "if": 2.5, "b": False, "mix": 3, "obj": [1, 2]},
        {"i": 3, "f": 2.0, "b": None, "mix": None, "nul": None},
    ]
    table = pa.table({"id": ["x", "y", "z"], "meta": [json.dumps(m) for m in metas], "line": [1, 2, 3]})
    out = expand_meta(table)
    assert out.column_names == ["id", "line", "b", "f", "i", "if", "mix", "nul", "obj", "only0", "s"]
    types = {f.name: f.type for f in out.schema}
    assert types["s"] == pa.string() and types["i"] == pa.int64() and types["f"] == pa.float64()
    assert types["if"] == pa.float64() and types["b"] == pa.bool_() and types["only0"] == pa.int64()
    assert types["mix"] == pa.string() and types["obj"] == pa.string() and types["nul"] == pa.string()
    assert out.column("s").to_pylist() == ["a", "b", None]
    assert out.column("if").to_pylist() == [1.0, 2.5, None]
    assert out.column("mix").to_pylist() == ["x", "3", None]  # mixed: strings kept, the rest as JSON text
    assert out.column("obj").to_pylist() == ['{"a":[1],"z":1}', "[1,2]", None]
    assert out.column("only0").to_pylist() == [1, None, None]
    assert out.column("nul").to_pylist() == [None, None, None]
    assert expand_meta(table).equals(out)  # deterministic
    # a field named like a store column (a row's own "source") wins over the store's column
    clash = pa.table({"source": ["pool.jsonl"], "meta": ['{"source":"gsm8k"}']})
    assert expand_meta(clash).to_pylist() == [{"source": "gsm8k"}]
    big = pa.table({"meta": ['{"n": 99999999999999999999}', '{"n": 1}']})
    assert expand_meta(big).column("n").to_pylist() == ["99999999999999999999", "1"]
