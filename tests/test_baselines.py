import numpy as np
import pandas as pd

from llmrec_ray.baselines import BiasedMF, Popularity
from llmrec_ray.metrics import auc


def _events(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 50, n), rng.integers(0, 40, n)
    taste = np.where(users % 2 == 0, 1, -1) * np.where(items % 2 == 0, 1, -1)  # a 2-cluster pattern MF can learn
    label = (rng.random(n) < 1 / (1 + np.exp(-2 * taste))).astype(float)
    return pd.DataFrame({"user_id": users.astype(str), "item_id": items.astype(str), "label": label})


def test_mf_learns_user_item_interaction_popularity_cannot():
    train, test = _events(4000, 0), _events(1000, 1)
    pop = Popularity().fit(train)
    mf = BiasedMF(epochs=150).fit(train)
    pop_auc = auc(test["label"], pop.predict(test["user_id"], test["item_id"]))
    mf_auc = auc(test["label"], mf.predict(test["user_id"], test["item_id"]))
    assert mf_auc > 0.75 and mf_auc > pop_auc + 0.15


def test_unknown_users_and_items_fall_back():
    train = _events(500)
    for model in (Popularity().fit(train), BiasedMF(epochs=20).fit(train)):
        p = model.predict(["nobody"], ["nothing"])
        assert 0 < p[0] < 1


def test_a_positive_only_log_teaches_the_baselines_with_sampled_negatives():
    from llmrec_ray.baselines import with_sampled_negatives

    # item "a" is bought by everyone, "b" by one user, the rest never: popularity must rank a > b > unseen
    events = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u1"], "item_id": ["a", "a", "a", "b"],
                           "timestamp": [1, 2, 3, 4], "label": np.int8(1), "rating": np.float32("nan")})
    catalogue = ["a", "b"] + [f"x{i}" for i in range(50)]
    assert with_sampled_negatives(events, catalogue, 0, seed=0) is events
    fit = with_sampled_negatives(events, catalogue, 2, seed=0)
    negatives = fit[fit["label"] == 0]
    assert len(negatives) == 8 and sorted(negatives["timestamp"].unique()) == [1, 2, 3, 4]
    for user, rows in negatives.groupby("user_id"):  # never an item the user touched
        assert not set(rows["item_id"]) & set(events.loc[events["user_id"] == user, "item_id"])
    p = Popularity().fit(events).predict(["u9"] * 3, ["a", "b", "x1"])
    assert p[0] == p[1] == p[2]  # positives alone: a constant -- what the judge used to do
    p = Popularity().fit(fit).predict(["u9"] * 3, ["a", "b", "x1"])
    assert p[0] > p[1] > p[2]
