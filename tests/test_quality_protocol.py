"""The quality benchmark's protocol (benchmarks/quality_ml100k.py): no arm sees a row of the week it scores.

The check flips every label of the test week and refits every classical arm: on each user's first row of
the week (whose history lies wholly before the week) the scores must not move. A leaky fit (popularity on
events up to the end of the week) is the control that shows the check can fail.
"""

import argparse

import numpy as np
import pandas as pd
import pytest

from benchmarks.quality_ml100k import CLASSICAL, LM_ARMS, classical_scorer, lm_plan, split
from llmrec_ray.baselines import Popularity
from llmrec_ray.config import load_config
from llmrec_ray.ingest import user_examples

WEEK = 7 * 86400


def _events(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(30):
        for t in rng.integers(0, 3 * WEEK, 25):
            item = f"i{rng.integers(12)}"
            rating = float(rng.integers(1, 6))
            rows.append((f"u{u}", item, rating, int(rating >= 4), int(t)))
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "label", "timestamp"])
    return ev.drop_duplicates(["user_id", "timestamp"]).sort_values("timestamp").reset_index(drop=True)


def _examples(events):
    texts = {i: (f"item {i}", i) for i in events["item_id"].unique()}
    ev = events.assign(is_target=True, is_replay=False)
    return user_examples(ev, texts, 3, 0, np.array(list(texts)), 0, id_history_len=10).sort_values("timestamp")


def _first_rows_scores(arm, events, cfg, start, end):
    examples = _examples(events)
    train_events, week = split(events, examples, start, end)
    assert train_events["timestamp"].max() < start and week["timestamp"].min() >= start
    scorer, _ = classical_scorer(arm, train_events, examples[examples["timestamp"] < start],
                                 events[events["timestamp"] < end], cfg)
    first = week.sort_values("timestamp").groupby("user_id").head(1)
    return np.asarray(scorer(first), dtype=float)


@pytest.mark.parametrize("arm", CLASSICAL)
def test_classical_arms_never_learn_from_the_week_they_score(arm):
    cfg = load_config(None, ["model.collab.dim=4", "model.collab.epochs=3", "model.collab.history_len=10"])
    events = _events()
    start, end = 2 * WEEK, 3 * WEEK
    flipped = events.copy()
    in_week = flipped["timestamp"] >= start
    flipped.loc[in_week, "label"] = 1 - flipped.loc[in_week, "label"]
    flipped.loc[in_week, "rating"] = 6.0 - flipped.loc[in_week, "rating"]
    np.testing.assert_allclose(_first_rows_scores(arm, events, cfg, start, end),
                               _first_rows_scores(arm, flipped, cfg, start, end), atol=1e-6)


def test_the_check_catches_a_leaky_arm():
    events, start = _events(), 2 * WEEK
    flipped = events.copy()
    flipped.loc[flipped["timestamp"] >= start, "label"] ^= 1
    leaky = [Popularity().fit(e).predict([], ["i1", "i2", "i3"]) for e in (events, flipped)]  # fitted on the week too
    assert not np.allclose(*leaky)


def test_language_model_arms_train_only_on_earlier_shards():
    keys = [f"interactions/period=1998-0{m}-0{d}/part-00000.parquet" for m in (1, 2, 3) for d in (1, 8)]
    weeks = [(k, i) for i, k in enumerate(keys[-4:])]
    args = argparse.Namespace(max_train_rows=100, full_train_rows=800)
    models = {}
    for w, (key, _) in enumerate(weeks):
        for arm in (*LM_ARMS, "hybrid_full"):
            plan = lm_plan(arm, w, weeks, keys, models, args)
            assert plan["targets"] and all(k < key for k in plan["targets"] + plan["older"]), (arm, w, plan)
            if arm != "hybrid_full":
                models[f"{arm}-latest"] = plan["name"]
        assert lm_plan("hybrid", w, weeks, keys, models, args)["rows"] == lm_plan("text", w, weeks, keys, models, args)["rows"]
