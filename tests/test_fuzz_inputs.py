"""Bounded fuzz (issue 15): random config values and damaged input bytes give exit code 0 or 2
(or a SourceError naming the file), never a traceback; every fuzzed run that finishes leaves a
run dir that `quadsel verify` accepts. Seeded (QUADSEL_FUZZ_SEED shifts it), so a failure
reproduces; each test stops after TIME_LIMIT_S."""
from __future__ import annotations

import io
import json
import random
import time
import zlib

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import yaml

from quadsel.jobs.cli import main
from quadsel.pipeline.sources import RejectLog, SourceConfig, SourceError, iter_examples

TIME_LIMIT_S = 60
SEED_OFFSET = int(__import__("os").environ.get("QUADSEL_FUZZ_SEED", "0"))
ROWS = [{"id": f"r{i}", "text": f"some words for row {i} " * 3, "n": i, "tag": ["a", "b"][i % 2]}
        for i in range(60)]

# (field, generator of hostile values)
_VALUES = [None, "", "x", "many", -1, 0, 1, 2**63, -(2**63), 1e308, float("nan"), float("inf"), -float("inf"),
           0.5, -0.5, [], [1, "a"], {}, {"a": 1}, True, "~/x", "../../etc", "bf16", "cuda", "bogus"]
_FIELDS = ["seed", "run_dir", "pool.max_chars", "pool.batch_size", "pool.split", "pool.text_field", "pool.format",
           "embed.dim", "embed.seed", "embed.fit_sample", "cluster.k", "cluster.niter", "cluster.seed",
           "model.path", "model.device", "model.dtype", "model.max_length", "model.batch_size", "model.proxy.lr",
           "model.proxy.steps", "scorer.name", "scorer.damping", "scorer.layers", "scorer.options",
           "scorer.projection_dim", "scorer.fit_sample", "selection.method", "selection.budget.amount",
           "selection.budget.fraction", "selection.budget.unit", "selection.quad.tau", "selection.quad.alpha",
           "selection.quad.gamma", "selection.quad.probe_size", "selection.quad.take_size", "selection.quad",
           "selection.quad.nope", "ray.enabled", "ray.address", "ray.num_actors", "ray.num_cpus_per_actor",
           "output.format", "output.max_rows", "reference", "reference.path", "pool"]


