"""Data plane: importers -> shards -> ledger (quarantine, exactly-once) -> examples, on file:// and real S3."""

import hashlib
import io
import re
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_ray import ingest, judge, pipeline
from llmrec_ray.config import load_config
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.datasets.synth import generate_events, generate_synth
from llmrec_ray.ledger import Ledger
from llmrec_ray.model import model_source
from llmrec_ray.schema import INTERACTION_SCHEMA, validate_interactions
from llmrec_ray.store import ConflictError, Store
from tests.test_pipeline import _store, fake_train

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
    first = store.read_table(shards[0].key)
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
    bad = store.read_table(good[0]).to_pandas()
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


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, schema=INTERACTION_SCHEMA, preserve_index=False), buf)
    return buf.getvalue()


def test_copies_are_not_learned_again_and_duplicate_rows_are_dropped(store_cfg):
    cfg = load_config(None, SMALL_SYNTH)
    store = Store.from_config(store_cfg)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    assert all(s.sha256 == hashlib.sha256(store.read_bytes(s.key)).hexdigest() for s in ledger.shards())
    ledger.commit(keys[:1], "v0001", {"v0001"})
    # byte-identical copies under new period names: of a consumed shard and of a registered, unconsumed one
    copy_of_consumed, copy_of_new = ("interactions/period=2099-01-05/part-00000.parquet",
                                     "interactions/period=2099-01-12/part-00000.parquet")
    store.write_bytes(copy_of_consumed, store.read_bytes(keys[0]))
    store.write_bytes(copy_of_new, store.read_bytes(keys[1]))
    # new events (a later week), every row twice
    events = store.read_table(keys[2]).to_pandas()
    events["timestamp"] += 100 * 7 * 86400
    doubled = "interactions/period=2099-01-19/part-00000.parquet"
    store.write_bytes(doubled, _parquet(pd.concat([events, events])))

    reports = {r["shard"]: r for r in ledger.refresh()}
    assert set(reports) == {copy_of_consumed, copy_of_new, doubled}
    assert reports[copy_of_consumed]["kind"] == "duplicate_content" and reports[copy_of_consumed]["duplicate_of"] == keys[0]
    assert "consumed by v0001" in reports[copy_of_consumed]["problems"][0]["reason"]
    assert reports[copy_of_new]["duplicate_of"] == keys[1]
    assert store.exists(f"quarantine/{copy_of_consumed}") and not store.exists(copy_of_consumed)  # kept, as received
    dedup = reports[doubled]
    assert dedup["kind"] == "duplicate_rows" and dedup["num_rows"] == 2 * len(events)
    assert dedup["duplicate_rows_dropped"] == dedup["problems"][0]["bad_rows"] == len(events)
    unique_key = dedup["registered_as"]
    assert [s.key for s in ledger.new_shards({"v0001"})] == keys[1:] + [unique_key]  # no copy is new
    unique = store.read_table(unique_key).to_pandas()
    assert len(unique) == len(events) and not unique.duplicated().any()
    frame = ingest.examples_frame(cfg, store, [unique_key], history_keys=keys)
    assert len(frame) == len(events)  # one training example per event, not two

    # the doubled shard as received, uploaded again under yet another name: recognised by its hash
    again = "interactions/period=2099-01-26/part-00000.parquet"
    store.write_bytes(again, store.read_bytes(f"quarantine/{doubled}"))
    assert [(r["shard"], r["duplicate_of"]) for r in ledger.refresh()] == [(again, unique_key)]
    assert ledger.refresh() == []  # nothing left to report


def test_registered_shard_turning_unreadable_changed_or_missing_is_reported(store_cfg):
    cfg = load_config(None, SMALL_SYNTH)
    store = Store.from_config(store_cfg)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    ledger.commit(keys[:1], "v0001", {"v0001"})
    missing_bytes = store.read_bytes(keys[3])
    store.write_bytes(keys[1], b"garbage, not Parquet")        # registered, not yet consumed
    store.write_bytes(keys[0], store.read_bytes(keys[2]))      # consumed, then overwritten with other events
    store.delete(keys[3])

    reports = {r["shard"]: r for r in ledger.refresh()}
    assert {k: r["kind"] for k, r in reports.items()} == {keys[0]: "changed", keys[1]: "unreadable", keys[3]: "missing"}
    assert "no longer readable Parquet" in reports[keys[1]]["problems"][0]["reason"]
    assert "consumed by v0001" in reports[keys[0]]["problems"][0]["reason"] and reports[keys[0]]["consumed_by"] == ["v0001"]
    assert store.exists(f"quarantine/{keys[1]}.report.json") and not store.exists(keys[1])
    assert [s.key for s in ledger.shards()] == [keys[2]]  # the rest carries on
    assert set(ledger.quarantined()) == {keys[0], keys[1], keys[3]}
    store.write_bytes(keys[3], missing_bytes)  # restored as it was: registered again, no report
    assert ledger.refresh() == [] and [s.key for s in ledger.shards()] == [keys[2], keys[3]]


