"""Probe: does the collaborative part's linear logit add to its tree head's? (issue 11, kept as a measured result;
the shipped part scores with the head alone.)

    .venv/bin/python benchmarks/blend_probe.py [--weeks 4] [--work out/quality]

The quality benchmark's `collab` arm (benchmarks/quality_ml100k.py: fitted on every example before a test week,
every row of the week scored); for each row both logits of the same fitted part, the head's and the linear sum's
(mu + b[cand] + <u, E[cand]> + w . f, the tables the head does not read). Prints the AUC per week and pooled of
head + a * linear for a few a, chosen on the test rows themselves: an upper bound on what a blend fitted on
validation rows could add.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from quality_ml100k import classical_scorer, fast_auc, load_protocol, split, week_bounds  # a script beside it
from llmrec_ray.catalog import load_catalog
from llmrec_ray.collab import batch_tensors, predict_logits
from llmrec_ray.ids import history_arrays
from llmrec_ray.store import Store
from llmrec_ray.text import candidate_texts

BLENDS = (0.0, 0.1, 0.25, 0.5, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weeks", type=int, default=4)
    p.add_argument("--work", default="out/quality")
    args = p.parse_args()
    cfg, keys, events, examples = load_protocol(args.work)
    texts = candidate_texts(load_catalog(Store.from_config(cfg.store)))  # as a round reads them
    weeks, c, ys, heads, linears = week_bounds(keys, 4), cfg.model.collab, [], [], []
    for w in range(args.weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        train_events, week = split(events, examples, weeks[w][1], end)
        _, (net, vocab) = classical_scorer("collab", train_events, examples[examples["timestamp"] < weeks[w][1]],
                                           events[events["timestamp"] < end], cfg, texts=texts)
        rows = vocab.rows(week["item_id"].tolist())
        hist = history_arrays(vocab, week["history_ids"].tolist(), week["history_ratings"].tolist(),
                              week["history_labels"].tolist(), c.history_len, cfg.data.like_threshold)
        with torch.inference_mode():
            linears.append(net.linear_logit(**batch_tensors(rows, hist)).numpy())
        heads.append(predict_logits(net, rows, hist))
        ys.append(week["label"].to_numpy())
        print(f"week {w + 1}: " + "  ".join(f"a={a}: {fast_auc(ys[-1], heads[-1] + a * linears[-1]):.4f}"
                                          for a in BLENDS) + f"  linear alone: {fast_auc(ys[-1], linears[-1]):.4f}",
              flush=True)
    y, head, linear = map(np.concatenate, (ys, heads, linears))
    print(f"pooled over {args.weeks} week(s): " + "  ".join(f"a={a}: {fast_auc(y, head + a * linear):.4f}" for a in BLENDS)
          + f"  linear alone: {fast_auc(y, linear):.4f}")


if __name__ == "__main__":
    main()
