"""The fixed quality protocol on MovieLens-100K: every arm scored by the same code on the same rows.

    .venv/bin/python benchmarks/quality_ml100k.py [--work out/quality] [--max-train-rows 800] [--weeks 4]

Data: the weekly shards of `llmrec data import movielens` (imported into <work>/store). Test periods:
the last `--weeks` shards. Each arm is frozen at the start of a test week W and scores EVERY row of W;
a row's history is all of that user's events strictly before it (the serving situation: earlier
events of W included, never the row itself nor anything later). The arms:

  popularity    smoothed like rate per item, fitted on every event before W
  mf            biased matrix factorisation (llmrec_ray.baselines.BiasedMF), events before W
  history_lr    logistic regression on the row's whole history + item statistics (the classical bar)
  collab        the hybrid's collaborative part alone (tables fitted from scratch on every event before W)
  text          the text-only cross-encoder (model.kind=text), trained week by week on Ray Train + DeepSpeed
  hybrid        the hybrid (model.kind=hybrid): collaborative part + cross-encoder, week by week
  hybrid_full   (last week only) the hybrid retrained from the pretrained backbone on all earlier weeks

Both language-model arms start from the same first round (the weeks before the first test week, from
the pretrained backbone) and then learn each test week after it is scored, with the same recipe: at most
--max-train-rows new rows per round (+ data.replay_ratio replay), MiniLM at 64 tokens, 5 history items in
the text, 2 workers. The full retrain trains on --full-train-rows rows sampled from all earlier weeks
(default 3,200: as many language-model rows as the incremental lineage learned in its four rounds) and
fits the collaborative part from scratch on all earlier events.

Metrics: pooled AUC over all test rows with a 95% bootstrap interval, per-week AUC, log loss, AUC on rare
items (< 10 ratings before W) and on cold users (no event before W), HR@10 / NDCG@10 with 100 sampled
negatives for --ranked-positives positives per week (the same negatives for every arm), wall time and
training rows per arm. Resumable: <work>/state.json records every finished (arm, week); a rerun skips them.
Writes <work>/quality.json, quality.md and quality.png; the libraries' output (Ray, Ray Data, DeepSpeed,
transformers) goes to <work>/quality.log, our lines to the terminal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from llmrec_ray.config import Config, load_config
from llmrec_ray.schema import CATALOG_KEY, period_of_key

OVERRIDES = ["model.backbone=minilm", "model.max_seq_len=64", "data.history_len=5", "train.num_workers=2",
             "train.zero_stage=1", "train.batch_size_per_worker=16", "train.eval_every_steps=10", "train.patience=2",
             "train.max_failures=0", "eval.num_negatives=100", "eval.k=10"]
CLASSICAL = ("popularity", "mf", "history_lr", "collab")
LM_ARMS = ("text", "hybrid")
ARMS = (*CLASSICAL, *LM_ARMS, "hybrid_full")
RARE_BELOW = 10


# --- data -----------------------------------------------------------------------------------------------
def prepare(cfg: Config, store, work: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """(shard keys oldest first, every event, every event as an example with its history). Cached in <work>."""
    from llmrec_ray.datasets.movielens import import_movielens
    from llmrec_ray.ingest import examples_frame
    from llmrec_ray.ledger import Ledger

    if not store.exists(CATALOG_KEY):
        rep = import_movielens(cfg, store, progress=False)
        print(f"imported MovieLens-100K: {rep.num_rows:,} ratings, {rep.num_shards} weekly shards")
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    cache = work / f"examples-h{cfg.model.collab.history_len}.pkl"  # histories are built for this length
    if cache.exists():
        examples = pd.read_pickle(cache)
    else:
        examples = examples_frame(cfg, store, keys)  # every event is a target; histories strictly earlier
        examples.to_pickle(cache)
    from llmrec_ray.judge import events

    return keys, events(store, keys), examples


def load_protocol(work: str | Path, overrides=()) -> tuple[Config, list[str], pd.DataFrame, pd.DataFrame]:
    """(config, shard keys, events, examples) of the protocol in the work folder, for the probes beside this script."""
    from llmrec_ray.store import Store

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}", *overrides])
    return (cfg, *prepare(cfg, Store.from_config(cfg.store), work))


def week_bounds(keys: list[str], weeks: int) -> list[tuple[str, int]]:
    """(shard key, first timestamp of its period) for the test weeks."""
    import datetime as dt

    out = []
    for key in keys[-weeks:]:
        day = dt.date.fromisoformat(period_of_key(key))
        out.append((key, int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())))
    return out


def split(events: pd.DataFrame, examples: pd.DataFrame, start: int, end: int):
    """(events before the week, the week's examples): the only data an arm frozen at `start` may learn from."""
    return events[events["timestamp"] < start], examples[(examples["timestamp"] >= start) & (examples["timestamp"] < end)]


# --- arms -----------------------------------------------------------------------------------------------
def classical_scorer(arm: str, train_events: pd.DataFrame, train_examples: pd.DataFrame, log: pd.DataFrame,
                     cfg: Config, previous=None, texts: Optional[dict] = None, joined: Optional[dict] = None):
    """(scorer(frame) -> probs, state to warm-start the next week). Fitted only on what it is given; `texts`
    (llmrec_ray.text.candidate_texts of the catalogue) lets collab give catalogue items their text vector before
    their first event, as a round does (None: the texts of train_examples' items). `joined`: the catalogue's texts
    when scoring; collab adds its items the fit did not have, as a Serve replica does between rounds
    (model.add_catalog_items)."""
    from llmrec_ray.baselines import BiasedMF, HistoryLogistic, Popularity
    from llmrec_ray.collab import fit_collab, predict_logits
    from llmrec_ray.ids import history_arrays
    from llmrec_ray.model import add_catalog_items, collab_tables

    if arm == "popularity":
        m = Popularity().fit(train_events)
        return (lambda f: m.predict(f["user_id"], f["item_id"])), None
    if arm == "mf":
        m = BiasedMF().fit(train_events)
        return (lambda f: m.predict(f["user_id"].tolist(), f["item_id"].tolist())), None
    if arm == "history_lr":
        m = HistoryLogistic().fit(train_events)
        return (lambda f: m.predict_frame(f, log)), None
    if arm == "collab":
        c = cfg.model.collab
        if texts is None:
            texts = dict(zip(train_examples["item_id"], train_examples["candidate_text"]))
        net, vocab, _ = collab_tables(previous, train_examples["item_id"], texts, cfg.model)  # as a round does

        def hist(f):
            return history_arrays(vocab, f["history_ids"].tolist(), f["history_ratings"].tolist(),
                                  f["history_labels"].tolist(), c.history_len, cfg.data.like_threshold)

        fit_collab(net, vocab.rows(train_examples["item_id"].tolist()), hist(train_examples),
                   train_examples["label"].to_numpy(), users=train_examples["user_id"].to_numpy(),
                   **c.fit_kwargs(warm=previous is not None))
        grown = add_catalog_items(net, vocab, joined, cfg.model) if joined is not None else None
        if grown is not None:
            net, vocab = grown  # hist() reads the grown vocab
        return (lambda f: 1 / (1 + np.exp(-predict_logits(net, vocab.rows(f["item_id"].tolist()), hist(f))))), (net, vocab)
    raise ValueError(arm)


def train_lm(cfg: Config, store, name: str, targets: list[str], older: list[str], init: str | None,
             max_rows: int) -> dict:
    """One round of the real training path (collaborative stage + Ray Train/DeepSpeed); export in the store."""
    from llmrec_ray import train

    init_uri = store.key_uri(f"quality/models/{init}") if init else None
    started = time.time()
    run_name = f"{name}-{int(started)}"  # a fresh Ray Train run: never resume a killed attempt's checkpoints
    result = train.train_candidate(cfg, store, targets, older, older if init else [], init_uri, run_name, max_rows)
    store.upload_dir(result.export_dir, f"quality/models/{name}")
    result.discard()
    return {"train_wall_s": time.time() - started, "train_rows": int(result.metrics["num_train_rows"]),
            **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool))}}


