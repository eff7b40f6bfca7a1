"""Ray scoring survives the loss of a worker node mid-selection, with identical output; a
signalled run stops its own Ray cleanly.

A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head with no
CPUs and two worker nodes with one CPU each, so each of the two scoring actors (one CPU each)
sits on its own node. Before the second bandit round scores, one worker node is removed and its
actor's process is gone, and Ray cannot restart it anywhere (the surviving node's only CPU is taken),
so the restart stays pending for good. The pool must resubmit the lost chunks to the surviving
actor, never send work to the pending one, and the run must end with a manifest and shards
byte-identical to an uninterrupted run on the full cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import small_job

from quadsel.jobs.config import JobConfig
from quadsel.pipeline.shards import data_files, verify

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def _outputs(run_dir: Path) -> dict[str, bytes]:
    files = [run_dir / "manifest.json", *map(Path, data_files(run_dir))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()




def test_losing_a_worker_node_mid_scoring_gives_the_same_selection(cluster, tmp_path, monkeypatch,
                                                                   quadsel_log):
    import quadsel.jobs.run_job as run_job
    import quadsel.jobs.selection_run as selection_run

    c, workers = cluster
    assert ray.cluster_resources().get("CPU") == 2
    cfg = small_job(tmp_path, ray=True)  # ray.enabled, num_actors=2; Ray is already connected
    cfg["ray"]["max_restarts"] = 3        # the lost actor is restarted... where there is no room
    cfg["selection"]["quad"]["arms_per_round"] = 1  # more rounds: some run after the node is gone
    cfg["model"]["batch_size"] = 1  # one text per chunk: every round keeps both actors busy
    reference = JobConfig.model_validate(dict(cfg, run_dir=str(tmp_path / "reference")))
    summary = run_job.run_selection(reference)
    assert summary["selected"] == 60 and summary["rounds"] >= 3
    expected = _outputs(tmp_path / "reference")

    faulty = tmp_path / "faulty"
    shutil.copytree(tmp_path / "reference" / "stages", faulty / "stages")  # the same cached stages
    real = selection_run._score_rows_fn
    lost: list[int] = []

    def lose_a_node(pool) -> None:
        """Remove worker node 0 and make sure its actor's process is gone before going on."""
        victim = next(i["pid"] for i in pool.actor_info() if i["node_id"] == workers[0].node_id)
        c.remove_node(workers[0], allow_graceful=False)
        try:  # the raylet is gone; its workers exit on their own, or at once here
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        lost.append(victim)

    def score_rows_fn(pool, workers_, counter):
        inner = real(pool, workers_, counter)
        calls = {"n": 0}

        def score_rows(rows):
            calls["n"] += 1
            if calls["n"] == 2:  # second round: its actor's node is lost before it scores
                lose_a_node(workers_)
            return inner(rows)
        return score_rows

    monkeypatch.setattr(selection_run, "_score_rows_fn", score_rows_fn)
    again = run_job.run_selection(JobConfig.model_validate(dict(cfg, run_dir=str(faulty))))
    assert lost, "the node was never removed"
    verify(faulty)
    assert _outputs(faulty) == expected
    assert again["selected"] == summary["selected"]
    assert json.loads((faulty / "bandit" / "history.json").read_text()) == \
        json.loads((tmp_path / "reference" / "bandit" / "history.json").read_text())
    assert "scoring actor" in quadsel_log.text and "retrying chunk" in quadsel_log.text


def _descendants(pid: int) -> dict[int, float]:
    import psutil

    out = {}
    for c in psutil.Process(pid).children(recursive=True):
        try:
            out[c.pid] = c.create_time()
        except psutil.Error:
            pass
    return out


def _still_running(procs: dict[int, float]) -> list[str]:
    import psutil

    alive = []
    for pid, started in procs.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_and_every_process_of_its_ray(tmp_path, sig):
    """`quadsel run` with its own local Ray, signalled while the bandit scores on Ray actors:
    one line, exit 128+signal, no traceback or C++ stack dump, and no process of that Ray
    instance (gcs_server, raylet, dashboard, agents, scoring workers: every descendant of the
    run seen while it scored, by pid and start time) survives; the rerun completes."""
    import subprocess
    import sys
    import time

    import yaml

    pytest.importorskip("psutil")
    cfg = small_job(tmp_path, ray=True)
    cfg["selection"]["quad"]["arms_per_round"] = 1  # many short rounds: the signal lands mid-selection
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    quadsel = str(Path(sys.executable).parent / "quadsel")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([quadsel, "run", str(job), "--progress", "log"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        lines = []
        for line in p.stderr:  # until the first probe was scored on the actors
            lines.append(line)
            if "quadsel.jobs.selection_run: scored" in line:
                break
        assert p.poll() is None, "".join(lines)[-3000:]
        ray_procs = _descendants(p.pid)
        assert len(ray_procs) >= 4, ray_procs  # gcs_server, raylet, ..., the scoring workers
        os.kill(p.pid, sig)
        rest = p.stderr.read()
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 128 + sig, rest[-3000:]
    assert "Traceback" not in rest and "SIGTERM received" not in rest and "logging.cc" not in rest, rest[-3000:]
    last = rest.strip().splitlines()[-1]
    assert last == "quadsel run: " + ("stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted") + \
        "; rerun the same command to resume", rest[-3000:]
    deadline = time.monotonic() + 5
    while _still_running(ray_procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _still_running(ray_procs)
    run_dir = Path(cfg["run_dir"])
    assert not (run_dir / "manifest.json").exists()  # stopped before anything was committed
    if sig == signal.SIGTERM:  # resumable: the same command finishes the selection
        again = subprocess.run([quadsel, "run", str(job), "-q", "--progress", "quiet"], capture_output=True,
                               text=True, env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        verify(run_dir)
        assert json.loads((run_dir / "summary.json").read_text())["selected"] == 60



STOP_SCRIPT = """
import json
import psutil
from quadsel.pipeline import ray_runtime as rr

rr.connect(None, init_kwargs={"num_cpus": 1})
procs = rr._Started.live()
stopped = rr.shutdown()
alive = []
for p in procs:
    try:
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
            alive.append(" ".join(p.cmdline())[:100])
    except psutil.NoSuchProcess:
        pass
print(json.dumps({"procs": len(procs), "stopped": stopped, "alive": alive}))
"""


def test_shutdown_leaves_no_process_of_the_local_ray_it_started():
    """ray_runtime.shutdown: every process of the local instance that connect started (noted by
    pid and start time, with their descendants: agents, workers) is gone afterwards."""
    import subprocess
    import sys

    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", STOP_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["procs"] >= 3, got  # gcs_server, raylet, agents...
    assert got["alive"] == [], got


def test_a_process_that_outlives_ray_shutdown_is_stopped_by_pid():
    """What ray_runtime.shutdown does with a process of its instance still there after
    ray.shutdown: SIGTERM, then SIGKILL for one that ignores it; its pid is reported."""
    import subprocess
    import sys

    psutil = pytest.importorskip("psutil")
    from quadsel.pipeline.ray_runtime import _stop

    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"up"
        assert _stop([psutil.Process(child.pid)], grace=0.5) == [child.pid]
        assert not psutil.pid_exists(child.pid)  # killed and reaped (by psutil's wait)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
