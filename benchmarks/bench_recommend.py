"""/v1/recommend over the whole MovieLens-100K catalogue (1,682 movies) through HTTP: latency at concurrency 1 on one
Scorer replica, and how much of the exhaustive top-10 the two-stage answer keeps, as serve.rerank_n and
serve.quantize vary.

    make demo                                   # first: a store with a promoted MovieLens version and its item index
    .venv/bin/python benchmarks/bench_recommend.py [--store llmrec-store] [--rerank 100,50,20] [--quantize none,onnx-int8]

Requests are real: --users users of the store's newest weekly shard, each with every rating they gave before their
first event of that week (most recent first, at most --max-history, default serve.max_history), `"pool": "all"`,
`exclude_history`, k=10.
Per setting, Serve is redeployed (a private local Ray on 127.0.0.1, 1 Scorer replica of 1 CPU, the promoted version
of --store with the config it was trained with plus the setting), answers one warm-up request, then every user's
request in turn (concurrency 1), --repeats times: p50 / p99 / max of the wall time per request. The exhaustive
answer (serve.rerank_n=0, fp32: the full scorer on every movie not in the history, ~1 min a request on one CPU) is
asked once for each of the first --exhaustive-users users; overlap@10 = |a setting's top-10 & the exhaustive
top-10| / 10 over those users (it measures the shortlist and the quantisation together). The exhaustive answers
are kept in out/bench/recommend-exhaustive.json (per store, version, seed and user count): a rerun reuses them.
--cpus-per-replica sets serve.num_cpus_per_replica (the Scorer's torch / ONNX Runtime threads); the private Ray gets
that many CPUs + 1 (the Api ingress and the HTTP proxy).
Writes out/bench/recommend-<cpus>cpu.{json,md}; the libraries' output goes to out/bench/recommend.log. Figures come from here, never from tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from private_serve import run_quietly, start_ray_serve  # noqa: E402 - a script beside it (puts tests/ on sys.path)

from conftest import free_port  # noqa: E402 - tests/conftest.py

OUT_DIR = Path("out/bench")


def user_requests(store, num_users: int, max_history: int, seed: int) -> list[dict]:
    """Bodies for --users users of the newest shard: their history before their first event of that week."""
    import pandas as pd

    from llmrec_ray.ledger import Ledger

    keys = [s.key for s in Ledger(store).shards()]
    events = pd.concat([store.read_table(k).to_pandas() for k in keys], ignore_index=True)
    week = store.read_table(keys[-1]).to_pandas()
    first = week.groupby("user_id")["timestamp"].min()
    rng = np.random.default_rng(seed)
    bodies = []
    for user in rng.permutation(sorted(first.index)):
        past = events[(events["user_id"] == user) & (events["timestamp"] < first[user])]
        if len(past) < 5:  # a newcomer with almost nothing to go on: not the case this measures
            continue
        past = past.sort_values("timestamp", ascending=False).head(max_history)
        bodies.append({"history": [{"item_id": str(i), "rating": float(r)} for i, r in zip(past["item_id"], past["rating"])],
                       "pool": "all", "k": 10, "exclude_history": True})
        if len(bodies) == num_users:
            break
    return bodies


def deploy(cfg, rerank_n: int, quantize: str, cpus: int, url: str, timeout_s: float = 600.0) -> str:
    """(Re)deploy the app with the setting; returns the version it serves once /healthz answers."""
    import requests
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.serve import APP_NAME, build_app

    d = cfg.to_dict()
    d["serve"].update(rerank_n=rerank_n, quantize=quantize, num_replicas=1, num_cpus_per_replica=float(cpus),
                      request_timeout_s=600.0)
    serve.run(build_app(config_from_dict(d)), name=APP_NAME, route_prefix="/")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        r = requests.get(f"{url}/healthz", timeout=30)
        if r.status_code == 200:
            return r.json()["version"]
        time.sleep(1.0)
    raise TimeoutError(f"Serve did not load a model within {timeout_s:.0f} s")


def ask(url: str, body: dict) -> tuple[float, list[str]]:
    import requests

    started = time.perf_counter()
    r = requests.post(f"{url}/v1/recommend", json=body, timeout=600)
    took = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"/v1/recommend answered {r.status_code}: {r.text[:300]}")
    return took, [x["item_id"] for x in r.json()["items"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="llmrec-store", help="a store `make demo` (or rounds) left, with a promoted version")
    p.add_argument("--rerank", default="100,50,20", help="serve.rerank_n values, comma-separated")
    p.add_argument("--quantize", default="none,onnx-int8", help="serve.quantize values, comma-separated")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--exhaustive-users", type=int, default=6, help="users asked exhaustively (0: no overlap@10)")
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-history", type=int, default=None,
                   help="past ratings per request, at most (default: the version's serve.max_history)")
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import yaml
    from ray import serve

    from llmrec_ray.config import config_from_dict, load_config
    from llmrec_ray.registry import Registry, model_prefix
    from llmrec_ray.store import Store

    store_cfg = load_config(None, [f"store.uri={Path(args.store).resolve()}"])
    store = Store.from_config(store_cfg.store)
    registry = Registry(store)
    version = registry.promoted_version()
    if version is None:
        raise SystemExit(f"{args.store} has no promoted version: run `make demo` first")
    trained = yaml.safe_load(store.read_bytes(f"{model_prefix(version)}/llmrec_config.yaml"))
    trained["store"] = store_cfg.to_dict()["store"]
    cfg = config_from_dict(trained)
    max_history = cfg.serve.max_history if args.max_history is None else min(args.max_history, cfg.serve.max_history)
    bodies = user_requests(store, args.users, max_history, args.seed)
    print(f"version {version} of {args.store}; {len(bodies)} users of the newest week, "
          f"history {np.mean([len(b['history']) for b in bodies]):.0f} ratings on average", flush=True)

    url = start_ray_serve(free_port(), args.cpus_per_replica + 1, "llmrec-brec-")
    cache_path = OUT_DIR / "recommend-exhaustive.json"
    cache_key = f"{Path(args.store).resolve()}|{version}|seed={args.seed}|users={len(bodies)}|history={max_history}"
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    exhaustive = {int(k): v for k, v in cached.get(cache_key, {}).items()}
    rows = []
    settings = [(q, int(n)) for q in args.quantize.split(",") for n in args.rerank.split(",")]
    if args.exhaustive_users and len(exhaustive) < min(args.exhaustive_users, len(bodies)):
        settings.insert(0, ("none", 0))
    try:
        for quantize, rerank_n in settings:
            served = deploy(cfg, rerank_n, quantize, args.cpus_per_replica, url)
            ask(url, bodies[0])  # warm-up: the first request pays one-off costs
            times, overlaps = [], []
            for _ in range(args.repeats if rerank_n else 1):
                for k, body in enumerate(bodies if rerank_n else bodies[:args.exhaustive_users]):
                    took, top = ask(url, body)
                    times.append(took)
                    if rerank_n == 0:
                        exhaustive[k] = top
                    elif k in exhaustive:
                        overlaps.append(len(set(top) & set(exhaustive[k])) / 10)
            ms = np.asarray(times) * 1000
            row = {"quantize": quantize, "rerank_n": rerank_n, "cpus_per_replica": args.cpus_per_replica,
                   "version": served, "requests": len(times),
                   "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                   "max_ms": round(float(ms.max()), 1),
                   "overlap_at_10": round(float(np.mean(overlaps)), 3) if overlaps else None,
                   "load_avg_1m": round(os.getloadavg()[0], 1)}
            rows.append(row)
            if rerank_n == 0:
                OUT_DIR.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps({**cached, cache_key: exhaustive}))
            print(f"quantize={quantize:<10} rerank_n={rerank_n or 'all':<5} p50 {row['p50_ms']:8.1f} ms  "
                  f"p99 {row['p99_ms']:8.1f} ms  overlap@10 {row['overlap_at_10']}  (load {row['load_avg_1m']})",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    meta = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "store": args.store,
            "version": version, "users": len(bodies), "max_history": max_history, "repeats": args.repeats,
            "cpus": os.cpu_count()}
    (OUT_DIR / f"recommend-{args.cpus_per_replica}cpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = ["| quantize | rerank_n | CPUs | requests | p50 ms | p99 ms | max ms | overlap@10 with exhaustive | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['quantize']} | {r['rerank_n'] or 'all (exhaustive)'} | {r['cpus_per_replica']} | {r['requests']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | "
              f"{r['max_ms']} | {r['overlap_at_10'] if r['overlap_at_10'] is not None else '-'} | {r['load_avg_1m']} |"
              for r in rows]
    (OUT_DIR / f"recommend-{args.cpus_per_replica}cpu.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_quietly(main, Path("out/bench/recommend.log")))
