"""Retrieval, the first of the two stages of /v1/recommend: the catalogue's best N items for a user by inner product,
which the full scorer then reranks.

What an inner product ranks exactly: for one user, the hybrid's collaborative logit (llmrec_ray/collab.py)

    mu + b[i] + <u, E[i]> + w[:6] . f(history) + w[6:10] . g(history, i) + w[10] * logcount[i] + bias
  = <[u, 1], [E[i], b[i] + w[10] * logcount[i]]>  +  w[6:10] . g(history, i)  +  (terms of the user alone)

so ranking items by the factorised part is a maximum inner product search with the item vector
[E[i], b[i] + w[10] * logcount[i]] (dim + 1 floats) against the user vector [u, 1], u read from the request's history.
The neighbour terms g (the history against item i's neighbour list) do not factorise: `shortlist_ids` adds them to the
search's scores for every item they can lift (the items whose lists hold a history item, `listed_by`), so the
shortlist is the exact top-n of the collaborative part's linear sum. The tree head (the collaborative part's default
scorer, which does not factorise at all) and the text part act in the rerank.

Items the tables hold no event of (new catalogue items) get a vector from their text; how, and how an index is
built, saved and loaded per version: llmrec_ray/item_index.py. `ItemIndex.add_items` indexes items that appear after
the index was built through the ItemSource and TextProjection it was given: no retrain.

Search is exact (torch matrix-vector product + top-k): over 1,000,000 items of 17 floats it takes a few ms on one
core (benchmarks/bench_retrieval.py), far under the 50 ms target, so no ANN library is kept. Pure numpy + torch: no
Ray here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from llmrec_ray.collab import NUM_HISTORY_FEATURES, NUM_NEIGHBOUR_FEATURES, CollabNet
from llmrec_ray.ids import UNKNOWN, history_arrays

if TYPE_CHECKING:  # item_index imports this module; the index only calls what it is given
    from llmrec_ray.item_index import ItemSource, TextProjection

SMALL_POOL_SHARE = 64  # a pool of at most 1/64 of the items is scored alone; larger ones are columns of a full pass


# --- vectors from the model -------------------------------------------------------------------------------
def item_table_vectors(collab: CollabNet) -> np.ndarray:
    """(num_items + 1, dim + 1) float32: [E[row], b[row] + w_count * logcount[row]]; row 0 (unknown) is zero."""
    with torch.no_grad():
        w_count = collab.user_features.weight[0, -1]  # the candidate's log count is the last feature
        extra = collab.item_bias.weight[:, 0] + w_count * collab.item_logcount
        out = torch.cat([collab.cand.weight, extra.unsqueeze(-1)], dim=-1).float().numpy().copy()
    out[UNKNOWN] = 0.0
    return out


def user_vectors(model, cfg, histories: Sequence[Sequence[str]], ratings: Optional[Sequence[Sequence[float]]] = None,
                 labels: Optional[Sequence[Sequence[float]]] = None) -> np.ndarray:
    """(B, dim + 1) float32 [u, 1] per history (item ids newest first; ratings NaN/None = none; labels NaN or an empty
    list = derived from the rating). `model`: a hybrid HybridScorer; `cfg`: its Config (history length, threshold)."""
    require_hybrid(model)
    b = len(histories)
    ratings = [[np.nan] * len(h) for h in histories] if ratings is None else [
        [np.nan if r is None else float(r) for r in rs] for rs in ratings]
    labels = [[] for _ in range(b)] if labels is None else labels
    if len(ratings) != b or len(labels) != b:
        raise ValueError(f"user_vectors: {b} histories but {len(ratings)} rating lists and {len(labels)} label lists")
    hist = history_arrays(model.vocab, histories, ratings, labels, max(1, cfg.model.collab.history_len),
                          cfg.data.like_threshold)
    with torch.inference_mode():
        u, _ = model.collab.user_side(**{k: torch.from_numpy(v) for k, v in hist.as_dict().items()})
    return np.concatenate([u.float().numpy(), np.ones((b, 1), np.float32)], axis=1)


def neighbour_lift(model, cfg, history: Sequence[str], ratings: Sequence[Optional[float]]) -> dict[str, float]:
    """{item id: w . g(history, item)}: what the neighbour terms add to the collaborative logit, for every item whose
    neighbour list holds a history item (for any other item they are zero). Empty for tables without neighbour lists."""
    require_hybrid(model)
    collab = model.collab
    if collab.neighbours == 0 or not history:
        return {}
    hist = history_arrays(model.vocab, [list(history)], [[np.nan if r is None else float(r) for r in ratings]], [[]],
                          max(1, cfg.model.collab.history_len), cfg.data.like_threshold)
    rows = hist.rows[0][hist.rows[0] != UNKNOWN]
    owners, starts = listed_by(collab)
    cand = np.setdiff1d(np.concatenate([owners[starts[r]:starts[r + 1]] for r in rows] or [np.zeros(0, np.int64)]),
                        [UNKNOWN, *rows])
    if len(cand) == 0:
        return {}
    t = {k: torch.from_numpy(v).expand(len(cand), -1) for k, v in hist.as_dict().items()}
    w = collab.user_features.weight[0, NUM_HISTORY_FEATURES:NUM_HISTORY_FEATURES + NUM_NEIGHBOUR_FEATURES]
    with torch.inference_mode():
        lift = collab.neighbour_features(torch.from_numpy(cand), **t) @ w
    return {model.vocab.ids[r - 1]: float(x) for r, x in zip(cand, lift)}


def listed_by(collab: CollabNet) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour lists turned round: the items whose lists hold row r are listed_by[starts[r]:starts[r + 1]].
    Built once per table (O(items x neighbours)) and kept on it until the lists change; Serve builds it when it loads
    a version (serve/inference.py warm_up), not on the first request."""
    key = (collab.nbr_rows.data_ptr(), collab.nbr_rows._version)
    cached = getattr(collab, "_listed_by", None)
    if cached is None or cached[0] != key:
        lists = collab.nbr_rows.numpy()
        owner = np.repeat(np.arange(len(lists)), lists.shape[1])
        target = lists.ravel()
        order = np.argsort(target, kind="stable")
        starts = np.searchsorted(target[order], np.arange(len(lists) + 1))
        cached = (key, owner[order], starts)
        collab._listed_by = cached
    return cached[1], cached[2]


