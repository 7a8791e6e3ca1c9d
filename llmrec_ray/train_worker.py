"""The Ray Train worker of a round: DeepSpeed (ZeRO 0-3, gloo on CPU / nccl on GPU), BCE on one logit,
validation every `train.eval_every_steps` optimizer steps (and once before the first, so a round that cannot
improve keeps the model it started from), early stopping, the best model kept as a checkpoint + HF export.

`train_func(config)` is what `llmrec_ray.train.run_training` hands to the TorchTrainer. config keys: "cfg" (the
Config as a dict), "init_model_uri", "num_train_rows", "collab_uri", and optionally "on_step": a picklable
callable(step, rank, world) run after every optimizer step (fault injection in tests: a worker that dies there
is replaced and training resumes from the last reported checkpoint, which holds the full DeepSpeed state past step 0).

deepspeed is imported inside WorkerRound: the driver imports this module too (to ship train_func) and never needs it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from tqdm.auto import tqdm

from llmrec_ray.collab import load_collab
from llmrec_ray.config import Config, config_from_dict
from llmrec_ray.model import HybridScorer, apply_lora, build_model, load_export, save_export
from llmrec_ray.store import Store

CKPT_TAG = "best"
STATE_FILE = "state.json"  # the training counters of a step-0 checkpoint (save_best)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "cand_rows", "hist_rows", "hist_present", "hist_liked",
                    "hist_rating", "hist_rated")  # what llmrec_ray.model.encode_inputs produces


def total_steps(cfg: Config, num_train_rows: int) -> int:
    """Optimizer steps in the round: epochs over the data, capped by train.max_steps (at least 1)."""
    per_step = cfg.train.batch_size_per_worker * cfg.train.num_workers * cfg.train.grad_accum_steps
    steps = max(1, num_train_rows // per_step) * cfg.train.max_epochs
    return max(1, min(steps, cfg.train.max_steps or steps))


def deepspeed_config(cfg: Config, lr: float, num_steps: int) -> dict:
    """The DeepSpeed JSON, derived from the one config so batch sizes can never disagree."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_worker * t.grad_accum_steps * t.num_workers,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": num_steps, "warmup_min_lr": 0.0, "warmup_max_lr": lr,
            "warmup_num_steps": max(1, int(t.warmup_ratio * num_steps)), "warmup_type": "linear"}},
        "steps_per_print": 10**9,  # our own progress bar instead of DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }


def key_in(store: Store, uri: str) -> str:
    """The store key of a URI inside the store; ValueError otherwise."""
    if not uri.startswith(store.uri):
        raise ValueError(f"{uri} is not inside store {store.uri}")
    return uri[len(store.uri):].lstrip("/")


def load_start_model(cfg: Config, init_model_uri: Optional[str], collab_uri: Optional[str], scratch: Path):
    """(HybridScorer, tokenizer): the text part from the promoted export (or the backbone), LoRA-wrapped when
    configured; for model.kind=hybrid the round's collaborative tables (fitted by the driver, frozen here)
    and the promoted fusion weights. Downloads go under `scratch` (the worker's directory, removed at the end)."""
    store = Store.from_config(cfg.store)
    fusion = None
    if init_model_uri:
        start, tokenizer, _ = load_export(store.download_dir(key_in(store, init_model_uri), scratch / "init"))
        lm = start.lm
        lm.config.hidden_dropout_prob = cfg.model.dropout
        fusion = start.fusion_weights() if start.is_hybrid else None
    else:
        lm, tokenizer = build_model(cfg.model)
    if cfg.model.kind == "text":
        return HybridScorer(apply_lora(lm, cfg.model)), tokenizer
    if not collab_uri:
        raise ValueError("model.kind=hybrid needs the round's collaborative tables (collab_uri); run it through run_training")
    collab, vocab = load_collab(store.download_dir(key_in(store, collab_uri), scratch / "collab"))
    collab.requires_grad_(False)  # fitted on all history by the driver
    scorer = HybridScorer(apply_lora(lm, cfg.model), collab, vocab, fusion)
    scorer.fusion.requires_grad_(False)  # refitted by the driver after the round
    return scorer, tokenizer


def train_batches(shard, cfg: Config, epoch: int, rank: int, device):
    """One epoch of a worker's shard (a Ray Data iterator) in micro-batches. The examples arrive grouped by user;
    Ray Data's local shuffle mixes them in a buffer of `train.shuffle_buffer_rows` rows, seeded by (train.seed,
    epoch, rank): the same order on a rerun, another each epoch and worker. 0 rows: the arrival order."""
    rows, size = cfg.train.shuffle_buffer_rows, cfg.train.batch_size_per_worker
    seed = int(np.random.SeedSequence([cfg.train.seed, epoch, rank]).generate_state(1)[0])
    return shard.iter_torch_batches(batch_size=size, device=device, drop_last=True,
                                    local_shuffle_buffer_size=max(rows, size) if rows else None,
                                    local_shuffle_seed=seed if rows else None)


