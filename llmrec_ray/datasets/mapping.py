"""Your columns -> the shard schema, one chunk at a time: pure pandas, no I/O (llmrec_ray/datasets/table.py reads
and writes).

Timestamps (table.timestamp_unit): "s" / "ms" / "us" since the Unix epoch, "iso" for ISO-8601 strings (a time
without a zone is UTC), or "auto": a number is seconds below 1e11 (the year 5138), milliseconds below 1e14,
microseconds below 1e17; a string that is not a number is read as ISO-8601; a datetime column is used as is.

Labels, the first that applies: a mapped `label` column (1/0, true/false, yes/no); a mapped `rating` (label 1 when
rating >= data.like_threshold); a mapped `event` (label 1 for table.positive_events, 0 for table.negative_events);
else every row is a positive (a purchase log: training samples negatives, data.negatives_per_positive).

A row that cannot be used is counted under its reason, with a few examples (BadRows), never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from llmrec_ray.config import Config, TableConfig

INTERACTION_FIELDS = ("user_id", "item_id", "timestamp", "rating", "event", "label", "context")
CATALOG_FIELDS = ("item_id", "title", "genres", "description", "year")
REQUIRED = {"interactions": ("user_id", "item_id", "timestamp"), "catalog": ("item_id", "title")}
MIN_TS, MAX_TS = 0, 7_258_118_400  # 1970-01-01 .. 2200-01-01 UTC
TRUE, FALSE = {"1", "true", "yes", "y", "t", "1.0"}, {"0", "false", "no", "n", "f", "0.0"}
EXAMPLES = 3


@dataclass
class BadRows:
    """Rows left out, by "column: reason": {"rows": n, "examples": [...]}; each row is counted under one reason."""

    reasons: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(v["rows"] for v in self.reasons.values())

    def add(self, column: str, reason: str, mask: np.ndarray, values: pd.Series) -> None:
        n = int(mask.sum())
        if not n:
            return
        entry = self.reasons.setdefault(f"{column}: {reason}", {"rows": 0, "examples": []})
        entry["rows"] += n
        room = EXAMPLES - len(entry["examples"])
        if room > 0:
            entry["examples"] += [None if pd.isna(v) else str(v)[:80] for v in values[mask].head(room)]

    def lines(self) -> list[str]:
        return [f"  {v['rows']:,} rows: {k} (e.g. {v['examples']})" for k, v in sorted(self.reasons.items())]


def mapping(cfg: TableConfig, what: str) -> dict[str, str]:
    """our column -> your column, for "interactions" or "catalog"; ValueError naming the key and the fix."""
    given = cfg.columns if what == "interactions" else cfg.catalog_columns
    fields, option = (INTERACTION_FIELDS, "--map") if what == "interactions" else (CATALOG_FIELDS, "--catalog-map")
    for ours in given:
        if ours not in fields:
            raise ValueError(f"table.{'columns' if what == 'interactions' else 'catalog_columns'}: {ours!r} is not a "
                             f"{what} column; use {option} OURS=YOURS with OURS one of {', '.join(fields)}")
    return {ours: given.get(ours, ours) for ours in fields}  # unmapped: a column of our name, if the file has one


def check_label_source(cfg: TableConfig, present: set[str]) -> None:
    """An event column without the event lists would make every row unusable: say so before reading."""
    if "event" in present and not {"label", "rating"} & present and not cfg.positive_events:
        raise ValueError("the event column is mapped but table.positive_events is empty: name the event values that "
                         "mean 'liked', e.g. --positive-events purchase,click (and --negative-events impression)")
    both = set(cfg.positive_events) & set(cfg.negative_events)
    if both:
        raise ValueError(f"table.positive_events and table.negative_events both list {sorted(both)}; list each once")


def _text(col: pd.Series) -> pd.Series:
    return col.astype("string").str.strip()


def _epoch_seconds(times: pd.Series) -> pd.Series:
    """UTC datetimes (any resolution) -> float seconds, NaN for NaT."""
    return ((times - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).astype("float64")


def parse_timestamps(col: pd.Series, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the epoch as int64, bad mask) for a column of numbers, strings or datetimes."""
    if pd.api.types.is_datetime64_any_dtype(col):
        secs = _epoch_seconds(col.dt.tz_localize("UTC") if col.dt.tz is None else col.dt.tz_convert("UTC"))
    else:
        raw = col.astype("string").str.strip() if not pd.api.types.is_numeric_dtype(col) else col
        nums = pd.to_numeric(raw, errors="coerce").astype("float64")
        if unit in ("s", "ms", "us"):
            secs = nums / {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        else:
            scale = np.select([nums.abs() < 1e11, nums.abs() < 1e14, nums.abs() < 1e17], [1.0, 1e3, 1e6], np.nan)
            secs = nums / scale if unit == "auto" else pd.Series(np.nan, index=col.index)
            text = nums.isna() & raw.notna() if unit == "auto" else raw.notna()
            if text.any():
                iso = pd.to_datetime(raw[text].astype(str), utc=True, errors="coerce", format="ISO8601")
                secs = secs.copy()
                secs[text] = _epoch_seconds(iso)
    secs = secs.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(secs) | (secs < MIN_TS) | (secs >= MAX_TS)
    return np.where(bad, 0, np.floor(np.nan_to_num(secs))).astype(np.int64), bad


def to_events(chunk: pd.DataFrame, cols: dict[str, str], cfg: Config, bad: BadRows) -> pd.DataFrame:
    """A chunk of your interaction rows (renamed to our names) -> rows in the shard schema; bad rows counted."""
    t = cfg.table
    ok = np.ones(len(chunk), bool)

    def reject(column: str, reason: str, mask: np.ndarray, values: pd.Series) -> None:
        mask = np.asarray(mask, bool) & ok
        bad.add(cols.get(column, column), reason, mask, values)
        ok[mask] = False

    users, items = _text(chunk["user_id"]), _text(chunk["item_id"])
    reject("user_id", "empty", (users.isna() | (users == "")).to_numpy(), chunk["user_id"])
    reject("item_id", "empty", (items.isna() | (items == "")).to_numpy(), chunk["item_id"])
    ts, ts_bad = parse_timestamps(chunk["timestamp"], t.timestamp_unit)
    reject("timestamp", "empty", chunk["timestamp"].isna().to_numpy(), chunk["timestamp"])
    reject("timestamp", f"not a time (table.timestamp_unit={t.timestamp_unit}) or outside 1970-2199", ts_bad,
           chunk["timestamp"])
    rating = None
    if "rating" in chunk:
        rating = pd.to_numeric(chunk["rating"], errors="coerce").astype("float32")
        reject("rating", "not a number", (rating.isna() & chunk["rating"].notna()).to_numpy(), chunk["rating"])
    event = _text(chunk["event"]).str.lower() if "event" in chunk else None
    if "label" in chunk:
        text = _text(chunk["label"]).str.lower()
        label = text.isin(TRUE)
        reject("label", "not 0/1 (or true/false, yes/no)", (~(label | text.isin(FALSE))).to_numpy(), chunk["label"])
    elif rating is not None:
        reject("rating", f"empty (the label comes from it: rating >= {cfg.data.like_threshold:g})",
               rating.isna().to_numpy(), chunk["rating"])
        label = rating >= cfg.data.like_threshold
    elif event is not None:
        pos, neg = event.isin([e.lower() for e in t.positive_events]), event.isin([e.lower() for e in t.negative_events])
        reject("event", "in neither table.positive_events nor table.negative_events", (~(pos | neg)).to_numpy(),
               chunk["event"])
        label = pos
    else:
        label = pd.Series(True, index=chunk.index)
    default_event = "rating" if rating is not None else "interaction"
    out = pd.DataFrame({
        "user_id": users, "item_id": items,
        "event": event.fillna(default_event) if event is not None else default_event,
        "rating": rating if rating is not None else np.float32("nan"),
        "label": label.fillna(False).astype(np.int8), "timestamp": ts,
        "context": _text(chunk["context"]) if "context" in chunk else None,
    })
    return out[ok].astype({"user_id": str, "item_id": str, "event": str}).reset_index(drop=True)


def time_bound(cfg: TableConfig, name: str) -> Optional[int]:
    """table.since / table.until as epoch seconds (None: unbounded); ValueError naming the key when it is no time."""
    value = getattr(cfg, name)
    if value is None:
        return None
    secs, bad = parse_timestamps(pd.Series([value]), "auto")
    if bad[0]:
        raise ValueError(f"table.{name}={value!r} is not a time; give ISO-8601 (2024-01-31T00:00:00Z) or epoch seconds")
    return int(secs[0])


def select_rows(events: pd.DataFrame, cfg: TableConfig) -> pd.DataFrame:
    """The rows inside [table.since, table.until) of the users table.sample_users keeps (a slice to try things on;
    the same slice every run: users are chosen by a hash of their id)."""
    keep = np.ones(len(events), bool)
    since, until = time_bound(cfg, "since"), time_bound(cfg, "until")
    if since is not None:
        keep &= events["timestamp"].to_numpy() >= since
    if until is not None:
        keep &= events["timestamp"].to_numpy() < until
    if cfg.sample_users < 1.0:
        h = pd.util.hash_array(events["user_id"].to_numpy(dtype=object))
        keep &= h.astype(np.float64) / 2.0**64 < cfg.sample_users
    return events[keep].reset_index(drop=True)


def to_catalog(chunk: pd.DataFrame, cols: dict[str, str], cfg: TableConfig, bad: BadRows) -> pd.DataFrame:
    """A chunk of your catalogue rows (renamed to our names) -> catalogue rows; rows without id or title counted."""
    ids, titles = _text(chunk["item_id"]), _text(chunk["title"])
    no_id = (ids.isna() | (ids == "")).to_numpy()
    no_title = (titles.isna() | (titles == "")).to_numpy() & ~no_id
    bad.add(cols["item_id"], "empty", no_id, chunk["item_id"])
    bad.add(cols["title"], "empty", no_title, chunk["title"])
    out = pd.DataFrame({"item_id": ids, "title": titles})
    if "genres" in chunk:
        genres = chunk["genres"].map(lambda g: "|".join(map(str, g)) if isinstance(g, (list, tuple, np.ndarray)) else g)
        genres = _text(genres)
        if cfg.genres_separator:
            genres = genres.str.split(cfg.genres_separator, regex=False).map(
                lambda parts: "|".join(p.strip() for p in parts if p.strip()) if isinstance(parts, list) else None)
        out["genres"] = genres.replace("", None)
    if "description" in chunk:
        out["description"] = _text(chunk["description"]).replace("", None)
    if "year" in chunk:
        year = pd.to_numeric(chunk["year"], errors="coerce")
        bad_year = (year.isna() & chunk["year"].notna()) | (year % 1 != 0)
        out["year"] = year.where(~bad_year).astype("Int32")  # an unreadable year is left empty, the row kept
    keep = ~(no_id | no_title)
    return out[keep].astype({"item_id": str, "title": str}).reset_index(drop=True)