def shortlist_ids(model, cfg, index: "ItemIndex", history: Sequence[str], ratings: Sequence[Optional[float]], n: int,
                  pool: Optional[set] = None, exclude: Sequence[str] = ()) -> list[str]:
    """The n items a rerank scores: the best by the collaborative logit's item-dependent part -- the index's inner
    product (exact), plus the neighbour terms for the items they can lift (neighbour_lift), which the inner product
    cannot see. With a tree head (which does not factorise), that linear ranking gives n x cfg.serve.shortlist_widen
    items and the head's logit keeps the best of those the tables know; the items they do not know (scored from
    text) keep the places the linear ranking gave them. pool: the item ids allowed (None = every indexed item);
    exclude: ids never returned."""
    allowed = None if pool is None else index.rows(sorted(pool))
    user = user_vectors(model, cfg, [list(history)], [list(ratings)])
    head = model.collab.head is not None
    wide = n * cfg.serve.shortlist_widen if head else n
    top = index.top_n(user, wide, allowed=allowed, exclude=[list(exclude)])[0]
    score = dict(zip(top.item_ids, top.scores.tolist()))
    skip = set(map(str, exclude))
    lift = {i: x for i, x in neighbour_lift(model, cfg, history, ratings).items()
            if i in index and i not in skip and (pool is None or i in pool)}
    if lift:
        lifted = index.top_n(user, len(lift), allowed=index.rows(sorted(lift)))[0]
        score.update({i: s + lift[i] for i, s in zip(lifted.item_ids, lifted.scores.tolist())})
    ranked = sorted(score, key=lambda i: -score[i])[:wide]
    if not head:
        return ranked
    unknown = [i for i in ranked[:n] if i not in model.vocab.index]
    known = [i for i in ranked if i in model.vocab.index]
    logits = collab_logits(model, cfg, known, history, ratings)
    return [known[j] for j in np.argsort(-logits, kind="stable")[: n - len(unknown)]] + unknown


def collab_logits(model, cfg, item_ids: Sequence[str], history: Sequence[str],
                  ratings: Sequence[Optional[float]]) -> np.ndarray:
    """The collaborative part's logit (the tree head's, when it has one) of each item for one history."""
    hist = history_arrays(model.vocab, [list(history)], [[np.nan if r is None else float(r) for r in ratings]], [[]],
                          max(1, cfg.model.collab.history_len), cfg.data.like_threshold)
    tensors = {k: torch.from_numpy(np.repeat(v, len(item_ids), axis=0)) for k, v in hist.as_dict().items()}
    with torch.inference_mode():
        return model.collab(torch.from_numpy(model.vocab.rows(list(item_ids))), **tensors).float().numpy()


