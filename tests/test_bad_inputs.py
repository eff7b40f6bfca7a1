"""Bad inputs at the job level: a whole ``quadsel run`` / ``quadsel cluster`` through the CLI.

One parametrized row per kind of bad input. Every row either fails with exit code 2 and a
one-line message naming the file / line / field (no traceback), or finishes with the bad rows
counted in ``rejects.jsonl`` (reason, file and line of each). Every row runs into a copy of a
run directory that already holds a finished selection, and that selection's manifest and shards
must still verify and be byte-identical afterwards.

Unreadable files: tests run as root, where chmod 000 does not stop a read, so the
PermissionError is injected (monkeypatch of ``open`` for that one path).

Budget larger than the pool: an error (exit 2) naming ``selection.budget.amount``, the pool's
size and the limit, raised right after the pool is read (before any model work); a budget equal
to the pool is allowed. ``k`` larger than the pool: an error naming ``cluster.k``.
"""
from __future__ import annotations

import builtins
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import small_job

from quadsel.jobs.cli import main
from quadsel.pipeline.shards import data_files, verify

BASE_ROWS = 100  # rows of the small good pool that row-level cases add bad rows to


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    files = [run_dir / "manifest.json", *map(Path, data_files(run_dir))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Any]:
    """A finished selection (the small job) and the inputs the cases start from."""
    root = tmp_path_factory.mktemp("good")
    cfg = small_job(root)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "-q", "--progress", "quiet"]) == 0
    run_dir = root / "run"
    lines = (root / "data" / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    base = [json.loads(x) for x in lines[:BASE_ROWS]]
    files = {n: (run_dir / n).read_bytes() for n in ("config.resolved.yaml", "rejects.jsonl")}
    return {"root": root, "cfg": cfg, "run_dir": run_dir, "snapshot": _snapshot(run_dir), "base": base,
            "files": files}


def _jsonl(path: Path, rows: list[Any], *, raw: list[bytes] = ()) -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(raw)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------- the cases
# Each case: (kind, command, setup) where setup(tmp, good, monkeypatch) returns (overrides,
# expectation). Expectation: {"error": [substrings]} or {"rejects": {reason: n}, ...}.

def _missing_pool(tmp, g, mp):
    return {"pool.path": str(tmp / "nope.jsonl")}, {"error": ["no such file or folder", "nope.jsonl"]}


def _empty_pool_file(tmp, g, mp):
    (tmp / "empty.jsonl").write_bytes(b"")
    return {"pool.path": str(tmp / "empty.jsonl")}, {"error": ["sources: no valid rows", "empty.jsonl"]}


def _pool_all_rejected(tmp, g, mp):
    p = _jsonl(tmp / "bad.jsonl", [{"id": f"x{i}", "text": ""} for i in range(5)])
    return {"pool.path": str(p)}, {"error": ["sources: no valid rows", "bad.jsonl", "'empty_text': 5"]}


def _unreadable_pool(tmp, g, mp):
    p = _jsonl(tmp / "locked.jsonl", g["base"])
    real_open = builtins.open

    def fake_open(file, *a, **k):  # root ignores chmod: inject what a non-root user would get
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    mp.setattr(builtins, "open", fake_open)
    return {"pool.path": str(p)}, {"error": ["cannot read", "locked.jsonl", "permission denied"]}


def _utf16_pool(tmp, g, mp):
    p = tmp / "utf16.jsonl"
    p.write_bytes("".join(json.dumps(r) + "\n" for r in g["base"]).encode("utf-16"))
    return {"pool.path": str(p)}, {"error": ["utf16.jsonl", "UTF-16", "must be UTF-8"]}


def _truncated_gzip(tmp, g, mp):
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in g["base"]).encode(), mtime=0)
    p = tmp / "cut.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])
    return {"pool.path": str(p)}, {"error": ["cut.jsonl.gz", "read failed after line"]}


def _parquet_text_wrong_type(tmp, g, mp):
    p = tmp / "ints.parquet"
    pq.write_table(pa.table({"id": [f"i{i}" for i in range(6)], "text": list(range(6))}), p)
    return {"pool.path": str(p)}, {"error": ["sources: no valid rows", "ints.parquet", "'non_string_text': 6"]}


def _parquet_no_text_column(tmp, g, mp):
    p = tmp / "body.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x y", "z w"]}), p)
    return {"pool.path": str(p)}, {"error": ["body.parquet", "no column 'text'", "columns found: id, body"]}


