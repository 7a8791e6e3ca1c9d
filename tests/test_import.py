"""Your own data: `llmrec data import table` (mappings, timestamp forms, labels, bad rows, idempotent re-import, S3
sources), the catalogue as a stream of upserts, and shards held until a catalogue update covers their items."""

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_ray import pipeline
from llmrec_ray.catalog import catalog_version, load_catalog, update_keys, write_catalog
from llmrec_ray.cli import main
from llmrec_ray.config import load_config
from llmrec_ray.datasets.mapping import parse_timestamps
from llmrec_ray.datasets.table import import_table
from llmrec_ray.ledger import Ledger
from llmrec_ray.registry import Registry
from llmrec_ray.store import Store
from tests.test_pipeline import fake_train

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z, a Monday
CATALOG = pd.DataFrame({"sku": ["A1", "B2", "C3"], "name": ["Red Running Shoes", "Blue Denim Jacket", "Green Tea"],
                        "category": ["Shoes;Sport", "Clothing", "Food;Drinks"]})
SHOP_MAP = ["columns.user_id=customer", "columns.item_id=sku", "columns.timestamp=event_time", "columns.event=type",
            "catalog_columns.item_id=sku", "catalog_columns.title=name", "catalog_columns.genres=category"]


def _events(n_weeks: int = 3, per_week: int = 6) -> pd.DataFrame:
    rows = []
    for w in range(n_weeks):
        for k in range(per_week):
            rows.append({"customer": f"u{k % 3}", "sku": "ABC"[k % 3] + "123"[k % 3],
                         "event_time": T0 + w * 7 * 86400 + k * 3600, "type": "purchase" if k % 2 else "impression"})
    return pd.DataFrame(rows)


def _cfg(tmp_path, store_uri=None, table: list[str] = (), extra: list[str] = ()):
    overrides = [f"store.uri={store_uri or tmp_path / 'store'}", "table.positive_events=[purchase]",
                 "table.negative_events=[impression]", "table.genres_separator=';'", *extra]
    cfg = load_config(None, overrides)
    raw = cfg.to_dict()
    for item in [*SHOP_MAP, *table]:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if name:
            raw["table"][section][name] = value
        else:
            raw["table"][section] = json.loads(value)
    from llmrec_ray.config import config_from_dict
    return config_from_dict(raw)


def _write(df: pd.DataFrame, path, fmt: str) -> str:
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return str(path)


