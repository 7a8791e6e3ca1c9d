"""Item ids -> table rows, and a request's history -> fixed-width arrays: the id inputs of the collaborative part
(llmrec_ray/collab.py), built the same way for training (Ray Data workers), evaluation, retrieval and Serve.

Row 0 is the unknown id (an item the tables never saw, or padding). Pure numpy: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import numpy as np

UNKNOWN = 0  # row of an id the tables never saw (and of padding)


class ItemVocab:
    """item_id <-> table row; row 0 is reserved for unknown ids."""

    def __init__(self, item_ids: Iterable[str] = ()):
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.add(item_ids)

    def add(self, item_ids: Iterable[str]) -> int:
        """Append ids not seen yet (in the given order); returns how many were new."""
        before = len(self.ids)
        for i in item_ids:
            i = str(i)
            if i not in self.index:
                self.index[i] = len(self.ids) + 1
                self.ids.append(i)
        return len(self.ids) - before

    def grow(self, item_ids: Iterable[str]) -> "ItemVocab":
        """A copy with new ids appended: every known id keeps its row."""
        out = ItemVocab(self.ids)
        out.add(item_ids)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """(N,) int64 rows, 0 for unknown ids."""
        get = self.index.get
        return np.fromiter((get(str(i), UNKNOWN) for i in item_ids), dtype=np.int64, count=len(item_ids))


@dataclass
class HistoryArrays:
    """Fixed-width history tensors for a batch, most recent first, padded on the right.

    rows (B, H) int64 table rows (0 = unknown or padding); present (B, H) 1 for a real history entry;
    liked (B, H) 1 when the user liked it (rating >= threshold, or an implicit event);
    rating (B, H) centred rating (r - threshold) / 2, 0 where there is none; rated (B, H) 1 where there is one.
    """
    rows: np.ndarray
    present: np.ndarray
    liked: np.ndarray
    rating: np.ndarray
    rated: np.ndarray

    def as_dict(self, prefix: str = "hist_") -> dict[str, np.ndarray]:
        return {prefix + k: getattr(self, k) for k in ("rows", "present", "liked", "rating", "rated")}


HIST_KEYS = ("hist_rows", "hist_present", "hist_liked", "hist_rating", "hist_rated")


def history_arrays(vocab: ItemVocab, histories: Sequence[Sequence[str]], ratings: Sequence[Sequence[float]],
                   labels: Sequence[Sequence[float]], width: int, like_threshold: float) -> HistoryArrays:
    """Per row: the history's item ids, ratings (NaN = none) and labels (NaN = derive from the rating),
    newest first; the first `width` entries are kept. Vectorised over the flattened histories."""
    b = len(histories)
    lengths = np.fromiter((min(width, len(h)) for h in histories), dtype=np.int64, count=b)
    total = int(lengths.sum())
    flat_ids = list(chain.from_iterable(h[:width] for h in histories))
    rs = np.fromiter(chain.from_iterable(r[:width] for r in ratings), dtype=np.float64, count=total)
    ls = np.fromiter(chain.from_iterable(
        (lab[:width] if len(lab) else [np.nan] * n) for lab, n in zip(labels, lengths.tolist())), dtype=np.float64, count=total)
    row = np.repeat(np.arange(b), lengths)
    col = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    has_rating = np.isfinite(rs)
    out = HistoryArrays(np.zeros((b, width), np.int64), *(np.zeros((b, width), np.float32) for _ in range(4)))
    out.rows[row, col] = vocab.rows(flat_ids)
    out.present[row, col] = 1.0
    out.liked[row, col] = np.where(np.isfinite(ls), ls, np.where(has_rating, rs >= like_threshold, 1.0))
    out.rating[row, col] = np.where(has_rating, (rs - like_threshold) / 2.0, 0.0)
    out.rated[row, col] = has_rating
    return out
