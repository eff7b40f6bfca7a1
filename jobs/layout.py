"""Every path of a run directory, named once.

::

    RUN/config.resolved.yaml     the config the selection on disk was made with
    RUN/manifest.json            the published selection (quadsel.pipeline.shards)
    RUN/selection/               its shards; RUN/README.md its dataset card
    RUN/summary.json             the run's summary (its run_key says which config finished)
    RUN/_DONE.json               the selection's completion marker (pipeline.stage.write_marker:
                                 the run key, checksums of manifest.json and summary.json)
    RUN/timings.json             seconds per stage
    RUN/rejects.jsonl            every rejected input row, all sources merged
    RUN/logs/run.jsonl           the run's log, one JSON object per line (cluster.jsonl: quadsel cluster)
    RUN/clusters/                summary.parquet, assignments.parquet, top_terms.json,
                                 cluster_job.json (quadsel cluster)
    RUN/bandit/                  state.json (per-round checkpoint), history.json, probes.parquet,
                                 selected.parquet
    RUN/stages/<name>/           cached stages (quadsel.pipeline.stage), e.g. sources/store
    RUN/report.html              quadsel report
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quadsel.pipeline.stage import DONE


@dataclass(frozen=True)
class RunLayout:
    root: Path  # a str is taken too

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- top level: what describes the selection
    @property
    def config_resolved(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def done(self) -> Path:
        return self.root / DONE

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_log(self) -> Path:
        return self.logs / "run.jsonl"

    @property
    def cluster_log(self) -> Path:
        return self.logs / "cluster.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # -- clusters/
    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def cluster_summary(self) -> Path:
        return self.clusters / "summary.parquet"

    @property
    def assignments(self) -> Path:
        return self.clusters / "assignments.parquet"

    @property
    def top_terms(self) -> Path:
        return self.clusters / "top_terms.json"

    @property
    def cluster_job(self) -> Path:
        return self.clusters / "cluster_job.json"

    # -- bandit/
    @property
    def bandit(self) -> Path:
        return self.root / "bandit"

    @property
    def bandit_state(self) -> Path:
        return self.bandit / "state.json"

    @property
    def bandit_history(self) -> Path:
        return self.bandit / "history.json"

    @property
    def probes(self) -> Path:
        return self.bandit / "probes.parquet"

    @property
    def selected(self) -> Path:
        return self.bandit / "selected.parquet"

    # -- stages/
    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage(self, name: str) -> Path:
        return self.stages / name

    @property
    def pool_store(self) -> Path:
        return self.stage("sources") / "store"

    def stage_rejects(self, name: str) -> Path:
        return self.stage(name) / "rejects.jsonl"
