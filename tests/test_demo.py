"""The demo's sample request: which real user and movies it shows, and how it counts the model's ordering."""

import pandas as pd

from llmrec_ray.catalog import load_catalog
from llmrec_ray.config import load_config
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.demo import next_week_sample, ordered_pairs, pick_user
from llmrec_ray.ledger import Ledger
from llmrec_ray.store import Store


def _week(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "label"])


def test_next_week_sample_takes_the_user_with_most_pairs_among_their_first_movies():
    week = _week([
        ("u1", "a", 1, 5, 1), ("u1", "b", 2, 1, 0),                       # 1 pair
        ("u2", "a", 3, 5, 1), ("u2", "b", 4, 4, 1), ("u2", "c", 5, 2, 0),  # 2 pairs in its first 3 ...
        ("u2", "d", 6, 1, 0), ("u2", "e", 7, 1, 0),                       # ... 4 more if max_items let them in
        ("u3", "a", 1, 5, 1), ("u3", "b", 2, 5, 1), ("u3", "x", 3, 1, 0),  # x is not in the catalogue: 0 pairs
    ])
    known = {"a", "b", "c", "d", "e"}
    got = next_week_sample(week, known, max_items=3)
    assert got["user_id"].unique().tolist() == ["u2"] and got["item_id"].tolist() == ["a", "b", "c"]
    assert next_week_sample(week, known, max_items=2)["user_id"].iloc[0] == "u1"  # u2's first 2 are both liked
    assert next_week_sample(week, known, returning_users={"u1", "u3"}, max_items=3)["user_id"].iloc[0] == "u1"
    assert next_week_sample(week[week["label"] == 1], known) is None


def test_ordered_pairs_counts_liked_above_disliked_only():
    assert ordered_pairs([0.9, 0.2, 0.5], [1, 0, 1]) == (2, 2)
    assert ordered_pairs([0.3, 0.6, 0.1], [1, 0, 0]) == (1, 2)
    assert ordered_pairs([0.5, 0.5], [1, 0]) == (0, 1)  # a tie is not the right order
    assert ordered_pairs([0.5, 0.4], [1, 1]) == (0, 0)


def test_pick_user_takes_a_returning_user_and_sends_only_ratings_before_the_movies(tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path}"])
    store = Store.from_config(cfg.store)
    import_movielens(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()  # registers the imported shards, as a round does
    keys = [s.key for s in ledger.shards()]
    pick = pick_user(store, keys[10], load_catalog(store), history_len=20)
    movies = pick["movies"]
    assert set(movies["label"]) == {0, 1} and (movies["user_id"] == movies["user_id"].iloc[0]).all()
    assert len(pick["history"]) == 20  # a returning user: the weeks before hold 20+ of their ratings
    assert movies["timestamp"].min() >= store.read_table(keys[11]).column("timestamp").to_numpy().min()
    events = pd.concat([store.read_table(k).to_pandas() for k in keys])
    mine = events[(events["user_id"] == movies["user_id"].iloc[0]) & (events["timestamp"] < movies["timestamp"].min())]
    expected = mine.sort_values("timestamp", ascending=False).head(20)
    assert [h["item_id"] for h in pick["history"]] == expected["item_id"].astype(str).tolist()
    assert pick_user(store, keys[-1], load_catalog(store), history_len=20) is None  # no next week
