"""The item catalogue as a stream: a base table plus upsert updates, read as one table at a catalogue version.

Store layout (keys relative to the store root):
    catalog/items.parquet                                   the base (optional once there are updates)
    catalog/updates/<13-digit UTC ms>-<16 hex>.parquet      an update: whole rows, upserted by item_id

A catalogue version names the newest update it includes ("base" when there is none). Update keys sort by the
time they were written, so version V is the base plus every update whose key sorts <= V, the later row winning
per item_id. Items are never deleted: a later version holds every item of an earlier one. Each object is written
once, atomically (Store.write_bytes), so a reader sees a version whole or not at all.

Who reads which version: the ledger checks new shards against the newest (llmrec_ray/ledger.py); a round pins
the version it starts with for its ingest and its evaluation and records it with the model version; Serve
follows the newest on its own poll (llmrec_ray/serve/api.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from llmrec_ray.schema import CATALOG_KEY, CATALOG_SCHEMA, parquet_bytes

UPDATES_PREFIX = "catalog/updates"
BASE_VERSION = "base"
COLUMNS = [f.name for f in CATALOG_SCHEMA]


def update_keys(store) -> list[str]:
    """The catalogue's update keys, oldest first (one listing)."""
    return store.list(UPDATES_PREFIX, suffix=".parquet")  # sorted: keys start with the write time


def catalog_version(store) -> Optional[str]:
    """The newest catalogue version: its newest update's key, "base" without updates, None without a catalogue."""
    updates = update_keys(store)
    if updates:
        return updates[-1]
    return BASE_VERSION if store.exists(CATALOG_KEY) else None


def has_catalog(store) -> bool:
    return catalog_version(store) is not None


def load_catalog(store, columns: Optional[list[str]] = None, version: Optional[str] = None) -> pd.DataFrame:
    """The catalogue at `version` (None: the newest), indexed by item_id; ValueError naming the fix if there is none
    or the version is not in the store. `columns`: only these (item_id is always read)."""
    wanted = None if columns is None else ["item_id", *(c for c in columns if c != "item_id")]
    updates = update_keys(store)
    if version is not None and version != BASE_VERSION and version not in updates:
        raise ValueError(f"catalogue version {version!r} is not in {store.key_uri(UPDATES_PREFIX)}; "
                         f"the newest is {catalog_version(store)!r}")
    chosen = [] if version == BASE_VERSION else [k for k in updates if version is None or k <= version]
    parts = ([CATALOG_KEY] if store.exists(CATALOG_KEY) else []) + chosen
    if not parts:
        raise ValueError(f"no catalogue at {store.key_uri(CATALOG_KEY)}; import data first "
                         "(llmrec data import movielens, or llmrec data import table --catalog FILE)")
    tables = [store.read_table(k, columns=wanted) for k in parts]
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    if len(parts) > 1:  # upserts: the last row of each item wins
        frame = frame.drop_duplicates("item_id", keep="last")
    return frame.set_index("item_id")


def catalog_bytes(frame: pd.DataFrame) -> bytes:
    """Rows in the catalogue schema (columns of COLUMNS; missing optional ones become null) as Parquet bytes."""
    return parquet_bytes(pa.Table.from_pandas(frame.reindex(columns=COLUMNS), schema=CATALOG_SCHEMA, preserve_index=False))


@dataclass
class CatalogWrite:
    key: Optional[str]  # the object written (None: nothing changed)
    added: int  # items new to the catalogue
    changed: int  # known items whose row changed
    unchanged: int


def write_catalog(store, rows: pd.DataFrame, given: Optional[list[str]] = None) -> CatalogWrite:
    """Upsert `rows` (item_id + catalogue columns): only new and changed items are written, as the base when the
    store has no catalogue yet, else as one update. Columns outside `given` (default: the ones `rows` has) keep a
    known item's current value. Idempotent: writing the same rows again writes nothing."""
    given = [c for c in (given if given is not None else rows.columns) if c in COLUMNS and c != "item_id"]
    rows = rows.drop_duplicates("item_id", keep="last").set_index("item_id")
    rows.index = rows.index.astype(str)
    if not has_catalog(store):
        frame = rows.reset_index()
        store.write_bytes(CATALOG_KEY, catalog_bytes(frame))
        return CatalogWrite(CATALOG_KEY, len(frame), 0, 0)
    current = load_catalog(store)
    known = rows.index.isin(current.index)
    merged = rows.reindex(columns=[c for c in COLUMNS if c != "item_id"]).astype(object)
    kept = [c for c in merged.columns if c not in given]
    merged.loc[known, kept] = current.loc[rows.index[known], kept].to_numpy()
    same = _same_rows(merged[known], current.loc[rows.index[known], merged.columns])
    changed = merged[known][~same]
    added = merged[~known]
    out = pd.concat([added, changed])
    if out.empty:
        return CatalogWrite(None, 0, 0, int(known.sum()))
    data = catalog_bytes(out.rename_axis("item_id").reset_index())
    key = f"{UPDATES_PREFIX}/{int(time.time() * 1000):013d}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    store.write_bytes(key, data)
    return CatalogWrite(key, len(added), len(changed), int(same.sum()))


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    """Per row: every column equal, nulls equal to nulls."""
    eq = np.ones(len(a), bool)
    for col in a.columns:
        eq &= np.fromiter((bool(pd.isna(p) and pd.isna(q)) if pd.isna(p) or pd.isna(q) else bool(p == q)
                           for p, q in zip(a[col].tolist(), b[col].tolist())), bool, count=len(a))
    return pd.Series(eq, index=a.index)
