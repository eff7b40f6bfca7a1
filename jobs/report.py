"""``quadsel report RUN_DIR``: one self-contained HTML page on why the data was chosen.

No external resources at all: the figures are PNG data URIs drawn with matplotlib (Agg), the
CSS is inline, there is no script. Sections (each ``<section id=...>`` with an ``<h2>``):
overview, composition, scores, trajectory, centroid-map, budget, domains, rejects, timings,
config. A part the run does not have (a ``quadsel cluster`` run has no selection, baselines
have no bandit rounds) keeps its section and says what is missing and why.
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quadsel.core.atomic import atomic_write_text
from quadsel.core.errors import ReportError
from quadsel.core.progress import Progress
from quadsel.pipeline.demo import NOISE_DOMAINS, noise_share

from . import report_plots as plots
from .layout import RunLayout
from .report_data import RunData, load_run, top_terms
from .stages import snippet

logger = logging.getLogger(__name__)


STAGE_ORDER = ("sources", "reference", "embed", "cluster", "proxy", "tokens", "fit_scorer", "select", "total")
SECTIONS = ("overview", "composition", "scores", "trajectory", "centroid-map", "budget", "domains",
            "rejects", "timings", "config")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
header{background:#243b55;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}nav{padding:8px 28px;background:#fff;border-bottom:1px solid #ddd;position:sticky;top:0}
nav a{margin-right:14px;color:#243b55;text-decoration:none;font-weight:600}
main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:8px 20px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.missing{color:#8a5a00;background:#fff6e0;border-left:4px solid #e0a030;padding:6px 10px}
.note{color:#555;font-size:13px}pre{background:#f4f4f4;padding:10px;overflow:auto;font-size:12px}
.snip{color:#444;font-size:12px;max-width:520px}
"""


# -- html helpers --------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, spec: str = ",") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float, np.integer, np.floating)) else _e(v)


