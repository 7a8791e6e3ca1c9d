"""Data plane: importers -> shards -> ledger (quarantine, exactly-once) -> examples, on file:// and real S3."""

import io
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_ray import ingest
from llmrec_ray.config import load_config
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.datasets.synth import generate_events, generate_synth
from llmrec_ray.ledger import Ledger, read_shard
from llmrec_ray.schema import INTERACTION_SCHEMA, validate_interactions
from llmrec_ray.store import ConflictError, Store

SMALL_SYNTH = ["synth.num_users=60", "synth.num_items=40", "synth.num_events=3000", "synth.num_periods=4",
               "synth.new_items_per_period=5", "data.history_len=3"]


def test_movielens_import_weekly_shards(store_cfg):
    cfg = load_config(None)
    store = Store.from_config(store_cfg)
    report = import_movielens(cfg, store, progress=False)
    assert report.num_rows == 100_000 and report.num_items == 1682
    keys = store.list("interactions", suffix=".parquet")
    assert len(keys) == report.num_shards >= 30
    ledger = Ledger(store)
    assert ledger.refresh() == []  # nothing quarantined
    shards = ledger.shards()
    assert sum(s.num_rows for s in shards) == 100_000  # no row dropped
    first = read_shard(store, shards[0].key)
    assert first.schema.equals(INTERACTION_SCHEMA)
    ts = first.column("timestamp").to_numpy()
    assert ts.max() - ts.min() < 7 * 86400  # one week per shard
    ratings, labels = first.column("rating").to_numpy(), first.column("label").to_numpy()
    assert ((ratings >= 4) == (labels == 1)).all()


def test_synth_has_drift_new_items_and_scale():
    cfg = load_config(None, ["synth.num_events=20000", "synth.num_periods=6", "synth.new_items_per_period=7"])
    catalog, events = generate_events(cfg)
    assert len(events) == 20_000 and len(catalog) == cfg.synth.num_items + 7 * 5
    period = (events["timestamp"] - events["timestamp"].min()) // (7 * 86400)
    new_items = set(catalog["item_id"][cfg.synth.num_items:])
    assert not events[period == 0]["item_id"].isin(new_items).any()  # new items appear later...
    assert events[period == 5]["item_id"].isin(new_items).any()       # ...and are used
    assert 0.2 < events["label"].mean() < 0.8
    # drift: the per-genre click rate of the same users moves between the first and last period
    assert not events.empty and set(events["event"]) == {"click", "impression"}


def test_corrupt_and_bad_shards_are_quarantined_rest_carries_on(store_cfg):
    cfg = load_config(None, SMALL_SYNTH)
    store = Store.from_config(store_cfg)
    generate_synth(cfg, store, progress=False)
    good = store.list("interactions")
    store.write_bytes("interactions/period=2030-01-07/part-00000.parquet", b"not parquet at all")
    bad = read_shard(store, good[0]).to_pandas()
    bad.loc[:4, "item_id"] = "no-such-item"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(bad, schema=INTERACTION_SCHEMA, preserve_index=False), buf)
    store.write_bytes("interactions/period=2030-01-14/part-00000.parquet", buf.getvalue())
    ledger = Ledger(store)
    reports = ledger.refresh()
    assert {r["shard"] for r in reports} == {"interactions/period=2030-01-07/part-00000.parquet",
                                             "interactions/period=2030-01-14/part-00000.parquet"}
    unknown = next(r for r in reports if r["shard"].endswith("01-14/part-00000.parquet"))
    assert unknown["problems"][0]["bad_rows"] == 5 and "no-such-item" in unknown["problems"][0]["reason"]
    assert [s.key for s in ledger.shards()] == good
    assert store.exists("quarantine/interactions/period=2030-01-07/part-00000.parquet.report.json")
    assert not store.exists("interactions/period=2030-01-07/part-00000.parquet")


def test_validation_names_the_problem():
    t = pa.table({"user_id": ["u"], "item_id": pa.array([None], pa.string()), "event": ["click"], "rating": [None], "label": [3],
                  "timestamp": [1], "context": [None]})
    reasons = " ".join(p.reason for p in validate_interactions(t, None))
    assert "item_id" in reasons and "nulls" in reasons
    assert any("0/1" in p.reason for p in validate_interactions(t.set_column(1, "item_id", pa.array(["i"])), None))


