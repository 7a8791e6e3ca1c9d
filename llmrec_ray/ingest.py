"""Ray Data ingest: interaction shards -> one example per (user, candidate item) -> token batches.

An example's history is the user's events strictly before the event's timestamp (never the future,
never the event itself), most recent first, at most cfg.data.history_len items; earlier events of the
same period count, as they would for a served request. Rows of `target_keys` become examples; a
seeded sample of `replay_keys` rows (cfg.data.replay_ratio per new row) is replayed against
forgetting. Positive-only data (every target label is 1, e.g. purchase logs) gets
cfg.data.negatives_per_positive sampled negatives: random catalogue items the user never touched.

`examples_frame` is the pure pandas path (evaluation, tests); `build_examples` runs the same
per-user function in a Ray Data pipeline (read_parquet -> groupby(user_id).map_groups).
"""

from __future__ import annotations

import json
import zlib
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import ray
from ray.data.context import DataContext, ShuffleStrategy
from transformers import AutoTokenizer

from llmrec_ray.config import Config, config_from_dict
from llmrec_ray.ids import ItemVocab
from llmrec_ray.metrics import draw_unseen
from llmrec_ray.model import encode_inputs
from llmrec_ray.catalog import load_catalog
from llmrec_ray.text import EMPTY_HISTORY, history_entry, item_texts

EXAMPLE_COLUMNS = ["user_id", "item_id", "timestamp", "label", "candidate_text", "history_text", "is_replay",
                   "history_ids", "history_ratings", "history_labels"]
EXAMPLE_DTYPES = {"user_id": str, "item_id": str, "timestamp": np.int64, "label": np.float32,
                  "candidate_text": str, "history_text": str, "is_replay": bool,
                  "history_ids": object, "history_ratings": object, "history_labels": object}
# history_ids / history_ratings / history_labels: the same history as the text (newest first) but up to
# model.collab.history_len items, for the collaborative part of the hybrid scorer (NaN rating = none).


def _uniform(df: pd.DataFrame, salt: int) -> np.ndarray:
    """A deterministic number in [0, 1) per event: seeded sampling that Ray and pandas paths agree on."""
    keys = (df["user_id"].astype(str) + "|" + df["item_id"].astype(str) + "|" + df["timestamp"].astype(str)).astype(object)
    h = pd.util.hash_array(keys.to_numpy(dtype=object), hash_key=f"llmrec{salt % 10**10:010d}")
    return h.astype(np.float64) / 2.0**64


def _row_count(store, keys: Sequence[str]) -> int:
    return sum(store.num_rows(k) for k in keys)


def sampling_rates(cfg: Config, store, target_keys, replay_keys, max_rows: Optional[int]) -> tuple[float, float]:
    """(keep probability for target rows, keep probability for replay rows)."""
    n_target = _row_count(store, target_keys)
    keep = 1.0 if not max_rows or n_target <= max_rows else max_rows / n_target
    n_replay_pool = _row_count(store, replay_keys)
    replay = 0.0 if not n_replay_pool else min(1.0, cfg.data.replay_ratio * n_target * keep / n_replay_pool)
    return keep, replay


def mark_rows(df: pd.DataFrame, target_paths: set[str], replay_paths: set[str], keep: float, replay: float,
              seed: int) -> pd.DataFrame:
    """Flag each event row: is_target (an example to build) and is_replay (an old row replayed)."""
    u = _uniform(df, seed)
    in_target = df["_path"].isin(target_paths).to_numpy()
    in_replay = df["_path"].isin(replay_paths).to_numpy()
    df = df.copy()
    df["is_replay"] = in_replay & (u < replay)
    df["is_target"] = (in_target & (u < keep)) | df["is_replay"].to_numpy()
    return df


