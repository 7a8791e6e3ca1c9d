"""Classical baselines scored by the same evaluation code: popularity and biased matrix factorisation.

Both see exactly the events the language model may see (everything strictly before the evaluated
period) and answer P(like | user, item); unknown users/items fall back to biases / the global rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


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

    def __init__(self, dim: int = 16, epochs: int = 200, lr: float = 0.05, l2: float = 1e-3, seed: int = 0):
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
