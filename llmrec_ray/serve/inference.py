"""One loaded model version and the forward pass of a Scorer batch: plain functions over the model module, no Ray.

Each request of a batch is checked and encoded on its own (`model.encode_inputs`), so a bad input fails alone
(422) and never its batch-mates; the encoded requests then run together, serve.forward_rows rows per forward
(`model` module's forward + sigmoid), skipping the rows of requests past their deadline (504).
"""

import copy
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmrec_ray.config import Config, ServeConfig
from llmrec_ray.serve.schemas import ScoreItem

# The model module (torch, transformers) is imported inside the functions that run the model, which run in Scorer
# replicas only: the ingress replica imports this package too, and without torch it starts ~2.5 s faster in ~185 MB
# less memory.

log = logging.getLogger("llmrec.serve")


@dataclass(frozen=True)
class Loaded:
    """One version, both parts: swapped as ONE reference, so a request never sees the text part of one
    version with the collaborative tables of another."""
    model: Any  # llmrec_ray.model.HybridScorer (text part + tables + fusion)
    tokenizer: Any
    version: str
    cfg: Config  # the config the version was trained with (max_seq_len, like_threshold, history_len)
    index: Any = None  # this version's llmrec_ray.retrieval.ItemIndex (item_index.npz in its folder), or None


def load_version(store, prefix: str, version: str, cache_root: Path, quantize: str = "none", registry=None) -> Loaded:
    """Download + load one export fully into cache_root/<version>. Raises on any problem. registry: the files are
    checked against the checksum recorded when the version was registered (Registry.download_model).
    quantize (serve.quantize), CPU inference of the text part: "int8" its Linear layers as torch dynamic int8;
    "onnx-int8" exported to ONNX and quantised (ORT dynamic int8) into cache_root/<version>/onnx, run by ONNX
    Runtime with torch's thread count (the Scorer sets it from serve.num_cpus_per_replica). The collaborative part,
    the fusion and the item index's text encoder stay torch fp32."""
    from llmrec_ray.item_index import INDEX_FILE, load_index
    from llmrec_ray.model import load_export, quantize_int8

    local = cache_root / version
    if local.exists():
        shutil.rmtree(local, ignore_errors=True)
    if registry is not None:
        registry.download_model(version, local, prefix)
    else:
        store.download_dir(prefix, local)
    model, tokenizer, mcfg = load_export(local)
    index = None
    if (local / INDEX_FILE).is_file():  # with the model attached, so grow_index can add the catalogue's new items
        # its own tokenizer: the index encodes new items' texts in the poller thread while batches encode requests,
        # and a fast tokenizer used by two threads at once raises "Already borrowed"
        index = load_index(local, version=version, model=model, tokenizer=copy.deepcopy(tokenizer), cfg=mcfg)
    if quantize == "int8":
        model = quantize_int8(model)
    elif quantize == "onnx-int8":  # after load_index: the index keeps encoding new items' texts with the torch text part
        import torch

        from llmrec_ray.onnx_text import onnx_int8

        started = time.perf_counter()
        model = onnx_int8(model, local / "onnx", threads=torch.get_num_threads())
        log.info("llmrec serve: %s text part exported to ONNX int8 in %.1f s", version, time.perf_counter() - started)
    return Loaded(model, tokenizer, version, mcfg, index)


def grow_index(index, catalog) -> list[str]:
    """Index the items of `catalog` (llmrec_ray.catalog.load_catalog with resolve.TEXT_COLUMNS) that `index` lacks:
    the tables' vector for ids the model knows, else their text's (ItemIndex.add_items, no retrain). Returns the ids
    added. Searches may run meanwhile; call it from one thread at a time (reload.py holds its lock)."""
    from llmrec_ray.text import item_texts

    new = [str(i) for i in catalog.index if str(i) not in index]
    if not new:
        return []
    rows = catalog.loc[new]
    texts = item_texts(rows)  # item_id -> (candidate text, title)
    return index.add_items(new, [texts[i][0] for i in new], rows["genres"].tolist())


def follows_catalog(state: Loaded) -> bool:
    """Does the served version grow with the catalogue: an item index, or tables that give catalogue items rows?"""
    from llmrec_ray.model import grows_with_catalog

    m = state.model
    return state.index is not None or (m.is_hybrid and grows_with_catalog(m.collab, state.cfg.model))


def grow_tables(state: Loaded, catalog) -> Optional[Loaded]:
    """`state` with a row and a text vector in its collaborative tables for each item of `catalog` they lack
    (model.grow_catalog: what the next round would give an item without events), warmed up; None when there is none
    to add. `state` itself is unchanged: the caller swaps the new one in as one reference."""
    from llmrec_ray.model import grow_catalog
    from llmrec_ray.text import candidate_texts

    vocab = state.model.vocab
    new = [i for i in map(str, catalog.index) if vocab is None or i not in vocab.index]
    if not new:  # the usual case: no texts built for a catalogue the tables hold already
        return None
    model = grow_catalog(state.model, candidate_texts(catalog.loc[new]), state.cfg.model)
    if model is None:
        return None
    grown = dataclasses.replace(state, model=model)
    warm_up(grown)
    return grown


