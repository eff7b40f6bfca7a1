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
rerunning its constructor). A chunk whose actor died is resubmitted to another actor, up to
``max_chunk_attempts`` tries per chunk; Ray's own task retries (``max_task_retries``) default
to 0, since a retried task waits for its actor's restart, which never comes when the actor's
node is gone and no other node has room for it. Chunks go only to actors known to be up (they
answered an ``info()`` call since they last failed): an actor being restarted, or a
replacement that cannot be scheduled, gets no work and the others go on; an actor that is dead
for good is replaced (at most ``max_replacements`` times). With no actor up and nothing in
flight the pool waits ``start_timeout`` seconds for one, then raises ``WorkerPoolError``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)


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
        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informative only
            pass
        return {"pid": self.pid, "node": os.uname().nodename, "node_id": node_id}


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
        max_task_retries: int = 0,
        max_chunk_attempts: int = 4,
        max_replacements: int | None = None,
        start_timeout: float = 600.0,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            kwargs.update(init_kwargs or {})
            # no address: always a fresh local instance, never whatever cluster happens to run here
            ray.init(address=address or "local", **kwargs)
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
        self.start_timeout = start_timeout
        self.max_replacements = max_replacements if max_replacements is not None else 2 * num_actors
        self._last_error = ""
        self.actors = [self._new_actor() for _ in range(num_actors)]
        self._ready = [False] * num_actors
        self._probing: dict[Any, int] = {}  # info() ref -> actor index, for actors not known to be up
        for i in range(num_actors):
            self._probe(i)
        logger.info("ray: %d scoring actors (%s CPU, %s GPU each) on %s", num_actors, num_cpus, num_gpus,
                    address or "a local cluster")

    def _new_actor(self):
        return self._remote_cls.options(**self._options).remote(self._factory, self._threads)

    def actor_info(self) -> list[dict[str, Any]]:
        return self._ray.get([a.info.options(max_task_retries=-1).remote() for a in self.actors])

    def _probe(self, idx: int) -> None:
        """Ask actor ``idx`` for its info; it takes chunks once the answer is back (it is up)."""
        if idx not in self._probing.values():
            # retried through restarts: answers once the actor is up again, fails once it is dead
            self._probing[self.actors[idx].info.options(max_task_retries=-1).remote()] = idx

    def _replace(self, idx: int, why: str) -> None:
        """Actor ``idx`` is gone for good: start a new one, unless too many were replaced."""
        if self.replacements >= self.max_replacements:
            logger.warning("scoring actor %d is gone (%s); not replaced (%d replacements already), "
                           "going on with the others", idx, why, self.replacements)
            self._last_error = why
            return
        try:
            self._ray.kill(self.actors[idx], no_restart=True)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.actors[idx] = self._new_actor()
        self.replacements += 1
        logger.warning("replaced scoring actor %d (%s)", idx, why)
        self._probe(idx)

    def _settle_probe(self, ref) -> None:
        ray = self._ray
        idx = self._probing.pop(ref)
        try:
            ray.get(ref)
            self._ready[idx] = True
        except ray.exceptions.RayActorError as e:  # dead and out of restarts (or failed to start)
            self._ready[idx] = False
            self._replace(idx, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of ``texts`` in order. Chunks go only to actors that are up: an actor being
        restarted, or one that cannot be scheduled any more (its node is gone and no other node
        has room for it), simply gets nothing while the others go on."""
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
                up = [i for i in range(len(self.actors)) if self._ready[i]]
                if not up:
                    return
                idx = min(up, key=lambda i: busy[i])
                if busy[idx] >= per_actor:
                    return
                cid = pending.pop()
                a, b = spans[cid]
                attempts[cid] += 1
                ref = self.actors[idx].score.remote(cid, texts[a:b])
                inflight[ref] = (cid, idx)
                busy[idx] += 1

        submit()
        while pending or inflight:
            if not inflight:  # nothing running: wait for an actor to come up (bounded)
                if not self._probing:
                    raise WorkerPoolError(f"no scoring actor is left ({self._last_error or 'all failed'})")
                done, _ = ray.wait(list(self._probing), num_returns=1, timeout=self.start_timeout)
                if not done:
                    raise WorkerPoolError(
                        f"no scoring actor came up within {self.start_timeout:.0f}s ({len(self._probing)} "
                        f"waiting; each needs {self._options['num_cpus']} CPU / {self._options['num_gpus']} "
                        f"GPU; cluster resources {ray.cluster_resources()})")
            else:
                done, _ = ray.wait(list(inflight) + list(self._probing), num_returns=1)
            ref = done[0]
            if ref in self._probing:
                self._settle_probe(ref)
                submit()
                continue
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
                if isinstance(e, ray.exceptions.RayActorError) and self._ready[idx]:
                    self._ready[idx] = False  # until it answers again (restarted) or is replaced
                    self._probe(idx)
            submit()
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