def _stored_rows(store: Store) -> pd.DataFrame:
    keys = store.list("interactions", suffix=".parquet")
    return pd.concat([store.read_table(k).to_pandas() for k in keys], ignore_index=True).sort_values(
        ["timestamp", "user_id", "item_id"]).reset_index(drop=True)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_import_each_format_with_a_column_mapping(tmp_path, fmt):
    events = _events()
    ev = _write(events, tmp_path / f"events.{fmt}", fmt)
    cat = _write(CATALOG, tmp_path / f"items.{fmt}", fmt)
    cfg = _cfg(tmp_path, table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    report = import_table(cfg, Store.from_config(cfg.store), progress=False)
    store = Store.from_config(cfg.store)
    assert report.rows_read == len(events) and report.rows_written == len(events) and not report.bad.total
    assert len(report.shards_written) == 3  # one per week
    rows = _stored_rows(store)
    assert sorted(rows["user_id"].unique()) == ["u0", "u1", "u2"]
    assert (rows["label"] == (rows["event"] == "purchase")).all() and rows["timestamp"].min() == T0
    catalog = load_catalog(store)
    assert catalog.loc["A1", "title"] == "Red Running Shoes" and catalog.loc["A1", "genres"] == "Shoes|Sport"
    assert Ledger(store).refresh() == [] and len(Ledger(store).shards()) == 3


def test_every_timestamp_form_gives_the_same_seconds():
    iso = ["2024-01-02T10:00:00Z", "2024-01-02T11:00:00+01:00", "2024-01-02T10:00:00", "2024-01-02 10:00:00"]
    want = T0 + 86400 + 36000
    for unit, values in [("auto", iso), ("iso", iso), ("auto", [want, want * 1000, want * 1_000_000]),
                         ("s", [want]), ("ms", [want * 1000]), ("us", [want * 1_000_000]),
                         ("auto", [str(want), str(want * 1000)]), ("auto", [want + 0.4])]:
        secs, bad = parse_timestamps(pd.Series(values), unit)
        assert not bad.any() and (secs == want).all(), (unit, values, secs)
    secs, bad = parse_timestamps(pd.to_datetime(pd.Series(["2024-01-02T10:00:00"])), "auto")  # a datetime column
    assert secs[0] == want and not bad.any()
    secs, bad = parse_timestamps(pd.Series(["yesterday", None, str(want * 1000)]), "s")  # ms read as s: year 55000
    assert bad.all()


def test_labels_from_rating_label_column_or_positive_only(tmp_path):
    df = pd.DataFrame({"u": ["a", "a", "b", "b"], "i": ["A1", "B2", "A1", "C3"], "t": [T0, T0 + 1, T0 + 2, T0 + 3],
                       "stars": [5, 2, 4, 3.5], "liked": ["true", "no", "1", "0"]})
    path = _write(df, tmp_path / "r.csv", "csv")
    cat = _write(CATALOG, tmp_path / "items.csv", "csv")
    base = [f'interactions=["{path}"]', f'catalog=["{cat}"]', "columns.user_id=u", "columns.item_id=i",
            "columns.timestamp=t"]
    for i, (extra, want, event) in enumerate([(["columns.rating=stars"], [1, 0, 1, 0], "rating"),
                                              (["columns.label=liked"], [1, 0, 1, 0], "interaction"),
                                              ([], [1, 1, 1, 1], "interaction")]):
        cfg = _cfg(tmp_path, store_uri=tmp_path / f"s{i}", table=base + extra)
        cfg.table.columns.pop("event")
        import_table(cfg, Store.from_config(cfg.store), progress=False)
        rows = _stored_rows(Store.from_config(cfg.store))
        assert rows["label"].tolist() == want and set(rows["event"]) == {event}


def test_bad_rows_are_counted_by_reason_with_examples_and_bad_files_name_the_fix(tmp_path):
    events = _events(1)
    bad = pd.DataFrame([{"customer": "u9", "sku": "", "event_time": T0, "type": "purchase"},
                        {"customer": "u9", "sku": "A1", "event_time": "yesterday", "type": "purchase"},
                        {"customer": "u9", "sku": "A1", "event_time": T0 + 5, "type": "wishlist"},
                        {"customer": None, "sku": "A1", "event_time": T0 + 6, "type": "purchase"}])
    ev = _write(pd.concat([events, bad, events.head(2)]), tmp_path / "e.csv", "csv")
    cat = _write(CATALOG, tmp_path / "items.csv", "csv")
    cfg = _cfg(tmp_path, table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    report = import_table(cfg, Store.from_config(cfg.store), progress=False)
    reasons = report.bad.reasons
    assert reasons["sku: empty"]["rows"] == 1 and reasons["customer: empty"]["rows"] == 1
    assert reasons["type: in neither table.positive_events nor table.negative_events"]["examples"] == ["wishlist"]
    assert any(k.startswith("event_time: not a time") and v["examples"] == ["yesterday"] for k, v in reasons.items())
    assert report.duplicate_rows == 2 and report.rows_written == len(events) and report.bad.total == 4

    wrong = _cfg(tmp_path, store_uri=tmp_path / "s2", table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]',
                                                             "columns.user_id=client"])
    with pytest.raises(ValueError, match=r"column 'client' \(for user_id\) is not in the file.*--map user_id="):
        import_table(wrong, Store.from_config(wrong.store), progress=False)
    assert not Store.from_config(wrong.store).list("interactions")  # nothing written
    as_iso = _cfg(tmp_path, store_uri=tmp_path / "s3", table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    as_iso.table.timestamp_unit = "iso"  # epoch numbers read as ISO strings: every row unusable -> one clear error
    with pytest.raises(ValueError, match="none of the first .* rows is usable.*event_time"):
        import_table(as_iso, Store.from_config(as_iso.store), progress=False)
    assert main(["data", "import", "table", "--store", str(tmp_path / "s4"), "--interactions", ev,
                 "--catalog", cat, "--map", "user_id"]) == 2  # one line naming the option


def test_reimport_is_idempotent_chunked_and_overlapping_exports_add_only_new_rows(store_cfg, tmp_path):
    store = Store.from_config(store_cfg)
    events = _events(3)
    if store.scheme == "s3":  # the source files live in S3 as well
        store.write_bytes("in/events.csv", events.to_csv(index=False).encode())
        store.write_bytes("in/items.csv", CATALOG.to_csv(index=False).encode())
        ev, cat = store.key_uri("in/events*.csv"), store.key_uri("in/items.csv")  # a glob, and a file
    else:
        ev, cat = _write(events, tmp_path / "events.csv", "csv"), _write(CATALOG, tmp_path / "items.csv", "csv")
    cfg = _cfg(tmp_path, table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]', "chunk_rows=4"])
    cfg.store = store_cfg
    first = import_table(cfg, store, progress=False)
    assert first.rows_written == len(events) and len(first.shards_written) == 3
    shards = store.list("interactions", suffix=".parquet")
    again = import_table(cfg, store, progress=False)
    assert again.rows_written == 0 and again.shards_written == [] and again.rows_already_stored == len(events)
    assert again.catalog.key is None and store.list("interactions", suffix=".parquet") == shards
    # one chunk or many: the same shards, byte for byte (content-addressed names)
    one = _cfg(tmp_path, store_uri=tmp_path / "one", table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    one.store = store_cfg.model_copy(update={"uri": store_cfg.uri + "-one"})
    import_table(one, Store.from_config(one.store), progress=False)
    assert [k.rsplit("/", 1)[1] for k in Store.from_config(one.store).list("interactions")] == \
        [k.rsplit("/", 1)[1] for k in shards]
    # an export overlapping the last week: only its new rows are written, in a new shard of that week
    later = pd.concat([events.tail(6), pd.DataFrame([{"customer": "u7", "sku": "B2", "event_time": T0 + 14 * 86400 + 99,
                                                       "type": "purchase"}])])
    path = tmp_path / "later.csv"
    later.to_csv(path, index=False)
    cfg.table.interactions, cfg.table.catalog = [str(path)], []
    third = import_table(cfg, store, progress=False)
    assert third.rows_written == 1 and third.rows_already_stored == 6 and len(third.shards_written) == 1
    ledger = Ledger(store)
    assert ledger.refresh() == [] and sum(s.num_rows for s in ledger.shards()) == len(events) + 1


def test_catalogue_updates_are_versioned_upserts(tmp_path):
    store = Store.from_config(load_config(None, [f"store.uri={tmp_path / 'store'}"]).store)
    base = pd.DataFrame({"item_id": ["A1", "B2"], "title": ["Shoes", "Jacket"], "genres": ["Sport", "Clothing"]})
    assert write_catalog(store, base).key == "catalog/items.parquet" and catalog_version(store) == "base"
    assert write_catalog(store, base).key is None  # unchanged: nothing written
    up = write_catalog(store, pd.DataFrame({"item_id": ["B2", "C3"], "title": ["Denim Jacket", "Tea"]}), ["title"])
    assert (up.added, up.changed, up.unchanged) == (1, 1, 0) and update_keys(store) == [up.key]
    now = load_catalog(store)
    assert now.loc["B2", "title"] == "Denim Jacket" and now.loc["B2", "genres"] == "Clothing"  # genres kept
    assert set(load_catalog(store, version="base").index) == {"A1", "B2"}  # the catalogue as it was
    assert load_catalog(store, version=up.key).loc["C3", "title"] == "Tea"
    with pytest.raises(ValueError, match="catalogue version .* is not in"):
        load_catalog(store, version="catalog/updates/0000000000000-0.parquet")


def test_held_shard_waits_for_a_catalogue_update_then_rounds_go_on(tmp_path, approve_all):
    events = _events(3)
    events.loc[events.index[-1], "sku"] = "N9"  # week 3 names an item the catalogue lacks yet
    cfg = _cfg(tmp_path, table=[f'interactions=["{_write(events, tmp_path / "e.csv", "csv")}"]',
                                f'catalog=["{_write(CATALOG, tmp_path / "c.csv", "csv")}"]'],
               extra=["data.first_round_shards=1", "data.history_len=2", "eval.num_negatives=2", "model.backbone=tiny",
                      "model.max_seq_len=32"])
    store = Store.from_config(cfg.store)
    report = import_table(cfg, store, progress=False)
    assert report.unknown_item_rows == 1
    ledger = Ledger(store, cfg.data.hold_unknown_items_s)
    [held] = ledger.refresh()
    assert held["kind"] == "held" and held["examples"] == ["N9"] and not store.list("quarantine")
    assert [s.period for s in ledger.new_shards(set())] == ["2024-01-01", "2024-01-08"]  # before the held week
    first = pipeline.run_round(cfg, store, train_fn=fake_train)  # learns week 1, judged on week 2
    assert first.promoted
    second = pipeline.run_round(cfg, store, train_fn=fake_train)  # week 2 has no next period yet: the held one
    waiting = pipeline.run_round(cfg, store, train_fn=fake_train)
    assert second.promoted and waiting.decision == "waiting" and "N9" in waiting.reason
    write_catalog(store, pd.DataFrame({"item_id": ["N9"], "title": ["Night Lamp"]}))  # the update lands
    assert ledger.refresh() == [] and not ledger.held()
    third = pipeline.run_round(cfg, store, train_fn=fake_train)
    assert third.promoted and third.catalog_version == catalog_version(store)
    assert Registry(store).show(third.version)["catalog_version"] == catalog_version(store)


def test_held_shard_is_quarantined_after_the_limit(tmp_path):
    cfg = load_config(None, [f"store.uri={tmp_path / 'store'}"])
    store = Store.from_config(cfg.store)
    write_catalog(store, pd.DataFrame({"item_id": ["A1"], "title": ["Shoes"]}))
    key = "interactions/period=2024-01-01/part-x.parquet"
    table = pa.table({"user_id": ["u"], "item_id": ["Z9"], "event": ["click"], "rating": pa.array([None], pa.float32()),
                      "label": pa.array([1], pa.int8()), "timestamp": [T0], "context": pa.array([None], pa.string())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    store.write_bytes(key, buf.getvalue().to_pybytes())
    assert Ledger(store, 3600).refresh()[0]["kind"] == "held"
    [report] = Ledger(store, 0).refresh()  # the limit has passed
    assert report["kind"] == "invalid" and "data.hold_unknown_items_s" in report["problems"][0]["reason"]
    assert store.exists(f"quarantine/{key}") and not Ledger(store).held()


def test_the_readme_worked_example(tmp_path, capsys, monkeypatch):
    """README 'Use your own data': the shop example, by options and by its config file, then its catalogue update."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # table.yaml names the files relative to the repo root
    shop = "jobs/examples/shop"
    by_options = ["data", "import", "table", "--store", str(tmp_path / "a"), "--interactions", f"{shop}/events.csv",
                  "--catalog", f"{shop}/items.csv", "--map", "user_id=customer", "--map", "item_id=sku",
                  "--map", "timestamp=event_time", "--map", "event=type", "--positive-events", "purchase",
                  "--negative-events", "impression", "--catalog-map", "item_id=sku", "--catalog-map", "title=name",
                  "--catalog-map", "genres=category", "--catalog-map", "description=blurb", "--genres-separator", ";"]
    assert main(by_options) == 0
    out = capsys.readouterr().out
    assert "16 rows read, 13 written in 2 new shards" in out and "rows left out: 3" in out
    assert main(["data", "import", "table", "--store", str(tmp_path / "b"), "--config", f"{shop}/table.yaml"]) == 0
    a, b = (Store.from_config(load_config(None, [f"store.uri={tmp_path / n}"]).store) for n in "ab")
    assert a.list("interactions") == b.list("interactions") and len(a.list("interactions")) == 2
    assert list(Ledger(a).refresh()[0]["examples"]) == ["K900"]  # held
    assert main(["data", "import", "table", "--store", str(tmp_path / "a"), "--catalog", f"{shop}/items-update.csv",
                 *by_options[by_options.index("--catalog-map"):]]) == 0
    assert Ledger(a).refresh() == [] and len(Ledger(a).shards()) == 2 and not Ledger(a).held()
    assert load_catalog(a).loc["K900", "title"] == "Camping Kettle 1L"


def test_a_time_window_a_user_sample_and_dropping_unknown_items(tmp_path):
    events = _events(3)
    events.loc[events.index[6], "sku"] = "Z9"  # week 2 names an item not in the catalogue
    ev, cat = _write(events, tmp_path / "e.csv", "csv"), _write(CATALOG, tmp_path / "c.csv", "csv")
    cfg = _cfg(tmp_path, table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    cfg.table.since, cfg.table.until = "2024-01-08", str(T0 + 14 * 86400)  # ISO and epoch: the second week only
    cfg.table.unknown_items = "drop"
    report = import_table(cfg, Store.from_config(cfg.store), progress=False)
    assert report.rows_written == 5 and report.rows_outside_slice == 12 and len(report.shards_written) == 1
    assert report.bad.reasons["sku: not in the catalogue (table.unknown_items=drop)"]["examples"] == ["Z9"]
    cfg.table.since, cfg.table.until, cfg.table.unknown_items = None, None, "hold"
    many = pd.DataFrame({"customer": [f"c{k}" for k in range(40)], "sku": "A1", "event_time": T0, "type": "purchase"})
    ev = _write(many, tmp_path / "many.csv", "csv")
    sampled = _cfg(tmp_path, store_uri=tmp_path / "s2", table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    sampled.table.sample_users = 0.5
    import_table(sampled, Store.from_config(sampled.store), progress=False)
    again = _cfg(tmp_path, store_uri=tmp_path / "s3", table=[f'interactions=["{ev}"]', f'catalog=["{cat}"]'])
    again.table.sample_users = 0.5
    import_table(again, Store.from_config(again.store), progress=False)
    users = [set(_stored_rows(Store.from_config(c.store))["user_id"]) for c in (sampled, again)]
    assert users[0] == users[1] and 10 < len(users[0]) < 30  # the same users every run, about half of them
    cfg.table.since = "the day before"
    with pytest.raises(ValueError, match="table.since='the day before' is not a time"):
        import_table(cfg, Store.from_config(cfg.store), progress=False)
