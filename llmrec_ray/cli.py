"""The `llmrec` command: one entry point for every stage. Every subcommand takes `--config FILE` and
repeatable `--set section.key=value` overrides, validated by llmrec_ray.config.

    llmrec data import movielens --store file:///tmp/s      import MovieLens-100K into weekly shards
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
import json
import math
import os
import re
import sys
import time
from typing import Callable, Optional

from llmrec_ray.config import Config, load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.num_workers=2 (repeatable)")
    p.add_argument("--store", help="shorthand for --set store.uri=URI (file:///dir, a path, or s3://bucket/prefix)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, print the traceback too (default: one line naming the problem and the fix)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import, generate and inspect interaction shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import", help="import a real data set into time-ordered shards")
    imp.add_argument("dataset", choices=["movielens", "synth"])
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
    demo = sub.add_parser("demo", help="the whole loop on MovieLens-100K with MiniLM, Serve up throughout")
    demo.add_argument("--rounds", type=int, default=None, help="incremental rounds after the first (default from demo config)")
    _common(demo)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "store", None):
        overrides.append(f"store.uri={args.store}")
    return load_config(args.config, overrides)


# Nothing is downloaded at run time: models come from installed packages or the store.
LOCAL_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# A local Ray listens on loopback only. `_node_ip_address="127.0.0.1"` alone does nothing on Linux: Ray swaps a
# loopback node IP for the machine's reachable address (ray._private.services.resolve_ip_for_localhost) unless
# multi-node clusters are switched off -- Ray's default on macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# elsewhere. Then GCS, raylet, every worker, the dashboard and runtime-env agents and the metrics exporter bind
# 127.0.0.1. What no setting reaches is listed in README "Network exposure" and in tests/test_loopback.py.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = "127.0.0.1"


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """Start a single-node Ray bound to 127.0.0.1 (the `llmrec` commands and the tests' session Ray)."""
    os.environ.update(LOCAL_RAY_ENV)  # read by Ray at import, here and in every process it starts
    # The workers inherit this environment. Setting it here rather than in a runtime_env matters on small
    # machines: workers with a runtime_env cannot come from Ray's prestarted pool, so every task and actor
    # would start (and import) a second set of worker processes.
    for key, value in LOCAL_WORKER_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
             _node_ip_address=LOOPBACK, **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray upgrade changed the switch: refuse to run exposed
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on node IP {node_ip}, not {LOOPBACK}: it would listen on the "
                           f"network; check {LOCAL_RAY_ENV} against this Ray version (tests/test_loopback.py)")


