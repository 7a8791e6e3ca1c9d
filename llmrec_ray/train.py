"""Ray Train + DeepSpeed: one training round, data-parallel over `train.num_workers` workers (driver side).

`run_training()` builds a TorchTrainer whose workers run `llmrec_ray.train_worker.train_func`, streaming the
"train" and "val" Ray Datasets; it returns the best model's export and the round's metrics.

For model.kind=hybrid the driver first fits the collaborative part on all history (`fit_round_collab`,
seconds) and stages it in the store; the workers load it frozen and fine-tune the text part on its own BCE;
then the driver fits the fusion weights on the validation rows (`fit_round_fusion`, stacking, seconds) and
writes them into the export. `train_candidate` is that whole recipe.

A round starts from the promoted model's Hugging Face export (weights only; the optimizer restarts
with a warmup). That is the default on purpose: an HF export is independent of the worker count and
ZeRO stage, it is exactly what is served, and Adam moments from an older data distribution are of
little use for new data. Within a round, a worker that dies is replaced (FailureConfig) and training
resumes from the round's last reported checkpoint, which holds the full DeepSpeed state. Once the best model is
copied out, the run's storage (its checkpoints, ~0.5 GB a MiniLM round, and the staged tables) is deleted: a run is
never resumed across rounds (each has a fresh name). A failed run's checkpoints stay, for inspection.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from llmrec_ray import ingest
from llmrec_ray.catalog import load_catalog
from llmrec_ray.collab import COLLAB_FILES, fit_collab, load_collab, save_collab
from llmrec_ray.ids import HIST_KEYS, ItemVocab, history_arrays
from llmrec_ray.config import Config
from llmrec_ray.model import collab_tables, fit_fusion, fuse, load_export, model_source, read_fusion, write_fusion
from llmrec_ray.text import candidate_texts
from llmrec_ray.train_worker import MODEL_INPUT_KEYS, key_in, train_func

FUSION_MAX_ROWS = 20_000  # validation rows the fusion weights are fitted on, at most
FUSION_MIN_ROWS = 50  # fewer validation rows: the export keeps the prior's weights (refitted on ~20 rows a round,
# they walked from round to round and cost a study round 0.056 AUC against its own tables: study_incremental.py)


@dataclass
class TrainResult:
    export_dir: Path  # local folder on the driver: the best model as a Hugging Face export
    metrics: dict
    scratch: Optional[Path] = None  # the driver's temporary folder holding export_dir

    def discard(self) -> None:
        """Remove the driver's local copy once it is registered or uploaded (the run's checkpoints stay in storage)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class CollabStage:
    uri: str  # the fitted tables, staged in the store for the train workers
    vocab: ItemVocab
    report: dict


def fit_round_collab(cfg: Config, store, history_keys: list[str], init_model_uri: Optional[str], run_name: str,
                     catalog_version: Optional[str] = None) -> CollabStage:
    """The hybrid's collaborative part for one round, on the driver (seconds): warm-start from the promoted
    version's tables (known ids keep their rows, new ids are appended), then fit on every event of
    `history_keys` with its own earlier history, and stage the result in the store for the workers."""
    started = time.time()
    previous = None
    if init_model_uri:
        with tempfile.TemporaryDirectory(prefix="llmrec-collab-init-") as d:
            local, prefix = Path(d), key_in(store, init_model_uri)
            for name in COLLAB_FILES:
                if store.exists(f"{prefix}/{name}"):
                    (local / name).write_bytes(store.read_bytes(f"{prefix}/{name}"))
            if all((local / name).exists() for name in COLLAB_FILES):  # else a text-only parent: the tables start fresh
                previous = load_collab(local)
    frame = ingest.examples_frame(cfg, store, history_keys, catalog_version=catalog_version)
    texts = candidate_texts(load_catalog(store, version=catalog_version))
    net, vocab, encoded = collab_tables(previous, frame["item_id"], texts, cfg.model)
    hist = history_arrays(vocab, frame["history_ids"].tolist(), frame["history_ratings"].tolist(),
                          frame["history_labels"].tolist(), max(1, cfg.model.collab.history_len), cfg.data.like_threshold)
    c = cfg.model.collab
    fit = fit_collab(net, vocab.rows(frame["item_id"].tolist()), hist, frame["label"].to_numpy(), seed=cfg.train.seed,
                     users=frame["user_id"].to_numpy(), **c.fit_kwargs(warm=previous is not None))
    out = Path(tempfile.mkdtemp(prefix="llmrec-collab-"))
    save_collab(net, vocab, out)
    key = f"ray-train/{run_name}/collab"
    store.upload_dir(out, key)
    shutil.rmtree(out, ignore_errors=True)
    report = {"collab_rows": fit.num_rows, "collab_items": len(vocab), "collab_new_items": len(vocab) - (len(previous[1]) if previous else 0),
              "collab_fit_seconds": fit.seconds, "collab_seconds": time.time() - started, "collab_loss": fit.final_loss,
              "collab_epochs": fit.epochs, "collab_head_rows": fit.head_rows, "collab_texts_encoded": encoded,
              "collab_warm_start": previous is not None}
    return CollabStage(store.key_uri(key), vocab, report)


