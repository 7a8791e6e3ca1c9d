"""The scorer without Ray: tiny BERT build, LoRA wrap + merged export, export round trip, refused exports."""

import json
import shutil

import numpy as np
import pytest
import torch

from llmrec_ray.config import load_config
from llmrec_ray.model import apply_lora, build_model, load_export, minilm_dir, save_export, score_texts

CANDS, HISTS = ["great movie", "awful movie", "a film"], ["item 1 rated 4", "", "item 2 rated 1 ; item 3 rated 5"]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(None, ["model.backbone=tiny", "model.max_seq_len=24", "model.dropout=0.0"])


def test_tiny_model_is_a_one_logit_bert_with_the_minilm_vocab(tiny_cfg):
    model, tokenizer = build_model(tiny_cfg.model)
    assert model.config.num_labels == 1 and model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == tokenizer.vocab_size == 30522
    probs = score_texts(model, tokenizer, CANDS, HISTS, tiny_cfg.model.max_seq_len, batch_size=2)
    assert probs.shape == (3,) and probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    assert score_texts(model, tokenizer, [], [], 24).shape == (0,)


def test_export_round_trip_gives_identical_scores(tiny_cfg, tmp_path):
    model, tokenizer = build_model(tiny_cfg.model)
    save_export(model, tokenizer, tiny_cfg, tmp_path / "m")
    assert {"config.json", "model.safetensors", "llmrec_config.yaml"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded, tok2, cfg2 = load_export(tmp_path / "m")
    assert cfg2.model.kind == "text" and not loaded.is_hybrid  # a bare transformers model is saved as the text part
    cfg2.model.kind = tiny_cfg.model.kind
    assert cfg2 == tiny_cfg
    a = score_texts(model, tokenizer, CANDS, HISTS, 24)
    b = score_texts(loaded, tok2, CANDS, HISTS, 24)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_lora_trains_adapters_and_head_only_and_exports_merged(tmp_path):
    cfg = load_config(None, ["model.backbone=tiny", "model.max_seq_len=24", "model.dropout=0.0",
                             "model.lora.enabled=true", "model.lora.r=4"])
    base, tokenizer = build_model(cfg.model)
    model = apply_lora(base, cfg.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)
    # one step so the adapters are non-zero, then the merged export must score like the adapted model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from llmrec_ray.text import tokenize_pairs

    enc = {k: torch.from_numpy(v) for k, v in tokenize_pairs(tokenizer, CANDS, HISTS, 24).items()}
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits.squeeze(-1), torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    opt.step()
    before = score_texts(model, tokenizer, CANDS, HISTS, 24)
    save_export(model, tokenizer, cfg, tmp_path / "lora")
    merged, tok2, _ = load_export(tmp_path / "lora")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    np.testing.assert_allclose(score_texts(merged, tok2, CANDS, HISTS, 24), before, atol=1e-5)


def test_bad_exports_are_refused_with_clear_errors(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_export(tmp_path / "nothing-here")
    model, tokenizer = build_model(tiny_cfg.model)
    good = save_export(model, tokenizer, tiny_cfg, tmp_path / "good")
    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_export(corrupt)
    two_labels = shutil.copytree(good, tmp_path / "two-labels")
    conf = json.loads((two_labels / "config.json").read_text())
    conf.pop("num_labels", None)
    conf["id2label"] = {"0": "a", "1": "b"}
    conf["label2id"] = {"a": 0, "b": 1}
    (two_labels / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError):
        load_export(two_labels)
    wrong_arch = shutil.copytree(good, tmp_path / "wrong-arch")
    conf = json.loads((wrong_arch / "config.json").read_text())
    conf["model_type"], conf["architectures"] = "not-a-model", ["NoSuchModel"]
    (wrong_arch / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_export(wrong_arch)


def test_unknown_backbone_is_a_clear_error():
    cfg = load_config(None, ["model.backbone=/no/such/dir"])
    with pytest.raises(ValueError, match="local Hugging Face"):
        build_model(cfg.model)


def test_minilm_wheel_is_found():
    from pathlib import Path

    assert (Path(minilm_dir()) / "config.json").is_file()


def test_tokenize_pairs_cuts_history_first_and_survives_an_overlong_candidate(tiny_cfg):
    from llmrec_ray.text import tokenize_pairs

    _, tokenizer = build_model(tiny_cfg.model)
    long_history = " ; ".join(f"Some Film {i} (1995) rated 4" for i in range(20))
    overlong = "an item whose description alone is far longer than the sequence budget " * 4
    enc = tokenize_pairs(tokenizer, ["great movie", overlong], [long_history, long_history], 24)
    assert all(v.shape == (2, 24) and v.dtype == np.int64 for v in enc.values())
    ids = enc["input_ids"]
    assert tokenizer.decode(ids[0][enc["token_type_ids"][0] == 0], skip_special_tokens=True) == "great movie"
    assert enc["attention_mask"].all()  # both rows fill the budget: history kept where it fits, no failure
    assert (enc["token_type_ids"][1] == 1).any()  # the overlong candidate was cut, leaving room for some history
    alone = tokenize_pairs(tokenizer, ["great movie"], [long_history], 24)  # the one-pass path
    assert all((alone[k][0] == enc[k][0]).all() for k in enc)
