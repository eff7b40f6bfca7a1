"""The one executor: chunks of texts on a pool of workers, Ray actors (one per GPU, or N CPU
actors) or in-process; scoring and feature extraction both run on it.

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

Which cluster (``resolve_address``): an explicit address wins (``HOST:PORT``, ``auto``,
``ray://HOST:PORT``, or ``local`` for a fresh local instance); without one, ``RAY_ADDRESS`` is
used when set (``ray job submit`` sets it for the job's driver, so a submitted job runs on that
cluster instead of starting a nested one); with neither, a fresh local instance is started
(never whatever cluster ``ray start`` left on this machine). ``connect`` checks a remote address
before ``ray.init``: a TCP connect with a timeout, then one HTTP/2 handshake (the GCS speaks
gRPC), so a cluster that is not there fails in seconds with ``RayConnectError`` (one line: the
address and the reason) instead of Ray retrying for minutes; Ray's own errors while connecting
(authentication, version mismatch) become ``RayConnectError`` too.

Stopping (``shutdown``): a local instance that ``connect`` started belongs to this process; its
processes (the ones ``ray.init`` started: gcs_server, raylet, dashboard, monitors) are noted
by pid and start time, and ``shutdown`` makes sure that none of them, nor any of their
descendants (agents, workers), outlives it: ``ray.shutdown()``, a short wait, then SIGTERM and
SIGKILL for exactly those pids. ``connect`` keeps the caller's own SIGTERM / SIGINT handlers
(``ray.init`` replaces them with handlers that dump a C++ stack and exit), so a command line
that turns signals into a clean stop keeps doing so.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from quadsel.core.errors import RayConnectError, WorkerPoolError

logger = logging.getLogger(__name__)


LOCAL = "local"
CONNECT_TIMEOUT_S = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + SETTINGS


def resolve_address(address: str | None, env: Mapping[str, str] | None = None) -> str:
    """The cluster to use: ``address`` if given, else ``$RAY_ADDRESS`` if set, else ``"local"``."""
    if address is not None and str(address).strip():
        return str(address).strip()
    env_addr = (os.environ if env is None else env).get("RAY_ADDRESS", "").strip()
    return env_addr or LOCAL


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [v6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectError(f"cannot connect to the Ray cluster at {address!r}: expected HOST:PORT "
                              "(e.g. 10.0.0.5:6379), ray://HOST:PORT, auto or local")
    return host, int(port)


def _resolve_auto(address: str) -> str:
    """``auto``: the cluster ``$RAY_ADDRESS`` or the last ``ray start`` on this machine names."""
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address_or_die(address)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError (none found) or others
        raise RayConnectError(f"cannot connect to the Ray cluster at 'auto': {_one_line(e)}") from None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``RayConnectError`` unless ``HOST:PORT`` accepts a TCP connection and answers an
    HTTP/2 handshake (the GCS and the Ray client server are gRPC servers) within ``timeout``."""
    host, port = _host_port(address)
    where = f"cannot reach the Ray cluster at {address}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise RayConnectError(f"{where}: no answer from {host}:{port} within {timeout:g}s "
                              "(wrong host, or a firewall)") from None
    except OSError as e:
        reason = e.strerror or _one_line(e)
        raise RayConnectError(f"{where}: {reason} ({host}:{port}); is the head node up "
                              "(`ray start --head`) and is this its GCS port (6379 by default)?") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS handshake comes first: the TCP check is what we can do without certificates
        try:
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = sock.recv(9)
        except OSError as e:
            raise RayConnectError(f"{where}: {host}:{port} accepted the connection but did not answer "
                                  f"({_one_line(e)} within {timeout:g}s); is it a Ray GCS port?") from None
        if len(head) < 9 or head[3] != 4:  # an HTTP/2 SETTINGS frame
            raise RayConnectError(f"{where}: {host}:{port} is not a Ray GCS (no gRPC/HTTP2 reply)")


