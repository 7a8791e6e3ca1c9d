"""Probe: does text help the collaborative part when fed as frozen MiniLM item vectors (the issue-11 idea)?

    .venv/bin/python benchmarks/text_feature_probe.py [none|sims|proj] [--weeks 1] [--work out/quality]

Same data, split and fitting as benchmarks/collab_ablation.py (the quality protocol's `collab` arm, tables from
scratch before each test week, every row of the week scored). Every catalogue item's text ("title | genres") is
encoded once by the pretrained all-MiniLM-L6-v2 (mean-pooled, L2-normalised). Variants on top of CollabNet:
  none   the collaborative part as shipped
  sims   + a learned weight on 4 text features: cos(candidate, mean liked history text), cos(candidate, mean
         disliked history text), the rating-weighted mean similarity to the history, max similarity to a liked item
  proj   sims + a learned projection of the text vectors into the candidate / user inner product
Prints the AUC per week and pooled. A measured negative result kept so it can be rerun: README, Quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from collab_ablation import probe_weeks  # scripts beside it
from quality_ml100k import OVERRIDES, prepare
from llmrec_ray.collab import CollabNet, _masked_mean
from llmrec_ray.config import load_config
from llmrec_ray.ids import ItemVocab
from llmrec_ray.model import minilm_dir
from llmrec_ray.catalog import load_catalog
from llmrec_ray.store import Store
from llmrec_ray.text import item_texts


def text_vectors(texts: list[str]) -> np.ndarray:
    tok, enc = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 128):
            b = tok(texts[i:i + 128], padding=True, truncation=True, max_length=32, return_tensors="pt")
            mask = b["attention_mask"].unsqueeze(-1).float()
            out.append(nn.functional.normalize((enc(**b).last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1).numpy())
    return np.concatenate(out)


class TextCollab(CollabNet):
    def __init__(self, num_items: int, dim: int, text: torch.Tensor, mode: str, neighbours: int):
        super().__init__(num_items, dim, neighbours=neighbours)
        self.mode = mode
        self.register_buffer("text", text)
        self.text_features = nn.Linear(4, 1)
        nn.init.zeros_(self.text_features.weight)
        nn.init.zeros_(self.text_features.bias)
        if mode == "proj":
            self.item_proj = nn.Linear(text.shape[1], dim, bias=False)
            self.user_proj = nn.Linear(text.shape[1], dim, bias=False)
            nn.init.normal_(self.item_proj.weight, std=0.01)
            nn.init.normal_(self.user_proj.weight, std=0.01)

    def forward(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        out = super().forward(cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        if self.mode == "none":
            return out
        cand, hist = self.text[cand_rows], self.text[hist_rows]
        known = (hist_rows != 0).float()
        liked, disliked = hist_liked * known, (1 - hist_liked) * hist_present * known
        liked_mean, disliked_mean = _masked_mean(hist, liked), _masked_mean(hist, disliked)
        sims = (hist * cand.unsqueeze(1)).sum(-1)
        rated = hist_rated * known
        f = torch.stack([(cand * liked_mean).sum(-1), (cand * disliked_mean).sum(-1),
                         (sims * hist_rating * rated).sum(-1) / (rated.sum(-1) + 1),
                         sims.masked_fill(liked == 0, -1).max(-1).values.clamp(min=0)], -1)
        out = out + self.text_features(f).squeeze(-1)
        if self.mode == "proj":
            out = out + ((self.user_proj(liked_mean) - self.user_proj(disliked_mean)) * self.item_proj(cand)).sum(-1)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="sims", choices=["none", "sims", "proj"])
    p.add_argument("--weeks", type=int, default=1)
    p.add_argument("--work", default="out/quality")
    args = p.parse_args()
    work = Path(args.work)
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}"])
    store = Store.from_config(cfg.store)
    keys, events, examples = prepare(cfg, store, work)
    texts = item_texts(load_catalog(store, ["title", "genres", "description"]))
    ids = sorted(texts)
    vectors = dict(zip(ids, text_vectors([texts[i][0] for i in ids])))

    def build(train):
        vocab = ItemVocab(sorted(set(map(str, train["item_id"]))))
        vocab.add(i for i in ids if i not in vocab.index)  # rows for every catalogue item: text for all, tables for seen ones
        text = torch.zeros(len(vocab) + 1, len(next(iter(vectors.values()))))
        for i, row in vocab.index.items():
            text[row] = torch.from_numpy(vectors[i])
        return TextCollab(len(vocab), cfg.model.collab.dim, text, args.mode, cfg.model.collab.neighbours), vocab

    probe_weeks(cfg, keys, events, examples, args.weeks, build, args.mode)

if __name__ == "__main__":
    main()