class WorkerRound:
    """One worker's share of a round: the DeepSpeed engine, the data shards and the early-stopping state."""

    def __init__(self, config: dict, work_dir: Path):
        import deepspeed  # see the module docstring

        # DeepSpeed would JIT-compile a shared-memory all-reduce op on CPU (~60 s per fresh machine); gloo does the job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg = cfg = config_from_dict(config["cfg"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.train.seed)
        deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.train.use_gpu else torch.device("cpu")
        if not cfg.train.use_gpu:  # intra-op threads = the worker's CPU reservation (Ray's OMP_NUM_THREADS, made explicit)
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        self.work_dir = work_dir
        model, self.tokenizer = load_start_model(cfg, config["init_model_uri"], config.get("collab_uri"), self.work_dir)
        self.lr = cfg.train.lr_incremental if config["init_model_uri"] else cfg.train.lr_first
        self.num_steps = total_steps(cfg, config["num_train_rows"])
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.lr, self.num_steps))
        self.state = {"step": 0, "best_val_loss": math.inf, "first_val_loss": None, "bad_evals": 0, "samples": 0}
        self.seconds = {"val": 0.0, "checkpoint": 0.0}  # this worker's time in validation passes / in checkpoints
        self.train_shard, self.val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def restore(self) -> bool:
        """Continue from the round's last reported checkpoint when a worker died earlier in this round."""
        restored = ray.train.get_checkpoint()
        if not restored:
            return False
        with restored.as_directory() as d:
            if (Path(d) / "deepspeed").is_dir():
                _, client_state = self.engine.load_checkpoint(str(Path(d) / "deepspeed"), tag=CKPT_TAG)
            else:  # step 0's (save_best): the engine was just built from the same start model, with a fresh optimizer
                client_state = json.loads((Path(d) / STATE_FILE).read_text())
            if self.rank == 0:  # that checkpoint is the best so far: it is the export unless a later step beats it
                shutil.copytree(Path(d) / "model", self.work_dir / "best-model")
        self.state.update({k: client_state[k] for k in self.state})
        return True

    def loss(self, batch):
        """BCE of the text part's own logits: it learns to score alone (what a new item needs); the hybrid's
        fusion weights are fitted on the validation rows after the round (llmrec_ray.train.fit_round_fusion)."""
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
        text = self.engine(**inputs, text_only=True)  # (B,) logits
        return self.loss_fn(text, batch["label"].float())

    def validation_loss(self) -> float:
        """Mean BCE over every rank's validation rows (all-reduced: every rank gets the same number)."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.engine.eval()
        with torch.no_grad():
            for batch in self.val_shard.iter_torch_batches(batch_size=self.cfg.train.batch_size_per_worker, device=self.device):
                totals[0] += self.loss(batch).double() * len(batch["label"])
                totals[1] += len(batch["label"])
        self.engine.train()
        dist.all_reduce(totals)
        return float(totals[0] / totals[1]) if totals[1] else float("nan")

    def validate_and_report(self) -> bool:
        """Validate; report (with a checkpoint when better). Returns True when training should stop."""
        state = self.state
        started = time.time()
        val_loss = self.validation_loss()
        self.seconds["val"] += time.time() - started
        if state["first_val_loss"] is None:
            state["first_val_loss"] = val_loss
        improved = val_loss < state["best_val_loss"] - 1e-6
        state["best_val_loss"], state["bad_evals"] = (val_loss, 0) if improved else (state["best_val_loss"], state["bad_evals"] + 1)
        metrics = {"step": state["step"], "val_loss": val_loss, **{k: state[k] for k in ("best_val_loss", "first_val_loss")}}
        started = time.time()  # writing the checkpoint, and Ray Train copying it to the run's storage
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(self.save_best())) if improved else None)
        self.seconds["checkpoint"] += time.time() - started
        return not math.isfinite(val_loss) or state["bad_evals"] >= self.cfg.train.patience

    def save_best(self) -> Path:
        """A checkpoint in a fresh dir, ready to report: the DeepSpeed state (all ranks) + the HF export (rank 0).
        At step 0 the DeepSpeed state is the start model and a fresh optimizer, which a replacement worker builds
        anyway as it starts: that checkpoint holds the counters (STATE_FILE) and the export only."""
        ckpt_dir = self.work_dir / f"ckpt-{self.state['step']:06d}"
        if self.state["step"] > 0:
            self.engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=CKPT_TAG, client_state=dict(self.state))
        else:
            ckpt_dir.mkdir(parents=True)
            (ckpt_dir / STATE_FILE).write_text(json.dumps(self.state))
        # ZeRO-3 partitions the weights: gathering them is a collective, every rank calls it.
        full_state = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.train.zero_stage == 3 else None
        if self.rank == 0:
            module = self.engine.module  # LoRA merging mutates the model: merge a copy so training goes on with the adapters
            export = ckpt_dir / "model"
            save_export(copy.deepcopy(module) if self.cfg.model.lora.enabled else module, self.tokenizer, self.cfg, export,
                        state_dict=full_state)
            shutil.rmtree(self.work_dir / "best-model", ignore_errors=True)
            shutil.copytree(export, self.work_dir / "best-model")
        return ckpt_dir

    def fit(self, on_step=None) -> float:
        """The training loop; returns the seconds spent in forward + backward + optimizer steps."""
        cfg, state = self.cfg, self.state
        bar = tqdm(total=self.num_steps, initial=state["step"], desc="train", unit="step", disable=self.rank != 0)
        step_seconds, stop = 0.0, False
        for epoch in range(cfg.train.max_epochs):
            for batch in train_batches(self.train_shard, cfg, epoch, self.rank, self.device):
                step_start = time.time()
                loss = self.loss(batch)
                self.engine.backward(loss)
                self.engine.step()
                step_seconds += time.time() - step_start
                state["samples"] += len(batch["label"])
                if not self.engine.is_gradient_accumulation_boundary():
                    continue
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{state['samples'] / max(step_seconds, 1e-9):.1f}")
                if on_step is not None:
                    on_step(state["step"], self.rank, self.world)
                if state["step"] % cfg.train.eval_every_steps == 0 or state["step"] >= self.num_steps:
                    stop = self.validate_and_report()
                if stop or state["step"] >= self.num_steps:
                    stop = True
                    break
            if stop:
                break
        bar.close()
        if state["step"] % cfg.train.eval_every_steps != 0 and not stop:
            self.validate_and_report()
        return step_seconds


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker (see the module docstring for `config`)."""
    # Everything this worker writes lives here, removed when the round ends however it ends (ray.train.report has
    # copied each reported checkpoint to the run's storage before it returns).
    prefix = scratch_prefix(ray.train.get_context())
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))
    remove_stale_scratch(work_dir, prefix)
    try:
        started = time.time()
        worker = WorkerRound(config, work_dir)
        run_worker(worker, config, setup_seconds=time.time() - started)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def scratch_prefix(context) -> str:
    """The temp-folder prefix of one rank of one run, e.g. "llmrec-train-round-3-r1-"."""
    return f"llmrec-train-{context.get_experiment_name()}-r{context.get_world_rank()}-"


