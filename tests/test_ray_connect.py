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


def test_ray_address_env_joins_that_cluster_instead_of_a_nested_one(tmp_path):
    """A loopback cluster (started by a helper process that owns it), joined by a driver that
    only has $RAY_ADDRESS, as inside `ray job submit`."""
    pytest.importorskip("ray")
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([sys.executable, "-c", HEAD], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        gcs = head.stdout.readline().strip()
        assert gcs, "the helper cluster did not start"
        check_reachable(gcs, timeout=5)  # a real GCS passes the handshake check
        # the helper's cluster uses token auth (~/.ray/auth_token); a submitted job's driver has it too
        out = subprocess.run([sys.executable, "-c", DRIVER], env=dict(env, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        import json

        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["scores"] == [1.0, 2.0, 3.0]
        assert got["gcs"] == gcs  # the helper's cluster, not a nested local one
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()  # our own helper, by its handle; its Ray processes follow it (reaper)
            head.wait()
        head.stdout.close()
