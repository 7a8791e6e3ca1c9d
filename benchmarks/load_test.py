"""Load test of the HTTP API with locust (headless): throughput and p50/p99 as Scorer replicas are added.

    .venv/bin/pip install -c constraints.txt -e '.[load]'       # locust: an optional extra, not in CI
    .venv/bin/python benchmarks/load_test.py                      # tiny backbone, 16 users, 30 s per setting: ~4 min
    .venv/bin/python benchmarks/load_test.py --backbone minilm --seq-len 64 --replicas 1,2,4 \\
        --autoscale-max 4 --users 64 --seconds 60 --ray-cpus 16  # a bigger box: give Ray the cores it has

What it does: a private local Ray and Serve on 127.0.0.1 (nothing else on the machine is touched), a 30-item
catalogue and one promoted hybrid version (the fixtures of tests/test_serve.py), the app as `llmrec serve` builds it.
For each --replicas setting (serve.num_replicas, serve.num_cpus_per_replica=1), then once with serve.autoscaling=true
(min 1, max --autoscale-max, target_ongoing_requests --autoscale-target), --users locust users post /v1/score with
--candidates free-text candidates back to back (no think time) for --seconds (the autoscaling run for
--autoscale-seconds: Serve waits upscale_delay_s=30 s before it adds a replica). With --recommend-weight > 0 a
share of the requests is /v1/recommend over a genre pool (10 of the 30 items). Per setting: requests, answers
by status (0: no HTTP answer), req/s, p50/p99 of all answers in ms, and for the autoscaling run the Scorer's
running replicas sampled every second from serve.status(). Writes out/bench/load.{json,md}; the libraries'
output (Ray, Serve, locust) goes to out/bench/load.log.

Locust runs in a child process (this file with --drive, locust used as a library: Environment + LocalRunner):
importing locust monkey-patches the standard library with gevent, which must not happen in the process that
holds Ray's driver. The load generator shares the machine's cores with Serve, so on a small box the numbers
are a lower bound: with 2 cores, 2 replicas of 1 CPU each cannot go faster than the 2 cores allow, and the
locust process and the HTTP proxy take part of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HISTORY = [{"text": "Heat (1995)", "rating": 5}, {"text": "Jumanji (1995)", "rating": 2}]


# --- the load generator (child process: imports locust, never ray) -------------------------------------------
def drive(host: str, users: int, seconds: float, candidates: int, recommend_weight: int, out_path: str) -> None:
    """Run `users` locust users against `host` for `seconds`; write every answer's (path, status, ms) to out_path."""
    import gevent
    from locust import HttpUser, constant
    from locust.env import Environment

    score_body = {"history": HISTORY,
                  "candidates": [{"text": f"Movie number {i} (1990) | Drama"} for i in range(candidates)]}
    recommend_body = {"history": ["1", "2"], "pool": {"genre": "Comedy"}, "k": 5}

    def score(user):
        user.client.post("/v1/score", json=score_body, timeout=120)

    def recommend(user):
        user.client.post("/v1/recommend", json=recommend_body, timeout=120)

    class ApiUser(HttpUser):
        wait_time = constant(0)  # closed loop: each user sends its next request as soon as the last is answered
        tasks = {score: 10, recommend: recommend_weight} if recommend_weight > 0 else [score]

    answers = []  # (path, status, ms); status 0: connection error or timeout

    def on_request(request_type, name, response_time, response_length, response=None, exception=None, **_):
        answers.append((name, getattr(response, "status_code", 0) or 0, response_time))

    env = Environment(user_classes=[ApiUser], host=host)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    started = time.perf_counter()
    runner.start(users, spawn_rate=users)  # all users within ~1 s
    gevent.spawn_later(seconds, runner.quit)
    runner.greenlet.join()
    Path(out_path).write_text(json.dumps({"elapsed_s": time.perf_counter() - started, "answers": answers}))


