"""The collaborative part of the hybrid scorer: item tables learned from the interaction log, and a user
side read from the request's own history -- no per-user table, so cold users and users with fresh
history are scored like everyone else.

    logit_cf = mu + b[cand] + <u, E[cand]> + w . f(history)
    u        = mean over liked history items of L[j] + mean over not-liked history items of D[j]
    f        = (like rate, mean centred rating, log(1 + n), mean (label_j - sigmoid(mu + b[j])), share rated,
                mean (rating_j - the item's mean rating), log(1 + the candidate's training count))
    The item mean ratings and counts are statistics of the training rows (buffers, saved with the tables).

Row 0 of every table is the unknown id (an item the tables never saw, or padding): its rows are zero,
so an unknown candidate contributes no item term and an unknown history item only counts in f; text
alone speaks for it (the language-model part of the hybrid, llmrec_ray/model.py).

Incremental: `ItemVocab.grow` keeps every known id at its row and appends new ids; `CollabNet.grown`
copies the old rows into bigger tables (new rows start at zero). `fit_collab` trains the tables on
examples with histories (full batch Adam on a few hundred thousand rows takes seconds on a CPU).

Pure torch + numpy: no Ray here.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmrec_ray.ids import UNKNOWN, HistoryArrays, ItemVocab

NUM_FEATURES = 7  # 6 read from the history + the candidate's log count
VOCAB_FILE = "collab_vocab.json"
WEIGHTS_FILE = "collab.safetensors"
COLLAB_FILES = (WEIGHTS_FILE, VOCAB_FILE)


class CollabNet(nn.Module):
    """Item tables + a user side computed from the history tensors. forward -> (B,) logits."""

    def __init__(self, num_items: int, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # the same tables from the same data, run after run
        self.num_items, self.dim = num_items, dim
        self.mu = nn.Parameter(torch.zeros(1))
        self.item_bias = nn.Embedding(num_items + 1, 1, padding_idx=UNKNOWN)
        self.cand = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.hist_liked = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.hist_disliked = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.user_features = nn.Linear(NUM_FEATURES, 1)
        self.register_buffer("item_rating", torch.zeros(num_items + 1))  # smoothed mean centred rating
        self.register_buffer("item_logcount", torch.zeros(num_items + 1))  # log(1 + training rows as candidate)
        for table in (self.cand, self.hist_liked, self.hist_disliked):
            nn.init.normal_(table.weight, std=0.01, generator=g)
            with torch.no_grad():
                table.weight[UNKNOWN].zero_()
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.user_features.weight)
        nn.init.zeros_(self.user_features.bias)

    def user_side(self, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        """(u (B, dim), f (B, NUM_FEATURES - 1)) from the history tensors."""
        known = (hist_rows != UNKNOWN).float()
        liked, disliked = hist_liked * known, (1 - hist_liked) * hist_present * known
        u = (_masked_mean(self.hist_liked(hist_rows), liked) + _masked_mean(self.hist_disliked(hist_rows), disliked))
        n = hist_present.sum(-1)
        like_rate = (hist_liked * hist_present).sum(-1) / (n + 1.0)  # shrunk towards 0 for short histories
        mean_rating = (hist_rating * hist_rated).sum(-1) / (hist_rated.sum(-1) + 1.0)
        expected = torch.sigmoid(self.mu + self.item_bias(hist_rows).squeeze(-1))  # (B, H)
        surprise = ((hist_liked - expected) * known).sum(-1) / (known.sum(-1) + 1.0)
        rated_share = hist_rated.sum(-1) / n.clamp(min=1.0)
        rated_known = hist_rated * known
        rating_dev = ((hist_rating - self.item_rating[hist_rows]) * rated_known).sum(-1) / (rated_known.sum(-1) + 1.0)
        f = torch.stack([like_rate, mean_rating, torch.log1p(n), surprise, rated_share, rating_dev], dim=-1)
        return u, f

    def forward(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        u, f = self.user_side(hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        f = torch.cat([f, self.item_logcount[cand_rows].unsqueeze(-1)], dim=-1)
        return (self.mu + self.item_bias(cand_rows).squeeze(-1) + (u * self.cand(cand_rows)).sum(-1)
                + self.user_features(f).squeeze(-1))

    def set_item_statistics(self, cand_rows: torch.Tensor, hist_rows: torch.Tensor, hist_rating: torch.Tensor,
                            hist_rated: torch.Tensor, smoothing: float = 5.0) -> None:
        """Item mean ratings (from the ratings seen in histories) and candidate counts of the training rows."""
        size = self.num_items + 1
        rated = (hist_rated > 0) & (hist_rows != UNKNOWN)
        total = torch.zeros(size).index_add_(0, hist_rows[rated], hist_rating[rated].float())
        count = torch.zeros(size).index_add_(0, hist_rows[rated], torch.ones(int(rated.sum())))
        self.item_rating.copy_(total / (count + smoothing))
        self.item_logcount.copy_(torch.log1p(torch.bincount(cand_rows, minlength=size)[:size].float()))
        self.item_rating[UNKNOWN] = 0.0
        self.item_logcount[UNKNOWN] = 0.0

    def grown(self, num_items: int) -> "CollabNet":
        """A copy with tables for `num_items` ids: old rows kept, new rows zero (they learn from their first events)."""
        assert num_items >= self.num_items, (num_items, self.num_items)
        out = CollabNet(num_items, self.dim)
        state = self.state_dict()
        with torch.no_grad():
            for name, tensor in out.state_dict().items():
                old = state[name]
                if tensor.shape == old.shape:
                    tensor.copy_(old)
                else:  # an item table: copy the known rows, zero the new ones
                    tensor.zero_()
                    tensor[: old.shape[0]].copy_(old)
        return out

    def regulariser(self, cand_rows, hist_rows) -> torch.Tensor:
        """L2 on the rows a batch touched (sparse-friendly; unknown rows are zero anyway)."""
        return (self.cand(cand_rows).pow(2).sum(-1).mean() + self.item_bias(cand_rows).pow(2).mean()
                + self.hist_liked(hist_rows).pow(2).sum(-1).mean() + self.hist_disliked(hist_rows).pow(2).sum(-1).mean())


def _masked_mean(x, mask):
    """x (B, H, D), mask (B, H) -> (B, D); zero where the mask is empty."""
    return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def batch_tensors(cand_rows: np.ndarray, hist: HistoryArrays) -> dict[str, torch.Tensor]:
    out = {"cand_rows": torch.from_numpy(np.asarray(cand_rows, np.int64))}
    out.update({k: torch.from_numpy(v) for k, v in hist.as_dict().items()})
    return out


@dataclass
class FitReport:
    num_rows: int
    epochs: int
    seconds: float
    final_loss: float


def fit_collab(net: CollabNet, cand_rows: np.ndarray, hist: HistoryArrays, labels: np.ndarray, *, epochs: int = 8,
               batch_size: int = 1024, lr: float = 0.01, l2: float = 1e-4, seed: int = 0,
               val_fraction: float = 0.0) -> FitReport:
    """Mini-batch Adam on BCE (in place). Rows are in time order; with val_fraction > 0 the latest rows first
    choose the number of epochs (early stopping on their loss), then the tables are fitted on every row
    for that many epochs from the same start -- the newest rows matter most for the next period."""
    started = time.time()
    tensors = batch_tensors(cand_rows, hist)
    y = torch.tensor(np.asarray(labels, np.float32))
    n = len(y)
    n_val = int(n * val_fraction) if epochs > 1 else 0
    chosen = epochs
    with torch.no_grad():  # statistics of the rows that train (the held-out ones stay unseen while choosing)
        fit_rows = slice(0, n - n_val)
        net.set_item_statistics(tensors["cand_rows"][fit_rows], tensors["hist_rows"][fit_rows],
                                tensors["hist_rating"][fit_rows], tensors["hist_rated"][fit_rows])
    if n_val:
        start = copy.deepcopy(net.state_dict())
        val = {k: v[n - n_val:] for k, v in tensors.items()}
        losses = []
        for loss in _epochs(net, {k: v[:n - n_val] for k, v in tensors.items()}, y[:n - n_val], epochs, batch_size, lr, l2, seed):
            with torch.no_grad():
                net.eval()
                losses.append(nn.functional.binary_cross_entropy_with_logits(net(**val), y[n - n_val:]).item())
                net.train()
        chosen = int(np.argmin(losses)) + 1
        net.load_state_dict(start)
        with torch.no_grad():
            net.set_item_statistics(tensors["cand_rows"], tensors["hist_rows"], tensors["hist_rating"], tensors["hist_rated"])
    loss_value = float("nan")
    for loss_value in _epochs(net, tensors, y, chosen, batch_size, lr, l2, seed):
        pass
    net.eval()
    return FitReport(n, chosen, time.time() - started, loss_value)


def _epochs(net: CollabNet, tensors: dict, y: torch.Tensor, epochs: int, batch_size: int, lr: float, l2: float, seed: int):
    """Yields the mean training loss after each epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = len(y)
    net.train()
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=g).split(batch_size):
            batch = {k: v[idx] for k, v in tensors.items()}
            loss = nn.functional.binary_cross_entropy_with_logits(net(**batch), y[idx])
            reg = l2 * net.regulariser(batch["cand_rows"], batch["hist_rows"])
            opt.zero_grad()
            (loss + reg).backward()
            opt.step()
            with torch.no_grad():
                for table in (net.cand, net.hist_liked, net.hist_disliked, net.item_bias):
                    table.weight[UNKNOWN].zero_()
            total += loss.item() * len(idx)
        yield total / max(n, 1)


