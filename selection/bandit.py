"""Quad's cluster bandit (ICLR 2025, arXiv 2409.16986), as a resumable round-based selector.

Clusters of the pool are the arms. Each round:

1. **Choose arms.** The ``arms_per_round`` pullable clusters (members left) come first if they
   are *unknown* — never pulled and no reward received from a neighbour — in a fixed seeded
   random order, so that no region of the pool stays unseen; remaining slots go to the known
   clusters with the highest cluster score CS (ties: lower cluster id). An exhausted cluster (no
   members left to probe or take) is never chosen again.
2. **Probe.** Each chosen cluster scores its next ``probe_size`` not-yet-probed members. Every
   cluster's members are visited in a seeded random permutation (derived from (seed, cluster)),
   so "the next members" are a sample without replacement.
3. **Normalise and reward.** A raw score ``s`` becomes ``z = (s - mu) / sigma`` (``normalize=
   "zscore"``, the default) where mu and sigma are the mean and standard deviation of the
   *exploration probes*: every score of a pull of an unknown cluster. Unknown clusters are picked
   in a seeded random order, so these probes are an unbiased sample of the pool's clusters (each
   cluster counted once, whatever its size), and
   the reference does not drift upwards as the bandit concentrates on good clusters later on.
   ``tau`` and ``alpha`` are therefore in standard deviations of a typical cluster's score, for
   any scorer and any model: tau = 0.5 accepts a cluster whose probes average half a standard
   deviation above the typical cluster. (If the reference has no spread yet, scores are centred
   but not scaled.) ``normalize="none"`` uses raw scores as Quad's script does (alpha, tau in
   score units). The reward of a pull is ``r = mean(z over its probes) - tau``.
4. **Share the reward.** The pulled cluster receives ``r`` with weight 1, and every neighbour
   ``j`` at cosine distance ``d < gamma`` receives it with weight ``1 - d / gamma`` (pairs at
   ``d >= gamma`` carry no weight and are ignored).
5. **Cluster score.** ``CS_c = R_c + alpha * sqrt(2 ln N / (n_c + 1))`` where ``n_c`` is the
   number of times ``c`` itself was pulled, ``N`` the total number of pulls so far (bonus 0 while
   ``N <= 1``), and the *mean propagated reward* ``R_c = sum(w * r) / sum(w)`` over every reward
   ``c`` received (its own pulls and its neighbours'). Because z is affine in s, the selector
   stores the weighted sums of *raw* probe means and re-expresses every received reward on the
   current reference when it computes CS, so rewards received in different rounds are always on
   one scale. (Quad's script divides by the number of rewards received instead of by their
   weights and counts neighbour rewards in ``n_c``; here the mean is weighted, and ``n_c``
   counts the cluster's own pulls like the paper's T(C_i).)
6. **Take.** A pull with ``r > 0`` is accepted: the cluster's next ``take_size`` members (the
   probed ones first) are selected. With ``exclude_negative`` a probed member whose own reward
   ``z - tau`` is negative is left out (the window is not topped up). A rejected pull consumes
   only its probes.

**Allocation.** With ``allocation="softmax"`` (default) every cluster has a share of the budget,
``cap_c exp(q_c / T)`` normalised and water-filled (``quotas()``; ``q_c`` from ``quality()``, the
empirical-Bayes shrunken mean z): arms are chosen among clusters with room in their share, an
accepted pull takes at most that room (its probed rows best first), and the fill first gives
every cluster its room. See ``selection.config`` for the rule and why. ``"greedy"`` is Quad's
rule as described in 6 and below.

**Budget.** Takes stop exactly at the budget. Examples: the last take is cut to the rows that
remain. Tokens: members are taken in order while they fit and a member that does not fit is
skipped (it can never fit later, since the remainder only shrinks); the budget is never exceeded
and the run ends when it is exhausted or no unselected row fits any more.

**Scoring budget.** With ``score_budget`` (``QuadConfig.scaled``: 10% of the pool's rows) a
round pulls only as many of its arms (in choice order) as fit what is left of the scoring budget.

**When the bandit runs dry.** If budget is left when ``max_rounds`` rounds have run, every
cluster has been probed out, the scoring budget has no room for another probe, or
(``patience``) that many rounds in a row, once no unknown cluster
is left, accepted no pull, and ``fill`` is on (default), the rest of the budget is filled
without further scoring: clusters in descending CS (unknown clusters get the reward of a typical
cluster, i.e. a mean z of 0, plus their bonus), members in each cluster's permutation order,
skipping rows already selected or excluded as negative. These rows have ``fill=True`` and
``round=-1`` in the Selection, the history gets a ``phase="fill"`` entry, and a note (also
logged as a warning) says how many rows were filled and why. With ``fill=False`` the run stops
short and the note says so. Every run terminates: each pull consumes at least one member.

**Reports.** ``history()`` has one entry per round (clusters pulled, whether as exploration,
the CS they were chosen on, probe means, rewards as decided, takes, the normalisation in force,
the top clusters by CS afterwards) plus a ``phase="fill"`` entry if the fill ran;
``cluster_stats()`` gives per cluster pulls, accepted pulls, probed / selected / filled rows,
``R_c`` and the weighted sd of the rewards it received (on the final normalisation), CS, and
whether it is unknown or exhausted.

Randomness (the order of unknown clusters, each cluster's member permutation) is derived from
(seed, purpose, index), so the state dict carries no RNG state and a resumed run is identical
to an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .allocation import shrinkage, shrunken_means, softmax_shares
from .base import Selector, logger
from .config import QuadConfig
from .types import Budget, ClusterView, Probe, derive_rng, nan_to_none

_ORDER_TAG = 0x0A5D
_PERM_TAG = 0x9E12


class QuadSelector(Selector):
    name = "quad"

    def __init__(
        self, view: ClusterView, budget: Budget, *, seed: int, config: QuadConfig | None = None
    ) -> None:
        super().__init__(view, budget, seed=seed)
        if config is None:
            mean_tokens = None
            if budget.unit == "tokens" and self.pool_rows.size:
                mean_tokens = float(np.mean(self.tracker.costs(self.pool_rows))) or 1.0
            config = QuadConfig.scaled(
                int(self.pool_rows.size), max(1, len(self.sizes)), budget, mean_tokens=mean_tokens
            )
        if not isinstance(config, QuadConfig):
            raise TypeError(f"quad needs a QuadConfig, got {type(config).__name__}")
        self.config = config
        k = len(self.sizes)
        self.priority = derive_rng(self.seed, _ORDER_TAG).permutation(k).astype(np.int64)
        # neighbour lists as (j, weight) with weight = 1 - d / gamma > 0
        self.nb_weights: list[list[tuple[int, float]]] = []
        for nb in view.neighbours:
            lst = []
            for j, d in nb:
                w = 1.0 - max(float(d), 0.0) / config.gamma
                if w > 0.0:
                    lst.append((int(j), w))
            self.nb_weights.append(lst)
        self._perms: dict[int, np.ndarray] = {}
        self._capacity_all: np.ndarray | None = None
        # per-cluster bandit state
        self.pos = np.zeros(k, dtype=np.int64)
        self.pulls = np.zeros(k, dtype=np.int64)
        self.accepted = np.zeros(k, dtype=np.int64)
        self.probed = np.zeros(k, dtype=np.int64)
        self.n_recv = np.zeros(k, dtype=np.int64)
        self.w_sum = np.zeros(k, dtype=np.float64)
        self.wm_sum = np.zeros(k, dtype=np.float64)
        self.wmm_sum = np.zeros(k, dtype=np.float64)
        self.wn_sum = np.zeros(k, dtype=np.float64)  # sum of w * probe count: evidence per cluster
        # pooled within-pull spread of the exploration probes (raw units), for the shrinkage
        self.within_ss = 0.0
        self.within_df = 0
        # reference distribution of the exploration probes (count, mean, sum of squared deviations)
        self.ref_n = 0
        self.ref_mean = 0.0
        self.ref_m2 = 0.0
        self.probe_scores: dict[int, float] = {}  # row -> raw score, in probing order
        self.probe_rounds: list[int] = []  # the round of each entry of probe_scores
        self.excluded: set[int] = set()
        self.stale = 0  # rounds in a row without an accepted pull and without exploration
        self._check_done(initial=True)

    # ---- randomness ------------------------------------------------------------------------

    def perm(self, c: int) -> np.ndarray:
        """Cluster ``c``'s members in the seeded order they are probed and taken."""
        p = self._perms.get(c)
        if p is None:
            p = derive_rng(self.seed, _PERM_TAG, c).permutation(self.members[c])
            self._perms[c] = p
        return p

    # ---- scores ----------------------------------------------------------------------------

    def norm(self) -> tuple[float, float]:
        """(mu, sigma) of the normalisation in force now."""
        if self.config.normalize == "none":
            return 0.0, 1.0
        mu = self.ref_mean if self.ref_n else 0.0
        var = self.ref_m2 / self.ref_n if self.ref_n >= 2 else 0.0
        sd = math.sqrt(var) if var > 0.0 else 0.0
        return mu, (sd if sd > 0.0 else 1.0)

    def mean_rewards(self) -> np.ndarray:
        """R_c = sum(w r) / sum(w) on the current normalisation; NaN where nothing was received."""
        mu, sd = self.norm()
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = self.wm_sum / self.w_sum
        return np.where(self.w_sum > 0, (raw - mu) / sd - self.config.tau, np.nan)

    def bonus(self) -> np.ndarray:
        total = int(self.pulls.sum())
        if total <= 1:
            return np.zeros(len(self.sizes))
        return self.config.alpha * np.sqrt(2.0 * math.log(total) / (self.pulls + 1.0))

    def shrinkage(self) -> float:
        """kappa of the empirical-Bayes shrinkage (``selection.allocation.shrinkage``)."""
        return shrinkage(self.ref_n, self.ref_m2, self.within_ss, self.within_df)

    def quality(self) -> np.ndarray:
        """q_c: the shrunken mean z of what cluster c received (0 = a typical cluster)."""
        mu, sd = self.norm()
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (self.wm_sum / self.w_sum - mu) / sd
        return shrunken_means(np.where(self.w_sum > 0, z, 0.0), self.wn_sum, self.shrinkage())

    def _cluster_cost(self, rows_of: Callable[[int], np.ndarray]) -> np.ndarray:
        out = np.zeros(len(self.sizes), dtype=np.float64)
        for c in range(len(self.sizes)):
            rows = rows_of(c)
            out[c] = float(self.tracker.costs(rows).sum()) if rows.size else 0.0
        return out

    def _capacity(self) -> np.ndarray:
        """Budget units each cluster could give: its rows less those excluded as negative."""
        if not self.excluded:
            if self._capacity_all is None:
                self._capacity_all = self._cluster_cost(lambda c: self.members[c])
            return self._capacity_all
        ex = np.fromiter(self.excluded, dtype=np.int64)
        return self._cluster_cost(lambda c: self.members[c][~np.isin(self.members[c], ex)])

    def used_per_cluster(self) -> np.ndarray:
        if not self._sel_rows:
            return np.zeros(len(self.sizes))
        rows = np.asarray(self._sel_rows, dtype=np.int64)
        return np.bincount(self.row_cluster[rows], weights=self.tracker.costs(rows).astype(np.float64),
                           minlength=len(self.sizes))

    def quotas(self) -> np.ndarray:
        """Each cluster's share of the budget, in budget units (``selection.allocation``)."""
        return softmax_shares(self._capacity(), self.quality(), self.budget.amount, self.config.temperature)

    def deficits(self) -> np.ndarray:
        return self.quotas() - self.used_per_cluster()

    def unknown(self) -> np.ndarray:
        return (self.pulls == 0) & (self.n_recv == 0)

    def cluster_scores(self) -> np.ndarray:
        """CS for every cluster; NaN for unknown clusters (they go first regardless)."""
        cs = self.mean_rewards() + self.bonus()
        return np.where(self.unknown(), np.nan, cs)

    def pullable(self) -> np.ndarray:
        return self.pos < self.sizes

    # ---- rounds ----------------------------------------------------------------------------

    def _score_allowance(self, calls: int) -> int | None:
        """Rows the bandit may still score (``score_budget``), or None without a limit."""
        sb = self.config.score_budget
        return None if sb is None else max(0, int(sb * self.pool_rows.size) - calls)

    def _choose(self, calls: int | None = None) -> tuple[list[int], list[bool], list[float | None]]:
        """This round's arms; ``calls`` = scorer calls before the round (default: so far)."""
        picks, flags, cs_at = self._choose_uncapped()
        allowance = self._score_allowance(self._scorer_calls if calls is None else calls)
        if allowance is not None:  # drop the last arms whose probes would pass the scoring budget
            lengths = np.minimum(self.config.probe_size, self.sizes[picks] - self.pos[picks])
            n = int(np.searchsorted(np.cumsum(lengths), allowance, side="right"))
            picks, flags, cs_at = picks[:n], flags[:n], cs_at[:n]
        return picks, flags, cs_at

    def _choose_uncapped(self) -> tuple[list[int], list[bool], list[float | None]]:
        arms = self.config.arms_per_round
        ok = self.pullable()
        unknown = self.unknown() & ok
        picks = [int(c) for c in self.priority[unknown[self.priority]][:arms]]
        flags = [True] * len(picks)
        cs_at: list[float | None] = [None] * len(picks)
        if len(picks) < arms:
            cs = self.cluster_scores()
            known_ok = ok & ~self.unknown()
            if self.config.allocation == "softmax":  # only clusters with room in their share
                known_ok &= self.deficits() >= 1.0 - 1e-6  # room for a row (costs are integers)
            known = np.flatnonzero(known_ok)
            order = known[np.lexsort((known, -cs[known]))][: arms - len(picks)]
            picks += [int(c) for c in order]
            flags += [False] * len(order)
            cs_at += [float(cs[c]) for c in order]
        return picks, flags, cs_at

    def _make_probes(self) -> list[Probe]:
        picks, _, _ = self._choose()
        k = self.config.probe_size
        return [Probe(c, self.perm(c)[self.pos[c] : self.pos[c] + k].copy()) for c in picks]

    def _observe(self, probes: list[Probe], scores: list[np.ndarray]) -> None:
        cfg = self.config
        r = self.round
        picks, explore, cs_at = self._choose(self._scorer_calls - sum(len(p.rows) for p in probes))
        for p, s in zip(probes, scores):
            for row, v in zip(p.rows.tolist(), s.tolist()):
                self.probe_scores[row] = v
            self.probe_rounds.extend([r] * len(p.rows))
        batch = [s for s, e in zip(scores, explore) if e]
        if batch:
            self._merge_reference(np.concatenate(batch))
            for s in batch:
                self.within_ss += float(np.sum((s - s.mean()) ** 2))
                self.within_df += int(s.size) - 1
        mu, sd = self.norm()
        means = [float(np.mean(s)) for s in scores]
        rewards = [(m - mu) / sd - cfg.tau for m in means]
        for p, m in zip(probes, means):
            c = p.cluster
            self.pulls[c] += 1
            self.probed[c] += len(p.rows)
            self._receive(c, 1.0, m, len(p.rows))
            for j, w in self.nb_weights[c]:
                self._receive(j, w, m, len(p.rows))
        taken = []
        room = self.deficits() if cfg.allocation == "softmax" else None
        for p, s, rew in zip(probes, scores, rewards):
            c = p.cluster
            negative = set()
            if cfg.exclude_negative:
                z = (s - mu) / sd - cfg.tau
                negative = {int(x) for x in p.rows[z < 0]}
                self.excluded |= negative
            if rew > 0:
                self.accepted[c] += 1
                if room is None:
                    taken.append(self._take(c, negative, r))
                else:
                    taken.append(self._take_share(c, p.rows, s, negative, r, float(room[c])))
            else:
                self.pos[c] += len(p.rows)
                taken.append(0)
        if any(rw > 0 for rw in rewards):
            self.stale = 0
        elif not any(explore):
            self.stale += 1
        cs = self.cluster_scores()
        ok = np.flatnonzero(self.pullable() & ~np.isnan(cs))
        top = ok[np.lexsort((ok, -cs[ok]))][: cfg.history_top]
        self._history.append(
            {
                "phase": "bandit",
                "round": r,
                "pulled": picks,
                "explore": explore,
                "cs": cs_at,
                "probe_mean": means,
                "reward": rewards,
                "accepted": [rw > 0 for rw in rewards],
                "taken": taken,
                "selected": len(self._sel_rows),
                "used": self.tracker.used,
                "scorer_calls": self._scorer_calls,
                "norm": {"mean": mu, "sd": sd, "n": self.ref_n},
                "cs_top": [[int(c), float(cs[c])] for c in top],
            }
        )
        self._check_done(rounds_done=r + 1)

    def _receive(self, c: int, w: float, m: float, n: int) -> None:
        self.n_recv[c] += 1
        self.w_sum[c] += w
        self.wn_sum[c] += w * n
        self.wm_sum[c] += w * m
        self.wmm_sum[c] += w * m * m

    def _merge_reference(self, x: np.ndarray) -> None:
        nb = int(x.size)
        mb = float(np.mean(x))
        m2b = float(np.sum((x - mb) ** 2))
        na = self.ref_n
        n = na + nb
        delta = mb - self.ref_mean
        self.ref_mean += delta * nb / n
        self.ref_m2 += m2b + delta * delta * na * nb / n
        self.ref_n = n

    def _take(self, c: int, negative: set[int], rnd: int) -> int:
        """Select cluster c's next take_size members (probed first); return how many."""
        window = self.perm(c)[self.pos[c] : self.pos[c] + self.config.take_size]
        self.pos[c] += len(window)
        if negative:
            window = window[~np.isin(window, np.fromiter(negative, dtype=np.int64))]
        return self._take_rows(window, self._scores_of(window), rnd)

    def _by_score(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` with the scored ones first, best first (stable), then the rest in order."""
        sc = self._scores_of(rows)
        scored = ~np.isnan(sc)
        if not scored.any():
            return rows
        first = rows[scored][np.argsort(-sc[scored], kind="stable")]
        return np.concatenate([first, rows[~scored]])

    def _within_share(self, rows: np.ndarray, room: float) -> np.ndarray:
        """The longest prefix of ``rows`` whose cost fits ``room`` (at least one row).

        Costs are integers: the room is rounded down, with a margin of 1e-6, so that float noise
        in the shares (an affine change of the scores) never changes what is taken."""
        room = math.floor(room + 1e-6)
        if rows.size == 0 or room <= 0:
            return rows[:0]
        k = int(np.searchsorted(np.cumsum(self.tracker.costs(rows)), room, side="right"))
        return rows[: max(1, k)]

    def _take_share(self, c: int, probe_rows: np.ndarray, s: np.ndarray, negative: set[int],
                    rnd: int, room: float) -> int:
        """softmax allocation: an accepted pull takes up to ``take_size`` rows, no more than the
        cluster's room in its share: its probed rows best first, then the next members."""
        cfg = self.config
        start = int(self.pos[c]) + len(probe_rows)  # the probes are perm[pos : pos + len]
        ahead = self.perm(c)[start : start + max(0, cfg.take_size - len(probe_rows))]
        probed = probe_rows[np.argsort(-s, kind="stable")]
        if negative:
            probed = probed[~np.isin(probed, np.fromiter(negative, dtype=np.int64))]
        window = self._within_share(np.concatenate([probed, ahead]), room)
        n_ahead = int(np.isin(window, ahead).sum())  # a prefix of ``ahead``, taken in order
        self.pos[c] = start + n_ahead
        return self._take_rows(window, self._scores_of(window), rnd)

    def _scores_of(self, rows: np.ndarray) -> np.ndarray:
        get = self.probe_scores.get
        return np.array([get(r, math.nan) for r in rows.tolist()], dtype=np.float64)

    def _check_done(self, *, initial: bool = False, rounds_done: int = 0) -> None:
        cfg = self.config
        if self._nothing_fits():
            self._finish()
            return
        rem = self.tracker.remaining
        if not initial and rem <= cfg.crumb_tolerance * self.budget.amount:
            reason = (
                f"what is left of the budget ({rem} {self.budget.unit}) is within "
                f"crumb_tolerance ({cfg.crumb_tolerance:g} of it), not worth scoring for"
            )
        elif not self.pullable().any():
            reason = "every cluster has been probed out"
        elif not self._choose_uncapped()[0]:
            reason = "every cluster with members left to probe has its share of the budget"
        elif not initial and cfg.max_rounds is not None and rounds_done >= cfg.max_rounds:
            reason = f"max_rounds ({self.config.max_rounds}) was reached"
        elif cfg.score_budget is not None and not self._choose()[0]:
            reason = (
                f"the scoring budget ({cfg.score_budget:.0%} of the pool: "
                f"{int(cfg.score_budget * self.pool_rows.size)} rows; {self._scorer_calls} scored) "
                "has no room for another probe"
            )
        elif self.config.patience is not None and self.stale >= self.config.patience:
            reason = (
                f"no pull was accepted in the last {self.stale} rounds (patience "
                f"{self.config.patience}) after every cluster was known"
            )
        else:
            return
        if self.config.fill:
            self._fill(reason)
        else:
            msg = f"quad: {reason} with budget left; fill is off, so the selection stops short"
            self.notes.append(msg)
            logger.warning(msg)
        self._finish()

    def _fill(self, reason: str) -> None:
        """Fill the rest of the budget from clusters in descending CS, without scoring."""
        cs = self.mean_rewards() + self.bonus()
        mu, sd = self.norm()
        prior = ((self.ref_mean if self.ref_n else 0.0) - mu) / sd - self.config.tau
        cs = np.where(self.unknown(), prior + self.bonus(), cs)
        k = len(self.sizes)
        # rounded: clusters whose CS tie in exact arithmetic keep the cluster-id order whatever
        # float noise an affine change of the scores adds
        order = np.lexsort((np.arange(k), -np.round(cs, 9)))
        counts: dict[int, int] = {}
        before = self.tracker.used
        excluded = np.fromiter(self.excluded, dtype=np.int64)
        softmax = self.config.allocation == "softmax"

        def free(c: int) -> np.ndarray:
            rows = self.perm(c)
            rows = rows[~self.selected_mask[rows]]
            if excluded.size:
                rows = rows[~np.isin(rows, excluded)]
            return self._by_score(rows) if softmax else rows

        def take(c: int, rows: np.ndarray) -> None:
            n = self._take_rows(rows, self._scores_of(rows), -1, fill=True)
            if n:
                counts[int(c)] = counts.get(int(c), 0) + n

        if softmax:  # first every cluster's room in its share (scaled down together when the
            # bandit's early takes left less than the shares add up to), best clusters first
            room = np.maximum(self.deficits(), 0.0)
            total = float(room.sum())
            if total > self.tracker.remaining > 0:
                room *= self.tracker.remaining / total
            for c in order.tolist():
                if self.tracker.remaining <= 0:
                    break
                if room[c] > 0:
                    take(c, self._within_share(free(c), float(room[c])))
        for c in order.tolist():  # then whatever is left, in cluster-score order
            if self.tracker.remaining <= 0:
                break
            take(c, free(c))
        filled = sum(counts.values())
        self._history.append(
            {
                "phase": "fill",
                "round": self.round,
                "reason": reason,
                "clusters": [[c, n] for c, n in counts.items()],
                "taken": filled,
                "selected": len(self._sel_rows),
                "used": self.tracker.used,
                "scorer_calls": self._scorer_calls,
            }
        )
        if filled or self.tracker.used != before:
            msg = (
                f"quad: {reason} with {self.budget.amount - before} {self.budget.unit} of the "
                f"budget left; filled {filled} rows "
                f"({self.tracker.used - before} {self.budget.unit}) "
                f"from {len(counts)} clusters in descending cluster-score order without scoring "
                "them (fill=True in the selection)"
            )
            self.notes.append(msg)
            logger.warning(msg)

    # ---- reporting -------------------------------------------------------------------------

    def probe_log(self) -> dict[str, np.ndarray]:
        rows = np.fromiter(self.probe_scores, dtype=np.int64, count=len(self.probe_scores))
        scores = np.fromiter(self.probe_scores.values(), dtype=np.float64, count=rows.size)
        return self._probe_table(rows, scores, np.asarray(self.probe_rounds, dtype=np.int32))

    def cluster_stats(self) -> list[dict[str, Any]]:
        base = super().cluster_stats()
        mr = self.mean_rewards()
        cs = self.cluster_scores()
        _, sd = self.norm()
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.wm_sum / self.w_sum
            var = np.maximum(self.wmm_sum / self.w_sum - m * m, 0.0)
        rsd = np.where(self.w_sum > 0, np.sqrt(var) / sd, np.nan)
        fill_rows = [r for r, f in zip(self._sel_rows, self._sel_fill) if f]
        filled = np.zeros(len(self.sizes), dtype=np.int64)
        if fill_rows:
            filled = np.bincount(
                self.row_cluster[np.asarray(fill_rows, dtype=np.int64)], minlength=len(self.sizes)
            )
        unknown = self.unknown()
        q = self.quality()
        share = self.quotas() / max(1, self.budget.amount) if self.config.allocation == "softmax" else None
        for c, d in enumerate(base):
            d.update(
                {
                    "pulls": int(self.pulls[c]),
                    "accepted": int(self.accepted[c]),
                    "probed": int(self.probed[c]),
                    "filled": int(filled[c]),
                    "rewards_received": int(self.n_recv[c]),
                    "reward_weight": float(self.w_sum[c]),
                    "mean_reward": nan_to_none(mr[c]),
                    "reward_sd": nan_to_none(rsd[c]),
                    "cs": nan_to_none(cs[c]),
                    "unknown": bool(unknown[c]),
                    "exhausted": bool(self.pos[c] >= self.sizes[c]),
                    "quality": float(q[c]),
                    "share": None if share is None else float(share[c]),
                }
            )
        return base

    # ---- state -----------------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        return self.config.model_dump()

    def _extra_state(self) -> dict[str, Any]:
        rows = list(self.probe_scores)
        return {
            "pos": self.pos.tolist(),
            "pulls": self.pulls.tolist(),
            "accepted": self.accepted.tolist(),
            "probed": self.probed.tolist(),
            "n_recv": self.n_recv.tolist(),
            "w_sum": self.w_sum.tolist(),
            "wm_sum": self.wm_sum.tolist(),
            "wmm_sum": self.wmm_sum.tolist(),
            "wn_sum": self.wn_sum.tolist(),
            "within": {"ss": self.within_ss, "df": self.within_df},
            "ref": {"n": self.ref_n, "mean": self.ref_mean, "m2": self.ref_m2},
            "probe_rows": rows,
            "probe_scores": [self.probe_scores[r] for r in rows],
            "probe_rounds": list(self.probe_rounds),
            "excluded": sorted(self.excluded),
            "stale": self.stale,
        }

    def _load_extra_state(self, d: dict[str, Any]) -> None:
        self.pos = np.asarray(d["pos"], dtype=np.int64)
        self.pulls = np.asarray(d["pulls"], dtype=np.int64)
        self.accepted = np.asarray(d["accepted"], dtype=np.int64)
        self.probed = np.asarray(d["probed"], dtype=np.int64)
        self.n_recv = np.asarray(d["n_recv"], dtype=np.int64)
        self.w_sum = np.asarray(d["w_sum"], dtype=np.float64)
        self.wm_sum = np.asarray(d["wm_sum"], dtype=np.float64)
        self.wmm_sum = np.asarray(d["wmm_sum"], dtype=np.float64)
        self.wn_sum = np.asarray(d["wn_sum"], dtype=np.float64)
        self.within_ss = float(d["within"]["ss"])
        self.within_df = int(d["within"]["df"])
        self.ref_n = int(d["ref"]["n"])
        self.ref_mean = float(d["ref"]["mean"])
        self.ref_m2 = float(d["ref"]["m2"])
        self.probe_scores = {int(r): float(s) for r, s in zip(d["probe_rows"], d["probe_scores"])}
        self.probe_rounds = [int(r) for r in d["probe_rounds"]]
        self.excluded = {int(r) for r in d["excluded"]}
        self.stale = int(d["stale"])
