"""The scoring worker pool: real Ray (local), fixed chunking, actors killed mid-round."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from quadsel.pipeline.ray_runtime import LocalPool, RayPool


def _factory(delay: float = 0.0):
    def make():
        class LenScorer:
            def score(self, texts):
                time.sleep(delay)
                return np.array([len(t) + 0.5 * t.count("a") for t in texts], dtype=np.float64)

        return LenScorer()

    return make


TEXTS = [("a" * (i % 7)) + "x" * (i % 13) for i in range(200)]
EXPECTED = np.array([len(t) + 0.5 * t.count("a") for t in TEXTS])


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_local_pool_matches_direct():
    pool = LocalPool(_factory(), chunk_size=16)
    np.testing.assert_array_equal(pool.score(TEXTS), EXPECTED)
    assert pool.chunks_scored == 13


def test_ray_pool_two_actors_same_result(ray_local):
    pool = RayPool(_factory(), num_actors=2, chunk_size=16)
    try:
        np.testing.assert_array_equal(pool.score(TEXTS), EXPECTED)
        assert len({i["pid"] for i in pool.actor_info()}) == 2
        assert pool.score([]).shape == (0,)
    finally:
        pool.shutdown()


def test_ray_pool_survives_actor_killed_mid_round(ray_local):
    pool = RayPool(_factory(delay=0.15), num_actors=2, chunk_size=8, max_restarts=2, max_task_retries=0)
    try:
        victim = pool.actor_info()[0]["pid"]

        def kill():
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)

        t = threading.Thread(target=kill)
        t.start()
        got = pool.score(TEXTS)
        t.join()
        np.testing.assert_array_equal(got, EXPECTED)
        assert victim not in {i["pid"] for i in pool.actor_info()}
        assert pool.retried_chunks >= 1  # the chunks in flight on the dead actor were rescored
    finally:
        pool.shutdown()
