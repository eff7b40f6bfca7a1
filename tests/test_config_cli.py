"""Job config validation, --set overrides and the CLI surface."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from quadsel.jobs.cli import build_parser, main
from quadsel.jobs.config import ConfigError, JobConfig, apply_overrides, dump_config, load_config


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({}, ["cluster.k=12", "embed.dim=64", "pool.path=a b.jsonl", "ray.enabled=false",
                                "selection.budget.amount=50"])
    assert data == {"cluster": {"k": 12}, "embed": {"dim": 64}, "pool": {"path": "a b.jsonl"},
                    "ray": {"enabled": False}, "selection": {"budget": {"amount": 50}}}
    cfg = JobConfig.model_validate(data)
    assert cfg.selection.budget.amount == 50 and cfg.selection.budget.fraction is None


@pytest.mark.parametrize("override, field, expect", [
    ("cluster.k=many", "cluster.k", "valid integer"),
    ("clusterr.k=3", "clusterr", "unknown key"),
    ("cluster.kk=3", "cluster.kk", "unknown key"),
    ("embed.kind=bogus", "embed.kind", "'tfidf' or 'hf'"),
    ("selection.budget.fraction=2", "selection.budget.fraction", "less than or equal to 1"),
    ("cluster.k=0", "cluster.k", "greater than 0"),
    ("pool.overlong=drop", "pool.overlong", "'truncate' or 'reject'"),
])
def test_config_errors_name_the_field(override, field, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pool.path=x.jsonl", override])
    assert f"{field}:" in str(e.value) and expect in str(e.value)


def test_budget_needs_exactly_one_of_amount_or_fraction():
    with pytest.raises(ConfigError, match="exactly one of budget.amount or budget.fraction"):
        load_config(None, ["pool.path=x", "selection.budget.amount=5", "selection.budget.fraction=0.5"])


def test_missing_pool_is_named():
    with pytest.raises(ConfigError, match="pool: Field required"):
        load_config(None, [])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool:\n  path: x\ncluster: [k: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("pool:\n  path: x\ncluster:\n  k: '12x'\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*\n  cluster.k"):
        load_config(wrong)


def test_dumped_config_round_trips(tmp_path):
    cfg = load_config(None, ["pool.path=x.jsonl", "cluster.k=7", "seed=3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert yaml.safe_load(p.read_text())["cluster"]["k"] == 7


def test_cli_help_for_every_command(capsys):
    parser = build_parser()
    for cmd in ("run", "cluster", "inspect", "demo", "config"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: quadsel " + cmd in out


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    rc = main(["cluster", str(tmp_path / "missing.yaml")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "quadsel cluster: error: config file not found" in err and "Traceback" not in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "quadsel", "config", "--defaults"], capture_output=True,
                         text=True, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["pool"]["path"] == "path/to/pool.jsonl" and cfg["scorer"]["name"] == "ekfac"
    # the open sections are listed too (as comments): every bandit constant and every scorer
    # (the scorers a fresh process registers: test modules register scorers of their own here)
    from quadsel.selection import QuadConfig

    for field in QuadConfig.model_fields:
        assert f"#   {field}: " in out, field
    names = subprocess.run([sys.executable, "-c", "import quadsel.influence as i; print(*i.available_scorers())"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert {"ekfac", "grad-dot", "attention", "predictor"} <= set(names)
    for name in names:
        assert f"#   {name}: {{" in out, name


def test_the_run_seed_seeds_embedding_and_clustering(tmp_path):
    """`seed` is the seed of the run: changing it changes the clustering too, unless a section
    sets its own; the resolved config says which seed each stage used."""
    import numpy as np
    from conftest import small_job

    from quadsel.jobs.cluster_job import run_cluster

    assert load_config(None, ["pool.path=x", "seed=7"]).cluster.seed == 7
    assert load_config(None, ["pool.path=x", "seed=7", "cluster.seed=3"]).cluster.seed == 3
    assert yaml.safe_load(dump_config(load_config(None, ["pool.path=x", "seed=5"])))["embed"]["seed"] == 5

    def assignments(seed):
        cfg = small_job(tmp_path, seed=seed, run_dir=str(tmp_path / f"run{seed}"))
        run_cluster(JobConfig.model_validate(cfg))
        import pyarrow.parquet as pq

        return np.asarray(pq.read_table(tmp_path / f"run{seed}" / "clusters" / "assignments.parquet")
                          .column("cluster").to_pylist())

    a0, a0_again, a1 = assignments(0), assignments(0), assignments(1)
    assert np.array_equal(a0, a0_again) and not np.array_equal(a0, a1)