def test_ledger_written_before_hashing_gets_hashes(tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path}", *SMALL_SYNTH])
    store = Store.from_config(cfg.store)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    got = store.read_json("ledger.json")
    old = {"shards": {k: {f: v[f] for f in ("period", "num_rows", "consumed_by")} for k, v in got.value["shards"].items()},
           "quarantined": {}}
    store.put_json("ledger.json", old, got.etag)
    assert all(s.sha256 is None for s in ledger.shards())
    assert ledger.refresh() == []
    assert all(s.sha256 == hashlib.sha256(store.read_bytes(s.key)).hexdigest() for s in ledger.shards())


def test_rounds_go_on_past_a_garbage_shard_and_skip_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(judge, "gate", lambda cfg, cand, prev, forgetting: (True, "test: approve"))
    cfg, store = _store("file", tmp_path)
    keys = store.list("interactions")
    first = pipeline.run_round(cfg, store, train_fn=fake_train)
    assert first.promoted and first.round_shards == keys[:2]
    store.write_bytes(keys[2], b"overwritten with garbage after it was registered")
    store.write_bytes("interactions/period=2099-01-05/part-00000.parquet", store.read_bytes(keys[0]))
    second = pipeline.run_round(cfg, store, train_fn=fake_train)
    assert second.promoted and second.round_shards == keys[3:4]
    quarantined = Ledger(store).quarantined()
    assert quarantined[keys[2]]["kind"] == "unreadable"
    assert quarantined["interactions/period=2099-01-05/part-00000.parquet"]["duplicate_of"] == keys[0]


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
    target = store.read_table(keys[2]).to_pandas()
    assert (~frame["is_replay"]).sum() == len(target)  # every new row became an example
    assert frame["is_replay"].sum() > 0
    events = pd.concat([store.read_table(k).to_pandas() for k in keys[:3]])
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
    clicks = store.read_table(keys[1]).to_pandas()
    clicks = clicks[clicks.label == 1]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(clicks, schema=INTERACTION_SCHEMA, preserve_index=False), buf)
    store.write_bytes(keys[1], buf.getvalue())
    frame = ingest.examples_frame(cfg, store, [keys[1]], history_keys=keys[:1])
    assert (frame.label == 1).sum() == len(clicks) and (frame.label == 0).sum() == 2 * len(clicks)


def test_first_movielens_week_through_ray_data(ray_session, tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path}", "model.backbone=tiny", "model.max_seq_len=32"])
    store = Store.from_config(cfg.store)
    import_movielens(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    shards = ledger.shards()
    targets, older = [shards[2].key], [s.key for s in shards[:2]]
    want = ingest.examples_frame(cfg, store, targets, history_keys=older, replay_keys=older)
    # both groupby shuffles build the same examples as the pure-pandas path, each run as configured: the plan has
    # the operator the setting names (sort first: a process-wide setting would have leaked into the hash run)
    for shuffle, operator in (("sort", "Sort"), ("hash", "Shuffle")):
        shuffled = load_config(None, [f"store.uri={tmp_path}", f"data.shuffle={shuffle}"])
        ds = ingest.build_examples(shuffled, store, targets, history_keys=older, replay_keys=older).materialize()
        ran = re.findall(r"^Operator \d+ ([^:]+):", ds.stats(), flags=re.M)
        assert [op.split("(")[0] for op in ran if op.startswith(("Sort", "Shuffle("))] == [operator], (shuffle, ran)
        got = ds.to_pandas().sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
        assert len(got) == len(want) > shards[2].num_rows, shuffle  # new rows + replay
        for col in ("user_id", "item_id", "history_text", "candidate_text"):
            assert got[col].astype(str).tolist() == want[col].astype(str).tolist(), (shuffle, col)
        assert np.allclose(got["label"].to_numpy(), want["label"].to_numpy()), shuffle
    train, val = ingest.split_by_time(ingest.tokenize(ds, cfg, model_source(cfg.model)), 0.1)
    assert train.max("timestamp") < val.min("timestamp")
    batch = next(iter(train.iter_torch_batches(batch_size=8)))
    assert batch["input_ids"].shape == (8, 32) and batch["label"].dtype.is_floating_point


def test_shards_are_read_through_ray_data_from_either_store(ray_session, store_cfg):
    store = Store.from_config(store_cfg)
    _, events = generate_events(load_config(None, ["synth.num_events=600"]))
    events = events[INTERACTION_SCHEMA.names]
    keys = []
    for i, part in enumerate(events.iloc[j:j + 200] for j in (0, 200, 400)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(part, schema=INTERACTION_SCHEMA, preserve_index=False), buf)
        keys.append(f"interactions/part-{i}.parquet")
        store.write_bytes(keys[-1], buf.getvalue())
    ds = ingest.read_shards(store, keys, num_blocks=2)
    assert ds.materialize().num_blocks() == 2  # not a block per file: Ray Data's tasks cost ~0.5 s each here
    got = ds.to_pandas()
    assert len(got) == len(events)
    # build_examples tells the shards apart by this column: the path the store gives each key
    assert sorted(got["path"].unique()) == sorted(store.fs_path(k) for k in keys)
