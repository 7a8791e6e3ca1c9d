"""Serving under a flood: N clients at once, each asking for M candidates, while one client keeps asking for 1.

    .venv/bin/python benchmarks/bench_flood.py                         # 200 clients x 1,000 candidates, MiniLM
    .venv/bin/python benchmarks/bench_flood.py --clients 50 --backbone tiny

The situation of issue 12: without admission control, 200 x 1,000 candidates drove the Scorer replica from
1.1 GB to 6.8-10.6 GB RSS and a 1-candidate request waited about two minutes. Here: a private local Ray and
Serve on 127.0.0.1, the app as `llmrec serve` builds it (default serve.* limits), one Scorer replica. Sampled
every 0.25 s: the RSS of every Serve replica and proxy process (psutil). Reported: answers by status code,
peak RSS per process against its RSS before the flood, the 1-candidate client's latency p50/p99 during the
flood, and how long the flood took to drain. Writes out/bench/flood.{json,md}; the libraries' output goes to out/bench/flood.log.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

from private_serve import run_quietly, start_ray_serve, write_store  # a script beside it

from conftest import free_port  # tests/, put on sys.path by private_serve


def serve_processes() -> dict[int, str]:
    """pid -> role for the Serve actors of this benchmark's own Ray (its processes descend from this one)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for role in ("ServeReplica:llmrec:Scorer", "ServeReplica:llmrec:Api", "ProxyActor"):
            if role in cmd:
                out[p.pid] = role
    return out


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--client-timeout", type=float, default=120.0)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()

    import ray
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.serve import APP_NAME, build_app

    tmp = Path(tempfile.mkdtemp(prefix="llmrec-flood-"))
    port = free_port()
    cfg = config_from_dict({"store": {"uri": f"file://{tmp / 'store'}"},
                            "model": {"backbone": args.backbone, "max_seq_len": args.seq_len, "dropout": 0.0},
                            "serve": {"host": "127.0.0.1", "port": port, "poll_interval_s": 1.0}})
    write_store(cfg, tmp, {"v0001": 0.0})
    url = start_ray_serve(port, 4, "llmrec-fray-") + "/v1/score"
    history = [{"text": "Heat (1995)", "rating": 5}, {"text": "Jumanji (1995)", "rating": 2}]
    big = {"history": history, "candidates": [{"text": f"Movie number {i} (1990) | Drama"} for i in range(args.candidates)]}
    small = {"history": history, "candidates": [{"text": "Toy Story (1995) | Animation, Comedy"}]}
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        assert requests.post(url, json=small, timeout=60).status_code == 200
        procs = serve_processes()
        before = {pid: rss_mb(pid) for pid in procs}
        peak = dict(before)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for pid in procs:
                    peak[pid] = np.nanmax([peak[pid], rss_mb(pid)])
                time.sleep(0.25)

        small_lat, small_codes = [], Counter()

        def small_client():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    code = requests.post(url, json=small, timeout=args.client_timeout).status_code
                except requests.RequestException as exc:
                    code = type(exc).__name__
                small_lat.append(time.perf_counter() - t0)
                small_codes[code] += 1
                time.sleep(0.5)

        def flood_client(_):
            t0 = time.perf_counter()
            try:
                r = requests.post(url, json=big, timeout=args.client_timeout)
                return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - t0
            except requests.RequestException as exc:
                return type(exc).__name__, None, time.perf_counter() - t0

        threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=small_client, daemon=True)]
        for t in threads:
            t.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            answers = list(ex.map(flood_client, range(args.clients)))
        drained = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
        after = {pid: rss_mb(pid) for pid in procs}
    finally:
        serve.shutdown()
        ray.shutdown()

    codes = Counter(str(a[0]) for a in answers)
    result = {
        "clients": args.clients, "candidates": args.candidates, "backbone": args.backbone, "max_seq_len": args.seq_len,
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "flood_answers": dict(codes), "retry_after": sorted({a[1] for a in answers if a[1]}),
        "flood_drain_s": drained, "flood_200_latency_s_max": max((a[2] for a in answers if a[0] == 200), default=None),
        "small_client": {"requests": len(small_lat), "codes": {str(k): v for k, v in small_codes.items()},
                         "p50_s": float(np.percentile(small_lat, 50)), "p99_s": float(np.percentile(small_lat, 99))},
        "rss_mb": [{"role": procs[pid], "before": before[pid], "peak": peak[pid], "after": after[pid]} for pid in procs],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flood.json").write_text(json.dumps(result, indent=2))
    lines = [f"Flood: {args.clients} clients x {args.candidates} candidates ({args.backbone}, {args.seq_len} tokens), "
             f"{result['machine']}; drained in {drained:.0f} s.", "",
             f"Flood answers: {dict(codes)} (Retry-After {result['retry_after']}).",
             f"1-candidate client during the flood: {len(small_lat)} requests, {result['small_client']['codes']}, "
             f"p50 {result['small_client']['p50_s']:.2f} s, p99 {result['small_client']['p99_s']:.2f} s.", "",
             "| process | RSS before (MB) | peak (MB) | after (MB) |", "|---|---|---|---|"]
    lines += [f"| {r['role']} | {r['before']:.0f} | {r['peak']:.0f} | {r['after']:.0f} |" for r in result["rss_mb"]]
    (out / "flood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_quietly(main, Path("out/bench/flood.log")))
