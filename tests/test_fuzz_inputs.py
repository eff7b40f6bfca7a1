"""Bounded fuzz (issue 15): random config values and damaged input bytes give exit code 0 or 2
(or a SourceError naming the file), never a traceback. Seeded, so a failure reproduces."""
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
        n += 1
    assert n >= 20
    assert not (tmp_path / "run").exists()  # --check never writes


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
