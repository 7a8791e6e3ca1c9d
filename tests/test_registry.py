import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from llmrec_ray.config import config_from_dict
from llmrec_ray.registry import (PromotionConflict, Registry, RegistryError, claim_key, dir_sha256,
                                 model_prefix, version_key)
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
    assert ptr["model_prefix"] == model_prefix(v1) and ptr["history"] == [v1] and ptr["log"][-1]["from"] == v2
    assert [e["op"] for e in ptr["log"]] == ["promote", "promote", "rollback"]
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


# --- races between processes (issue 12: exactly one promotion, no mixed registrations) ---------------------------
# Each racer is a separate process with its own store client; a barrier releases them together. The processes fork
# from a forkserver that imported this module, torch and the model code once: cold interpreters take 1-6 s each here.

def _race(target, args_list, timeout_s: float = 180) -> list:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "boto3", "pyarrow.fs", "llmrec_ray.model", "transformers.modeling_utils",
                                "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                                "transformers.models.bert.modeling_bert"])  # the server imports these once, the racers none
    barrier, results = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_list]
    for proc in procs:
        proc.start()
    try:
        out = [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
    return out


def _register_racer(store_cfg, export_dir, writer, barrier, results):
    try:
        registry = Registry(Store.from_config(store_cfg))
        registry.versions(), registry.promoted()  # clients created (and S3 connected) before the race, not in it
        barrier.wait(timeout=120)
        results.put((writer, registry.create_version(export_dir, parent=None, shards=[f"s{writer}"], extra={"writer": writer})))
    except BaseException as exc:  # reported to the test, which fails naming it
        results.put((writer, f"error: {exc!r}"))


def _promote_racer(store_cfg, version, parent, barrier, results):
    try:
        registry = Registry(Store.from_config(store_cfg))
        registry.check_loadable(version)  # warm: model code imported and S3 connected before the race, not in it
        barrier.wait(timeout=120)
        registry.promote(version, expected_parent=parent)
        results.put((version, "promoted"))
    except PromotionConflict as exc:
        results.put((version, f"conflict: {exc}"))
    except BaseException as exc:
        results.put((version, f"error: {exc!r}"))


def _writer_export(root: Path, writer: int) -> dict[str, bytes]:
    """An export dir whose every file holds bytes only this writer has; odd writers have one more file."""
    files = {"config.json": json.dumps({"writer": writer}).encode(),
             "model.safetensors": f"writer {writer}|".encode() * 8000 + os.urandom(64),  # ~100 KB: uploads overlap
             "tokenizer/vocab.txt": f"token-of-writer-{writer}\n".encode() * 50}
    if writer % 2:
        files[f"hybrid/extra-{writer}.bin"] = os.urandom(512)
    for rel, data in files.items():
        (root / f"export-{writer}" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / f"export-{writer}" / rel).write_bytes(data)
    return files


def test_concurrent_registrations_never_mix_files(store_cfg, tmp_path):
    reg = Registry(Store.from_config(store_cfg))
    exports = {w: _writer_export(tmp_path, w) for w in range(16)}
    results = _race(_register_racer, [(store_cfg, str(tmp_path / f"export-{w}"), w) for w in exports])
    errors = [r for r in results if r[1].startswith("error")]
    assert not errors, errors
    names = {writer: name for writer, name in results}
    assert len(set(names.values())) == 16 and reg.versions() == sorted(names.values())
    for writer, name in names.items():
        prefix = model_prefix(name)
        stored = {k[len(prefix) + 1:]: reg.store.read_bytes(k) for k in reg.store.list(prefix)}
        assert stored == exports[writer], f"{name} (writer {writer}) holds files of another writer"
        assert reg.show(name)["writer"] == writer and reg.show(name)["shards"] == [f"s{writer}"]


def test_racing_promotions_from_one_parent_exactly_one_wins(store_cfg, tiny_export):
    reg = Registry(Store.from_config(store_cfg))
    v1 = reg.create_version(tiny_export, parent=None, shards=[])
    reg.promote(v1, expected_parent=None)
    a, b = (reg.create_version(tiny_export, parent=v1, shards=["s2"]) for _ in range(2))
    results = dict(_race(_promote_racer, [(store_cfg, a, v1), (store_cfg, b, v1)]))
    assert sorted(r.split(":")[0] for r in results.values()) == ["conflict", "promoted"], results
    winner = next(v for v, r in results.items() if r == "promoted")
    loser = ({a, b} - {winner}).pop()
    assert f"not promoting {loser}" in results[loser] and f"now {winner}" in results[loser] and v1 in results[loser]
    ptr = reg.promoted().value
    assert ptr["version"] == winner and ptr["history"] == [v1, winner]


def test_promote_expected_parent_is_a_compare_and_swap(reg, tiny_export, monkeypatch):
    v1 = reg.create_version(tiny_export, parent=None, shards=[])
    with pytest.raises(PromotionConflict, match="now none"):
        reg.promote(v1, expected_parent="v0042")
    reg.promote(v1, expected_parent=None)
    a, b = (reg.create_version(tiny_export, parent=v1, shards=[]) for _ in range(2))
    real_put = reg.store.put_json
    rival = Registry(Store.from_config(reg.store.cfg))

    def put_after(rival_version):  # another writer promotes between this promote's read and its write
        def put(key, value, etag):
            monkeypatch.setattr(reg.store, "put_json", real_put)
            rival.promote(rival_version)
            return real_put(key, value, etag)
        return put

    monkeypatch.setattr(reg.store, "put_json", put_after(v1))  # pointer rewritten, still the parent: retried
    reg.promote(a, expected_parent=v1)
    assert reg.promoted().value["history"] == [v1, v1, a]
    reg.rollback()  # back to v1
    monkeypatch.setattr(reg.store, "put_json", put_after(b))  # the pointer left the parent: conflict
    with pytest.raises(PromotionConflict) as err:
        reg.promote(a, expected_parent=v1)
    assert (err.value.version, err.value.expected_parent, err.value.promoted) == (a, v1, b)
    assert reg.promoted_version() == b
    reg.promote(a)  # the CLI path (no expected parent) promotes over whatever is there
    assert reg.promoted_version() == a


def test_claimed_but_incomplete_version_is_ignored_by_readers(reg, tiny_export):
    v1 = reg.create_version(tiny_export, parent=None, shards=[])
    # a writer that crashed mid-upload: its claim and part of its files, no version.json
    reg.store.put_json(claim_key("v0002"), {"version": "v0002"}, None)
    reg.store.write_bytes(f"{model_prefix('v0002')}/config.json", b"{}")
    assert reg.versions() == [v1] and [i["version"] for i in reg.list()] == [v1]
    with pytest.raises(RegistryError, match="claimed but not complete"):
        reg.show("v0002")
    with pytest.raises(RegistryError, match="claimed but not complete"):
        reg.promote("v0002")
    v3 = reg.create_version(tiny_export, parent=v1, shards=[])
    assert v3 == "v0003" and reg.lineage(v3) == {v1, v3}  # the abandoned name is never reused
    with pytest.raises(ConflictError):
        reg.create_version(tiny_export, parent=None, shards=[], version="v0002")
    reg.create_version(tiny_export, parent=None, shards=[])
    reg.create_version(tiny_export, parent=None, shards=[])
    assert reg.retain() == [v1, v3]  # keep_versions=2 of v1, v3, v4, v5 (none promoted); the claim untouched
    assert reg.store.list(model_prefix("v0002")) == [f"{model_prefix('v0002')}/config.json"]  # left alone
    assert not reg.store.exists(version_key("v0002"))


def test_model_cache_is_keyed_by_content(store_cfg, tmp_path):
    """A store recreated at the same URI (`make clean && make demo`) has another v0001: the round's promoted-model
    cache must load the new one, not serve the old store's files under the same name."""
    import shutil

    from llmrec_ray.pipeline import _cache_dir

    exports = []
    for i, weights in enumerate((b"old store's weights", b"new store's weights")):
        export = tmp_path / f"export{i}"
        export.mkdir()
        (export / "config.json").write_text("{}")
        (export / "model.safetensors").write_bytes(weights)
        exports.append(export)
    store = Store.from_config(store_cfg)
    cache = _cache_dir(store)  # the directory run_round uses: one per store URI
    try:
        assert Registry(store).create_version(exports[0], parent=None, shards=["s1"]) == "v0001"
        first = Registry(store).model_dir("v0001", cache)
        assert (first / "model.safetensors").read_bytes() == b"old store's weights"
        assert Registry(store).model_dir("v0001", cache) == first  # the same content is downloaded once

        for key in store.list():  # recreate the store at the same URI
            store.delete(key)
        if store.scheme == "file":
            shutil.rmtree(store.root)
        again = Store.from_config(store_cfg)
        assert again.uri == store.uri and _cache_dir(again) == cache
        assert Registry(again).create_version(exports[1], parent=None, shards=["s1"]) == "v0001"
        second = Registry(again).model_dir("v0001", cache)
        assert (second / "model.safetensors").read_bytes() == b"new store's weights"
        assert second != first and not first.exists()  # the old store's entry is gone, not kept beside it
        assert Registry(again).show("v0001")["model_sha256"] == dir_sha256(exports[1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_damaged_model_files_are_refused_by_their_checksum(store_cfg, tiny_export, tmp_path):
    """A version's files never change after registration. One changed in the store afterwards (here config.json with
    a key added: it still loads, so without the check it would be served) is refused wherever a version is
    downloaded (the round's promoted model, the promotion check, a Serve replica), naming the version and the fix."""
    import shutil

    from llmrec_ray.serve.inference import load_version

    store = Store.from_config(store_cfg)
    reg = Registry(store)
    v = reg.create_version(tiny_export, parent=None, shards=["s1"])
    cache = tmp_path / "cache"
    cache.mkdir()
    assert (reg.model_dir(v, cache) / "config.json").is_file()  # intact: downloaded and matching
    key = f"{model_prefix(v)}/config.json"
    edited = {**json.loads(store.read_bytes(key)), "edited_after_registration": True}
    store.write_bytes(key, json.dumps(edited).encode())
    shutil.rmtree(cache)
    cache.mkdir()
    with pytest.raises(RegistryError, match=rf"{v}: the model files under .* do not match the checksum .*models rollback"):
        reg.model_dir(v, cache)
    assert list(cache.iterdir()) == []  # nothing half-downloaded left as a cache entry
    store.write_bytes(key, (tiny_export / "config.json").read_bytes())  # the store copy restored
    entry = reg.model_dir(v, cache)
    (entry / "config.json").write_text("{}")  # damaged on this disk after the download: downloaded again on reuse
    assert reg.model_dir(v, cache) == entry and json.loads((entry / "config.json").read_text()) != {}
    store.write_bytes(key, json.dumps(edited).encode())
    with pytest.raises(RegistryError, match="do not match the checksum"):
        reg.check_loadable(v)  # so it cannot be promoted either
    with pytest.raises(RegistryError, match="do not match the checksum"):
        load_version(store, model_prefix(v), v, tmp_path / "serve", registry=reg)
    assert load_version(store, model_prefix(v), v, tmp_path / "unchecked").version == v  # what the check prevents
