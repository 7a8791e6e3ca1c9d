"""Ray Train + DeepSpeed: one training round, data-parallel over `train.num_workers` workers.

Driver side: `run_training()` builds a TorchTrainer whose workers run `train_func`, streaming the
"train" and "val" Ray Datasets. Worker side: DeepSpeed (ZeRO 0-3, gloo on CPU / nccl on GPU), BCE on
one logit, validation every `train.eval_every_steps` steps (and once before the first step, so a
round that cannot improve keeps the model it started from), early stopping, best model kept.

For model.kind=hybrid the driver first fits the collaborative part on all history (`fit_round_collab`,
seconds) and stages it in the store; the workers load it frozen and fine-tune the text part (and the
fusion weights) through the fused loss. `train_candidate` is that whole recipe.

A round starts from the promoted model's Hugging Face export (weights only; the optimizer restarts
with a warmup). That is the default on purpose: an HF export is independent of the worker count and
ZeRO stage, it is exactly what is served, and Adam moments from an older data distribution are of
little use for new data. Within a round, a worker that dies is replaced (FailureConfig) and training
resumes from the round's last reported checkpoint, which holds the full DeepSpeed state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmrec_ray.config import Config, config_from_dict

CKPT_TAG = "best"
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "cand_rows", "hist_rows", "hist_present", "hist_liked",
                    "hist_rating", "hist_rated")  # what llmrec_ray.model.encode_inputs produces


@dataclass
class TrainResult:
    export_dir: Path  # local folder on the driver: the best model as a Hugging Face export
    metrics: dict
    checkpoint_uri: Optional[str]


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


# --- worker side ---------------------------------------------------------------------------------
def _load_start_model(cfg: Config, init_model_uri: Optional[str], collab_uri: Optional[str]):
    """(HybridScorer, tokenizer): the text part from the promoted export (or the backbone), LoRA-wrapped when
    configured; for model.kind=hybrid the round's collaborative tables (fitted by the driver, frozen here)
    and the promoted fusion weights."""
    from llmrec_ray.collab import load_collab
    from llmrec_ray.model import HybridScorer, apply_lora, build_model, load_export
    from llmrec_ray.store import Store

    store = Store.from_config(cfg.store)
    fusion = None
    if init_model_uri:
        local = Path(tempfile.mkdtemp(prefix="llmrec-init-"))
        start, tokenizer, _ = load_export(store.download_dir(_key_in(store, init_model_uri), local))
        lm = start.lm
        lm.config.hidden_dropout_prob = cfg.model.dropout
        fusion = start.fusion_weights() if start.is_hybrid else None
    else:
        lm, tokenizer = build_model(cfg.model)
    if cfg.model.kind == "text":
        return HybridScorer(apply_lora(lm, cfg.model)), tokenizer
    if not collab_uri:
        raise ValueError("model.kind=hybrid needs the round's collaborative tables (collab_uri); run it through run_training")
    collab, vocab = load_collab(store.download_dir(_key_in(store, collab_uri), Path(tempfile.mkdtemp(prefix="llmrec-collab-"))))
    collab.requires_grad_(False)  # fitted on all history by the driver; the language model learns the residual
    return HybridScorer(apply_lora(lm, cfg.model), collab, vocab, fusion), tokenizer


def _key_in(store, uri: str) -> str:
    if not uri.startswith(store.uri):
        raise ValueError(f"{uri} is not inside store {store.uri}")
    return uri[len(store.uri):].lstrip("/")


def _forward_loss(engine, batch, loss_fn):
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    return loss_fn(engine(**inputs), batch["label"].float())  # (B,) logits from HybridScorer


def _validate(engine, val_shard, batch_size: int, device) -> float:
    """Mean BCE over every rank's validation rows (all-reduced: every rank gets the same number)."""
    import torch
    import torch.distributed as dist

    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in val_shard.iter_torch_batches(batch_size=batch_size, device=device):
            totals[0] += _forward_loss(engine, batch, loss_fn).double()
            totals[1] += len(batch["label"])
    engine.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else float("nan")


def _save_best(engine, tokenizer, cfg: Config, state: dict, rank: int, work_dir: Path) -> Path:
    """DeepSpeed checkpoint (all ranks) + HF export (rank 0) in a fresh dir, ready to report."""
    from llmrec_ray.model import save_export

    ckpt_dir = work_dir / f"ckpt-{state['step']:06d}"
    engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=CKPT_TAG, client_state=dict(state))
    # ZeRO-3 partitions the weights: gathering them is a collective, every rank calls it.
    full_state = engine._zero3_consolidated_16bit_state_dict() if cfg.train.zero_stage == 3 else None
    if rank == 0:
        export = ckpt_dir / "model"
        save_export(_copy_for_export(engine.module, cfg), tokenizer, cfg, export, state_dict=full_state)
        shutil.rmtree(work_dir / "best-model", ignore_errors=True)
        shutil.copytree(export, work_dir / "best-model")
    return ckpt_dir


