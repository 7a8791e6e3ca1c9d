"""Importers that turn a data set into time-ordered interaction shards + a catalogue in a store."""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from llmrec_ray.schema import CATALOG_KEY, CATALOG_SCHEMA, INTERACTION_SCHEMA, parquet_bytes, shard_key


@dataclass
class ImportReport:
    num_rows: int
    num_shards: int
    num_items: int
    seconds: float


def period_start(ts: pd.Series, period_days: int) -> pd.Series:
    """The first day of each timestamp's period; periods start on Mondays (UTC) for weekly shards."""
    days = ts // 86400
    epoch_monday = 4  # 1970-01-01 was a Thursday: day 4 is the first Monday (1970-01-05)
    start_day = epoch_monday + ((days - epoch_monday) // period_days) * period_days
    return start_day


def write_dataset(store, catalog: pd.DataFrame, events: pd.DataFrame, period_days: int, started: float,
                  progress: bool = True, desc: str = "shards") -> ImportReport:
    """Write the catalogue and one shard per period (atomic object writes), events sorted by time."""
    cat_table = pa.Table.from_pandas(catalog[[f.name for f in CATALOG_SCHEMA]], schema=CATALOG_SCHEMA, preserve_index=False)
    store.write_bytes(CATALOG_KEY, parquet_bytes(cat_table))
    events = events.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    events["_period"] = period_start(events["timestamp"], period_days)
    groups = list(events.groupby("_period", sort=True))
    # stdout, like our own lines: stderr may be a log file (llmrec_ray.runtime.quiet_output)
    for start_day, part in tqdm(groups, desc=desc, unit="shard", disable=None if progress else True, file=sys.stdout):
        write_shard(store, part, int(start_day))
    return ImportReport(len(events), len(groups), len(catalog), time.time() - started)


def write_shard(store, events: pd.DataFrame, start_day: int) -> str:
    """One period's events (already sorted by time) as the shard of the period starting at `start_day`."""
    key = shard_key(dt.date(1970, 1, 1) + dt.timedelta(days=start_day))
    table = pa.Table.from_pandas(events[[f.name for f in INTERACTION_SCHEMA]], schema=INTERACTION_SCHEMA, preserve_index=False)
    store.write_bytes(key, parquet_bytes(table))
    return key
