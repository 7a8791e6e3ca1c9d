"""Judging a round's candidate: the evaluations a round runs, the forgetting check, and the gate.

- prequential: the promoted model on the round's new data, before it learns it (pointwise metrics).
- next period: candidate, promoted model and the baselines (popularity, biased MF, history-aware logistic
  regression) on the period after the round's shards -- the shard not yet learned; for the newest shard, whose
  next period has not happened, the round's time-split validation rows (its latest rows) stand in.
- forgetting: promoted AUC minus candidate AUC on the oldest period the promoted lineage learned.
- gate: promote when the candidate is not worse than the promoted model on the next period (within
  eval.gate_auc_tolerance) and forgets at most eval.max_forgetting; a first model must beat AUC 0.5.

The scoring itself (rows, sampled negatives, AUC / HR@K / NDCG@K) is llmrec_ray/evaluate.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from llmrec_ray.baselines import BiasedMF, HistoryLogistic, Popularity, with_sampled_negatives
from llmrec_ray.config import Config
from llmrec_ray.evaluate import Scorer, baseline_scorer, evaluate_all
from llmrec_ray.ingest import examples_frame, negatives_for
from llmrec_ray.store import Store

EVENT_COLUMNS = ["user_id", "item_id", "rating", "label", "timestamp"]


@dataclass
class Periods:
    """The shard keys a round learns and is judged on, oldest first."""

    learn: list[str]  # the round's new shards
    before: list[str]  # every shard older than the first of them: histories, what the baselines learn from
    next: Optional[str] = None  # the shard after `learn`, not yet learned: the gate's period (None: the newest)
    oldest_learned: Optional[str] = None  # the oldest shard the promoted lineage learned: the forgetting check's
    before_oldest: list[str] = field(default_factory=list)  # the shards older than it: its histories
    catalog_version: Optional[str] = None  # the catalogue the round pinned (llmrec_ray/catalog.py; None: the newest)


@dataclass
class Verdict:
    promote: bool
    reason: str
    metrics: dict  # {"next": {scorer: metrics}, "old": {"candidate": ..., "promoted": ...}}
    forgetting: Optional[float]  # None: no promoted model, or nothing learned before


def events(store: Store, keys: list[str]) -> pd.DataFrame:
    """The interaction events of `keys` (EVENT_COLUMNS), in key order."""
    if not keys:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    return pd.concat([store.read_table(k, columns=EVENT_COLUMNS).to_pandas() for k in keys], ignore_index=True)


def prequential(cfg: Config, store: Store, texts: dict, promoted: Scorer, periods: Periods) -> dict:
    """The promoted model's pointwise metrics on the round's new data, before it learns it."""
    frame = examples_frame(cfg, store, periods.learn, history_keys=periods.before, catalog_version=periods.catalog_version)
    return evaluate_all({"promoted": promoted}, frame, texts, events(store, periods.before), cfg,
                        ranking=False)["promoted"]


def judge(cfg: Config, store: Store, texts: dict, candidate: Scorer, promoted: Optional[Scorer],
          periods: Periods) -> Verdict:
    """Candidate vs promoted model vs baselines on the next period, forgetting on the oldest, then the gate."""
    seen = periods.before + periods.learn
    history = events(store, seen)
    log = events(store, seen + [periods.next]) if periods.next else history  # history_lr reads events before each row
    negatives, ids = negatives_for(cfg, store, seen), list(texts)  # a positive-only log: sampled negatives, as training
    learn_from = with_sampled_negatives(history, ids, negatives, cfg.data.seed)
    scorers = {"candidate": candidate, "promoted": promoted,
               "popularity": baseline_scorer(Popularity().fit(learn_from)),
               "mf": baseline_scorer(BiasedMF().fit(learn_from)),
               "history_lr": baseline_scorer(HistoryLogistic().fit(learn_from),
                                             with_sampled_negatives(log, ids, negatives, cfg.data.seed + 1))}
    metrics = {"next": evaluate_all(scorers, _next_period(cfg, store, periods), texts, history, cfg)}
    forgetting = None
    if promoted is not None and periods.oldest_learned:
        old = examples_frame(cfg, store, [periods.oldest_learned], history_keys=periods.before_oldest,
                           catalog_version=periods.catalog_version)
        metrics["old"] = evaluate_all({"candidate": candidate, "promoted": promoted}, old, texts, history, cfg,
                                      ranking=False)
        forgetting = metrics["old"]["promoted"]["auc"] - metrics["old"]["candidate"]["auc"]
    ok, reason = gate(cfg, metrics["next"]["candidate"], metrics["next"].get("promoted"), forgetting)
    return Verdict(ok, reason, metrics, forgetting)


def _next_period(cfg: Config, store: Store, periods: Periods) -> pd.DataFrame:
    if periods.next:
        return examples_frame(cfg, store, [periods.next], history_keys=periods.before + periods.learn,
                              catalog_version=periods.catalog_version)
    frame = examples_frame(cfg, store, periods.learn, history_keys=periods.before, catalog_version=periods.catalog_version)
    return frame[frame["timestamp"] >= frame["timestamp"].quantile(1 - cfg.data.val_fraction)]


def gate(cfg: Config, cand: dict, prev: Optional[dict], forgetting: Optional[float]) -> tuple[bool, str]:
    """(promote?, reason). Not worse than the promoted model on the next period, bounded forgetting."""
    auc_c = cand.get("auc", float("nan"))
    if not math.isfinite(auc_c) or not math.isfinite(cand.get("logloss", float("nan"))):
        return False, f"candidate metrics are not finite (auc={auc_c})"
    if prev is None:
        return (auc_c > 0.5, f"first model: auc {auc_c:.4f} {'>' if auc_c > 0.5 else '<='} 0.5")
    auc_p = prev.get("auc", float("nan"))
    if math.isfinite(auc_p) and auc_c < auc_p - cfg.eval.gate_auc_tolerance:
        return False, f"auc {auc_c:.4f} < promoted {auc_p:.4f} - tolerance {cfg.eval.gate_auc_tolerance}"
    if forgetting is not None and math.isfinite(forgetting) and forgetting > cfg.eval.max_forgetting:
        return False, f"forgetting {forgetting:.4f} on the oldest period > {cfg.eval.max_forgetting}"
    return True, f"auc {auc_c:.4f} vs promoted {auc_p:.4f} (tolerance {cfg.eval.gate_auc_tolerance})"
