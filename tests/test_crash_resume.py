"""kill -9 of a real ``quadsel run`` at seeded points in every stage, then resume.

The driver is a subprocess (``python -m jobs.cli run job.yaml``) killed by the fault hook
(``QUADSEL_FAULT=point:n``, ``quadsel.core.faults``): SIGKILL at the n-th time it reaches a named
point, so no ``finally`` or atexit runs, exactly as with ``kill -9``. Points cover sources
(mid-read), embed (mid-stage), cluster, proxy training, scorer fit, every part of a
bandit round (mid-scoring, before / after the state is saved), shard writing (between shards,
inside the commit) and the summary. The hit counts n are drawn from a
seeded RNG within each point's range; a run killed at one point is resumed into the next kill,
so one chain visits them all at the cost of about one full run, and the final resume must give
a manifest and shards byte-identical to an uninterrupted run. After every kill the run
directory must be in a valid state: ``manifest.json`` absent or verifying, and no stage folder
without its completion marker.

A second chain reruns a finished run directory with a changed config (budget, scorer), killed
while the outdated scorer stage is set aside and while the old manifest is withdrawn; and a
disk-full error (ENOSPC, injected into the shard writer) in such a rerun must leave the
previous manifest and shards verifying and unchanged.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_job

from quadsel.jobs.cli import main
from quadsel.pipeline.shards import data_files, recover, verify

pytestmark = pytest.mark.slow

SEED = 7
# the job of every run here: the small job, with more batches / shards to kill inside
OVERRIDES = {"pool.batch_size": 128, "embed.batch_size": 256, "output.max_rows": 16,
             "model.proxy.steps": 8}
CHANGED = {"selection.budget.amount": 50, "scorer.fit_sample": 20}  # the rerun of chain B


def _outputs(run_dir: Path) -> dict[str, bytes]:
    files = [run_dir / "manifest.json", *map(Path, data_files(run_dir))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files}


def _write_job(root: Path, data: Path, **extra) -> Path:
    cfg = small_job(data.parent, **OVERRIDES, **extra)  # absolute data paths: caches are portable
    cfg["run_dir"] = "run"  # relative: the same config in every folder
    path = root / "job.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _quadsel(root: Path, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("QUADSEL_FAULT", None)
    if fault:
        env["QUADSEL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "quadsel", "run", "job.yaml", "-q", "--progress", "quiet"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_valid_state(run_dir: Path) -> None:
    """What a kill may leave: no manifest, or one that verifies; stages complete or absent."""
    if (run_dir / "manifest.json").exists():
        verify(run_dir)
    for stage in (run_dir / "stages").glob("*"):
        if stage.is_dir() and "." not in stage.name:
            assert (stage / "_DONE.json").is_file(), stage


def _kill_at(root: Path, point: str, n: int) -> None:
    proc = _quadsel(root, f"{point}:{n}")
    assert proc.returncode == -signal.SIGKILL, (point, n, proc.returncode, proc.stderr[-2000:])
    assert f"SIGKILL at {point}:{n}" in proc.stderr
    _assert_valid_state(root / "run")


def _run_in_process(root: Path) -> None:
    """An uninterrupted run in this process (saves a Python start; same bytes as a subprocess)."""
    old = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", "job.yaml", "-q", "--progress", "quiet"]) == 0
    finally:
        os.chdir(old)


def _rounds_done(run_dir: Path) -> int:
    state = run_dir / "bandit" / "state.json"
    return json.loads(state.read_text())["round"] if state.is_file() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run (the bytes every resumed run must reproduce)."""
    base = tmp_path_factory.mktemp("crash")
    data = base / "data"
    small_job(base)  # builds the corpus into base/data
    root = base / "reference"
    _write_job(root, data)
    _run_in_process(root)
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["shards"] >= 3 and summary["rounds"] >= 3
    return {"base": base, "data": data, "root": root, "outputs": _outputs(root / "run"),
            "rounds": summary["rounds"], "shards": summary["shards"]}