def connect(address: str | None = None, *, timeout: float = CONNECT_TIMEOUT_S,
            init_kwargs: dict[str, Any] | None = None) -> str:
    """Connect this process to the cluster ``resolve_address(address)`` names (or start a local
    one); return the address used. A remote address is checked first (``check_reachable``), and
    any error while connecting is a one-line ``RayConnectError``. A no-op if Ray is initialised."""
    import ray

    target = resolve_address(address)
    if ray.is_initialized():
        return target
    if target != LOCAL:
        check_reachable(_resolve_auto(target) if target == "auto" else target, timeout)
    kwargs: dict[str, Any] = {"log_to_driver": False, "ignore_reinit_error": True}
    if target == LOCAL:
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs or {})
    before = _child_pids() if target == LOCAL else set()
    try:
        with _keep_signal_handlers():
            ray.init(address=target, **kwargs)
    except Exception as e:  # noqa: BLE001 - authentication, version mismatch, bad arguments...
        hint = ""
        if isinstance(e, ConnectionError) and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication (Ray's default for the clusters it "
                    "starts), set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
        raise RayConnectError(f"cannot connect to the Ray cluster at {target}: {type(e).__name__}: "
                              f"{_one_line(e)}{hint}") from None
    if target == LOCAL:
        _Started.note(_child_pids() - before)
    logger.info("ray: connected to %s", "a fresh local instance" if target == LOCAL else target)
    return target


class _keep_signal_handlers:
    """Put back the SIGTERM / SIGINT handlers a caller installed (Python callables) after
    ``ray.init``, which replaces SIGTERM's with ``sys.exit`` chained behind a C++ handler that
    prints a stack dump. Default handlers are left to Ray, as a plain script expects."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.saved = {s: signal.getsignal(s) for s in self.SIGNALS} if main else {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, handler)


def _child_pids() -> set[tuple[int, float]]:
    """This process's children as (pid, start time); empty without psutil."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - ray[default] brings it
        return set()
    out = set()
    for c in psutil.Process().children():
        try:
            out.add((c.pid, c.create_time()))
        except psutil.Error:
            pass
    return out


class _Started:
    """The processes of the local Ray instance this process started (pid, start time)."""

    procs: set[tuple[int, float]] = set()

    @classmethod
    def note(cls, procs: set[tuple[int, float]]) -> None:
        cls.procs = set(procs)

    @classmethod
    def live(cls) -> list[Any]:
        """Those processes still running (the same pid with the same start time: not a reused
        pid), with every descendant of theirs (the raylet's agents and workers)."""
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return []
        out: dict[int, Any] = {}
        for pid, started in cls.procs:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - started) > 1e-3:
                    continue
                out[pid] = p
                for c in p.children(recursive=True):
                    out[c.pid] = c
            except psutil.Error:
                continue
        return list(out.values())


def shutdown(grace: float = 3.0) -> list[int]:
    """Disconnect from Ray. For a local instance this process started, also make sure that every
    process of it is gone afterwards (``ray.shutdown`` stops the ones it started itself; agents
    and workers of the raylet are stopped here by pid if they outlive it). Returns the pids that
    had to be stopped here. Safe to call twice, or when Ray was never initialised."""
    import ray

    procs = _Started.live()
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        _Started.procs = set()
        stopped = _stop(procs, grace) if procs else []
    if stopped:
        logger.info("ray: stopped %d process(es) of the local instance that outlived ray.shutdown: %s",
                    len(stopped), stopped)
    return stopped


