"""What each `llmrec` subcommand does: (parsed arguments, validated Config) -> exit code. llmrec_ray/cli.py parses
the command line, checks it, and calls COMMANDS[command]; for a command that starts Ray, inside
runtime.quiet_output(args.log_path) unless -v (args.log_path is None then).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from typing import Callable

from llmrec_ray.config import Config
from llmrec_ray.catalog import catalog_version
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.datasets.table import import_table, write_report
from llmrec_ray.datasets.synth import generate_synth
from llmrec_ray.ledger import Ledger
from llmrec_ray.registry import Registry, RegistryError, model_prefix
from llmrec_ray.runtime import ensure_ray
from llmrec_ray.store import Store

# A command imports its own stage when it runs (pipeline, train, ingest, serve, continuous, demo): those load torch,
# transformers and Ray (seconds), which `llmrec models list` and the one-line errors need not wait for.
RAY_COMMANDS = {"train", "round", "run", "serve", "continuous", "demo", "ingest"}  # the ones that start Ray


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_data(args, cfg: Config) -> int:
    store = Store.from_config(cfg.store)
    if args.data_command == "import" and args.dataset == "table":
        return _import_table(cfg, store)
    if args.data_command in ("import", "synth"):
        dataset = "synth" if args.data_command == "synth" else args.dataset
        report = (import_movielens if dataset == "movielens" else generate_synth)(cfg, store)
        print(f"imported {dataset}: {report.num_rows:,} rows in {report.num_shards} shards, {report.num_items:,} items, "
              f"{report.seconds:.1f} s ({report.num_rows / max(report.seconds, 1e-9):,.0f} rows/s) -> {store.uri}")
        return 0
    ledger = Ledger(store, cfg.data.hold_unknown_items_s)
    ledger.refresh()
    if args.data_command == "status":
        for s in ledger.shards():
            print(f"{s.key}  rows={s.num_rows:>6}  consumed_by={','.join(s.consumed_by) or '-'}")
        held = ledger.held()
        for key, h in held.items():
            print(f"{key}  rows={h['num_rows']:>6}  HELD since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(h['since']))} "
                  f"UTC: {h['unknown_rows']} rows name items not in the catalogue yet (e.g. {h['examples'][:3]})")
        quarantined = store.list("quarantine", suffix=".report.json")
        print(f"{len(ledger.shards())} shards, {len(held)} held (waiting for a catalogue update), "
              f"{len(quarantined)} quarantined; catalogue version {catalog_version(store)}")
        return 0
    return _ingest_preview(args, cfg, store, ledger)


def _import_table(cfg: Config, store: Store) -> int:
    report = import_table(cfg, store)
    for line in report.lines():
        print(line)
    key = write_report(store, report)
    print(f"imported your table in {report.seconds:.1f} s -> {store.uri} (report: {store.key_uri(key)})")
    if report.shards_written:
        print("next: llmrec data status   |   llmrec round (or llmrec run --rounds K) on the new shards")
    return 0


def _ingest_preview(args, cfg: Config, store: Store, ledger: Ledger) -> int:
    from llmrec_ray import ingest  # on use: see the note above

    new = ledger.new_shards(Registry(store).lineage_of_promoted())[: args.shards]
    if not new:
        print("no new shards: import data first (llmrec data import movielens)")
        return 1
    ensure_ray(cfg, args.log_path)
    older = [s.key for s in ledger.shards() if s.period < new[0].period]
    start = time.time()
    rows = ingest.build_examples(cfg, store, [s.key for s in new], history_keys=older).take_all()
    seconds = time.time() - start
    print(f"streamed {[s.key for s in new]} through Ray Data: {len(rows):,} examples in {seconds:.1f} s "
          f"({len(rows) / max(seconds, 1e-9):,.0f} rows/s)")
    for row in rows[:3]:
        print(f"  label={row['label']:.0f}  candidate={row['candidate_text']!r}\n    history={row['history_text'][:160]!r}")
    return 0


def cmd_train(args, cfg: Config) -> int:
    from llmrec_ray.train import train_candidate  # on use: see the note above

    store = Store.from_config(cfg.store)
    registry = Registry(store, cfg.registry.keep_versions)
    parent = registry.promoted_version() if args.init_from == "promoted" else None
    if args.init_from not in ("promoted", "backbone"):  # its form was checked by cli._check
        parent = registry.show(args.init_from)["version"]  # RegistryError names the known versions
    if parent:  # checked against its recorded checksum here, before Ray: the workers download it by URI, unchecked
        with tempfile.TemporaryDirectory(prefix="llmrec-check-") as d:
            registry.download_model(parent, d)
    ledger = Ledger(store, cfg.data.hold_unknown_items_s)
    ledger.refresh()  # the first write: after every check
    learned = registry.trained_shards(parent)
    new = [s for s in ledger.new_shards(registry.lineage_of_promoted()) if s.key not in learned][: args.shards]
    if not new:
        print("no new shards to train on")
        return 1
    ensure_ray(cfg, args.log_path)
    keys, older = [s.key for s in new], [s.key for s in ledger.shards() if s.period < new[0].period]
    result = train_candidate(cfg, store, keys, older, [k for k in older if k in learned],
                             store.key_uri(model_prefix(parent)) if parent else None, f"train-{int(time.time())}")
    try:
        version = registry.create_version(
            result.export_dir, parent=parent, shards=keys, config=cfg.to_dict(redact=True),
            metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            gate={"decision": "unevaluated", "reason": "trained by `llmrec train`: no evaluation, no gate"})
    finally:
        result.discard()
    print(f"trained {version} from {parent or 'the pretrained backbone'} on {keys}")
    _print({"version": version, "metrics": result.metrics})
    print(f"next: llmrec train --init-from {version}   (continue)   |   llmrec models promote {version}   (serve it)")
    return 0


def cmd_round(args, cfg: Config) -> int:
    from llmrec_ray.pipeline import LOST_RACE, run_round  # on use: see the note above

    ensure_ray(cfg, args.log_path)
    report = run_round(cfg, Store.from_config(cfg.store), progress=True)
    _print(report.to_dict())
    if report.decision == LOST_RACE:  # exit 3 (cli), like every other lost compare-and-swap
        raise RegistryError(f"round lost the promotion race: {report.reason}; run it again to continue from the "
                            "promoted version")
    return 0


def cmd_run(args, cfg: Config) -> int:
    from llmrec_ray.pipeline import run_rounds  # on use: see the note above

    ensure_ray(cfg, args.log_path)
    run_rounds(cfg, Store.from_config(cfg.store), args.rounds)
    return 0


def cmd_models(args, cfg: Config) -> int:
    registry = Registry(Store.from_config(cfg.store))
    if args.models_command == "list":
        current = registry.promoted_version()
        for info in registry.list():
            mark = "*" if info["version"] == current else " "
            print(f"{mark} {info['version']}  parent={info.get('parent') or '-':6}  "
                  f"auc={info.get('metrics', {}).get('candidate_auc', float('nan')):.4f}  "
                  f"decision={info.get('gate', {}).get('decision', '-')}  created={info.get('created_at', '-')}")
    elif args.models_command == "show":
        _print(registry.show(args.version))
    elif args.models_command == "promote":
        registry.promote(args.version)
        print(f"promoted {args.version}")
    else:
        print(f"rolled back: {registry.rollback()} is promoted again")
    return 0


def cmd_serve(args, cfg: Config) -> int:
    from llmrec_ray.serve import run_serve  # on use: see the note above

    store = Store.from_config(cfg.store)
    if Registry(store).promoted_version() is None:  # else Serve retries replicas that never turn healthy, then fails
        raise RegistryError(f"nothing to serve: {store.uri} has no promoted model; train and promote one first "
                            f"(`llmrec round --store {store.uri}`, or `llmrec demo`)")
    ensure_ray(cfg, args.log_path)
    run_serve(cfg, blocking=True)
    return 0


def cmd_continuous(args, cfg: Config) -> int:
    from llmrec_ray.continuous import run_continuous  # on use: see the note above

    ensure_ray(cfg, args.log_path)
    run_continuous(cfg, Store.from_config(cfg.store))
    return 0


def cmd_demo(args, cfg: Config) -> int:
    from llmrec_ray.demo import run_demo  # on use: see the note above

    return run_demo(cfg, args.rounds, args.log_path)


COMMANDS: dict[str, Callable] = {
    "data": cmd_data, "train": cmd_train, "round": cmd_round, "run": cmd_run, "models": cmd_models,
    "serve": cmd_serve, "continuous": cmd_continuous, "demo": cmd_demo,
}
