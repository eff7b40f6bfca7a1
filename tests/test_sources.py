"""pipeline.sources: every input format, path forms, validation and rejects, streaming."""
from __future__ import annotations

import builtins
import gzip
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from quadsel.pipeline.sources import (
    Example,
    RejectLog,
    SourceConfig,
    SourceError,
    iter_batches,
    read_texts,
    resolve_paths,
)

ROWS = [{"id": f"r{i}", "text": f"document number {i}", "lang": "en", "n": i} for i in range(10)]


def write_jsonl(path: Path, rows, *, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    if gz:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def write_arrow(path: Path, table: pa.Table, *, stream: bool, chunk: int = 3) -> Path:
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with opener(str(path), table.schema) as w:
        for b in table.to_batches(max_chunksize=chunk):
            w.write_batch(b)
    return path


def read_all(cfg: SourceConfig, rejects: RejectLog | None = None) -> list[Example]:
    return [ex for batch in iter_batches(cfg, rejects) for ex in batch]


def reject_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]




# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json.gz", "parquet", "arrow-file",
                                  "arrow-stream", "feather", "hf"])
def test_every_format_reads_the_same_examples(tmp_path, kind):
    table = pa.Table.from_pylist(ROWS)
    if kind in ("jsonl", "jsonl.gz", "json.gz"):
        path = write_jsonl(tmp_path / f"pool.{kind}", ROWS, gz=kind.endswith("gz"))
    elif kind == "parquet":
        path = tmp_path / "pool.parquet"
        pq.write_table(table, path, row_group_size=4)
    elif kind == "arrow-file":
        path = write_arrow(tmp_path / "pool.arrow", table, stream=False)
    elif kind == "arrow-stream":
        path = write_arrow(tmp_path / "pool.arrow", table, stream=True)
    elif kind == "feather":
        import pyarrow.feather as feather

        path = tmp_path / "pool.feather"
        feather.write_feather(table, path)
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "hfds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(path), batch_size=4), rejects)
    assert rejects.total == 0
    assert [e.id for e in got] == [r["id"] for r in ROWS]
    assert [e.text for e in got] == [r["text"] for r in ROWS]
    assert got[3].meta == {"lang": "en", "n": 3}
    assert got[3].line == 4 and got[3].source.startswith(str(path))


def test_hf_folder_with_explicit_format_and_batches(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": i, "text": f"t{i}", "label": i % 3} for i in range(2500)]
    d = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(d), max_shard_size="20KB")
    files = resolve_paths(str(d))
    assert len(files) > 1 and all(f.name.startswith("data-") for f in files)
    batches = list(iter_batches(SourceConfig(path=str(d), format="hf", batch_size=1000)))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [e.id for b in batches for e in b] == [str(i) for i in range(2500)]  # int ids -> str


def test_batches_have_batch_size_across_files(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"p{i}.jsonl", [{"id": f"{i}-{j}", "text": "x"} for j in range(5)])
    sizes = [len(b) for b in iter_batches(SourceConfig(path=str(tmp_path), batch_size=4))]
    assert sizes == [4, 4, 4, 3]


# --------------------------------------------------------------------------- paths