def _corrupt_parquet(tmp, g, mp):
    p = tmp / "broken.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["hello world"]}), p)
    p.write_bytes(p.read_bytes()[:-20])
    return {"pool.path": str(p)}, {"error": ["broken.parquet", "not a readable Parquet file"]}


def _unsupported_extension(tmp, g, mp):
    p = tmp / "pool.csv"
    p.write_text("id,text\na,hello\n")
    return {"pool.path": str(p)}, {"error": ["pool.csv", "unsupported file type '.csv'"]}


def _empty_folder(tmp, g, mp):
    (tmp / "nothing").mkdir()
    (tmp / "nothing" / "README.txt").write_text("no data here")
    return {"pool.path": str(tmp / "nothing")}, {"error": ["nothing", "no supported data files"]}


def _empty_reference(tmp, g, mp):
    (tmp / "ref.jsonl").write_bytes(b"")
    return {"reference.path": str(tmp / "ref.jsonl")}, {"error": ["reference: no valid rows", "ref.jsonl"]}


def _reference_all_rejected(tmp, g, mp):
    p = _jsonl(tmp / "ref.jsonl", [{"id": "r1", "text": None}, {"id": "r2", "text": None},
                                   {"id": "r3", "text": "   "}])
    return {"reference.path": str(p)}, {"error": ["reference: no valid rows", "ref.jsonl",
                                                  "'null_text': 2", "'whitespace_text': 1"]}


def _missing_reference(tmp, g, mp):
    return {"reference.path": str(tmp / "noref.jsonl")}, {"error": ["noref.jsonl", "no such file or folder"]}


def _budget_larger_than_pool(tmp, g, mp):
    return {"selection.budget.amount": 5000}, {"error": [
        "selection.budget.amount = 5,000 examples is more than the pool holds (878 valid rows",
        "at most 878"]}


def _k_larger_than_pool(tmp, g, mp):
    return {"cluster.k": 5000}, {"error": ["cluster.k = 5000 is larger than the pool (878 valid rows)"]}


def _model_path_missing(tmp, g, mp):
    return {"model.path": str(tmp / "no-such-model")}, {"error": ["model.path", "no-such-model", "does not exist"]}


def _scorer_unknown(tmp, g, mp):
    return {"scorer.name": "ekfca"}, {"error": ["scorer.name", "unknown scorer 'ekfca'", "ekfac"]}


def _scorer_unknown_option(tmp, g, mp):
    return {"scorer.options": {"dampnig": 0.5}}, {"error": ["scorer.options", "dampnig", "'ekfac'"]}


def _scorer_option_it_lacks(tmp, g, mp):
    return ({"scorer.name": "attention", "scorer.damping": 0.5},
            {"error": ["scorer.damping", "'attention' scorer has no such option", "head_fraction"]})


def _scorer_option_it_ignores(tmp, g, mp):
    # grad-dot has no curvature: a damping given for it would be silently ignored
    return ({"scorer.name": "grad-dot", "scorer.damping": 0.5},
            {"error": ["scorer.damping", "'grad-dot' scorer has no such option"]})


def _model_path_not_a_model(tmp, g, mp):
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "notes.txt").write_text("hello")
    return {"model.path": str(tmp / "not-a-model")}, {"error": ["model.path", "not-a-model",
                                                               "cannot load a causal LM"]}


def _unknown_config_key(tmp, g, mp):
    return {"clusterr": {"k": 3}}, {"error": ["invalid config", "clusterr: unknown key"]}


def _unknown_nested_key(tmp, g, mp):
    return {"cluster.kk": 3}, {"error": ["invalid config", "cluster.kk: unknown key"]}


def _wrong_type_config(tmp, g, mp):
    return {"cluster.k": "many"}, {"error": ["cluster.k: Input should be a valid integer", "'many'"]}


def _wrong_type_section(tmp, g, mp):
    return {"pool.max_chars": [1, 2]}, {"error": ["pool.max_chars", "valid integer"]}


def _invalid_yaml(tmp, g, mp):
    return "cluster: [k: 3\n", {"error": ["job.yaml", "line", "is not valid YAML"]}


# -- row-level: the run goes on, bad rows are counted (quadsel cluster on a small pool)

