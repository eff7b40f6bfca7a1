"""Baseline selectors (random, topk, cluster-topk) behind the bandit's interface."""
from __future__ import annotations

import json

import numpy as np
import pytest

from quadsel.selection import BaselineConfig, Budget, ClusterView, QuadConfig, make_selector, run_selector


class Pool:
    """K clusters of given sizes; score = mean_c + noise seeded by row id (no ties)."""

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.sizes = np.asarray(sizes)
        n = int(self.sizes.sum())
        ids = rng.permutation(n)
        self.members = [np.sort(m) for m in np.split(ids, np.cumsum(self.sizes)[:-1])]
        self.cluster = np.empty(n, dtype=np.int64)
        for c, m in enumerate(self.members):
            self.cluster[m] = c
        self.means = rng.normal(size=len(self.sizes))
        self.noise = np.random.default_rng(99 + seed).normal(size=n)
        self.lengths = rng.integers(10, 300, n)
        self.calls = 0

    @property
    def n(self):
        return int(self.sizes.sum())

    def view(self):
        k = len(self.sizes)
        return ClusterView([m.copy() for m in self.members], [[] for _ in range(k)],
                           self.lengths.copy())

    def true_score(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        return self.means[self.cluster[rows]] + 0.5 * self.noise[rows]

    def score(self, rows):
        self.calls += len(rows)
        return self.true_score(rows)


NAMES = ["random", "topk", "cluster-topk"]


def run(name, pool, budget, seed=0, config=None, on_round=None):
    sel = make_selector(name, pool.view(), budget, seed=seed, config=config)
    return sel, run_selector(sel, pool.score, on_round=on_round)


@pytest.fixture
def pool():
    return Pool(np.random.default_rng(1).integers(20, 400, 25), seed=1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("amount", [0, 1, 777, 3001])
def test_example_budget_met_exactly(name, pool, amount):
    _, res = run(name, pool, Budget("examples", amount))
    assert len(res) == amount == res.used and res.budget_met
    assert np.unique(res.rows).size == amount
    assert np.array_equal(res.cluster, pool.cluster[res.rows])
    assert not res.fill.any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("amount", [5, 9_999, 500_000])
def test_token_budget_never_exceeded(name, pool, amount):
    _, res = run(name, pool, Budget("tokens", amount))
    assert res.used == int(pool.lengths[res.rows].sum()) <= amount
    assert res.budget_met
    left = np.setdiff1d(np.arange(pool.n), res.rows)
    assert left.size == 0 or pool.lengths[left].min() > amount - res.used


@pytest.mark.parametrize("name", NAMES)
def test_budget_larger_than_pool_takes_everything_and_says_so(name, pool):
    _, res = run(name, pool, Budget("examples", pool.n + 1))
    assert len(res) == pool.n and not res.budget_met
    assert any("no rows left" in n for n in res.notes)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name, pool):
    budget = Budget("examples", 1000)
    _, a = run(name, pool, budget, seed=3)
    _, b = run(name, pool, budget, seed=3)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.score, b.score, equal_nan=True)
    _, c = run(name, pool, budget, seed=4)
    if name == "random":
        assert not np.array_equal(a.rows, c.rows)
    else:  # scoring everything leaves nothing to chance
        assert np.array_equal(a.rows, c.rows)


def test_scorer_calls(pool):
    budget = Budget("examples", 500)
    _, res = run("random", pool, budget)
    assert res.scorer_calls == 0 and pool.calls == 0 and np.isnan(res.score).all()
    for name in ("topk", "cluster-topk"):
        pool.calls = 0
        _, res = run(name, pool, budget)
        assert res.scorer_calls == pool.calls == pool.n


