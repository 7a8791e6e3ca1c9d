"""(user history, candidate item) -> the text pair the model reads.

The candidate comes first and the history second, so truncation to `max_seq_len` cuts the *oldest*
history items (history is written most-recent first), never the candidate. Titles and genres only:
sequence length is the main cost lever on CPU (see README, benchmarks).

    item_text("Toy Story (1995)", "Animation|Comedy")         -> "Toy Story (1995) | Animation, Comedy"
    history_text([("Heat (1995)", 5.0), ("Jumanji (1995)", 2.0)]) -> "Heat (1995) rated 5 ; Jumanji (1995) rated 2"
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

EMPTY_HISTORY = "no history"
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def item_text(title: str, genres: Optional[str] = None, description: Optional[str] = None) -> str:
    parts = [title.strip()]
    if isinstance(genres, str) and genres:  # None / NaN (missing in Parquet) mean "no genres"
        parts.append(", ".join(g for g in genres.split("|") if g))
    if isinstance(description, str) and description:
        parts.append(description.strip())
    return " | ".join(parts)


def item_texts(catalog) -> dict[str, tuple[str, str]]:
    """A catalogue (DataFrame indexed by item_id: title, genres, description) -> item_id -> (candidate text, title
    for histories)."""
    desc = catalog["description"] if "description" in catalog else [None] * len(catalog)
    return {i: (item_text(t, g, d), t) for i, t, g, d in zip(catalog.index, catalog["title"], catalog["genres"], desc)}


def candidate_texts(catalog) -> dict[str, str]:
    """A catalogue -> item_id -> candidate text (what the collaborative part's text vectors encode)."""
    return {i: t for i, (t, _) in item_texts(catalog).items()}


def history_entry(title: str, rating: Optional[float]) -> str:
    """One past event; a None or NaN rating is an implicit event (click, view)."""
    return title if rating is None or rating != rating else f"{title} rated {rating:g}"


def history_text(items: Sequence[tuple[str, Optional[float]]]) -> str:
    """`items` = (title, rating or None), most recent first."""
    if not items:
        return EMPTY_HISTORY
    return " ; ".join(history_entry(title, rating) for title, rating in items)


def tokenize_pairs(tokenizer, candidate_texts: list[str], history_texts: list[str], max_seq_len: int) -> dict:
    """Fixed-length numpy batches: input_ids, attention_mask, token_type_ids, each (B, max_seq_len) int64.

    The history is truncated first; a candidate text that alone leaves no room for history (a long
    free-text item at a short max_seq_len) is truncated too ("longest_first") instead of failing.
    One tokenizer pass in the common case; the per-row length check runs only when a batch has such a row.
    """
    try:
        enc = _encode(tokenizer, candidate_texts, history_texts, max_seq_len, "only_second")
    except Exception:  # noqa: BLE001 - fast tokenizers raise a bare Exception ("Truncation error: ...")
        enc = None
    if enc is not None and enc["input_ids"].shape == (len(candidate_texts), max_seq_len):
        return {k: enc[k].astype(np.int64) for k in TOKEN_KEYS}
    n = len(candidate_texts)
    cand_len = np.fromiter((len(ids) for ids in tokenizer(list(candidate_texts), add_special_tokens=False)["input_ids"]),
                           dtype=np.int64, count=n)
    too_long = cand_len + tokenizer.num_special_tokens_to_add(pair=True) >= max_seq_len
    out = {k: np.zeros((n, max_seq_len), dtype=np.int64) for k in TOKEN_KEYS}
    for rows, strategy in ((np.flatnonzero(~too_long), "only_second"), (np.flatnonzero(too_long), "longest_first")):
        if not len(rows):
            continue
        enc = _encode(tokenizer, [candidate_texts[i] for i in rows], [history_texts[i] for i in rows], max_seq_len, strategy)
        for k in TOKEN_KEYS:
            out[k][rows] = enc[k]
    return out


def _encode(tokenizer, candidates: list[str], histories: list[str], max_seq_len: int, truncation: str) -> dict:
    return tokenizer(list(candidates), list(histories), truncation=truncation, max_length=max_seq_len,
                     padding="max_length", return_tensors="np", return_token_type_ids=True)