def _rows(extra_rows: list[Any] = (), raw: list[bytes] = (), **src) -> Callable:
    def setup(tmp, g, mp):
        p = _jsonl(tmp / "pool.jsonl", g["base"] + list(extra_rows), raw=list(raw))
        return {"pool.path": str(p), **{f"pool.{k}": v for k, v in src.items()}}, None
    return setup


def _row_case(extra=(), raw=(), rejects=None, rows=BASE_ROWS, truncated=0, **src):
    setup = _rows(extra, raw, **src)

    def wrapped(tmp, g, mp):
        over, _ = setup(tmp, g, mp)
        return over, {"rejects": rejects or {}, "rows": rows, "truncated": truncated}
    return wrapped


def _bom(tmp, g, mp):
    p = tmp / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in g["base"]).encode())
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS, "first_id": g["base"][0]["id"]}


def _crlf(tmp, g, mp):
    p = tmp / "crlf.jsonl"
    p.write_bytes("".join(json.dumps(r) + "\r\n" for r in g["base"]).encode())
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS}


def _huge_document(tmp, g, mp):
    p = tmp / "huge.jsonl"
    with open(p, "wb") as fh:
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in g["base"]))
        fh.write(b'{"id": "huge", "text": "' + b"lorem ipsum " * (100 * 2**20 // 12) + b'"}\n')
    assert p.stat().st_size > 100 * 2**20
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS + 1, "truncated": 1}


def _different_schemas(tmp, g, mp):
    d = tmp / "mixed"
    d.mkdir()
    base = g["base"]
    _jsonl(d / "a.jsonl", [dict(r, lang="en") for r in base[:40]])
    pq.write_table(pa.table({"id": [r["id"] for r in base[40:70]], "text": [r["text"] for r in base[40:70]],
                             "score": [float(i) for i in range(30)]}), d / "b.parquet")
    t = pa.table({"text": [r["text"] for r in base[70:]], "id": [r["id"] for r in base[70:]],
                  "tags": [["x", str(i)] for i in range(30)]})
    with pa.ipc.new_file(str(d / "c.arrow"), t.schema) as w:
        w.write_table(t)
    return {"pool.path": str(d)}, {"rejects": {}, "rows": BASE_ROWS}


def _parquet_bad_ids(tmp, g, mp):
    base = g["base"]
    p = tmp / "ids.parquet"
    ids = [float(i) + 0.5 for i in range(10)] + [float(i) for i in range(10, len(base))]
    pq.write_table(pa.table({"id": ids, "text": [r["text"] for r in base]}), p)
    return {"pool.path": str(p)}, None


# -- issue 15: hostile kinds (each a kind of input, not one case)

def _arrow_stream_cut(tmp, g, mp):
    t = pa.Table.from_pylist(g["base"])
    sink = pa.OSFile(str(tmp / "cut.arrow"), "wb")
    w = pa.ipc.new_stream(sink, t.schema)
    w.write_batch(t.to_batches(max_chunksize=50)[0])
    sink.close()  # killed writer: no end-of-stream marker
    return {"pool.path": str(tmp / "cut.arrow")}, {"error": ["cut.arrow", "without its end-of-stream marker"]}


def _dangling_symlink(tmp, g, mp):
    d = tmp / "pool"
    d.mkdir()
    _jsonl(d / "a.jsonl", g["base"])
    import os

    os.symlink(tmp / "gone.jsonl", d / "b.jsonl")
    return {"pool.path": str(d)}, {"error": ["b.jsonl", "a symlink to", "which does not exist"]}


def _dataset_dict(tmp, g) -> str:
    """A saved DatasetDict folder: train (60 rows) and test splits."""
    datasets = pytest.importorskip("datasets")
    d = tmp / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(g["base"][:60]),
                          "test": datasets.Dataset.from_list(g["base"][60:])}).save_to_disk(str(d))
    return str(d)


def _dataset_dict_ambiguous(tmp, g, mp):
    return {"pool.path": _dataset_dict(tmp, g)}, {"error": ["dd", "DatasetDict with splits ['train', 'test']",
                                                            "pool.split"]}


def _dataset_dict_split(tmp, g, mp):
    return {"pool.path": _dataset_dict(tmp, g), "pool.split": "train"}, {"rejects": {}, "rows": 60}


def _json_array_as_jsonl(tmp, g, mp):
    p = tmp / "array.jsonl"
    p.write_text(json.dumps(g["base"], indent=2))
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS}


