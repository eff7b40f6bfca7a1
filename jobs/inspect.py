"""``quadsel inspect``: the cluster table of a run in the terminal, and one cluster's members.

The table shows per cluster: size, bandit statistics where the run has them (pulls, mean
reward ± sd, cluster score CS, rows selected), the top terms (TF-IDF over sampled members,
cached in ``clusters/top_terms.json``) and the texts nearest the centroid. It works on a
``quadsel cluster`` run (no bandit columns) and on baseline runs (no rewards) alike.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from quadsel.pipeline.store import PoolStore

from .layout import RunLayout
from .report_data import InspectError, summary_rows, top_terms
from .stages import snippet

__all__ = ["InspectError", "inspect_clusters", "inspect_cluster", "cluster_members", "selection_tables_problem"]

BANDIT_COLUMNS = ("pulls", "mean_reward", "reward_sd", "cs", "probed")


def _console() -> Console:
    """A terminal-width console; at least 150 columns when writing to a file or pipe."""
    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 150))


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fmt(v: Any, spec: str = ".3f") -> str:
    f = _num(v)
    return "–" if f is None else format(f, spec)


def _has(rows: list[dict[str, Any]], col: str) -> bool:
    """The column exists and holds at least one real value (baselines write all-null rewards)."""
    return any(_num(r.get(col)) is not None for r in rows)


def _terms(run_dir: Path, k: int) -> list[list[str]] | None:
    try:
        return top_terms(run_dir, k)
    except (OSError, ValueError) as e:  # a damaged cache or store: the table is still useful
        logging.getLogger(__name__).warning("top terms unavailable: %s", e)
        return None


def _sort_key(has_sel: bool, has_cs: bool):
    def key(r: dict[str, Any]):
        cs = _num(r.get("cs"))
        if has_sel:
            return (-(r.get("selected") or 0), -(cs if cs is not None else -math.inf), -r["size"], r["cluster"])
        return (-r["size"], r["cluster"])
    return key


def inspect_clusters(run_dir: str | Path, *, top: int = 20, console: Console | None = None) -> None:
    """Print the cluster table: most-selected clusters first (largest first for a cluster run)."""
    run_dir = Path(run_dir)
    rows = summary_rows(run_dir)
    if top < 1:
        raise InspectError(f"--top must be at least 1, got {top}")
    console = console or _console()
    has_sel = "selected" in (rows[0] if rows else {})
    has_reward, has_cs = _has(rows, "mean_reward"), _has(rows, "cs")
    has_pulls = any((r.get("pulls") or 0) > 0 for r in rows)
    stale = selection_tables_problem(run_dir)
    if stale:
        logging.getLogger(__name__).warning("%s", stale)
    terms = _terms(run_dir, len(rows))
    rows = sorted(rows, key=_sort_key(has_sel, has_cs))
    total = sum(r["size"] for r in rows)
    title = f"{run_dir}: {len(rows)} clusters, {total:,} rows"
    if has_sel:
        title += f", {sum(r.get('selected') or 0 for r in rows):,} selected"
    t = Table(title=title, show_lines=True, expand=True)
    t.add_column("cluster", justify="right", no_wrap=True)
    t.add_column("size", justify="right", no_wrap=True)
    if has_pulls:
        t.add_column("pulls", justify="right", no_wrap=True)
    if has_reward:
        t.add_column("reward ± sd", justify="right", no_wrap=True)
    if has_cs:
        t.add_column("CS", justify="right", no_wrap=True)
    if has_sel:
        t.add_column("selected", justify="right", no_wrap=True)
    t.add_column("neighbours", justify="right", max_width=14)
    if terms is not None:
        t.add_column("top terms", ratio=1, min_width=24)
    t.add_column("nearest the centroid", ratio=2, min_width=40)
    for r in rows[:top]:
        cells = [str(r["cluster"]), f"{r['size']:,}"]
        if has_pulls:
            cells.append(str(r.get("pulls") or 0))
        if has_reward:
            cells.append(f"{_fmt(r.get('mean_reward'), '+.2f')} ± {_fmt(r.get('reward_sd'), '.2f')}")
        if has_cs:
            cells.append(_fmt(r.get("cs"), "+.2f"))
        if has_sel:
            cells.append(f"{r.get('selected') or 0:,}")
        nb = r.get("neighbours") or []
        cells.append(", ".join(map(str, nb[:4])) + (f" +{len(nb) - 4}" if len(nb) > 4 else ""))
        if terms is not None:
            cells.append(", ".join(terms[r["cluster"]][:8]))
        cells.append("\n".join(f"• {snippet(s, 110)}" for s in (r.get("snippets") or [])[:2]))
        t.add_row(*cells)
    console.print(t)
    if not has_sel:
        console.print("[dim]no selection in this run (a `quadsel cluster` run): no bandit columns[/dim]")
    elif not has_reward:
        console.print("[dim]this run's selector keeps no cluster rewards (a baseline): no reward/CS columns[/dim]")
    if len(rows) > top:
        console.print(f"[dim]… {len(rows) - top} more clusters (--top N to show more)[/dim]")


def cluster_members(run_dir: str | Path, cluster: int, *,
                    rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One cluster's members, scored first (highest score first), then by similarity to the
    centroid. Each: row, id, similarity, score (None if never scored), status
    ("selected", "selected (fill)", "probed" or "")."""
    run_dir = Path(run_dir)
    rows = rows if rows is not None else summary_rows(run_dir)
    if not 0 <= cluster < len(rows):
        raise InspectError(f"--cluster {cluster} is out of range: this run has clusters 0..{len(rows) - 1}")
    assign = pq.read_table(RunLayout(run_dir).assignments,
                           filters=[("cluster", "==", cluster)]).to_pydict()
    scores: dict[int, float] = {}
    status: dict[int, str] = {}
    probes = RunLayout(run_dir).probes
    if probes.is_file():
        for r in pq.read_table(probes, filters=[("cluster", "==", cluster)]).to_pylist():
            if _num(r["score"]) is not None:
                scores[r["row"]] = r["score"]
            status[r["row"]] = "probed"
    sel_rows = RunLayout(run_dir).selected
    if sel_rows.is_file():
        for r in pq.read_table(sel_rows, filters=[("cluster", "==", cluster)]).to_pylist():
            status[r["row"]] = "selected (fill)" if r.get("fill") else "selected"
            if _num(r.get("score")) is not None:
                scores[r["row"]] = r["score"]
    out = [{"row": row, "id": id_, "similarity": float(sim), "score": scores.get(row),
            "status": status.get(row, "")}
           for row, id_, sim in zip(assign["row"], assign["id"], assign["similarity"])]
    out.sort(key=lambda m: (m["score"] is None, -(m["score"] or 0.0), -m["similarity"], m["row"]))
    return out


