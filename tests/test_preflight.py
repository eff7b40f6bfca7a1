"""Config that lies or is wrong (issue 15, 14 §4): found when the config is loaded, or by the
up-front check stage, before anything is written; all problems in one message, exit 2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quadsel.jobs.cli import main
from quadsel.jobs.config import ConfigError, load_config


def _pool(tmp_path: Path, n: int = 30) -> Path:
    p = tmp_path / "pool.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    p.write_text("".join(json.dumps({"id": f"p{i}", "text": " ".join(words[(i + j) % 10] for j in range(8))
                                     + f" {i}"}) + "\n" for i in range(n)))
    return p


def _run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# -------------------------------------------------------------------------- config loading

def test_a_section_or_key_given_twice_is_an_error(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("pool:\n  path: x.jsonl\ncluster:\n  k: 3\nseed: 1\ncluster:\n  k: 5\n")
    with pytest.raises(ConfigError, match=r"job.yaml: line 6: key 'cluster' is given twice \(first on line 3\)"):
        load_config(p)
    p.write_text("pool:\n  path: x.jsonl\n  path: y.jsonl\n")
    with pytest.raises(ConfigError, match="key 'path' is given twice"):
        load_config(p)


def test_run_dir_and_model_path_expand_the_home_folder(tmp_path):
    cfg = load_config(None, ["pool.path=x", "run_dir=~/quadsel-x", "model.path=~/m"])
    assert cfg.run_dir == os.path.expanduser("~/quadsel-x") and not cfg.run_dir.startswith("~")
    assert cfg.model.path == os.path.expanduser("~/m")


@pytest.mark.parametrize("given, want", [("bf16", "bfloat16"), ("fp16", "float16"), ("BF16", "bfloat16"),
                                         ("half", "float16"), ("fp32", "float32"), ("bfloat16", "bfloat16")])
def test_model_dtype_aliases(given, want):
    assert load_config(None, ["pool.path=x", f"model.dtype={given}"]).model.dtype == want


def test_empty_model_path_override_means_no_model(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("pool:\n  path: x\nmodel:\n  path: org/some-model\n")
    assert load_config(p).model.path == "org/some-model"
    assert load_config(p, ["model.path="]).model.path is None
    assert load_config(p, ["model.path=  "]).model.path is None


def test_budget_amount_override_replaces_a_fraction_from_the_yaml(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("pool:\n  path: x\nselection:\n  budget:\n    fraction: 0.2\n")
    b = load_config(p, ["selection.budget.amount=50"]).selection.budget
    assert (b.amount, b.fraction) == (50, None)
    p.write_text("pool:\n  path: x\nselection:\n  budget:\n    amount: 7\n")
    b = load_config(p, ["selection.budget.fraction=0.5"]).selection.budget
    assert (b.amount, b.fraction) == (None, 0.5)
    with pytest.raises(ConfigError, match="exactly one"):  # both on the command line: ambiguous
        load_config(p, ["selection.budget.fraction=0.5", "selection.budget.amount=3"])


@pytest.mark.parametrize("override, field", [
    ("selection.quad.tau=.nan", "selection.quad"), ("selection.quad.tau=.inf", "selection.quad"),
    ("selection.quad.alpha=-1", "selection.quad"), ("selection.quad.alpha=.nan", "selection.quad"),
    ("selection.quad.bogus=1", "selection.quad"), ("scorer.damping=.inf", "scorer.damping"),
    ("scorer.damping=.nan", "scorer.damping"), ("scorer.damping=-0.1", "scorer.damping"),
    ("seed=-1", "seed"), ("embed.seed=-1", "embed.seed"), ("cluster.seed=-3", "cluster.seed"),
    ("model.proxy.lr=.inf", "model.proxy.lr"), ("ray.num_cpus_per_actor=.nan", "ray.num_cpus_per_actor"),
    ("scorer.options.head_fraction=.nan", "scorer.options.head_fraction"),
    ("selection.budget.fraction=.nan", "selection.budget.fraction"),
])
def test_non_finite_negative_and_unknown_values_are_refused(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pool.path=x", override])
    assert field in str(e.value), str(e.value)


def test_unknown_quad_key_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"selection.quad: unknown key 'arms' \(QuadConfig fields: arms_per_round"):
        load_config(None, ["pool.path=x", "selection.quad.arms=3"])


# ------------------------------------------------------------------------- the check stage

def _job(tmp_path: Path, **over) -> Path:
    cfg = {"run_dir": str(tmp_path / "run"), "pool": {"path": str(_pool(tmp_path))},
           "embed": {"dim": 8}, "cluster": {"k": 3, "niter": 5},
           "selection": {"method": "random", "budget": {"amount": 10}}, "ray": {"enabled": False}}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_every_problem_in_one_message_before_anything_is_written(tmp_path, capsys):
    job = _job(tmp_path, **{"selection.method": "quad", "scorer.name": "ekfca", "model.device": "bogus",
                            "model.path": str(tmp_path / "no-model"),
                            "reference": {"path": str(tmp_path / "noref.jsonl")}})
    rc, _, err = _run(["run", str(job), "-q", "--progress", "quiet", "--address", "auto", "--no-ray"], capsys)
    assert rc == 2
    assert err.startswith("quadsel run: error: 5 problems found before running:"), err
    for s in ("reference.path", "noref.jsonl", "model.path", "no-model", "model.device: 'bogus' is not a device",
              "scorer.name: unknown scorer 'ekfca'", "ray.address is 'auto' (--address) but ray.enabled is false"):
        assert s in err, (s, err)
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    job = _job(tmp_path, **{"model.device": "cuda"})
    rc, _, err = _run(["run", str(job), "-q", "--progress", "quiet", "--set", "selection.budget.unit=tokens"],
                      capsys)
    assert rc == 2 and "model.device: 'cuda' but this machine has no usable CUDA device" in err, err


def test_pool_size_problems_come_before_any_expensive_stage(tmp_path, capsys):
    job = _job(tmp_path, **{"cluster.k": 50, "selection.budget.amount": 500})
    rc, _, err = _run(["run", str(job), "-q", "--progress", "quiet"], capsys)
    assert rc == 2 and "2 problems found before running" in err
    assert "cluster.k = 50 is larger than the pool (30 valid rows)" in err
    assert "selection.budget.amount = 500 examples is more than the pool holds (30 valid rows" in err
    assert not (tmp_path / "run" / "stages" / "embed").exists()  # stopped right after reading


def test_cluster_command_checks_k_before_embedding(tmp_path, capsys):
    job = _job(tmp_path, **{"cluster.k": 50})
    rc, _, err = _run(["cluster", str(job), "-q", "--progress", "quiet"], capsys)
    assert rc == 2 and "cluster.k = 50 is larger than the pool" in err
    assert not (tmp_path / "run" / "stages" / "embed").exists()


def test_a_pool_with_one_valid_row_is_refused(tmp_path, capsys):
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "only one"}) + "\n" + json.dumps({"id": "b", "text": ""}) + "\n")
    job = _job(tmp_path, **{"pool.path": str(p), "cluster.k": 1, "selection.budget.amount": 1})
    rc, _, err = _run(["run", str(job), "-q", "--progress", "quiet"], capsys)
    assert rc == 2 and "pool: 1 valid row(s); clustering and selection need at least 2" in err, err


def test_bad_quad_combination_is_found_up_front(tmp_path, capsys):
    job = _job(tmp_path, **{"selection.method": "quad", "scorer.name": "el2n",
                            "selection.quad": {"take_size": 2, "probe_size": 5}})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "selection.quad:" in err and "take_size (2) must be >= probe_size (5)" in err, err


def test_truncated_model_weights_are_found_up_front(tmp_path, capsys):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    (m / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    job = _job(tmp_path, **{"model.path": str(m), "selection.budget.unit": "tokens"})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "model.safetensors: truncated" in err, err
    (m / "config.json").unlink()
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "cannot load a causal LM" in err and "no config.json" in err


def test_config_check_runs_nothing(tmp_path):
    job = _job(tmp_path)
    r = subprocess.run([sys.executable, "-m", "quadsel", "config", "--check", str(job)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["ok"] and found["pool"]["rows"] == 30 and found["pool"]["files"] == 1
    assert not (tmp_path / "run").exists()
    r = subprocess.run([sys.executable, "-m", "quadsel", "config", "--check", str(job), "--set", "cluster.k=99",
                        "--set", "seed=-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "seed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "quadsel", "config", "--check", str(job), "--set", "cluster.k=99"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cluster.k = 99 is larger than the pool (30 valid rows)" in r.stderr


def test_pool_inside_the_run_dir_is_refused(tmp_path, capsys):
    job = _job(tmp_path, **{"pool.path": str(tmp_path / "run" / "selection")})
    (tmp_path / "run" / "selection").mkdir(parents=True)
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "is inside run_dir" in err, err


def test_no_field_is_nan_after_loading_defaults():
    cfg = load_config(None, ["pool.path=x"])

    def walk(o):
        if isinstance(o, float):
            assert math.isfinite(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
    walk(cfg.model_dump())


def test_more_cpus_per_actor_than_the_machine_has(tmp_path, capsys):
    job = _job(tmp_path, **{"selection.method": "quad", "scorer.name": "el2n", "ray.enabled": True,
                            "ray.num_cpus_per_actor": (os.cpu_count() or 1) * 50})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "ray.num_cpus_per_actor" in err and "no actor could ever be placed" in err, err


def test_token_budget_smaller_than_every_text(tmp_path, capsys):
    job = _job(tmp_path, **{"selection.budget": {"unit": "tokens", "amount": 1}, "model.max_length": 64,
                            "model.proxy": {"train_sample": 30, "vocab_size": 300, "hidden_size": 16,
                                            "num_layers": 1, "num_heads": 2, "steps": 2, "batch_size": 4}})
    rc, _, err = _run(["run", str(job), "-q", "--progress", "quiet"], capsys)
    assert rc == 2 and "less than the shortest text of the pool" in err, err


def test_an_unsupported_architecture_is_refused_before_any_stage(tmp_path, capsys):
    """Mixtral's experts are 3-D weights the gradient scorers cannot track: with layers=all that
    is one line up front, naming them, before the pool is even read."""
    from quadsel.influence.testing import tiny_arch_config

    m = tmp_path / "mixtral"
    m.mkdir()
    (m / "config.json").write_text(tiny_arch_config("mixtral").to_json_string())
    quad = {"selection.method": "quad", "reference.path": str(_pool(tmp_path))}
    job = _job(tmp_path, **{"model.path": str(m), "scorer.layers": "all", **quad})
    rc, _, err = _run(["run", str(job), "--no-ray", "-q"], capsys)
    assert rc == 2 and "scorer: " in err and "experts" in err, err
    assert not (tmp_path / "run" / "stages").exists()
    job = _job(tmp_path, **{"model.path": str(m), "scorer.layers": "attention", **quad})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert "experts" not in err and "scorer: " not in err, err


def test_scorer_modules_from_the_config_reach_the_scorer(tmp_path, capsys):
    from quadsel.influence.testing import tiny_arch_config
    from quadsel.jobs.config import load_config
    from quadsel.jobs.models import scorer_kwargs

    m = tmp_path / "llama"
    m.mkdir()
    (m / "config.json").write_text(tiny_arch_config("llama").to_json_string())
    quad = {"selection.method": "quad", "reference.path": str(_pool(tmp_path)), "model.path": str(m)}
    job = _job(tmp_path, **quad, **{"scorer.modules": [r".*\.q_proj"]})
    assert scorer_kwargs(load_config(str(job), []).scorer, 0)["modules"] == [r".*\.q_proj"]
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert "scorer: " not in err, err
    job = _job(tmp_path, **quad, **{"scorer.modules": ["no_such_module"]})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "scorer: " in err and "no_such_module" in err, err
    job = _job(tmp_path, **quad, **{"scorer.modules": ["x"], "scorer.name": "attention"})
    rc, _, err = _run(["config", "--check", str(job)], capsys)
    assert rc == 2 and "scorer.modules" in err and "no such option" in err, err