def _copy_for_export(module, cfg: Config):
    """LoRA merging mutates the model: merge a copy so training can go on with the adapters."""
    if not cfg.model.lora.enabled:
        return module
    import copy

    return copy.deepcopy(module)


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker. `config` = {"cfg": Config dict, "init_model_uri", "num_train_rows", ...}."""
    import deepspeed
    import ray.train
    import torch
    from ray.train import Checkpoint
    from tqdm.auto import tqdm

    # DeepSpeed would JIT-compile a shared-memory all-reduce op on CPU (~60 s per fresh machine); gloo does the job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.train.use_gpu else torch.device("cpu")
    if not cfg.train.use_gpu:  # intra-op threads = the worker's CPU reservation (Ray's OMP_NUM_THREADS, made explicit)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    model, tokenizer = _load_start_model(cfg, config["init_model_uri"], config.get("collab_uri"))
    lr = cfg.train.lr_incremental if config["init_model_uri"] else cfg.train.lr_first
    num_steps = total_steps(cfg, config["num_train_rows"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=deepspeed_config(cfg, lr, num_steps))
    state = {"step": 0, "best_val_loss": math.inf, "first_val_loss": None, "bad_evals": 0, "samples": 0}
    work_dir = Path(tempfile.mkdtemp(prefix=f"llmrec-train-r{rank}-"))
    restored = ray.train.get_checkpoint()
    if restored:  # a worker died earlier in this round: continue from the last reported checkpoint
        with restored.as_directory() as d:
            _, client_state = engine.load_checkpoint(str(Path(d) / "deepspeed"), tag=CKPT_TAG)
            if rank == 0:  # that checkpoint is the best so far: it is the export unless a later step beats it
                shutil.copytree(Path(d) / "model", work_dir / "best-model")
        state.update({k: client_state[k] for k in state})
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    bar = tqdm(total=num_steps, initial=state["step"], desc="train", unit="step", disable=rank != 0)

    def validate_and_report() -> bool:
        """Validate; report (with a checkpoint when better). Returns True when training should stop."""
        val_loss = _validate(engine, val_shard, cfg.train.batch_size_per_worker, device)
        if state["first_val_loss"] is None:
            state["first_val_loss"] = val_loss
        improved = val_loss < state["best_val_loss"] - 1e-6
        if improved:
            state["best_val_loss"], state["bad_evals"] = val_loss, 0
        else:
            state["bad_evals"] += 1
        metrics = {"step": state["step"], "val_loss": val_loss, **{k: state[k] for k in ("best_val_loss", "first_val_loss")}}
        ckpt = Checkpoint.from_directory(str(_save_best(engine, tokenizer, cfg, state, rank, work_dir))) if improved else None
        ray.train.report(metrics, checkpoint=ckpt)
        return not math.isfinite(val_loss) or state["bad_evals"] >= cfg.train.patience

    if not restored:
        validate_and_report()  # step 0: the starting model is the first "best"
    started, stop = time.time(), False
    step_seconds = 0.0  # forward + backward + optimizer only: throughput without validation and checkpoints
    for _epoch in range(cfg.train.max_epochs):
        for batch in train_shard.iter_torch_batches(batch_size=cfg.train.batch_size_per_worker, device=device, drop_last=True):
            step_start = time.time()
            loss = _forward_loss(engine, batch, loss_fn)
            engine.backward(loss)
            engine.step()
            step_seconds += time.time() - step_start
            state["samples"] += len(batch["label"])
            if not engine.is_gradient_accumulation_boundary():
                continue
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{state['samples'] / max(step_seconds, 1e-9):.1f}")
            if config.get("_kill_at_step") == state["step"] and rank == world - 1:
                marker = Path(config["_kill_marker"])
                if not marker.exists():  # only the first attempt dies: the replacement must finish
                    marker.write_text("killed")
                    os._exit(1)
            if state["step"] % cfg.train.eval_every_steps == 0 or state["step"] >= num_steps:
                stop = validate_and_report()
            if stop or state["step"] >= num_steps:
                stop = True
                break
        if stop:
            break
    bar.close()
    if state["step"] % cfg.train.eval_every_steps != 0 and not stop:
        validate_and_report()
    # Final report: the summary metrics + the best model export (rank 0), so Result has both.
    final_dir = work_dir / "final"
    final_dir.mkdir()
    if rank == 0:
        shutil.copytree(work_dir / "best-model", final_dir / "model")
    seconds = time.time() - started
    summary = {"steps": state["step"], "best_val_loss": state["best_val_loss"], "first_val_loss": state["first_val_loss"],
               "train_seconds": seconds, "samples_per_s_per_worker": state["samples"] / max(step_seconds, 1e-9),
               "early_stopped": state["bad_evals"] >= cfg.train.patience, "lr": lr, "final": True,
               "resumed": bool(restored)}
    ray.train.report(summary, checkpoint=Checkpoint.from_directory(str(final_dir)))


# --- driver side ---------------------------------------------------------------------------------
@dataclass
class CollabStage:
    uri: str  # the fitted tables, staged in the store for the train workers
    vocab: object  # ItemVocab
    report: dict


def fit_round_collab(cfg: Config, store, history_keys: list[str], init_model_uri: Optional[str], run_name: str) -> CollabStage:
    """The hybrid's collaborative part for one round, on the driver (seconds): warm-start from the promoted
    version's tables (known ids keep their rows, new ids are appended), then fit on every event of
    `history_keys` with its own earlier history, and stage the result in the store for the workers."""
    from llmrec_ray.collab import history_arrays, fit_collab, load_collab, save_collab, warm_start
    from llmrec_ray.ingest import examples_frame

    started = time.time()
    previous = None
    if init_model_uri:
        local = Path(tempfile.mkdtemp(prefix="llmrec-collab-init-"))
        prefix = _key_in(store, init_model_uri)
        for name in ("collab.safetensors", "collab_vocab.json"):
            if store.exists(f"{prefix}/{name}"):
                (local / name).write_bytes(store.read_bytes(f"{prefix}/{name}"))
        if (local / "collab.safetensors").exists():  # a text-only parent: the tables start fresh
            previous = load_collab(local)
    frame = examples_frame(cfg, store, history_keys)
    net, vocab = warm_start(previous, frame["item_id"], cfg.model.collab.dim)
    hist = history_arrays(vocab, frame["history_ids"].tolist(), frame["history_ratings"].tolist(),
                          frame["history_labels"].tolist(), max(1, cfg.model.collab.history_len), cfg.data.like_threshold)
    c = cfg.model.collab
    fit = fit_collab(net, vocab.rows(frame["item_id"].tolist()), hist, frame["label"].to_numpy(), epochs=c.epochs,
                     batch_size=c.batch_size, lr=c.lr, l2=c.l2, seed=cfg.train.seed,
                     val_fraction=c.val_fraction)
    out = Path(tempfile.mkdtemp(prefix="llmrec-collab-"))
    save_collab(net, vocab, out)
    key = f"ray-train/{run_name}/collab"
    store.upload_dir(out, key)
    shutil.rmtree(out, ignore_errors=True)
    report = {"collab_rows": fit.num_rows, "collab_items": len(vocab), "collab_new_items": len(vocab) - (len(previous[1]) if previous else 0),
              "collab_fit_seconds": fit.seconds, "collab_seconds": time.time() - started, "collab_loss": fit.final_loss,
              "collab_epochs": fit.epochs,
              "collab_warm_start": previous is not None}
    return CollabStage(store.key_uri(key), vocab, report)


def train_candidate(cfg: Config, store, targets: list[str], older: list[str], replay: list[str],
                    init_model_uri: Optional[str], run_name: str, max_rows: Optional[int] = None) -> TrainResult:
    """The one training recipe (round, `llmrec train`, benchmarks): for model.kind=hybrid the collaborative stage
    on the driver, then Ray Data examples of `targets` (+ replay of `replay`) -> tokens -> Ray Train + DeepSpeed."""
    from llmrec_ray import ingest
    from llmrec_ray.model import model_source

    stage = fit_round_collab(cfg, store, older + targets, init_model_uri, run_name) if cfg.model.kind == "hybrid" else None
    ds = ingest.build_examples(cfg, store, targets, history_keys=older, replay_keys=replay,
                               max_rows=max_rows if max_rows is not None else cfg.data.max_rows_per_round)
    tokens = ingest.tokenize(ds, cfg, model_source(cfg.model), stage.vocab if stage else None)
    train_ds, val_ds = ingest.split_by_time(tokens, cfg.data.val_fraction)
    return run_training(cfg, train_ds, val_ds, init_model_uri, run_name, store, collab_uri=stage.uri if stage else None,
                        extra_metrics=stage.report if stage else None)


def _storage(cfg: Config, store):
    """(storage_path, storage_filesystem) for RunConfig: inside the store unless ray.storage_uri is set."""
    if cfg.ray.storage_uri:
        return cfg.ray.storage_uri, None
    return store.fs_path("ray-train"), (store.fs if store.scheme == "s3" else None)


def run_training(cfg: Config, train_ds, val_ds, init_model_uri: Optional[str], run_name: str, store,
                 extra_loop_config: Optional[dict] = None, collab_uri: Optional[str] = None,
                 extra_metrics: Optional[dict] = None) -> TrainResult:
    """One round on Ray Train. Returns the best model's export on the driver and the round's metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    num_train_rows = train_ds.count()
    if num_train_rows < cfg.train.batch_size_per_worker * cfg.train.num_workers:
        raise ValueError(f"only {num_train_rows} training rows: fewer than one global batch "
                         f"({cfg.train.batch_size_per_worker} x {cfg.train.num_workers} workers); lower "
                         "train.batch_size_per_worker or add data")
    storage_path, storage_fs = _storage(cfg, store)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict(), "init_model_uri": init_model_uri, "num_train_rows": num_train_rows,
                           "collab_uri": collab_uri, **(extra_loop_config or {})},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds, "val": val_ds},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    export_dir = Path(tempfile.mkdtemp(prefix=f"llmrec-{run_name}-"))
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", export_dir / "model")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool, str))}
    metrics["num_train_rows"] = num_train_rows
    metrics.update(extra_metrics or {})
    (export_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(export_dir / "model", metrics, result.checkpoint.path)
