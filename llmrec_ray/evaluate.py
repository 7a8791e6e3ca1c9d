"""Evaluate a scorer on a period's examples: AUC, log loss, HR@K, NDCG@K, and cold/rare-item subsets.

A scorer is any callable (frame) -> P(like) per row, where frame has user_id, item_id,
candidate_text, history_text. The language model reads the texts; the baselines read the ids. All
of them are scored by this code on the same rows and the same sampled negatives.

Ranking protocol (HR@K / NDCG@K): for each positive row (label 1) -- at most eval.max_rows //
(num_negatives + 1) of them, seeded -- eval.num_negatives items are drawn uniformly from the catalogue
excluding every item the user interacted with; the positive is ranked among them with the same
history text (ties count against the positive).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pandas as pd

from llmrec_ray.config import Config
from llmrec_ray.metrics import auc, hit_rate_ndcg, log_loss, sample_negatives

Scorer = Callable[[pd.DataFrame], np.ndarray]
RARE_BELOW = 10  # items with fewer training ratings than this are "rare"
HISTORY_COLUMNS = ("history_ids", "history_ratings", "history_labels")


def model_scorer(model_dir, batch_size: int = 64) -> Scorer:
    from llmrec_ray.model import load_export, score_frame

    model, tokenizer, cfg = load_export(model_dir)
    return lambda frame: score_frame(model, tokenizer, cfg, frame, batch_size)


def baseline_scorer(baseline, log: Optional[pd.DataFrame] = None) -> Scorer:
    """Id-based baselines; a history-aware one (predict_frame) reads the events of `log` before each row."""
    if hasattr(baseline, "predict_frame"):
        return lambda frame: baseline.predict_frame(frame, log)
    return lambda frame: baseline.predict(frame["user_id"].tolist(), frame["item_id"].tolist())


def eval_rows(frame: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The (seeded) subsample of a period that every scorer is evaluated on."""
    if cfg.eval.max_rows and len(frame) > cfg.eval.max_rows:
        frame = frame.sample(cfg.eval.max_rows, random_state=cfg.data.seed)
    return frame.reset_index(drop=True)


def ranking_frame(frame: pd.DataFrame, catalog_texts: dict, seen: dict, cfg: Config) -> pd.DataFrame:
    """Rows: each sampled positive followed by its negatives; column `group` ties them together. A positive whose user
    has seen every catalogue item has no negatives to rank against and is left out."""
    pos = frame[frame["label"] == 1]
    n_groups = max(1, (cfg.eval.max_rows or len(frame)) // (cfg.eval.num_negatives + 1))
    pos = pos.sample(min(n_groups, len(pos)), random_state=cfg.data.seed) if len(pos) else pos
    rng = np.random.default_rng(cfg.data.seed)
    items = list(catalog_texts)
    rows, g = [], -1
    for r in pos.itertuples():
        negs = sample_negatives(items, seen.get(r.user_id, set()) | {r.item_id}, cfg.eval.num_negatives, rng)
        if not negs:
            continue
        g += 1
        for item_id in [r.item_id, *negs]:
            rows.append({"group": g, "user_id": r.user_id, "item_id": item_id, "timestamp": r.timestamp,
                         "history_text": r.history_text, "candidate_text": catalog_texts[item_id][0],
                         "is_positive": item_id == r.item_id,
                         **{c: getattr(r, c) for c in HISTORY_COLUMNS if c in frame}})
    return pd.DataFrame(rows)


def evaluate(scorer: Scorer, frame: pd.DataFrame, ranking: pd.DataFrame, train_counts: pd.Series, cfg: Config) -> dict:
    probs = np.asarray(scorer(frame), dtype=np.float64)
    y = frame["label"].to_numpy()
    out = {"n": len(frame), "auc": auc(y, probs), "logloss": log_loss(y, probs)}
    counts = frame["item_id"].map(train_counts).fillna(0).to_numpy()
    for name, mask in (("cold", counts == 0), ("rare", counts < RARE_BELOW)):
        out[f"n_{name}"] = int(mask.sum())
        out[f"{name}_auc"] = auc(y[mask], probs[mask]) if mask.sum() else float("nan")
    if len(ranking):
        s = np.asarray(scorer(ranking), dtype=np.float64)
        groups = ranking["group"].to_numpy()
        pos = s[ranking["is_positive"].to_numpy()]
        neg = np.stack([s[(groups == g) & ~ranking["is_positive"].to_numpy()] for g in range(groups.max() + 1)])
        out[f"hr@{cfg.eval.k}"], out[f"ndcg@{cfg.eval.k}"] = hit_rate_ndcg(pos, neg, cfg.eval.k)
        out["n_ranked"] = len(pos)
    return out


def evaluate_all(scorers: dict[str, Optional[Scorer]], frame: pd.DataFrame, catalog_texts: dict,
                 history_events: pd.DataFrame, cfg: Config, ranking: bool = True) -> dict[str, dict]:
    """Every scorer on the same rows and negatives. history_events = what training could see.
    ranking=False: pointwise metrics only (AUC, log loss; half the scoring work), for checks that use no HR/NDCG."""
    frame = eval_rows(frame, cfg)
    if ranking:
        seen = history_events.groupby("user_id")["item_id"].agg(set).to_dict() if len(history_events) else {}
        for r in frame.itertuples():
            seen.setdefault(r.user_id, set()).add(r.item_id)
        ranked = ranking_frame(frame, catalog_texts, seen, cfg)
    else:
        ranked = pd.DataFrame()
    train_counts = history_events["item_id"].value_counts() if len(history_events) else pd.Series(dtype=int)
    return {name: evaluate(s, frame, ranked, train_counts, cfg) for name, s in scorers.items() if s is not None}
