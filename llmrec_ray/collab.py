"""The collaborative part of the hybrid scorer: item tables learned from the interaction log, and a user
side read from the request's own history -- no per-user table, so cold users and users with fresh
history are scored like everyone else.

    logit_cf = mu + b[cand] + <u, E[cand]> + w . f(history, cand)
    u        = mean over liked history items of L[j] + mean over not-liked history items of D[j]
    f        = (like rate, mean centred rating, log(1 + n), mean (label_j - sigmoid(mu + b[j])), share rated,
                mean (rating_j - the item's mean rating),
                neighbour score, max s(cand, liked j), max s(cand, not-liked j), mean s(cand, j),
                log(1 + the candidate's training count))
    s(c, j)  = item-item similarity: cosine of the two items' user-centred labels over the users who have both,
               shrunk by co-count / (co-count + 25), the top `neighbours` per item kept (0 when j is not among them)
    neighbour score = sum_j s(c, j) * centred_j / sum_j |s(c, j)|, centred_j = rating_j - the history's mean
               rating (or label_j - like rate for an unrated event): classic item-based collaborative filtering.
    The item mean ratings, counts and neighbour lists are statistics of the training rows (buffers, saved with the
    tables). Why the neighbour terms: the learned tables alone tie the history-aware logistic regression on
    MovieLens; item-item similarities over every co-rating add what early-stopped embeddings do not learn
    (benchmarks/quality_ml100k.py, README "Quality").

    The tree head (the default; `fit_collab(head_fraction=...)`): gradient-boosted trees over HEAD_FEATURES --
    statistics of the history, of the candidate (count, like rate, mean rating and its spread), the neighbour
    features and the text features (the same four with s(c, j) = the cosine of the two items' text vectors: the
    frozen backbone's sentence embeddings of their texts, a buffer filled by model.fill_text_vectors; content
    similarity needs no co-ratings) and the EASE features (the history through two closed-form item-item regressions,
    `ease_weights`: which items a user has, and the user-centred labels; refitted every round over the
    `ease_items` items with most users) -- score instead of the linear sum. They learn from the newest rows with
    statistics of the older rows only (`fit_tree_head`), and are evaluated in torch (`TreeHead`), saved in the
    same safetensors file as the tables. The linear sum stays what retrieval factorises (llmrec_ray/retrieval.py)
    and what scores when a round had too few rows for trees.

Row 0 of every table is the unknown id (an item the tables never saw, or padding): its rows are zero and its
statistics those of an item without events, so an unknown candidate contributes no item term and an unknown history
item only counts in f; text alone speaks for it (the language-model part of the hybrid, llmrec_ray/model.py). With
text vectors on, a round gives every catalogue item a row and its vector before its first event
(model.collab_tables): such a row's statistics are an unknown item's, but the text features compare its text with
the history's.

Incremental: `ItemVocab.grow` keeps every known id at its row and appends new ids; `CollabNet.grown`
copies the old rows into bigger tables (new rows start at zero). `fit_collab` trains the tables on
examples with histories (full batch Adam on a few hundred thousand rows takes seconds on a CPU).

Pure torch + numpy: no Ray here.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmrec_ray.ids import UNKNOWN, HistoryArrays, ItemVocab

NUM_HISTORY_FEATURES = 6  # read from the history alone
NUM_NEIGHBOUR_FEATURES = 4  # the history against the candidate's neighbour list
NUM_FEATURES = NUM_HISTORY_FEATURES + NUM_NEIGHBOUR_FEATURES + 1  # + the candidate's log count, always last
SHRINK = 25.0  # co-count shrinkage of the item-item similarities
HEAD_FEATURES = ("log_n", "like_rate", "mean_rating", "rating_std", "last5_dev", "last_rating", "rating_dev",
                 "item_logcount", "item_like_rate", "item_mean", "item_std", "expected_rating",
                 "neighbour_score", "max_sim_liked", "max_sim_disliked", "mean_sim",
                 "text_score", "text_max_liked", "text_max_disliked", "text_mean",
                 "ease_score", "ease_signed", "ease_liked_minus_disliked")  # the tree head's inputs
NUM_TEXT_FEATURES = 4  # after the neighbour features: the history against the candidate by their texts' vectors
NUM_EASE_FEATURES = 3  # the last HEAD_FEATURES: the history through the EASE item-item regressions
ITEM_PRIOR = 10.0  # pseudo-count pulling an item's like rate and mean rating towards the global ones
VOCAB_FILE = "collab_vocab.json"
WEIGHTS_FILE = "collab.safetensors"
COLLAB_FILES = (WEIGHTS_FILE, VOCAB_FILE)


class CollabNet(nn.Module):
    """Item tables + a user side computed from the history tensors. forward -> (B,) logits."""

    def __init__(self, num_items: int, dim: int = 32, seed: int = 0, neighbours: int = 0, text_dim: int = 0,
                 ease_items: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # the same tables from the same data, run after run
        self.num_items, self.dim, self.neighbours, self.text_dim = num_items, dim, neighbours, text_dim
        self.ease_items = ease_items  # items in the EASE matrices (set_item_statistics chooses them)
        self.mu = nn.Parameter(torch.zeros(1))
        self.item_bias = nn.Embedding(num_items + 1, 1, padding_idx=UNKNOWN)
        self.cand = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.hist_liked = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.hist_disliked = nn.Embedding(num_items + 1, dim, padding_idx=UNKNOWN)
        self.user_features = nn.Linear(NUM_FEATURES, 1)
        self.register_buffer("item_rating", torch.zeros(num_items + 1))  # smoothed mean centred rating
        self.register_buffer("item_logcount", torch.zeros(num_items + 1))  # log(1 + training rows as candidate)
        self.register_buffer("nbr_rows", torch.zeros(num_items + 1, neighbours, dtype=torch.int64))  # row 0: none
        self.register_buffer("nbr_sims", torch.zeros(num_items + 1, neighbours))
        # the tree head's item statistics (see head_features); row 0 stays zero
        self.register_buffer("item_like_rate", torch.zeros(num_items + 1))  # smoothed like rate as a candidate
        self.register_buffer("item_mean", torch.zeros(num_items + 1))  # smoothed mean rating (seen in histories)
        self.register_buffer("item_std", torch.zeros(num_items + 1))  # spread of those ratings
        self.register_buffer("global_rating", torch.zeros(1))  # mean rating of the statistics' rows
        # unit vectors of the items' texts from the frozen text backbone (model.fill_text_vectors); zero rows: none
        self.register_buffer("item_text", torch.zeros(num_items + 1, text_dim))
        # EASE (ease_weights): each item's position in the two item-item weight matrices (0: not in them) and the
        # matrices, position 0 a zero row and column
        self.register_buffer("ease_pos", torch.zeros(num_items + 1, dtype=torch.int64))
        self.register_buffer("ease_rated", torch.zeros(ease_items + 1, ease_items + 1))
        self.register_buffer("ease_signed", torch.zeros(ease_items + 1, ease_items + 1))
        self.head: Optional[TreeHead] = None  # not a buffer: dtype casts (bf16 engines) must not touch thresholds
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

    def neighbour_features(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        """(B, NUM_NEIGHBOUR_FEATURES): the history's items against the candidate's neighbour list."""
        if self.neighbours == 0:
            return torch.zeros(len(cand_rows), NUM_NEIGHBOUR_FEATURES, dtype=hist_rating.dtype, device=hist_rating.device)
        known = hist_present * (hist_rows != UNKNOWN).float()
        s = _list_lookup(self.nbr_rows[cand_rows], self.nbr_sims[cand_rows], hist_rows).to(known.dtype) * known
        return _similarity_features(s, known, hist_present, hist_liked, hist_rating, hist_rated)

    def text_features(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        """(B, NUM_TEXT_FEATURES): the same four features with s(cand, j) = the cosine of the two items' text
        vectors -- content similarity, where the neighbour lists need co-ratings. Zero without vectors."""
        if self.text_dim == 0:
            return torch.zeros(len(cand_rows), NUM_TEXT_FEATURES, dtype=hist_rating.dtype, device=hist_rating.device)
        cand = self.item_text[cand_rows]
        known = hist_present * (hist_rows != UNKNOWN).float() * (cand.abs().sum(-1, keepdim=True) > 0)
        s = torch.einsum("bhd,bd->bh", self.item_text[hist_rows], cand).to(hist_rating.dtype) * known
        return _similarity_features(s, known, hist_present, hist_liked, hist_rating, hist_rated)

    def ease_features(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        """(B, NUM_EASE_FEATURES): the EASE scores of the candidate from the history -- sum_j B_rated[j, cand] over
        the history items, sum_j centred_j * B_signed[j, cand] (centred_j as in the neighbour score) and
        sum_j (+1 liked / -1 not) * B_rated[j, cand]. Zero for items outside the matrices."""
        known = hist_present * (hist_rows != UNKNOWN).float()
        at = (self.ease_pos[hist_rows], self.ease_pos[cand_rows].unsqueeze(-1).expand_as(hist_rows))
        rated, signed = self.ease_rated[at] * known, self.ease_signed[at] * known  # (B, H)
        centred = _centred(hist_present, hist_liked, hist_rating, hist_rated)
        return torch.stack([rated.sum(-1), (signed * centred).sum(-1), (rated * (2 * hist_liked - 1)).sum(-1)], -1)

    def forward(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated, stats_rows=None):
        """The tree head's logit when there is one (fit_collab's default), else the linear one. stats_rows: the rows
        whose statistics, neighbour lists and tables describe the candidate (None: cand_rows); zeros ask "what if
        the candidate had no events yet" -- its text vector still speaks (the fusion's held-out twins)."""
        if self.head is not None:
            x = self.head_features(cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated, stats_rows)
            return self.head(x[:, : self.head.num_features]).to(x.dtype)  # a head from before the text / EASE features
        return self.linear_logit(cand_rows if stats_rows is None else stats_rows, hist_rows, hist_present, hist_liked,
                                 hist_rating, hist_rated)

    def seen(self, rows) -> torch.Tensor:
        """Per row: did the training rows hold an event of the item? Row 0 (unknown) and a catalogue item that
        only has its text vector (model.collab_tables) have not."""
        return self.item_logcount[rows] > 0

    def linear_logit(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated):
        """mu + b[cand] + <u, E[cand]> + w . f: what the tables learn, and what retrieval factorises."""
        u, f = self.user_side(hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        g = self.neighbour_features(cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        f = torch.cat([f, g, self.item_logcount[cand_rows].unsqueeze(-1)], dim=-1)
        return (self.mu + self.item_bias(cand_rows).squeeze(-1) + (u * self.cand(cand_rows)).sum(-1)
                + self.user_features(f).squeeze(-1))

    def head_features(self, cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated, stats_rows=None):
        """(B, len(HEAD_FEATURES)) float32: the history's statistics, the candidate's (from the buffers of
        `stats_rows`, default cand_rows), the history against the candidate's neighbour list and against its text.
        Ratings are centred (ids.HistoryArrays)."""
        stats = cand_rows if stats_rows is None else stats_rows
        n = hist_present.sum(-1)
        rated = hist_rated * hist_present
        n_rated = rated.sum(-1)
        mean = torch.where(n_rated > 0, (hist_rating * rated).sum(-1) / n_rated.clamp(min=1.0), self.global_rating)
        centred = (hist_rating - mean.unsqueeze(-1)) * rated
        std = torch.sqrt((centred * centred).sum(-1) / n_rated.clamp(min=1.0))
        like_rate = ((hist_liked * hist_present).sum(-1) + 2.2) / (n + 4.0)
        last5 = ((hist_rating * rated)[:, :5].sum(-1) / rated[:, :5].sum(-1).clamp(min=1.0) - mean) * (rated[:, :5].sum(-1) > 0)
        last = (hist_rating * rated)[:, 0] if hist_rating.shape[1] else torch.zeros_like(n)
        known = rated * (hist_rows != UNKNOWN).float()
        rating_dev = ((hist_rating - self.item_mean[hist_rows]) * known).sum(-1) / (known.sum(-1) + 1.0)
        item_mean = self.item_mean[stats]
        g = self.neighbour_features(stats, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        t = self.text_features(cand_rows, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        e = self.ease_features(stats, hist_rows, hist_present, hist_liked, hist_rating, hist_rated)
        x = torch.stack([torch.log1p(n), like_rate, mean, std, last5, last, rating_dev, self.item_logcount[stats],
                         self.item_like_rate[stats], item_mean, self.item_std[stats], item_mean + rating_dev], -1)
        return torch.cat([x, g, t, e.to(x.dtype)], -1).float()

    def set_item_statistics(self, cand_rows: torch.Tensor, hist_rows: torch.Tensor, hist_rating: torch.Tensor,
                            hist_rated: torch.Tensor, smoothing: float = 5.0, users: Optional[np.ndarray] = None,
                            labels: Optional[torch.Tensor] = None, ease_items: int = 0, ease_l2: float = 500.0) -> None:
        """Item mean ratings and their spread (from the ratings seen in histories) and candidate counts of the
        training rows; with `labels`, the items' like rates; with `users` (one code per row) too, each item's
        neighbour list and, with ease_items > 0, the EASE matrices of the ease_items items with most users."""
        if self.neighbours and users is not None:
            rows, sims = item_neighbours(np.asarray(users), cand_rows.numpy(), labels.numpy(), self.num_items, self.neighbours)
            self.nbr_rows.copy_(torch.from_numpy(rows))
            self.nbr_sims.copy_(torch.from_numpy(sims))
        if users is not None:  # recomputed by every fit, like the neighbour lists (ease_items 0: none)
            pos, rated_w, signed_w = ease_weights(np.asarray(users), cand_rows.numpy(), labels.numpy(), self.num_items,
                                                  ease_items, ease_l2)
            self.ease_items = len(rated_w) - 1
            self.ease_pos = torch.from_numpy(pos)  # buffers of a new size: assignment replaces the registered ones
            self.ease_rated, self.ease_signed = torch.from_numpy(rated_w), torch.from_numpy(signed_w)
        size = self.num_items + 1
        rated = (hist_rated > 0) & (hist_rows != UNKNOWN)
        total = torch.zeros(size).index_add_(0, hist_rows[rated], hist_rating[rated].float())
        count = torch.zeros(size).index_add_(0, hist_rows[rated], torch.ones(int(rated.sum())))
        self.item_rating.copy_(total / (count + smoothing))
        if users is not None:  # one rating per (user, item) for the head's statistics: a user's event sits in many rows' histories
            codes = torch.from_numpy(np.unique(np.asarray(users), return_inverse=True)[1].astype(np.int64))
            keys = (codes.unsqueeze(-1).expand_as(hist_rows)[rated] * size + hist_rows[rated]).numpy()
            first = torch.from_numpy(np.unique(keys, return_index=True)[1])
            items, values = hist_rows[rated][first], hist_rating[rated].float()[first]
            total = torch.zeros(size).index_add_(0, items, values)
            count = torch.zeros(size).index_add_(0, items, torch.ones(len(items)))
        else:
            values = hist_rating[rated].float()
        cand_count = torch.bincount(cand_rows, minlength=size)[:size].float()
        self.item_logcount.copy_(torch.log1p(cand_count))
        overall = float(values.mean()) if len(values) else 0.0
        self.global_rating.fill_(overall)
        self.item_mean.copy_((total + ITEM_PRIOR * overall) / (count + ITEM_PRIOR))
        squares = torch.zeros(size).index_add_(0, items if users is not None else hist_rows[rated], values * values)
        raw_mean = total / count.clamp(min=1.0)
        self.item_std.copy_(torch.sqrt((squares / count.clamp(min=1.0) - raw_mean * raw_mean).clamp(min=0.0)))
        if labels is not None:
            y = labels.float()
            liked = torch.zeros(size).index_add_(0, cand_rows, y)
            prior = float(y.mean()) if len(y) else 0.0
            self.item_like_rate.copy_((liked + ITEM_PRIOR * prior) / (cand_count + ITEM_PRIOR))
        # Row 0 (unknown) describes an item without events like any such row: the prior like rate and mean rating.
        # The head learnt those values on items first seen after its statistics' cut, never zeros. Row 0's rating
        # (a history statistic) stays 0; history terms mask unknown rows anyway.
        self.item_rating[UNKNOWN], self.item_logcount[UNKNOWN], self.item_std[UNKNOWN] = 0.0, 0.0, 0.0
        self.item_mean[UNKNOWN] = overall
        if labels is not None:
            self.item_like_rate[UNKNOWN] = prior

    def rows_without_text(self) -> np.ndarray:
        """Known rows (>= 1) that have no text vector yet (new ids since the last fill); none without text_dim."""
        if self.text_dim == 0:
            return np.zeros(0, np.int64)
        return (torch.nonzero(self.item_text[1:].abs().sum(-1) == 0).squeeze(-1) + 1).numpy()

    def set_text_vectors(self, rows: np.ndarray, vectors: torch.Tensor) -> None:
        """Stores the unit vectors (len(rows), text_dim) of those rows' texts."""
        with torch.no_grad():
            self.item_text[torch.as_tensor(rows, dtype=torch.long)] = vectors.to(self.item_text.dtype)

    def grown(self, num_items: int, neighbours: Optional[int] = None, text_dim: Optional[int] = None) -> "CollabNet":
        """A copy with tables for `num_items` ids: old rows kept; new rows start with zero tables, no neighbours, no
        text vector, and row 0's statistics (the unknown item's: those of an item without events) -- what a fit
        gives a catalogue item without events, so a copy grown between rounds (model.grow_catalog) scores a new item
        like a round would.
        `neighbours`: the new list length (the lists are recomputed by every fit; None keeps this one's); `text_dim`:
        the text vectors' size (None keeps this one's; another size starts every row without a vector)."""
        assert num_items >= self.num_items, (num_items, self.num_items)
        neighbours = self.neighbours if neighbours is None else neighbours
        out = CollabNet(num_items, self.dim, neighbours=neighbours, text_dim=self.text_dim if text_dim is None else text_dim,
                        ease_items=self.ease_items)
        state = self.state_dict()
        statistics = ("item_rating", "item_logcount", "item_like_rate", "item_mean", "item_std")
        with torch.no_grad():
            for name, tensor in out.state_dict().items():
                old = state[name]
                if tensor.shape == old.shape:  # not per item (mu, the feature weights, global_rating), or no new ids
                    tensor.copy_(old)
                elif tensor.shape[1:] != old.shape[1:]:  # neighbour lists or text vectors of another size
                    tensor.zero_()
                else:  # per item: the known rows, then row 0's statistics, or zeros (tables, neighbours, text, EASE)
                    tensor.copy_(old[UNKNOWN].expand_as(tensor) if name in statistics else torch.zeros_like(tensor))
                    tensor[: old.shape[0]].copy_(old)
        out.head = self.head  # read-only; every fit replaces it
        return out

    def regulariser(self, cand_rows, hist_rows) -> torch.Tensor:
        """L2 on the rows a batch touched (sparse-friendly; unknown rows are zero anyway)."""
        return (self.cand(cand_rows).pow(2).sum(-1).mean() + self.item_bias(cand_rows).pow(2).mean()
                + self.hist_liked(hist_rows).pow(2).sum(-1).mean() + self.hist_disliked(hist_rows).pow(2).sum(-1).mean())


class TreeHead:
    """Gradient-boosted trees (fitted by LightGBM in `fit_tree_head`) evaluated with torch gathers, so scoring
    needs no LightGBM and a version's tables and trees load, save and swap together. Node arrays (trees, nodes):
    a split sends x[feature] <= threshold to `left`, else to `right`; a leaf points to itself and holds `value`.
    __call__(x (B, F)) -> (B,) the raw score (log-odds), float64."""

    KEYS = ("feature", "threshold", "left", "right", "value")

    def __init__(self, feature, threshold, left, right, value, num_features: int):
        self.feature, self.threshold, self.left, self.right, self.value = feature, threshold, left, right, value
        self.num_features = num_features
        if self.feature.numel() and not 0 <= int(self.feature.min()) <= int(self.feature.max()) < num_features:
            raise ValueError(f"tree head: a split reads a feature outside 0..{num_features - 1}")
        self.depth = self._depth()

    @classmethod
    def from_lightgbm(cls, dump: dict) -> "TreeHead":
        """From `Booster.dump_model()`: numerical splits only (no categorical features, no missing values)."""
        trees = []
        for info in dump["tree_info"]:
            nodes: list[tuple] = []

            def walk(node: dict) -> int:
                i = len(nodes)
                nodes.append(())
                if "leaf_value" in node:
                    nodes[i] = (0, 0.0, i, i, float(node["leaf_value"]))
                    return i
                if node["decision_type"] != "<=" or node.get("missing_type", "None") != "None":
                    raise ValueError(f"tree split {node['decision_type']} / missing {node.get('missing_type')}: "
                                     "the head supports numerical '<=' splits without missing values")
                nodes[i] = (int(node["split_feature"]), float(node["threshold"]), walk(node["left_child"]),
                            walk(node["right_child"]), 0.0)
                return i

            walk(info["tree_structure"])
            trees.append(nodes)
        width = max((len(t) for t in trees), default=1)
        arrays = {k: np.zeros((len(trees), width), np.float64 if k in ("threshold", "value") else np.int64)
                  for k in cls.KEYS}
        arrays["left"][:] = arrays["right"][:] = np.arange(width)  # padding: unreachable self-loops
        for t, nodes in enumerate(trees):
            for i, node in enumerate(nodes):
                for k, v in zip(cls.KEYS, node):
                    arrays[k][t, i] = v
        return cls(*(torch.from_numpy(arrays[k]) for k in cls.KEYS), num_features=len(dump["feature_names"]))

    def _depth(self) -> int:
        """Longest root-to-leaf path: the number of gather steps a batch needs."""
        left, right = self.left.numpy(), self.right.numpy()
        deepest = 0
        for t in range(left.shape[0]):
            stack = [(0, 0)]
            while stack:
                i, d = stack.pop()
                if left[t, i] == i and right[t, i] == i:
                    deepest = max(deepest, d)
                elif d >= left.shape[1] or left[t, i] <= i or right[t, i] <= i:  # children come after their parent
                    raise ValueError(f"tree head: tree {t} node {i} does not lead to a leaf")
                else:
                    stack += [(int(left[t, i]), d + 1), (int(right[t, i]), d + 1)]
        return deepest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"tree head expects {self.num_features} features, got {x.shape[-1]}")
        p = {k: getattr(self, k).to(x.device) for k in self.KEYS}
        x = x.double()
        trees = torch.arange(p["feature"].shape[0], device=x.device).expand(len(x), -1)
        node = torch.zeros_like(trees)
        for _ in range(self.depth):
            go_left = x.gather(1, p["feature"][trees, node]) <= p["threshold"][trees, node]
            node = torch.where(go_left, p["left"][trees, node], p["right"][trees, node])
        return p["value"][trees, node].sum(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": getattr(self, k).contiguous() for k in self.KEYS}

    @classmethod
    def from_tensors(cls, tensors: dict, num_features: int) -> "TreeHead":
        return cls(*(tensors[f"head.{k}"] for k in cls.KEYS), num_features=num_features)


def item_neighbours(users: np.ndarray, rows: np.ndarray, labels: np.ndarray, num_items: int,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's k most similar items: ((num_items + 1, k) rows, (num_items + 1, k) similarities, best first;
    unused slots are row 0 with similarity 0; only positive similarities are kept). Similarity: cosine of the items'
    user-centred labels over the users who have both, times co-count / (co-count + SHRINK). One (user, item) pair
    counts once (its mean label). Sparse products: time and memory O(co-rated item pairs), a second for
    MovieLens-100K's 1,682 items or a 92,000-product grocery catalogue."""
    size = num_items + 1
    item, user, centred = _user_item_pairs(users, rows, labels)
    out_rows, out_sims = np.zeros((size, k), np.int64), np.zeros((size, k), np.float32)
    if k == 0 or len(item) == 0:
        return out_rows, out_sims
    a, b, co = _gram(item, user, np.ones(len(item)), size)  # every pair with a common user
    a2, b2, part = _gram(item, user, centred, size)  # the same pairs, or fewer where the product dropped exact zeros
    num = np.zeros(len(a))
    num[np.searchsorted(a * size + b, a2 * size + b2)] = part  # both sorted by (a, b)
    norm = np.sqrt(np.bincount(item, centred ** 2, size))
    sim = num / (norm[a] * norm[b] + 1e-9) * co / (co + SHRINK)
    ok = (a != b) & (sim > 0)
    a, b, sim = a[ok], b[ok], sim[ok]
    order = np.lexsort((-sim, a))  # by item, most similar first
    a, b, sim = a[order], b[order], sim[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a)  # position within the item's own list
    top = rank < k
    out_rows[a[top], rank[top]] = b[top]
    out_sims[a[top], rank[top]] = sim[top]
    return out_rows, out_sims


def _user_item_pairs(users: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item row, user code, label - the user's mean label) per distinct (user, known item) pair; a pair's label is the
    mean of its rows'."""
    users = np.unique(np.asarray(users), return_inverse=True)[1].astype(np.int64)
    num_users = int(users.max(initial=0)) + 1
    rows, labels = np.asarray(rows, np.int64), np.asarray(labels, np.float64)
    pair, inverse = np.unique(rows * num_users + users, return_inverse=True)
    value = np.bincount(inverse, labels) / np.bincount(inverse)
    item, user = pair // num_users, pair % num_users
    keep = item != UNKNOWN
    item, user, value = item[keep], user[keep], value[keep]
    centred = value - (np.bincount(user, value, num_users) / np.maximum(np.bincount(user, minlength=num_users), 1))[user]
    return item, user, centred


def _gram(item: np.ndarray, user: np.ndarray, values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, sum over users of v[a, u] * v[b, u]) for every item pair (a, b) with a common user, sorted by (a, b);
    v[item, user] = values, items < size."""
    m = torch.sparse_coo_tensor(torch.from_numpy(np.stack([item, user])), torch.from_numpy(values),
                                (size, int(user.max(initial=0)) + 1), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch routes sparse @ sparse through its beta CSR kernels
        warnings.simplefilter("ignore", UserWarning)
        g = torch.sparse.mm(m, m.t().coalesce()).coalesce()
    a, b = g.indices().numpy()
    return a, b, g.values().numpy()


def ease_weights(users: np.ndarray, rows: np.ndarray, labels: np.ndarray, num_items: int, max_items: int,
                 l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", 2019) over the `max_items` items with most
    users: B = argmin ||X - X B||^2 + l2 ||B||^2 with diag(B) = 0, in closed form: P = (X^T X + l2 I)^-1,
    B[i, j] = -P[i, j] / P[j, j]. Two of them: X = which items each user has (B_rated), and X = the user-centred
    labels (B_signed, the pairs of item_neighbours). Returns (positions (num_items + 1,): an item row's index in
    the matrices, 0 = not in them; B_rated, B_signed, each (m + 1, m + 1) float32 with a zero row and column 0).
    Time O(m^3): about 2 s for both of MovieLens' (1,682 items) on 2 cores; memory m^2 floats per matrix."""
    size = num_items + 1
    if max_items <= 0:  # off (and the statistics fit_collab does not keep): no pairs to gather
        return np.zeros(size, np.int64), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)
    item, user, centred = _user_item_pairs(users, rows, labels)
    count = np.bincount(item, minlength=size)
    count[UNKNOWN] = 0
    chosen = np.argsort(-count, kind="stable")[:max_items]
    chosen = np.sort(chosen[count[chosen] > 0])
    m = len(chosen)
    pos = np.zeros(size, np.int64)
    pos[chosen] = np.arange(1, m + 1)
    out = []
    keep = pos[item] > 0
    for values in (np.ones(int(keep.sum())), centred[keep]):
        gram = np.zeros((m + 1, m + 1))
        if m:
            a, b, v = _gram(pos[item[keep]], user[keep], values, m + 1)
            gram[a, b] = v
        gram = gram[1:, 1:] + l2 * np.eye(m)
        p = np.linalg.inv(gram)
        weights = np.zeros((m + 1, m + 1), np.float32)
        weights[1:, 1:] = -p / np.diag(p)[None, :]
        np.fill_diagonal(weights, 0.0)
        out.append(weights)
    return pos, out[0], out[1]


def _centred(hist_present, hist_liked, hist_rating, hist_rated):
    """(B, H): rating_j - the history's mean rating, or label_j - the history's like rate for an unrated event."""
    n = hist_present.sum(-1, keepdim=True)
    like_rate = (hist_liked * hist_present).sum(-1, keepdim=True) / n.clamp(min=1.0)
    mean_rating = (hist_rating * hist_rated).sum(-1, keepdim=True) / hist_rated.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.where(hist_rated > 0, hist_rating - mean_rating, hist_liked - like_rate)


def _list_lookup(rows: torch.Tensor, sims: torch.Tensor, hist_rows: torch.Tensor) -> torch.Tensor:
    """(B, H): sims[b, k] where rows[b, k] == hist_rows[b, h], else 0 -- each history item's similarity in the
    candidate's neighbour list (rows, sims: (B, K); an item appears at most once in a list, unused slots are row 0
    with similarity 0). A binary search in each list sorted by row: O(B H log K) time and no (B, H, K) tensor, where
    comparing every history item with every slot is O(B H K)."""
    if rows.shape[-1] == 0:
        return torch.zeros(hist_rows.shape, dtype=sims.dtype, device=sims.device)
    rows, order = rows.sort(-1)
    sims = sims.gather(-1, order)
    hist_rows = hist_rows.contiguous()
    pos = torch.searchsorted(rows, hist_rows).clamp(max=rows.shape[-1] - 1)
    return torch.where(rows.gather(-1, pos) == hist_rows, sims.gather(-1, pos), sims.new_zeros(()))


def _masked_mean(x, mask):
    """x (B, H, D), mask (B, H) -> (B, D); zero where the mask is empty."""
    return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def _similarity_features(s, known, hist_present, hist_liked, hist_rating, hist_rated):
    """(B, 4) from s (B, H), the candidate's similarity to each history item (0 where unknown): the weighted mean of
    the history's centred ratings (centred_j = rating_j - the history's mean rating, or label_j - like rate for an
    unrated event), the largest similarity to a liked item and to a not-liked one, and the mean similarity."""
    n = hist_present.sum(-1, keepdim=True)
    centred = _centred(hist_present, hist_liked, hist_rating, hist_rated)
    score = (s * centred).sum(-1) / (s.abs().sum(-1) + 1e-3)
    max_liked = (s * hist_liked * known).max(-1).values.clamp(min=0.0)
    max_disliked = (s * (1 - hist_liked) * known).max(-1).values.clamp(min=0.0)
    return torch.stack([score, max_liked, max_disliked, s.sum(-1) / n.squeeze(-1).clamp(min=1.0)], dim=-1)


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
    head_rows: int = 0  # rows the tree head learned from (0: no head, the linear sum scores)


def fit_collab(net: CollabNet, cand_rows: np.ndarray, hist: HistoryArrays, labels: np.ndarray, *, epochs: int = 8,
               batch_size: int = 1024, lr: float = 0.01, l2: float = 1e-4, seed: int = 0,
               val_fraction: float = 0.0, users: Optional[np.ndarray] = None, head_fraction: float = 0.0,
               head_trees: int = 400, head_leaves: int = 15, head_min_rows: int = 1000, ease_items: int = 0,
               ease_l2: float = 500.0) -> FitReport:
    """Mini-batch Adam on BCE (in place). Rows are in time order; with val_fraction > 0 the latest rows first
    choose the number of epochs (early stopping on their loss: the first epoch that does not improve it ends the
    choice), then the tables are fitted on every row for that many epochs from the same start -- the newest rows
    matter most for the next period.
    users: the user of each row (any hashable ids), for the neighbour lists (net.neighbours > 0).
    head_fraction > 0: then the tree head (fit_tree_head) learns from the newest head_fraction of the rows.
    ease_items > 0 (with users): the EASE matrices of that many items (ease_weights, L2 ease_l2), read by the head."""
    started = time.time()
    net.head = None  # the tables learn the linear logit; a warm start's old head is replaced below
    tensors = batch_tensors(cand_rows, hist)
    y = torch.tensor(np.asarray(labels, np.float32))
    users = None if users is None else np.asarray(users)
    n = len(y)
    n_val = int(n * val_fraction) if epochs > 1 else 0

    def statistics(rows: slice, final: bool) -> None:
        """The EASE matrices only for the statistics that are kept: the linear sum, all that the epochs train and
        choose on, does not read them (a second apiece for MovieLens)."""
        with torch.no_grad():
            net.set_item_statistics(tensors["cand_rows"][rows], tensors["hist_rows"][rows],
                                    tensors["hist_rating"][rows], tensors["hist_rated"][rows],
                                    users=None if users is None else users[rows], labels=y[rows],
                                    ease_items=ease_items if final else 0, ease_l2=ease_l2)

    statistics(slice(0, n - n_val), final=n_val == 0)  # the held-out rows stay unseen while choosing
    chosen = epochs
    if n_val:
        start = copy.deepcopy(net.state_dict())
        val = {k: v[n - n_val:] for k, v in tensors.items()}
        losses = []
        for loss in _epochs(net, {k: v[:n - n_val] for k, v in tensors.items()}, y[:n - n_val], epochs, batch_size, lr, l2, seed):
            with torch.no_grad():
                net.eval()
                losses.append(nn.functional.binary_cross_entropy_with_logits(net(**val), y[n - n_val:]).item())
                net.train()
            if len(losses) > 1 and losses[-1] >= min(losses[:-1]):
                break  # past the best epoch: the four validation weeks' fresh fits chose what running all of them
                # chose (collab_ablation.py --validation "model.collab.head_fraction=0", the same AUCs)
        chosen = int(np.argmin(losses)) + 1
        net.load_state_dict(start)
        statistics(slice(0, n), final=True)
    loss_value = float("nan")
    for loss_value in _epochs(net, tensors, y, chosen, batch_size, lr, l2, seed):
        pass
    net.eval()
    head_rows = 0
    if head_fraction > 0:
        net.head, head_rows = fit_tree_head(net, tensors, y, users, head_fraction, head_trees, head_leaves,
                                            head_min_rows, seed, ease_items, ease_l2)
    return FitReport(n, chosen, time.time() - started, loss_value, head_rows)


def head_examples(net: CollabNet, tensors: dict, y: torch.Tensor, users: Optional[np.ndarray], k: int,
                  ease_items: int = 0, ease_l2: float = 500.0) -> np.ndarray:
    """The head's features of rows [k, n), read against statistics of rows [0, k) alone (a copy of `net`)."""
    snap = copy.deepcopy(net)
    with torch.no_grad():
        snap.set_item_statistics(tensors["cand_rows"][:k], tensors["hist_rows"][:k], tensors["hist_rating"][:k],
                                 tensors["hist_rated"][:k], users=None if users is None else users[:k], labels=y[:k],
                                 ease_items=ease_items, ease_l2=ease_l2)
        chunk = 2048  # each chunk gathers chunk x history x text_dim floats (~315 MB for MiniLM, 100 history items)
        return torch.cat([snap.head_features(**{key: v[i:i + chunk] for key, v in tensors.items()})
                          for i in range(k, len(y), chunk)]).numpy()


def fit_tree_head(net: CollabNet, tensors: dict, y: torch.Tensor, users: Optional[np.ndarray], fraction: float,
                  trees: int, leaves: int, min_rows: int, seed: int = 0, ease_items: int = 0,
                  ease_l2: float = 500.0) -> tuple[Optional[TreeHead], int]:
    """(gradient-boosted trees on head_features, the rows they learned from), or (None, 0) when fewer than
    `min_rows` rows (or one label) would teach them. Time-respecting: the newest `fraction` of the rows are the
    examples, and the statistics they read (item rates, means, neighbour lists) come from the older rows alone, as a
    served request reads statistics of the past only. Statistics that counted an example's own label make the trees
    trust them too much (benchmarks/gbdt_probe.py --leaky: 0.754 against 0.776 pooled AUC). At serving the head
    reads `net`'s statistics, which fit_collab computes on every row."""
    n = len(y)
    k = n - int(n * fraction)  # the snapshot: rows [0, k)
    if n - k < min_rows or k == 0 or len(torch.unique(y[k:])) < 2:
        return None, 0
    import lightgbm as lgb  # training only: the head scores in torch

    x = head_examples(net, tensors, y, users, k, ease_items, ease_l2)
    params = dict(objective="binary", learning_rate=0.03, num_leaves=leaves, min_data_in_leaf=50, bagging_fraction=0.8,
                  bagging_freq=1, feature_fraction=0.8, lambda_l2=1.0, use_missing=False, deterministic=True,
                  force_row_wise=True, num_threads=max(1, torch.get_num_threads()), seed=seed, verbose=-1)
    data = lgb.Dataset(x, y[k:].numpy(), feature_name=list(HEAD_FEATURES), params={"verbose": -1})
    booster = lgb.train(params, data, num_boost_round=trees)
    return TreeHead.from_lightgbm(booster.dump_model()), n - k


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


def predict_logits(net: CollabNet, cand_rows: np.ndarray, hist: HistoryArrays, batch_size: int = 2048) -> np.ndarray:
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
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    if net.head is not None:
        tensors.update(net.head.tensors())
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / VOCAB_FILE).write_text(json.dumps({"dim": net.dim, "neighbours": net.neighbours, "text_dim": net.text_dim,
                                                  "ease_items": net.ease_items,
                                                  "head_features": list(HEAD_FEATURES) if net.head else [],
                                                  "item_ids": vocab.ids}))


def load_collab(model_dir: str | Path) -> tuple[CollabNet, ItemVocab]:
    """ValueError naming the file and the problem when the tables are missing or inconsistent."""
    model_dir = Path(model_dir)
    for f in (WEIGHTS_FILE, VOCAB_FILE):
        if not (model_dir / f).is_file():
            raise ValueError(f"model export {model_dir} has no {f}: not a hybrid export (llmrec_ray.model.save_export)")
    try:
        meta = json.loads((model_dir / VOCAB_FILE).read_text())
        vocab = ItemVocab(meta["item_ids"])
        net = CollabNet(len(vocab), int(meta["dim"]), neighbours=int(meta.get("neighbours", 0)),
                        text_dim=int(meta.get("text_dim", 0)), ease_items=int(meta.get("ease_items", 0)))
        tensors = load_file(str(model_dir / WEIGHTS_FILE))
        head = {k: tensors.pop(k) for k in list(tensors) if k.startswith("head.")}
        net.load_state_dict(_upgraded(tensors, net))
        if meta.get("head_features"):
            names = list(meta["head_features"])
            if names != list(HEAD_FEATURES[: len(names)]):  # a head from before the text or EASE features reads a prefix
                raise ValueError(f"its tree head reads features {names}, this code computes "
                                 f"{list(HEAD_FEATURES)}; refit the tables (a new round) with this version")
            net.head = TreeHead.from_tensors(head, len(names))
    except Exception as exc:  # truncated file, wrong shapes, bad JSON: one clear error
        raise ValueError(f"collaborative tables in {model_dir} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if len(vocab) != len(set(vocab.ids)):
        raise ValueError(f"{model_dir / VOCAB_FILE} lists an item id twice; re-export the model")
    return net.eval(), vocab


def _upgraded(state: dict, net: CollabNet) -> dict:
    """Tables saved before the neighbour terms (7 feature weights, no neighbour lists) load with those terms
    weighted zero: the same scores as before. Tables saved before the tree head lack its item statistics (unused
    without a head), tables saved before the text features their vectors (text_dim 0), tables saved before the EASE
    features their matrices (ease_items 0: the features are zero, and an older head does not read them)."""
    for name in ("item_like_rate", "item_mean", "item_std", "global_rating", "item_text", "ease_pos", "ease_rated",
                 "ease_signed"):
        state.setdefault(name, getattr(net, name))
    w = state.get("user_features.weight")
    if w is not None and w.shape[1] == NUM_FEATURES - NUM_NEIGHBOUR_FEATURES:
        zeros = torch.zeros(w.shape[0], NUM_NEIGHBOUR_FEATURES, dtype=w.dtype)
        state = {**state, "user_features.weight": torch.cat([w[:, :NUM_HISTORY_FEATURES], zeros, w[:, NUM_HISTORY_FEATURES:]], 1)}
        state.setdefault("nbr_rows", net.nbr_rows)
        state.setdefault("nbr_sims", net.nbr_sims)
    return state


def warm_start(previous: Optional[tuple[CollabNet, ItemVocab]], item_ids: Iterable[str], dim: int,
               neighbours: int = 0, text_dim: int = 0) -> tuple[CollabNet, ItemVocab]:
    """The tables a round starts from: the promoted version's, grown by the ids it has not seen; or fresh ones.
    Text vectors stay with their rows; new rows have none until model.fill_text_vectors."""
    if previous is None:
        vocab = ItemVocab(sorted(set(map(str, item_ids))))
        return CollabNet(len(vocab), dim, neighbours=neighbours, text_dim=text_dim), vocab
    net, vocab = previous
    grown = vocab.grow(sorted(set(map(str, item_ids)) - set(vocab.index)))
    return net.grown(len(grown), neighbours, text_dim), grown