def test_kill_at_seeded_points_in_every_stage_then_resume(reference, tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "chain"
    _write_job(root, reference["data"])
    total_rounds, shards = reference["rounds"], reference["shards"]
    pool_batches = -(-878 // OVERRIDES["pool.batch_size"])
    embed_batches = -(-878 // OVERRIDES["embed.batch_size"])
    # (point, hit count): loop points get a seeded hit inside their range
    plan = [  # in the job's stage order (a tf-idf pool is embedded and clustered before the proxy)
        ("store.batch", rng.randint(2, pool_batches)),        # sources, mid-read
        ("embed.batch", rng.randint(2, embed_batches)),       # embed, mid-stage
        ("cluster.trained", 1),                               # k-means done, nothing saved
        ("proxy.trained", 1),                                 # proxy trained, stage not committed
        ("scorer.fitted", 1),                                 # curvature fitted, reference not set
    ]
    killed = []
    for point, n in plan:
        _kill_at(root, point, n)
        killed.append(f"{point}:{n}")
    # the bandit: the hit count is per process, drawn within the rounds still to do
    for point in ("score.call", "round.before_save", "round.saved"):
        left = total_rounds - _rounds_done(root / "run")
        assert left >= 1
        n = rng.randint(1, max(1, min(left - 1, 2)))
        before = _rounds_done(root / "run")
        _kill_at(root, point, n)
        killed.append(f"{point}:{n}")
        saved = _rounds_done(root / "run") - before
        assert saved == (n if point == "round.saved" else n - 1), (point, n, saved)
    for point, n in (("shards.shard", rng.randint(1, shards - 1)),
                     ("shards.installed", 1), ("run.before_summary", 1)):
        _kill_at(root, point, n)
        killed.append(f"{point}:{n}")
    assert len(killed) >= 10
    proc = _quadsel(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify(root / "run")
    assert _outputs(root / "run") == reference["outputs"], killed
    assert not list((root / "run").glob(".selection.*")) and not list((root / "run" / "stages").glob("*.tmp-*"))


@pytest.fixture(scope="module")
def changed_reference(reference, tmp_path_factory) -> dict:
    """The finished reference run dir, rerun uninterrupted with the changed config."""
    root = tmp_path_factory.mktemp("changed")
    shutil.copytree(reference["root"] / "run", root / "run")
    _write_job(root, reference["data"], **CHANGED)
    _run_in_process(root)
    out = _outputs(root / "run")
    assert out != reference["outputs"]
    return {"root": root, "outputs": out}


def test_kill_a_rerun_with_a_changed_config(reference, changed_reference, tmp_path):
    root = tmp_path / "rerun"
    shutil.copytree(reference["root"] / "run", root / "run")
    _write_job(root, reference["data"], **CHANGED)
    _kill_at(root, "stage.swap.scorer", 1)      # the outdated scorer stage set aside
    assert not (root / "run" / "stages" / "scorer").exists()
    _kill_at(root, "shards.withdrawn", 1)       # old manifest withdrawn, old shards still live
    assert not (root / "run" / "manifest.json").exists()
    assert recover(root / "run") != "ok"        # ... and the old one comes back
    assert _outputs(root / "run") == reference["outputs"]
    proc = _quadsel(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(root / "run") == changed_reference["outputs"]
    assert not list((root / "run" / "stages").glob("scorer.*"))
    # the run-level config now describes the new selection; nothing is left pending
    resolved = yaml.safe_load((root / "run" / "config.resolved.yaml").read_text())
    assert resolved["selection"]["budget"]["amount"] == CHANGED["selection.budget.amount"]
    assert not list((root / "run").glob("*.pending"))


def test_disk_full_while_writing_the_selection_keeps_the_previous_one(reference, changed_reference,
                                                                      tmp_path, monkeypatch, capsys):
    import quadsel.pipeline.shards as shards

    root = tmp_path / "full"
    shutil.copytree(reference["root"] / "run", root / "run")
    cfg = _write_job(root, reference["data"], **CHANGED)
    calls = {"n": 0}
    real_write = shards._HashingSink.write

    def full_disk(self, data):
        calls["n"] += 1
        if calls["n"] > 3:  # a few writes succeed, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.chdir(root)
    monkeypatch.setattr(shards._HashingSink, "write", full_disk)
    rc = main(["run", str(cfg), "-q", "--progress", "quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "previous manifest" in err, err
    assert "Traceback" not in err and calls["n"] > 3
    verify(root / "run")
    assert _outputs(root / "run") == reference["outputs"]  # the previous selection, untouched
    assert not list((root / "run").glob(".selection.tmp-*"))
    monkeypatch.undo()
    monkeypatch.chdir(root)
    assert main(["run", str(cfg), "-q", "--progress", "quiet"]) == 0  # space is back: resumes
    assert _outputs(root / "run") == changed_reference["outputs"]
