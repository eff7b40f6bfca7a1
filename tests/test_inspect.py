"""`quadsel inspect`: the cluster table, one cluster's members, top terms, and clear errors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import small_job
from rich.console import Console

from quadsel.jobs.cli import main
from quadsel.jobs.config import JobConfig
from quadsel.jobs.inspect import InspectError, cluster_members, inspect_cluster, inspect_clusters
from quadsel.jobs.layout import RunLayout
from quadsel.jobs.report_data import top_terms
from quadsel.pipeline.cluster import cluster_top_terms
from quadsel.pipeline.sources import Example
from quadsel.pipeline.store import PoolStore


def shared_runs(tmp_path_factory) -> dict[str, Path]:
    """One small quad run, one random-baseline run and one cluster-only run on the same corpus,
    built once per test session (test_report.py reuses them)."""
    from quadsel.jobs.cluster_job import run_cluster
    from quadsel.jobs.run_job import run_selection

    root = tmp_path_factory.getbasetemp() / "quadsel-inspect-runs"
    runs = {"quad": root / "run", "random": root / "random-run", "cluster": root / "cluster-run"}
    root.mkdir(exist_ok=True)
    if not (runs["quad"] / "summary.json").is_file():
        run_selection(JobConfig.model_validate(small_job(root)))
    if not (runs["random"] / "summary.json").is_file():
        run_selection(JobConfig.model_validate(small_job(root, method="random", run_dir=str(runs["random"]))))
    if not (runs["cluster"] / "clusters" / "cluster_job.json").is_file():
        cfg = small_job(root, run_dir=str(runs["cluster"]))
        del cfg["reference"]
        run_cluster(JobConfig.model_validate(cfg))
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return shared_runs(tmp_path_factory)


def _console() -> Console:
    return Console(record=True, width=200, color_system=None)


def _first_lines(text: str) -> dict[int, list[str]]:
    """Cells of each table row's first line, keyed by the first cell's integer."""
    out = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            if cells and cells[0].isdigit():
                out[int(cells[0])] = cells
    return out


def _header(text: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith("┃"):
            return [c.strip() for c in line.split("┃")[1:-1]]
    raise AssertionError("no table header in:\n" + text)


def test_cluster_table_columns_and_values(runs):
    run = runs["quad"]
    c = _console()
    inspect_clusters(run, top=100, console=c)
    text = c.export_text()
    head = _header(text)
    assert head[:7] == ["cluster", "size", "pulls", "reward ± sd", "CS", "selected", "neighbours"]
    assert head[-2:] == ["top terms", "nearest the centroid"]
    summary = pq.read_table(run / "clusters" / "summary.parquet").to_pylist()
    terms = top_terms(run, len(summary))
    assert RunLayout(run).top_terms.is_file()
    rows = _first_lines(text)
    assert set(rows) == {r["cluster"] for r in summary}  # every cluster shown (top=100 > k)
    for r in summary:
        cells = rows[r["cluster"]]
        assert cells[1] == f"{r['size']:,}"
        assert cells[2] == str(r["pulls"])
        if r["mean_reward"] is not None and not math.isnan(r["mean_reward"]):
            assert cells[3].startswith(f"{r['mean_reward']:+.2f} ±")
        if r["cs"] is not None and not math.isnan(r["cs"]):
            assert cells[4] == f"{r['cs']:+.2f}"
        assert cells[5] == f"{r['selected']:,}"
        assert terms[r["cluster"]][0] in cells[7]  # top terms wrap; the first is on the first line
    # the most-selected cluster comes first
    order = [int(line.split("│")[1]) for line in text.splitlines()
             if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert order[0] == max(summary, key=lambda r: (r["selected"], r["cs"] or -1e9))["cluster"]
    assert sum(r["selected"] for r in summary) == 60 and "60 selected" in text


def test_top_and_baseline_and_cluster_runs(runs):
    c = _console()
    inspect_clusters(runs["quad"], top=3, console=c)
    text = c.export_text()
    assert len(_first_lines(text)) == 3 and "more clusters (--top N" in text

    c = _console()
    inspect_clusters(runs["cluster"], top=5, console=c)
    text = c.export_text()
    head = _header(text)
    assert "pulls" not in head and "CS" not in head and "selected" not in head
    assert head[:2] == ["cluster", "size"] and "top terms" in head
    sizes = [int(cells[1].replace(",", "")) for cells in _first_lines(text).values()]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    assert "no bandit columns" in text

    c = _console()
    inspect_clusters(runs["random"], top=5, console=c)
    head = _header(c.export_text())
    assert "selected" in head and "CS" not in head and "reward ± sd" not in head


def test_cluster_members_scored_first_by_score(runs):
    run = runs["quad"]
    summary = pq.read_table(run / "clusters" / "summary.parquet").to_pylist()
    probed = [r for r in summary if r["pulls"]]
    assert probed
    cl = max(probed, key=lambda r: (r["probed"], -r["cluster"]))["cluster"]
    members = cluster_members(run, cl)
    assert len(members) == summary[cl]["size"]
    scored = [m for m in members if m["score"] is not None]
    n = len(scored)
    assert n > 0 and all(m["score"] is not None for m in members[:n])
    assert all(m["score"] is None for m in members[n:])
    s = [m["score"] for m in scored]
    assert s == sorted(s, reverse=True)
    rest = [m["similarity"] for m in members[n:]]
    assert rest == sorted(rest, reverse=True)
    probes = pq.read_table(run / "bandit" / "probes.parquet").to_pydict()
    want = {r for r, c in zip(probes["row"], probes["cluster"]) if c == cl}
    assert {m["row"] for m in scored} == want
    assert {m["status"] for m in scored} <= {"probed", "selected", "selected (fill)"}

    c = _console()
    inspect_cluster(run, cl, top=5, console=c)
    text = c.export_text()
    assert f"cluster {cl}:" in text and "top terms:" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("│") and ln.split("│")[1].strip()]
    first = [x.strip() for x in lines[0].split("│")[1:-1]]
    assert first[0] == members[0]["id"] and first[1] == f"{members[0]['score']:+.4f}"
    assert f"{n:,} of {len(members):,} members scored" in text


def test_clear_errors(runs, tmp_path, capsys):
    with pytest.raises(InspectError, match="no clusters/summary.parquet"):
        inspect_clusters(tmp_path)
    with pytest.raises(InspectError, match="no such directory"):
        inspect_clusters(tmp_path / "nope")
    k = pq.read_metadata(runs["quad"] / "clusters" / "summary.parquet").num_rows
    for bad in (k, -1):
        with pytest.raises(InspectError, match=rf"--cluster {bad} is out of range: this run has clusters 0..{k - 1}"):
            inspect_cluster(runs["quad"], bad)
    assert main(["inspect", str(tmp_path), "-q"]) == 2
    assert "quadsel inspect: error:" in capsys.readouterr().err
    assert main(["inspect", str(runs["quad"]), "--cluster", str(k), "-q"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_top_terms_rank_cluster_words_deterministically(tmp_path):
    fruit = ["apple banana smoothie with fresh mango", "banana bread and apple pie recipe",
             "mango apple banana salad for the summer", "apple orchard banana farm"]
    space = ["rocket engine thrust and orbit", "orbit insertion after rocket engine burn",
             "the rocket reached orbit", "engine test of the rocket stage"]
    texts = fruit + space
    ex = [Example(id=f"r{i}", text=t, meta={}, source="x", line=i) for i, t in enumerate(texts)]
    store = PoolStore.write([ex], tmp_path / "store")
    assign = np.array([0] * 4 + [1] * 4)
    terms = cluster_top_terms(store, assign, 2, n_terms=3)
    assert set(terms[0]) <= {"apple", "banana", "mango"} and terms[0][:2] == ["apple", "banana"]
    assert terms[1][:3] == ["engine", "orbit", "rocket"]  # equal scores: alphabetical
    assert "the" not in terms[1]  # stop words never rank
    assert cluster_top_terms(store, assign, 2, n_terms=3) == terms
    assert cluster_top_terms(store, assign, 2, n_terms=3, sample=2, seed=1)  # sampled: still terms
