import threading

import pytest

from llmrec_ray.config import Config, config_from_dict
from llmrec_ray.registry import PROMOTED_KEY, Registry, RegistryError, model_prefix
from llmrec_ray.store import ConflictError, Store


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from llmrec_ray.model import build_model, save_export

    cfg = config_from_dict({"model": {"backbone": "tiny", "max_seq_len": 32}})
    model, tok = build_model(cfg.model)
    return save_export(model, tok, cfg, tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture
def reg(store_cfg):
    return Registry(Store.from_config(store_cfg), keep_versions=2)


def test_create_promote_rollback(reg, tiny_export):
    assert reg.promoted() is None and reg.lineage_of_promoted() == set()
    v1 = reg.create_version(tiny_export, parent=None, shards=["s1"], metrics={"candidate_auc": 0.6})
    v2 = reg.create_version(tiny_export, parent=v1, shards=["s2"], metrics={"candidate_auc": 0.7})
    assert (v1, v2) == ("v0001", "v0002")
    assert reg.trained_shards(v2) == {"s1", "s2"} and reg.trained_shards(v1) == {"s1"} and reg.trained_shards(None) == set()
    info = reg.show(v2)
    assert info["parent"] == v1 and info["shards"] == ["s2"] and "created_at" in info and "git_commit" in info
    reg.promote(v1)
    reg.promote(v2)
    assert reg.promoted_version() == v2 and reg.lineage_of_promoted() == {v1, v2}
    assert reg.promoted_model_uri().endswith(model_prefix(v2))
    assert reg.rollback() == v1
    ptr = reg.promoted().value
    assert ptr["version"] == v1 and ptr["log"][-1]["op"] == "rollback"
    assert reg.show(v2)["version"] == v2  # nothing deleted
    with pytest.raises(RegistryError):
        reg.rollback()
    assert [i["version"] for i in reg.list()] == [v1, v2]


def test_promote_race_one_winner(reg, tiny_export):
    v1 = reg.create_version(tiny_export, parent=None, shards=[])
    reg.promote(v1)
    a = reg.create_version(tiny_export, parent=v1, shards=[])
    b = reg.create_version(tiny_export, parent=v1, shards=[])
    etag = reg.promoted().etag
    results = {}

    def go(v):
        try:
            reg.promote(v, expected_etag=etag)
            results[v] = "ok"
        except ConflictError:
            results[v] = "conflict"

    threads = [threading.Thread(target=go, args=(v,)) for v in (a, b)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results.values()) == ["conflict", "ok"]
    winner = [v for v, r in results.items() if r == "ok"][0]
    assert reg.promoted_version() == winner


def test_refuses_unloadable_and_nan(reg, tiny_export, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    bad = reg.create_version(broken, parent=None, shards=[])
    with pytest.raises(RegistryError, match="cannot be loaded|refusing"):
        reg.promote(bad)
    nan = reg.create_version(tiny_export, parent=None, shards=[], metrics={"candidate_auc": float("nan")})
    with pytest.raises(RegistryError, match="NaN"):
        reg.promote(nan)
    assert reg.promoted() is None


def test_retention(reg, tiny_export):
    v1 = reg.create_version(tiny_export, parent=None, shards=[])
    reg.promote(v1)
    others = [reg.create_version(tiny_export, parent=None, shards=[]) for _ in range(4)]  # v2..v5, not lineage
    pruned = reg.retain()
    assert pruned == others[:2]
    for v in pruned:
        assert not reg.store.list(model_prefix(v)) and reg.show(v)["version"] == v
    assert reg.store.list(model_prefix(v1)) and reg.store.list(model_prefix(others[-1]))