def run_locust(url: str, args, seconds: float, out_dir: Path, label: str) -> dict:
    """This file with --drive in a child process; returns its answers."""
    out_path = out_dir / f"answers-{label}.json"
    cmd = [sys.executable, __file__, "--drive", url, "--users", str(args.users), "--seconds", str(seconds),
           "--candidates", str(args.candidates), "--recommend-weight", str(args.recommend_weight),
           "--answers-out", str(out_path)]
    with open(Path(args.out) / "load.log", "a") as log:  # locust's own lines, beside the libraries' (run_quietly)
        subprocess.run(cmd, check=True, timeout=seconds + 300, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(out_path.read_text())


# --- the server side (this process: Ray driver) ----------------------------------------------------------------
def summarise(label: str, run: dict, replicas_seen: list[int]) -> dict:
    import numpy as np

    answers = run["answers"]
    ms = np.array([a[2] for a in answers if a[1]], dtype=float)
    by_status: dict[str, int] = {}
    for _, status, _ in answers:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    ok = by_status.get("200", 0)
    return {"setting": label, "requests": len(answers), "ok": ok, "failures": len(answers) - ok,
            "by_status": by_status, "elapsed_s": run["elapsed_s"], "req_per_s": len(answers) / run["elapsed_s"],
            "ok_per_s": ok / run["elapsed_s"],
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "loadavg_1m_after": os.getloadavg()[0],  # other work on the machine shows here: compare runs only when it is low
            "scorer_replicas_max": max(replicas_seen, default=None),
            # seconds into the run (1 sample/s) at which the Scorer first ran its most replicas
            "scaled_to_max_after_s": replicas_seen.index(max(replicas_seen)) + 1 if replicas_seen else None,
            "scorer_replicas_timeline": replicas_seen}


def scorer_replicas() -> int:
    """RUNNING Scorer replicas of the app, from Serve's controller."""
    from ray import serve

    from llmrec_ray.serve import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    dep = app.deployments.get("Scorer") if app else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep else 0


def run_setting(base_cfg: dict, serve_over: dict, label: str, seconds: float, args, url: str, out_dir: Path) -> dict:
    """Deploy the app with serve.* = serve_over, warm every replica, load it for `seconds`, sample replicas each second."""
    import requests
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.serve import APP_NAME, build_app

    d = json.loads(json.dumps(base_cfg))
    d["serve"].update(serve_over)
    serve.run(build_app(config_from_dict(d)), name=APP_NAME, route_prefix="/")
    warm = {"history": HISTORY, "candidates": [{"text": "Toy Story (1995) | Animation, Comedy"}]}
    for _ in range(4 * max(serve_over.get("num_replicas", 1), 1)):  # the first call of each replica loads the model
        assert requests.post(f"{url}/v1/score", json=warm, timeout=120).status_code == 200
    seen, stop = [], threading.Event()

    def sample():
        while not stop.wait(1.0):
            seen.append(scorer_replicas())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = run_locust(url, args, seconds, out_dir, label.replace(" ", "_").replace("=", ""))
    finally:
        stop.set()
        sampler.join()
        serve.delete(APP_NAME)
    return summarise(label, run, seen)


def write_report(results: list[dict], args, out: Path) -> None:
    import psutil

    machine = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    (out / "load.json").write_text(json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=2))
    lines = [f"Load test: {args.users} locust users, /v1/score with {args.candidates} candidates"
             + (f" (+ /v1/recommend, weight {args.recommend_weight}:10)" if args.recommend_weight > 0 else "")
             + f", {args.backbone} backbone, {args.seq_len} tokens, {machine}.", "",
             "| setting | s | requests | answers by status | req/s | 200/s | p50 ms | p99 ms | Scorer replicas (max, from s) | load avg 1 min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {r['setting']} | {r['elapsed_s']:.0f} | {r['requests']} | {r['by_status']} | {r['req_per_s']:.1f} | "
                     f"{r['ok_per_s']:.1f} | {p(r['p50_ms'])} | {p(r['p99_ms'])} | {r['scorer_replicas_max']} (from {r['scaled_to_max_after_s']} s) | "
                     f"{r['loadavg_1m_after']:.1f} |")
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args) -> int:
    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from private_serve import start_ray_serve, write_store  # a script beside it; puts tests/ on sys.path
    from conftest import free_port

    from llmrec_ray.config import config_from_dict

    tmp = Path(tempfile.mkdtemp(prefix="llmrec-load-"))
    port = free_port()
    base = {"store": {"uri": f"file://{tmp / 'store'}"},
            "model": {"backbone": args.backbone, "max_seq_len": args.seq_len, "dropout": 0.0},
            "serve": {"host": "127.0.0.1", "port": port, "poll_interval_s": 1.0, "num_cpus_per_replica": 1.0,
                      "cache_dir": str(tmp / "cache")}}
    cfg = config_from_dict(base)
    write_store(cfg, tmp, {"v0001": 0.0})

    settings = [(f"replicas={n}", {"num_replicas": n}, args.seconds) for n in args.replicas]
    if args.autoscale_max > 0:
        settings.append((f"autoscale 1-{args.autoscale_max}",
                         {"autoscaling": True, "min_replicas": 1, "max_replicas": args.autoscale_max,
                          "target_ongoing_requests": args.autoscale_target}, args.autoscale_seconds))
    url = start_ray_serve(port, args.ray_cpus or max(max(args.replicas, default=1), args.autoscale_max) + 1, "llmrec-lray-")
    results = []
    try:
        for label, over, seconds in settings:
            results.append(run_setting(base, over, label, seconds, args, url, tmp))
            print(f"{label}: {results[-1]['req_per_s']:.1f} req/s, p50 {results[-1]['p50_ms']} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, args, out)
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="per fixed-replica setting")
    ap.add_argument("--candidates", type=int, default=10, help="per /v1/score request")
    ap.add_argument("--recommend-weight", type=int, default=0, help="/v1/recommend requests per 10 /v1/score; 0: none")
    ap.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2])
    ap.add_argument("--autoscale-max", type=int, default=2, help="0: no autoscaling run")
    ap.add_argument("--autoscale-target", type=float, default=2.0, help="serve.target_ongoing_requests")
    ap.add_argument("--autoscale-seconds", type=float, default=75.0, help="> upscale_delay_s (30 s) + a replica's start")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs for the local Ray (default: replicas + 1)")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--drive", default=None, help=argparse.SUPPRESS)  # internal: the locust child process
    ap.add_argument("--answers-out", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    if a.drive:
        drive(a.drive, a.users, a.seconds, a.candidates, a.recommend_weight, a.answers_out)
        raise SystemExit(0)
    from private_serve import run_quietly  # a script beside it; it imports Ray, which the locust child must not

    raise SystemExit(run_quietly(lambda: main(a), Path(a.out) / "load.log"))