def predict_logits(net: CollabNet, cand_rows: np.ndarray, hist: HistoryArrays, batch_size: int = 4096) -> np.ndarray:
    net.eval()
    tensors = batch_tensors(cand_rows, hist)
    out = []
    with torch.inference_mode():
        for i in range(0, len(cand_rows), batch_size):
            out.append(net(**{k: v[i:i + batch_size] for k, v in tensors.items()}).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --- save / load -----------------------------------------------------------------------------------------
def save_collab(net: CollabNet, vocab: ItemVocab, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / VOCAB_FILE).write_text(json.dumps({"dim": net.dim, "item_ids": vocab.ids}))


def load_collab(model_dir: str | Path) -> tuple[CollabNet, ItemVocab]:
    """ValueError naming the file and the problem when the tables are missing or inconsistent."""
    model_dir = Path(model_dir)
    for f in (WEIGHTS_FILE, VOCAB_FILE):
        if not (model_dir / f).is_file():
            raise ValueError(f"model export {model_dir} has no {f}: not a hybrid export (llmrec_ray.model.save_export)")
    try:
        meta = json.loads((model_dir / VOCAB_FILE).read_text())
        vocab = ItemVocab(meta["item_ids"])
        net = CollabNet(len(vocab), int(meta["dim"]))
        net.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    except Exception as exc:  # truncated file, wrong shapes, bad JSON: one clear error
        raise ValueError(f"collaborative tables in {model_dir} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if len(vocab) != len(set(vocab.ids)):
        raise ValueError(f"{model_dir / VOCAB_FILE} lists an item id twice; re-export the model")
    return net.eval(), vocab


def warm_start(previous: Optional[tuple[CollabNet, ItemVocab]], item_ids: Iterable[str], dim: int) -> tuple[CollabNet, ItemVocab]:
    """The tables a round starts from: the promoted version's, grown by the ids it has not seen; or fresh ones."""
    if previous is None:
        vocab = ItemVocab(sorted(set(map(str, item_ids))))
        return CollabNet(len(vocab), dim), vocab
    net, vocab = previous
    grown = vocab.grow(sorted(set(map(str, item_ids)) - set(vocab.index)))
    return net.grown(len(grown)), grown

