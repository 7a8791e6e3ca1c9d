"""The incremental round: gate logic, and crash safety at every step (a failure, then a rerun, reaches the
same end state: no shard consumed twice or skipped, the pointer intact). Training is replaced by a fast
fake trainer here; tests/test_train.py and the Ray Jobs test run the real one."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmrec_ray import commands, judge, pipeline
from llmrec_ray.cli import main
from llmrec_ray.config import load_config
from llmrec_ray.datasets.synth import generate_synth
from llmrec_ray.ledger import Ledger
from llmrec_ray.model import build_model, save_export
from llmrec_ray.registry import Registry
from llmrec_ray.report import write_report
from llmrec_ray.store import Store
from llmrec_ray.train import TrainResult
from tests.conftest import make_store_cfg

SMALL = ["synth.num_users=40", "synth.num_items=30", "synth.num_events=1600", "synth.num_periods=4",
         "synth.new_items_per_period=3", "data.history_len=3", "data.first_round_shards=2", "data.shards_per_round=1",
         "model.backbone=tiny", "model.max_seq_len=32", "eval.max_rows=60", "eval.num_negatives=9"]


def fake_train(cfg, store, targets, older, replay, init_uri, run_name, catalog_version=None):
    model, tokenizer = build_model(cfg.model)
    scratch = Path(tempfile.mkdtemp(prefix="llmrec-fake-"))
    out = save_export(model, tokenizer, cfg, scratch / "model")
    return TrainResult(out, {"num_train_rows": 10, "train_seconds": 0.1, "best_val_loss": 0.69}, scratch)


def _store(kind, tmp_path, s3_server=None):
    cfg = load_config(None, SMALL)
    cfg.store = make_store_cfg(kind, tmp_path, s3_server)
    store = Store.from_config(cfg.store)
    generate_synth(cfg, store, progress=False)
    return cfg, store


def _end_state(store):
    ledger, registry = Ledger(store), Registry(store)
    lineage = registry.lineage_of_promoted()
    consumed = {s.key: sorted(set(s.consumed_by) & lineage) for s in ledger.shards()}
    return consumed, registry.promoted().value["history"]


def test_gate_rules():
    cfg = load_config(None, ["eval.gate_auc_tolerance=0.01", "eval.max_forgetting=0.02"])
    assert judge.gate(cfg, {"auc": 0.70, "logloss": 0.6}, {"auc": 0.705}, 0.0)[0]
    ok, why = judge.gate(cfg, {"auc": 0.68, "logloss": 0.6}, {"auc": 0.70}, 0.0)
    assert not ok and "tolerance" in why
    ok, why = judge.gate(cfg, {"auc": 0.72, "logloss": 0.6}, {"auc": 0.70}, 0.05)
    assert not ok and "forgetting" in why
    assert not judge.gate(cfg, {"auc": float("nan"), "logloss": 0.6}, None, None)[0]
    assert not judge.gate(cfg, {"auc": 0.45, "logloss": 0.7}, None, None)[0]


@pytest.mark.parametrize("fail_at", pipeline.FAIL_POINTS)
def test_crash_then_rerun_reaches_the_clean_end_state(fail_at, tmp_path, approve_all):
    cfg, clean = _store("file", tmp_path / "clean")
    first = pipeline.run_round(cfg, clean, train_fn=fake_train)
    assert first.promoted and first.round_shards == clean.list("interactions")[:2]
    second = pipeline.run_round(cfg, clean, train_fn=fake_train)
    assert second.promoted and second.parent == first.version
    assert list(second.stage_seconds) == list(pipeline.STEPS)
    assert sum(second.stage_seconds.values()) <= second.round_seconds + 1e-6
    cfg2, crashed = _store("file", tmp_path / "crashed")
    pipeline.run_round(cfg2, crashed, train_fn=fake_train)
    with pytest.raises(pipeline.InjectedFailure):
        pipeline.run_round(cfg2, crashed, fail_at=fail_at, train_fn=fake_train)
    rerun = pipeline.run_round(cfg2, crashed, train_fn=fake_train)
    if fail_at == "promote":  # the promotion had happened: the rerun only reconciles the ledger...
        assert rerun.round_shards == clean.list("interactions")[3:4]  # ...and moves on to the next shard
        pipeline.run_round(cfg, clean, train_fn=fake_train)
    consumed_clean, history_clean = _end_state(clean)
    consumed_crashed, history_crashed = _end_state(crashed)
    assert consumed_crashed == consumed_clean  # same shards consumed, each by exactly one lineage version
    assert all(len(v) <= 1 for v in consumed_crashed.values())
    assert len(history_crashed) == len(history_clean)


def test_round_on_s3_crash_after_promote_and_models_commands(tmp_path, s3_server, approve_all, capsys):
    cfg, store = _store("s3", tmp_path, s3_server)
    pipeline.run_round(cfg, store, train_fn=fake_train)
    with pytest.raises(pipeline.InjectedFailure):
        pipeline.run_round(cfg, store, fail_at="promote", train_fn=fake_train)
    ledger = Ledger(store)
    assert [s.consumed_by for s in ledger.shards()][2] == []  # promoted, ledger not yet committed
    report = pipeline.run_round(cfg, store, train_fn=fake_train)
    consumed = [s.consumed_by for s in ledger.shards()]
    assert consumed == [["v0001"], ["v0001"], ["v0002"], ["v0003"]] and report.version == "v0003"
    assert pipeline.run_round(cfg, store, train_fn=fake_train).reason == "no new shards"
    info = Registry(store).show("v0003")
    assert info["config"]["store"]["secret_access_key"] is None  # credentials never reach the registry
    assert cfg.store.secret_access_key not in store.read_bytes("registry/versions/v0003/model/llmrec_config.yaml").decode()
    assert info["parent"] == "v0002" and info["shards"] == [ledger.shards()[3].key] and info["gate"]["decision"] == "promote"
    store_args = ["--set", f"store.uri={cfg.store.uri}", "--set", f"store.endpoint_url={cfg.store.endpoint_url}",
                  "--set", f"store.access_key_id={cfg.store.access_key_id}",
                  "--set", f"store.secret_access_key={cfg.store.secret_access_key}"]
    assert main(["models", "rollback", *store_args]) == 0
    assert Registry(store).promoted_version() == "v0002"
    assert [s.key for s in ledger.new_shards(Registry(store).lineage_of_promoted())] == [ledger.shards()[3].key]
    assert main(["models", "list", *store_args]) == 0
    out = capsys.readouterr().out
    assert "* v0002" in out and "v0003" in out


def test_report_table_and_plot(tmp_path, approve_all):
    cfg, store = _store("file", tmp_path)
    reports = [pipeline.run_round(cfg, store, train_fn=fake_train) for _ in range(2)]
    assert "auc" in json.dumps(reports[1].metrics)
    paths = write_report(reports, tmp_path / "out")
    assert Path(paths["plot"]).stat().st_size > 1000
    md = Path(paths["markdown"]).read_text()
    assert md.count("\n") == 4 and "v0002" in md


def test_rejected_shards_are_learned_with_the_next_ones_not_retrained_alone(tmp_path, monkeypatch):
    decisions, trained = [], []

    def train(cfg, store, targets, *args, **kwargs):
        trained.append(list(targets))
        return fake_train(cfg, store, targets, *args, **kwargs)

    monkeypatch.setattr(judge, "gate", lambda cfg, cand, prev, forgetting: (decisions.pop(0), "test"))
    cfg, store = _store("file", tmp_path)
    s = store.list("interactions")
    decisions[:] = [True, False, False]
    assert pipeline.run_round(cfg, store, train_fn=train).promoted  # s0, s1
    assert pipeline.run_round(cfg, store, train_fn=train).decision == "reject"  # s2
    third = pipeline.run_round(cfg, store, train_fn=train)  # s2 again, together with s3
    assert third.decision == "reject" and third.round_shards == s[2:4]
    waiting = pipeline.run_round(cfg, store, train_fn=train)  # nothing newer: no identical retraining
    assert waiting.decision == "waiting" and "waiting for more data" in waiting.reason
    assert trained == [s[:2], s[2:3], s[2:4]]
    retry = load_config(None, SMALL + ["eval.gate_auc_tolerance=0.01"])  # a changed config may retry
    retry.store = cfg.store
    decisions[:] = [True]
    report = pipeline.run_round(retry, store, train_fn=train)
    assert report.promoted and report.round_shards == s[2:3]
    assert [sh.consumed_by for sh in Ledger(store).shards()][2] == [report.version]


# Another round, in another process: registers its own candidate of the same parent and shards, promotes it (CAS on
# the parent) and commits the ledger -- what a second `llmrec round` started at the same time does.
RIVAL_ROUND = """
import json, sys
from llmrec_ray.config import StoreConfig
from llmrec_ray.ledger import Ledger
from llmrec_ray.registry import Registry
from llmrec_ray.store import Store

