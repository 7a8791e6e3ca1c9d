"""The hybrid's collaborative part alone, under config variants, on the quality benchmark's test weeks.

    .venv/bin/python benchmarks/collab_ablation.py [--weeks 1] [--validation] "model.collab.dim=32" ...

Each positional argument is one variant (comma-separated `key=value` overrides; "" = the defaults). Same
data, split and scoring as benchmarks/quality_ml100k.py (its `collab` arm): tables fitted from scratch on
every event before the week, every row of the week scored. Prints and saves <work>/ablation.json.

--validation scores the 4 weeks before the test weeks instead: the place to choose a setting, so that the
benchmark's test weeks stay unseen by the choice.

--lineage: as a round does, each week after the first warm-starts from the tables fitted for the week before
(known ids keep their rows); the first week is fitted from scratch with the defaults, the variant applies to
the warm-started fits. Prints the seconds of each week's fit: the cost of an incremental round's tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from quality_ml100k import OVERRIDES, classical_scorer, fast_auc, prepare, split, week_bounds  # a script beside it
from llmrec_ray.config import Config, load_config
from llmrec_ray.catalog import load_catalog
from llmrec_ray.store import Store
from llmrec_ray.text import candidate_texts


def probe_weeks(cfg: Config, keys, events, examples, num_weeks: int, build, label: str) -> float:
    """The `collab` arm's protocol with a network of the caller's (benchmarks/*_probe.py): for each of the first
    `num_weeks` test weeks, build(training examples) -> (untrained CollabNet or subclass, its ItemVocab); the net is
    fitted on every example before the week with the config's recipe and scores every row of it. Prints the AUC per
    week; returns the pooled AUC."""
    from llmrec_ray.collab import fit_collab, predict_logits
    from llmrec_ray.ids import history_arrays

    c, weeks, ys, ps = cfg.model.collab, week_bounds(keys, 4), [], []
    for w in range(num_weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        _, week = split(events, examples, weeks[w][1], end)
        train = examples[examples["timestamp"] < weeks[w][1]]
        net, vocab = build(train)

        def hist(f):
            return history_arrays(vocab, f["history_ids"].tolist(), f["history_ratings"].tolist(),
                                  f["history_labels"].tolist(), c.history_len, cfg.data.like_threshold)

        started = time.time()
        fit = fit_collab(net, vocab.rows(train["item_id"].tolist()), hist(train), train["label"].to_numpy(),
                         users=train["user_id"].to_numpy(), **c.fit_kwargs())
        ys.append(week["label"].to_numpy())
        ps.append(predict_logits(net, vocab.rows(week["item_id"].tolist()), hist(week)))
        print(f"{label} week {w + 1}: AUC {fast_auc(ys[-1], ps[-1]):.4f} ({fit.epochs} epochs, {time.time() - started:.0f} s)",
              flush=True)
    pooled = fast_auc(np.concatenate(ys), np.concatenate(ps))
    print(f"{label} pooled over {num_weeks} week(s): AUC {pooled:.4f}")
    return pooled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=[""])
    p.add_argument("--work", default="out/quality")
    p.add_argument("--weeks", type=int, default=1, help="the first N of the benchmark's 4 test weeks")
    p.add_argument("--validation", action="store_true",
                   help="score the 4 weeks before the test weeks (to choose settings without seeing the test weeks)")
    p.add_argument("--lineage", action="store_true",
                   help="warm-start each week's tables from the week before's, as a round does (the first week from scratch)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    base = [*OVERRIDES, f"store.uri={work / 'store'}"]
    first_cfg = load_config(None, base)  # --lineage: the first week's fit, the same for every variant
    first_week = None  # --lineage: (probs, tables, fit seconds) of that fit, made once
    for variant in args.variants:
        cfg = load_config(None, [*base, *[v for v in variant.split(",") if v]])
        store = Store.from_config(cfg.store)
        keys, events, examples = prepare(cfg, store, work)  # cached per history length
        texts = candidate_texts(load_catalog(store))  # as a round reads them
        weeks = week_bounds(keys, 8 if args.validation else 4)  # with --validation: 4 validation + 4 test weeks
        ys, ps, fits, previous, started = [], [], [], None, time.time()
        for w in range(args.weeks):
            end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
            train_events, week = split(events, examples, weeks[w][1], end)
            ys.append(week["label"].to_numpy())
            if args.lineage and w == 0 and first_week is not None:  # warm starts copy the tables: it is unchanged
                probs, previous, seconds = first_week
                ps.append(probs)
                fits.append(seconds)
                print(f"   week 1: AUC {fast_auc(ys[-1], ps[-1]):.4f}, fit {fits[-1]:.0f} s (the first variant's)", flush=True)
                continue
            fit_started = time.time()
            scorer, state = classical_scorer("collab", train_events, examples[examples["timestamp"] < weeks[w][1]],
                                             events[events["timestamp"] < end],
                                             first_cfg if args.lineage and w == 0 else cfg, previous=previous, texts=texts)
            fits.append(time.time() - fit_started)
            previous = state if args.lineage else None
            ps.append(scorer(week))
            if args.lineage and w == 0:
                first_week = (ps[-1], state, fits[-1])
            print(f"   week {w + 1}: AUC {fast_auc(ys[-1], ps[-1]):.4f}, fit {fits[-1]:.0f} s", flush=True)
        row = {"variant": variant or "defaults", "auc": fast_auc(np.concatenate(ys), np.concatenate(ps)),
               "auc_per_week": [fast_auc(y, s) for y, s in zip(ys, ps)], "fit_seconds": fits,
               "weeks": args.weeks, "validation": args.validation, "lineage": args.lineage,
               "seconds": time.time() - started}
        out.append(row)
        print(f"{row['variant']:<50} AUC {row['auc']:.4f}  ({row['seconds']:.0f} s)", flush=True)
    (work / "ablation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
