"""Serving benchmark: raw forward pass vs the batched Serve app vs an unbatched (max_batch_size=1) app, + p99 during a hot swap.

    python benchmarks/bench_serve.py --backbone tiny --requests 200        # quick
    python benchmarks/bench_serve.py --backbone minilm --seq-len 128        # the real model

Everything on 127.0.0.1 with a free port and a private local Ray; results -> out/bench_serve.json, the libraries'
output -> out/bench_serve.log.
Each request scores ONE (history, candidate) pair, so server-side batching is what packs the forward pass.
"""

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from private_serve import promote, run_quietly, start_ray_serve, write_store  # a script beside it

from conftest import free_port  # tests/, put on sys.path by private_serve


def pct(xs):
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99))}


def raw_forward(cfg, batch_sizes, seconds):
    """Tokenise + forward of the hybrid scorer (text part + tables over 1,682 ids) outside Serve, 1 thread."""
    from llmrec_ray.collab import CollabNet
    from llmrec_ray.ids import ItemVocab
    from llmrec_ray.model import HybridScorer, build_model
    from llmrec_ray.serve import Loaded, ScoreItem, encode_item, forward

    import torch

    torch.set_num_threads(1)  # same as one Serve replica with num_cpus_per_replica=1
    lm, tok = build_model(cfg.model)
    ids = [str(i) for i in range(1, 1683)]
    state = Loaded(HybridScorer(lm, CollabNet(len(ids), cfg.model.collab.dim), ItemVocab(ids)).eval(), tok, "raw", cfg)
    out = {}
    for bs in batch_sizes:
        item = ScoreItem(["Toy Story (1995) | Animation, Comedy"] * bs,
                         "Heat (1995) rated 5 ; Jumanji (1995) rated 2 ; Casino (1995) rated 4",
                         ids[:bs], ["6", "2", "17"], [5.0, 2.0, 4.0])
        forward(state, [encode_item(state, item)])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            forward(state, [encode_item(state, item)])
            n += bs
        out[bs] = n / (time.perf_counter() - t0)
    best = max(out, key=out.get)
    return {"pairs_per_s_by_batch": out, "best_batch": best, "best_pairs_per_s": out[best], "threads": 1}


def load(url, n, concurrency, on_progress=None):
    import requests

    lat, fails, versions = [], 0, []
    lock = threading.Lock()
    body = {"history": ["1", "2", "3"], "candidates": ["4"]}

    def worker(k):
        nonlocal fails
        with requests.Session() as s:
            for _ in range(k):
                t0 = time.perf_counter()
                try:
                    r = s.post(url + "/v1/score", json=body, timeout=60)
                    ok = r.status_code == 200
                    v = r.json().get("model_version") if ok else None
                except Exception:
                    ok, v = False, None
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    versions.append(v)
                    fails += 0 if ok else 1
                    done = len(lat)
                if on_progress:
                    on_progress(done)

    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(worker, per))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "failed": fails, "req_per_s": n / wall, **pct(lat)}, versions


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--raw-seconds", type=float, default=3.0)
    ap.add_argument("--out", default="out/bench_serve.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.serve import APP_NAME, build_app

    tmp = Path(tempfile.mkdtemp(prefix="llmrec-bench-"))
    port = free_port()
    cfg = config_from_dict({
        "store": {"uri": f"file://{tmp / 'store'}"},
        "model": {"backbone": args.backbone, "max_seq_len": args.seq_len, "dropout": 0.0},
        "serve": {"host": "127.0.0.1", "port": port, "poll_interval_s": 1.0, "num_cpus_per_replica": 1,
                  "max_batch_size": 32, "batch_wait_timeout_s": 0.01},
    })
    levels = [int(c) for c in args.concurrency.split(",")]
    result = {"backbone": args.backbone, "max_seq_len": args.seq_len, "machine": f"{os.cpu_count()} CPUs",
              "raw": raw_forward(cfg, [1, 8, 32], args.raw_seconds)}
    print("raw forward:", json.dumps(result["raw"]), flush=True)

    store = write_store(cfg, tmp, {"v0001": -1.0, "v0002": 1.0})
    url = start_ray_serve(port, 4, "llmrec-bray-")
    try:
        for name, mbs in (("batched", None), ("unbatched", 1)):
            serve.run(build_app(cfg, max_batch_size=mbs), name=APP_NAME, route_prefix="/")
            load(url, 20, 2)  # warm up
            result[name] = []
            for c in levels:
                r, _ = load(url, args.requests, c)
                result[name].append(r)
                print(name, json.dumps(r), flush=True)
            serve.delete(APP_NAME)

        # p99 during a hot swap (batched app, highest concurrency)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        load(url, 20, 2)
        swapped = []

        def progress(done):
            if done >= args.requests // 4 and not swapped:
                swapped.append(time.time())
                promote(store, "v0002", ["v0001", "v0002"])

        r, versions = load(url, args.requests, levels[-1], on_progress=progress)
        r["versions_seen"] = sorted({v for v in versions if v})
        result["hot_swap"] = r
        print("hot swap", json.dumps(r), flush=True)
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_quietly(main, Path("out/bench_serve.log")))