def remove_stale_scratch(work_dir: Path, prefix: str) -> None:
    """Removes the folders a dead predecessor of this worker left on this node (same run, same rank: a killed process
    never runs its `finally`). Ray Train restarts the whole worker group, so no live worker owns such a folder."""
    for stale in work_dir.parent.glob(f"{prefix}*"):
        if stale != work_dir:
            shutil.rmtree(stale, ignore_errors=True)


def run_worker(worker: WorkerRound, config: dict, setup_seconds: float = 0.0) -> None:
    """setup_seconds: how long building `worker` took (loading the start model, the DeepSpeed engine)."""
    started = time.time()
    resumed = worker.restore()
    resumed_at_step = worker.state["step"] if resumed else None
    if not resumed:
        worker.validate_and_report()  # step 0: the starting model is the first "best"
    first_eval_seconds = time.time() - started
    started = time.time()
    step_seconds = worker.fit(config.get("on_step"))
    # Final report: the summary metrics + the best model export (rank 0), so Result has both.
    final_dir = worker.work_dir / "final"
    final_dir.mkdir()
    if worker.rank == 0:
        shutil.copytree(worker.work_dir / "best-model", final_dir / "model")
    state = worker.state
    summary = {"steps": state["step"], "best_val_loss": state["best_val_loss"], "first_val_loss": state["first_val_loss"],
               "train_seconds": time.time() - started, "setup_seconds": setup_seconds,
               "first_eval_seconds": first_eval_seconds, "val_seconds": worker.seconds["val"],
               "checkpoint_seconds": worker.seconds["checkpoint"],
               "samples_per_s_per_worker": state["samples"] / max(step_seconds, 1e-9),
               "early_stopped": state["bad_evals"] >= worker.cfg.train.patience, "lr": worker.lr, "final": True,
               "resumed": resumed, "resumed_at_step": resumed_at_step}
    ray.train.report(summary, checkpoint=Checkpoint.from_directory(str(final_dir)))
