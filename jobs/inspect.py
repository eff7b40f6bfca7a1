"""``quadsel inspect``: the cluster table of a run in the terminal, and one cluster's members."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from pipeline.store import PoolStore

from .stages import snippet


class InspectError(ValueError):
    pass


def _summary(run_dir: Path):
    path = run_dir / "clusters" / "summary.parquet"
    if not path.is_file():
        raise InspectError(f"{run_dir} has no clusters/summary.parquet: is it a quadsel run directory "
                           f"whose cluster stage finished? (run `quadsel cluster` or `quadsel run` first)")
    return pq.read_table(path).to_pylist()


def _console() -> Console:
    """A terminal-width console; at least 150 columns when writing to a file or pipe."""
    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 150))


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if v != v else format(v, spec)
    return str(v)


def inspect_clusters(run_dir: str | Path, *, top: int = 20, console: Console | None = None) -> None:
    run_dir = Path(run_dir)
    rows = _summary(run_dir)
    console = console or _console()
    has_sel = "selected" in (rows[0] if rows else {})
    key = (lambda r: (-r["selected"], -r["size"])) if has_sel else (lambda r: -r["size"])
    rows = sorted(rows, key=key)
    title = f"{run_dir}: {len(rows)} clusters, {sum(r['size'] for r in rows):,} rows"
    t = Table(title=title, show_lines=False, expand=True)
    t.add_column("cluster", justify="right", no_wrap=True)
    t.add_column("size", justify="right", no_wrap=True)
    if has_sel:
        for name in ("pulls", "reward ± sd", "CS", "selected"):
            t.add_column(name, justify="right", no_wrap=True)
    t.add_column("neighbours", justify="right", max_width=14)
    if "top_terms" in rows[0]:
        t.add_column("top terms", max_width=28)
    t.add_column("nearest the centroid", ratio=1, min_width=40)
    for r in rows[:top]:
        cells = [str(r["cluster"]), f"{r['size']:,}"]
        if has_sel:
            cells += [str(r["pulls"]), f"{_fmt(r['mean_reward'], '+.2f')} ± {_fmt(r['reward_sd'], '.2f')}",
                      _fmt(r["cs"], "+.2f"), f"{r['selected']:,}"]
        nb = r["neighbours"] or []
        cells.append(", ".join(map(str, nb[:4])) + (f" +{len(nb) - 4}" if len(nb) > 4 else ""))
        if "top_terms" in r:
            cells.append(", ".join((r["top_terms"] or [])[:6]))
        cells.append("\n".join(f"• {s[:110]}" for s in (r["snippets"] or [])[:2]))
        t.add_row(*cells)
    console.print(t)
    if len(rows) > top:
        console.print(f"[dim]… {len(rows) - top} more clusters (--top N to show more)[/dim]")


def inspect_cluster(run_dir: str | Path, cluster: int, *, top: int = 20,
                    console: Console | None = None) -> None:
    """List one cluster's members: scored ones first (highest score first), then the rest."""
    run_dir = Path(run_dir)
    rows = _summary(run_dir)
    if not 0 <= cluster < len(rows):
        raise InspectError(f"--cluster {cluster} is out of range: this run has clusters 0..{len(rows) - 1}")
    info = rows[cluster]
    console = console or _console()
    assign = pq.read_table(run_dir / "clusters" / "assignments.parquet",
                           filters=[("cluster", "==", cluster)]).to_pydict()
    scores: dict[int, float] = {}
    status: dict[int, str] = {}
    probes = run_dir / "bandit" / "probes.parquet"
    if probes.is_file():
        for r in pq.read_table(probes, filters=[("cluster", "==", cluster)]).to_pylist():
            scores[r["row"]] = r["score"]
            status[r["row"]] = "probed"
    sel_rows = run_dir / "bandit" / "selected.parquet"
    if sel_rows.is_file():
        for r in pq.read_table(sel_rows, filters=[("cluster", "==", cluster)]).to_pylist():
            status[r["row"]] = "selected"
            if r.get("score") is not None and r["score"] == r["score"]:
                scores[r["row"]] = r["score"]
    members = list(zip(assign["row"], assign["id"], assign["similarity"]))
    members.sort(key=lambda m: (m[0] not in scores, -scores.get(m[0], 0.0), -m[2]))
    shown = members[:top]
    store = PoolStore.open(run_dir / "stages" / "sources" / "store")
    texts = store.texts([m[0] for m in shown])
    t = Table(title=f"cluster {cluster}: {info['size']:,} members, neighbours {info['neighbours']}",
              expand=True)
    for name, just in (("id", "left"), ("score", "right"), ("status", "left"), ("sim", "right")):
        t.add_column(name, justify=just)
    t.add_column("text", ratio=1)
    for (row, id_, sim), text in zip(shown, texts):
        t.add_row(id_, _fmt(scores.get(row), "+.4f"), status.get(row, ""), f"{sim:.2f}", snippet(text, 140))
    console.print(t)
