"""The vectorised example builder (used per user group by Ray Data, and on whole frames by examples_frame)."""

import numpy as np
import pandas as pd
import pytest

from llmrec_ray.ingest import EXAMPLE_COLUMNS, examples_from_events, user_examples

TEXTS = {i: (f"cand {i}", f"T{i}") for i in ["a", "b", "c", "d", "e", "f", "g"]}


def _events():
    # user u1: a@10 (rated 5), b@20, c@20 (same second as b), d@30; user u2: e@15, f@25 (u1's events never leak to u2)
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2"],
        "item_id": ["a", "b", "c", "d", "e", "f"],
        "rating": [5.0, None, None, None, None, 2.0],
        "label": [1, 0, 1, 1, 0, 1],
        "timestamp": [10, 20, 20, 30, 15, 25],
        "is_target": [True, True, True, True, False, True],
        "is_replay": [False, False, False, True, False, False],
    })


def test_histories_are_strictly_earlier_newest_first_and_capped():
    frame = user_examples(_events(), TEXTS, 2, 0, np.array(list(TEXTS)), 0).set_index("item_id")
    assert list(frame.columns) == [c for c in EXAMPLE_COLUMNS if c != "item_id"]
    assert frame.loc["a", "history_text"] == "no history"
    assert frame.loc["b", "history_text"] == "Ta rated 5"  # c has the same timestamp: not history
    assert frame.loc["c", "history_text"] == "Ta rated 5"
    assert frame.loc["d", "history_text"] == "Tc ; Tb"  # capped at 2, newest first (ties ordered by item id)
    assert frame.loc["f", "history_text"] == "Te"  # the other user's events never appear
    assert frame.loc["d", "is_replay"] and not frame.loc["c", "is_replay"]
    assert frame["label"].dtype == np.float32 and frame.loc["b", "label"] == 0.0
    assert "e" not in frame.index  # not a target row: history only


def test_id_histories_match_the_text_histories_with_their_own_cap():
    frame = user_examples(_events(), TEXTS, 1, 0, np.array(list(TEXTS)), 0, id_history_len=3).set_index("item_id")
    assert frame.loc["a", "history_ids"] == []
    assert frame.loc["b", "history_ids"] == ["a"] and frame.loc["b", "history_ratings"] == [5.0]
    assert frame.loc["d", "history_ids"] == ["c", "b", "a"]  # newest first, capped at 3 (the text at 1)
    assert frame.loc["d", "history_text"] == "Tc"
    assert frame.loc["d", "history_labels"] == [1.0, 0.0, 1.0]
    assert np.isnan(frame.loc["d", "history_ratings"][0]) and frame.loc["f", "history_ids"] == ["e"]
    negatives = user_examples(_events(), TEXTS, 1, 2, np.array(list(TEXTS)), 0, id_history_len=3)
    for _, row in negatives[negatives["label"] == 0].iterrows():  # a sampled negative shares its positive's history
        twin = frame.loc[[i for i in frame.index if frame.loc[i, "timestamp"] == row["timestamp"]
                          and frame.loc[i, "user_id"] == row["user_id"]][0]]
        assert row["history_ids"] == twin["history_ids"]


def test_result_does_not_depend_on_row_order():
    events = _events()
    a = user_examples(events, TEXTS, 3, 0, np.array(list(TEXTS)), 0)
    b = user_examples(events.sample(frac=1.0, random_state=3), TEXTS, 3, 0, np.array(list(TEXTS)), 0)
    key = ["user_id", "timestamp", "item_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))


def test_sampled_negatives_are_unseen_items_with_the_target_history():
    events = _events()
    frame = user_examples(events, TEXTS, 3, 2, np.array(list(TEXTS)), 0)
    seen = events.groupby("user_id")["item_id"].apply(set)
    is_neg = np.array([item not in seen[user] for user, item in zip(frame.user_id, frame.item_id)])
    assert len(frame) == 5 * 3 and is_neg.sum() == 10  # 5 target rows, 2 negatives each
    assert (frame.label[is_neg] == 0.0).all()
    targets = frame[~is_neg].set_index(["user_id", "timestamp"])["history_text"]
    for row in frame[is_neg].itertuples():  # a negative shares its positive's time and history
        assert row.history_text in set(np.atleast_1d(targets.loc[(row.user_id, row.timestamp)]))
    again = user_examples(events, TEXTS, 3, 2, np.array(list(TEXTS)), 0)
    assert again.item_id.tolist() == frame.item_id.tolist()  # seeded


def test_unknown_item_is_a_clear_error():
    cols = {c: _events()[c].to_numpy() for c in _events().columns}
    cols["item_id"] = np.array(["a", "b", "zzz", "d", "e", "f"], dtype=object)
    with pytest.raises(ValueError, match=r"not in the catalogue: \[.zzz.\]"):
        examples_from_events(cols, TEXTS, 3, 0, np.array(list(TEXTS)), 0)
