"""The `llmrec` command: one entry point for every stage. Every subcommand takes `--config FILE` and
repeatable `--set section.key=value` overrides, validated by llmrec_ray.config.

    llmrec data import movielens --store file:///tmp/s      import MovieLens-100K into weekly shards
    llmrec data import table --interactions F --catalog F   your own log + catalogue (CSV/Parquet/JSONL, s3://)
    llmrec data synth --set synth.num_events=1000000        synthetic drifting data at scale
    llmrec data ingest                                      stream the first new week through Ray Data
    llmrec train                                            one training round (no gate, no promotion)
    llmrec round                                            ingest -> train -> evaluate -> gate -> promote
    llmrec run --rounds K                                   K rounds + report table + PNG
    llmrec models list | show V | promote V | rollback
    llmrec serve                                            Ray Serve HTTP app on the promoted model
    llmrec continuous                                       watch the store, run rounds when data lands
    llmrec demo                                             the whole loop, end to end, with Serve up
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from llmrec_ray.commands import COMMANDS, RAY_COMMANDS
from llmrec_ray.config import Config, config_from_dict, load_config
from llmrec_ray.registry import RegistryError
from llmrec_ray.runtime import configure_environment, quiet_output, ray_address
from llmrec_ray.store import Store, StoreError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"  # `llmrec demo`'s default
# Commands that create the store if it is not there; every other one needs an existing store.
CREATES_STORE = {("data", "import"), ("data", "synth"), ("demo", None)}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.num_workers=2 (repeatable)")
    p.add_argument("--store", help="shorthand for --set store.uri=URI (file:///dir, a path, or s3://bucket/prefix)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's, DeepSpeed's and the libraries' logs and warnings here (default: a log file), "
                        "and an error's traceback (default: one line naming the problem and the fix)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's logs and warnings here, and an error's traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import, generate and inspect interaction shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import", help="import a real data set into time-ordered shards")
    imp.add_argument("dataset", choices=["movielens", "synth", "table"],
                     help="table: your own files (the options below; README 'Use your own data')")
    t = imp.add_argument_group("table (your own data; each also settable as table.* in the config)")
    t.add_argument("--interactions", action="append", default=[], metavar="PATH",
                   help="interaction file, directory or glob; local or s3:// (repeatable)")
    t.add_argument("--catalog", action="append", default=[], metavar="PATH", help="catalogue file(s): upserts by item_id")
    t.add_argument("--map", action="append", default=[], metavar="OURS=YOURS",
                   help="interaction column mapping, e.g. --map user_id=customer (ours: user_id item_id timestamp "
                        "rating event label context)")
    t.add_argument("--catalog-map", action="append", default=[], metavar="OURS=YOURS",
                   help="catalogue column mapping, e.g. --catalog-map title=name (ours: item_id title genres "
                        "description year)")
    t.add_argument("--format", choices=["auto", "csv", "parquet", "jsonl"])
    t.add_argument("--delimiter", help="CSV field separator (default ',')")
    t.add_argument("--encoding", help="CSV / JSON Lines text encoding (default utf-8)")
    t.add_argument("--timestamp-unit", choices=["auto", "s", "ms", "us", "iso"])
    t.add_argument("--positive-events", metavar="A,B", help="event values that mean 'liked' (label 1)")
    t.add_argument("--negative-events", metavar="A,B", help="event values that mean 'not liked' (label 0)")
    t.add_argument("--genres-separator", metavar="SEP", help="split the genres/category text on SEP")
    t.add_argument("--since", metavar="TIME", help="keep events at or after TIME (ISO-8601 or epoch seconds)")
    t.add_argument("--until", metavar="TIME", help="keep events before TIME")
    t.add_argument("--sample-users", type=float, metavar="FRACTION", help="keep this fraction of users (repeatable slice)")
    t.add_argument("--unknown-items", choices=["hold", "drop"],
                   help="rows naming items the catalogue lacks: hold (default; their shard waits for a catalogue "
                        "update) or drop (left out, counted)")
    _common(imp)
    _common(data_sub.add_parser("synth", help="generate synthetic drifting data (same as `data import synth`)"))
    _common(data_sub.add_parser("status", help="list shards: consumed, new, quarantined"))
    ing = data_sub.add_parser("ingest", help="stream the oldest new shard(s) through Ray Data and show examples")
    ing.add_argument("--shards", type=int, default=1, help="how many new shards to stream")
    _common(ing)

    tr = sub.add_parser("train", help="one training round on the oldest new shards; registers the result, unevaluated "
                                      "and not promoted")
    tr.add_argument("--shards", type=int, default=1)
    tr.add_argument("--init-from", default="promoted",
                    help="'promoted' (default; the backbone when nothing is promoted), 'backbone', or a registry "
                         "version (vNNNN): training continues on the shards that version's lineage has not learned")
    _common(tr)

    _common(sub.add_parser("round", help="one incremental round: evaluate, train, gate, promote, commit"))
    run = sub.add_parser("run", help="several rounds in a row, then a report table and plot")
    run.add_argument("--rounds", type=int, required=True)
    _common(run)

    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    _common(msub.add_parser("list"))
    for name in ("show", "promote"):
        p = msub.add_parser(name)
        p.add_argument("version")
        _common(p)
    _common(msub.add_parser("rollback"))

    _common(sub.add_parser("serve", help="serve the promoted model over HTTP (Ray Serve); Ctrl-C stops"))
    _common(sub.add_parser("continuous", help="run rounds whenever enough new data lands; SIGTERM stops cleanly"))
    demo = sub.add_parser("demo", help="the whole loop on MovieLens-100K with MiniLM, Serve up throughout "
                                       "(default config: jobs/configs/demo.yaml)")
    demo.add_argument("--rounds", type=int, default=2, help="incremental rounds after the first (default 2)")
    _common(demo)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "store", None):
        overrides.append(f"store.uri={args.store}")
    cfg = load_config(args.config or (DEMO_CONFIG if args.command == "demo" else None), overrides)
    return _with_table_args(cfg, args) if getattr(args, "dataset", None) == "table" else cfg


def _pairs(option: str, items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"{option} {item!r}: use {option} OURS=YOURS, e.g. {option} item_id=sku")
        out[ours.strip()] = theirs.strip()
    return out


def _with_table_args(cfg: Config, args: argparse.Namespace) -> Config:
    """`data import table`'s options over the config's `table` section (lists add to it, mappings override keys)."""
    raw = cfg.to_dict()
    t = raw["table"]
    t["interactions"] += args.interactions
    t["catalog"] += args.catalog
    t["columns"].update(_pairs("--map", args.map))
    t["catalog_columns"].update(_pairs("--catalog-map", args.catalog_map))
    for name in ("format", "delimiter", "encoding", "timestamp_unit", "genres_separator", "since", "until",
                 "sample_users", "unknown_items"):
        if getattr(args, name) is not None:
            t[name] = getattr(args, name)
    for name in ("positive_events", "negative_events"):
        if getattr(args, name) is not None:
            t[name] = [e.strip() for e in getattr(args, name).split(",") if e.strip()]
    return config_from_dict(raw, source="--config and the import options")


def _check(args, cfg: Config) -> None:
    """What argparse cannot check, before anything is read or written and before Ray starts: argument values, and a
    reachable store that exists unless the command creates it (a mistyped --store would otherwise start Ray and
    report "no new shards")."""
    init_from = getattr(args, "init_from", "promoted")
    if init_from not in ("promoted", "backbone") and not re.fullmatch(r"v\d{4,}", init_from):
        raise ValueError(f"--init-from {init_from!r}: use 'promoted', 'backbone' or a registry version "
                         f"such as v0001 (see: llmrec models list)")
    creates = (args.command, getattr(args, "data_command", None)) in CREATES_STORE
    Store.from_config(cfg.store).check(must_exist=not creates)


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def _error(exc: Exception, cfg: Optional[Config], log_path: Optional[Path]) -> tuple[str, int]:
    """(one line naming the problem and the fix, exit code): 2 for the command line and the config, 3 for the store
    and the registry, 1 for anything else."""
    explained = None
    if cfg is not None:
        try:
            explained = Store.from_config(cfg.store).explain(exc)
        except StoreError:  # a bad store.uri: reported as itself below
            pass
    if explained is not None:
        return _one_line(str(explained)), 3
    if isinstance(exc, ValueError):  # config and input errors: the message names the field and the fix
        return _one_line(str(exc)), 2
    if isinstance(exc, (StoreError, RegistryError)):
        return _one_line(str(exc)), 3
    where = f"the traceback: {log_path}, or run with -v" if log_path else "run with -v for the traceback"
    return f"{type(exc).__name__}: {_one_line(str(exc))} ({where})", 1


def main(argv: Optional[list[str]] = None) -> int:
    """Errors print one line, "llmrec: error: <problem>: <fix>", and exit non-zero (see _error); -v/--verbose adds
    the traceback. Ctrl-C prints one line too: "serve: stopped" (exit 0; on a cluster the app keeps running), else
    "llmrec: interrupted" (exit 130). A command that starts Ray keeps the terminal for its own lines unless -v
    (llmrec_ray.runtime)."""
    args = build_parser().parse_args(argv)
    cfg, command = None, (args.data_command if args.command == "data" else args.command)
    args.log_path = None if args.verbose or command not in RAY_COMMANDS else \
        Path("out") / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        cfg = config_from_args(args)
        configure_environment(local_ray=ray_address(cfg) is None)
        _check(args, cfg)  # validate first, then start Ray (in the command)
        if args.log_path is None:
            return COMMANDS[args.command](args, cfg)
        with quiet_output(args.log_path):
            return COMMANDS[args.command](args, cfg)
    except KeyboardInterrupt:  # Ctrl-C: how `llmrec serve` is meant to stop; quiet_output has shut a local Ray down
        if args.command == "serve":  # a local Ray goes with this process; a cluster's Serve keeps the app running
            address = ray_address(cfg) if cfg is not None else None
            print("serve: stopped" if address is None else
                  f"serve: detached; the app keeps running on the Ray cluster at {address} (`serve shutdown` stops it)")
            return 0
        print("llmrec: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception as exc:
        message, code = _error(exc, cfg, args.log_path)
        if args.verbose:
            traceback.print_exc()
        elif code == 1 and args.log_path is not None:
            args.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(args.log_path, "a", encoding="utf-8") as log:
                traceback.print_exc(file=log)
        print(f"llmrec: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