def lm_plan(arm: str, w: int, weeks, keys: list[str], models: dict, args) -> dict:
    """Which shards the language-model arm `arm` learns before scoring test week w (all strictly earlier).

    Week 0 (and the full retrain): from the pretrained backbone on every earlier shard. Later weeks:
    incremental, from the arm's model of the previous week, on the previous test week's shard.
    """
    key = weeks[w][0]
    older = [k for k in keys if k < key]
    if arm == "hybrid_full":
        return {"name": f"hybrid_full-{period_of_key(key)}", "init": None, "targets": older, "older": [],
                "rows": args.full_train_rows}
    if w == 0:
        return {"name": f"{arm}-first", "init": None, "targets": older, "older": [], "rows": args.max_train_rows}
    prev_key = weeks[w - 1][0]
    return {"name": f"{arm}-{period_of_key(key)}", "init": models[f"{arm}-latest"], "targets": [prev_key],
            "older": [k for k in keys if k < prev_key], "rows": args.max_train_rows}


def lm_scorer(store, name: str, work: Path) -> Callable:
    from llmrec_ray.evaluate import model_scorer

    local = work / "models" / name
    if not (local / "config.json").exists():
        store.download_dir(f"quality/models/{name}", local)
    return model_scorer(local)


# --- metrics --------------------------------------------------------------------------------------------
def fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(y: np.ndarray, s: np.ndarray, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    stats = [fast_auc(y[i], s[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(reps))]
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def ranking_rows(week: pd.DataFrame, catalog_texts: dict, seen: dict, n_pos: int, n_neg: int, seed: int) -> pd.DataFrame:
    """Sampled positives of the week, each followed by n_neg items the user never interacted with (seeded)."""
    from llmrec_ray.metrics import sample_negatives

    pos = week[week["label"] == 1]
    pos = pos.sample(min(n_pos, len(pos)), random_state=seed)
    rng = np.random.default_rng(seed)
    items = list(catalog_texts)
    rows = []
    for g, r in enumerate(pos.itertuples(index=False)):
        negs = sample_negatives(items, seen.get(r.user_id, set()) | {r.item_id}, n_neg, rng)
        for item in [r.item_id, *negs]:
            rows.append({**r._asdict(), "group": g, "item_id": item, "candidate_text": catalog_texts[item][0],
                         "is_positive": item == r.item_id})
    return pd.DataFrame(rows)


def score_week(scorer: Callable, week: pd.DataFrame, ranked: pd.DataFrame, k: int) -> dict:
    from llmrec_ray.metrics import hit_rate_ndcg, log_loss

    probs = np.asarray(scorer(week), dtype=np.float64)
    out = {"probs": probs.tolist(), "logloss": log_loss(week["label"].to_numpy(), probs)}
    s = np.asarray(scorer(ranked), dtype=np.float64)
    groups, is_pos = ranked["group"].to_numpy(), ranked["is_positive"].to_numpy()
    neg = np.stack([s[(groups == g) & ~is_pos] for g in range(groups.max() + 1)])
    out[f"hr@{k}"], out[f"ndcg@{k}"] = hit_rate_ndcg(s[is_pos], neg, k)
    return out


# --- the run --------------------------------------------------------------------------------------------
class State:
    """<work>/state.json, rewritten atomically after every finished step."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"scores": {}, "models": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def run(args, log_path: Path) -> dict:
    from llmrec_ray.runtime import configure_environment, ensure_ray
    from llmrec_ray.ingest import item_texts, load_catalog
    from llmrec_ray.store import Store
    from llmrec_ray.text import candidate_texts

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}", *args.overrides])
    store = Store.from_config(cfg.store)
    state = State(work / "state.json")
    keys, events, examples = prepare(cfg, store, work)
    weeks = week_bounds(keys, args.weeks)
    catalog = load_catalog(store)
    texts, cand_texts = item_texts(catalog), candidate_texts(catalog)
    print(f"sizing: LM rounds at most {args.max_train_rows} new rows (+ replay), full retrain {args.full_train_rows} rows, "
          f"{cfg.model.max_seq_len} tokens, {cfg.data.history_len} history items in the text, "
          f"{cfg.model.collab.history_len} in the collaborative part; HR/NDCG@{cfg.eval.k}: {args.ranked_positives} "
          f"positives per week x {cfg.eval.num_negatives} negatives")
    kinds = {"text": "text", "hybrid": "hybrid", "hybrid_full": "hybrid"}
    for w, (key, start) in enumerate(weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        train_events, week = split(events, examples, start, end)
        train_examples = examples[examples["timestamp"] < start]
        seen = train_events.groupby("user_id")["item_id"].agg(set).to_dict()
        for r in week.itertuples():
            seen.setdefault(r.user_id, set()).add(r.item_id)
        ranked = ranking_rows(week, texts, seen, args.ranked_positives, cfg.eval.num_negatives, seed=w)
        log = events[events["timestamp"] < end]
        print(f"== week {period_of_key(key)}: {len(week):,} rows to score, {len(train_events):,} earlier events")
        for arm in ARMS:
            tag = f"{arm}@{period_of_key(key)}"
            if arm == "hybrid_full" and w != len(weeks) - 1:
                continue
            if tag in state.data["scores"]:
                continue
            t0 = time.time()
            info = {}
            if arm in CLASSICAL:
                scorer, _ = classical_scorer(arm, train_events, train_examples, log, cfg, texts=cand_texts)
                info = {"train_rows": len(train_events), "seconds_fit": time.time() - t0}
            else:
                configure_environment()
                ensure_ray(cfg, log_path)
                plan = lm_plan(arm, w, weeks, keys, state.data["models"], args)
                if plan["name"] not in state.data["models"]:
                    arm_cfg = cfg.model_copy(deep=True)
                    arm_cfg.model.kind = kinds[arm]
                    print(f"   train {plan['name']}: {len(plan['targets'])} shards, at most {plan['rows']} rows, "
                          f"from {plan['init'] or 'the backbone'}")
                    state.data["models"][plan["name"]] = train_lm(arm_cfg, store, plan["name"], plan["targets"],
                                                                  plan["older"], plan["init"], plan["rows"])
                    state.save()
                if arm != "hybrid_full":
                    state.data["models"][f"{arm}-latest"] = plan["name"]
                info = {**state.data["models"][plan["name"]], "model": plan["name"]}
                scorer = lm_scorer(store, info["model"], work)
            t1 = time.time()
            scores = score_week(scorer, week, ranked, cfg.eval.k)
            scores.update(info, score_seconds=time.time() - t1, seconds=time.time() - t0)
            state.data["scores"][tag] = scores
            state.save()
            print(f"   {arm:<12} AUC {fast_auc(week['label'].to_numpy(), np.array(scores['probs'])):.4f}  "
                  f"({time.time() - t0:.0f} s)")
    return summarise(state, weeks, events, examples, cfg, work, args)


def summarise(state: State, weeks, events, examples, cfg, work: Path, args) -> dict:
    ys, masks = {}, {}
    for w, (key, start) in enumerate(weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        train_events, week = split(events, examples, start, end)
        counts = train_events["item_id"].value_counts()
        ys[key] = week["label"].to_numpy()
        masks[key] = {"rare": week["item_id"].map(counts).fillna(0).to_numpy() < RARE_BELOW,
                      "cold_user": ~week["user_id"].isin(set(train_events["user_id"])).to_numpy()}
    table = {}
    for arm in ARMS:
        got = [(key, state.data["scores"].get(f"{arm}@{period_of_key(key)}")) for key, _ in weeks]
        got = [(k, s) for k, s in got if s is not None]
        if not got:
            continue
        y = np.concatenate([ys[k] for k, _ in got])
        p = np.concatenate([np.array(s["probs"]) for _, s in got])
        rare = np.concatenate([masks[k]["rare"] for k, _ in got])
        cold = np.concatenate([masks[k]["cold_user"] for k, _ in got])
        lo, hi = bootstrap_ci(y, p)
        from llmrec_ray.metrics import log_loss

        table[arm] = {
            "weeks": [period_of_key(k) for k, _ in got], "n": int(len(y)), "auc": fast_auc(y, p), "auc_ci95": [lo, hi],
            "auc_per_week": [fast_auc(ys[k], np.array(s["probs"])) for k, s in got], "logloss": log_loss(y, p),
            "rare_auc": fast_auc(y[rare], p[rare]), "n_rare": int(rare.sum()),
            "cold_user_auc": fast_auc(y[cold], p[cold]), "n_cold_user": int(cold.sum()),
            f"hr@{cfg.eval.k}": float(np.mean([s[f"hr@{cfg.eval.k}"] for _, s in got])),
            f"ndcg@{cfg.eval.k}": float(np.mean([s[f"ndcg@{cfg.eval.k}"] for _, s in got])),
            "seconds": float(sum(s["seconds"] for _, s in got)),
            "train_rows": [int(s.get("train_rows", 0)) for _, s in got],
        }
    # the incremental hybrid's last round vs its full retrain, on the last week
    last = period_of_key(weeks[-1][0])
    inc, full = state.data["scores"].get(f"hybrid@{last}"), state.data["scores"].get(f"hybrid_full@{last}")
    if inc and full:
        y = ys[weeks[-1][0]]
        table["incremental_vs_full"] = {
            "week": last, "auc_incremental": fast_auc(y, np.array(inc["probs"])), "auc_full": fast_auc(y, np.array(full["probs"])),
            "seconds_incremental_round": inc.get("train_wall_s"), "seconds_full": full.get("train_wall_s"),
        }
    out = {"protocol": {"weeks": [period_of_key(k) for k, _ in weeks], "max_train_rows": args.max_train_rows,
                        "full_train_rows": args.full_train_rows, "ranked_positives": args.ranked_positives,
                        "negatives": cfg.eval.num_negatives, "max_seq_len": cfg.model.max_seq_len,
                        "text_history": cfg.data.history_len, "collab_history": cfg.model.collab.history_len},
           "arms": table, "models": state.data["models"]}
    (work / "quality.json").write_text(json.dumps(out, indent=2))
    (work / "quality.md").write_text(markdown(out, cfg.eval.k))
    plot(out, work / "quality.png")
    print((work / "quality.md").read_text())
    return out


def markdown(out: dict, k: int) -> str:
    lines = ["| arm | pooled AUC [95% CI] | AUC per week | log loss | rare-item AUC (n) | cold-user AUC (n) | "
             f"HR@{k} | NDCG@{k} | wall s | training rows |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, m in out["arms"].items():
        if arm == "incremental_vs_full":
            continue
        lines.append(f"| {arm} | {m['auc']:.4f} [{m['auc_ci95'][0]:.3f}, {m['auc_ci95'][1]:.3f}] | "
                     f"{' / '.join(f'{a:.3f}' for a in m['auc_per_week'])} | {m['logloss']:.4f} | "
                     f"{m['rare_auc']:.3f} ({m['n_rare']}) | {m['cold_user_auc']:.3f} ({m['n_cold_user']}) | "
                     f"{m[f'hr@{k}']:.3f} | {m[f'ndcg@{k}']:.3f} | {m['seconds']:.0f} | {' / '.join(map(str, m['train_rows']))} |")
    ivf = out["arms"].get("incremental_vs_full")
    if ivf:
        lines.append("")
        lines.append(f"Last week {ivf['week']}: incremental hybrid AUC {ivf['auc_incremental']:.4f} vs full retrain "
                     f"{ivf['auc_full']:.4f}; training cost {ivf['seconds_incremental_round']:.0f} s vs {ivf['seconds_full']:.0f} s "
                     f"({ivf['seconds_incremental_round'] / max(ivf['seconds_full'], 1e-9):.2f}x).")
    p = out["protocol"]
    lines.append("")
    lines.append(f"Test weeks {', '.join(p['weeks'])}; every row scored. LM rounds: at most {p['max_train_rows']} new rows, "
                 f"full retrain {p['full_train_rows']} rows; {p['max_seq_len']} tokens; HR/NDCG: {p['ranked_positives']} "
                 f"positives per week x {p['negatives']} negatives.")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, m in out["arms"].items():
        if arm in ("incremental_vs_full", "hybrid_full"):
            continue
        ax.plot(range(1, len(m["auc_per_week"]) + 1), m["auc_per_week"], marker="o", label=f"{arm} (pooled {m['auc']:.3f})")
    ax.set_xticks(range(1, len(out["protocol"]["weeks"]) + 1), out["protocol"]["weeks"])
    ax.set_xlabel("test week")
    ax.set_ylabel("AUC (every row of the week)")
    ax.set_title("MovieLens-100K, last weeks: each arm frozen at the start of the week")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/quality")
    p.add_argument("--weeks", type=int, default=4)
    p.add_argument("--max-train-rows", type=int, default=800)
    p.add_argument("--full-train-rows", type=int, default=3200,
                   help="rows of the full retrain; default = what the incremental lineage learned in its 4 rounds")
    p.add_argument("--ranked-positives", type=int, default=50)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from llmrec_ray.runtime import quiet_output

    started, log_path = time.time(), Path(args.work) / "quality.log"
    print(f"== quality protocol in {args.work} (library logs: {log_path})")
    with quiet_output(log_path):
        run(args, log_path)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
