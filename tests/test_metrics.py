import math

import numpy as np
import pytest

from llmrec_ray import metrics


def test_auc_perfect_and_reversed():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_auc_ties_and_hand_case():
    assert metrics.auc([0, 1], [0.5, 0.5]) == 0.5
    # pos 0.8 beats both negs, pos 0.3 beats 0.2 only -> 3/4
    assert metrics.auc([1, 1, 0, 0], [0.8, 0.3, 0.5, 0.2]) == pytest.approx(0.75)
    assert math.isnan(metrics.auc([1, 1], [0.1, 0.2]))


def test_log_loss():
    assert metrics.log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert np.isfinite(metrics.log_loss([1], [0.0]))


def test_hr_ndcg():
    pos = [0.9, 0.1]
    neg = [[0.5, 0.2, 0.1], [0.5, 0.2, 0.3]]
    assert metrics.ranks_of_positives(pos, neg).tolist() == [1, 4]
    hr, ndcg = metrics.hit_rate_ndcg(pos, neg, k=2)
    assert hr == 0.5 and ndcg == pytest.approx(0.5)
    hr, ndcg = metrics.hit_rate_ndcg(pos, neg, k=10)
    assert hr == 1.0 and ndcg == pytest.approx((1 + 1 / math.log2(5)) / 2)


def test_sample_negatives_excludes_and_seeded():
    a = metrics.sample_negatives(list("abcdef"), {"a", "b"}, 3, np.random.default_rng(0))
    b = metrics.sample_negatives(list("abcdef"), {"a", "b"}, 3, np.random.default_rng(0))
    assert a == b and not {"a", "b"} & set(a) and len(set(a)) == 3
