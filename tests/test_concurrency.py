"""Runs at the same time: separate run directories do not interfere; one directory, one run.

- Two ``quadsel run`` subprocesses with different jobs into different directories, started
  together, both finish with outputs byte-identical to the same jobs run one after the other.
- A second run (or ``quadsel cluster``) into a directory a live run holds is refused with exit
  code 2 and a message naming the directory and the holder's pid. The live run is a real
  ``quadsel run`` frozen by the fault hook (``QUADSEL_FAULT=point:n:stop``, SIGSTOP) while it
  holds the lock; once it is killed (-9) the lock is free at once and a new run goes through.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_job

from quadsel.jobs.cli import main
from quadsel.pipeline.shards import data_files, verify

pytestmark = pytest.mark.slow

JOBS = {
    "quad": {},
    "random": {"method": "random", "seed": 3, "selection.budget.amount": 50},
}


def _outputs(run_dir: Path) -> dict[str, bytes]:
    files = [run_dir / "manifest.json", *map(Path, data_files(run_dir))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files}


def _job(root: Path, data_root: Path, name: str) -> Path:
    cfg = small_job(data_root, **JOBS[name])  # absolute data paths, shared corpus
    cfg["run_dir"] = "run"
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.yaml").write_text(yaml.safe_dump(cfg))
    return root / "job.yaml"


def _start(root: Path, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("QUADSEL_FAULT", None)
    if fault:
        env["QUADSEL_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "quadsel", "run", "job.yaml", "-q", "--progress", "quiet"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_stopped(proc: subprocess.Popen) -> None:
    """Until the process is frozen by its SIGSTOP (state T); fails if it exits instead."""
    stat = Path(f"/proc/{proc.pid}/stat")
    while proc.poll() is None:
        if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.05)
    pytest.fail(f"the first run exited ({proc.returncode}) instead of stopping: {proc.stderr.read()[-2000:]}")


def test_two_runs_into_different_directories_at_once(tmp_path):
    small_job(tmp_path)  # the corpus, shared read-only by both jobs
    serial = {}
    for name in JOBS:
        root = tmp_path / f"serial-{name}"
        _job(root, tmp_path, name)
        proc = _start(root)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        serial[name] = _outputs(root / "run")
    assert serial["quad"] != serial["random"]
    procs = {}
    for name in JOBS:
        _job(tmp_path / f"parallel-{name}", tmp_path, name)
        procs[name] = _start(tmp_path / f"parallel-{name}")
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for name in JOBS:
        run_dir = tmp_path / f"parallel-{name}" / "run"
        verify(run_dir)
        assert _outputs(run_dir) == serial[name], name


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, capsys, monkeypatch):
    small_job(tmp_path)
    root = tmp_path / "job"
    cfg = _job(root, tmp_path, "random")
    first = _start(root, "sources.file:1:stop")  # holds the run lock, frozen while reading
    try:
        _wait_stopped(first)
        monkeypatch.chdir(root)
        for command in ("run", "cluster"):
            rc = main([command, str(cfg), "-q", "--progress", "quiet"])
            err = capsys.readouterr().err
            assert rc == 2, err
            assert f"quadsel {command}: error: " in err and "Traceback" not in err
            busy = os.path.realpath(root / "run")
            assert f"{busy} is in use by another quadsel run (pid {first.pid})" in err, err
        assert not (root / "run" / "manifest.json").exists()
    finally:
        first.kill()  # kill -9: the lock goes with the process
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert main(["run", str(cfg), "-q", "--progress", "quiet"]) == 0, capsys.readouterr().err
    verify(root / "run")
