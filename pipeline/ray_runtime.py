"""Scoring on a pool of workers: Ray actors (one per GPU, or N CPU actors) or in-process.

The backend is an adapter, not mixed into the compute: a worker is built from a picklable
``factory()`` that returns any object with ``score(texts) -> np.ndarray`` (a fitted scorer
loaded from shared storage, say). The driver hands texts to workers as data, so nothing assumes
one machine.

Determinism: texts are cut into fixed chunks of ``chunk_size`` in the order given, and each
chunk is scored as a unit by whichever worker is free. The result therefore does not depend on
how many workers there are, which one scored what, or whether a chunk was retried after a
worker died.

Fault tolerance: actors are created with ``max_restarts`` (Ray rebuilds a dead actor by
rerunning its constructor) and ``max_task_retries``; on top of that, a chunk whose actor died
is resubmitted to another actor, and an actor that is gone for good is replaced, up to
``max_chunk_attempts`` tries per chunk.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

logger = logging.getLogger("quadsel.ray")


class ScoreFn(Protocol):
    def score(self, texts: Sequence[str]) -> np.ndarray: ...


class WorkerPoolError(RuntimeError):
    pass


def _set_threads(n: int | None) -> None:
    if not n:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class ScoreWorker:
    """What runs inside each actor (or in-process): builds the scorer once, scores chunks."""

    def __init__(self, factory: Callable[[], ScoreFn], threads: int | None = None) -> None:
        _set_threads(threads)
        self.scorer = factory()
        self.pid = os.getpid()

    def score(self, chunk_id: int, texts: list[str]) -> tuple[int, np.ndarray]:
        out = np.asarray(self.scorer.score(texts), dtype=np.float64)
        if out.shape != (len(texts),):
            raise WorkerPoolError(f"scorer returned shape {out.shape} for {len(texts)} texts")
        return chunk_id, out

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "node": os.uname().nodename}


class LocalPool:
    """In-process scoring with the same chunking as the Ray pool (identical results)."""

    def __init__(self, factory: Callable[[], ScoreFn], *, chunk_size: int = 32, threads: int | None = None):
        self.worker = ScoreWorker(factory, threads)
        self.chunk_size = chunk_size
        self.chunks_scored = 0

    def score(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty(len(texts), dtype=np.float64)
        for cid, (a, b) in enumerate(_chunks(len(texts), self.chunk_size)):
            out[a:b] = self.worker.score(cid, texts[a:b])[1]
            self.chunks_scored += 1
        return out

    def shutdown(self) -> None:
        pass


class RayPool:
    """Score chunks of texts on Ray actors, retrying chunks whose actor died."""

    def __init__(
        self,
        factory: Callable[[], ScoreFn],
        *,
        num_actors: int | None = None,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        chunk_size: int = 32,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        max_chunk_attempts: int = 4,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            kwargs.update(init_kwargs or {})
            ray.init(address=address, **kwargs)
            self._owns_ray = True
        else:
            self._owns_ray = False
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus is None:
            num_gpus = 1.0 if gpus >= 1 else 0.0
        if num_actors is None:
            num_actors = int(gpus) if num_gpus and gpus else max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
        self.num_actors = num_actors
        self.chunk_size = chunk_size
        self.max_chunk_attempts = max_chunk_attempts
        self.replacements = 0
        self.retried_chunks = 0
        self._factory = factory
        self._options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                             max_task_retries=max_task_retries)
        self._threads = max(1, int(num_cpus)) if not num_gpus else None
        self._remote_cls = ray.remote(ScoreWorker)
        self.actors = [self._new_actor() for _ in range(num_actors)]
        logger.info("ray: %d scoring actors (%s CPU, %s GPU each) on %s", num_actors, num_cpus, num_gpus,
                    address or "a local cluster")

    def _new_actor(self):
        return self._remote_cls.options(**self._options).remote(self._factory, self._threads)

    def actor_info(self) -> list[dict[str, Any]]:
        return self._ray.get([a.info.remote() for a in self.actors])

    def score(self, texts: Sequence[str]) -> np.ndarray:
        ray = self._ray
        texts = list(texts)
        spans = _chunks(len(texts), self.chunk_size)
        out = np.empty(len(texts), dtype=np.float64)
        pending = list(range(len(spans)))[::-1]  # pop() takes the lowest chunk id first
        attempts = [0] * len(spans)
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (chunk id, actor index)
        busy = [0] * len(self.actors)
        per_actor = 2  # keep each actor fed while the driver collects results

        def submit() -> None:
            while pending:
                idx = min(range(len(self.actors)), key=lambda i: busy[i])
                if busy[idx] >= per_actor:
                    return
                cid = pending.pop()
                a, b = spans[cid]
                attempts[cid] += 1
                ref = self.actors[idx].score.remote(cid, texts[a:b])
                inflight[ref] = (cid, idx)
                busy[idx] += 1

        submit()
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            cid, idx = inflight.pop(ref)
            busy[idx] -= 1
            try:
                got_id, scores = ray.get(ref)
                a, b = spans[got_id]
                out[a:b] = scores
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as e:
                if attempts[cid] >= self.max_chunk_attempts:
                    raise WorkerPoolError(f"chunk {cid} failed {attempts[cid]} times; last error: {e}") from e
                logger.warning("scoring actor %d failed (%s); retrying chunk %d", idx, type(e).__name__, cid)
                self.retried_chunks += 1
                pending.append(cid)
                if isinstance(e, ray.exceptions.RayActorError) and not self._alive(idx):
                    self.actors[idx] = self._new_actor()
                    self.replacements += 1
                    busy[idx] = 0
                    for r, (c, i) in list(inflight.items()):
                        if i == idx:  # its other chunks are lost with it
                            inflight.pop(r)
                            pending.append(c)
                    logger.warning("replaced scoring actor %d", idx)
            submit()
        return out

    def _alive(self, idx: int, timeout: float = 30.0) -> bool:
        ray = self._ray
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                ray.get(self.actors[idx].info.remote(), timeout=timeout)
                return True
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayActorError:
                return False
        return False

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
