"""New items scored from their text: every arm on items it never saw (issue 11; the text part's job).

    .venv/bin/python benchmarks/cold_items.py [--work out/cold] [--weeks 4] [--holdout 0.3] [--rows 3200]
                                              [--hybrid "" --hybrid "model.lora.enabled=true" ...]

The quality protocol's data (benchmarks/quality_ml100k.py: MovieLens-100K weekly shards, a row's history = every
earlier event of its user) and its test period T, the last --weeks weeks, scored by one model per arm frozen at the
start of T (no weekly refresh: more new-item rows than one week has). A seeded --holdout fraction of the items rated
in T become new items: every event of theirs before T is removed, as a target and from every history, so each arm
learns as if they first appeared in T. Their catalogue rows (title, year, genres) stay, as a new item's would.
Each arm learns from the remaining events before T and scores every row of T:

  popularity, mf, history_lr, collab   as in the quality benchmark (a new item gets the prior / the user's terms)
  collab_joined                        collab fitted on a catalogue without the new items, which join it after the
                                       fit: the tables take their rows the way a Serve replica adds items between
                                       rounds (model.add_catalog_items); should match collab on the new items
  collab_unjoined                      the same fit, the new items never added: what a replica served for an item
                                       that joined the catalogue between rounds before it grew its tables
  text                                 the text-only cross-encoder, trained from the backbone on --rows rows
  hybrid[overrides]                    the hybrid trained the same way, once per --hybrid (comma-separated
                                       key=value overrides; "" = the defaults)

Reports the AUC [95% CI] on the new items' rows (the rows that need text), its difference to `collab`'s on the same
resampled rows (paired bootstrap), the AUC on T's other rows, and the hybrid's fusion weights. Writes
<work>/cold_items.{json,md} (the libraries' output: <work>/cold_items.log); resumable (<work>/state.json keeps every
finished arm).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from quality_ml100k import (OVERRIDES, State, bootstrap_ci, classical_scorer, fast_auc, lm_scorer, prepare,  # beside it
                            train_lm)
from llmrec_ray.config import load_config
from llmrec_ray.schema import CATALOG_KEY
from llmrec_ray.store import Store

CLASSICAL = ("popularity", "mf", "history_lr", "collab", "collab_joined", "collab_unjoined")


def write_store(cfg, store, weeks: int, holdout: float, seed: int) -> tuple[int, set[str]]:
    """(first timestamp of T, the new items); writes the shards without the new items' events before T (once)."""
    from llmrec_ray.datasets import period_start, write_dataset
    from llmrec_ray.datasets.movielens import load_movielens

    catalog, events = load_movielens(cfg.data.like_threshold)
    periods = np.unique(period_start(events["timestamp"], cfg.data.shard_period_days))
    start = int(periods[-weeks]) * 86400
    in_week = events["timestamp"] >= start
    week_items = np.array(sorted(set(events.loc[in_week, "item_id"])))
    rng = np.random.default_rng(seed)
    new_items = set(rng.choice(week_items, size=round(holdout * len(week_items)), replace=False).tolist())
    if not store.exists(CATALOG_KEY):
        kept = events[in_week | ~events["item_id"].isin(new_items)]
        rep = write_dataset(store, catalog, kept, cfg.data.shard_period_days, time.time(), progress=False)
        print(f"wrote {rep.num_shards} weekly shards: {rep.num_rows:,} events "
              f"({len(events) - rep.num_rows:,} earlier events of the {len(new_items)} new items removed)")
    return start, new_items


