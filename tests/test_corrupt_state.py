"""Corrupted state on resume (issue 15): every state and cache file of a killed (and a finished)
run, truncated, emptied, bit-flipped or edited by hand, then resumed: the run ends in the
byte-identical selection (the damaged file is noticed by its checksum and recomputed) or in a
one-line error naming the file; never a traceback, never a silently different selection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import small_job

from quadsel.jobs.cli import main
from quadsel.jobs.config import load_config
from quadsel.jobs.run_job import run_selection
from quadsel.pipeline.shards import data_files, verify

Q = ["-q", "--progress", "quiet"]


def _shards(run_dir: Path) -> dict[str, bytes]:
    return {Path(f).name: Path(f).read_bytes() for f in data_files(run_dir)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    cfg = small_job(root, relative=False)
    cfg["run_dir"] = str(root / "full")
    (root / "full.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(root / "full.yaml"), *Q]) == 0
    killed = dict(cfg, run_dir=str(root / "killed"))
    (root / "killed.yaml").write_text(yaml.safe_dump(killed))
    out = run_selection(load_config(root / "killed.yaml"), stop_after_round=2)
    assert out == {"stopped_after_round": 2}
    return {"root": root, "full": root / "full", "killed": root / "killed", "cfg": cfg,
            "shards": _shards(root / "full")}


def _largest(folder: Path) -> Path:
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != "_DONE.json"]
    return max(files, key=lambda f: (f.stat().st_size, str(f)))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: max(0, f.stat().st_size // 2)])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _edit_state(f: Path) -> None:
    """Valid JSON, plausible content, one number changed by hand."""
    state = json.loads(f.read_text())
    state["selector"]["used"] += 1
    f.write_text(json.dumps(state))


def _drop_row(f: Path) -> None:
    state = json.loads(f.read_text())

    def drop(o):  # drop one element of the first non-empty list found
        if isinstance(o, list) and o:
            o.pop()
            return True
        if isinstance(o, dict):
            return any(drop(v) for v in o.values())
        return False
    assert drop(state["selector"])
    f.write_text(json.dumps(state))


TARGETS = {
    "state": lambda d: d / "bandit" / "state.json",
    "sources-store": lambda d: _largest(d / "stages" / "sources" / "store"),
    "store-index": lambda d: d / "stages" / "sources" / "store" / "index.json",
    "embed": lambda d: _largest(d / "stages" / "embed"),
    "cluster": lambda d: _largest(d / "stages" / "cluster"),
    "cluster-marker": lambda d: d / "stages" / "cluster" / "_DONE.json",
    "proxy-weights": lambda d: _largest(d / "stages" / "proxy"),
    "scorer": lambda d: _largest(d / "stages" / "scorer"),
}

CASES = [
    ("killed", "state", _truncate), ("killed", "state", _empty), ("killed", "state", _edit_state),
    ("killed", "state", _drop_row), ("killed", "sources-store", _flip), ("killed", "store-index", _truncate),
    ("killed", "embed", _truncate), ("killed", "cluster", _flip), ("killed", "cluster-marker", _truncate),
    ("killed", "proxy-weights", _truncate), ("killed", "scorer", _flip),
    ("full", "scorer", _truncate), ("full", "cluster", _truncate),
]


@pytest.mark.parametrize("which, target, damage", CASES,
                         ids=[f"{w}-{t}-{d.__name__.strip('_')}" for w, t, d in CASES])
def test_damaged_file_is_recomputed_or_named(runs, tmp_path, capsys, which, target, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[which], run_dir)
    f = TARGETS[target](run_dir)
    assert f.is_file(), f
    damage(f)
    cfg = dict(runs["cfg"], run_dir=str(run_dir))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["run", str(tmp_path / "job.yaml"), *Q])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 2:
        lines = [x for x in err.splitlines() if x.startswith("quadsel run: error: ")]
        assert len(lines) == 1 and f.name in lines[0], err
        return
    assert rc == 0, err
    verify(run_dir)
    assert _shards(run_dir) == runs["shards"]  # byte-identical to the uninterrupted run