uri, export_dir, parent, shards = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
store = Store.from_config(StoreConfig(uri=uri))
registry = Registry(store)
version = registry.create_version(export_dir, parent=parent, shards=shards, gate={"decision": "promote", "reason": "rival"})
registry.promote(version, expected_parent=parent)
Ledger(store).commit(shards, version, registry.lineage(version))
"""


def test_round_that_loses_the_promotion_race_commits_nothing(tmp_path, approve_all, monkeypatch, capsys):
    cfg, store = _store("file", tmp_path)
    parent = pipeline.run_round(cfg, store, train_fn=fake_train).version

    def train_while_another_round_promotes(cfg, store, targets, older, replay, init_uri, run_name, catalog_version=None):
        result = fake_train(cfg, store, targets, older, replay, init_uri, run_name)
        subprocess.run([sys.executable, "-c", RIVAL_ROUND, store.uri, str(result.export_dir), parent, json.dumps(targets)],
                       check=True, timeout=300)
        return result

    report = pipeline.run_round(cfg, store, train_fn=train_while_another_round_promotes)
    registry, ledger = Registry(store), Ledger(store)
    winner = registry.promoted_version()
    assert winner not in (parent, report.version) and registry.show(winner)["gate"]["reason"] == "rival"
    assert report.decision == pipeline.LOST_RACE and not report.promoted and winner in report.reason
    assert registry.show(report.version)["parent"] == parent  # registered, never promoted
    assert registry.promoted().value["history"] == [parent, winner]
    assert not [s.key for s in ledger.shards() if report.version in s.consumed_by]  # nothing committed by the loser
    assert [s.consumed_by for s in ledger.shards() if s.key in report.round_shards] == [[winner]]
    new = [s.key for s in ledger.new_shards(registry.lineage_of_promoted())]
    assert new and not set(new) & set(report.round_shards)  # the next round starts from the winner, after its shards

    # `llmrec round` (and jobs/round.py) reports the lost race in one line and exits non-zero
    monkeypatch.setattr(commands, "ensure_ray", lambda cfg, log_path=None: None)
    monkeypatch.setattr(pipeline, "run_round", lambda cfg, store, **kwargs: report)
    capsys.readouterr()
    assert main(["round", "--set", f"store.uri={store.uri}"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lost the promotion race" in err and winner in err


def test_registration_builds_the_versions_item_index(tmp_path):
    """A hybrid version is registered with its own item index (the retrieval stage of /v1/recommend): built after
    the name is claimed, so the index names its version, and uploaded with the model files."""
    from llmrec_ray.collab import CollabNet
    from llmrec_ray.ids import ItemVocab
    from llmrec_ray.item_index import index_builder, load_index
    from llmrec_ray.model import HybridScorer
    from llmrec_ray.catalog import load_catalog

    cfg, store = _store("file", tmp_path)
    catalog_ids = list(load_catalog(store, ["title"]).index)
    lm, tokenizer = build_model(cfg.model)
    known = catalog_ids[: len(catalog_ids) // 2]  # the other half: vectors from text
    model = HybridScorer(lm, CollabNet(len(known), cfg.model.collab.dim), ItemVocab(known))
    model.collab.item_logcount[1:] = 1.0  # as a fit leaves it: the known half had events
    export = save_export(model, tokenizer, cfg, tmp_path / "export")
    registry = Registry(store)
    name = registry.create_version(export, parent=None, shards=[], before_upload=index_builder(cfg, store))
    local = store.download_dir(f"registry/versions/{name}/model", tmp_path / "down")
    index = load_index(local, version=name, model=model)
    assert sorted(index.item_ids) == sorted(catalog_ids)
    assert index.from_text.sum() == len(catalog_ids) - len(known)


def test_round_removes_the_drivers_export_copy(tmp_path, approve_all):
    cfg, store = _store("file", tmp_path)
    made = []

    def train(*args, **kwargs):
        made.append(fake_train(*args, **kwargs))
        return made[-1]

    assert pipeline.run_round(cfg, store, train_fn=train).promoted
    assert made and made[0].scratch is not None and not made[0].scratch.exists()  # registered, then removed
