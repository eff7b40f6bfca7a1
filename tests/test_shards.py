"""quadsel.pipeline.shards: round trips through `datasets`, manifest, determinism, crash safety."""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from quadsel.core.atomic import sha256_file
from quadsel.pipeline import shards
from quadsel.pipeline.shards import (
    ManifestError,
    SchemaMismatchError,
    ShardConfig,
    ShardWriter,
    data_files,
    read_manifest,
    recover,
    selection_schema,
    verify,
)

REPO = Path(__file__).resolve().parents[1]

POOL_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("n_tokens", pa.int64()),
    ("quality", pa.float32()),
    ("flag", pa.bool_()),
    ("tags", pa.list_(pa.string())),
    ("source", pa.struct([("name", pa.string()), ("line", pa.int64())])),
    ("fetched", pa.timestamp("s")),
])
SCHEMA = selection_schema(POOL_SCHEMA)
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "
         "ünïcødé 数据 ✓").split()


def make_table(n: int, offset: int = 0, tag: str = "a") -> pa.Table:
    rows = []
    for i in range(offset, offset + n):
        k = (i * 7919) % 97
        rows.append({
            "id": f"{tag}-{i:05d}",
            "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + k)),
            "n_tokens": 5 + k,
            "quality": None if i % 5 == 0 else float(k) / 4.0,
            "flag": i % 2 == 0,
            "tags": [WORDS[i % len(WORDS)]] * (i % 3),
            "source": None if i % 11 == 0 else {"name": f"file{i % 4}.jsonl", "line": i},
            "fetched": dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i),
            "quadsel_cluster": i % 13,
            "quadsel_score": None if i % 4 == 0 else (k - 40) / 9.0,
            "quadsel_round": i // 50,
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_selection(run, table: pa.Table, cfg: ShardConfig, *, chunk: int = 37,
                    config_hash: str = "cfg0", extra: dict | None = None) -> dict:
    with ShardWriter(run, cfg, schema=SCHEMA, seed=7, config_hash=config_hash,
                     extra=extra or {"selected": table.num_rows}) as w:
        for off in range(0, table.num_rows, chunk):
            w.write(table.slice(off, chunk))
    return read_manifest(run)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under the run dir (the writer's lock file aside), by relative path."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def leftovers(run: Path) -> list[str]:
    pats = [".selection.tmp-*", ".selection.old-*", ".manifest.json.old-*", ".tmp-*"]
    found = [p.name for pat in pats for p in run.glob(pat)]
    if (run / "selection").is_dir():
        found += [p.name for p in (run / "selection").glob(".tmp-*")]
    return found


def read_shard(path: str) -> pa.Table:
    if path.endswith(".parquet"):
        return pq.read_table(path)
    with pa.memory_map(path) as mm:
        return ipc.open_file(mm).read_all()


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
@pytest.mark.parametrize("cap", ["rows", "bytes"])
def test_roundtrip_through_datasets(tmp_path, fmt, cap):
    table = make_table(400)
    if cap == "rows":
        cfg = ShardConfig(format=fmt, max_rows=90, max_bytes=None, batch_rows=32)
    else:
        cfg = ShardConfig(format=fmt, max_rows=None, max_bytes=40_000, batch_rows=64)
    run = tmp_path / "run"
    manifest = write_selection(run, table, cfg)
    files = data_files(run)
    assert len(files) >= 3 and manifest["total_rows"] == 400
    for f in files:
        shard = read_shard(f)
        if fmt == "arrow":
            assert shard.schema.equals(SCHEMA)
        else:  # Parquet's own rules: timestamp[s] is stored as ms, list items are "element"
            assert shard.column_names == SCHEMA.names
        if cap == "rows":
            assert shard.num_rows <= 90
        else:
            assert shard.nbytes <= 40_000 * 1.02
    if cap == "rows":
        assert [s["rows"] for s in manifest["shards"]] == [90, 90, 90, 90, 40]

    expected = table.to_pylist()
    ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == 400
    assert ds.to_list() == expected
    streamed = datasets.load_dataset(fmt, data_files=files, split="train", streaming=True)
    assert list(streamed) == expected
    assert [r["quadsel_score"] for r in expected].count(None) == 100  # nulls survive


def test_max_rows_is_exact_for_one_big_table(tmp_path):
    table = make_table(1000)
    manifest = write_selection(tmp_path, table, ShardConfig(max_rows=128, max_bytes=None,
                                                            batch_rows=50), chunk=1000)
    assert [s["rows"] for s in manifest["shards"]] == [128] * 7 + [104]
    with pa.memory_map(data_files(tmp_path)[0]) as mm:
        reader = ipc.open_file(mm)
        assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == \
            [50, 50, 28]


def test_oversized_row_goes_alone(tmp_path):
    table = make_table(30)
    big = table.slice(10, 1).to_pylist()[0] | {"text": "x" * 20_000}
    rows = table.to_pylist()
    rows[10] = big
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    manifest = write_selection(tmp_path, table, ShardConfig(max_rows=None, max_bytes=4_000),
                               chunk=7)
    got = [read_shard(f) for f in data_files(tmp_path)]
    alone = [t for t in got if t.num_rows == 1 and t.column("text")[0].as_py() == "x" * 20_000]
    assert len(alone) == 1
    assert pa.concat_tables(got).to_pylist() == table.to_pylist()
    assert manifest["total_rows"] == 30


def test_empty_selection_keeps_the_schema(tmp_path):
    manifest = write_selection(tmp_path, make_table(0), ShardConfig())
    assert manifest["total_rows"] == 0 and len(manifest["shards"]) == 1
    verify(tmp_path)
    assert read_shard(data_files(tmp_path)[0]).schema.equals(SCHEMA)


# ------------------------------------------------------------------ manifest

def test_manifest_contents(tmp_path):
    table = make_table(300)
    run = tmp_path / "run"
    m = write_selection(run, table, ShardConfig(max_rows=100, compression="zstd"),
                        config_hash="deadbeef", extra={"clusters": 13, "rejected": 0})
    assert m["format"] == "arrow" and m["compression"] == "zstd"
    assert m["seed"] == 7 and m["config_hash"] == "deadbeef"
    assert m["extra"] == {"clusters": 13, "rejected": 0}
    assert m["quadsel_version"] not in ("", None)
    assert [s["path"] for s in m["shards"]] == [f"selection/part-0000{i}.arrow" for i in range(3)]
    assert sum(s["rows"] for s in m["shards"]) == m["total_rows"] == 300
    for s, f in zip(m["shards"], data_files(run)):
        assert Path(f).is_absolute() and Path(f) == run.resolve() / s["path"]
        assert sha256_file(f) == s["sha256"]
        assert os.path.getsize(f) == s["bytes"]
    assert m["total_bytes"] == sum(s["bytes"] for s in m["shards"])
    assert m["schema"][-3:] == [
        {"name": "quadsel_cluster", "type": "int32", "nullable": False},
        {"name": "quadsel_score", "type": "double", "nullable": True},
        {"name": "quadsel_round", "type": "int32", "nullable": False},
    ]
    assert {"name": "tags", "type": "list<item: string>", "nullable": True} in m["schema"]
    assert set(m) == {"manifest_version", "format", "compression", "subdir", "shards",
                      "total_rows", "total_bytes", "schema", "shard_config", "quadsel_version",
                      "seed", "config_hash", "extra"}  # nothing about when or where
    assert socket.gethostname() not in (run / "manifest.json").read_text()
    # the generation carries an identical copy, usable as a manifest path too
    inner = run / "selection" / "manifest.json"
    assert inner.read_bytes() == (run / "manifest.json").read_bytes()
    assert data_files(run / "selection" / "manifest.json") == data_files(run)
    verify(run)
    verify(run / "manifest.json")


@pytest.mark.parametrize("fmt,compression", [("arrow", "none"), ("arrow", "zstd"),
                                             ("parquet", "zstd"), ("parquet", "lz4")])
def test_same_input_gives_byte_identical_output(tmp_path, fmt, compression):
    table = make_table(500)
    cfg = ShardConfig(format=fmt, compression=compression, max_rows=120, max_bytes=50_000,
                      batch_rows=40)
    a, b = tmp_path / "a", tmp_path / "b"
    write_selection(a, table, cfg)
    write_selection(b, table, cfg)
    assert snapshot(a) == snapshot(b)
    assert len(snapshot(a)) >= 5
    write_selection(a, table, cfg)  # a rerun into the same run dir too
    assert snapshot(a) == snapshot(b)


# ------------------------------------------------------------------ validation

def test_schema_mismatch_names_the_column(tmp_path):
    table = make_table(20)
    with ShardWriter(tmp_path, ShardConfig(), schema=SCHEMA, seed=0, config_hash="x") as w:
        bad = table.set_column(SCHEMA.get_field_index("quadsel_score"), "quadsel_score",
                               pa.array(["high"] * 20))
        with pytest.raises(SchemaMismatchError, match="'quadsel_score'.*double.*string"):
            w.write(bad)
        with pytest.raises(SchemaMismatchError, match="missing column.*'quadsel_round'"):
            w.write(table.drop_columns(["quadsel_round"]))
        with pytest.raises(SchemaMismatchError, match="unexpected column.*'domain'"):
            w.write(table.append_column("domain", pa.array(["web"] * 20)))
        nulls = table.set_column(SCHEMA.get_field_index("quadsel_cluster"),
                                 SCHEMA.field("quadsel_cluster"),
                                 pa.array([None] * 20, pa.int32()))
        with pytest.raises(SchemaMismatchError, match="'quadsel_cluster'.*null"):
            w.write(nulls)
        # a bad batch leaves the writer usable; column order and all-null columns are fine
        reordered = table.select(list(reversed(table.column_names)))
        w.write(reordered.to_batches()[0])
        w.write(table.set_column(SCHEMA.get_field_index("quadsel_score"), "quadsel_score",
                                 pa.nulls(20)))
    assert read_manifest(tmp_path)["total_rows"] == 40
    with pytest.raises(SchemaMismatchError, match="'quadsel_round'"):
        selection_schema(pa.schema([("text", pa.string()), ("quadsel_round", pa.string())]))
    assert selection_schema(SCHEMA).equals(SCHEMA)


def test_verify_detects_tampering(tmp_path):
    write_selection(tmp_path, make_table(200), ShardConfig(max_rows=80))
    verify(tmp_path)
    first = Path(data_files(tmp_path)[1])
    original = first.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    first.write_bytes(bytes(flipped))
    with pytest.raises(ManifestError, match="part-00001.arrow sha256 mismatch"):
        verify(tmp_path)
    first.write_bytes(original[:-10])
    with pytest.raises(ManifestError, match="part-00001.arrow has .* bytes"):
        verify(tmp_path)
    first.unlink()
    with pytest.raises(ManifestError, match="part-00001.arrow is missing"):
        verify(tmp_path)
    first.write_bytes(original)
    verify(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["rows"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="rows"):
        verify(tmp_path)
    with pytest.raises(ManifestError, match="no manifest"):
        verify(tmp_path / "nowhere")


def test_one_writer_at_a_time(tmp_path):
    with ShardWriter(tmp_path, ShardConfig(), schema=SCHEMA, seed=0, config_hash="x"):
        with pytest.raises(ManifestError, match="another writer"):
            ShardWriter(tmp_path, ShardConfig(), schema=SCHEMA, seed=0, config_hash="x")
    ShardWriter(tmp_path, ShardConfig(), schema=SCHEMA, seed=0, config_hash="x").close()


# ------------------------------------------------------------------ failure and crash safety

def test_exception_inside_writer_changes_nothing(tmp_path):
    write_selection(tmp_path, make_table(100), ShardConfig(max_rows=30))
    before = snapshot(tmp_path)
    with pytest.raises(KeyError):
        with ShardWriter(tmp_path, ShardConfig(max_rows=30), schema=SCHEMA, seed=1,
                         config_hash="y") as w:
            w.write(make_table(100, tag="b"))
            raise KeyError("boom")
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)
    verify(tmp_path)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_shards import make_table, SCHEMA
    from quadsel.pipeline.shards import ShardConfig, ShardWriter
    run, marker = sys.argv[1], sys.argv[2]
    table = make_table(200, tag="b")
    w = ShardWriter(run, ShardConfig(max_rows=25, max_bytes=None, batch_rows=5),
                    schema=SCHEMA, seed=1, config_hash="b")
    for off in range(0, 200, 10):
        w.write(table.slice(off, 10))
        if off == 60:  # 70 rows: two shards done, the third half-written
            open(marker, "w").close()
            time.sleep(120)
    w.close()
""")


@pytest.mark.parametrize("previous", [True, False])
def test_killed_writer_leaves_nothing_partial(tmp_path, previous):
    run, marker = tmp_path / "run", tmp_path / "paused"
    if previous:
        write_selection(run, make_table(100), ShardConfig(max_rows=30))
    before = snapshot(run) if run.exists() else {}
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", script, str(run), str(marker)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "writer never reached the pause"
            time.sleep(0.05)
        (tmp,) = run.glob(".selection.tmp-*")  # mid-generation: 2 shards and a partial one
        assert sorted(p.name for p in tmp.glob("part-*")) == ["part-00000.arrow",
                                                              "part-00001.arrow"]
        assert list(tmp.glob(".tmp-part-00002.arrow.*"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    if previous:
        verify(run)  # the previous complete selection, untouched
        assert {k: v for k, v in snapshot(run).items() if not k.startswith(".selection.tmp-")} \
            == before
    else:
        assert not (run / "manifest.json").exists()
        with pytest.raises(ManifestError):
            read_manifest(run)
    assert leftovers(run)  # the killed writer's temp folder is still there ...

    manifest = write_selection(run, make_table(200, tag="b"), ShardConfig(max_rows=25))
    assert not leftovers(run)  # ... until the rerun cleans it
    verify(run)
    assert manifest["total_rows"] == 200 and len(manifest["shards"]) == 8
    assert sorted(p.name for p in (run / "selection").iterdir()) == \
        ["manifest.json"] + [f"part-{i:05d}.arrow" for i in range(8)]


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs (no cleanup, no rollback)."""


DESTRUCTIVE = [(os, "rename"), (os, "replace"), (os, "unlink"), (shutil, "rmtree")]
RENAMES = [(os, "rename"), (os, "replace")]


@contextlib.contextmanager
def filesystem_ops(fail_at: int | None = None, exc_factory=None, die: bool = False,
                   ops=DESTRUCTIVE):
    """Count calls of ``ops`` (module, name); make the fail_at-th one raise.

    With ``die`` every later one raises too, as if the process had been killed there.
    """
    log: list[tuple[str, tuple]] = []
    dead = [False]
    saved = [(mod, name, getattr(mod, name)) for mod, name in ops]

    def wrap(real, name):
        def op(*args, **kwargs):
            if dead[0]:
                raise _Crash()
            log.append((name, args))
            if fail_at is not None and len(log) == fail_at:
                dead[0] = die
                raise exc_factory()
            return real(*args, **kwargs)
        return op

    for mod, name, real in saved:
        setattr(mod, name, wrap(real, name))
    try:
        yield log
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


def _rewrite(run: Path, table: pa.Table) -> ShardWriter:
    w = ShardWriter(run, ShardConfig(max_rows=40, batch_rows=16), schema=SCHEMA, seed=2,
                    config_hash="new")
    w.write(table)
    w.close()
    return w


def test_crash_at_every_filesystem_step_is_recoverable(tmp_path):
    old_table, new_table = make_table(90), make_table(100, tag="b")
    cfg = ShardConfig(max_rows=40, batch_rows=16)

    dry = tmp_path / "dry"
    write_selection(dry, old_table, cfg)
    with filesystem_ops() as log:
        _rewrite(dry, new_table)
    names = [(op, Path(a[0]).name, Path(a[1]).name if len(a) > 1 else "") for op, a in log]
    install = next(i for i, (op, src, dst) in enumerate(names, 1)
                   if src.startswith(".selection.tmp-") and dst == "selection")
    assert len(names) >= install + 2  # publish the manifest, clean up after it

    for k in range(1, len(names) + 1):
        run = tmp_path / f"k{k}"
        write_selection(run, old_table, cfg)
        old_manifest = (run / "manifest.json").read_bytes()
        w = None
        with filesystem_ops(k, _Crash, die=True):
            with pytest.raises(_Crash):
                w = ShardWriter(run, cfg, schema=SCHEMA, seed=2, config_hash="new")
                w.write(new_table)
                w.close()
        if w is not None:
            w._lock.release()  # the kernel would drop a dead process's lock

        # what a reader sees right after the crash: no manifest, or a complete one
        if (run / "manifest.json").exists():
            verify(run)
        recover(run)
        verify(run)
        assert not leftovers(run), (k, names[k - 1], leftovers(run))
        got = read_manifest(run)
        expect_new = k > install
        assert got["config_hash"] == ("new" if expect_new else "cfg0"), (k, names[k - 1])
        if not expect_new:
            assert (run / "manifest.json").read_bytes() == old_manifest
        rows = pa.concat_tables([read_shard(f) for f in data_files(run)])
        assert rows.equals(new_table if expect_new else old_table)
        _rewrite(run, new_table)  # and a rerun just works
        verify(run)


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _count_fs_ops(tmp_path) -> int:
    run = tmp_path / "count"
    write_selection(run, make_table(90), ShardConfig(max_rows=40, batch_rows=16))
    with filesystem_ops(ops=RENAMES) as log:
        _rewrite(run, make_table(100, tag="b"))
    return len(log)


@pytest.mark.parametrize("where", ["shard-write", "fsync", "generation-manifest",
                                   "top-manifest", "every-rename"])
def test_disk_full_leaves_previous_state_valid(tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    write_selection(run, make_table(90), ShardConfig(max_rows=40, batch_rows=16))
    before = snapshot(run)
    new_table = make_table(100, tag="b")

    def check_unchanged():
        verify(run)
        assert snapshot(run) == before
        assert not leftovers(run)

    if where == "every-rename":
        n = _count_fs_ops(tmp_path)
        for k in range(1, n + 1):
            with filesystem_ops(k, _enospc, ops=RENAMES):
                if k < n:
                    with pytest.raises(OSError) as info:
                        _rewrite(run, new_table)
                else:  # the last rename is the dataset card's, after the commit: derived data
                    _rewrite(run, new_table)
            if k < n:
                assert info.value.errno == errno.ENOSPC
                check_unchanged()
        # the new selection is live; its card still names the previous one until recover() (run
        # by every writer and every quadsel command on the run dir) writes it again
        verify(run)
        assert shards.card_generation(read_manifest(run)) not in (run / "README.md").read_text()
        recover(run)
        assert shards.card_generation(read_manifest(run)) in (run / "README.md").read_text()
    else:
        if where == "shard-write":
            real, written = shards._HashingSink.write, [0]

            def write(self, data):
                written[0] += len(memoryview(data).cast("B"))
                if written[0] > 9_000:  # somewhere in the second or third shard
                    raise _enospc()
                return real(self, data)
            monkeypatch.setattr(shards._HashingSink, "write", write)
        elif where == "fsync":
            real_fsync, calls = os.fsync, [0]

            def fsync(fd):
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    calls[0] += 1
                if calls[0] == 2:  # the second shard file
                    raise _enospc()
                return real_fsync(fd)
            monkeypatch.setattr(os, "fsync", fsync)
        elif where == "generation-manifest":
            def fail(*args, **kwargs):
                raise _enospc()
            monkeypatch.setattr(shards.writer, "atomic_write_json", fail)  # the generation manifest
        elif where == "top-manifest":
            real_wb = Path.write_bytes

            def write_bytes(self, data):
                if self.name.startswith(".tmp-manifest.json"):
                    raise _enospc()
                return real_wb(self, data)
            monkeypatch.setattr(Path, "write_bytes", write_bytes)
        with pytest.raises(OSError) as info:
            _rewrite(run, new_table)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        check_unchanged()

    _rewrite(run, new_table)  # space is back: the rewrite goes through
    verify(run)
    assert read_manifest(run)["config_hash"] == "new"
    assert pa.concat_tables([read_shard(f) for f in data_files(run)]).equals(new_table)


def test_recover_publishes_or_rolls_back(tmp_path):
    write_selection(tmp_path, make_table(60), ShardConfig(max_rows=25))
    published = (tmp_path / "manifest.json").read_bytes()
    assert recover(tmp_path) == "ok"
    (tmp_path / "manifest.json").unlink()  # killed between withdrawing and publishing
    assert recover(tmp_path).startswith("published")
    assert (tmp_path / "manifest.json").read_bytes() == published
    (tmp_path / "manifest.json").unlink()  # killed with the live folder set aside
    os.rename(tmp_path / "selection", tmp_path / ".selection.old-abc")
    assert recover(tmp_path) == "moved .selection.old-abc back to selection; published " \
        "selection/manifest.json"
    assert (tmp_path / "manifest.json").read_bytes() == published
    verify(tmp_path)
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------ write order and dataset card

def test_write_order_is_a_seeded_permutation():
    import numpy as np

    from quadsel.pipeline.shards import write_order

    keys = np.arange(1000, dtype=np.int64) * 3 + 11  # pool positions of a selection
    a = write_order(keys, 0)
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, write_order(keys, 0))  # deterministic
    np.testing.assert_array_equal(a, write_order(list(keys), 0))
    assert not np.array_equal(a, write_order(keys, 1))  # the seed matters
    assert not np.array_equal(a, np.arange(1000))  # and it is shuffled
    # a function of each row's key: the relative order of two rows never depends on the others
    sub = keys[::7]
    pos = {int(k): i for i, k in enumerate(keys[a])}
    assert [pos[int(k)] for k in sub[write_order(sub, 0)]] == sorted(pos[int(k)] for k in sub)
    # known values pin the hash (no numpy RNG stream involved: the same on every version)
    assert write_order([5, 3, 9, 1, 0], 0).tolist() == [1, 2, 4, 0, 3]
    assert write_order([], 0).tolist() == []
    assert ShardConfig().shuffle is True


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_load_dataset_on_the_run_dir_is_the_selection(tmp_path, fmt):
    run = tmp_path / "run"
    table = make_table(230)
    write_selection(run, table, ShardConfig(format=fmt, max_rows=20))  # 12 shards: order matters
    # the run directory's other parquet / arrow files, which load_dataset(run) must not read
    (run / "clusters").mkdir()
    pq.write_table(pa.table({"cluster": [0, 1], "size": [3, 4]}), run / "clusters" / "summary.parquet")
    (run / "bandit").mkdir()
    pq.write_table(pa.table({"row": [1]}), run / "bandit" / "probes.parquet")
    (run / "stages" / "sources").mkdir(parents=True)
    with ipc.new_file(str(run / "stages" / "sources" / "part-00000.arrow"), pa.schema([("x", pa.int8())])) as w:
        w.write_table(pa.table({"x": pa.array([1], pa.int8())}))
    card = (run / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n") and f"path: selection/part-*.{fmt}" in card
    ds = datasets.load_dataset(str(run), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.to_list() == table.to_pylist()
    assert list(datasets.load_dataset(str(run), split="train", streaming=True)) == table.to_pylist()


def test_load_dataset_never_reads_another_selection_from_its_cache(tmp_path):
    """datasets caches by folder name and config: runs/a/run and runs/b/run, and a run dir after
    a new selection, each read back as themselves through one cache."""
    cache = str(tmp_path / "cache")
    first, second = make_table(30, tag="a"), make_table(40, offset=100, tag="b")
    write_selection(tmp_path / "a" / "run", first, ShardConfig(max_rows=20))
    write_selection(tmp_path / "b" / "run", second, ShardConfig(max_rows=20))
    assert datasets.load_dataset(str(tmp_path / "a" / "run"), split="train", cache_dir=cache).to_list() \
        == first.to_pylist()
    assert datasets.load_dataset(str(tmp_path / "b" / "run"), split="train", cache_dir=cache).to_list() \
        == second.to_pylist()
    third = make_table(10, offset=500, tag="c")
    write_selection(tmp_path / "a" / "run", third, ShardConfig(max_rows=20))
    assert datasets.load_dataset(str(tmp_path / "a" / "run"), split="train", cache_dir=cache).to_list() \
        == third.to_pylist()


def test_dataset_card_follows_the_format_and_is_repaired(tmp_path):
    run = tmp_path / "run"
    write_selection(run, make_table(50), ShardConfig(max_rows=20))
    card = run / "README.md"
    def card_for(fmt):  # named after the published selection's content
        return shards.dataset_card(fmt, "selection", shards.card_generation(read_manifest(run)))

    assert card.read_text() == card_for("arrow")
    write_selection(run, make_table(50), ShardConfig(format="parquet", max_rows=20))
    assert card.read_text() == card_for("parquet")
    card.unlink()  # killed between publishing the manifest and writing the card
    (run / ".tmp-README.md.xyz").write_text("half")  # or while writing it
    assert recover(run) == "ok"  # the manifest was fine; the card is derived data
    assert card.read_text() == card_for("parquet") and not leftovers(run)
    # another manifest name in the same run dir leaves the card alone
    with ShardWriter(run, ShardConfig(), schema=SCHEMA, seed=0, config_hash="x", subdir="other",
                     manifest_name="other.json") as w:
        w.write(make_table(5))
    assert card.read_text() == card_for("parquet")