def _cr_only(tmp, g, mp):
    p = tmp / "cr.jsonl"
    p.write_bytes("".join(json.dumps(r) + "\r" for r in g["base"]).encode())
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS}


def _symlinked_subfolder(tmp, g, mp):
    import os

    (tmp / "real").mkdir()
    _jsonl(tmp / "real" / "b.jsonl", g["base"][50:])
    (tmp / "pool").mkdir()
    _jsonl(tmp / "pool" / "a.jsonl", g["base"][:50])
    os.symlink(tmp / "real", tmp / "pool" / "linked")
    os.symlink(tmp / "pool", tmp / "real" / "loop")  # and a loop back
    return {"pool.path": str(tmp / "pool" / "**" / "*.jsonl")}, {"rejects": {}, "rows": BASE_ROWS}


def _reserved_columns(tmp, g, mp):
    p = tmp / "prev.parquet"
    base = g["base"]
    pq.write_table(pa.table({"id": [r["id"] for r in base], "text": [r["text"] for r in base],
                             "quadsel_cluster": pa.array(range(len(base)), pa.int64())}), p)
    return {"pool.path": str(p)}, {"rejects": {}, "rows": BASE_ROWS}


def _duplicate_yaml_key(tmp, g, mp):
    cfg = dict(g["cfg"], run_dir=str(tmp / "run"))
    return yaml.safe_dump(cfg) + "seed: 3\n", {"error": ["job.yaml", "key 'seed' is given twice"]}


