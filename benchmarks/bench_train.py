"""Training throughput: samples/s per worker for a plain single-process torch loop vs Ray Train + DeepSpeed
(ZeRO 0/1/2, 1 and 2 workers) on the same model (the hybrid's text part: the cross-encoder), sequence length and
micro batch. Prints one line per arm and saves out/bench_train.json; the libraries' output (Ray, Ray Train,
DeepSpeed) goes to out/bench_train.log. Target: Ray+DeepSpeed per-worker throughput >= 0.8x the plain loop.

    .venv/bin/python benchmarks/bench_train.py [--backbone minilm] [--seq-len 128] [--steps 12] [--arms 0:1,1:1,1:2]

An arm is zero_stage:workers[:cpus_per_worker] (default 1 CPU). A Ray Train worker runs as many torch
threads as CPUs it reserves, so each arm is compared with the plain loop at that thread count. On this
2-core machine two 1-CPU workers fill the cores; one 2-CPU worker is the whole machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmrec_ray.runtime import configure_environment, ensure_ray, quiet_output
from llmrec_ray.config import load_config
from llmrec_ray.model import build_model, model_source
from llmrec_ray.store import Store
from llmrec_ray.text import tokenize_pairs


def frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"candidate_text": [f"Movie {i} (1995) | Comedy, Drama" for i in range(n)],
                         "history_text": [" ; ".join(f"Title {j} (1994) rated {j % 5 + 1}" for j in range(12))] * n,
                         "label": rng.integers(0, 2, n).astype(np.float32), "timestamp": np.arange(n, dtype=np.int64)})


def plain_loop(cfg, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, tokenizer = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    df = frame(cfg.train.batch_size_per_worker)
    enc = {k: torch.from_numpy(v) for k, v in tokenize_pairs(tokenizer, df.candidate_text.tolist(), df.history_text.tolist(), cfg.model.max_seq_len).items()}
    y = torch.from_numpy(df.label.to_numpy())
    model.train()
    for i in range(steps + 2):
        if i == 2:
            start = time.time()  # 2 warm-up steps
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits.squeeze(-1), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return steps * cfg.train.batch_size_per_worker / (time.time() - start)


def ray_arm(base: list[str], stage: int, workers: int, cpus: int, steps: int, tmp: str) -> dict:
    import ray

    from llmrec_ray import ingest
    from llmrec_ray.train import run_training

    cfg = load_config(None, [*base, f"train.zero_stage={stage}", f"train.num_workers={workers}", f"train.max_steps={steps}",
                             f"train.cpus_per_worker={cpus}",
                             f"train.eval_every_steps={steps}", f"store.uri={tmp}"])
    n = cfg.train.batch_size_per_worker * workers * steps
    tok = model_source(cfg.model)
    train = ingest.tokenize(ray.data.from_pandas(frame(n)), cfg, tok).materialize()
    val = ingest.tokenize(ray.data.from_pandas(frame(cfg.train.batch_size_per_worker * workers)), cfg, tok).materialize()
    res = run_training(cfg, train, val, None, f"bench-z{stage}-w{workers}-{int(time.time())}", Store.from_config(cfg.store))
    return {"zero_stage": stage, "workers": workers, "cpus_per_worker": cpus, "samples_per_s_per_worker": round(res.metrics["samples_per_s_per_worker"], 2),
            "train_seconds": round(res.metrics["train_seconds"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--arms", default="0:1,1:1,2:1,0:2,1:2,2:2,1:1:2", help="zero_stage:workers[:cpus_per_worker], comma-separated")
    args = p.parse_args()
    # model.kind=text: the language model's training loop on both sides (a hybrid round needs its collaborative
    # tables, a separate fit: the quality benchmark times it)
    base = ["model.kind=text", f"model.backbone={args.backbone}", f"model.max_seq_len={args.seq_len}",
            f"train.batch_size_per_worker={args.batch}", "train.max_failures=0", "train.patience=100"]
    cfg = load_config(None, base)
    arms = [tuple(map(int, a.split(":"))) + (1,) * (3 - len(a.split(":"))) for a in args.arms.split(",")]
    log_path = Path("out/bench_train.log")
    log_path.parent.mkdir(exist_ok=True)
    print(f"== training throughput (library logs: {log_path})")
    plain, results = {}, []
    with quiet_output(log_path):
        for threads in sorted({cpus for _, _, cpus in arms}):
            plain[threads] = plain_loop(cfg, args.steps, threads)
            print(f"plain torch loop, {threads} thread(s): {plain[threads]:.2f} samples/s", flush=True)
        configure_environment()
        ensure_ray(cfg, log_path)
        for stage, workers, cpus in arms:
            r = ray_arm(base, stage, workers, cpus, args.steps, tempfile.mkdtemp(prefix="bench-train-"))
            r["vs_plain_same_threads"] = round(r["samples_per_s_per_worker"] / plain[cpus], 2)
            print(json.dumps(r), flush=True)
            results.append(r)
    out = Path("out/bench_train.json")
    out.write_text(json.dumps({"machine": "2 cores, 24 GiB, no GPU", "backbone": args.backbone, "seq_len": args.seq_len,
                               "batch_per_worker": args.batch, "plain_samples_per_s_by_threads": {t: round(v, 2) for t, v in plain.items()}, "arms": results}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