def _set(cfg: dict, key: str, value) -> None:
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def test_config_fuzz_exit_0_or_2(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = {"run_dir": str(tmp_path / "run"), "pool": {"path": str(pool)}, "embed": {"dim": 8},
            "cluster": {"k": 3}, "selection": {"method": "random", "budget": {"amount": 10}},
            "ray": {"enabled": False}}
    rng = random.Random(1234 + SEED_OFFSET)
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < TIME_LIMIT_S and n < 150:
        cfg = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            _set(cfg, rng.choice(_FIELDS), rng.choice(_VALUES))
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        capsys.readouterr()
        rc = main(["config", "--check", str(job), "-q", "--progress", "quiet"])
        out, err = capsys.readouterr()
        assert rc in (0, 2), (cfg, err)
        assert "Traceback" not in err, (cfg, err)
        if rc == 2:
            assert err.startswith("quadsel config: error: "), (cfg, err)
        else:  # accepted: --check wrote nothing, so there is no manifest for `quadsel verify` to check
            assert not (tmp_path / "run" / "manifest.json").exists()
        n += 1
    assert n >= 20
    assert not (tmp_path / "run").exists()  # --check never writes


# fields a real run reads (no paths: a fuzzed run_dir or pool.path could write or read anywhere),
# each with values that are often valid, so that many runs finish and their run dir is verified
_RUN_FIELDS = {
    "seed": [0, 1, 7, -1, "x"],
    "pool.max_chars": [5, 40, 1500, 0, -1],
    "pool.overlong": ["truncate", "reject", "bogus"],
    "pool.batch_size": [1, 7, 64, 0],
    "pool.text_field": ["text", "tag", "nope"],
    "embed.dim": [2, 3, 8, 64, 0],
    "embed.fit_sample": [2, 10, 1000, 1],
    "embed.seed": [None, 3, -1],
    "cluster.k": [1, 2, 3, 7, 59, 60, 61],
    "cluster.niter": [1, 5, 0],
    "cluster.seed": [None, 5],
    "selection.budget.amount": [1, 10, 59, 60, 61, 0, None],
    "selection.budget.fraction": [0.01, 0.5, 1.0, 0.0, 1.5],
    "output.format": ["arrow", "parquet", "csv"],
    "output.max_rows": [1, 7, 1000, 0],
    "output.shuffle": [True, False, "maybe"],
}


@pytest.mark.slow
def test_run_fuzz_every_finished_run_dir_verifies(tmp_path, capsys):
    """Real runs (random selection, no model, no Ray) with fuzzed values, one after the other in
    the same run directory (each a rerun over the last one's state): exit 0 or 2 and never a
    traceback; after every exit 0, `quadsel verify` accepts the run dir."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_dir = tmp_path / "run"
    base = {"run_dir": str(run_dir), "pool": {"path": str(pool)}, "embed": {"dim": 8},
            "cluster": {"k": 3}, "selection": {"method": "random", "budget": {"amount": 10}},
            "ray": {"enabled": False}}
    rng = random.Random(4321 + SEED_OFFSET)
    t0, n, ok = time.monotonic(), 0, 0
    while time.monotonic() - t0 < TIME_LIMIT_S and n < 25:
        cfg = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(sorted(_RUN_FIELDS))
            value = rng.choice(_RUN_FIELDS[field])
            _set(cfg, field, value)
            if field == "selection.budget.fraction":  # amount or fraction: one of them
                cfg["selection"]["budget"].pop("amount", None)
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        capsys.readouterr()
        rc = main(["run", str(job), "-q", "--progress", "quiet"])
        out, err = capsys.readouterr()
        assert rc in (0, 2), (cfg, err)
        assert "Traceback" not in err, (cfg, err)
        if rc == 2:
            assert err.startswith("quadsel run: error: "), (cfg, err)
        else:
            ok += 1
            rc = main(["verify", str(run_dir), "-q"])
            out, err = capsys.readouterr()
            assert rc == 0 and json.loads(out)["ok"], (cfg, err)
        n += 1
    assert n >= 5 and ok >= 2, (n, ok)


def _files() -> dict[str, bytes]:
    t = pa.Table.from_pylist(ROWS)
    out = {"pool.jsonl": "".join(json.dumps(r) + "\n" for r in ROWS).encode()}
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=20)
    out["pool.parquet"] = buf.getvalue()
    for name, new in (("file.arrow", ipc.new_file), ("stream.arrow", ipc.new_stream)):
        sink = pa.BufferOutputStream()
        with new(sink, t.schema) as w:
            for b in t.to_batches(max_chunksize=20):
                w.write_batch(b)
        out[name] = sink.getvalue().to_pybytes()
    return out


@pytest.mark.parametrize("name", ["pool.jsonl", "pool.parquet", "file.arrow", "stream.arrow"])
def test_damaged_input_bytes_are_rows_rejects_or_a_named_error(tmp_path, name):
    data = _files()[name]
    rng = random.Random(zlib.crc32(name.encode()) + SEED_OFFSET)
    t0 = time.monotonic()
    for i in range(60):
        if time.monotonic() - t0 > TIME_LIMIT_S / 4:
            break
        b = bytearray(data)
        how = rng.choice(["truncate", "flip", "flips", "zero"])
        if how == "truncate":
            b = b[: rng.randrange(len(b))]
        elif how == "flip":
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif how == "flips":
            for _ in range(8):
                b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            a = rng.randrange(len(b))
            b[a:a + 64] = bytes(len(b[a:a + 64]))
        if not b:
            continue  # an empty file is read as no rows (logged), like any empty input
        p = tmp_path / f"{i}-{name}"
        p.write_bytes(bytes(b))
        rejects = RejectLog(None)
        try:
            got = list(iter_examples(SourceConfig(path=str(p), batch_size=16), rejects))
        except SourceError as e:
            assert p.name in str(e), str(e)
            continue
        # read: every row is either kept or a counted reject (nothing vanishes silently)
        if name == "pool.jsonl":
            lines = [x for x in bytes(b).split(b"\n") if x.strip()]
            assert len(got) + rejects.total == len(lines), (how, len(got), rejects.counts)
        else:
            assert len(got) + rejects.total == len(ROWS), (how, len(got), rejects.counts)
