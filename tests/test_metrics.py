import math

import numpy as np
import pandas as pd
import pytest

from llmrec_ray import metrics
from llmrec_ray.config import load_config
from llmrec_ray.evaluate import evaluate_all


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


def test_evaluate_all_scores_every_scorer_on_the_same_rows_and_skips_ranking_on_request():
    cfg = load_config(None, ["eval.num_negatives=4", "eval.k=2", "eval.max_rows=20"])
    items = {f"i{j}": (f"item {j}", "") for j in range(12)}
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user_id": [f"u{j % 5}" for j in range(40)], "item_id": [f"i{j % 12}" for j in range(40)],
                          "label": rng.integers(0, 2, 40).astype(float), "history_text": "h", "timestamp": range(40)})
    frame["candidate_text"] = frame["item_id"].map(lambda i: items[i][0])
    history = pd.DataFrame({"user_id": ["u0", "u1"], "item_id": ["i0", "i1"]})

    def label_oracle(f):  # knows the labels; the ranking frame has none, so it scores by item there
        return f["label"].to_numpy() if "label" in f else (f["item_id"] == "i0").to_numpy(float)

    full = evaluate_all({"oracle": label_oracle, "flat": lambda f: np.full(len(f), 0.5)}, frame, items, history, cfg)
    assert full["oracle"]["n"] == full["flat"]["n"] == 20  # eval.max_rows caps the rows, same rows for both
    assert full["oracle"]["auc"] == 1.0 and full["flat"]["auc"] == 0.5
    assert full["oracle"]["n_ranked"] == 20 // 5 and "ndcg@2" in full["flat"]
    pointwise = evaluate_all({"oracle": label_oracle}, frame, items, history, cfg, ranking=False)
    assert pointwise["oracle"]["auc"] == 1.0 and "n_ranked" not in pointwise["oracle"]


def test_a_user_who_has_seen_every_item_is_left_out_of_the_ranking():
    """It once crashed np.stack: a positive with no negatives left made groups of different sizes."""
    cfg = load_config(None, ["eval.num_negatives=3", "eval.k=2", "eval.max_rows=40"])
    items = {f"i{j}": (f"item {j}", "") for j in range(6)}
    frame = pd.DataFrame({"user_id": ["all"] * 6 + ["some"] * 2, "item_id": [f"i{j}" for j in range(6)] + ["i0", "i1"],
                          "label": [1.0] * 8, "history_text": "h", "timestamp": range(8)})
    frame["candidate_text"] = frame["item_id"].map(lambda i: items[i][0])
    out = evaluate_all({"flat": lambda f: np.full(len(f), 0.5)}, frame, items, frame[["user_id", "item_id"]].iloc[:0], cfg)
    assert out["flat"]["n_ranked"] == 2  # the two positives of "some"; none of "all" (every item seen)


def test_draw_unseen_never_returns_a_seen_item_on_either_path():
    from llmrec_ray.metrics import draw_unseen

    big = np.array([f"i{n}" for n in range(1000)], dtype=object)
    seen = {"i1", "i2", "i3"}
    picks = draw_unseen(np.random.default_rng(0), big, seen, rows=50, k=3)  # rejection draws
    assert picks.shape == (50, 3) and not set(picks.ravel()) & seen
    assert all(len(set(row)) == 3 for row in picks)  # distinct within a row
    np.testing.assert_array_equal(picks, draw_unseen(np.random.default_rng(0), big, seen, rows=50, k=3))  # seeded
    small = np.array(["a", "b", "c", "d"], dtype=object)  # a heavy user: the exact pool
    picks = draw_unseen(np.random.default_rng(0), small, {"a", "b", "c"}, rows=4, k=2)
    assert picks.shape == (4, 1) and set(picks.ravel()) == {"d"}
    assert draw_unseen(np.random.default_rng(0), small, set(small), rows=2, k=1).shape == (2, 0)
