"""Offline metrics (pure numpy).

- auc(labels, scores): rank-based ROC AUC (Mann-Whitney U); tied scores get their average rank. NaN if only one class.
- log_loss(labels, probs): mean binary cross-entropy with probs clipped to [eps, 1 - eps].
- hit_rate_ndcg(pos_scores, neg_scores, k): ranking protocol. For each positive event of the evaluated period the
  evaluator samples `cfg.eval.num_negatives` items uniformly from the catalogue, excluding the items that user
  interacted with (seeded, see sample_negatives), scores them with the same history text, and ranks the positive among
  them. HR@K = share of positives ranked in the top K; NDCG@K = mean of 1/log2(rank + 1) for ranks <= K (rank 1 = best).
  Ties count against the positive (pessimistic: rank = 1 + number of negatives scoring >= the positive).
"""
from __future__ import annotations

import numpy as np


def draw_unseen(rng: np.random.Generator, catalogue: np.ndarray, seen: set, rows: int, k: int) -> np.ndarray:
    """(rows, k') items of `catalogue` (a 1-d array of ids) that are not in `seen`, distinct within a row, with
    k' = min(k, the number of unseen items). A user who touched a small share of the catalogue (the usual case) is
    served by rejection draws, O(rows * k) whatever the catalogue's size; otherwise from the exact unseen pool."""
    if len(seen) * 4 < len(catalogue):
        out = np.empty((rows, k), dtype=catalogue.dtype)
        for r in range(rows):
            picked: list = []
            while len(picked) < k:
                item = catalogue[rng.integers(len(catalogue))]
                if item not in seen and item not in picked:
                    picked.append(item)
            out[r] = picked
        return out
    pool = catalogue[~np.isin(catalogue, np.asarray(list(seen), dtype=catalogue.dtype))]
    k = min(k, len(pool))
    if not k:
        return np.empty((rows, 0), dtype=catalogue.dtype)
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(rows)]) if rows else \
        np.empty((0, k), dtype=catalogue.dtype)


def auc(labels, scores) -> float:
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    n_pos = int((y > 0.5).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=float)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    sum_pos = ranks[y > 0.5].sum()
    return float((sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=float).ravel()
    p = np.clip(np.asarray(probs, dtype=float).ravel(), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ranks_of_positives(pos_scores, neg_scores) -> np.ndarray:
    """pos_scores (N,), neg_scores (N, M) -> 1-based rank of each positive among its M negatives (ties pessimistic)."""
    pos = np.asarray(pos_scores, dtype=float).reshape(-1, 1)
    neg = np.asarray(neg_scores, dtype=float).reshape(len(pos), -1)
    return 1 + (neg >= pos).sum(axis=1)


def hit_rate_ndcg(pos_scores, neg_scores, k: int = 10) -> tuple[float, float]:
    ranks = ranks_of_positives(pos_scores, neg_scores)
    if len(ranks) == 0:
        return float("nan"), float("nan")
    hit = ranks <= k
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(hit.mean()), float(ndcg.mean())


def sample_negatives(catalog_items, exclude: set, num: int, rng: np.random.Generator) -> list:
    """`num` items drawn uniformly (without replacement when possible) from catalog_items minus `exclude`."""
    pool = [i for i in catalog_items if i not in exclude]
    if not pool:
        return []
    replace = len(pool) < num
    idx = rng.choice(len(pool), size=num, replace=replace)
    return [pool[i] for i in idx]