def shortlist(state: Loaded, item: ScoreItem) -> ScoreItem:
    """The retrieval stage: the request cut to the `item.shortlist` candidates the version's item index ranks best
    (llmrec_ray/retrieval.py shortlist_ids: the collaborative part's ranking -- the index's inner product plus the
    neighbour terms of the items they can lift, then its tree head over a wider list), plus every candidate the index
    does not hold (catalogue items newer than the version that grow_index has not added yet: the scorer ranks them from
    text). Unchanged without an index or when the pool is short already."""
    from llmrec_ray.retrieval import shortlist_ids

    n = item.shortlist
    if n is None or state.index is None or len(item.candidate_ids) <= n:
        return item
    ids = item.candidate_ids
    indexed = {i for i in ids if i is not None and i in state.index}  # read once: the index may grow meanwhile
    history = [i for i in item.history_ids if i is not None]
    ratings = [r for i, r in zip(item.history_ids, item.history_ratings) if i is not None]
    chosen = set(shortlist_ids(state.model, state.cfg, state.index, history, ratings, n, pool=indexed))
    keep = [k for k, i in enumerate(ids) if i not in indexed or i in chosen]
    return dataclasses.replace(item, candidate_texts=[item.candidate_texts[k] for k in keep],
                               candidate_ids=[ids[k] for k in keep], shortlist=None)


def encode_item(state: Loaded, item: ScoreItem) -> dict:
    """One request's model inputs (numpy): a bad one fails alone, never its batch-mates."""
    from llmrec_ray.model import encode_inputs

    n = len(item.candidate_texts)
    return encode_inputs(state.tokenizer, state.model.vocab, state.cfg, item.candidate_texts, [item.history_text] * n,
                         item.candidate_ids, [item.history_ids] * n, [item.history_ratings] * n)


def forward(state: Loaded, encoded: list[dict], deadlines: Optional[list[float]] = None,
            rows: int = 256) -> list[Optional[list[float]]]:
    """P(like) per request, for several requests' inputs run together `rows` rows per forward (activation memory
    stays bounded however many candidates a batch holds). A request past its deadline when its rows come up is
    skipped: None."""
    from llmrec_ray.model import predict_probs  # the model's forward + sigmoid, as score_frame runs it

    sizes = [len(e["input_ids"]) for e in encoded]
    owner = np.repeat(np.arange(len(encoded)), sizes)  # (N,) the request each row belongs to
    batch = {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}
    due = np.asarray(deadlines if deadlines is not None else [np.inf] * len(encoded), np.float64)
    probs, done = np.zeros(len(owner)), np.zeros(len(owner), bool)
    for start in range(0, len(owner), rows):
        idx = np.arange(start, min(start + rows, len(owner)))
        idx = idx[due[owner[idx]] > time.time()]
        if len(idx):
            probs[idx] = predict_probs(state.model, {k: v[idx] for k, v in batch.items()})
            done[idx] = True
    ends = np.cumsum(sizes)
    return [probs[e - n:e].tolist() if done[e - n:e].all() else None for n, e in zip(sizes, ends)]


def warm_up(state: Loaded) -> None:
    """Score a known and an unknown item once: a broken version fails here, never on a request. With an item index,
    also turn the neighbour lists round for the shortlist (retrieval.listed_by) before the first request needs it."""
    if state.index is not None:
        from llmrec_ray.retrieval import listed_by

        listed_by(state.model.collab)
    known = state.model.vocab.ids[:1] if state.model.vocab is not None else []
    ids = [*known, None]
    forward(state, [encode_item(state, ScoreItem(["warm up"] * len(ids), "no history", ids, list(known),
                                                 [float("nan")] * len(known)))])


def score_items(state: Loaded, requests: list[ScoreItem], s: ServeConfig) -> list[dict]:
    """One Scorer batch: {"probs", "version"} per request, or {"error", "status"} for that request alone."""
    late = {"error": f"no answer within serve.request_timeout_s={s.request_timeout_s:g} s", "status": 504}
    out: list[dict] = [{} for _ in requests]
    encoded, good = [], []
    now = time.time()
    for i, item in enumerate(requests):  # check and encode per request: one bad input fails alone
        try:
            item = requests[i] = shortlist(state, item)
        except Exception as exc:  # noqa: BLE001 - reported to that request only
            log.warning("llmrec serve: retrieval failed for a request: %s: %s", type(exc).__name__, exc)
            out[i] = {"error": f"retrieval failed: {type(exc).__name__}", "status": 422}
            continue
        n = len(item.candidate_texts)
        tokens = n * state.cfg.model.max_seq_len
        if item.deadline <= now:
            out[i] = late
        elif tokens > s.max_request_tokens:
            out[i] = {"error": f"{n} candidates x {state.cfg.model.max_seq_len} tokens (model.max_seq_len) = {tokens} "
                               f"tokens; serve.max_request_tokens={s.max_request_tokens}", "status": 422}
        else:
            try:
                encoded.append(encode_item(state, item))
                good.append(i)
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                log.warning("llmrec serve: request input refused: %s: %s", type(exc).__name__, exc)
                out[i] = {"error": f"input cannot be encoded: {type(exc).__name__}", "status": 422}
    if encoded:
        probs = forward(state, encoded, [requests[i].deadline for i in good], s.forward_rows)
        for i, p in zip(good, probs):
            out[i] = {"probs": p, "ids": requests[i].candidate_ids, "version": state.version} if p is not None else late
    return out
