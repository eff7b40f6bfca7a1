"""Quad's cluster bandit on synthetic pools whose per-cluster score means are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quadsel.selection import (
    Budget,
    ClusterView,
    Probe,
    QuadConfig,
    QuadSelector,
    make_selector,
    run_selector,
)

# ---- synthetic pools --------------------------------------------------------------------------


class Pool:
    """Clusters at positions on a line (neighbours: clusters within gamma / spread on it, at
    distance |dpos| * spread), score = mean_c + noise seeded by row id."""

    def __init__(self, means, sizes, *, pos=None, noise=0.5, gamma=0.2, spread=3.0, seed=0,
                 lengths=None):
        rng = np.random.default_rng(seed)
        self.means = np.asarray(means, dtype=np.float64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        k = len(self.means)
        n = int(self.sizes.sum())
        ids = rng.permutation(n)
        self.members = [np.sort(m) for m in np.split(ids, np.cumsum(self.sizes)[:-1])]
        self.cluster = np.empty(n, dtype=np.int64)
        for c, m in enumerate(self.members):
            self.cluster[m] = c
        pos = rng.permutation(k) / k if pos is None else np.asarray(pos)
        self.neighbours = [
            [(j, abs(pos[i] - pos[j]) * spread) for j in range(k)
             if j != i and abs(pos[i] - pos[j]) * spread <= gamma]
            for i in range(k)
        ]
        self.noise = np.random.default_rng(10_000 + seed).normal(size=n) * noise
        self.lengths = (
            rng.integers(20, 400, n) if lengths is None else np.asarray(lengths, dtype=np.int64)
        )
        self.calls = 0

    def view(self) -> ClusterView:
        return ClusterView([m.copy() for m in self.members], [list(nb) for nb in self.neighbours],
                           self.lengths.copy())

    def score(self, rows: np.ndarray) -> np.ndarray:
        self.calls += len(rows)
        rows = np.asarray(rows, dtype=np.int64)
        return self.means[self.cluster[rows]] + self.noise[rows]

    @property
    def n(self) -> int:
        return int(self.sizes.sum())


def good_bad_pool(seed: int) -> tuple[Pool, set[int]]:
    """60 clusters: 10 good ones (mean 1.5..2.5) in two regions of the line, 50 others (-1..0)."""
    rng = np.random.default_rng(seed)
    k = 60
    pos = rng.permutation(k) / k
    slot = np.rint(pos * k).astype(int)  # 0..59 along the line
    a, b = rng.choice(np.arange(0, 55, 6), 2, replace=False)
    good = np.flatnonzero(((slot >= a) & (slot < a + 5)) | ((slot >= b) & (slot < b + 5)))
    means = rng.uniform(-1.0, 0.0, k)
    means[good] = rng.uniform(1.5, 2.5, good.size)
    sizes = rng.integers(150, 300, k)
    return Pool(means, sizes, pos=pos, seed=seed), {int(c) for c in good}


def smooth_pool(seed: int, k: int = 60) -> Pool:
    """Means vary smoothly along the line (neighbours are alike), plus a cluster-level jitter."""
    rng = np.random.default_rng(seed)
    pos = rng.permutation(k) / k
    means = np.sin(2 * np.pi * (2 * pos + rng.uniform())) + 0.3 * rng.normal(size=k)
    sizes = rng.integers(150, 300, k)
    return Pool(means, sizes, pos=pos, seed=seed)


def same_result(a, b) -> None:
    for f in ("rows", "cluster", "round", "fill"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.score, b.score, equal_nan=True)
    assert (a.used, a.scorer_calls, a.n_rounds, a.budget_met) == (
        b.used, b.scorer_calls, b.n_rounds, b.budget_met)
    assert a.clusters == b.clusters
    assert a.notes == b.notes


# ---- quality and cost -------------------------------------------------------------------------


def quad(pool, budget, seed, allocation="softmax", **kw):
    cfg = QuadConfig.scaled(pool.n, len(pool.sizes), budget, mean_tokens=float(pool.lengths.mean()),
                            allocation=allocation, **kw)
    sel = make_selector("quad", pool.view(), budget, seed=seed, config=cfg)
    return sel, run_selector(sel, pool.score)


def entropy(clusters) -> float:
    p = np.bincount(np.asarray(clusters)) / len(clusters)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("seed", range(5))
def test_best_clusters_are_taken(seed):
    pool, good = good_bad_pool(seed)
    budget = Budget("examples", 1500)
    pool_share = pool.sizes[list(good)].sum() / pool.n  # ~0.17
    _, greedy = quad(pool, budget, seed, "greedy")
    sel, soft = quad(pool, budget, seed)
    for res in (greedy, soft):
        assert len(res) == 1500
        assert res.scorer_calls < 0.15 * pool.n  # ... while scoring a small part of the pool
    assert soft.scorer_calls + greedy.scorer_calls == pool.calls
    # greedy (Quad's rule) piles onto the good clusters; softmax tilts towards them by
    # exp(q / T) per row and keeps the rest of the pool in the selection
    assert np.isin(greedy.cluster, list(good)).mean() >= 0.9
    in_good = np.isin(soft.cluster, list(good)).mean()
    assert 2.5 * pool_share <= in_good < 0.9, in_good
    assert len(np.unique(soft.cluster)) > len(np.unique(greedy.cluster))
    q = np.array([c["quality"] for c in soft.clusters])
    assert q[list(good)].min() > 0 > np.median(np.delete(q, list(good)))


@pytest.mark.parametrize("seed", range(5))
def test_selection_quality_close_to_topk_at_a_fraction_of_the_cost(seed):
    pool = smooth_pool(seed)
    budget = Budget("examples", 2000)
    _, greedy = quad(pool, budget, seed, "greedy")
    _, soft = quad(pool, budget, seed)
    topk = run_selector(make_selector("topk", pool.view(), budget, seed=seed), pool.score)
    rnd = run_selector(make_selector("random", pool.view(), budget, seed=seed), pool.score)
    true = lambda r: pool.means[pool.cluster[r.rows]].mean()  # noqa: E731
    # greedy: far better clusters than random's, most of the way to the oracle's
    assert true(greedy) - true(rnd) >= 0.85 * (true(topk) - true(rnd))
    # softmax: a good part of the way, over more clusters than either
    assert true(soft) - true(rnd) >= 0.4 * (true(topk) - true(rnd))
    assert entropy(soft.cluster) > max(entropy(greedy.cluster), entropy(topk.cluster))
    assert max(greedy.scorer_calls, soft.scorer_calls) < 0.2 * pool.n
    assert topk.scorer_calls == pool.n


@pytest.mark.parametrize("seed", range(3))
def test_uninformative_scores_give_a_stratified_sample(seed):
    """Scores that do not separate clusters: softmax takes every cluster in proportion to its
    size (like a random sample); greedy piles onto the clusters whose probes were lucky."""
    k = 40
    sizes = np.random.default_rng(seed).integers(100, 400, k)
    pool = Pool(np.zeros(k), sizes, noise=1.0, seed=seed)
    budget = Budget("examples", int(0.1 * pool.n))
    _, soft = quad(pool, budget, seed)
    _, greedy = quad(pool, budget, seed, "greedy")
    rnd = run_selector(make_selector("random", pool.view(), budget, seed=seed), pool.score)
    want = sizes / sizes.sum()
    tv = lambda r: 0.5 * np.abs(np.bincount(r.cluster, minlength=k) / len(r) - want).sum()  # noqa: E731
    assert tv(soft) <= 2 * tv(rnd) + 0.01, (tv(soft), tv(rnd))
    assert entropy(soft.cluster) > entropy(greedy.cluster) + 0.2


def test_softmax_shares_follow_size_times_exp_quality():
    """The realised allocation is the documented one: share_c = cap_c exp(q_c / T) / sum."""
    pool = smooth_pool(3, k=30)
    budget = Budget("examples", 900)
    sel, res = quad(pool, budget, 0, temperature=0.7)
    q = sel.quality()
    w = pool.sizes * np.exp(q / 0.7)
    want = np.minimum(budget.amount * w / w.sum(), pool.sizes)  # no cluster is capped here
    assert np.isclose(want.sum(), budget.amount)
    assert np.allclose(sel.quotas(), want)
    got = np.bincount(res.cluster, minlength=30)
    # the realised shares follow the quotas; the bandit's early takes (on estimates that were
    # still moving) are the only departure. Greedy, on the same pool, does not follow them.
    tv = 0.5 * np.abs(got - want).sum() / budget.amount
    assert tv <= 0.15 and np.corrcoef(got, want)[0, 1] >= 0.95, tv
    _, greedy = quad(pool, budget, 0, "greedy", temperature=0.7)
    g = np.bincount(greedy.cluster, minlength=30)
    assert 0.5 * np.abs(g - want).sum() / budget.amount > 2 * tv


def test_quota_water_filling_caps_small_clusters():
    pool = Pool([3.0, 0.0, 0.0], [10, 500, 500], noise=0.2, seed=1)
    sel = make_selector("quad", pool.view(), Budget("examples", 300), seed=0,
                        config=QuadConfig(arms_per_round=3, probe_size=5, take_size=5))
    sel.ref_n, sel.ref_mean, sel.ref_m2 = 3, 1.0, 6.0  # as if probed: sd sqrt(2)
    sel.within_ss, sel.within_df = 0.0, 10
    for c, m in enumerate([3.0, 0.0, 0.0]):
        sel._receive(c, 1.0, m, 1000)
    quota = sel.quotas()
    assert quota[0] == 10  # capped at the cluster's size
    assert np.isclose(quota.sum(), 300) and np.isclose(quota[1], quota[2])


@pytest.mark.parametrize("allocation", ["softmax", "greedy"])
def test_no_scoring_for_crumbs(allocation):
    """A token budget that ends a few tokens short of a natural stop must not send the bandit
    probing for them: the scoring share stays that of the neighbouring budgets."""
    pool = smooth_pool(4, k=30)
    lengths = pool.lengths.copy()
    lengths[np.arange(0, pool.n, 97)] = 1  # tiny rows everywhere: something always fits
    pool.lengths = lengths
    base = int(0.08 * lengths.sum())

    def calls(short, tol):
        _, res = quad(pool, Budget("tokens", base + short), 0, allocation, crumb_tolerance=tol)
        assert res.used <= base + short and res.budget_met
        return res.scorer_calls

    ref = calls(0, 0.001)
    for short in (3, 27, 100):
        assert calls(short, 0.001) <= 1.1 * ref + 10, short
    if allocation == "greedy":  # without the tolerance the bandit keeps probing for crumbs
        assert max(calls(short, 0.0) for short in (3, 100)) > 1.5 * ref



# ---- the reward, its propagation and CS, by hand ---------------------------------------------


def toy_view() -> ClusterView:
    """Three clusters of 20 rows; cluster c's rows are 20c..20c+19."""
    d01, d12, d02 = 0.05, 0.10, 0.15
    return ClusterView(
        members=[np.arange(20 * c, 20 * c + 20, dtype=np.int64) for c in range(3)],
        neighbours=[[(1, d01), (2, d02)], [(0, d01), (2, d12)], [(0, d02), (1, d12)]],
    )


