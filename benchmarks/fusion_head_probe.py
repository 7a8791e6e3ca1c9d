"""Probe: does a small MLP over the collaborative part's own signals beat its linear sum? (issue 11, kept as a
measured result; the shipped CollabNet stays linear.)

    .venv/bin/python benchmarks/fusion_head_probe.py [linear|mlp|mlp-prod] [--hidden 32] [--weeks 4] [--work out/quality]

Same data, split and fitting as benchmarks/collab_ablation.py (`probe_weeks`: the quality protocol's `collab` arm,
tables fitted from scratch on every event before a test week, every row of the week scored). Variants:
  linear     CollabNet as shipped: mu + b[cand] + <u, E[cand]> + w . f
  mlp        the same + MLP([f, b[cand], <u, E[cand]>]) (one hidden ReLU layer, output initialised at zero)
  mlp-prod   the same with the element-wise product u * E[cand] as MLP input too
Prints the AUC per week and pooled.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from collab_ablation import probe_weeks  # scripts beside it
from quality_ml100k import load_protocol
from llmrec_ray.collab import NUM_FEATURES, CollabNet
from llmrec_ray.ids import ItemVocab


class MLPCollab(CollabNet):
    def __init__(self, num_items: int, dim: int, hidden: int, with_product: bool, neighbours: int):
        super().__init__(num_items, dim, neighbours=neighbours)
        self.with_product = with_product
        torch.manual_seed(0)  # the head's initial weights: the same figures run after run
        self.head = nn.Sequential(nn.Linear(NUM_FEATURES + 2 + (dim if with_product else 0), hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        u, f = self.user_side(hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        g = self.neighbour_features(cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        f = torch.cat([f, g, self.item_logcount[cand_rows].unsqueeze(-1)], dim=-1)
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
    cfg, keys, events, examples = load_protocol(args.work)
    dim, neighbours = cfg.model.collab.dim, cfg.model.collab.neighbours

    def build(train):
        vocab = ItemVocab(sorted(set(map(str, train["item_id"]))))
        net = (CollabNet(len(vocab), dim, neighbours=neighbours) if args.variant == "linear"
               else MLPCollab(len(vocab), dim, args.hidden, args.variant == "mlp-prod", neighbours))
        return net, vocab

    probe_weeks(cfg, keys, events, examples, args.weeks, build, args.variant)

if __name__ == "__main__":
    main()