def _stop(procs: list[Any], grace: float) -> list[int]:
    """Wait ``grace`` seconds for ``procs`` to exit, then SIGTERM, then SIGKILL what is left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    stopped = [p.pid for p in alive]
    for how in ("terminate", "kill"):
        if not alive:
            break
        for p in alive:
            try:
                getattr(p, how)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
    if alive:  # pragma: no cover - a process that ignores SIGKILL (uninterruptible I/O)
        logger.warning("ray: processes %s of the local instance did not exit", [p.pid for p in alive])
    return stopped


def actor_fit_problem(num_cpus: float, num_gpus: float = 0.0) -> str | None:
    """Why an actor needing ``num_cpus`` CPUs and ``num_gpus`` GPUs can never be placed on the
    connected cluster (no alive node has that much), or None. Said up front, instead of the
    pool waiting for an actor that never comes up."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for what, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if not need:
            continue
        per_node = [float(r.get(what, 0)) for r in nodes]
        most = max(per_node, default=0.0)
        if need > most:
            total = float(ray.cluster_resources().get(what, 0))
            return (f"the Ray cluster has {total:g} {what} in all, at most {most:g} on one of its "
                    f"{len(nodes)} node(s)")
    return None


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


class Worker:
    """What runs inside each actor (or in-process): builds its object once from ``factory``, then
    calls ``method`` on chunks of texts. The result has one row per text: a score per text for a
    scorer (``method="score"``, float64), a vector per text for an embedder (``"transform"``)."""

    def __init__(self, factory: Callable[[], Any], threads: int | None = None, method: str = "score") -> None:
        _set_threads(threads)
        self.obj = factory()
        self.method = method
        self.pid = os.getpid()

    def run(self, chunk_id: int, texts: list[str]) -> tuple[int, np.ndarray]:
        out = np.asarray(getattr(self.obj, self.method)(texts))
        if self.method == "score":
            out = out.astype(np.float64, copy=False)
            if out.shape != (len(texts),):
                raise WorkerPoolError(f"scorer returned shape {out.shape} for {len(texts)} texts")
        elif out.ndim == 0 or out.shape[0] != len(texts):
            raise WorkerPoolError(f"{type(self.obj).__name__}.{self.method} returned shape {out.shape} for "
                                  f"{len(texts)} texts")
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


class _Output:
    """The rows of a map, filled chunk by chunk; shaped by the first chunk back."""

    def __init__(self, n: int, method: str) -> None:
        self.n, self.method, self.arr = n, method, None

    def put(self, a: int, b: int, rows: np.ndarray) -> None:
        if self.arr is None:
            self.arr = np.empty((self.n, *rows.shape[1:]), dtype=rows.dtype)
        self.arr[a:b] = rows

    def result(self) -> np.ndarray:
        if self.arr is None:
            return np.empty((0,), dtype=np.float64 if self.method == "score" else np.float32)
        return self.arr