def ensure_ray(cfg: Config) -> None:
    """Attach to a cluster (cfg.ray.address / RAY_ADDRESS, as under `ray job submit`) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs beyond the train workers' and the Serve replicas' own, or Ray Data's tasks starve
        # ("backpressured ... ResourceBudget") while workers and replicas hold every CPU.
        serve_cpus = 2 * cfg.serve.num_replicas * cfg.serve.num_cpus_per_replica
        num_cpus = cfg.ray.num_cpus or int(cfg.train.num_workers * cfg.train.cpus_per_worker + serve_cpus + 4)
        start_local_ray(num_cpus)


def _store(cfg: Config):
    from llmrec_ray.store import Store

    return Store.from_config(cfg.store)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- subcommands -----------------------------------------------------------------------------------
def cmd_data(args, cfg: Config) -> int:
    store = _store(cfg)
    if args.data_command in ("import", "synth"):
        dataset = "synth" if args.data_command == "synth" else args.dataset
        if dataset == "movielens":
            from llmrec_ray.datasets.movielens import import_movielens as do_import
        else:
            from llmrec_ray.datasets.synth import generate_synth as do_import
        report = do_import(cfg, store)
        print(f"imported {dataset}: {report.num_rows:,} rows in {report.num_shards} shards, {report.num_items:,} items, "
              f"{report.seconds:.1f} s ({report.num_rows / max(report.seconds, 1e-9):,.0f} rows/s) -> {store.uri}")
        return 0
    from llmrec_ray.ledger import Ledger

    ledger = Ledger(store)
    ledger.refresh()
    if args.data_command == "status":
        for s in ledger.shards():
            print(f"{s.key}  rows={s.num_rows:>6}  consumed_by={','.join(s.consumed_by) or '-'}")
        quarantined = store.list("quarantine", suffix=".report.json")
        print(f"{len(ledger.shards())} shards, {len(quarantined)} quarantined")
        return 0
    return _ingest_preview(cfg, store, ledger, args.shards)


def _promoted_lineage(store) -> set[str]:
    from llmrec_ray.registry import Registry

    return Registry(store).lineage_of_promoted()


def _ingest_preview(cfg: Config, store, ledger, num_shards: int) -> int:
    from llmrec_ray import ingest

    new = ledger.new_shards(_promoted_lineage(store))[:num_shards]
    if not new:
        print("no new shards: import data first (llmrec data import movielens)")
        return 1
    ensure_ray(cfg)
    older = [s.key for s in ledger.shards() if s.period < new[0].period]
    start = time.time()
    ds = ingest.build_examples(cfg, store, [s.key for s in new], history_keys=older)
    rows = ds.take_all()
    seconds = time.time() - start
    print(f"streamed {[s.key for s in new]} through Ray Data: {len(rows):,} examples in {seconds:.1f} s "
          f"({len(rows) / max(seconds, 1e-9):,.0f} rows/s)")
    for row in rows[:3]:
        print(f"  label={row['label']:.0f}  candidate={row['candidate_text']!r}\n    history={row['history_text'][:160]!r}")
    return 0


def cmd_train(args, cfg: Config) -> int:
    from llmrec_ray import train
    from llmrec_ray.ledger import Ledger
    from llmrec_ray.registry import Registry, model_prefix

    store = _store(cfg)
    registry = Registry(store, cfg.registry.keep_versions)
    parent = registry.promoted_version() if args.init_from == "promoted" else None
    if args.init_from not in ("promoted", "backbone"):  # its form was checked by _check_args
        parent = registry.show(args.init_from)["version"]  # RegistryError names the known versions
    ledger = Ledger(store)
    ledger.refresh()  # the first write: after every check
    learned = registry.trained_shards(parent)
    new = [s for s in ledger.new_shards(registry.lineage_of_promoted()) if s.key not in learned][: args.shards]
    if not new:
        print("no new shards to train on")
        return 1
    init_uri = store.key_uri(model_prefix(parent)) if parent else None
    ensure_ray(cfg)
    older = [s.key for s in ledger.shards() if s.period < new[0].period]
    result = train.train_candidate(cfg, store, [s.key for s in new], older, [k for k in older if k in learned], init_uri,
                                   f"train-{int(time.time())}")
    version = registry.create_version(
        result.export_dir, parent=parent, shards=[s.key for s in new], config=cfg.to_dict(redact=True),
        metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        gate={"decision": "unevaluated", "reason": "trained by `llmrec train`: no evaluation, no gate"})
    print(f"trained {version} from {parent or 'the pretrained backbone'} on {[s.key for s in new]}")
    _print({"version": version, "metrics": result.metrics})
    print(f"next: llmrec train --init-from {version}   (continue)   |   llmrec models promote {version}   (serve it)")
    return 0


def cmd_round(args, cfg: Config) -> int:
    from llmrec_ray.pipeline import LOST_RACE, run_round

    ensure_ray(cfg)
    report = run_round(cfg, _store(cfg))
    _print(report.to_dict() if hasattr(report, "to_dict") else report)
    if getattr(report, "decision", None) == LOST_RACE:  # exit 3, like every other lost compare-and-swap
        print(f"llmrec: error: round lost the promotion race: {report.reason}; run it again to continue from the "
              "promoted version", file=sys.stderr)
        return 3
    return 0


def cmd_run(args, cfg: Config) -> int:
    from llmrec_ray.pipeline import run_rounds

    ensure_ray(cfg)
    run_rounds(cfg, _store(cfg), args.rounds)
    return 0


def cmd_models(args, cfg: Config) -> int:
    from llmrec_ray.registry import Registry

    registry = Registry(_store(cfg))
    if args.models_command == "list":
        promoted = registry.promoted()
        current = promoted.value["version"] if promoted and promoted.value else None
        for info in registry.list():
            mark = "*" if info["version"] == current else " "
            print(f"{mark} {info['version']}  parent={info.get('parent') or '-':6}  "
                  f"auc={info.get('metrics', {}).get('candidate_auc', float('nan')):.4f}  "
                  f"decision={info.get('gate', {}).get('decision', '-')}  created={info.get('created_at', '-')}")
        return 0
    if args.models_command == "show":
        _print(registry.show(args.version))
        return 0
    if args.models_command == "promote":
        registry.promote(args.version)
        print(f"promoted {args.version}")
        return 0
    version = registry.rollback()
    print(f"rolled back: {version} is promoted again")
    return 0


def cmd_serve(args, cfg: Config) -> int:
    from llmrec_ray.serve import run_serve

    ensure_ray(cfg)
    run_serve(cfg, blocking=True)
    return 0


def cmd_continuous(args, cfg: Config) -> int:
    from llmrec_ray.continuous import run_continuous

    ensure_ray(cfg)
    run_continuous(cfg, _store(cfg))
    return 0


def cmd_demo(args, cfg: Config) -> int:
    from llmrec_ray.demo import run_demo

    return run_demo(args, cfg)


COMMANDS: dict[str, Callable] = {
    "data": cmd_data, "train": cmd_train, "round": cmd_round, "run": cmd_run, "models": cmd_models,
    "serve": cmd_serve, "continuous": cmd_continuous, "demo": cmd_demo,
}


def _check_args(args) -> None:
    """Argument values that argparse cannot check, before anything is read or written."""
    init_from = getattr(args, "init_from", "promoted")
    if init_from not in ("promoted", "backbone") and not re.fullmatch(r"v\d{4,}", init_from):
        raise ValueError(f"--init-from {init_from!r}: use 'promoted', 'backbone' or a registry version "
                         f"such as v0001 (see: llmrec models list)")


# Commands that create the store if it is not there; every other one needs an existing store.
CREATES_STORE = {("data", "import"), ("data", "synth"), ("demo", None)}


def _check_store(args, cfg: Config) -> None:
    """Fail fast, before any write and before Ray starts: the store is reachable and, unless the command creates it,
    exists (a mistyped --store would otherwise start Ray and report "no new shards")."""
    creates = (args.command, getattr(args, "data_command", None)) in CREATES_STORE
    _store(cfg).check(must_exist=not creates)


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Errors print one line, "llmrec: error: <problem>: <fix>", and exit non-zero: 2 for the command line and the
    config, 3 for the store and the registry, 1 for anything else; -v/--verbose adds the traceback."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = None
    try:
        if args.command == "demo":
            from llmrec_ray.demo import demo_config

            cfg = demo_config(args)  # checked here; run_demo builds the same config again
        else:
            cfg = config_from_args(args)
        _check_args(args)
        _check_store(args, cfg)  # validate first, then start Ray (in the command)
        return COMMANDS[args.command](args, cfg if args.command != "demo" else None)
    except Exception as exc:
        from llmrec_ray.registry import RegistryError
        from llmrec_ray.store import Store, StoreError

        explained = None
        if cfg is not None:
            try:
                explained = Store.from_config(cfg.store).explain(exc)
            except StoreError:  # a bad store.uri: reported as itself below
                pass
        if explained is not None:
            message, code = str(explained), 3
        elif isinstance(exc, ValueError):  # config and input errors: the message names the field and the fix
            message, code = str(exc), 2
        elif isinstance(exc, (StoreError, RegistryError)):
            message, code = str(exc), 3
        else:
            message, code = f"{type(exc).__name__}: {exc} (run with -v for the traceback)", 1
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"llmrec: error: {_one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
