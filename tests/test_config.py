import pytest

from llmrec_ray.config import Config, load_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.train.num_workers == 2 and cfg.model.max_seq_len == 128


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  num_workers: 3\nstore:\n  uri: s3://b/p\n")
    cfg = load_config(path, ["train.lr_first=1e-4", "model.lora.enabled=true"])
    assert cfg.train.num_workers == 3 and cfg.store.uri == "s3://b/p"
    assert cfg.train.lr_first == 1e-4 and cfg.model.lora.enabled is True


@pytest.mark.parametrize("override, words", [
    (["train.lrr=1"], ["train.lrr", "lr_first"]),
    (["nosuch.x=1"], ["nosuch", "valid keys"]),
    (["train.num_workers=zero"], ["train.num_workers", "zero"]),
    (["train.num_workers"], ["section.key=value"]),
    (["train.bf16=true"], ["use_gpu"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ValueError) as exc:
        load_config(None, override)
    for w in words:
        assert w in str(exc.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  prot: 80\n")
    with pytest.raises(ValueError, match="serve.prot: unknown key"):
        load_config(path)


def test_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["data.history_len=5"])
    path = tmp_path / "r.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert isinstance(cfg, Config)


def test_relative_local_store_is_made_absolute(tmp_path, monkeypatch):
    """Ray workers run in another cwd: a relative store path must not resolve there (make demo broke on it)."""
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["store.uri=rel-store"]).store.uri == f"file://{tmp_path}/rel-store"