TOY_SCORE = np.array([1.0, 0.5, -0.2])  # every row of cluster c scores TOY_SCORE[c]


def toy_score(rows):
    return TOY_SCORE[np.asarray(rows) // 20]


def test_reward_propagation_and_cluster_score_by_hand():
    cfg = QuadConfig(arms_per_round=3, probe_size=2, take_size=4, alpha=0.5, tau=0.1,
                     gamma=0.2, normalize="none", max_rounds=10)
    sel = QuadSelector(toy_view(), Budget("examples", 18), seed=3, config=cfg)
    probes = sel.propose()
    assert sorted(p.cluster for p in probes) == [0, 1, 2]  # all unknown in round 0
    sel.observe(probes, [toy_score(p.rows) for p in probes])
    # rewards: r = mean score - tau = 0.9, 0.4, -0.3; weights 1 - d / 0.2: d01 -> 0.75,
    # d12 -> 0.5, d02 -> 0.25. R_c = sum(w r) / sum(w):
    r0 = (1 * 0.9 + 0.75 * 0.4 + 0.25 * -0.3) / (1 + 0.75 + 0.25)   # 0.5625
    r1 = (0.75 * 0.9 + 1 * 0.4 + 0.5 * -0.3) / (0.75 + 1 + 0.5)     # 0.41111...
    r2 = (0.25 * 0.9 + 0.5 * 0.4 + 1 * -0.3) / (0.25 + 0.5 + 1)     # 0.0714285...
    assert r0 == pytest.approx(0.5625) and r2 == pytest.approx(0.125 / 1.75)
    np.testing.assert_allclose(sel.mean_rewards(), [r0, r1, r2], rtol=1e-12)
    np.testing.assert_allclose(sel.w_sum, [2.0, 2.25, 1.75], rtol=1e-12)
    # CS = R + alpha sqrt(2 ln N / (n_c + 1)), N = 3 pulls, n_c = 1
    bonus = 0.5 * math.sqrt(2 * math.log(3) / 2)
    np.testing.assert_allclose(sel.cluster_scores(), np.array([r0, r1, r2]) + bonus, rtol=1e-12)
    stats = sel.cluster_stats()
    assert [s["cs"] for s in stats] == pytest.approx([r0 + bonus, r1 + bonus, r2 + bonus])
    assert [s["accepted"] for s in stats] == [1, 1, 0]
    # takes: clusters 0 and 1 accepted, 4 rows each (the 2 probes first); cluster 2 only probed
    assert [s["selected"] for s in stats] == [4, 4, 0]
    assert [s["probed"] for s in stats] == [2, 2, 2]
    h = sel.history()[0]
    assert h["reward"] == pytest.approx([0.9 if c == 0 else 0.4 if c == 1 else -0.3
                                         for c in h["pulled"]])

    # round 1: all known; the arms come in descending CS
    probes = sel.propose()
    assert [p.cluster for p in probes] == [0, 1, 2]
    sel.observe(probes, [toy_score(p.rows) for p in probes])
    np.testing.assert_allclose(sel.mean_rewards(), [r0, r1, r2], rtol=1e-12)  # same rewards again
    bonus = 0.5 * math.sqrt(2 * math.log(6) / 3)  # N = 6, n_c = 2
    np.testing.assert_allclose(sel.cluster_scores(), np.array([r0, r1, r2]) + bonus, rtol=1e-12)
    b3 = 0.5 * math.sqrt(math.log(3))  # the CS the round-1 arms were chosen on (N = 3, n_c = 1)
    assert sel.history()[1]["cs"] == pytest.approx([r0 + b3, r1 + b3, r2 + b3])


def test_cs_uses_own_pulls_and_weighted_mean_with_unequal_pulls():
    cfg = QuadConfig(arms_per_round=1, probe_size=1, take_size=1, alpha=0.3, tau=0.0,
                     gamma=0.2, normalize="none", max_rounds=50)
    sel = QuadSelector(toy_view(), Budget("examples", 40), seed=0, config=cfg)
    pulled = []
    for _ in range(4):
        probes = sel.propose()
        pulled.append(probes[0].cluster)
        sel.observe(probes, [toy_score(p.rows) for p in probes])
    w = np.array([[1, 0.75, 0.25], [0.75, 1, 0.5], [0.25, 0.5, 1]])
    recv_w = w[pulled].sum(axis=0)
    recv_wr = (w[pulled] * TOY_SCORE[pulled][:, None]).sum(axis=0)
    pulls = np.bincount(pulled, minlength=3)
    expect = recv_wr / recv_w + 0.3 * np.sqrt(2 * np.log(4) / (pulls + 1))
    np.testing.assert_allclose(sel.cluster_scores(), expect, rtol=1e-12)


def test_zscore_normalisation_is_scale_and_shift_invariant():
    """alpha and tau mean the same for any scorer: an affine change of scores changes nothing."""
    pool = smooth_pool(1)
    budget = Budget("examples", 1500)
    a = run_selector(make_selector("quad", pool.view(), budget, seed=4), pool.score)
    b = run_selector(make_selector("quad", pool.view(), budget, seed=4),
                     lambda r: 1e-4 * pool.score(r) - 3.0)
    for f in ("rows", "cluster", "round", "fill"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert [c["pulls"] for c in a.clusters] == [c["pulls"] for c in b.clusters]
    assert a.n_rounds == b.n_rounds


# ---- exploration order ------------------------------------------------------------------------


def isolated_view(k=12, size=30) -> ClusterView:
    members = [np.arange(size * c, size * (c + 1)) for c in range(k)]
    return ClusterView(members, [[] for _ in range(k)])


def first_pulls(seed: int, k=12):
    # greedy: with softmax a budget of 10 rows over 12 clusters gives no cluster room for a row
    # once all are known, so the bandit would stop there (the order of exploration is the same)
    cfg = QuadConfig(arms_per_round=2, probe_size=2, take_size=2, tau=100.0, max_rounds=30,
                     allocation="greedy")
    sel = QuadSelector(isolated_view(k), Budget("examples", 10), seed=seed, config=cfg)
    order = []
    for _ in range(k // 2):
        probes = sel.propose()
        order += [p.cluster for p in probes]
        sel.observe(probes, [np.zeros(len(p.rows)) for p in probes])
    return order, sel


def test_never_pulled_clusters_go_first_in_seeded_order():
    order, sel = first_pulls(7)
    assert sorted(order) == list(range(12))  # every cluster once before any twice
    assert order == sel.priority.tolist()  # the seeded order
    assert first_pulls(7)[0] == order  # same seed, same order
    assert first_pulls(8)[0] != order  # another seed, another order
    assert all(all(h["explore"]) for h in sel.history())


def test_neighbour_reward_makes_a_cluster_known():
    """A cluster that received a neighbour's reward is no longer pulled ahead of CS order."""
    pool = smooth_pool(2, k=40)
    cfg = QuadConfig.scaled(pool.n, 40, Budget("examples", 4000), arms_per_round=4, score_budget=None)
    sel = make_selector("quad", pool.view(), Budget("examples", 4000), seed=2, config=cfg)
    while not sel.finished:
        unknown_before = sel.unknown() & sel.pullable()
        probes = sel.propose()
        picks = [p.cluster for p in probes]
        flags = sel._choose()[1]
        n_unknown = int(unknown_before.sum())
        # unknown clusters fill the round first; known ones only once no unknown one is left
        assert flags == [True] * min(n_unknown, 4) + [False] * (4 - min(n_unknown, 4))
        assert all(unknown_before[c] for c, f in zip(picks, flags) if f)
        sel.observe(probes, [pool.score(p.rows) for p in probes])
    # with neighbours, fewer exploration pulls than clusters were needed
    explored = sum(sum(h.get("explore", [])) for h in sel.history())
    assert explored < 40


# ---- determinism and resume -------------------------------------------------------------------


def test_same_seed_same_result_other_seed_other_probes():
    pool = smooth_pool(3)
    budget = Budget("examples", 1777)
    a = run_selector(make_selector("quad", pool.view(), budget, seed=11), pool.score)
    b = run_selector(make_selector("quad", pool.view(), budget, seed=11), pool.score)
    same_result(a, b)
    s1 = make_selector("quad", pool.view(), budget, seed=11).propose()
    s2 = make_selector("quad", pool.view(), budget, seed=12).propose()
    assert [p.to_dict() for p in s1] != [p.to_dict() for p in s2]
    c = run_selector(make_selector("quad", pool.view(), budget, seed=12), pool.score)
    assert not np.array_equal(a.rows, c.rows)


def resume_config(pool, budget, **kw):
    return QuadConfig.scaled(pool.n, len(pool.sizes), budget, **kw)


@pytest.mark.parametrize(
    "unit,amount,kw",
    [
        ("examples", 2345, {}),
        ("examples", 9000, {"exclude_negative": True}),  # long enough to reach the fill step
        ("tokens", 400_000, {}),
        ("examples", 3000, {"tau": 1.5, "patience": 3}),  # ends in a fill
    ],
)
def test_resume_is_identical(unit, amount, kw):
    pool = smooth_pool(4)
    budget = Budget(unit, amount)
    cfg = resume_config(pool, budget, mean_tokens=float(pool.lengths.mean()), **kw)
    full_sel = make_selector("quad", pool.view(), budget, seed=5, config=cfg)
    full = run_selector(full_sel, pool.score)
    n_rounds = full.n_rounds
    assert n_rounds >= 4
    for k in sorted({0, 1, 2, n_rounds // 2, n_rounds - 1}):
        sel = make_selector("quad", pool.view(), budget, seed=5, config=cfg)
        for _ in range(k):
            probes = sel.propose()
            sel.observe(probes, [pool.score(p.rows) for p in probes])
        if k % 2:
            sel.propose()  # a checkpoint taken with this round's probes pending
        blob = json.dumps(sel.state_dict(), allow_nan=False)
        fresh = make_selector("quad", pool.view(), budget, seed=5, config=cfg)
        fresh.load_state_dict(json.loads(blob))
        res = run_selector(fresh, pool.score)
        same_result(res, full)
        assert fresh.history() == full_sel.history()
        assert json.dumps(fresh.state_dict()) == json.dumps(full_sel.state_dict())


def test_resume_refuses_a_different_setup():
    pool = smooth_pool(0)
    budget = Budget("examples", 1000)
    sel = make_selector("quad", pool.view(), budget, seed=1)
    state = json.loads(json.dumps(sel.state_dict()))
    with pytest.raises(ValueError, match="seed"):
        make_selector("quad", pool.view(), budget, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="budget"):
        make_selector("quad", pool.view(), Budget("examples", 999), seed=1).load_state_dict(state)
    other = pool.view()
    other.members[0], other.members[1] = other.members[1], other.members[0]
    with pytest.raises(ValueError, match="view"):
        make_selector("quad", other, budget, seed=1).load_state_dict(state)


def test_observe_checks_what_it_is_given():
    pool = smooth_pool(0)
    sel = make_selector("quad", pool.view(), Budget("examples", 1000), seed=1)
    probes = sel.propose()
    assert sel.propose() == probes  # idempotent
    scores = [pool.score(p.rows) for p in probes]
    with pytest.raises(ValueError, match="differ"):
        sel.observe(probes[::-1], scores[::-1])
    with pytest.raises(ValueError, match="scores"):
        sel.observe(probes, [s[:-1] for s in scores])
    bad = [s.copy() for s in scores]
    bad[0][0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sel.observe(probes, bad)
    sel.observe(probes, scores)
    assert sel.round == 1 and sel.scorer_calls == sum(len(p.rows) for p in probes)


# ---- budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [1, 39, 1234, 5001])
def test_example_budget_is_met_exactly_and_the_last_take_trimmed(amount):
    pool = smooth_pool(5)
    cfg = QuadConfig.scaled(pool.n, 60, Budget("examples", amount), take_size=40, probe_size=10,
                            allocation="greedy")
    sel = make_selector("quad", pool.view(), Budget("examples", amount), seed=0, config=cfg)
    res = run_selector(sel, pool.score)
    assert len(res) == amount and res.used == amount and res.budget_met
    assert np.unique(res.rows).size == amount
    takes = [t for h in sel.history() if h["phase"] == "bandit" for t in h["taken"] if t]
    if not res.fill.any():
        assert sum(takes) == amount and takes[-1] <= 40
    if amount < 40:
        assert takes == [amount]  # the first accepted window of 40 was cut to the budget


@pytest.mark.parametrize("amount", [350, 12_345, 400_000])
def test_token_budget_never_exceeded_and_filled_as_far_as_possible(amount):
    pool = smooth_pool(6)
    budget = Budget("tokens", amount)
    res = run_selector(make_selector("quad", pool.view(), budget, seed=0), pool.score)
    assert res.used == int(pool.lengths[res.rows].sum())
    assert res.used <= amount
    assert res.budget_met
    left = np.setdiff1d(np.arange(pool.n), res.rows)
    assert pool.lengths[left].min() > amount - res.used  # nothing else would fit


def test_token_take_skips_rows_that_do_not_fit():
    """Members are taken in order while they fit; one that does not fit is skipped."""
    lengths = np.array([5, 9, 2, 7, 1, 4, 3, 6] * 2)
    view = ClusterView([np.arange(8), np.arange(8, 16)], [[], []], lengths)
    cfg = QuadConfig(arms_per_round=1, probe_size=2, take_size=8, tau=-10.0, max_rounds=5,
                     allocation="greedy")
    sel = QuadSelector(view, Budget("tokens", 20), seed=0, config=cfg)
    res = run_selector(sel, lambda r: np.ones(len(r)))
    c = int(res.cluster[0])
    expect, left = [], 20
    for row in sel.perm(c):  # the whole cluster is the first take's window
        if lengths[row] <= left:
            expect.append(int(row))
            left -= lengths[row]
    assert res.rows[res.round == 0].tolist() == expect
    assert sum(lengths[expect]) < sum(lengths[sel.perm(c)])  # something was skipped
    assert res.used <= 20 and res.budget_met


def test_zero_budget_and_budget_larger_than_pool():
    pool = smooth_pool(7, k=10)
    sel = make_selector("quad", pool.view(), Budget("examples", 0), seed=0)
    assert sel.finished and sel.propose() == [] and len(sel.result()) == 0
    res = run_selector(make_selector("quad", pool.view(), Budget("examples", pool.n + 5), seed=0),
                       pool.score)
    assert len(res) == pool.n and not res.budget_met
    assert any("no rows left" in n for n in res.notes)


def test_token_budget_needs_lengths():
    view = ClusterView([np.arange(5)], [[]], None)
    with pytest.raises(ValueError, match="lengths"):
        make_selector("quad", view, Budget("tokens", 10), seed=0)


# ---- exhaustion, exclusion, fill --------------------------------------------------------------


def test_exhausted_clusters_are_never_chosen_again():
    rng = np.random.default_rng(0)
    pool = Pool(rng.normal(size=20), rng.integers(5, 25, 20), seed=0)
    cfg = QuadConfig(arms_per_round=3, probe_size=4, take_size=6, tau=-0.5, max_rounds=500)
    sel = make_selector("quad", pool.view(), Budget("examples", pool.n - 3), seed=0, config=cfg)
    exhausted_at: dict[int, int] = {}

    def check(s):
        h = s.history()[-1]
        if h["phase"] != "bandit":
            return
        assert not any(c in exhausted_at for c in h["pulled"]), h
        for st in s.cluster_stats():
            if st["exhausted"]:
                exhausted_at.setdefault(st["cluster"], h["round"])

    run_selector(sel, pool.score, on_round=check)
    assert len(exhausted_at) >= 10


def test_exclude_negative_leaves_out_negative_probes():
    pool = smooth_pool(8)
    budget = Budget("examples", 3000)
    base = dict(normalize="none", tau=0.0, take_size=20, probe_size=10)
    cfg_in = resume_config(pool, budget, **base)
    cfg_ex = resume_config(pool, budget, exclude_negative=True, **base)
    kept = run_selector(make_selector("quad", pool.view(), budget, seed=0, config=cfg_in),
                        pool.score)
    excl = run_selector(make_selector("quad", pool.view(), budget, seed=0, config=cfg_ex),
                        pool.score)
    probed = lambda r: r.score[~np.isnan(r.score)]  # noqa: E731
    assert (probed(kept) < 0).sum() > 0  # without the flag, negative probes are taken
    assert (probed(excl) >= 0).all()  # with it, none is
    assert len(excl) == 3000


def test_no_positive_cluster_falls_back_to_fill_in_cs_order():
    pool = smooth_pool(9, k=30)
    budget = Budget("examples", 900)
    cfg = QuadConfig.scaled(pool.n, 30, budget, tau=50.0)  # nothing is ever accepted
    sel = make_selector("quad", pool.view(), budget, seed=0, config=cfg)
    res = run_selector(sel, pool.score)
    assert len(res) == 900 and res.budget_met
    assert res.fill.all() and (res.round == -1).all()
    assert any("filled 900 rows" in n for n in res.notes)
    fill = sel.history()[-1]
    assert fill["phase"] == "fill" and "patience" in fill["reason"]
    # clusters were filled in descending CS
    cs = {s["cluster"]: s["cs"] for s in res.clusters}
    order = [c for c, _ in fill["clusters"]]
    assert [cs[c] for c in order] == sorted((cs[c] for c in order), reverse=True)
    assert res.scorer_calls < pool.n / 2

    cfg_off = cfg.model_copy(update={"fill": False})
    res_off = run_selector(make_selector("quad", pool.view(), budget, seed=0, config=cfg_off),
                           pool.score)
    assert len(res_off) == 0 and not res_off.budget_met
    assert any("fill is off" in n for n in res_off.notes)


def test_max_rounds_bounds_the_run():
    pool = smooth_pool(10)
    budget = Budget("examples", 5000)
    cfg = QuadConfig.scaled(pool.n, 60, budget, max_rounds=3)
    res = run_selector(make_selector("quad", pool.view(), budget, seed=0, config=cfg), pool.score)
    assert res.n_rounds == 3 and len(res) == 5000
    assert res.fill.any() and any("max_rounds (3)" in n for n in res.notes)


@pytest.mark.parametrize("share", [0.03, 0.1])
def test_score_budget_caps_scoring_then_fills(share):
    """The bandit never scores more than score_budget of the pool; rounds are cut to fit, and
    once no probe fits the rest is filled (with a note) and the budget is still met."""
    pool = good_bad_pool(3)[0]
    budget = Budget("examples", pool.n // 3)  # far more than the bandit can take at this cost
    cfg = QuadConfig(arms_per_round=8, probe_size=5, take_size=20, score_budget=share)
    sel = make_selector("quad", pool.view(), budget, seed=1, config=cfg)
    seen = []
    while not sel.finished:
        probes = sel.propose()
        seen.append(sum(len(p.rows) for p in probes))
        sel.observe(probes, [pool.score(p.rows) for p in probes])
    res = sel.result()
    cap = int(share * pool.n)
    assert res.scorer_calls == pool.calls <= cap
    assert res.scorer_calls > cap - cfg.probe_size  # used up to the last probe that fitted
    assert any(n < 8 * cfg.probe_size for n in seen[-1:])  # the last round was cut short
    assert len(res) == budget.amount and res.budget_met and res.fill.any()
    fill = sel.history()[-1]
    assert fill["phase"] == "fill" and "scoring budget" in fill["reason"]
    assert any("scoring budget" in n for n in res.notes)


def test_scaled_runs_score_at_most_a_tenth_of_the_pool():
    for seed in range(3):
        pool = smooth_pool(seed, k=120)
        budget = Budget("examples", pool.n // 5)
        res = run_selector(make_selector("quad", pool.view(), budget, seed=seed), pool.score)
        assert res.scorer_calls <= 0.1 * pool.n and len(res) == budget.amount


# ---- config -----------------------------------------------------------------------------------


def test_scaled_config_reproduces_quad_and_scales_down():
    paper = QuadConfig.scaled(600_000_000, 9873, Budget("examples", 10_000_000))
    assert (paper.arms_per_round, paper.probe_size, paper.take_size) == (50, 10, 20_000)
    assert paper.gamma == 0.2 and paper.max_rounds >= 200
    small = QuadConfig.scaled(19_500, 100, Budget("examples", 2000))
    # 10% scoring budget: one exploration pass (100 clusters) may use a third of 1,950 rows
    assert small.probe_size == 6 and small.take_size == 40 and small.arms_per_round == 8
    assert small.score_budget == 0.1
    unlimited = QuadConfig.scaled(19_500, 100, Budget("examples", 2000), score_budget=None)
    assert unlimited.probe_size == 10 and unlimited.take_size == 40 and unlimited.score_budget is None
    tiny = QuadConfig.scaled(100, 50, Budget("examples", 10))
    assert tiny.probe_size == 1 and tiny.take_size >= tiny.probe_size
    tok = QuadConfig.scaled(19_500, 100, Budget("tokens", 2_000_000), mean_tokens=500.0)
    assert tok.take_size == 40
    with pytest.raises(ValueError, match="mean_tokens"):
        QuadConfig.scaled(19_500, 100, Budget("tokens", 2_000_000))
    with pytest.raises(ValueError, match="take_size"):
        QuadConfig(probe_size=10, take_size=5)
    with pytest.raises(ValueError):
        QuadConfig(bogus=1)


def test_state_dict_is_plain_json_and_reports_are_complete():
    pool = smooth_pool(11)
    sel = make_selector("quad", pool.view(), Budget("examples", 2000), seed=0)
    res = run_selector(sel, pool.score)
    json.dumps(sel.state_dict(), allow_nan=False)
    json.dumps(sel.history(), allow_nan=False)
    json.dumps(res.clusters, allow_nan=False)
    keys = {"pulls", "mean_reward", "reward_sd", "cs", "selected", "probed", "exhausted"}
    assert keys <= set(res.clusters[0])
    h = sel.history()[0]
    assert {"pulled", "reward", "cs", "taken", "cs_top", "accepted"} <= set(h)
    assert sum(s["selected"] for s in res.clusters) == len(res)
    assert sum(s["probed"] for s in res.clusters) == res.scorer_calls
    assert res.rows.dtype == np.int64 and res.cluster.dtype == np.int32
    assert res.round.dtype == np.int32 and res.score.dtype == np.float64
    assert np.array_equal(res.cluster, pool.cluster[res.rows])


def test_probe_roundtrip():
    p = Probe(3, np.array([1, 2], dtype=np.int64))
    assert Probe.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_probe_log_lists_every_scored_row():
    pool = smooth_pool(12)
    sel = make_selector("quad", pool.view(), Budget("examples", 2000), seed=0)
    res = run_selector(sel, pool.score)
    log = sel.probe_log()
    assert log["row"].size == res.scorer_calls == np.unique(log["row"]).size
    np.testing.assert_array_equal(log["score"], pool.score(log["row"]))
    np.testing.assert_array_equal(log["cluster"], pool.cluster[log["row"]])
    pulled = [(h["round"], c) for h in sel.history() if h["phase"] == "bandit" for c in h["pulled"]]
    assert set(zip(log["round"].tolist(), log["cluster"].tolist())) == set(pulled)
    # every selected row that has a score was probed, with that score
    scored = ~np.isnan(res.score)
    lookup = dict(zip(log["row"].tolist(), log["score"].tolist()))
    assert [lookup[r] for r in res.rows[scored]] == res.score[scored].tolist()