CASES: list[tuple[str, str, Callable]] = [
    ("missing-pool-file", "cluster", _missing_pool),
    ("empty-pool-file", "cluster", _empty_pool_file),
    ("pool-entirely-rejected", "cluster", _pool_all_rejected),
    ("unreadable-pool-permission", "cluster", _unreadable_pool),
    ("utf16-pool", "cluster", _utf16_pool),
    ("truncated-gzip", "cluster", _truncated_gzip),
    ("parquet-text-column-int", "cluster", _parquet_text_wrong_type),
    ("parquet-no-text-column", "cluster", _parquet_no_text_column),
    ("corrupt-parquet", "cluster", _corrupt_parquet),
    ("unsupported-extension", "cluster", _unsupported_extension),
    ("folder-without-data", "cluster", _empty_folder),
    ("empty-reference", "run", _empty_reference),
    ("reference-entirely-rejected", "run", _reference_all_rejected),
    ("missing-reference", "run", _missing_reference),
    ("budget-larger-than-pool", "run", _budget_larger_than_pool),
    ("k-larger-than-pool", "cluster", _k_larger_than_pool),
    ("model-path-missing", "run", _model_path_missing),
    ("model-path-not-a-model", "run", _model_path_not_a_model),
    ("scorer-unknown-name", "run", _scorer_unknown),
    ("scorer-unknown-option", "run", _scorer_unknown_option),
    ("scorer-option-it-lacks", "run", _scorer_option_it_lacks),
    ("scorer-option-it-ignores", "run", _scorer_option_it_ignores),
    ("config-unknown-key", "run", _unknown_config_key),
    ("config-unknown-nested-key", "cluster", _unknown_nested_key),
    ("config-wrong-type", "run", _wrong_type_config),
    ("config-wrong-type-list", "cluster", _wrong_type_section),
    ("config-invalid-yaml", "run", _invalid_yaml),
    # row-level: counted rejections, the job finishes
    ("text-empty", "cluster", _row_case([{"id": "e1", "text": ""}, {"id": "e2", "text": ""}],
                                        rejects={"empty_text": 2})),
    ("text-whitespace", "cluster", _row_case([{"id": "w1", "text": " \n\t "}], rejects={"whitespace_text": 1})),
    ("text-non-string", "cluster", _row_case([{"id": "n1", "text": 12}, {"id": "n2", "text": ["a"]},
                                              {"id": "n3", "text": {"a": 1}}, {"id": "n4", "text": True}],
                                             rejects={"non_string_text": 4})),
    ("text-null-or-nan", "cluster", _row_case([{"id": "z1", "text": None}], raw=[b'{"id": "z2", "text": NaN}\n'],
                                              rejects={"null_text": 2})),
    ("text-field-missing", "cluster", _row_case([{"id": "m1", "body": "x"}], rejects={"missing_text_field": 1})),
    ("invalid-utf8", "cluster", _row_case(raw=[b'{"id": "u1", "text": "caf\xe9 \xff"}\n'],
                                          rejects={"invalid_utf8": 1})),
    ("malformed-json", "cluster", _row_case(raw=[b'{"id": "j1", "text": "cut\n', b'{"id": "j2",}\n',
                                                 b"not json at all\n"], rejects={"malformed_json": 3})),
    ("json-not-an-object", "cluster", _row_case(raw=[b'["a", "b"]\n', b'"text"\n'], rejects={"not_an_object": 2})),
    ("bom", "cluster", _bom),
    ("crlf-line-endings", "cluster", _crlf),
    ("100mb-single-document", "cluster", _huge_document),
    ("very-long-lines-rejected", "cluster", _row_case([{"id": f"long{i}", "text": "word " * 300_000}
                                                        for i in range(3)],
                                                       rejects={"overlong_text": 3}, overlong="reject")),
    ("duplicate-ids", "cluster", _row_case([{"id": "dup", "text": "first copy"}, {"id": "dup", "text": "again"},
                                            {"id": "dup", "text": "and again"}],
                                           rejects={"duplicate_id": 2}, rows=BASE_ROWS + 1)),
    ("bad-ids", "cluster", _row_case([{"id": 1.5, "text": "a"}, {"id": "  ", "text": "b"},
                                      {"id": ["x"], "text": "c"}], rejects={"bad_id": 3})),
    ("different-schemas-across-files", "cluster", _different_schemas),
    # issue 15: every kind below is found where the input enters (config load, preflight, reader)
    ("arrow-stream-without-eos", "cluster", _arrow_stream_cut),
    ("dangling-symlink", "cluster", _dangling_symlink),
    ("dataset-dict-several-splits", "cluster", _dataset_dict_ambiguous),
    ("config-duplicate-key", "run", _duplicate_yaml_key),
    ("config-nan", "run", lambda t, g, m: ({"selection.quad.tau": float("nan")}, {"error": ["selection.quad",
                                                                                            "tau"]})),
    ("config-inf", "run", lambda t, g, m: ({"scorer.damping": float("inf")}, {"error": ["scorer.damping",
                                                                                        "finite number"]})),
    ("config-negative-seed", "run", lambda t, g, m: ({"seed": -1}, {"error": ["seed", "greater than or equal"]})),
    ("config-quad-unknown-key", "run", lambda t, g, m: ({"selection.quad.tua": 0.5},
                                                        {"error": ["selection.quad: unknown key 'tua'"]})),
    ("device-bogus", "run", lambda t, g, m: ({"model.device": "bogus"}, {"error": ["model.device: 'bogus'"]})),
    ("several-problems-one-message", "run",
     lambda t, g, m: ({"model.device": "bogus", "scorer.name": "nope", "cluster.k": 5000},
                      {"error": ["2 problems found before running", "model.device", "scorer.name"]})),
    ("dataset-dict-split-chosen", "cluster", _dataset_dict_split),
    ("json-array-saved-as-jsonl", "cluster", _json_array_as_jsonl),
    ("cr-only-line-endings", "cluster", _cr_only),
    ("symlinked-subfolder-and-loop", "cluster", _symlinked_subfolder),
    ("zero-width-text", "cluster", _row_case([{"id": "zw", "text": "\u200b\u200b"}], rejects={"whitespace_text": 1})),
    ("reserved-quadsel-columns", "cluster", _reserved_columns),
]


def _reject_counts(run_dir: Path) -> tuple[Counter, list[dict]]:
    recs = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()]
    return Counter(r["reason"] for r in recs if r["reason"] != "truncated"), recs


