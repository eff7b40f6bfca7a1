"""selection.allocation: the softmax shares and the empirical-Bayes shrinkage, by hand."""
from __future__ import annotations

import math

import numpy as np

from quadsel.selection.allocation import shrinkage, shrunken_means, softmax_shares


def test_shares_are_capacity_times_exp_q_over_t():
    cap = np.array([100.0, 200.0, 300.0])
    q = np.array([1.0, 0.0, -1.0])
    got = softmax_shares(cap, q, 60, temperature=2.0)
    w = cap * np.exp(q / 2.0)
    np.testing.assert_allclose(got, 60 * w / w.sum())


def test_equal_quality_is_a_stratified_sample():
    cap = np.array([10.0, 30.0, 60.0])
    np.testing.assert_allclose(softmax_shares(cap, np.zeros(3), 20, 1.0), [2, 6, 12])


def test_water_filling_caps_and_redistributes():
    cap = np.array([5.0, 100.0, 100.0])
    got = softmax_shares(cap, np.array([10.0, 0.0, 0.0]), 105, 1.0)
    np.testing.assert_allclose(got, [5, 50, 50])
    np.testing.assert_allclose(softmax_shares(cap, np.zeros(3), 1e6, 1.0), cap)  # more than the pool
    # weights that underflow are shared by capacity, never lost
    assert math.isclose(softmax_shares(cap, np.array([0.0, -1e6, -1e6]), 50, 1.0).sum(), 50)


def test_shrinkage_from_within_and_between_variance():
    # total variance 2 (m2 / n), within 0.5 -> between 1.5 -> kappa 1/3
    assert math.isclose(shrinkage(10, 20.0, 4.0, 8), 0.5 / 1.5)
    assert shrinkage(10, 20.0, 20.0, 8) == math.inf  # within >= total: clusters do not differ
    assert shrinkage(1, 0.0, 0.0, 0) == math.inf  # nothing seen yet
    assert shrinkage(10, 20.0, 0.0, 0) == 1.0  # one probe per pull: no within spread to measure
    np.testing.assert_allclose(shrunken_means(np.array([2.0, 2.0, 5.0]), np.array([1.0, 3.0, 0.0]), 1.0),
                               [1.0, 1.5, 0.0])
    assert (shrunken_means(np.ones(3), np.ones(3), math.inf) == 0).all()