def model_key(model) -> str:
    """sha256 of the collaborative tables and vocab: which model an index was built from."""
    require_hybrid(model)
    digest = hashlib.sha256(json.dumps(model.vocab.ids).encode())
    for name, tensor in sorted(model.collab.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def require_hybrid(model) -> None:
    if getattr(model, "collab", None) is None:
        raise ValueError("retrieval needs a hybrid model (model.kind=hybrid): a text-only export has no item tables")


# --- the index --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retrieved:
    """One user's top items, best first."""
    item_ids: list[str]
    rows: np.ndarray  # (n,) int64 index rows
    scores: np.ndarray  # (n,) float32 inner products (the collaborative logit less the user's own terms)


@dataclass(frozen=True)
class _Columns:
    """Everything per item, swapped as one object so a search running while items are added sees one state."""
    item_ids: list[str]
    position: dict[str, int]
    vectors_t: np.ndarray  # (D, N) float32: the transposed layout is the fast one for (B, D) @ (D, N)
    from_text: np.ndarray  # (N,) bool
    genres: list[frozenset]
    genre_rows: dict = field(default_factory=dict)  # genre -> rows, filled on first use


def _genre_set(g) -> frozenset:
    """'Action|Comedy', a list/tuple/set/array of genres, or a missing value (None, NaN, pd.NA) -> frozenset."""
    if isinstance(g, str):
        return frozenset(x for x in g.split("|") if x)
    if isinstance(g, (list, tuple, set, frozenset, np.ndarray)):
        return frozenset(str(x) for x in g)
    return frozenset()


class ItemIndex:
    """One vector per catalogue item; exact top-N by inner product, within a pool, less excluded items."""

    def __init__(self, item_ids: Sequence[str], vectors: np.ndarray, *, version: str, model_key: str = "",
                 from_text: Optional[np.ndarray] = None, genres: Optional[Sequence] = None,
                 projection: Optional[TextProjection] = None, source: Optional[ItemSource] = None):
        ids = [str(i) for i in item_ids]
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"ItemIndex: {len(ids)} item ids but vectors of shape {vectors.shape}; need (N, dim)")
        position = {i: r for r, i in enumerate(ids)}
        if len(position) != len(ids):
            dup = next(i for r, i in enumerate(ids) if position[i] != r)
            raise ValueError(f"ItemIndex: item id {dup!r} is listed twice; pass each catalogue item once")
        if genres is not None and len(genres) != len(ids):
            raise ValueError(f"ItemIndex: {len(ids)} item ids but {len(genres)} genre entries")
        self.version, self.model_key, self.projection, self.source = version, model_key, projection, source
        self._cols = _Columns(ids, position, np.ascontiguousarray(vectors.T),
                              np.zeros(len(ids), bool) if from_text is None else np.asarray(from_text, bool),
                              [_genre_set(g) for g in genres] if genres is not None else [frozenset()] * len(ids))

    # --- reading ---
    def __len__(self) -> int:
        return len(self._cols.item_ids)

    def __contains__(self, item_id) -> bool:
        return str(item_id) in self._cols.position

    @property
    def dim(self) -> int:
        return self._cols.vectors_t.shape[0]

    @property
    def item_ids(self) -> list[str]:
        return self._cols.item_ids

    @property
    def vectors(self) -> np.ndarray:
        """(N, dim) float32 view."""
        return self._cols.vectors_t.T

    @property
    def columns(self) -> _Columns:
        """Every per-item column as one consistent state (save_index writes it; add_items may swap it meanwhile)."""
        return self._cols

    @property
    def from_text(self) -> np.ndarray:
        """(N,) bool: True where the vector was computed from the item's text (the tables hold no event of it)."""
        return self._cols.from_text

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """(N,) int64 rows of these ids; ValueError naming the first id that is not in the index."""
        position = self._cols.position
        out = np.empty(len(item_ids), np.int64)
        for k, i in enumerate(item_ids):
            r = position.get(str(i))
            if r is None:
                raise ValueError(f"item id {i!r} (position {k}) is not in the item index of version {self.version}; "
                                 "add it to the catalogue (ItemIndex.add_items) first")
            out[k] = r
        return out

    def genre_rows(self, genre: str) -> np.ndarray:
        """(M,) int64 rows of the items with this genre (empty when none has it)."""
        cols = self._cols
        rows = cols.genre_rows.get(genre)
        if rows is None:
            rows = cols.genre_rows[genre] = np.fromiter((r for r, g in enumerate(cols.genres) if genre in g), np.int64)
        return rows

    # --- search ---
    def top_n(self, user_vectors: np.ndarray, n: int, allowed: Optional[np.ndarray] = None,
              exclude: Optional[Sequence[Sequence[str]]] = None) -> list[Retrieved]:
        """The n best items per user vector ((dim,) or (B, dim)), best first; fewer when the pool is smaller.

        allowed: the pool, as rows ((M,) int, e.g. from `rows` or `genre_rows`) or a (N,) bool mask; None = every item.
        exclude: per user, item ids never to return (the history, for exclude_history); ids not indexed are ignored."""
        cols = self._cols  # one consistent state even if add_items swaps it meanwhile
        q = np.atleast_2d(np.asarray(user_vectors, np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"user vectors of shape {np.shape(user_vectors)}; this index needs (B, {self.dim})")
        if n < 1:
            raise ValueError(f"n={n}; ask for at least 1 item")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} lists for {len(q)} user vectors; pass one per user")
        num = len(cols.item_ids)
        pool = _pool_rows(allowed, num)  # None or sorted rows; results are taken among its columns
        if pool is not None and len(pool) * SMALL_POOL_SHARE <= num:  # a few items: score only theirs
            scores = torch.from_numpy(q) @ torch.from_numpy(cols.vectors_t[:, pool])  # (B, M)
        else:  # score every item (one pass over the vectors, the fast path), then keep the pool's columns
            scores = torch.from_numpy(q) @ torch.from_numpy(cols.vectors_t)  # (B, N)
            if pool is not None:
                scores = scores[:, torch.from_numpy(pool)]
        if exclude is not None:
            for b, ids in enumerate(exclude):
                rows = np.fromiter((r for r in map(cols.position.get, map(str, ids)) if r is not None), np.int64)
                if pool is not None:  # rows -> columns of the pool; rows outside it need no exclusion
                    at = np.minimum(np.searchsorted(pool, rows), len(pool) - 1)
                    rows = at[pool[at] == rows] if len(pool) else rows[:0]
                if len(rows):
                    scores[b, torch.from_numpy(rows)] = -torch.inf
        k = min(n, scores.shape[1])
        if k == 0:
            return [Retrieved([], np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        values, cols_idx = torch.topk(scores, k, dim=1, sorted=True)
        out = []
        for v, c in zip(values.numpy(), cols_idx.numpy()):
            keep = np.isfinite(v)
            rows = (c[keep] if pool is None else pool[c[keep]]).astype(np.int64)
            out.append(Retrieved([cols.item_ids[r] for r in rows], rows, v[keep]))
        return out

    # --- growing ---
    def add_items(self, item_ids: Sequence[str], texts: Sequence[str], genres: Optional[Sequence] = None) -> list[str]:
        """Index items that appeared after the build, without a retrain: the tables' vector when the model knows the
        id, else the text's. Returns the ids added, in order; ids already indexed keep their vector (a text edit of
        an indexed item takes effect with the next version's index). Searches may run meanwhile (they see the items
        before or after, never half); call it from one thread at a time (Serve: its catalogue refresher)."""
        if self.source is None or self.projection is None:
            raise ValueError("this index has no model attached to compute new items' vectors: build it with "
                             "build_index, or load it with load_index(..., model=, tokenizer=, cfg=)")
        if len(texts) != len(item_ids) or (genres is not None and len(genres) != len(item_ids)):
            raise ValueError(f"add_items: {len(item_ids)} ids, {len(texts)} texts"
                             + ("" if genres is None else f", {len(genres)} genre entries") + "; pass one of each per item")
        cols = self._cols
        fresh: dict[str, int] = {}
        for k, i in enumerate(map(str, item_ids)):
            if i not in cols.position and i not in fresh:
                fresh[i] = k
        if not fresh:
            return []
        ids, at = list(fresh), list(fresh.values())
        vectors, from_text = self.source.vectors(ids, [texts[k] for k in at], self.projection)
        start = len(cols.item_ids)
        self._cols = _Columns(
            cols.item_ids + ids, {**cols.position, **{i: start + r for r, i in enumerate(ids)}},
            np.concatenate([cols.vectors_t, vectors.T], axis=1), np.concatenate([cols.from_text, from_text]),
            cols.genres + [_genre_set(None if genres is None else genres[k]) for k in at])
        return ids


def _pool_rows(allowed, num: int) -> Optional[np.ndarray]:
    """None (every item) or sorted unique rows."""
    if allowed is None:
        return None
    allowed = np.asarray(allowed)
    if allowed.dtype == bool:
        if allowed.shape != (num,):
            raise ValueError(f"allowed: a bool mask of shape {allowed.shape}; the index has {num} items")
        return np.flatnonzero(allowed)
    rows = allowed.astype(np.int64, copy=False).reshape(-1)
    if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():  # rows from rows()/genre_rows() are sorted already
        rows = np.unique(rows)
    if len(rows) and (rows[0] < 0 or rows[-1] >= num):
        raise ValueError(f"allowed: rows must lie in [0, {num}); got {rows[0]}..{rows[-1]}")
    return rows


