"""Probe: does a small MLP over the collaborative part's own signals beat its linear sum? (issue 11, kept as a
measured result; the shipped CollabNet stays linear.)

    .venv/bin/python benchmarks/fusion_head_probe.py [linear|mlp|mlp-prod] [--hidden 32] [--weeks 4] [--work out/quality]

Same data, split and fitting as benchmarks/collab_ablation.py (the quality protocol's `collab` arm: tables fitted
from scratch on every event before a test week, every row of the week scored). Variants:
  linear     CollabNet as shipped: mu + b[cand] + <u, E[cand]> + w . f
  mlp        the same + MLP([f, b[cand], <u, E[cand]>]) (one hidden ReLU layer, output initialised at zero)
  mlp-prod   the same with the element-wise product u * E[cand] as MLP input too
Prints the AUC per week and pooled.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quality_ml100k import OVERRIDES, fast_auc, prepare, split, week_bounds  # a script beside it
from llmrec_ray.collab import NUM_FEATURES, CollabNet, fit_collab, predict_logits
from llmrec_ray.config import load_config
from llmrec_ray.ids import ItemVocab, history_arrays
from llmrec_ray.store import Store


class MLPCollab(CollabNet):
    def __init__(self, num_items: int, dim: int, hidden: int, with_product: bool):
        super().__init__(num_items, dim)
        self.with_product = with_product
        self.head = nn.Sequential(nn.Linear(NUM_FEATURES + 2 + (dim if with_product else 0), hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        u, f = self.user_side(hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        f = torch.cat([f, self.item_logcount[cand_rows].unsqueeze(-1)], dim=-1)
        e, b = self.cand(cand_rows), self.item_bias(cand_rows).squeeze(-1)
        dot = (u * e).sum(-1)
        z = [f, b.unsqueeze(-1), dot.unsqueeze(-1)] + ([u * e] if self.with_product else [])
        return self.mu + b + dot + self.user_features(f).squeeze(-1) + self.head(torch.cat(z, -1)).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["linear", "mlp", "mlp-prod"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--weeks", type=int, default=4)
    p.add_argument("--work", default="out/quality")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}"])
    keys, events, examples = prepare(cfg, Store.from_config(cfg.store), work)
    weeks = week_bounds(keys, 4)
    c = cfg.model.collab
    ys, ps, started = [], [], time.time()
    for w in range(args.weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        _, week = split(events, examples, weeks[w][1], end)
        train = examples[examples["timestamp"] < weeks[w][1]]
        vocab = ItemVocab(sorted(set(map(str, train["item_id"]))))
        net = (CollabNet(len(vocab), c.dim) if args.variant == "linear"
               else MLPCollab(len(vocab), c.dim, args.hidden, args.variant == "mlp-prod"))

        def hist(f):
            return history_arrays(vocab, f["history_ids"].tolist(), f["history_ratings"].tolist(),
                                  f["history_labels"].tolist(), c.history_len, cfg.data.like_threshold)

        fit = fit_collab(net, vocab.rows(train["item_id"].tolist()), hist(train), train["label"].to_numpy(),
                         epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, l2=c.l2, val_fraction=c.val_fraction)
        ys.append(week["label"].to_numpy())
        ps.append(predict_logits(net, vocab.rows(week["item_id"].tolist()), hist(week)))
        print(f"week {w + 1}: AUC {fast_auc(ys[-1], ps[-1]):.4f} ({fit.epochs} epochs)", flush=True)
    print(f"{args.variant}: pooled AUC {fast_auc(np.concatenate(ys), np.concatenate(ps)):.4f} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
