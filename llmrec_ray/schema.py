"""The data contracts: interaction events, the item catalogue, and the store layout.

Interaction shard (Parquet), one row per user event:
    user_id    string   not null   the user's id in the source system
    item_id    string   not null   must exist in the catalogue
    event      string   not null   the event type, e.g. "rating" | "click" | "view" | "purchase" | "impression"
    rating     float32  nullable   the explicit rating, when the event is a rating
    label      int8     not null   1 = the user liked / engaged, 0 = did not (the training target)
    timestamp  int64    not null   seconds since the Unix epoch (UTC)
    context    string   nullable   free-form JSON (device, page, ...), carried but not modelled

Item catalogue (Parquet), one row per item:
    item_id      string  not null
    title        string  not null
    genres       string  nullable   "|"-separated categories, e.g. "Comedy|Romance"
    description  string  nullable
    year         int32   nullable   release year
    first_seen   int64   nullable   first interaction timestamp (new items appear over time)

Store layout (keys relative to the store root):
    catalog/items.parquet  +  catalog/updates/*.parquet    (the catalogue and its upserts: llmrec_ray/catalog.py)
    interactions/period=YYYY-MM-DD/part-*.parquet        (period = first day of the shard's period)
    quarantine/<shard key>  +  quarantine/<shard key>.report.json
    ledger.json             which shards exist and which model versions consumed them
    registry/...            model versions and the promoted pointer (llmrec_ray/registry.py)
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENTS = ("rating", "click", "view", "purchase", "impression")

# The tables of the module docstring, as (name, type, nullable) per column.
INTERACTION_SCHEMA = pa.schema([pa.field(name, kind, nullable=nullable) for name, kind, nullable in (
    ("user_id", pa.string(), False), ("item_id", pa.string(), False), ("event", pa.string(), False),
    ("rating", pa.float32(), True), ("label", pa.int8(), False), ("timestamp", pa.int64(), False),
    ("context", pa.string(), True))])
CATALOG_SCHEMA = pa.schema([pa.field(name, kind, nullable=nullable) for name, kind, nullable in (
    ("item_id", pa.string(), False), ("title", pa.string(), False), ("genres", pa.string(), True),
    ("description", pa.string(), True), ("year", pa.int32(), True), ("first_seen", pa.int64(), True))])

CATALOG_KEY = "catalog/items.parquet"
INTERACTIONS_PREFIX = "interactions"
QUARANTINE_PREFIX = "quarantine"
LEDGER_KEY = "ledger.json"
UNKNOWN_ITEMS = "unknown_items"  # ShardProblem.kind


def shard_key(period_start: dt.date, part: int = 0) -> str:
    return f"{INTERACTIONS_PREFIX}/period={period_start.isoformat()}/part-{part:05d}.parquet"


def period_of_key(key: str) -> str:
    """'interactions/period=1997-09-22/part-00000.parquet' -> '1997-09-22' (sorts by time)."""
    for part in key.split("/"):
        if part.startswith("period="):
            return part[len("period="):]
    raise ValueError(f"shard key {key!r} has no 'period=YYYY-MM-DD' component; shards live under {INTERACTIONS_PREFIX}/period=.../")


@dataclass
class ShardProblem:
    """Why a shard was rejected; written to the quarantine report."""

    reason: str
    bad_rows: int  # rows affected (all rows when the whole shard is unusable)
    kind: str = "invalid"  # UNKNOWN_ITEMS: only items missing from the catalogue (the ledger may hold the shard)
    examples: tuple = ()  # a few offending values


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the Parquet bytes every shard and catalogue file is written with (zstd)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def validate_interactions(table: pa.Table, known_item_ids: set[str] | None) -> list[ShardProblem]:
    """Every problem that makes `table` unusable as an interaction shard (empty list = valid)."""
    problems: list[ShardProblem] = []
    n = table.num_rows
    missing = [f.name for f in INTERACTION_SCHEMA if f.name not in table.column_names]
    if missing:
        return [ShardProblem(f"missing columns {missing}; expected schema: {INTERACTION_SCHEMA}", n)]
    for field in INTERACTION_SCHEMA:
        col = table.column(field.name)
        if not _castable(col, field.type):
            problems.append(ShardProblem(f"column {field.name!r} has type {col.type}, expected {field.type}", n))
            continue
        if not field.nullable and col.null_count:
            problems.append(ShardProblem(f"column {field.name!r} has {col.null_count} nulls; it is required", col.null_count))
    if problems:
        return problems
    labels = pc.cast(table.column("label"), pa.int8())
    bad_labels = n - pc.sum(pc.is_in(labels, pa.array([0, 1], pa.int8()))).as_py() if n else 0
    if bad_labels:
        problems.append(ShardProblem(f"column 'label' has {bad_labels} values other than 0/1", bad_labels))
    if known_item_ids is not None and n:
        known = pa.array(sorted(known_item_ids), pa.string())
        unknown_mask = pc.invert(pc.is_in(pc.cast(table.column("item_id"), pa.string()), known))
        unknown = pc.sum(unknown_mask).as_py() or 0
        if unknown:
            examples = pc.filter(table.column("item_id"), unknown_mask).unique()[:5].to_pylist()
            problems.append(ShardProblem(f"{unknown} rows have item ids not in the catalogue (e.g. {examples}); add them "
                                         "with a catalogue update (llmrec data import table --catalog FILE)", unknown,
                                         UNKNOWN_ITEMS, tuple(examples)))
    return problems


def _castable(col: pa.ChunkedArray, target: pa.DataType) -> bool:
    if col.type == target or pa.types.is_null(col.type):  # an all-null column casts to any type
        return True
    numeric = pa.types.is_integer(target) or pa.types.is_floating(target)
    if numeric and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        try:
            pc.cast(col, target)  # safe cast: fails on overflow / fractional values
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
    return pa.types.is_string(target) and pa.types.is_large_string(col.type)