def test_file_dir_glob_and_list_inputs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    write_jsonl(tmp_path / "b.jsonl", [{"id": "b", "text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "a"}])
    write_jsonl(tmp_path / "sub" / "c.jsonl.gz", [{"id": "c", "text": "c"}], gz=True)
    pq.write_table(pa.table({"id": ["d"], "text": ["d"]}), tmp_path / "sub" / "deeper" / "d.parquet")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("garbage")

    def ids(path, **kw):
        return [e.id for e in read_all(SourceConfig(path=path, **kw))]

    assert ids(str(tmp_path / "a.jsonl")) == ["a"]
    assert ids(str(tmp_path)) == ["a", "b", "c", "d"]  # sorted, recursive, README / hidden skipped
    assert ids(str(tmp_path / "*.jsonl")) == ["a", "b"]
    assert ids(str(tmp_path / "**" / "*.parquet")) == ["d"]
    assert ids([str(tmp_path / "b.jsonl"), str(tmp_path / "sub")]) == ["b", "c", "d"]
    # the same file named twice is read once (no spurious duplicate ids)
    assert ids([str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")]) == ["a", "b"]
    assert ids(str(tmp_path), format="parquet") == ["d"]
    assert resolve_paths(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert resolve_paths(SourceConfig(path=str(tmp_path), format="parquet")) == [
        tmp_path / "sub" / "deeper" / "d.parquet"]


def test_missing_file_no_match_empty_dir_and_unsupported(tmp_path):
    with pytest.raises(SourceError, match="nope.jsonl"):
        read_all(SourceConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(SourceError, match="no file matches"):
        read_all(SourceConfig(path=str(tmp_path / "*.parquet")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="no supported data files"):
        read_all(SourceConfig(path=str(tmp_path / "empty")))
    with pytest.raises(SourceError, match=r"notes\.txt.*unsupported"):
        read_all(SourceConfig(path=str(tmp_path / "empty" / "notes.txt")))
    # an explicit format reads any extension
    (tmp_path / "rows.txt").write_text('{"id": "x", "text": "y"}\n')
    assert [e.id for e in read_all(SourceConfig(path=str(tmp_path / "rows.txt"), format="jsonl"))] == ["x"]


def test_iter_batches_resolves_paths_eagerly(tmp_path):
    with pytest.raises(SourceError):
        iter_batches(SourceConfig(path=str(tmp_path / "missing.parquet")))


def test_unreadable_file_names_the_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "secret.jsonl", ROWS)
    if os.geteuid() == 0:  # root reads anything: simulate the permission error
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    else:
        path.chmod(0)
    try:
        with pytest.raises(SourceError, match=r"secret\.jsonl.*permission denied|permission denied.*secret\.jsonl"):
            read_all(SourceConfig(path=str(path)))
    finally:
        path.chmod(0o644)


def test_empty_files_warn_and_yield_nothing(tmp_path, quadsel_log):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    rejects = RejectLog(None)
    assert read_all(SourceConfig(path=str(tmp_path)), rejects) == []
    assert rejects.total == 0
    text = quadsel_log.text
    assert "empty.jsonl: empty file" in text
    assert "blank.jsonl: no rows" in text and "empty.parquet: no rows" in text


# --------------------------------------------------------------------------- fields and ids

def test_configurable_text_and_id_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"doc": 1, "body": "hello", "text": "meta now"},
                                             {"doc": 2, "body": "world"}])
    got = read_all(SourceConfig(path=str(path), text_field="body", id_field="doc"))
    assert [(e.id, e.text) for e in got] == [("1", "hello"), ("2", "world")]
    assert got[0].meta == {"text": "meta now"} and got[1].meta == {}


def test_content_hash_ids_are_stable(tmp_path):
    rows = [{"text": "alpha"}, {"text": "beta", "id": "given"}, {"text": "gamma"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    first = [e.id for e in read_all(SourceConfig(path=str(path)))]
    second = [e.id for e in read_all(SourceConfig(path=str(path)))]
    expected = "h" + hashlib.sha1("alpha".encode()).hexdigest()[:16]
    assert first == second and first[0] == expected and first[1] == "given"
    no_ids = [e.id for e in read_all(SourceConfig(path=str(path), id_field=None))]
    assert no_ids[1] == "h" + hashlib.sha1("beta".encode()).hexdigest()[:16]
    assert read_all(SourceConfig(path=str(path), id_field=None))[1].meta == {"id": "given"}


def test_config_is_strict():
    with pytest.raises(ValidationError):
        SourceConfig(path="x", colour="red")
    with pytest.raises(ValidationError):
        SourceConfig(path="x", batch_size=0)
    with pytest.raises(ValidationError):
        SourceConfig(path="x", max_chars=0)
    with pytest.raises(ValidationError):
        SourceConfig(path=[])
    with pytest.raises(ValidationError):
        SourceConfig(path="x", text_field="id")


# --------------------------------------------------------------------------- rejects

BAD_LINES = [
    (b'{"id": "ok", "text": "fine"}', None),
    (b'{"id": "e", "text": ""}', "empty_text"),
    (b'{"id": "w", "text": "  \\t\\n "}', "whitespace_text"),
    (b'{"id": "n", "text": 5}', "non_string_text"),
    (b'{"id": "z", "text": null}', "null_text"),
    (b'{"id": "m", "body": "x"}', "missing_text_field"),
    (b'{"id": "u", "text": "caf\xe9"}', "invalid_utf8"),
    (b'{"id": "s", "text": "half \\ud800 pair"}', "invalid_utf8"),
    (b'{"id": "j", "text": "unterminated', "malformed_json"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'', None),  # blank line: skipped silently
    (b'{"id": "long", "text": "' + b"y" * 50 + b'"}', "overlong_text"),
    (b'{"id": "ok", "text": "again"}', "duplicate_id"),
    (b'{"id": ["l"], "text": "t"}', "bad_id"),
    (b'{"id": {"d": 1}, "text": "t"}', "bad_id"),
    (b'{"id": true, "text": "t"}', "bad_id"),
    (b'{"id": null, "text": "t"}', "bad_id"),
    (b'{"id": NaN, "text": "t"}', "bad_id"),
    (b'{"id": 1.5, "text": "t"}', "bad_id"),
    (b'{"id": "", "text": "t"}', "bad_id"),
    (b'{"id": 42, "text": "int id"}', None),
    (b'{"text": "no id at all"}', None),
    (b'{"id": "emoji", "text": "ok \\ud83d\\ude00"}', None),
]


def test_every_reject_kind_is_counted_and_logged(tmp_path, quadsel_log):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    out = tmp_path / "run" / "rejects.jsonl"
    with RejectLog(out) as rejects:
        got = read_all(SourceConfig(path=str(path), max_chars=20, overlong="reject"), rejects)
    assert [e.id for e in got] == ["ok", "42", "h" + hashlib.sha1(b"no id at all").hexdigest()[:16], "emoji"]
    assert got[3].text == "ok \U0001F600"
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    lines = reject_lines(out)
    assert [(r["line"], r["reason"]) for r in lines] == expected
    assert all(r["file"] == str(path) and set(r) == {"file", "line", "reason", "detail", "id"} for r in lines)
    assert all(r["detail"] for r in lines)
    counts: dict[str, int] = {}
    for _, reason in expected:
        counts[reason] = counts.get(reason, 0) + 1
    assert rejects.counts == counts and rejects.total == len(expected)
    assert rejects.summary()["total"] == len(expected)
    dup = next(r for r in lines if r["reason"] == "duplicate_id")
    assert dup["id"] == "ok"
    assert f"{path}: kept 4 rows, rejected {len(expected)}" in quadsel_log.text


def test_truncate_vs_reject_overlong(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "abcdefgh"}, {"id": "b", "text": "abc"},
                                             {"id": "c", "text": "     xyz"}])
    log = tmp_path / "rejects.jsonl"
    with RejectLog(log) as rejects:
        got = read_all(SourceConfig(path=str(path), max_chars=5), rejects)
    assert [(e.id, e.text) for e in got] == [("a", "abcde"), ("b", "abc")]
    assert rejects.truncated == 1
    assert rejects.counts == {"whitespace_text": 1}  # "c" is blank within its first 5 chars
    assert [(r["line"], r["reason"], r["id"]) for r in reject_lines(log)] == [
        (1, "truncated", "a"), (3, "whitespace_text", "c")]
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(path), max_chars=5, overlong="reject"), rejects)
    assert [e.id for e in got] == ["b"] and rejects.counts == {"overlong_text": 2}
    assert rejects.truncated == 0


def test_reject_log_append(tmp_path):
    log = tmp_path / "r.jsonl"
    with RejectLog(log) as r:
        r.reject("f", 1, "empty_text")
    with RejectLog(log, append=True) as r:
        r.reject("g", 2, "bad_id", "x", "id9")
    assert [(x["file"], x["reason"], x["id"]) for x in reject_lines(log)] == [
        ("f", "empty_text", None), ("g", "bad_id", "id9")]
    with RejectLog(log) as r:
        pass
    assert log.read_text() == ""


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "1", "text": "first"}\r\n\r\n{"id": "2", "text": "second"}\r\n')
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(path)), rejects)
    assert [(e.id, e.text, e.line) for e in got] == [("1", "first", 1), ("2", "second", 3)]
    assert rejects.total == 0