def inspect_cluster(run_dir: str | Path, cluster: int, *, top: int = 20,
                    console: Console | None = None) -> None:
    """List one cluster's members: scored ones first (highest score first), then the rest."""
    run_dir = Path(run_dir)
    if top < 1:
        raise InspectError(f"--top must be at least 1, got {top}")
    rows = summary_rows(run_dir)
    members = cluster_members(run_dir, cluster, rows=rows)
    info = rows[cluster]
    console = console or _console()
    shown = members[:top]
    store_dir = RunLayout(run_dir).pool_store
    if store_dir.is_dir():
        with PoolStore.open(store_dir) as store:
            texts = store.texts([m["row"] for m in shown])
    else:
        texts = ["(pool store missing: stages/sources/store)"] * len(shown)
    head = [f"cluster {cluster}: {info['size']:,} members"]
    if "selected" in info:
        head.append(f"{info.get('selected') or 0:,} selected")
    if _num(info.get("pulls")):
        head.append(f"{info['pulls']} pulls, reward {_fmt(info.get('mean_reward'), '+.2f')} ± "
                    f"{_fmt(info.get('reward_sd'), '.2f')}, CS {_fmt(info.get('cs'), '+.2f')}")
    head.append(f"neighbours {list(info.get('neighbours') or [])}")
    terms = _terms(run_dir, len(rows))
    n_scored = sum(m["score"] is not None for m in members)
    t = Table(title=", ".join(head), caption=f"{n_scored:,} of {len(members):,} members scored; "
              f"showing {len(shown):,} (--top N for more)", expand=True)
    for name, just in (("id", "left"), ("score", "right"), ("status", "left"), ("sim", "right")):
        t.add_column(name, justify=just, no_wrap=True)
    t.add_column("text", ratio=1)
    for m, text in zip(shown, texts):
        t.add_row(m["id"], _fmt(m["score"], "+.4f"), m["status"], f"{m['similarity']:.2f}", snippet(text, 140))
    if terms is not None:
        console.print(f"[bold]top terms:[/bold] {', '.join(terms[cluster])}")
    console.print(t)


def selection_tables_problem(run_dir: str | Path) -> str | None:
    """Whether ``clusters/summary.parquet`` describes the selection in the shards (its per-cluster
    ``selected`` counts are the shards' ``quadsel_cluster`` counts); None when it does, or when the
    run dir holds no selection or no cluster table. A table rewritten under a finished selection
    (an older ``quadsel cluster`` with another k did that) is named here, not shown as if it fit."""
    import pyarrow.ipc as ipc

    from quadsel.pipeline.shards import data_files, read_manifest

    run_dir = Path(run_dir)
    path = RunLayout(run_dir).cluster_summary
    if not RunLayout(run_dir).manifest.is_file() or not path.is_file():
        return None
    table = pq.read_table(path)
    fix = "rerun `quadsel run` with the selection's config to write the selection's tables again"
    if "selected" not in table.column_names:
        return (f"{path} has no selection columns (rewritten by `quadsel cluster`?): it does not describe "
                f"the selection; {fix}")
    fmt = read_manifest(run_dir)["format"]
    counts: dict[int, int] = {}
    for f in data_files(run_dir):
        t = pq.read_table(f, columns=["quadsel_cluster"]) if fmt == "parquet" else ipc.open_file(f).read_all()
        col = t.column("quadsel_cluster").to_numpy()
        for c, n in zip(*np.unique(col, return_counts=True)):
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    said = {int(c): int(n) for c, n in zip(table.column("cluster").to_pylist(), table.column("selected").to_pylist())
            if n}
    if said != counts:
        return (f"{path} does not describe the selection: its selected counts per cluster ({len(said)} clusters, "
                f"{sum(said.values())} rows) differ from the shards' quadsel_cluster ({len(counts)} clusters, "
                f"{sum(counts.values())} rows); {fix}")
    return None
