"""Hostile inputs at the reader (issue 15): nothing is read partially or silently.

Every file and row that is not read is a counted rejection or an error naming the file; walks
terminate on symlink loops and never read the run directory; columns named like quadsel's own
are renamed with one logged note; a DatasetDict folder gives the split asked for.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from quadsel.pipeline.sources import RejectLog, SourceConfig, SourceError, iter_examples, resolve_paths

ROWS = [{"id": f"r{i}", "text": f"row number {i} with some words", "n": i} for i in range(200)]


@pytest.fixture
def warnings(quadsel_log):
    quadsel_log.set_level(logging.INFO, logger="quadsel")
    return quadsel_log


def _read(path, **kw) -> tuple[list, RejectLog]:
    rejects = RejectLog(None)
    got = list(iter_examples(SourceConfig(path=str(path), **kw), rejects))
    return got, rejects


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stream(path: Path, rows, batches: int = 2) -> Path:
    t = pa.Table.from_pylist(rows)
    with ipc.new_stream(str(path), t.schema) as w:
        for b in t.to_batches(max_chunksize=len(rows) // batches):
            w.write_batch(b)
    return path


# ------------------------------------------------------------------------- Arrow streams

def test_arrow_stream_without_end_of_stream_marker_is_an_error(tmp_path):
    full = _stream(tmp_path / "full.arrow", ROWS)
    got, _ = _read(full)
    assert len(got) == 200
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(full.read_bytes()[:-8])  # a writer killed after its last batch: no EOS
    with pytest.raises(SourceError, match="cut.arrow: Arrow IPC stream without its end-of-stream marker"):
        _read(cut)


def test_arrow_stream_killed_after_first_batch_is_an_error(tmp_path):
    t = pa.Table.from_pylist(ROWS)
    p = tmp_path / "half.arrow"
    sink = pa.OSFile(str(p), "wb")
    w = ipc.new_stream(sink, t.schema)
    w.write_batch(t.to_batches(max_chunksize=100)[0])
    sink.close()  # no w.close(): the writer never wrote its end marker
    with pytest.raises(SourceError, match="half.arrow: Arrow IPC stream without its end-of-stream"):
        _read(p)


def test_bytes_after_an_arrow_stream_are_an_error(tmp_path):
    a = _stream(tmp_path / "a.arrow", ROWS[:100])
    b = _stream(tmp_path / "b.arrow", ROWS[100:])
    joined = tmp_path / "joined.arrow"
    joined.write_bytes(a.read_bytes() + b.read_bytes())  # `cat a b > joined`: the reader stops at a's EOS
    with pytest.raises(SourceError, match="joined.arrow: .* bytes after the Arrow stream's end-of-stream"):
        _read(joined)


# ------------------------------------------------------------------------------ symlinks

def test_data_in_a_symlinked_subfolder_is_read(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    _jsonl(real / "b.jsonl", ROWS[100:])
    pool = tmp_path / "pool"
    pool.mkdir()
    _jsonl(pool / "a.jsonl", ROWS[:100])
    os.symlink(real, pool / "more")
    got, rejects = _read(pool)
    assert len(got) == 200
    assert [f["rows"] for f in rejects.files()] == [100, 100]


def test_a_dangling_symlink_is_an_error_naming_it(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    _jsonl(pool / "a.jsonl", ROWS[:10])
    os.symlink(tmp_path / "gone.jsonl", pool / "b.jsonl")
    with pytest.raises(SourceError, match=r"b.jsonl: a symlink to .*gone.jsonl.*which does not exist"):
        resolve_paths(str(pool))
    with pytest.raises(SourceError, match="which does not exist"):
        resolve_paths(str(tmp_path / "pool" / "*.jsonl"))


def _with_timeout(fn, seconds=20):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the walk did not terminate (followed a symlink loop)"
    return out.get("v")


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_symlink_loops_terminate_and_read_each_file_once(tmp_path, how):
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    _jsonl(pool / "a.jsonl", ROWS[:50])
    _jsonl(pool / "sub" / "b.jsonl", ROWS[50:100])
    os.symlink(pool, pool / "sub" / "loop")        # back to the root
    os.symlink(pool / "sub", pool / "sub" / "self")  # to itself
    spec = str(pool) if how == "folder" else str(pool / "**" / "*.jsonl")
    got, rejects = _with_timeout(lambda: _read(spec))
    assert sorted(e.id for e in got) == sorted(r["id"] for r in ROWS[:100])
    assert rejects.total == 0


def test_run_dir_inside_the_pool_folder_is_never_read(tmp_path):
    pool = tmp_path / "data"
    pool.mkdir()
    _jsonl(pool / "a.jsonl", ROWS[:20])
    run = pool / "runs" / "x"
    run.mkdir(parents=True)
    _jsonl(run / "rejects.jsonl", [{"file": "f", "line": 1, "reason": "x", "text": "not data"}])
    assert resolve_paths(str(pool), exclude=[run]) == [pool / "a.jsonl"]
    assert resolve_paths(str(pool / "**" / "*.jsonl"), exclude=[run]) == [pool / "a.jsonl"]
    assert len(resolve_paths(str(pool))) == 2  # without the exclusion it would be read


# ---------------------------------------------------------------------------- JSON files

def test_pretty_printed_json_array_saved_as_jsonl_is_read(tmp_path, warnings):
    p = tmp_path / "array.jsonl"
    p.write_text(json.dumps(ROWS, indent=2))
    got, rejects = _read(p)
    assert [e.id for e in got] == [r["id"] for r in ROWS] and rejects.total == 0
    assert got[5].meta == {"n": 5} and got[5].line == 6
    assert any("a JSON array, not JSON Lines" in r.getMessage() for r in warnings.records)


def test_pretty_printed_objects_one_after_another_are_read(tmp_path):
    p = tmp_path / "pretty.jsonl"
    p.write_text("\n".join(json.dumps(r, indent=2) for r in ROWS[:30]) + "\n")
    got, rejects = _read(p)
    assert [e.id for e in got] == [r["id"] for r in ROWS[:30]] and rejects.total == 0


def test_a_broken_multi_line_json_document_is_refused_by_name(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(ROWS[:5], indent=2)[:-40])
    with pytest.raises(SourceError, match="broken.jsonl: neither JSON Lines"):
        _read(p)


def test_a_json_array_with_non_objects_counts_them(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text(json.dumps([ROWS[0], 3, "x", ROWS[1]], indent=1))
    got, rejects = _read(p)
    assert len(got) == 2 and rejects.counts == {"not_an_object": 2}


@pytest.mark.parametrize("gz", [False, True])
def test_cr_only_line_endings(tmp_path, gz):
    import gzip

    data = "".join(json.dumps(r) + "\r" for r in ROWS).encode()
    p = tmp_path / ("cr.jsonl.gz" if gz else "cr.jsonl")
    p.write_bytes(gzip.compress(data) if gz else data)
    got, rejects = _read(p)
    assert len(got) == 200 and rejects.total == 0
    assert got[-1].line == 200


# ------------------------------------------------------------------------- DatasetDict

def test_dataset_dict_takes_the_split_asked_for_and_refuses_ambiguity(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:150]),
                          "validation": datasets.Dataset.from_list(ROWS[150:])}).save_to_disk(str(d))
    with pytest.raises(SourceError, match=r"dd: a datasets DatasetDict with splits \['train', 'validation'\]"):
        _read(d)
    got, _ = _read(d, split="validation")
    assert [e.id for e in got] == [r["id"] for r in ROWS[150:]]
    got, _ = _read(d, split="train")
    assert len(got) == 150
    with pytest.raises(SourceError, match="no split 'test'"):
        _read(d, split="test")
    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:10])}).save_to_disk(str(one))
    assert len(_read(one)[0]) == 10  # one split: no ambiguity


# ------------------------------------------------------------------- reserved columns

def test_quadsel_columns_of_an_earlier_selection_are_renamed(tmp_path, warnings):
    t = pa.table({"id": [f"a{i}" for i in range(6)], "text": [f"text {i}" for i in range(6)],
                  "quadsel_cluster": pa.array(range(6), pa.int64()),
                  "prev_quadsel_score": [0.5] * 6, "quadsel_score": [1.0] * 6})
    pq.write_table(t, tmp_path / "sel.parquet")
    _jsonl(tmp_path / "sel.jsonl", [{"id": "j1", "text": "hello there", "quadsel_round": 3}])
    got, _ = _read(tmp_path)
    by_id = {e.id: e.meta for e in got}
    assert by_id["a0"] == {"prev_quadsel_cluster": 0, "prev_prev_quadsel_score": 1.0, "prev_quadsel_score": 0.5}
    assert by_id["j1"] == {"prev_quadsel_round": 3}
    notes = [r.getMessage() for r in warnings.records if "reserved for quadsel" in r.getMessage()]
    assert len(set(notes)) == 2  # one per file


def test_rows_per_input_file_are_counted(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ROWS[:10] + [{"id": "bad", "text": ""}])
    (tmp_path / "b.jsonl").write_bytes(b"")
    got, rejects = _read(tmp_path)
    files = {Path(f["file"]).name: f for f in rejects.files()}
    assert files["a.jsonl"] == {"file": str(tmp_path / "a.jsonl"), "rows": 10, "rejected": 1, "truncated": 0}
    assert files["b.jsonl"]["rows"] == 0
    assert rejects.summary()["files"] == rejects.files()


def test_skipped_files_in_a_folder_are_logged(tmp_path, warnings):
    _jsonl(tmp_path / "a.jsonl", ROWS[:3])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "rows.json").write_text("[]")
    resolve_paths(str(tmp_path))
    msg = [r.getMessage() for r in warnings.records if "skipped, not a supported data file" in r.getMessage()]
    assert msg and "notes.txt" in msg[0] and "rows.json" in msg[0]


def test_texts_of_only_invisible_characters_are_blank(tmp_path):
    rows = ROWS[:5] + [{"id": "z1", "text": "\u200b\u200b\u200b"}, {"id": "z2", "text": " \u200d\ufeff\n"},
                       {"id": "z3", "text": "\u200bword"}]
    got, rejects = _read(_jsonl(tmp_path / "zw.jsonl", rows))
    assert rejects.counts == {"whitespace_text": 2}
    assert [e.id for e in got][-1] == "z3"