def train_candidate(cfg: Config, store, targets: list[str], older: list[str], replay: list[str],
                    init_model_uri: Optional[str], run_name: str, max_rows: Optional[int] = None,
                    catalog_version: Optional[str] = None) -> TrainResult:
    """The one training recipe (round, `llmrec train`, benchmarks): for model.kind=hybrid the collaborative stage
    on the driver, then Ray Data examples of `targets` (+ replay of `replay`) -> tokens -> Ray Train + DeepSpeed.
    catalog_version: the catalogue the item texts come from (None: the newest)."""
    stage = (fit_round_collab(cfg, store, older + targets, init_model_uri, run_name, catalog_version)
             if cfg.model.kind == "hybrid" else None)
    try:
        started = time.time()
        ds = ingest.build_examples(cfg, store, targets, history_keys=older, replay_keys=replay,
                                   max_rows=max_rows if max_rows is not None else cfg.data.max_rows_per_round,
                                   catalog_version=catalog_version)
        tokens = ingest.tokenize(ds, cfg, model_source(cfg.model), stage.vocab if stage else None)
        train_ds, val_ds = ingest.split_by_time(tokens, cfg.data.val_fraction)  # runs the pipeline
        data_seconds = time.time() - started
        result = run_training(cfg, train_ds, val_ds, init_model_uri, run_name, store,
                              collab_uri=stage.uri if stage else None, extra_metrics=stage.report if stage else None)
        result.metrics["data_seconds"] = data_seconds
    finally:  # the staged tables (inside the run's storage unless ray.storage_uri puts that elsewhere)
        if stage:
            store.delete_prefix(key_in(store, stage.uri))
    if stage:  # prior: the promoted version's fusion weights when it has the tables too, else the tables alone
        result.metrics.update(fit_round_fusion(result.export_dir, val_ds, from_parent=stage.report["collab_warm_start"]))
    return result


def fit_round_fusion(export_dir: Path, val_ds, from_parent: bool) -> dict:
    """Fit the exported hybrid's fusion weights on the round's validation rows (stacking: neither part trained on
    them; llmrec_ray.model.fit_fusion) and rewrite its fusion.json. from_parent: the export's weights are the
    promoted version's (the workers keep them) and are the fit's prior; else the prior is the tables alone. With
    fewer than FUSION_MIN_ROWS validation rows the prior is written unchanged.
    Returns the figures for the round's metrics."""
    started = time.time()
    start = read_fusion(export_dir)
    prior = start if from_parent else [0.0] * 4
    n = min(val_ds.count(), FUSION_MAX_ROWS)  # counted before loading the model: a small round never needs it
    # With too few rows to move four numbers, the prior stands.
    figures = {"fusion_rows": n, "fusion_refit": n >= FUSION_MIN_ROWS}
    weights = prior
    if figures["fusion_refit"]:
        model, _, _ = load_export(export_dir)
        cols = {k: [] for k in ("lm_logit", "cf", "cf_unknown", "unknown", "labels")}
        with torch.no_grad():  # four weights need few rows; the cap bounds the driver's transformer passes
            for batch in val_ds.limit(FUSION_MAX_ROWS).iter_torch_batches(batch_size=64):
                inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
                lm_logit, cf, unknown = model.parts(**inputs)
                cols["lm_logit"].append(lm_logit)
                cols["cf"].append(cf)
                hist, rows = {k: inputs[k] for k in HIST_KEYS}, inputs["cand_rows"]
                cols["cf_unknown"].append(model.collab(rows, **hist, stats_rows=torch.zeros_like(rows)))
                cols["unknown"].append(unknown)
                cols["labels"].append(batch["label"].float())
        c = {k: torch.cat(v).double() for k, v in cols.items()}

        def val_loss(w: list[float]) -> float:
            logit = fuse(c["cf"], c["lm_logit"], c["unknown"], w)
            return float(torch.nn.functional.binary_cross_entropy_with_logits(logit, c["labels"]))

        weights = fit_fusion(**c, prior=prior)
        figures.update(fusion_val_loss_start=val_loss(start), fusion_val_loss=val_loss(weights),
                       fusion_val_loss_tables_alone=val_loss([0.0] * 4))
    write_fusion(export_dir, weights)
    return {"fusion": " ".join(f"{w:.4f}" for w in weights), **figures, "fusion_seconds": time.time() - started}


def _storage(cfg: Config, store):
    """(storage_path, storage_filesystem) for RunConfig: inside the store unless ray.storage_uri is set."""
    if cfg.ray.storage_uri:
        return cfg.ray.storage_uri, None
    return store.fs_path("ray-train"), (store.fs if store.scheme == "s3" else None)


def delete_run_storage(result) -> None:
    """Delete a finished Ray Train run's storage (its checkpoints), wherever RunConfig put it: the store or
    ray.storage_uri, a local folder or S3."""
    result.filesystem.delete_dir(result.path)


def run_training(cfg: Config, train_ds, val_ds, init_model_uri: Optional[str], run_name: str, store,
                 extra_loop_config: Optional[dict] = None, collab_uri: Optional[str] = None,
                 extra_metrics: Optional[dict] = None) -> TrainResult:
    """One round on Ray Train. Returns the best model's export on the driver and the round's metrics."""
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
    started = time.time()
    result = trainer.fit()
    trainer_seconds = time.time() - started
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    export_dir = Path(tempfile.mkdtemp(prefix=f"llmrec-{run_name}-"))
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", export_dir / "model")
    delete_run_storage(result)  # the export above is all a round keeps
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool, str))}
    metrics.update(num_train_rows=num_train_rows, trainer_seconds=trainer_seconds,
                   export_seconds=time.time() - started - trainer_seconds)
    metrics.update(extra_metrics or {})
    return TrainResult(export_dir / "model", metrics, scratch=export_dir)
