"""Incremental rounds vs full retraining vs a frozen model on the last MovieLens-100K weeks (issue #4).

    .venv/bin/python benchmarks/study_incremental.py [--user-mod 10] [--weeks 2] [--work out/study]

Sized for a 2-core machine: every arm sees the same fixed user subsample -- users whose
crc32(user_id) % user_mod == 0 -- imported into its own store (same weekly shards, same catalogue),
MiniLM at 64 tokens with 5 history items, 2 Ray Train workers x 1 CPU (DeepSpeed ZeRO-1). Evaluation weeks are
the last `--weeks` shards of the subsample with at least `--min-rows` rows. For eval week W:

  full        trained from the pretrained backbone on every shard before W (lr_first)
  incremental trained from the previous incremental model (the first from `base`) on the shards since
              the previous eval point + replay of older rows (lr_incremental, data.replay_ratio)
  frozen      `base` (trained once, before the first incremental round) and never updated
  popularity, mf  fitted on every event before W

All are scored by evaluate.evaluate_all on the same rows of W, with the same sampled negatives. The LM
reads the user's events strictly before each scored event (earlier events of W included); the
classical baselines see only the weeks before W.

Resumable: every trained model and every evaluation is recorded in <work>/state.json as soon as it
exists, and a rerun skips what is there. Writes <work>/study.json, study.md and study.png; the libraries'
output goes to <work>/study.log, our lines to the terminal.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path


from llmrec_ray.config import load_config
from llmrec_ray.schema import CATALOG_KEY, period_of_key

STUDY_OVERRIDES = ["model.backbone=minilm", "model.max_seq_len=64", "data.history_len=5", "train.num_workers=2",
                   "train.zero_stage=1", "train.batch_size_per_worker=16", "eval.num_negatives=49", "train.max_failures=0"]
ARMS = ("incremental", "full", "frozen", "popularity", "mf")


def build_subsample(cfg, store, user_mod: int) -> None:
    from llmrec_ray.datasets import write_dataset
    from llmrec_ray.datasets.movielens import load_movielens

    catalog, events = load_movielens(cfg.data.like_threshold)
    keep = events["user_id"].map(lambda u: zlib.crc32(u.encode()) % user_mod == 0)
    rep = write_dataset(store, catalog, events[keep].reset_index(drop=True), cfg.data.shard_period_days, time.time(),
                        progress=False, desc="subsample")
    print(f"subsample: {rep.num_rows} of {len(events)} ratings ({events[keep]['user_id'].nunique()} users), "
          f"{rep.num_shards} weekly shards")


class State:
    """A JSON file that is rewritten (atomically) after every step."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"models": {}, "evals": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=float))
        tmp.replace(self.path)


def train_model(cfg, store, state: State, name: str, targets: list[str], older: list[str], init: str | None) -> None:
    """Train one model (unless state has it) and upload its export to study/models/<name> in the store."""
    if name in state.data["models"]:
        return
    from llmrec_ray.train import train_candidate

    init_uri = store.key_uri(f"study/models/{init}") if init else None
    print(f"== train {name}: {len(targets)} shards ({period_of_key(targets[0])}..{period_of_key(targets[-1])}) "
          f"from {init or 'the pretrained backbone'}")
    started = time.time()  # the round's recipe: the collaborative stage (hybrid), then Ray Train + DeepSpeed
    result = train_candidate(cfg, store, targets, older, older if init else [], init_uri, f"study-{name}-{int(started)}")
    wall = time.time() - started
    store.upload_dir(result.export_dir, f"study/models/{name}")
    result.discard()
    m = result.metrics
    state.data["models"][name] = {"init": init, "shards": targets, "wall_seconds": round(wall, 1),
                                  "train_seconds": round(float(m.get("train_seconds", 0.0)), 1),
                                  "collab_seconds": round(float(m.get("collab_seconds", 0.0)), 1),
                                  "num_train_rows": int(m.get("num_train_rows", 0)), "steps": m.get("steps"),
                                  "early_stopped": m.get("early_stopped"), "best_val_loss": m.get("best_val_loss"),
                                  "samples_per_s": m.get("samples_per_s_per_worker")}
    state.save()
    print(f"   {name}: {state.data['models'][name]}")


def evaluate_week(cfg, store, state: State, week: str, keys: list[str], names: dict[str, str]) -> None:
    if week in state.data["evals"]:
        return
    from llmrec_ray.baselines import BiasedMF, Popularity
    from llmrec_ray.evaluate import baseline_scorer, evaluate_all, model_scorer
    from llmrec_ray.ingest import examples_frame, item_texts, load_catalog
    from llmrec_ray.judge import events as pipeline_events

    before = keys[:keys.index(week)]
    frame = examples_frame(cfg, store, [week], history_keys=before)
    history = pipeline_events(store, before)
    scorers = {arm: model_scorer(store.fs_path(f"study/models/{model}")) for arm, model in names.items()}
    scorers["popularity"] = baseline_scorer(Popularity().fit(history))
    scorers["mf"] = baseline_scorer(BiasedMF().fit(history))
    started = time.time()
    result = evaluate_all(scorers, frame, item_texts(load_catalog(store)), history, cfg)
    state.data["evals"][week] = {"models": names, "eval_seconds": round(time.time() - started, 1), "metrics": result}
    state.save()
    print(f"== eval {week}: " + ", ".join(f"{a} auc={r['auc']:.4f}" for a, r in result.items()))