def run(args, log_path: Path) -> dict:
    from llmrec_ray.catalog import load_catalog
    from llmrec_ray.text import candidate_texts
    from llmrec_ray.runtime import configure_environment, ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = [*OVERRIDES, f"store.uri={work / 'store'}"]
    cfg = load_config(None, base)
    store = Store.from_config(cfg.store)
    start, new_items = write_store(cfg, store, args.weeks, args.holdout, args.seed)
    keys, events, examples = prepare(cfg, store, work)
    texts = candidate_texts(load_catalog(store))  # the catalogue keeps the new items' rows
    train_events, train_examples = events[events["timestamp"] < start], examples[examples["timestamp"] < start]
    week = examples[examples["timestamp"] >= start]
    seen = set(train_events["item_id"]) | {i for h in train_examples["history_ids"] for i in h}
    if seen & new_items:  # the protocol's premise: no arm can have learnt anything about a new item by id
        raise RuntimeError(f"new items in the training data: {sorted(seen & new_items)[:5]}")
    is_new = week["item_id"].isin(new_items).to_numpy()
    y = week["label"].to_numpy()
    older = keys[:-args.weeks]
    print(f"last {args.weeks} weeks: {len(week):,} rows, {int(is_new.sum()):,} of them on {len(new_items)} new items; "
          f"{len(train_events):,} earlier events")
    state = State(work / "state.json")
    arms = [*CLASSICAL, "text", *(f"hybrid[{h}]" for h in args.hybrid)]
    for arm in arms:
        if arm in state.data["scores"]:
            continue
        t0 = time.time()
        info = {}
        if arm in ("collab_joined", "collab_unjoined"):
            at_fit = {i: t for i, t in texts.items() if i not in new_items}
            scorer, _ = classical_scorer("collab", train_events, train_examples, events, cfg, texts=at_fit,
                                         joined=texts if arm == "collab_joined" else None)
        elif arm in CLASSICAL:
            scorer, _ = classical_scorer(arm, train_events, train_examples, events, cfg, texts=texts)
        else:
            configure_environment()
            ensure_ray(cfg, log_path)
            overrides = [o for o in arm[len("hybrid["):-1].split(",") if o] if arm != "text" else []
            arm_cfg = load_config(None, [*base, f"model.kind={'text' if arm == 'text' else 'hybrid'}", *overrides])
            name = "cold-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)
            print(f"   train {arm}: {len(older)} shards, at most {args.rows} rows, from the backbone")
            info = train_lm(arm_cfg, store, name, older, [], None, args.rows)
            scorer = lm_scorer(store, name, work)
            fusion = work / "models" / name / "fusion.json"
            if fusion.exists():
                info["fusion"] = json.loads(fusion.read_text())["weights"]
        probs = np.asarray(scorer(week), dtype=np.float64)
        state.data["scores"][arm] = {"probs": probs.tolist(), "seconds": time.time() - t0, **info}
        state.save()
        print(f"   {arm:<28} AUC new items {fast_auc(y[is_new], probs[is_new]):.4f}, "
              f"other rows {fast_auc(y[~is_new], probs[~is_new]):.4f}  ({time.time() - t0:.0f} s)")
    table = {}
    base = np.array(state.data["scores"]["collab"]["probs"])[is_new]
    for arm in arms:
        s = state.data["scores"][arm]
        p = np.array(s["probs"])
        table[arm] = {"auc_new": fast_auc(y[is_new], p[is_new]), "auc_new_ci95": bootstrap_ci(y[is_new], p[is_new]),
                      "delta_new_vs_collab_ci95": paired_delta_ci(y[is_new], p[is_new], base),
                      "auc_other": fast_auc(y[~is_new], p[~is_new]), "auc_other_ci95": bootstrap_ci(y[~is_new], p[~is_new]),
                      "seconds": s["seconds"], "train_rows": s.get("train_rows"), "fusion": s.get("fusion")}
    out = {"protocol": {"weeks": args.weeks, "start": start, "holdout": args.holdout, "seed": args.seed, "new_items": len(new_items),
                        "rows_new": int(is_new.sum()), "rows_other": int((~is_new).sum()), "lm_rows": args.rows},
           "arms": table}
    (work / "cold_items.json").write_text(json.dumps(out, indent=2))
    (work / "cold_items.md").write_text(markdown(out))
    print((work / "cold_items.md").read_text())
    return out


def paired_delta_ci(y: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """95% interval of AUC(a) - AUC(b) on the same resampled rows (paired bootstrap)."""
    rng = np.random.default_rng(seed)
    stats = [fast_auc(y[i], a[i]) - fast_auc(y[i], b[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(reps))]
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def markdown(out: dict) -> str:
    p = out["protocol"]
    lines = [f"| arm | AUC on new items' rows [95% CI] (n={p['rows_new']}) | minus collab's, paired [95% CI] | "
             f"AUC on the other rows (n={p['rows_other']}) | fusion (lm, lm x unknown, unknown, bias) | wall s |",
             "|---|---|---|---|---|---|"]
    for arm, m in out["arms"].items():
        fusion = " / ".join(f"{w:.2f}" for w in m["fusion"]) if m["fusion"] else ""
        d = m["delta_new_vs_collab_ci95"]
        lines.append(f"| {arm} | {m['auc_new']:.4f} [{m['auc_new_ci95'][0]:.3f}, {m['auc_new_ci95'][1]:.3f}] | "
                     f"[{d[0]:+.3f}, {d[1]:+.3f}] | {m['auc_other']:.4f} [{m['auc_other_ci95'][0]:.3f}, {m['auc_other_ci95'][1]:.3f}] | {fusion} | "
                     f"{m['seconds']:.0f} |")
    lines += ["", f"{p['new_items']} items of the last {p['weeks']} weeks held out as new (seed {p['seed']}); language-model arms "
              f"trained from the backbone on at most {p['lm_rows']} rows."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/cold")
    p.add_argument("--weeks", type=int, default=4, help="the test period: the last this many weekly shards")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction of the test period's items held out as new")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=3200, help="training rows of each language-model arm")
    p.add_argument("--hybrid", action="append", default=None, metavar="OVERRIDES",
                   help='one hybrid arm per use: comma-separated key=value overrides ("" = the defaults)')
    args = p.parse_args()
    args.hybrid = args.hybrid if args.hybrid is not None else [""]
    from llmrec_ray.runtime import quiet_output

    started, log_path = time.time(), Path(args.work) / "cold_items.log"
    print(f"== new items scored from their text, in {args.work} (library logs: {log_path})")
    with quiet_output(log_path):
        run(args, log_path)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
