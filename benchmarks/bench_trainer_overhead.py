"""Ray Train's own fixed cost per round: a TorchTrainer whose workers do nothing, started --runs times on the local Ray
a round uses (`train.num_workers` workers of `train.cpus_per_worker` CPUs, torch's gloo process group).

    .venv/bin/python benchmarks/bench_trainer_overhead.py [--runs 3] [--workers 2]

Prints, per run, the whole `fit()` and when rank 0's function started (both from the driver's clock); saves
out/bench_trainer_overhead.json. The libraries' output goes to out/bench_trainer_overhead.log. What it measures is
the part of `trainer_seconds` (a round's metrics) no change to our worker code can remove: starting the controller
and the worker actors, the process group, and shutting them down.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmrec_ray.config import load_config
from llmrec_ray.runtime import configure_environment, ensure_ray, quiet_output


def noop(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["stamp"]).write_text(str(time.time()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(None, [f"train.num_workers={args.workers}"])
    Path("out").mkdir(exist_ok=True)
    log_path = Path("out/bench_trainer_overhead.log")
    runs = []
    with quiet_output(log_path), tempfile.TemporaryDirectory(prefix="llmrec-overhead-") as scratch:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        configure_environment()
        ensure_ray(cfg, log_path)
        for i in range(args.runs):
            stamp = Path(scratch) / f"stamp-{i}"
            trainer = TorchTrainer(noop, train_loop_config={"stamp": str(stamp)},
                                   scaling_config=ScalingConfig(num_workers=args.workers,
                                                                resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
                                   run_config=RunConfig(name=f"noop-{i}", storage_path=str(Path(scratch) / "runs")))
            started = time.time()
            result = trainer.fit()
            fit_seconds = time.time() - started
            if result.error is not None:
                raise RuntimeError(f"run {i} failed: {result.error}")
            runs.append({"fit_seconds": round(fit_seconds, 2),
                         "function_started_after_s": round(float(stamp.read_text()) - started, 2)})
            print(f"run {i}: fit {runs[-1]['fit_seconds']:.2f} s, the workers' function started after "
                  f"{runs[-1]['function_started_after_s']:.2f} s", flush=True)
    out = Path("out/bench_trainer_overhead.json")
    out.write_text(json.dumps({"machine": "2 cores, 24 GiB, no GPU", "workers": args.workers, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