def _as_float(values) -> np.ndarray:
    """Ratings as float64 with NaN for missing (None / pd.NA / NaN, from pandas or numpy batches)."""
    return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def examples_from_events(cols: dict, texts: dict, history_len: int, negatives: int, all_item_ids: np.ndarray,
                         seed: int, id_history_len: int = 0) -> dict[str, np.ndarray]:
    """Examples for the events of any number of users, vectorised: numpy columns in, numpy columns out.

    `cols` holds user_id, item_id, rating, label, timestamp, is_target, is_replay (any row order). An
    example's history is its user's events with a strictly smaller timestamp (ties excluded), newest
    first; events are ordered by (user, timestamp, item_id), so the result does not depend on input order.
    """
    users = np.asarray(cols["user_id"]).astype(str)
    items = np.asarray(cols["item_id"]).astype(str)
    ts = np.asarray(cols["timestamp"], dtype=np.int64)
    order = np.lexsort((items, ts, users))
    users, items, ts = users[order], items[order], ts[order]
    ratings = _as_float(cols["rating"])[order]
    labels = np.asarray(cols["label"], dtype=np.float32)[order]
    is_target = np.asarray(cols["is_target"], dtype=bool)[order]
    replayed = np.asarray(cols["is_replay"], dtype=bool)[order]
    targets = np.flatnonzero(is_target)
    if not len(targets):
        return {c: np.array([], dtype=object if EXAMPLE_DTYPES[c] is str else EXAMPLE_DTYPES[c]) for c in EXAMPLE_COLUMNS}
    missing = sorted(set(np.unique(items).tolist()) - texts.keys())
    if missing:
        raise ValueError(f"events reference item ids not in the catalogue: {missing[:5]}; run Ledger.refresh() "
                         "(it holds such shards until a catalogue update adds the items)")
    n = len(ts)
    new_user = np.r_[True, users[1:] != users[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))  # first row of the row's user
    new_time = new_user | np.r_[True, ts[1:] != ts[:-1]]
    time_start = np.maximum.accumulate(np.where(new_time, np.arange(n), 0))  # first row of (user, timestamp)
    hist_lo = np.maximum(time_start - history_len, user_start)
    entries = [history_entry(texts[i][1], r) for i, r in zip(items, ratings)]
    cache: dict[int, str] = {}
    hists = []
    for lo, hi in zip(hist_lo[targets].tolist(), time_start[targets].tolist()):
        h = cache.get(hi)
        if h is None:
            h = cache[hi] = EMPTY_HISTORY if lo == hi else " ; ".join(reversed(entries[lo:hi]))
        hists.append(h)
    id_lo = np.maximum(time_start - id_history_len, user_start)[targets]
    id_hists = _id_histories(items, ratings, labels, id_lo, time_start[targets])
    rows, cand, lab, hist = targets, items[targets], labels[targets], np.asarray(hists, dtype=object)
    row_of = np.arange(len(targets))  # each example's index into the target rows (negatives repeat theirs)
    if negatives > 0:  # the caller decided the data set has no negatives of its own
        neg_rows, neg_items, neg_hist = [], [], []
        bounds = np.r_[np.flatnonzero(new_user), n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            mine = np.flatnonzero(is_target[a:b]) + a
            if not len(mine):
                continue
            rng = np.random.default_rng([seed, zlib.crc32(users[a].encode())])
            picks = draw_unseen(rng, all_item_ids, set(items[a:b].tolist()), len(mine), negatives)
            k = picks.shape[1]
            if not k:
                continue
            neg_rows.append(np.repeat(mine, k))
            neg_items.append(picks.reshape(-1).astype(str))
            neg_hist.append(np.repeat(np.searchsorted(targets, mine), k))
        if neg_rows:
            rows = np.concatenate([rows, *neg_rows])
            cand = np.concatenate([cand, *neg_items])
            lab = np.concatenate([lab, np.zeros(sum(len(r) for r in neg_rows), np.float32)])
            row_of = np.concatenate([row_of, *neg_hist])
            hist = hist[row_of]
    return {
        "user_id": users[rows].astype(object),
        "item_id": cand.astype(object),
        "timestamp": ts[rows],
        "label": lab.astype(np.float32),
        "candidate_text": np.asarray([texts[i][0] for i in cand], dtype=object),
        "history_text": hist.astype(object),
        "is_replay": replayed[rows],
        **{name: col[row_of] for name, col in id_hists.items()},
    }


def _id_histories(items: np.ndarray, ratings: np.ndarray, labels: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> dict[str, np.ndarray]:
    """Per target: item ids, ratings and labels of events lo..hi-1, newest first, as object arrays of lists."""
    out = {name: np.empty(len(lo), dtype=object) for name in ("history_ids", "history_ratings", "history_labels")}
    for t, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        out["history_ids"][t] = items[a:b][::-1].tolist()
        out["history_ratings"][t] = ratings[a:b][::-1].tolist()
        out["history_labels"][t] = labels[a:b][::-1].astype(np.float64).tolist()
    return out


def _frame(cols: dict) -> pd.DataFrame:
    return pd.DataFrame(cols, columns=EXAMPLE_COLUMNS).astype(EXAMPLE_DTYPES)


def user_examples(events: pd.DataFrame, texts: dict, history_len: int, negatives: int, all_item_ids: np.ndarray,
                  seed: int, id_history_len: int = 0) -> pd.DataFrame:
    """Examples for one or more users' events (a DataFrame with is_target/is_replay flags set)."""
    cols = {c: events[c].to_numpy() for c in ("user_id", "item_id", "rating", "label", "timestamp", "is_target", "is_replay")}
    return _frame(examples_from_events(cols, texts, history_len, negatives, all_item_ids, seed, id_history_len))


def negatives_for(cfg: Config, store, target_keys: Sequence[str]) -> int:
    """Sampled negatives per positive: cfg.data.negatives_per_positive when the new data is positive-only."""
    if not cfg.data.negatives_per_positive:
        return 0
    for key in target_keys:
        labels = store.read_table(key, columns=["label"]).column("label")
        if labels.null_count < len(labels) and min(labels.to_pylist()) == 0:
            return 0  # explicit negatives exist (ratings below the threshold, skipped impressions)
    return cfg.data.negatives_per_positive


def _read_events(store, keys: Sequence[str]) -> pd.DataFrame:
    frames = []
    for key in keys:
        df = store.read_table(key).to_pandas()
        df["_path"] = store.fs_path(key)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def examples_frame(cfg: Config, store, target_keys: Sequence[str], history_keys: Sequence[str] = (),
                   replay_keys: Sequence[str] = (), max_rows: Optional[int] = None,
                   catalog_version: Optional[str] = None) -> pd.DataFrame:
    """Pure pandas: the same examples `build_examples` produces, as a DataFrame sorted by time."""
    catalog = load_catalog(store, version=catalog_version)
    keys = list(dict.fromkeys([*history_keys, *replay_keys, *target_keys]))
    keep, replay = sampling_rates(cfg, store, target_keys, replay_keys, max_rows)
    events = mark_rows(_read_events(store, keys), {store.fs_path(k) for k in target_keys},
                       {store.fs_path(k) for k in replay_keys}, keep, replay, cfg.data.seed)
    texts, ids = item_texts(catalog), catalog.index.to_numpy()
    negatives = negatives_for(cfg, store, target_keys)
    frame = (user_examples(events, texts, cfg.data.history_len, negatives, ids, cfg.data.seed, cfg.model.collab.history_len)
             if len(events) else _frame({}))
    return frame.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def read_shards(store, keys: Sequence[str], num_blocks: int):
    """The shards as one Ray Dataset of `num_blocks` blocks, each row's file in column "path".

    Read by Ray Data's first Parquet datasource, in a few blocks. On the 2-core machine, Ray 2.60's default one
    (DataSourceV2) starts FooterReader actors for every read (7-10 s), and a read task per file followed by a task
    per block costs ~0.5 s a task: building a demo round's examples (10 weekly shards, 36,793 events) took 13.6 s
    (21.5 s as a session's first), 2.0-2.4 s this way (9.2 s). The datasource is chosen when the read is planned,
    so the process-wide setting is switched for this call only."""
    context = DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet([store.fs_path(k) for k in keys], filesystem=store.fs, include_paths=True,
                                     partitioning=None, override_num_blocks=num_blocks)
    finally:
        context.use_datasource_v2 = v2


def build_examples(cfg: Config, store, target_keys: Sequence[str], history_keys: Sequence[str] = (),
                   replay_keys: Sequence[str] = (), max_rows: Optional[int] = None,
                   catalog_version: Optional[str] = None):
    """The Ray Data pipeline: read the shards, flag targets/replay, build examples per user. catalog_version: the
    catalogue the texts come from (llmrec_ray/catalog.py; None: the newest)."""
    if not target_keys:
        raise ValueError("build_examples needs at least one target shard")
    catalog = load_catalog(store, version=catalog_version)
    texts, ids = item_texts(catalog), catalog.index.to_numpy()
    keys = list(dict.fromkeys([*history_keys, *replay_keys, *target_keys]))
    keep, replay = sampling_rates(cfg, store, target_keys, replay_keys, max_rows)
    targets, replays = {store.fs_path(k) for k in target_keys}, {store.fs_path(k) for k in replay_keys}
    negatives = negatives_for(cfg, store, target_keys)
    # Ray Data's defaults (a block per file, 200 hash partitions) are far too many for a small cluster: ~1 per 100k events.
    num_blocks = max(2, min(64, _row_count(store, keys) // 100_000 + 2))
    ds = read_shards(store, keys, num_blocks)

    def flag(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.rename(columns={"path": "_path"})
        return mark_rows(batch, targets, replays, keep, replay, cfg.data.seed)

    def per_user(group: dict) -> dict:
        return examples_from_events(group, texts, cfg.data.history_len, negatives, ids, cfg.data.seed,
                                    cfg.model.collab.history_len)

    ds = ds.map_batches(flag, batch_format="pandas")
    # The strategy goes on this dataset's own context: a Dataset copies the process-wide DataContext when it is
    # created, so setting DataContext.get_current() here would reach only datasets made later (the next call's).
    if cfg.data.shuffle == "sort":
        ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        return ds.groupby("user_id").map_groups(per_user, batch_format="numpy")
    ds.context.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    return ds.groupby("user_id", num_partitions=num_blocks).map_groups(per_user, batch_format="numpy")


_TOKENIZERS: dict[str, object] = {}
_INPUTS: dict[str, tuple[Config, Optional[ItemVocab]]] = {}  # run key -> (config, vocab), once per worker process


def _tokenize_batch(batch: pd.DataFrame, tokenizer_dir: str, cfg_dict: dict, inputs_key: str,
                    vocab_ids: Optional[list[str]]) -> dict:
    if tokenizer_dir not in _TOKENIZERS:  # once per Ray worker process
        _TOKENIZERS[tokenizer_dir] = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if inputs_key not in _INPUTS:  # validating the config and indexing the vocab once, not per batch
        _INPUTS[inputs_key] = (config_from_dict(cfg_dict), ItemVocab(vocab_ids) if vocab_ids is not None else None)
    cfg, vocab = _INPUTS[inputs_key]
    ids = {c: batch[c].tolist() for c in ("item_id", "history_ids", "history_ratings", "history_labels")} if vocab else {}
    enc = encode_inputs(_TOKENIZERS[tokenizer_dir], vocab, cfg, batch["candidate_text"].tolist(),
                        batch["history_text"].tolist(), ids.get("item_id"), ids.get("history_ids"),
                        ids.get("history_ratings"), ids.get("history_labels"))
    enc["label"] = batch["label"].to_numpy(np.float32)
    enc["timestamp"] = batch["timestamp"].to_numpy(np.int64)
    return enc


def tokenize(ds, cfg: Config, tokenizer_dir: str, vocab: Optional[ItemVocab] = None):
    """Adds the model's fixed-shape inputs (tokens; with a vocab the collaborative part's rows and history
    tensors); keeps only numeric columns (and label, timestamp) for Ray Train."""
    cfg_dict = cfg.to_dict()
    ids = vocab.ids if vocab is not None else None
    # what the workers cache their parsed config and vocab under: the content, so two runs never share by mistake
    inputs_key = f"{zlib.crc32(json.dumps(cfg_dict, sort_keys=True).encode()):08x}-{zlib.crc32(repr(ids).encode()):08x}"
    return ds.map_batches(_tokenize_batch, batch_format="pandas", batch_size=256,
                          fn_kwargs={"tokenizer_dir": str(tokenizer_dir), "cfg_dict": cfg_dict,
                                     "inputs_key": inputs_key, "vocab_ids": ids})


def split_by_time(ds, val_fraction: float):
    """(train, val): the latest `val_fraction` of rows by timestamp validate. Materialises `ds` once."""
    ds = ds.materialize()
    ts = np.sort(ds.select_columns(["timestamp"]).to_pandas()["timestamp"].to_numpy())
    if len(ts) < 2:
        raise ValueError(f"only {len(ts)} examples: too few to split into train and validation; add data or raise data.max_rows_per_round")
    cut = ts[min(int(len(ts) * (1 - val_fraction)), len(ts) - 1)]
    train = ds.filter(expr=f"timestamp < {int(cut)}")
    val = ds.filter(expr=f"timestamp >= {int(cut)}")
    return train, val