def test_duplicate_ids_keep_the_first_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "text": "three"}, {"id": 5, "text": "four"},
                                       {"id": "5", "text": "five"}])
    log = tmp_path / "rej.jsonl"
    with RejectLog(log) as rejects:
        got = read_all(SourceConfig(path=str(tmp_path / "*.jsonl")), rejects)
    assert [(e.id, e.text) for e in got] == [("x", "one"), ("y", "two"), ("5", "four")]
    assert [(Path(r["file"]).name, r["line"], r["id"]) for r in reject_lines(log)] == [
        ("b.jsonl", 1, "x"), ("b.jsonl", 3, "5")]


def test_parquet_text_column_of_wrong_type(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [1, 2, None]}), path)
    log = tmp_path / "rej.jsonl"
    with RejectLog(log) as rejects:
        assert read_all(SourceConfig(path=str(path)), rejects) == []
    assert rejects.counts == {"non_string_text": 2, "null_text": 1}
    assert [(r["line"], r["reason"], r["id"]) for r in reject_lines(log)] == [
        (1, "non_string_text", "a"), (2, "non_string_text", "b"), (3, "null_text", "c")]


def test_tabular_rejects_and_meta_types(tmp_path):
    import datetime as dt

    table = pa.table({
        "id": pa.array([1, 2, None, 4, 5], pa.int64()),
        "text": ["ok", "", "no id", "   ", "fine"],
        "when": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5)] * 5, pa.timestamp("s")),
        "score": [1.5, float("nan"), 2.0, 3.0, None],
        "tags": [["a"], [], None, ["b", "c"], ["d"]],
        "blob": [b"\x00\x01", b"", None, b"x", b"y"],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=2)
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(path), batch_size=2), rejects)
    assert rejects.counts == {"empty_text": 1, "bad_id": 1, "whitespace_text": 1}
    assert [(e.id, e.line) for e in got] == [("1", 1), ("5", 5)]
    assert got[0].meta == {"when": "2024-01-02T03:04:05", "score": 1.5, "tags": ["a"], "blob": "AAE="}
    for e in got:
        json.dumps(e.meta, allow_nan=False)  # JSON-compatible


