"""Fault injection for crash tests: named points where a run can be killed on purpose.

``QUADSEL_FAULT="name:n"`` makes this process kill itself with SIGKILL (no cleanup, no
``finally``, no atexit: exactly what ``kill -9`` does) the ``n``-th time it reaches the point
``name`` (``n`` defaults to 1); ``"name:n:stop"`` stops it with SIGSTOP instead (frozen, still
holding its locks, until a SIGCONT or SIGKILL: a live run for concurrency tests). Several specs
may be given, comma separated. Unset (the normal case) a point costs one environment lookup.

Points are placed at stage boundaries and inside loops; ``POINTS`` lists them so a test can
check it covers every stage. A point whose spec names it but that is never reached leaves the
process running normally, so a test asserts the process died of SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "QUADSEL_FAULT"

POINTS = {
    "sources.file": "quadsel.pipeline.sources.readers: before each input file is read",
    "store.batch": "quadsel.pipeline.store: after each incoming batch of validated rows is buffered",
    "stage.commit.<name>": "quadsel.pipeline.stage: a stage's _DONE marker written, folder not yet in place",
    "stage.swap.<name>": "quadsel.pipeline.stage: the outdated stage folder moved aside, new one not in place",
    "embed.batch": "quadsel.pipeline.feature_stage: before each chunk of texts is embedded (local backend)",
    "cluster.trained": "quadsel.jobs.stages: k-means done, result not yet saved",
    "proxy.trained": "quadsel.jobs.models: proxy model trained and saved, stage not committed",
    "scorer.fitted": "quadsel.jobs.models: curvature fitted, reference not yet set",
    "score.call": "quadsel.jobs.selection_run: a probe scored, before the bandit sees the scores",
    "round.before_save": "quadsel.jobs.run_job: a bandit round done, state.json not yet written",
    "round.saved": "quadsel.jobs.run_job: state.json written for a round",
    "select.done": "quadsel.jobs.run_job: selection finished, nothing else written",
    "shards.shard": "quadsel.pipeline.shards: after each shard file is complete",
    "shards.withdrawn": "quadsel.pipeline.shards: the old manifest withdrawn, the old shards still live",
    "shards.installed": "quadsel.pipeline.shards: the new shard folder live, manifest not yet published",
    "run.before_summary": "quadsel.jobs.run_job: manifest published, summary.json not yet written",
}


class _Hits:
    """How often each point was reached in this process (a counter per process by design)."""

    counts: Counter[str] = Counter()


def point(name: str) -> None:
    """Kill this process here if ``QUADSEL_FAULT`` names this point and this hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _Hits.counts[name] += 1
    for item in spec.split(","):
        want, nth, action = (item.strip().split(":") + ["1", "kill"])[:3]
        if want == name and _Hits.counts[name] == int(nth or 1):
            sig = signal.SIGSTOP if action == "stop" else signal.SIGKILL
            sys.stderr.write(f"quadsel: fault injection: {sig.name} at {name}:{nth}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), sig)
