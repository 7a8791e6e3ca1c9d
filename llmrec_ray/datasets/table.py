"""`llmrec data import table`: your own interaction log and catalogue -> period shards and catalogue upserts.

    llmrec data import table --interactions 's3://shop/events/*.csv' --catalog items.jsonl \\
        --map user_id=customer --map item_id=sku --map timestamp=event_time --map event=type \\
        --positive-events purchase,add_to_cart --negative-events impression --catalog-map title=name

Files are CSV, Parquet or JSON Lines (by extension, or table.format; .gz/.bz2/.zst are decompressed), local or
s3:// (the store's endpoint and credentials), given as files, directories or globs. They are read
table.chunk_rows rows at a time and spilled per period to a local temporary folder, so memory holds one chunk,
then one period -- never the whole file. Column mapping, timestamps, labels and bad rows: mapping.py.

Writes: the catalogue first (catalog.write_catalog: only new or changed items), then each period's shard, oldest
first, each one atomic. A shard holds only rows the store does not hold yet (exact duplicates within the import and
rows already in a shard of the same period are skipped and counted), and its name is the hash of its content
(`part-<sha256 prefix>.parquet`): importing the same files again writes nothing, an overlapping export adds only
its new rows, and an import cut short is finished by running it again. Rows naming items the catalogue lacks are
written and counted: the ledger holds their shard until a catalogue update adds the items (llmrec_ray/ledger.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from llmrec_ray.catalog import CatalogWrite, load_catalog, write_catalog
from llmrec_ray.config import Config
from llmrec_ray.datasets import period_start
from llmrec_ray.datasets.mapping import (REQUIRED, BadRows, check_label_source, mapping, select_rows, time_bound,
                                         to_catalog, to_events)
from llmrec_ray.s3 import make_filesystem
from llmrec_ray.schema import INTERACTION_SCHEMA, INTERACTIONS_PREFIX, parquet_bytes

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".json": "jsonl"}
COMPRESSION = (".gz", ".bz2", ".zst")
COLUMNS = [f.name for f in INTERACTION_SCHEMA]


@dataclasses.dataclass
class TableReport:
    rows_read: int = 0
    rows_written: int = 0
    rows_already_stored: int = 0  # rows a shard of the same period holds already (a re-import, an overlapping export)
    duplicate_rows: int = 0  # exact duplicates within this import, each kept once
    unknown_item_rows: int = 0  # rows naming items the catalogue lacks: their shards wait for a catalogue update
    rows_outside_slice: int = 0  # left out by table.since / table.until / table.sample_users
    shards_written: list = dataclasses.field(default_factory=list)
    periods_unchanged: int = 0
    catalog: Optional[CatalogWrite] = None
    bad: BadRows = dataclasses.field(default_factory=BadRows)
    catalog_bad: BadRows = dataclasses.field(default_factory=BadRows)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = []
        if self.catalog is not None:
            c = self.catalog
            out.append(f"catalogue: {c.added:,} new items, {c.changed:,} changed, {c.unchanged:,} unchanged"
                       + (f" -> {c.key}" if c.key else " (nothing written)"))
            if self.catalog_bad.total:
                out += [f"catalogue rows left out: {self.catalog_bad.total:,}", *self.catalog_bad.lines()]
        if self.rows_read:
            out.append(f"interactions: {self.rows_read:,} rows read, {self.rows_written:,} written in "
                       f"{len(self.shards_written)} new shards ({self.periods_unchanged} periods unchanged), "
                       f"{self.rows_already_stored:,} already in the store, {self.duplicate_rows:,} exact duplicates"
                       + (f", {self.rows_outside_slice:,} outside table.since/until/sample_users"
                          if self.rows_outside_slice else ""))
        if self.bad.total:
            out += [f"rows left out: {self.bad.total:,}", *self.bad.lines()]
        if self.unknown_item_rows:
            out.append(f"{self.unknown_item_rows:,} rows name items not in the catalogue: their shards wait for a "
                       "catalogue update (llmrec data import table --catalog FILE), at most data.hold_unknown_items_s")
        return out

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("bad", "catalog_bad", "catalog")}
        return {**d, "catalog": dataclasses.asdict(self.catalog) if self.catalog else None,
                "bad_rows": self.bad.reasons, "bad_catalog_rows": self.catalog_bad.reasons}


def _filesystem(uri: str, cfg: Config) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        return make_filesystem(cfg.store), uri[len("s3://"):]
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: read files from a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def source_files(uris: list[str], cfg: Config, what: str) -> list[tuple[pafs.FileSystem, str, str]]:
    """(filesystem, path, the name to show) for every file that `uris` (files, directories, globs) name, sorted."""
    found = []
    for uri in uris:
        fs, path = _filesystem(uri, cfg)
        if any(ch in path for ch in "*?["):
            if isinstance(fs, pafs.LocalFileSystem):
                paths = sorted(glob.glob(path, recursive=True))
            else:
                base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ValueError(f"table.{what}: {uri!r} does not exist; give a file, a directory or a glob")
            paths = [path] if info.type == pafs.FileType.File else sorted(
                i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
        if not paths:
            raise ValueError(f"table.{what}: {uri!r} matches no file")
        found += [(fs, p, p if isinstance(fs, pafs.LocalFileSystem) else f"s3://{p}") for p in paths]
    return found


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    fmt = FORMATS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the format from the extension; name files .csv, .parquet or .jsonl, or "
                         "set --format csv|parquet|jsonl")
    return fmt


def read_chunks(fs, path: str, shown: str, cols: dict[str, str], required: tuple, cfg: Config,
                what: str) -> Iterator[pd.DataFrame]:
    """Chunks of the mapped columns, renamed to ours. ValueError naming the column and the fix when a required
    (or explicitly mapped) column is not in the file."""
    t, fmt = cfg.table, file_format(path, cfg.table.format)
    mapped = t.columns if what == "interactions" else t.catalog_columns
    if fmt == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        names = pf.schema_arrow.names
    else:
        with fs.open_input_stream(path, compression="detect") as f:
            names = (pd.read_csv(f, sep=t.delimiter, encoding=t.encoding, nrows=0).columns.tolist() if fmt == "csv"
                     else list(pd.read_json(f, lines=True, nrows=1, encoding=t.encoding, dtype=False).columns))
    wanted = {ours: theirs for ours, theirs in cols.items() if theirs in names}
    for ours in [*required, *mapped]:
        if ours not in wanted:
            option = "--map" if what == "interactions" else "--catalog-map"
            raise ValueError(f"{shown}: column {cols[ours]!r} (for {ours}) is not in the file; its columns are "
                             f"{names[:20]}; fix: {option} {ours}=<one of them>"
                             + (f" or --delimiter (now {t.delimiter!r})" if fmt == "csv" and len(names) == 1 else ""))
    rename = {theirs: ours for ours, theirs in wanted.items()}
    if fmt == "parquet":
        for batch in pf.iter_batches(batch_size=t.chunk_rows, columns=list(rename)):
            yield batch.to_pandas().rename(columns=rename)
        return
    with fs.open_input_stream(path, compression="detect") as f:
        reader = (pd.read_csv(f, sep=t.delimiter, encoding=t.encoding, dtype=str, usecols=list(rename),
                              chunksize=t.chunk_rows, keep_default_na=False, na_values=[""])
                  if fmt == "csv" else
                  pd.read_json(f, lines=True, chunksize=t.chunk_rows, encoding=t.encoding, dtype=False))
        for chunk in reader:
            yield chunk.reindex(columns=list(rename)).rename(columns=rename)


def import_catalog(cfg: Config, store, report: TableReport) -> None:
    cols = mapping(cfg.table, "catalog")
    frames = []
    for fs, path, shown in source_files(cfg.table.catalog, cfg, "catalog"):
        for chunk in read_chunks(fs, path, shown, cols, REQUIRED["catalog"], cfg, "catalog"):
            frames.append(to_catalog(chunk, cols, cfg.table, report.catalog_bad))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["item_id", "title"])
    given = [c for c in rows.columns if c != "item_id"]
    report.catalog = write_catalog(store, rows, given)


def import_table(cfg: Config, store, progress: bool = True) -> TableReport:
    """The catalogue files (if any), then the interaction files (if any), into `store`."""
    started, t = time.time(), cfg.table
    if not t.interactions and not t.catalog:
        raise ValueError("nothing to import: give --interactions FILE (and --catalog FILE), or table.interactions / "
                         "table.catalog in the config")
    report = TableReport()
    time_bound(t, "since"), time_bound(t, "until")  # a bad bound fails before anything is read or written
    if t.catalog:
        import_catalog(cfg, store, report)
    if t.interactions:
        known = set(load_catalog(store, ["item_id"]).index)  # ValueError naming the fix when there is none
        spill = Path(tempfile.mkdtemp(prefix="llmrec-import-"))
        try:
            _spill_interactions(cfg, report, known, spill, progress)
            _write_periods(cfg, store, report, spill, progress)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    report.seconds = time.time() - started
    return report


def _spill_interactions(cfg: Config, report: TableReport, known: set, spill: Path, progress: bool) -> None:
    cols = mapping(cfg.table, "interactions")
    part = 0
    for fs, path, shown in source_files(cfg.table.interactions, cfg, "interactions"):
        chunks = read_chunks(fs, path, shown, cols, REQUIRED["interactions"], cfg, "interactions")
        for chunk in tqdm(chunks, desc=f"reading {os.path.basename(path)}", unit="chunk", disable=None if progress else True,
                          file=sys.stdout, leave=False):
            check_label_source(cfg.table, set(chunk.columns))
            events = to_events(chunk, cols, cfg, report.bad)
            report.rows_read += len(chunk)
            if report.rows_read == len(chunk) and len(chunk) and events.empty:  # the first chunk: nothing usable
                raise ValueError(f"{shown}: none of the first {len(chunk):,} rows is usable; " + "; ".join(
                    f"{k}: {v['rows']:,} rows (e.g. {v['examples']})" for k, v in report.bad.reasons.items())
                    + "; fix the column mapping (--map), --timestamp-unit or the event lists")
            kept = select_rows(events, cfg.table)
            report.rows_outside_slice += len(events) - len(kept)
            events = kept
            unknown = ~events["item_id"].isin(known).to_numpy()
            if cfg.table.unknown_items == "drop":
                report.bad.add(cols["item_id"], "not in the catalogue (table.unknown_items=drop)", unknown,
                               events["item_id"])
                events = events[~unknown].reset_index(drop=True)
            else:
                report.unknown_item_rows += int(unknown.sum())
            events["_day"] = period_start(events["timestamp"], cfg.data.shard_period_days)
            for day, rows in events.groupby("_day"):
                folder = spill / f"{int(day)}"
                folder.mkdir(exist_ok=True)
                table = pa.Table.from_pandas(rows[COLUMNS], schema=INTERACTION_SCHEMA, preserve_index=False)
                pq.write_table(table, folder / f"{part:06d}.parquet")
            part += 1


def _row_hash(frame: pd.DataFrame) -> np.ndarray:
    keyed = frame[COLUMNS].astype({"rating": "float64"}).fillna({"rating": -1e30}).astype(str)
    return pd.util.hash_pandas_object(keyed, index=False).to_numpy()


def _write_periods(cfg: Config, store, report: TableReport, spill: Path, progress: bool) -> None:
    days = sorted(int(p.name) for p in spill.iterdir())
    for day in tqdm(days, desc="writing shards", unit="shard", disable=None if progress else True, file=sys.stdout,
                    leave=False):
        rows = pq.read_table(spill / str(day)).to_pandas()
        h = _row_hash(rows)
        first = ~pd.Series(h).duplicated().to_numpy()
        report.duplicate_rows += int((~first).sum())
        rows, h = rows[first], h[first]
        folder = f"{INTERACTIONS_PREFIX}/period={(dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()}"
        stored = [store.read_table(k).to_pandas() for k in store.list(folder, suffix=".parquet")]
        if stored:
            new = ~np.isin(h, _row_hash(pd.concat(stored, ignore_index=True)))
            report.rows_already_stored += int((~new).sum())
            rows = rows[new]
        if rows.empty:
            report.periods_unchanged += 1
            continue
        rows = rows.sort_values(["timestamp", "user_id", "item_id", "event", "label"], kind="stable")
        data = parquet_bytes(pa.Table.from_pandas(rows[COLUMNS], schema=INTERACTION_SCHEMA, preserve_index=False))
        key = f"{folder}/part-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        store.write_bytes(key, data)
        report.shards_written.append(key)
        report.rows_written += len(rows)


def write_report(store, report: TableReport) -> str:
    """The import's report as imports/<UTC time>.json in the store (what was written, what was left out and why)."""
    key = f"imports/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.json"
    store.write_bytes(key, json.dumps(report.to_dict(), indent=2, default=str).encode())
    return key