def test_invalid_utf8_in_arrow_strings_and_utf16_jsonl(tmp_path):
    raw = pa.array([b"good", b"bad\xff", b"ok"], pa.binary()).view(pa.string())
    path = write_arrow(tmp_path / "bad.arrow", pa.table({"text": raw, "note": raw}), stream=True)
    log = tmp_path / "rej.jsonl"
    with RejectLog(log) as rejects:
        got = read_all(SourceConfig(path=str(path)), rejects)
    assert [(e.text, e.meta["note"]) for e in got] == [("good", "good"), ("ok", "ok")]
    assert [(r["line"], r["reason"]) for r in reject_lines(log)] == [(2, "invalid_utf8")]
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"text": "x"}\n'.encode("utf-16"))
    with pytest.raises(SourceError, match=r"u16\.jsonl.*UTF-16"):
        read_all(SourceConfig(path=str(utf16)))


def test_missing_text_column_is_an_error_naming_the_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a"], "content": ["x"]}), path)
    with pytest.raises(SourceError, match=r"p\.parquet.*'text'.*id, content"):
        read_all(SourceConfig(path=str(path)))
    arrow = write_arrow(tmp_path / "p.arrow", pa.table({"body": ["x"]}), stream=True)
    with pytest.raises(SourceError, match=r"p\.arrow.*'text'.*body"):
        read_all(SourceConfig(path=str(arrow)))


