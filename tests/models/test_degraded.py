"""Degraded-mode scoring: counts, an exact parity model, a useless one."""

import numpy as np
import pytest

from coding_ext import reference
from models import degraded


def _problem(n=120, features=12, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 1, 3, 4), dtype=np.float32)
    W = rng.standard_normal((features, classes)).astype(np.float32)
    base = X.reshape(n, -1) @ W
    y = base.argmax(1)
    y[: n // 4] = (y[: n // 4] + 1) % classes   # the base model is wrong on a quarter
    return X, y, base, W


@pytest.mark.parametrize("k", [2, 3, 4])
def test_an_exact_parity_model_reconstructs_the_base_model(k):
    X, y, base, W = _problem()
    # A linear base model is its own perfect parity model for the sum encoder.
    scores = degraded.score(X, y, base, k, reference.sum_encode, lambda q: q.reshape(len(q), -1) @ W,
                            reference.subtract_decode, groupings=3, seed=1)
    assert scores["decoded"] == 3 * (120 // k) * k
    assert scores["agreement"] >= 0.99
    assert scores["degraded_top1"] == pytest.approx((base.argmax(1) == y).mean(), abs=0.01)
    assert scores["degraded_top5"] >= scores["degraded_top1"]


def test_a_zero_parity_model_scores_near_chance():
    X, y, base, _ = _problem(n=400)
    scores = degraded.score(X, y, base, 2, reference.sum_encode, lambda q: np.zeros((len(q), 10), np.float32),
                            reference.subtract_decode, groupings=2)
    # Decoded = -F(other member): unrelated to this example's label.
    assert scores["degraded_top1"] < 0.25
    assert scores["agreement"] < 0.25


def test_every_example_is_erased_once_per_grouping():
    seen = []
    for groups in degraded.groups_for(10, 3, groupings=2, seed=0):
        assert groups.shape == (3, 3)
        seen.append(sorted(groups.ravel().tolist()))
    assert all(len(set(s)) == 9 for s in seen)


def test_topk_hits():
    outputs = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.0]], np.float32)
    np.testing.assert_array_equal(degraded.topk_hits(outputs, np.array([2, 2]), 2), [True, False])
    np.testing.assert_array_equal(degraded.topk_hits(outputs, np.array([2, 2]), 5), [True, True])


def test_too_few_examples_for_a_group():
    X, y, base, _ = _problem(n=3)
    with pytest.raises(ValueError, match="k=4"):
        degraded.score(X, y, base, 4, reference.sum_encode, lambda q: q, reference.subtract_decode)
