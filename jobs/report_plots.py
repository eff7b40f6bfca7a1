"""The figures of ``quadsel report``: matplotlib (Agg, no pyplot state) -> PNG data URIs.

Each function takes plain data and returns a ``data:image/png;base64,...`` string, or None
when there is nothing to draw. PNGs carry no software/date metadata, so the same run gives
the same bytes.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np

DPI = 100
BLUE, ORANGE, GREEN, GREY, RED = "#3b6fb6", "#e08a2c", "#3a9a5b", "#9a9a9a", "#c0392b"


def _figure(w: float, h: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.set_facecolor("white")
    for ax in axes:
        ax.grid(True, color="#e6e6e6", linewidth=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _integer_x(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(x: Any) -> np.ndarray:
    a = np.asarray(x if x is not None else [], dtype=np.float64)
    return a[np.isfinite(a)]


def composition(sizes: np.ndarray, selected: np.ndarray | None, *, top: int = 40) -> str:
    """Share of the pool vs share of the selection per cluster (largest clusters first)."""
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    if selected is not None:  # every cluster with a selection is shown, then the largest others
        taken = [c for c in order if selected[c] > 0]
        order = np.array(taken + [c for c in order if selected[c] == 0])
    shown = order[:top]
    rest = order[top:]
    labels = [str(c) for c in shown] + (["other"] if len(rest) else [])
    pool = np.append(sizes[shown], sizes[rest].sum()) if len(rest) else sizes[shown]
    pool = 100.0 * pool / max(sizes.sum(), 1)
    fig, (ax,) = _figure(max(7.0, 0.24 * len(labels) + 2), 3.6)
    x = np.arange(len(labels))
    if selected is not None:
        sel = np.append(selected[shown], selected[rest].sum()) if len(rest) else selected[shown]
        sel = 100.0 * sel / max(selected.sum(), 1)
        ax.bar(x - 0.2, pool, 0.4, color=GREY, label="pool")
        ax.bar(x + 0.2, sel, 0.4, color=BLUE, label="selection")
        ax.legend(frameon=False)
    else:
        ax.bar(x, pool, 0.6, color=GREY, label="pool")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_xlabel("cluster")
    ax.set_ylabel("% of rows")
    ax.set_title("pool vs. selection per cluster" if selected is not None else "pool rows per cluster")
    return to_data_uri(fig)


def score_distributions(probed: np.ndarray, selected_scored: np.ndarray,
                        rejected: np.ndarray) -> str | None:
    """Histograms of influence scores: every probed row, probed rows selected, probed rows not."""
    allv = _finite(np.concatenate([probed, selected_scored]))
    if allv.size == 0:
        return None
    lo, hi = np.percentile(allv, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    fig, (ax,) = _figure(7.5, 3.4)
    for values, color, label in ((_finite(probed), GREY, "probed (all)"),
                                 (_finite(rejected), RED, "probed, not selected"),
                                 (_finite(selected_scored), BLUE, "selected (scored)")):
        if values.size:
            ax.hist(np.clip(values, lo, hi), bins=bins, color=color, alpha=0.55,
                    label=f"{label}: n={values.size:,}, median {np.median(values):+.3g}")
    ax.set_xlabel("influence score (higher = lowers the reference loss more; clipped to 0.5-99.5%)")
    ax.set_ylabel("rows")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("influence score distributions")
    return to_data_uri(fig)


def trajectory(history: Sequence[dict[str, Any]]) -> str | None:
    """Bandit rounds: rewards of the pulled arms, cluster scores, clusters taken so far."""
    rounds = [h for h in history if h.get("phase") == "bandit"]
    if not rounds:
        return None
    fig, axes = _figure(12.0, 3.4, ncols=3)
    ax = axes[0]
    for explore, color, label in ((True, ORANGE, "explore (unknown arm)"), (False, BLUE, "exploit (by CS)")):
        xs = [h["round"] for h in rounds for e in h["explore"] if e is explore]
        ys = [r for h in rounds for r, e in zip(h["reward"], h["explore"]) if e is explore]
        if xs:
            ax.scatter(xs, ys, s=12, color=color, alpha=0.7, label=label)
    ax.plot([h["round"] for h in rounds], [float(np.mean(h["reward"])) for h in rounds],
            color="black", linewidth=1, label="mean per round")
    ax.axhline(0, color=GREY, linewidth=0.8, linestyle="--")
    ax.set(xlabel="round", ylabel="reward (normalised probe mean - tau)", title="reward per round")
    ax.legend(frameon=False, fontsize=7)
    ax = axes[1]
    top = [(h["round"], h["cs_top"][0][1]) for h in rounds if h.get("cs_top")]
    if top:
        ax.plot(*zip(*top), color=GREEN, label="best CS after the round")
    xs = [h["round"] for h in rounds for v in h["cs"] if v is not None]
    ys = [v for h in rounds for v in h["cs"] if v is not None]
    if xs:
        ax.scatter(xs, ys, s=12, color=BLUE, alpha=0.7, label="CS of exploited arms when pulled")
    ax.set(xlabel="round", ylabel="cluster score (UCB)", title="cluster score (CS) per round")
    ax.legend(frameon=False, fontsize=7)
    ax = axes[2]
    seen: set[int] = set()
    distinct, pulled = [], set()
    pulled_n = []
    for h in rounds:
        seen |= {c for c, t in zip(h["pulled"], h["taken"]) if t > 0}
        pulled |= set(h["pulled"])
        distinct.append(len(seen))
        pulled_n.append(len(pulled))
    x = [h["round"] for h in rounds]
    ax.step(x, pulled_n, where="post", color=GREY, label="clusters probed")
    ax.step(x, distinct, where="post", color=BLUE, label="clusters taken from")
    ax.set(xlabel="round", ylabel="clusters (cumulative)", title="clusters taken over time")
    ax.legend(frameon=False, fontsize=7)
    _integer_x(*axes)
    return to_data_uri(fig)


def budget_progress(history: Sequence[dict[str, Any]], budget: dict[str, Any] | None) -> str | None:
    """Budget used after each round (and the fill at the end, if any)."""
    pts = [(h["round"], h["used"], h.get("phase")) for h in history if "used" in h]
    if not pts:
        return None
    fig, (ax,) = _figure(7.5, 3.2)
    x = [p[0] for p in pts]
    ax.step(x, [p[1] for p in pts], where="post", color=BLUE, label="used")
    fills = [p for p in pts if p[2] == "fill"]
    if fills:
        ax.scatter([p[0] for p in fills], [p[1] for p in fills], color=ORANGE, zorder=3,
                   label="fill (taken without scoring)")
    calls = [(h["round"], h["scorer_calls"]) for h in history if "scorer_calls" in h]
    if calls:
        ax.step(*zip(*calls), where="post", color=GREY, linestyle=":", label="rows scored")
    unit = (budget or {}).get("unit", "")
    if budget and budget.get("amount"):
        ax.axhline(budget["amount"], color=RED, linestyle="--", linewidth=1,
                   label=f"budget {budget['amount']:,} {unit}")
    ax.set(xlabel="round", ylabel=unit or "budget", title="budget used over rounds")
    _integer_x(ax)
    ax.legend(frameon=False, fontsize=8)
    return to_data_uri(fig)


def centroid_map(centroids: np.ndarray, sizes: np.ndarray, colour: np.ndarray | None, colour_label: str,
                 selected: np.ndarray | None, *, diverging: bool = True, seed: int = 0) -> str | None:
    """Cluster centroids in 2-D (PCA), area by size, colour by a score, selected ones ringed."""
    if centroids is None or len(centroids) < 2 or np.ndim(centroids) != 2 or np.shape(centroids)[1] < 2:
        return None
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(centroids, np.float64))
    xy = xy * np.where(xy[np.argmax(np.abs(xy), axis=0), [0, 1]] < 0, -1, 1)  # sign convention
    fig, (ax,) = _figure(7.5, 5.6)
    area = 15 + 400 * np.sqrt(sizes / max(sizes.max(), 1))
    c = np.asarray(colour, dtype=np.float64) if colour is not None else None
    known = np.isfinite(c) if c is not None else np.zeros(len(sizes), bool)
    if (~known).any():
        ax.scatter(xy[~known, 0], xy[~known, 1], s=area[~known], color="#d0d0d0", alpha=0.8,
                   edgecolors="white", linewidths=0.5, label="no score")
    if known.any():
        lim = float(np.max(np.abs(c[known]))) or 1.0
        scale = dict(cmap="RdYlBu_r", vmin=-lim, vmax=lim) if diverging else dict(cmap="viridis")
        sc = ax.scatter(xy[known, 0], xy[known, 1], s=area[known], c=c[known], alpha=0.85,
                        edgecolors="white", linewidths=0.5, **scale)
        fig.colorbar(sc, ax=ax, label=colour_label, shrink=0.8)
    if selected is not None and (selected > 0).any():
        m = selected > 0
        ax.scatter(xy[m, 0], xy[m, 1], s=area[m] + 40, facecolors="none", edgecolors="black",
                   linewidths=1.3, label="selected from")
    label = set(np.argsort(-sizes, kind="stable")[:15].tolist())
    if selected is not None:
        label |= set(np.flatnonzero(selected > 0).tolist())
    for i in sorted(label):
        ax.annotate(str(i), xy[i], fontsize=7, ha="center", va="center")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="cluster centroids (PCA; area = size)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8, loc="best")
    return to_data_uri(fig)


def domain_mix(pool: dict[str, int], selection: dict[str, int]) -> str:
    names = sorted(set(pool) | set(selection), key=lambda d: (-pool.get(d, 0), d))
    p = np.array([pool.get(d, 0) for d in names], float)
    s = np.array([selection.get(d, 0) for d in names], float)
    fig, (ax,) = _figure(7.5, 0.35 * len(names) + 1.6)
    y = np.arange(len(names))
    ax.barh(y - 0.2, 100 * p / max(p.sum(), 1), 0.4, color=GREY, label="pool")
    ax.barh(y + 0.2, 100 * s / max(s.sum(), 1), 0.4, color=BLUE, label="selection")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="% of rows", title="domain mix (measured with the pool's `domain` field)")
    ax.legend(frameon=False)
    return to_data_uri(fig)


def timings(t: dict[str, float]) -> str | None:
    items = [(k, float(v)) for k, v in t.items() if k != "total" and isinstance(v, (int, float))]
    if not items:
        return None
    fig, (ax,) = _figure(7.5, 0.32 * len(items) + 1.4)
    y = np.arange(len(items))
    ax.barh(y, [v for _, v in items], color=BLUE)
    ax.set_yticks(y, [k for k, _ in items])
    ax.invert_yaxis()
    for yi, (_, v) in zip(y, items):
        ax.annotate(f" {v:.1f}s", (v, yi), va="center", fontsize=8)
    ax.set(xlabel="seconds", title="stage timings" + (f" (total {t['total']:.1f}s)" if "total" in t else ""))
    return to_data_uri(fig)
