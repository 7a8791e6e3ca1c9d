"""Continuous mode: rounds run as data lands, a rejected round waits for more data, a stop request ends it cleanly."""

import threading

from llmrec_ray import pipeline
from llmrec_ray.config import load_config
from llmrec_ray.continuous import StopFlag, enough_new_data, run_continuous
from llmrec_ray.ledger import Ledger
from llmrec_ray.registry import Registry
from tests.test_pipeline import _store, fake_train


def test_thresholds():
    cfg = load_config(None, ["continuous.min_new_shards=2", "continuous.min_new_rows=100"])
    assert not enough_new_data(1, 500, cfg) and not enough_new_data(2, 99, cfg) and enough_new_data(2, 100, cfg)


def test_runs_rounds_as_shards_land_then_stops_on_request(tmp_path, approve_all):
    cfg, store = _store("file", tmp_path)
    cfg.continuous.poll_interval_s = 0.2
    held_back = store.list("interactions")[3]
    store.move(held_back, "holdback/shard.parquet")  # not landed yet
    stop, reports = StopFlag(), []

    def round_fn(c, s):
        report = pipeline.run_round(c, s, train_fn=fake_train)
        if len(reports) == 1:  # after the second round, land the held-back shard
            store.move("holdback/shard.parquet", held_back)
        if len(reports) == 2:
            stop.set()  # as SIGTERM would: finish this round, start no other
        reports.append(report)
        return report

    done = run_continuous(cfg, store, stop=stop, round_fn=round_fn)
    assert [r.promoted for r in done] == [True, True, True]
    assert Registry(store).promoted_version() == "v0003"
    assert all(s.consumed_by for s in Ledger(store).shards())


def test_rejected_round_waits_for_more_data(tmp_path):
    cfg, store = _store("file", tmp_path)
    cfg.continuous.poll_interval_s = 0.1
    calls = []

    def round_fn(c, s):
        calls.append(1)
        return pipeline.RoundReport(decision="reject")

    stop = StopFlag()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    run_continuous(cfg, store, stop=stop, round_fn=round_fn)
    assert len(calls) == 1  # no new shard arrived after the rejection: no second round on the same data


def test_round_that_lost_the_promotion_race_is_retried_at_once(tmp_path):
    cfg, store = _store("file", tmp_path)
    cfg.continuous.poll_interval_s = 0.1
    cfg.continuous.max_rounds = 2
    calls = []

    def round_fn(c, s):
        calls.append(1)
        return pipeline.RoundReport(decision=pipeline.LOST_RACE)

    stop = StopFlag()
    timer = threading.Timer(5.0, stop.set)  # a safety net: without a retry the loop would wait for new data
    timer.start()
    run_continuous(cfg, store, stop=stop, round_fn=round_fn)
    timer.cancel()
    assert len(calls) == 2  # another writer promoted: the next round starts from the winner, no waiting
