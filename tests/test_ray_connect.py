"""Which Ray cluster a run uses, and failing fast when it is not there.

The address rules (explicit > $RAY_ADDRESS > a fresh local instance), a port nothing listens on
and one that accepts but is no GCS (one-line errors within seconds, CLI exit code 2, before any
stage ran), and a real loopback cluster joined through $RAY_ADDRESS the way a `ray job submit`
driver is.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_job

from quadsel.jobs.cli import main
from quadsel.pipeline.ray_runtime import LOCAL, RayConnectError, check_reachable, connect, resolve_address

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_resolution():
    assert resolve_address(None, env={}) == LOCAL  # no address: a fresh local instance
    assert resolve_address("", env={"RAY_ADDRESS": ""}) == LOCAL
    assert resolve_address(None, env={"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"  # ray job submit
    assert resolve_address(" 10.0.0.7:6379 ", env={"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.7:6379"
    assert resolve_address("local", env={"RAY_ADDRESS": "10.0.0.5:6379"}) == LOCAL  # explicit wins
    assert resolve_address("auto", env={}) == "auto"


def test_bad_address_forms():
    for bad in ("nonsense", "host:", ":6379", "host:port"):
        with pytest.raises(RayConnectError, match="expected HOST:PORT"):
            check_reachable(bad)


def test_nothing_listening_fails_fast_with_one_line():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(RayConnectError) as info:
        connect(f"127.0.0.1:{port}", timeout=3)
    assert time.monotonic() - t0 < 3
    msg = str(info.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "refused" in msg.lower()


def test_a_port_that_is_not_a_gcs_fails_within_the_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():  # accepts and says nothing, like a wrong service would
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RayConnectError, match="did not answer") as info:
            connect(f"127.0.0.1:{srv.getsockname()[1]}", timeout=1.5)
        assert time.monotonic() - t0 < 5 and "\n" not in str(info.value)
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("connect")
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(small_job(root, ray=True)))
    return path


@pytest.mark.parametrize("via", ["flag", "env"])
def test_cli_unreachable_address_exits_2_before_any_work(job_yaml, capsys, monkeypatch, via):
    port = _free_port()
    args = ["run", str(job_yaml), "-q", "--progress", "quiet"]
    if via == "flag":
        args += ["--address", f"127.0.0.1:{port}"]
    else:  # what `ray job submit` sets for the driver
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("quadsel run: error: cannot reach the Ray cluster at 127.0.0.1:") and str(port) in err
    run_dir = Path(yaml.safe_load(job_yaml.read_text())["run_dir"])
    assert not (run_dir / "stages").exists()  # nothing ran before the connection


DRIVER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ray
    from quadsel.pipeline.ray_runtime import RayPool

    class Len:
        def score(self, texts):
            return np.array([len(t) for t in texts], dtype=np.float64)

    pool = RayPool(Len, num_actors=1, num_cpus=0.5, chunk_size=2)  # no address given
    got = pool.score(["a", "bb", "ccc"]).tolist()
    gcs = ray.get_runtime_context().gcs_address
    pool.shutdown()
    print(json.dumps({"gcs": gcs, "scores": got}))
""")

HEAD = textwrap.dedent("""
    import sys
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes it
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def head():
    """A loopback cluster with one CPU, started by a helper process that owns it; yields
    (its GCS address, the environment a driver joining it needs)."""
    pytest.importorskip("ray")
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", HEAD], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        gcs = proc.stdout.readline().strip()
        assert gcs, "the helper cluster did not start"
        # the helper's cluster uses token auth (~/.ray/auth_token); a submitted job's driver has it too
        yield gcs, dict(env, RAY_AUTH_MODE="token")
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own helper, by its handle; its Ray processes follow it (reaper)
            proc.wait()
        proc.stdout.close()


def test_ray_address_env_joins_that_cluster_instead_of_a_nested_one(head):
    """A driver that only has $RAY_ADDRESS joins that cluster, as inside `ray job submit`."""
    gcs, env = head
    check_reachable(gcs, timeout=5)  # a real GCS passes the handshake check
    out = subprocess.run([sys.executable, "-c", DRIVER], env=dict(env, RAY_ADDRESS=gcs),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["scores"] == [1.0, 2.0, 3.0]
    assert got["gcs"] == gcs  # the helper's cluster, not a nested local one


def test_actors_larger_than_the_cluster_fail_up_front(head, job_yaml):
    """ray.num_cpus_per_actor more than any node of the joined cluster has: one line naming the
    setting and what the cluster has, exit 2, in seconds and before any stage (it used to wait
    the pool's start_timeout, 600 s, in silence)."""
    gcs, env = head
    run_dir = Path(yaml.safe_load(job_yaml.read_text())["run_dir"])
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "quadsel.jobs.cli", "run", str(job_yaml), "--address", gcs,
                          "--set", "ray.num_cpus_per_actor=4", "-q", "--progress", "quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    err = out.stderr.strip().splitlines()
    assert err[-1] == ("quadsel run: error: ray.num_cpus_per_actor = 4 but the Ray cluster has 1 CPU in all, at "
                       "most 1 on one of its 1 node(s): no actor could ever be placed; lower "
                       "ray.num_cpus_per_actor or add larger nodes"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (run_dir / "stages").exists()  # nothing ran

    # the scoring pool itself says so too (library use), instead of waiting for the actor
    script = textwrap.dedent("""
        import ray
        from quadsel.pipeline.ray_runtime import RayPool, WorkerPoolError
        ray.init(log_to_driver=False)
        try:
            RayPool(lambda: None, num_actors=1, num_cpus=3, start_timeout=600)
        except WorkerPoolError as e:
            print("ERR", e)
    """)
    got = subprocess.run([sys.executable, "-c", script], env=dict(env, RAY_ADDRESS=gcs), capture_output=True,
                         text=True, timeout=120)
    assert "ERR each scoring actor needs 3 CPU / 0 GPU but the Ray cluster has 1 CPU in all" in got.stdout, \
        got.stderr[-2000:]
