"""Ray scoring survives the loss of a worker node mid-selection, with identical output.

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
    real = run_job._score_rows_fn
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

    monkeypatch.setattr(run_job, "_score_rows_fn", score_rows_fn)
    again = run_job.run_selection(JobConfig.model_validate(dict(cfg, run_dir=str(faulty))))
    assert lost, "the node was never removed"
    verify(faulty)
    assert _outputs(faulty) == expected
    assert again["selected"] == summary["selected"]
    assert json.loads((faulty / "bandit" / "history.json").read_text()) == \
        json.loads((tmp_path / "reference" / "bandit" / "history.json").read_text())
    assert "scoring actor" in quadsel_log.text and "retrying chunk" in quadsel_log.text
