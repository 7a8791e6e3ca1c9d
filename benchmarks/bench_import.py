"""`llmrec data import table` on a large file: rows/s and the importer's peak memory against the file's size, to back
"memory holds one chunk, then one period" with a figure. Writes a synthetic click log (CSV, ISO-8601 times, an
impression/click event column, 1% bad rows) of --rows rows over --weeks weeks, imports it twice (the second run must
write nothing), and saves out/bench_import.json.

    .venv/bin/python benchmarks/bench_import.py [--rows 5000000] [--weeks 26] [--chunk-rows 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

IMPORT = """
import json, resource, sys, time
from llmrec_ray.config import load_config
from llmrec_ray.datasets.table import import_table
from llmrec_ray.store import Store
cfg = load_config(None, sys.argv[1:])
t0 = time.time()
report = import_table(cfg, Store.from_config(cfg.store), progress=False)
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows_read": report.rows_read, "rows_written": report.rows_written, "bad_rows": report.bad.total,
                  "shards_written": len(report.shards_written), "rows_already_stored": report.rows_already_stored}))
"""


def write_log(folder: Path, rows: int, weeks: int, seed: int = 0) -> tuple[Path, Path]:
    """A click log in chunks (the generator itself stays small), and its catalogue."""
    rng = np.random.default_rng(seed)
    items = 20_000
    catalog = pd.DataFrame({"sku": [f"i{i}" for i in range(items)], "name": [f"Item number {i}" for i in range(items)]})
    catalog.to_csv(folder / "items.csv", index=False)
    start = pd.Timestamp("2024-01-01T00:00:00Z").value // 10**9
    path = folder / "events.csv"
    step = 1_000_000
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        ts = start + rng.integers(0, weeks * 7 * 86400, n)
        df = pd.DataFrame({"customer": np.char.add("u", rng.integers(0, 200_000, n).astype(str)),
                           "sku": np.char.add("i", (rng.zipf(1.3, n) % items).astype(str)),
                           "event_time": pd.to_datetime(ts, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "type": np.where(rng.random(n) < 0.1, "click", "impression")})
        df.loc[rng.random(n) < 0.01, "event_time"] = "not a time"
        df.to_csv(path, mode="a", header=lo == 0, index=False)
    return path, folder / "items.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--weeks", type=int, default=26)
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        t0 = time.time()
        events, items = write_log(work, args.rows, args.weeks)
        made = time.time() - t0
        size_mb = events.stat().st_size / 2**20
        overrides = [f"store.uri={work / 'store'}", f"table.interactions=[{events}]", f"table.catalog=[{items}]",
                     "table.columns={user_id: customer, item_id: sku, timestamp: event_time, event: type}",
                     "table.catalog_columns={item_id: sku, title: name}", "table.positive_events=[click]",
                     "table.negative_events=[impression]", f"table.chunk_rows={args.chunk_rows}"]
        runs = []
        for attempt in ("first", "again"):
            out = subprocess.run([sys.executable, "-c", IMPORT, *overrides], check=True, capture_output=True, text=True)
            runs.append({"run": attempt, **json.loads(out.stdout.strip().splitlines()[-1])})
        result = {"rows": args.rows, "weeks": args.weeks, "chunk_rows": args.chunk_rows, "file_mb": round(size_mb, 1),
                  "generate_seconds": round(made, 1), "runs": runs,
                  "load_avg": [round(x, 2) for x in os.getloadavg()]}
        print(f"{args.rows:,} rows, {size_mb:,.0f} MB CSV, {args.weeks} weeks, chunk_rows={args.chunk_rows:,}")
        for r in runs:
            print(f"  {r['run']:5}: {r['seconds']:6.1f} s  {r['rows_read'] / r['seconds']:>9,.0f} rows/s  peak RSS "
                  f"{r['peak_rss_mb']:,.0f} MB  written {r['rows_written']:,} in {r['shards_written']} shards, "
                  f"{r['bad_rows']:,} bad, {r['rows_already_stored']:,} already stored")
        Path("out").mkdir(exist_ok=True)
        Path("out/bench_import.json").write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
