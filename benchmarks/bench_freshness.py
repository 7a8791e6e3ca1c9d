"""Freshness of continuous mode: seconds from a shard landing in the store to Ray Serve answering with the
model that learned it (issue #6 target: <= 10 minutes with MiniLM on this machine).

    .venv/bin/python benchmarks/bench_freshness.py [--landings 2] [--work out/freshness]

Recipe: the first 4 weekly shards of MovieLens-100K go into a fresh store, a first round (the demo's
config, jobs/configs/demo.yaml: MiniLM, 64 tokens, capped rows per round) promotes a model, and Serve comes up on it.
Then continuous mode runs in a background thread (store poll continuous.poll_interval_s, Serve pointer
poll serve.poll_interval_s) and the following weeks land one shard at a time. For each landing the
script polls GET /v1/model until it names a new version and records the seconds since the landing; a
landing whose round the gate rejects is recorded as such. Results: out/freshness.json; the libraries' output
(Ray, Ray Data, Ray Train, Ray Serve, DeepSpeed) goes to <work>/freshness.log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from llmrec_ray.cli import DEMO_CONFIG
from llmrec_ray.demo import _get_json, wait_for_version


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/freshness")
    p.add_argument("--landings", type=int, default=2)
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--timeout-s", type=float, default=1200.0, help="per landing")
    args = p.parse_args()
    from llmrec_ray.runtime import quiet_output

    log_path = Path(args.work).resolve() / "freshness.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"== freshness benchmark in {args.work} (library logs: {log_path})")
    with quiet_output(log_path):
        run(args, log_path)


def run(args, log_path: Path) -> None:
    from llmrec_ray.runtime import configure_environment, ensure_ray
    from llmrec_ray.config import load_config
    from llmrec_ray.continuous import StopFlag, run_continuous
    from llmrec_ray.datasets import period_start, write_dataset, write_shard
    from llmrec_ray.datasets.movielens import load_movielens
    from llmrec_ray.pipeline import run_round
    from llmrec_ray.serve import run_serve, stop_serve
    from llmrec_ray.store import Store

    work = Path(args.work).resolve()
    shutil.rmtree(work / "store", ignore_errors=True)
    overrides = [f"store.uri={work / 'store'}", f"serve.port={args.port}", "continuous.poll_interval_s=5"]
    cfg = load_config(DEMO_CONFIG, overrides)
    store = Store.from_config(cfg.store)
    catalog, events = load_movielens(cfg.data.like_threshold)
    events = events.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    days = period_start(events["timestamp"], cfg.data.shard_period_days)
    periods = sorted(days.unique())
    first = cfg.data.first_round_shards
    write_dataset(store, catalog, events[days.isin(periods[:first])], cfg.data.shard_period_days, time.time(), progress=False)

    configure_environment()
    ensure_ray(cfg, log_path)
    started = time.time()
    first_round = run_round(cfg, store)
    if not first_round.promoted:
        raise SystemExit(f"the first round was not promoted ({first_round.reason}); nothing to serve")
    print(f"first round: {first_round.summary()} ({time.time() - started:.0f} s)")
    base_url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    run_serve(cfg, blocking=False)
    wait_for_version(base_url, first_round.version)

    reports, stop = [], StopFlag()

    def round_fn(c, s):
        report = run_round(c, s)
        reports.append(report)
        return report

    watcher = threading.Thread(target=run_continuous, args=(cfg, store, stop, round_fn), daemon=True)
    watcher.start()
    results = []
    try:
        for day in periods[first:first + args.landings]:
            serving = _get_json(f"{base_url}/v1/model")["version"]
            n_reports = len(reports)
            landed = time.time()
            key = write_shard(store, events[days == day], int(day))
            print(f"landed {key} ({int((days == day).sum())} rows); Serve answers with {serving}")
            result = {"shard": key, "rows": int((days == day).sum()), "served_before": serving}
            while time.time() - landed < args.timeout_s:
                version = _get_json(f"{base_url}/v1/model")["version"]
                if version != serving:
                    result.update(served_after=version, freshness_s=round(time.time() - landed, 1))
                    while len(reports) == n_reports:  # Serve may see the pointer before the round returns
                        time.sleep(0.2)
                    result.update(round_s=round(reports[-1].round_seconds, 1), train_s=round(reports[-1].train_seconds, 1))
                    break
                if len(reports) > n_reports and not reports[-1].promoted:
                    result.update(rejected=reports[-1].reason, round_s=round(reports[-1].round_seconds, 1))
                    break
                time.sleep(0.5)
            else:
                result["timed_out_s"] = args.timeout_s
            print(json.dumps(result))
            results.append(result)
    finally:
        stop.set()
        watcher.join(timeout=600)
        stop_serve()
    out = Path("out/freshness.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": "2 cores, 24 GiB, no GPU", "overrides": overrides, "landings": results}, indent=2))
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
