"""Data-plane throughput: import (rows/s) and Ray Data ingest (examples/s) for MovieLens-100K and a
1,000,000-event synthetic set. Prints one JSON line per data set and saves out/bench_data-<shuffle>.json; the
libraries' output (Ray, Ray Data) goes to out/bench_data.log.

    .venv/bin/python benchmarks/bench_data.py [--synth-events 1000000] [--ingest-shards 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmrec_ray.runtime import configure_environment, ensure_ray, quiet_output
from llmrec_ray.config import load_config
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.datasets.synth import generate_synth
from llmrec_ray.ingest import build_examples, tokenize
from llmrec_ray.ledger import Ledger
from llmrec_ray.model import model_source
from llmrec_ray.store import Store


def bench_one(name: str, overrides: list[str], importer, ingest_shards: int, log_path: Path) -> dict:
    cfg = load_config(None, [f"store.uri={tempfile.mkdtemp(prefix=f'bench-{name}-')}", *overrides])
    store = Store.from_config(cfg.store)
    rep = importer(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    shards = ledger.shards()
    targets = shards[-ingest_shards:]
    older = [s.key for s in shards[:-ingest_shards]]
    n_target_rows = sum(s.num_rows for s in targets)
    configure_environment()
    ensure_ray(cfg, log_path)
    start = time.time()
    n_examples = build_examples(cfg, store, [s.key for s in targets], history_keys=older).count()
    examples_s = time.time() - start
    start = time.time()
    ds = build_examples(cfg, store, [s.key for s in targets], history_keys=older)
    n_tok = tokenize(ds, cfg, model_source(cfg.model)).count()
    tok_s = time.time() - start
    return {"dataset": name, "rows": rep.num_rows, "shards": rep.num_shards, "import_s": round(rep.seconds, 2),
            "import_rows_per_s": round(rep.num_rows / rep.seconds), "ingest_target_rows": n_target_rows,
            "ingest_history_rows": rep.num_rows - n_target_rows, "examples": n_examples,
            "examples_s": round(examples_s, 1), "examples_per_s": round(n_examples / examples_s),
            "tokenized_examples_per_s": round(n_tok / tok_s), "max_seq_len": cfg.model.max_seq_len,
            "shuffle": cfg.data.shuffle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--synth-events", type=int, default=1_000_000)
    parser.add_argument("--ingest-shards", type=int, default=4, help="newest shards streamed as targets")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both data sets, e.g. --set data.shuffle=hash")
    args = parser.parse_args()
    log_path = Path("out/bench_data.log")
    log_path.parent.mkdir(exist_ok=True)
    print(f"== data-plane benchmark (library logs: {log_path})")
    with quiet_output(log_path):
        results = []
        for name, overrides, importer in [
            ("movielens-100k", args.overrides, import_movielens),
            (f"synth-{args.synth_events}", [f"synth.num_events={args.synth_events}", "synth.num_users=20000",
                                            "synth.num_items=5000", "data.dataset=synth", *args.overrides],
             generate_synth),
        ]:
            results.append(bench_one(name, overrides, importer, args.ingest_shards, log_path))
            print(json.dumps(results[-1]), flush=True)
    out = Path(f"out/bench_data-{results[0]['shuffle']}.json")
    out.write_text(json.dumps({"machine": "2 cores, 24 GiB, no GPU", "results": results}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