def test_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match=r"junk\.parquet.*Parquet"):
        read_all(SourceConfig(path=str(tmp_path / "junk.parquet")))
    (tmp_path / "junk.arrow").write_bytes(b"neither is this arrow")
    with pytest.raises(SourceError, match=r"junk\.arrow.*Arrow"):
        read_all(SourceConfig(path=str(tmp_path / "junk.arrow")))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS * 50), good, row_group_size=50)
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.parquet"):
        read_all(SourceConfig(path=str(cut)))
    stream = write_arrow(tmp_path / "s.arrow", pa.Table.from_pylist(ROWS * 50), stream=True, chunk=50)
    data = stream.read_bytes()
    stream.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match=r"s\.arrow"):
        read_all(SourceConfig(path=str(stream)))
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"id": "1", "text": "x"}\n' * 1000)[:60])
    with pytest.raises(SourceError, match=r"cut\.jsonl\.gz"):
        read_all(SourceConfig(path=str(gz)))


def test_different_schemas_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x", "lang": "en"}])
    pq.write_table(pa.table({"id": ["b"], "text": ["y"], "score": [0.5]}), tmp_path / "b.parquet")
    write_arrow(tmp_path / "c.arrow", pa.table({"text": ["z"]}), stream=False)
    got = read_all(SourceConfig(path=str(tmp_path)))
    assert [e.meta for e in got] == [{"lang": "en"}, {"score": 0.5}, {}]
    assert got[2].id.startswith("h")


def test_read_texts_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert [e.id for e in read_texts(SourceConfig(path=str(path)), limit=3)] == ["r0", "r1", "r2"]
    assert len(read_texts(SourceConfig(path=str(path)))) == len(ROWS)
    assert read_texts(SourceConfig(path=str(path)), limit=0) == []


# --------------------------------------------------------------------------- streaming

def test_streaming_memory_is_bounded(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 20
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(200_000):
            fh.write(f'{{"id": "doc-{i}", "text": "{i} {filler}", "k": {i}}}\n')
    size = path.stat().st_size
    assert size > 100_000_000
    n = 0
    tracemalloc.start()
    try:
        for batch in iter_batches(SourceConfig(path=str(path), batch_size=512)):
            n += len(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 200_000
    # what stays is the duplicate-id filter (~70 bytes a row) plus one batch: far below the file
    assert peak < size / 5, (peak, size)


# --------------------------------------------------------------------------- real data

def test_real_bench_pool_reads_without_rejects(bench_dir, pool_sample, tmp_path):
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(bench_dir / "pool.jsonl")), rejects)
    assert rejects.total == 0 and rejects.truncated == 0
    assert len(got) == sum(1 for _ in open(bench_dir / "pool.jsonl", "rb"))
    assert set(got[0].meta) == {"domain", "source"}
    # content-hash ids: the pool's exact copies (domain "duplicate") are the expected rejects
    sample = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist(pool_sample), sample)
    rejects = RejectLog(None)
    got = read_all(SourceConfig(path=str(sample), id_field=None), rejects)
    assert len(got) == len({r["text"] for r in pool_sample})
    assert rejects.counts == ({"duplicate_id": rejects.total} if rejects.total else {})
    assert len(got) + rejects.total == len(pool_sample)