class LocalPool:
    """In-process, with the same chunking as the Ray pool (identical results)."""

    def __init__(self, factory: Callable[[], Any], *, chunk_size: int = 32, threads: int | None = None,
                 method: str = "score"):
        self.worker = Worker(factory, threads, method)
        self.method = method
        self.chunk_size = chunk_size
        self.chunks_scored = 0

    def map(self, texts: Sequence[str], on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
        """One output row per text, in order (``on_chunk(rows)`` after each chunk)."""
        texts = list(texts)
        out = _Output(len(texts), self.method)
        for cid, (a, b) in enumerate(_chunks(len(texts), self.chunk_size)):
            out.put(a, b, self.worker.run(cid, texts[a:b])[1])
            self.chunks_scored += 1
            if on_chunk is not None:
                on_chunk(b - a)
        return out.result()

    score = map

    def shutdown(self) -> None:
        pass


class RayPool:
    """Chunks of texts on Ray actors (scored, or embedded: ``method``), retrying chunks whose actor
    died. The stage declares what each actor needs (``num_cpus``, ``num_gpus``)."""

    def __init__(
        self,
        factory: Callable[[], Any],
        *,
        method: str = "score",
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
        threads: int | None = None,
    ) -> None:
        import ray

        self._ray = ray
        self.method = method
        self.role = "scoring" if method == "score" else "feature"
        if not ray.is_initialized():
            # explicit address > $RAY_ADDRESS (ray job submit) > a fresh local instance, never
            # whatever cluster happens to run on this machine
            address = connect(address, init_kwargs=init_kwargs)
            self._owns_ray = True
        else:
            self._owns_ray = False
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus is None:
            num_gpus = 1.0 if gpus >= 1 else 0.0
        if num_actors is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            num_actors = int(gpus) if num_gpus and gpus else max(1, int(cpus // num_cpus))
        why = actor_fit_problem(num_cpus, num_gpus)
        if why:  # an actor that fits on no node would be waited for (start_timeout) in silence
            if self._owns_ray:
                shutdown()
            raise WorkerPoolError(f"each {self.role} actor needs {num_cpus:g} CPU / {num_gpus:g} GPU but {why}: "
                                  "no actor could ever be placed")
        self.num_actors = num_actors
        self.chunk_size = chunk_size
        self.max_chunk_attempts = max_chunk_attempts
        self.replacements = 0
        self.retried_chunks = 0
        self._factory = factory
        self._options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                             max_task_retries=max_task_retries)
        self._threads = threads or (max(1, int(num_cpus)) if not num_gpus else None)
        self._remote_cls = ray.remote(Worker)
        self.start_timeout = start_timeout
        self.max_replacements = max_replacements if max_replacements is not None else 2 * num_actors
        self._last_error = ""
        self.actors = [self._new_actor() for _ in range(num_actors)]
        self._ready = [False] * num_actors
        self._probing: dict[Any, int] = {}  # info() ref -> actor index, for actors not known to be up
        for i in range(num_actors):
            self._probe(i)
        logger.info("ray: %d %s actors (%s CPU, %s GPU each) on %s", num_actors, self.role, num_cpus, num_gpus,
                    address or "the connected cluster")

    def _new_actor(self):
        return self._remote_cls.options(**self._options).remote(self._factory, self._threads, self.method)

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
            logger.warning("%s actor %d is gone (%s); not replaced (%d replacements already), "
                           "going on with the others", self.role, idx, why, self.replacements)
            self._last_error = why
            return
        try:
            self._ray.kill(self.actors[idx], no_restart=True)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.actors[idx] = self._new_actor()
        self.replacements += 1
        logger.warning("replaced %s actor %d (%s)", self.role, idx, why)
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

    def map(self, texts: Sequence[str], on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
        """One output row per text, in order (``on_chunk(rows)`` as each chunk comes back). Chunks
        go only to actors that are up: an actor being restarted, or one that cannot be scheduled
        any more (its node is gone and no other node has room for it), simply gets nothing while
        the others go on."""
        ray = self._ray
        texts = list(texts)
        spans = _chunks(len(texts), self.chunk_size)
        out = _Output(len(texts), self.method)
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
                ref = self.actors[idx].run.remote(cid, texts[a:b])
                inflight[ref] = (cid, idx)
                busy[idx] += 1

        submit()
        while pending or inflight:
            if not inflight:  # nothing running: wait for an actor to come up (bounded)
                if not self._probing:
                    raise WorkerPoolError(f"no {self.role} actor is left ({self._last_error or 'all failed'})")
                done, _ = ray.wait(list(self._probing), num_returns=1, timeout=self.start_timeout)
                if not done:
                    raise WorkerPoolError(
                        f"no {self.role} actor came up within {self.start_timeout:.0f}s ({len(self._probing)} "
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
                got_id, rows = ray.get(ref)
                a, b = spans[got_id]
                out.put(a, b, rows)
                if on_chunk is not None:
                    on_chunk(b - a)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as e:
                if attempts[cid] >= self.max_chunk_attempts:
                    raise WorkerPoolError(f"chunk {cid} failed {attempts[cid]} times; last error: {e}") from e
                logger.warning("%s actor %d failed (%s); retrying chunk %d", self.role, idx, type(e).__name__, cid)
                self.retried_chunks += 1
                pending.append(cid)
                if isinstance(e, ray.exceptions.RayActorError) and self._ready[idx]:
                    self._ready[idx] = False  # until it answers again (restarted) or is replaced
                    self._probe(idx)
            submit()
        return out.result()

    score = map

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.actors = []
        if self._owns_ray:
            shutdown()