def _table(head: list[str] | None, rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are HTML already (escape text with ``_e``); no header if ``head`` is None."""
    th = f"<thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{th}<tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else ""


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _col(data: RunData, name: str) -> np.ndarray:
    return np.array([np.nan if r.get(name) is None else float(r[name]) for r in data.clusters], np.float64)


def _selected_per_cluster(data: RunData) -> np.ndarray | None:
    if not data.clusters or "selected" not in data.clusters[0]:
        return None
    return np.array([r.get("selected") or 0 for r in data.clusters], np.int64)


def _method(data: RunData) -> str:
    return str((data.summary or {}).get("method", "cluster only"))


# -- sections ------------------------------------------------------------------------------------
def _overview(data: RunData, _terms) -> str:
    s = data.summary
    if s is None:
        cj = data.cluster_job or {}
        rows = [["kind", "clustering only (`quadsel cluster`): no selection"],
                ["pool rows", _num(cj.get("rows", sum(r["size"] for r in data.clusters)))],
                ["clusters", _num(data.k)], ["backend", _e(cj.get("backend", "–"))]]
        if cj.get("cluster_size"):
            cs = cj["cluster_size"]
            rows.append(["cluster size min / median / max", f"{cs['min']} / {cs['median']:g} / {cs['max']}"])
        return _table(None, rows)
    b = s.get("budget") or {}
    rows = [["method", _e(s.get("method"))], ["pool rows", _num(s.get("pool_rows"))],
            ["selected", _num(s.get("selected"))],
            ["budget", f"{_num(s.get('used'))} of {_num(b.get('amount'))} {_e(b.get('unit', ''))} used"
                       f" (met: {_e(s.get('budget_met'))})"],
            ["scorer calls", f"{_num(s.get('scorer_calls'))} rows ({_num(s.get('scored_share'), '.1%')} of the pool)"],
            ["rounds", _num(s.get("rounds"))],
            ["clusters taken", f"{_num(s.get('clusters_taken'))} of {_num(s.get('clusters'))}"],
            ["rows filled without scoring", _num(s.get("filled"))],
            ["shards", _num(s.get("shards"))]]
    out = _table(None, rows)
    notes = s.get("notes") or []
    if notes:
        out += "<p><b>selector notes</b></p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return out


def _composition(data: RunData, terms: list[list[str]] | None) -> str:
    sizes = np.array([r["size"] for r in data.clusters], np.int64)
    sel = _selected_per_cluster(data)
    out = _img(plots.composition(sizes, sel), "pool vs selection per cluster")
    if sel is None:
        out += _missing("no selection in this run: the pool's cluster sizes only")
    reward, cs = _col(data, "mean_reward"), _col(data, "cs")
    bandit = sel is not None and bool(np.isfinite(reward).any() or np.isfinite(cs).any())
    order = np.lexsort((np.arange(data.k), -sizes, -(sel if sel is not None else np.zeros(data.k))))[:30]
    tot_sel = max(int(sel.sum()), 1) if sel is not None else 1
    rows = []
    for c in order:
        r = data.clusters[c]
        row = [str(c), _num(int(sizes[c])), _num(100 * sizes[c] / max(sizes.sum(), 1), ".1f")]
        if sel is not None:
            row += [_num(int(sel[c])), _num(100 * sel[c] / tot_sel, ".1f")]
        if bandit:
            row += [_num(r.get("pulls")), _num(reward[c], "+.2f"), _num(cs[c], "+.2f")]
        row += [_e(", ".join(terms[c])) if terms else "–",
                f'<div class="snip">{_e(snippet((r.get("snippets") or [""])[0], 160))}</div>']
        rows.append(row)
    head = (["cluster", "size", "pool %"] + (["selected", "selection %"] if sel is not None else [])
            + (["pulls", "mean reward", "CS"] if bandit else []) + ["top terms", "nearest the centroid"])
    which = "with the most selected rows (then the largest)" if sel is not None else "largest"
    out += (f'<p class="note">The {len(order)} {which} clusters; <code>quadsel inspect {_e(data.run_dir)} '
            f"--cluster N</code> lists a cluster's members with their scores.</p>")
    return out + _table(head, rows, numeric=set(range(1, len(head) - 2)))


def _scores(data: RunData, _terms) -> str:
    if data.probes is None and data.selected is None:
        return _missing("no influence scores: this run did not select (no bandit/probes.parquet)")
    probed = np.asarray((data.probes or {}).get("score", []), np.float64)
    prow = np.asarray((data.probes or {}).get("row", []), np.int64)
    sel = data.selected or {}
    srow = np.asarray(sel.get("row", []), np.int64)
    sscore = np.asarray(sel.get("score", []), np.float64)
    fill = np.asarray(sel.get("fill", np.zeros(len(srow), bool)), bool)
    sel_scored = sscore[np.isfinite(sscore) & ~fill]
    rejected = probed[~np.isin(prow, srow)]
    uri = plots.score_distributions(probed, sel_scored, rejected)
    if uri is None:
        return _missing(f"no influence scores: the {_method(data)} selector scored no rows")
    n_unscored = int((~np.isfinite(sscore)).sum())
    note = (f"{len(probed):,} rows probed (scored); {len(srow):,} selected, of which {len(sel_scored):,} "
            f"have a score and {n_unscored:,} were taken without being scored "
            f"(the rest of an accepted cluster's probe window, or a fill).")
    return _img(uri, "influence score distributions") + f'<p class="note">{_e(note)}</p>'


def _trajectory(data: RunData, _terms) -> str:
    uri = plots.trajectory(data.history or [])
    if uri is None:
        why = ("no bandit history (bandit/history.json)" if data.history is None
               else f"the {_method(data)} selector has no bandit rounds")
        return _missing(f"no bandit trajectory: {why}")
    rounds = [h for h in data.history if h.get("phase") == "bandit"]
    acc = sum(sum(h["accepted"]) for h in rounds)
    pulls = sum(len(h["pulled"]) for h in rounds)
    return _img(uri, "bandit trajectory") + (
        f'<p class="note">{len(rounds)} bandit rounds, {pulls} arm pulls, {acc} accepted '
        f"(reward &gt; 0: the cluster's probe window was taken).</p>")


def _centroid_map(data: RunData, _terms) -> str:
    if data.centroids is None:
        return _missing("no centroids (stages/cluster/result/centroids.npy is missing)")
    sizes = np.array([r["size"] for r in data.clusters], np.float64)
    for name, label in (("mean_reward", "mean reward"), ("cs", "cluster score (CS)"),  # noqa: B007 - read after the break
                        ("mean_similarity", "mean cosine similarity to the centroid (no scores in this run)")):
        colour = _col(data, name)
        if np.isfinite(colour).any():
            break
    else:
        colour, label = None, ""
    uri = plots.centroid_map(data.centroids, sizes, colour, label.split(" (")[0], _selected_per_cluster(data),
                             diverging=name != "mean_similarity")
    if uri is None:
        return _missing("fewer than two clusters: nothing to map")
    note = "Colour: " + (label if colour is not None else "none (this run has no cluster scores)") + \
           "; black rings: clusters the selection took rows from; numbers: the selected and the largest clusters."
    return _img(uri, "cluster centroid map") + f'<p class="note">{_e(note)}</p>'


def _budget(data: RunData, _terms) -> str:
    s = data.summary or {}
    if not data.is_selection:
        return _missing("no selection in this run: no budget")
    uri = plots.budget_progress(data.history or [], s.get("budget"))
    b = s.get("budget") or {}
    line = f"{_num(s.get('used'))} of {_num(b.get('amount'))} {_e(b.get('unit', ''))} used."
    if uri is None:
        return f"<p>{line}</p>" + _missing(f"no per-round budget record: the {_method(data)} "
                                           "selector takes its rows in one step")
    return _img(uri, "budget progress") + f"<p>{line}</p>"


def _domains(data: RunData, _terms) -> str:
    mix = data.domain_mix
    if not mix:
        return _missing("no domain mix: the pool has no `domain` field (or the run did not select)")
    out = ('<p class="note">Measured with the pool\'s <code>domain</code> field, which the selector '
           "never reads: this shows what the selection contains, not how it was chosen.</p>")
    out += _img(plots.domain_mix(mix.get("pool", {}), mix.get("selection", {})), "domain mix")
    noise = noise_share(mix)
    if noise:
        out += (f"<p>noise share ({', '.join(NOISE_DOMAINS)}): pool {_num(noise.get('pool'), '.1%')}, "
                f"selection {_num(noise.get('selection'), '.1%')}</p>")
    p, s = mix.get("pool", {}), mix.get("selection", {})
    rows = [[_e(d), _num(p.get(d, 0)), _num(s.get(d, 0))] for d in sorted(set(p) | set(s))]
    return out + _table(["domain", "pool", "selection"], rows, numeric={1, 2})


def _rejects(data: RunData, _terms) -> str:
    rj = data.rejects
    if not rj.get("present"):
        return _missing("no rejects.jsonl in this run")
    by_reason = rj["by_reason"]
    if not by_reason:
        return "<p>No row was rejected or truncated.</p>"
    rows = [[_e(r), _num(n), "kept (shortened to max_chars)" if r == "truncated" else "rejected"]
            for r, n in by_reason.items()]
    out = _table(["reason", "lines", "what happened"], rows, numeric={1})
    out += "<p><b>by file</b></p>" + _table(
        ["file", "reason", "lines"], [[_e(f), _e(r), _num(n)] for f, r, n in rj["by_file"][:20]], numeric={2})
    ex = [[_e(r), _e(f"{e.get('file')}:{e.get('line')}"), _e(e.get("id") or "–"),
           _e(snippet(str(e.get("detail", "")), 120))]
          for r, es in rj["examples"].items() for e in es]
    out += "<p><b>examples</b></p>" + _table(["reason", "file:line", "id", "detail"], ex)
    if rj.get("unreadable_lines"):
        out += _missing(f"{rj['unreadable_lines']} lines of rejects.jsonl could not be parsed")
    return out


def _timings(data: RunData, _terms) -> str:
    if not data.timings:
        return _missing("no timings recorded (timings.json / summary.json missing)")
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    ordered = dict(sorted(data.timings.items(), key=lambda kv: (order.get(kv[0], len(order) - 1), kv[0])))
    rows = [[_e(k), _num(float(v), ".2f")] for k, v in ordered.items()]
    out = _img(plots.timings(ordered), "stage timings") + _table(["stage", "seconds"], rows, numeric={1})
    if data.stages:
        rows = [[_e(k), f"<code>{_e(snippet(json.dumps(v, sort_keys=True), 240))}</code>"]
                for k, v in data.stages.items()]
        out += "<p><b>cached stages</b></p>" + _table(["stage", "info"], rows)
    return out


def _config(data: RunData, _terms) -> str:
    if data.config_text is None:
        return _missing("no config.resolved.yaml in this run")
    return f"<pre>{_e(data.config_text)}</pre>"


BUILDERS: dict[str, tuple[str, Callable[[RunData, Any], str]]] = {
    "overview": ("Overview", _overview),
    "composition": ("Pool vs. selection per cluster", _composition),
    "scores": ("Influence scores: probed vs. selected", _scores),
    "trajectory": ("Bandit trajectory", _trajectory),
    "centroid-map": ("Cluster map", _centroid_map),
    "budget": ("Budget progress", _budget),
    "domains": ("Domain mix (measurement only)", _domains),
    "rejects": ("Rejected and truncated rows", _rejects),
    "timings": ("Stage timings", _timings),
    "config": ("Config", _config),
}


def build_report(run_dir: str | Path) -> str:
    """The report of a run directory as one HTML string."""
    data = load_run(run_dir)
    with Progress("report", total=len(SECTIONS) + 1, unit="sections") as prog:
        try:
            terms = top_terms(data.run_dir, data.k)
        except (OSError, ValueError) as e:
            logger.warning("report: top terms unavailable: %s", e)
            terms = None
        prog.advance(1)
        parts = []
        for sid in SECTIONS:
            title, fn = BUILDERS[sid]
            logger.debug("report: section %s", sid)
            parts.append(_section(sid, title, fn(data, terms)))
            prog.advance(1)
    nav = "".join(f'<a href="#{sid}">{_e(BUILDERS[sid][0].split(":")[0].split(" (")[0])}</a>' for sid in SECTIONS)
    sub = f"{_method(data)} · {data.k} clusters · {_e(data.run_dir)}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>quadsel report: {_e(data.run_dir.name)}</title><style>{CSS}</style></head>\n"
            f"<body><header><h1>quadsel report: why this data was chosen</h1><p>{sub}</p></header>"
            f"<nav>{nav}</nav>\n<main>\n" + "\n".join(parts) + "\n</main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default ``RUN_DIR/report.html``) atomically; return its path."""
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else RunLayout(run_dir).report
    if target.is_dir():
        target = target / "report.html"
    text = build_report(run_dir)
    try:
        atomic_write_text(target, text)
    except OSError as e:
        raise ReportError(f"cannot write {target}: {e}") from None
    logger.info("report: wrote %s (%.0f KiB)", target, len(text.encode()) / 1024)
    return target