def write_outputs(state: State, work: Path, meta: dict) -> None:
    rows = []
    for week, ev in state.data["evals"].items():
        models = state.data["models"]
        incr, full = models[ev["models"]["incremental"]], models[ev["models"]["full"]]
        row = {"week": week.split("=")[1][:10], "n": ev["metrics"]["full"]["n"],
               "incr_wall_s": incr["wall_seconds"], "full_wall_s": full["wall_seconds"],
               "cost_ratio": round(incr["wall_seconds"] / full["wall_seconds"], 3),
               "incr_rows": incr["num_train_rows"], "full_rows": full["num_train_rows"]}
        for arm in ARMS:
            m = ev["metrics"][arm]
            row[f"{arm}_auc"] = m["auc"]
            row[f"{arm}_ndcg@10"] = m.get("ndcg@10")
            row[f"{arm}_cold_auc"], row[f"{arm}_rare_auc"] = m["cold_auc"], m["rare_auc"]
        row["n_cold"], row["n_rare"] = ev["metrics"]["full"]["n_cold"], ev["metrics"]["full"]["n_rare"]
        rows.append(row)
    (work / "study.json").write_text(json.dumps({**meta, "rows": rows, "models": state.data["models"]}, indent=2, default=float))
    lines = ["| week | rows | incr. wall s | full wall s | cost ratio | AUC incr | AUC full | AUC frozen | AUC pop | AUC MF "
             "| NDCG@10 incr/full/frozen/pop/MF | cold n / AUC incr/full/MF | rare n / AUC incr/full/MF |",
             "|" + "---|" * 13]
    f = lambda v: "nan" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['week']} | {r['n']} | {r['incr_wall_s']:.0f} | {r['full_wall_s']:.0f} | {r['cost_ratio']:.3f} | "
                     + " | ".join(f(r[f"{a}_auc"]) for a in ARMS) + " | "
                     + "/".join(f(r[f"{a}_ndcg@10"]) for a in ARMS) + " | "
                     + f"{r['n_cold']} / " + "/".join(f(r[f"{a}_cold_auc"]) for a in ("incremental", "full", "mf")) + " | "
                     + f"{r['n_rare']} / " + "/".join(f(r[f"{a}_rare_auc"]) for a in ("incremental", "full", "mf")) + " |")
    (work / "study.md").write_text("\n".join([f"# Incremental vs full retrain vs frozen ({meta['subsample']})", "",
                                              f"config overrides: {' '.join(meta['overrides'])}", "", *lines, ""]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        ax.plot([r["week"] for r in rows], [r[f"{arm}_auc"] for r in rows], marker="o", label=arm)
    ax.set_ylabel("next-week AUC")
    ax.set_title(meta["subsample"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "study.png", dpi=100)
    print("\n".join(lines))
    print(f"saved {work / 'study.json'}, {work / 'study.md'}, {work / 'study.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/study")
    p.add_argument("--user-mod", type=int, default=10, help="keep users with crc32(user_id) %% this == 0")
    p.add_argument("--weeks", type=int, default=2, help="evaluation weeks (the last ones with --min-rows rows)")
    p.add_argument("--min-rows", type=int, default=100)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*STUDY_OVERRIDES, *args.overrides, f"store.uri={work / 'store'}"]
    cfg = load_config(None, overrides)
    from llmrec_ray.runtime import configure_environment, ensure_ray, quiet_output
    from llmrec_ray.ingest import _row_count
    from llmrec_ray.ledger import Ledger
    from llmrec_ray.store import Store

    log_path = work / "study.log"
    print(f"== incremental study in {work} (library logs: {log_path})")
    with quiet_output(log_path):
        store = Store.from_config(cfg.store)
        if not store.exists(CATALOG_KEY):
            build_subsample(cfg, store, args.user_mod)
        ledger = Ledger(store)
        ledger.refresh()
        keys = [s.key for s in ledger.shards()]
        sizes = [_row_count(store, [k]) for k in keys]
        eval_idx = [i for i, n in enumerate(sizes) if n >= args.min_rows and i > 0][-args.weeks:]
        start = eval_idx[0]  # the first incremental round learns the shards before it back to >= min_rows rows
        while start > 1 and sum(sizes[start:eval_idx[0]]) < args.min_rows:
            start -= 1
        state = State(work / "state.json")
        configure_environment()
        ensure_ray(cfg, log_path)
        train_model(cfg, store, state, "base", keys[:start], [], None)
        prev, prev_idx = "base", start
        for j, e in enumerate(eval_idx):
            week = keys[e]
            train_model(cfg, store, state, f"incr-{j}", keys[prev_idx:e], keys[:prev_idx], prev)
            train_model(cfg, store, state, f"full-{j}", keys[:e], [], None)
            evaluate_week(cfg, store, state, week, keys, {"incremental": f"incr-{j}", "full": f"full-{j}", "frozen": "base"})
            prev, prev_idx = f"incr-{j}", e
        meta = {"machine": "2 cores, 24 GiB, no GPU", "overrides": overrides[:-1],
                "subsample": f"MovieLens-100K users with crc32(user_id) % {args.user_mod} == 0, "
                             f"{sum(sizes)} ratings, eval weeks with >= {args.min_rows} rows",
                "shard_rows": dict(zip(map(period_of_key, keys), sizes))}
    write_outputs(state, work, meta)


if __name__ == "__main__":
    main()
