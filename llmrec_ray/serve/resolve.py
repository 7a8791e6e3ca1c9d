"""A request body against the catalogue: item ids become the texts the model reads, the Scorer's input (ScoreItem).

Every problem a valid body can still have (an unknown item id, text over serve.max_text_chars, more items than a
serve.max_* limit, an empty pool) is a 422 naming the field and the limit.

A `Catalog` is one catalogue version, read whole (llmrec_ray.catalog: the base table plus its updates) and never
changed: the Api swaps in a new one when the version changes (api.py), and a request reads the reference once.
"""

from typing import Optional, Union

from fastapi import HTTPException

from llmrec_ray.catalog import catalog_version, load_catalog
from llmrec_ray.config import Config
from llmrec_ray.serve.schemas import Candidate, GenrePool, HistoryItem, RecommendRequest, ScoreItem, ScoreRequest
from llmrec_ray.text import history_text, item_texts

TEXT_COLUMNS = ["title", "genres", "description"]  # the catalogue columns an item's texts are written from (item_texts)


def _invalid(message: str) -> HTTPException:
    return HTTPException(422, message)


class Catalog:
    """Titles (for histories and answers), candidate texts and genres by item id, and the per-request limits."""

    def __init__(self, titles: dict[str, str], texts: dict[str, str], genres: dict[str, set[str]], cfg: Config,
                 version: Optional[str] = None):
        self.titles, self.texts, self.genres = titles, texts, genres
        self.limits, self.history_len = cfg.serve, cfg.data.history_len
        self.version = version  # the catalogue version read (llmrec_ray.catalog.catalog_version)

    @classmethod
    def read(cls, store, cfg: Config, version: Optional[str] = None) -> "Catalog":
        """The store's catalogue at `version` (None: the newest). ValueError naming the fix when there is none."""
        version = catalog_version(store) if version is None else version
        frame = load_catalog(store, TEXT_COLUMNS, version)  # pandas only: the ingress replica loads no torch
        texts = item_texts(frame)  # item_id -> (candidate text, title)
        genres = {str(i): set(g.split("|")) if isinstance(g, str) else set() for i, g in frame["genres"].items()}
        return cls({str(i): title for i, (_, title) in texts.items()}, {str(i): text for i, (text, _) in texts.items()},
                   genres, cfg, version)

    def score_item(self, req: ScoreRequest, deadline: float) -> tuple[ScoreItem, list[dict]]:
        """/v1/score: the Scorer's input, and each candidate as the answer names it ({"item_id"} or {"text"})."""
        hist_text, hist_ids, ratings = self._history(req.history)
        texts, keys, ids = self._candidates(req.candidates)
        return ScoreItem(texts, hist_text, ids, hist_ids, ratings, deadline), keys

    def recommend_item(self, req: RecommendRequest, deadline: float) -> tuple[ScoreItem, list[str]]:
        """/v1/recommend: the Scorer's input, and the pool's item ids in the same order."""
        hist_text, hist_ids, ratings = self._history(req.history)
        pool = self._pool(req, {i for i in hist_ids if i is not None})
        return ScoreItem([self.texts[i] for i in pool], hist_text, list(pool), hist_ids, ratings, deadline), pool

    def _history(self, history: list[Union[str, HistoryItem]]) -> tuple[str, list[Optional[str]], list[float]]:
        """(history text, item ids or None, ratings or NaN), most recent first."""
        self._check_size("history", len(history), "max_history")
        hist = [HistoryItem(item_id=h) if isinstance(h, str) else h for h in history]
        titles = [self._text_of("history", i, h.item_id, h.text, self.titles) for i, h in enumerate(hist)]
        text = history_text([(title, h.rating) for title, h in zip(titles, hist)][: self.history_len])
        return text, [h.item_id for h in hist], [float("nan") if h.rating is None else float(h.rating) for h in hist]

    def _candidates(self, candidates: list[Union[str, Candidate]]) -> tuple[list[str], list[dict], list[Optional[str]]]:
        """(candidate texts, each candidate as the answer names it, item ids or None)."""
        self._check_size("candidates", len(candidates), "max_candidates")
        cands = [Candidate(item_id=c) if isinstance(c, str) else c for c in candidates]
        texts = [self._text_of("candidates", i, c.item_id, c.text, self.texts) for i, c in enumerate(cands)]
        keys = [{"item_id": c.item_id} if c.item_id is not None else {"text": c.text} for c in cands]
        return texts, keys, [c.item_id for c in cands]

    def _check_size(self, field: str, n: int, limit: str, hint: str = "") -> None:
        if n > getattr(self.limits, limit):
            raise _invalid(f"{field} has {n} items; serve.{limit}={getattr(self.limits, limit)}{hint}")

    def _text_of(self, field: str, i: int, item_id: Optional[str], text: Optional[str], known: dict) -> str:
        """`field[i]` as text: the catalogue's entry for item_id, or the (length-checked) free text."""
        if item_id is not None:
            if item_id not in known:
                raise _invalid(f"{field}[{i}].item_id: unknown item id {item_id!r}")
            return known[item_id]
        if text is not None:
            if len(text) > self.limits.max_text_chars:
                raise _invalid(f"{field}[{i}].text has {len(text)} characters; "
                               f"serve.max_text_chars={self.limits.max_text_chars}")
            return text
        raise _invalid(f"{field}[{i}]: give item_id or text")

    def _pool(self, req: RecommendRequest, seen: set[str]) -> list[str]:
        """The item ids to rank: the request's pool less the history (unless asked not to), within serve.max_pool."""
        max_pool = self.limits.max_pool
        if req.pool == "all":
            pool = list(self.texts)
        elif isinstance(req.pool, GenrePool):
            pool = [iid for iid, g in self.genres.items() if req.pool.genre in g]
            if not pool:
                raise _invalid(f"pool.genre: no items with genre {req.pool.genre!r}")
        else:
            for i, iid in enumerate(req.pool):
                if iid not in self.texts:
                    raise _invalid(f"pool[{i}]: unknown item id {iid!r}")
            pool = list(dict.fromkeys(req.pool))
        if req.exclude_history:
            pool = [iid for iid in pool if iid not in seen]
        self._check_size("pool", len(pool), "max_pool", " (narrow it with a genre or an id list)")
        if req.k > max_pool:
            raise _invalid(f"k={req.k}; serve.max_pool={max_pool}")
        if not pool:
            raise _invalid("pool: no candidates left after excluding the history")
        return pool