def test_exactly_once_commit_crash_and_race(store_cfg):
    cfg = load_config(None, SMALL_SYNTH)
    store = Store.from_config(store_cfg)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    assert [s.key for s in ledger.new_shards(set())] == keys
    # a round that "crashed" before its commit leaves its shards new
    assert len(ledger.new_shards({"v0001"})) == len(keys)
    ledger.commit(keys[:2], "v0001", {"v0001"})
    ledger.commit(keys[:2], "v0001", {"v0001"})  # a rerun of the same commit is a no-op
    assert [s.key for s in ledger.new_shards({"v0001"})] == keys[2:]
    with pytest.raises(ConflictError, match="already consumed"):
        ledger.commit(keys[1:3], "v0002", {"v0001", "v0002"})  # v0002 descends from v0001
    # another lineage (after a rollback past v0001) may learn them again
    assert [s.key for s in ledger.new_shards({"v0009"})] == keys
    wins, losses = [], []
    snapshot = ledger.etag()  # every racer planned its round from the same ledger state

    def racer(version):
        try:
            Ledger(Store.from_config(store_cfg)).commit(keys[2:3], version, {"v0001", version}, expected_etag=snapshot)
            wins.append(version)
        except ConflictError:
            losses.append(version)

    threads = [threading.Thread(target=racer, args=(f"v01{i:02d}",)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    consumed = next(s for s in ledger.shards() if s.key == keys[2]).consumed_by
    assert len(wins) == 1 and len(losses) == 5 and consumed == wins


def test_examples_have_no_future_leakage(tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path}", *SMALL_SYNTH, "data.replay_ratio=0.5"])
    store = Store.from_config(cfg.store)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    frame = ingest.examples_frame(cfg, store, [keys[2]], history_keys=keys[:2], replay_keys=keys[:2])
    target = read_shard(store, keys[2]).to_pandas()
    assert (~frame["is_replay"]).sum() == len(target)  # every new row became an example
    assert frame["is_replay"].sum() > 0
    events = pd.concat([read_shard(store, k).to_pandas() for k in keys[:3]])
    titles = ingest.load_catalog(store)["title"]
    for row in frame.sample(200, random_state=0).itertuples():
        past = events[(events.user_id == row.user_id) & (events.timestamp < row.timestamp)].sort_values("timestamp")
        expected = [titles[i] for i in past["item_id"].iloc[::-1][: cfg.data.history_len]]
        got = [] if row.history_text == "no history" else [h.split(" rated ")[0] for h in row.history_text.split(" ; ")]
        assert got == expected


def test_positive_only_data_gets_sampled_negatives(tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path}", *SMALL_SYNTH, "data.negatives_per_positive=2"])
    store = Store.from_config(cfg.store)
    generate_synth(cfg, store, progress=False)
    keys = store.list("interactions")
    clicks = read_shard(store, keys[1]).to_pandas()
    clicks = clicks[clicks.label == 1]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(clicks, schema=INTERACTION_SCHEMA, preserve_index=False), buf)
    store.write_bytes(keys[1], buf.getvalue())
    frame = ingest.examples_frame(cfg, store, [keys[1]], history_keys=keys[:1])
    assert (frame.label == 1).sum() == len(clicks) and (frame.label == 0).sum() == 2 * len(clicks)


def test_first_movielens_week_through_ray_data(ray_session, tmp_path):
    from llmrec_ray.model import model_source

    cfg = load_config(None, [f"store.uri={tmp_path}", "model.backbone=tiny", "model.max_seq_len=32"])
    store = Store.from_config(cfg.store)
    import_movielens(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    shards = ledger.shards()
    targets, older = [shards[2].key], [s.key for s in shards[:2]]
    want = ingest.examples_frame(cfg, store, targets, history_keys=older, replay_keys=older)
    for shuffle in ("hash", "sort"):  # both groupby shuffles build the same examples as the pure-pandas path
        shuffled = load_config(None, [f"store.uri={tmp_path}", f"data.shuffle={shuffle}"])
        ds = ingest.build_examples(shuffled, store, targets, history_keys=older, replay_keys=older)
        got = ds.to_pandas().sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
        assert len(got) == len(want) > shards[2].num_rows, shuffle  # new rows + replay
        for col in ("user_id", "item_id", "history_text", "candidate_text"):
            assert got[col].astype(str).tolist() == want[col].astype(str).tolist(), (shuffle, col)
        assert np.allclose(got["label"].to_numpy(), want["label"].to_numpy()), shuffle
    train, val = ingest.split_by_time(ingest.tokenize(ds, cfg, model_source(cfg.model)), 0.1)
    assert train.max("timestamp") < val.min("timestamp")
    batch = next(iter(train.iter_torch_batches(batch_size=8)))
    assert batch["input_ids"].shape == (8, 32) and batch["label"].dtype.is_floating_point
