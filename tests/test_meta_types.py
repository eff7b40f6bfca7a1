"""A meta field whose type differs across rows reaches the shards as a string column a trainer
reads without surprises: strings as they are ("a" stays "a", never '"a"'), other values as their
JSON text (3 -> "3"), one warning naming the field; read back with `datasets`."""
from __future__ import annotations

import json

import pytest
import yaml

from quadsel.jobs.cli import main
from quadsel.pipeline.shards import verify

WORDS = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota", "kappa lambda mu"]
MIXED = ["a", 3, None, True, 2.5, [1, "x"], {"k": "v"}, "b c"]
WANT = ["a", "3", None, "true", "2.5", '[1,"x"]', '{"k":"v"}', "b c"]


def test_mixed_type_meta_field_reads_back_with_datasets(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"r{i}", "text": f"{WORDS[i % 4]} row {i} " * 3, "tag": MIXED[i % len(MIXED)],
             "n": i, "label": f"l{i % 3}"} for i in range(64)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"run_dir": str(tmp_path / "run"), "pool": {"path": str(pool)}, "embed": {"dim": 8},
           "cluster": {"k": 4}, "selection": {"method": "random", "budget": {"fraction": 1.0}},
           "ray": {"enabled": False}, "output": {"shuffle": False}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(job), "-q", "--progress", "quiet"]) == 0
    err = capsys.readouterr().err
    verify(tmp_path / "run")
    ds = datasets.load_dataset(str(tmp_path / "run"), split="train")
    assert ds.features["tag"].dtype == "string" and ds.features["n"].dtype == "int64"
    assert ds.features["label"].dtype == "string"
    got = {r["id"]: r for r in ds}
    assert len(got) == 64
    for r in rows:
        assert got[r["id"]]["tag"] == WANT[int(r["id"][1:]) % len(MIXED)], r
        assert got[r["id"]]["n"] == r["n"] and got[r["id"]]["label"] == r["label"]
    warned = [m for m in err.splitlines() if "meta field" in m]  # once, for that field only
    assert len(warned) == 1 and "meta field 'tag' has values of several types" in warned[0], err