def test_topk_scores_in_chunks_and_picks_the_true_top(pool):
    cfg = BaselineConfig(chunk_size=100, chunks_per_round=3)
    rounds = []
    sel, res = run("topk", pool, Budget("examples", 1234), config=cfg,
                   on_round=lambda s: rounds.append(s.propose()))
    assert res.n_rounds == -(-pool.n // 300)
    assert all(len(p.rows) <= 100 for r in rounds for p in r)
    truth = pool.true_score(np.arange(pool.n))
    expect = np.argsort(-truth, kind="stable")[:1234]
    assert res.rows.tolist() == expect.tolist()
    np.testing.assert_array_equal(res.score, truth[expect])
    assert sel.history()[-1]["scored_total"] == pool.n


def test_cluster_topk_equal_shares_and_top_within_clusters():
    sizes = [500, 40, 300, 10, 250, 600, 5, 420]
    pool = Pool(sizes, seed=2)
    budget = Budget("examples", 1003)
    sel, res = run("cluster-topk", pool, budget)
    counts = np.bincount(res.cluster, minlength=len(sizes))
    # clusters smaller than the equal share are taken whole; the rest share what is left
    # equally (up to one row each from the integer remainder)
    small = [c for c, s in enumerate(sizes) if s < 1003 / len(sizes)]
    assert all(counts[c] == sizes[c] for c in small)
    big = [c for c in range(len(sizes)) if c not in small]
    share = (1003 - sum(sizes[c] for c in small)) // len(big)
    assert all(counts[c] in (share, share + 1) for c in big)
    assert counts.sum() == 1003
    truth = pool.true_score(np.arange(pool.n))
    for c in big:
        mine = res.rows[res.cluster == c]
        best = pool.members[c][np.argsort(-truth[pool.members[c]])][: counts[c]]
        assert set(mine.tolist()) == set(best.tolist())
    # the one-row extras went to the clusters whose next row scores best
    extra = [c for c in big if counts[c] == share + 1]
    nxt = {c: np.sort(truth[pool.members[c]])[::-1][share] for c in big}
    assert sorted(extra, key=lambda c: -nxt[c]) == sorted(big, key=lambda c: -nxt[c])[: len(extra)]
    assert any("taken whole" in n for n in res.notes)
    shares = {d["cluster"]: d["share"] for d in res.clusters}
    assert all(shares[c] == sizes[c] for c in small)


def test_cluster_topk_token_shares_are_roughly_equal():
    pool = Pool([400] * 6, seed=3)
    budget = Budget("tokens", 60_000)
    _, res = run("cluster-topk", pool, budget)
    per = np.bincount(res.cluster, weights=pool.lengths[res.rows], minlength=6)
    assert res.used <= 60_000 and res.budget_met
    assert per.max() - per.min() <= pool.lengths.max() * 2


@pytest.mark.parametrize("name", ["topk", "cluster-topk"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_resume_is_identical(name, pool, k):
    cfg = BaselineConfig(chunk_size=200, chunks_per_round=2)
    budget = Budget("examples", 900)
    full_sel, full = run(name, pool, budget, config=cfg)
    sel = make_selector(name, pool.view(), budget, seed=0, config=cfg)
    for _ in range(k):
        probes = sel.propose()
        sel.observe(probes, [pool.score(p.rows) for p in probes])
    blob = json.dumps(sel.state_dict(), allow_nan=False)
    fresh = make_selector(name, pool.view(), budget, seed=0, config=cfg)
    fresh.load_state_dict(json.loads(blob))
    res = run_selector(fresh, pool.score)
    assert np.array_equal(res.rows, full.rows) and np.array_equal(res.score, full.score)
    assert res.scorer_calls == full.scorer_calls == pool.n
    assert res.clusters == full.clusters and fresh.history() == full_sel.history()


def test_make_selector_checks_its_arguments(pool):
    with pytest.raises(ValueError, match="unknown selector"):
        make_selector("best", pool.view(), Budget("examples", 1), seed=0)
    with pytest.raises(TypeError, match="QuadConfig"):
        make_selector("quad", pool.view(), Budget("examples", 1), seed=0, config=BaselineConfig())
    with pytest.raises(TypeError, match="BaselineConfig"):
        make_selector("topk", pool.view(), Budget("examples", 1), seed=0, config=QuadConfig())
    with pytest.raises(ValueError, match="budget.amount"):
        Budget("examples", -1)
    with pytest.raises(ValueError, match="budget.unit"):
        Budget("rows", 1)
    bad = pool.view()
    bad.members[1] = np.concatenate([bad.members[1], bad.members[0][:1]])
    with pytest.raises(ValueError, match="more than one place"):
        make_selector("random", bad, Budget("examples", 1), seed=0)


def test_probe_log_of_full_scans(pool):
    cfg = BaselineConfig(chunk_size=100, chunks_per_round=2)
    sel, res = run("topk", pool, Budget("examples", 10), config=cfg)
    log = sel.probe_log()
    assert log["row"].tolist() == list(range(pool.n))
    np.testing.assert_array_equal(log["score"], pool.true_score(log["row"]))
    assert log["round"].max() == res.n_rounds - 1
    sel, _ = run("random", pool, Budget("examples", 10))
    assert sel.probe_log()["row"].size == 0
