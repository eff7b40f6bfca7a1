"""Hostile workflows through the whole job (issue 15): an earlier selection as the next pool, a
run directory inside the pool folder, a rerun with a config that changes the result."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import yaml
from conftest import small_job

from quadsel.jobs.cli import main
from quadsel.pipeline.shards import data_files, verify

Q = ["-q", "--progress", "quiet"]


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(job: Path, capsys, *extra) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["run", str(job), *Q, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _table(run_dir: Path) -> pa.Table:
    return pa.concat_tables([ipc.open_file(f).read_all() for f in data_files(run_dir)])


def test_an_earlier_selection_as_the_next_pool_runs_end_to_end(tmp_path, capsys):
    first = small_job(tmp_path, method="random", **{"selection.budget.amount": 300})
    rc, err = _run(_write(tmp_path / "a.yaml", first), capsys)
    assert rc == 0, err
    second = small_job(tmp_path, method="random", **{"selection.budget.amount": 50, "cluster.k": 4})
    second["run_dir"] = str(tmp_path / "run2")
    second["pool"]["path"] = str(tmp_path / "run" / "selection")  # the shards of the first selection
    rc, err = _run(_write(tmp_path / "b.yaml", second), capsys)
    assert rc == 0, err
    verify(tmp_path / "run2")
    t = _table(tmp_path / "run2")
    assert t.num_rows == 50
    assert t.schema.field("quadsel_cluster").type == pa.int32()
    assert t.schema.field("prev_quadsel_cluster").type == pa.int64()
    assert {"prev_quadsel_score", "prev_quadsel_round"} <= set(t.column_names)
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["inputs"]["sources"][0]["rows"] == 300


def test_run_dir_inside_the_pool_folder_is_excluded(tmp_path, capsys):
    cfg = small_job(tmp_path, method="random", **{"cluster.k": 4})
    data = tmp_path / "data"
    cfg["pool"]["path"] = str(data)  # the folder holds pool.jsonl and reference.jsonl
    cfg["run_dir"] = str(data / "runs" / "x")
    job = _write(tmp_path / "job.yaml", cfg)
    rc, err = _run(job, capsys)
    assert rc == 0, err
    s1 = json.loads((data / "runs" / "x" / "summary.json").read_text())
    assert [Path(f["file"]).name for f in s1["inputs"]["sources"]] == ["pool.jsonl", "reference.jsonl"]
    # the rerun must not read the first run's stores, rejects or shards: same pool, nothing new
    (data / "runs" / "x" / "summary.json").unlink()
    rc, err = _run(job, capsys)
    assert rc == 0, err
    s2 = json.loads((data / "runs" / "x" / "summary.json").read_text())
    assert s2["pool_rows"] == s1["pool_rows"] and s2["inputs"] == s1["inputs"]


def test_rerun_with_a_changed_dtype_recomputes_and_the_run_dir_says_what_it_holds(tmp_path, capsys):
    cfg = small_job(tmp_path, **{"model.dtype": "float32"})
    job = _write(tmp_path / "job.yaml", cfg)
    rc, err = _run(job, capsys)
    assert rc == 0, err
    run = tmp_path / "run"
    s32 = json.loads((run / "summary.json").read_text())
    resolved = (run / "config.resolved.yaml").read_bytes()
    # a field that does not change the selection: "already complete", the config on disk unchanged
    rc, err = _run(job, capsys, "--set", "ray.num_actors=5")
    assert rc == 0, err
    assert (run / "config.resolved.yaml").read_bytes() == resolved
    assert json.loads((run / "summary.json").read_text())["run_key"] == s32["run_key"]
    # a field that changes the scores: recomputed, and the run directory describes the new selection
    rc, err = _run(job, capsys, "--set", "model.dtype=bf16")
    assert rc == 0, err
    s16 = json.loads((run / "summary.json").read_text())
    assert s16["run_key"] != s32["run_key"]
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["model"]["dtype"] == "bfloat16"
    manifest = json.loads((run / "manifest.json").read_text())
    from quadsel.core.atomic import stable_hash
    from quadsel.jobs.config import load_config

    now = load_config(run / "config.resolved.yaml")
    assert manifest["config_hash"] == stable_hash(now.model_dump(mode="json", exclude={"run_dir"}))
    verify(run)


@pytest.mark.parametrize("bad", ["seed: -1", "embed: {seed: -1}", "selection: {quad: {tau: .nan}}",
                                 "scorer: {damping: .inf}", "model: {device: bogus}"])
def test_bad_values_are_exit_2_without_a_traceback(tmp_path, capsys, bad):
    cfg = small_job(tmp_path)
    over = yaml.safe_load(bad)
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    rc, err = _run(_write(tmp_path / "job.yaml", cfg), capsys)
    assert rc == 2 and err.startswith("quadsel run: error: "), err


def test_a_diverged_proxy_is_named_not_a_traceback(tmp_path, capsys):
    cfg = small_job(tmp_path, **{"model.proxy.lr": 1e12})
    rc, err = _run(_write(tmp_path / "job.yaml", cfg), capsys)
    assert rc == 2, err
    assert "non-finite score" in err and "model.proxy.lr" in err, err


def test_cluster_on_a_finished_selection_never_rewrites_what_describes_its_shards(tmp_path, capsys):
    """`quadsel cluster` with another k into a run dir that holds a finished selection is refused
    up front (one line naming the setting, exit 2) and changes nothing there; with the selection's
    own clustering settings it answers from the cache and leaves the selection's tables (with their
    bandit columns) and config.resolved.yaml as they are; in its own run dir it clusters as asked.
    inspect, report and verify keep agreeing with the shards, and `run` is still complete."""
    import pyarrow.parquet as pq

    from quadsel.jobs.inspect import summary_rows

    cfg = small_job(tmp_path, method="random")
    job = _write(tmp_path / "job.yaml", cfg)
    rc, err = _run(job, capsys)
    assert rc == 0, err
    run = tmp_path / "run"
    watched = [run / "clusters" / "summary.parquet", run / "clusters" / "assignments.parquet",
               run / "config.resolved.yaml", run / "rejects.jsonl", run / "manifest.json",
               run / "stages" / "cluster" / "_DONE.json", *map(Path, data_files(run))]
    before = {f: f.read_bytes() for f in watched}

    capsys.readouterr()
    assert main(["cluster", str(job), *Q, "--set", "cluster.k=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quadsel cluster: error: run_dir: "), err
    assert "holds a finished selection" in err and "cluster.k = 5 (the selection's: 12)" in err, err
    assert "--run-dir" in err
    assert {f: f.read_bytes() for f in watched} == before

    # the selection's clustering settings (other selection settings do not matter): cached, unchanged
    for extra in ([], ["--set", "selection.budget.amount=10"]):
        capsys.readouterr()
        assert main(["cluster", str(job), *Q, *extra]) == 0, capsys.readouterr().err
        assert {f: f.read_bytes() for f in watched} == before
        assert not list(run.glob("*.pending"))
    rows = summary_rows(run)
    assert len(rows) == 12 and sum(r["selected"] for r in rows) == 60  # inspect agrees with the shards
    table = _table(run)
    got = {}
    for c in table.column("quadsel_cluster").to_pylist():
        got[c] = got.get(c, 0) + 1
    assert {r["cluster"]: r["selected"] for r in rows if r["selected"]} == got

    # its own run dir: clustered as asked
    capsys.readouterr()
    assert main(["cluster", str(job), *Q, "--set", "cluster.k=5", "--run-dir", str(tmp_path / "k5")]) == 0
    assert pq.read_metadata(tmp_path / "k5" / "clusters" / "summary.parquet").num_rows == 5

    rc, err = _run(job, capsys)
    assert rc == 0, err  # still complete: nothing it depends on changed
    assert {f: f.read_bytes() for f in watched} == before
    verify(run)
    assert main(["report", str(run), *Q]) == 0
    capsys.readouterr()
    assert main(["verify", str(run), *Q]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 60

    # a run dir whose cluster table an older quadsel rewrote under the selection: verify and
    # inspect say so instead of showing it as the selection's
    (run / "clusters" / "summary.parquet").write_bytes((tmp_path / "k5" / "clusters" / "summary.parquet").read_bytes())
    assert main(["verify", str(run), *Q]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quadsel verify: error: ") and "does not describe the selection" in err, err
    assert main(["inspect", str(run), *Q]) == 0
    assert "does not describe the selection" in capsys.readouterr().err


@pytest.mark.parametrize("texts", [["spam"] * 40, ["spam " * (i % 4 + 1) for i in range(40)],
                                   ["!" * (i % 3 + 1) for i in range(40)]],
                         ids=["one-word", "one-word-repeated", "one-symbol-repeated"])
def test_a_pool_with_too_few_tfidf_features_is_one_line_exit_2(tmp_path, capsys, texts):
    """Every text the same word (or symbol) repeated: no 2-dimensional tf-idf embedding exists,
    so the embed fit refuses it with one line naming the cause, before any model or clustering
    (it was a ValueError traceback, or a 1-dimensional embedding in which every row is alike)."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = {"run_dir": str(tmp_path / "run"), "pool": {"path": str(pool)}, "embed": {"dim": 8},
           "cluster": {"k": 3}, "selection": {"method": "random", "budget": {"amount": 10}},
           "ray": {"enabled": False}}
    job = str(_write(tmp_path / "job.yaml", cfg))
    for args in (["config", "--check", job], ["run", job], ["cluster", job]):  # --check finds it too
        cmd = args[0]
        capsys.readouterr()
        rc = main([*args, *Q])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith(f"quadsel {cmd}: error: embed: the texts give only ") and \
            "distinct tf-idf feature(s)" in err and "same word or symbol repeated" in err, err
        assert not (tmp_path / "run" / "stages" / "embed").exists()
        assert not (tmp_path / "run" / "stages" / "cluster").exists()
    # a selection that needs a model: the pool is embedded first, so no proxy is trained for nothing
    cfg["selection"] = {"method": "quad", "budget": {"amount": 10}}
    cfg["scorer"] = {"name": "vog"}  # needs no reference
    rc = main(["run", str(_write(tmp_path / "quad.yaml", cfg)), *Q])
    err = capsys.readouterr().err
    assert rc == 2 and "distinct tf-idf feature(s)" in err, err
    assert not (tmp_path / "run" / "stages" / "proxy").exists()