@pytest.mark.parametrize("kind, command, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input(kind, command, setup, good, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # `run` cases go over a copy of a finished selection (which must survive them); `quadsel
    # cluster` with another pool is refused in a run dir holding a selection (test_hostile_jobs),
    # so its cases start from an empty run dir
    if command == "run":
        shutil.copytree(good["run_dir"], run_dir)
    over, expect = setup(tmp_path, good, monkeypatch)
    cfg_path = tmp_path / "job.yaml"
    if isinstance(over, str):  # a broken YAML file
        cfg_path.write_text(over)
    else:
        cfg = json.loads(json.dumps(good["cfg"]))
        cfg["run_dir"] = str(run_dir)
        if "rejects" in expect:  # row-level: a small pool, default max_chars
            cfg["cluster"]["k"] = 4
            cfg["pool"]["max_chars"] = 100_000
        for key, value in over.items():
            node = cfg
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        cfg_path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main([command, str(cfg_path), "-q", "--progress", "quiet"])
    out, err = capsys.readouterr()
    monkeypatch.undo()
    assert "Traceback" not in err
    if "error" in expect:
        assert rc == 2, err
        errors = [x for x in err.splitlines() if x.startswith(f"quadsel {command}: error: ")]
        assert len(errors) == 1, err  # one clear line (warnings may come before it)
        for s in expect["error"]:
            assert s in err, (s, err)
    else:
        assert rc == 0, err
        counts, recs = _reject_counts(run_dir)
        assert dict(counts) == expect["rejects"]
        for r in recs:  # every reject names its file and line
            assert r["file"].startswith(str(tmp_path)) and r["line"] > 0
        assert sum(r["reason"] == "truncated" for r in recs) == expect.get("truncated", 0)
        job = json.loads((run_dir / "clusters" / "cluster_job.json").read_text())
        assert job["rows"] == expect["rows"]
        if "first_id" in expect:
            from quadsel.pipeline.store import PoolStore

            store = PoolStore.open(run_dir / "stages" / "sources" / "store")
            assert store.ids()[0] == expect["first_id"] and "\ufeff" not in store.texts([0])[0]
        if kind == "crlf-line-endings":
            from quadsel.pipeline.store import PoolStore

            store = PoolStore.open(run_dir / "stages" / "sources" / "store")
            assert not any("\r" in t for t in store.texts(list(range(len(store)))))
    # nothing the finished run wrote was lost or changed
    if command != "run":
        return
    verify(run_dir)
    assert _snapshot(run_dir) == good["snapshot"]
    if "error" in expect:  # the run-level files still describe that selection
        for name in ("config.resolved.yaml", "rejects.jsonl"):
            assert (run_dir / name).read_bytes() == good["files"][name], name


def test_parquet_with_wrong_id_type_is_counted(good, tmp_path, capsys):
    """Float ids in a Parquet pool: every row is a counted ``bad_id``, so the pool is empty."""
    run_dir = tmp_path / "run"
    shutil.copytree(good["run_dir"], run_dir)
    over, _ = _parquet_bad_ids(tmp_path, good, None)
    cfg = dict(good["cfg"], run_dir=str(run_dir), pool=dict(good["cfg"]["pool"], path=over["pool.path"]))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(tmp_path / "job.yaml"), "-q", "--progress", "quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"'bad_id': {BASE_ROWS}" in err and "ids.parquet" in err
    assert _snapshot(run_dir) == good["snapshot"]


def test_budget_equal_to_pool_selects_everything(good, tmp_path, capsys):
    """The edge of the budget rule: amount == pool size is allowed (random: no model work)."""
    run_dir = tmp_path / "run"
    cfg = json.loads(json.dumps(good["cfg"]))
    cfg.update(run_dir=str(run_dir))
    cfg["pool"]["path"] = str(_jsonl(tmp_path / "pool.jsonl", good["base"]))
    cfg["cluster"]["k"] = 4
    cfg["selection"] = {"method": "random", "budget": {"unit": "examples", "amount": BASE_ROWS}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml"), "-q", "--progress", "quiet"]) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected"] == BASE_ROWS and summary["budget_met"]
    verify(run_dir)


def test_mixed_schemas_reach_the_shards(good, tmp_path, capsys):
    """Files with different columns: the selection's shards carry the union of the fields."""
    _different_schemas(tmp_path, good, None)
    run_dir = tmp_path / "run"
    cfg = json.loads(json.dumps(good["cfg"]))
    cfg.update(run_dir=str(run_dir))
    cfg["pool"]["path"] = str(tmp_path / "mixed")
    cfg["cluster"]["k"] = 4
    cfg["selection"] = {"method": "random", "budget": {"unit": "examples", "amount": BASE_ROWS}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml"), "-q", "--progress", "quiet"]) == 0, capsys.readouterr().err
    verify(run_dir)
    table = pa.concat_tables([pa.ipc.open_file(f).read_all() for f in data_files(run_dir)])
    assert table.num_rows == BASE_ROWS
    assert {"lang", "score", "tags", "domain"} <= set(table.column_names)
    assert table.column("lang").null_count == BASE_ROWS - 40
    assert table.column("score").null_count == BASE_ROWS - 30
