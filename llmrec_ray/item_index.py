"""The item index of one version (llmrec_ray/retrieval.py searches it): built at registration, saved in the version's
folder, loaded by Serve with the version.

Items the tables hold no event of (new catalogue items: vocab row 0, or a row with only its text vector) get a
vector from their text: at build time a ridge regression is fitted from frozen text vectors of known items
(mean-pooled hidden states of the export's own text encoder, each item's text encoded once) to their item vectors,
and applied to the unknown ones. `ItemIndex.add_items` does the same, through the ItemSource and TextProjection
attached here, for items that appear after the build.

The index is saved next to a version (`save_index` -> item_index.npz, one atomic file) with the version name and a
fingerprint of the collaborative tables inside; `load_index` refuses an index of another version or model, so a
request never mixes versions. Pure numpy + torch: no Ray here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from llmrec_ray.config import Config
from llmrec_ray.ids import ItemVocab
from llmrec_ray.model import load_export
from llmrec_ray.retrieval import ItemIndex, item_table_vectors, model_key, require_hybrid
from llmrec_ray.catalog import load_catalog
from llmrec_ray.store import Store
from llmrec_ray.text import item_texts

INDEX_FILE = "item_index.npz"
FORMAT = 1
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # chosen per build by exact leave-one-out error
MAX_FIT_ITEMS = 20_000  # known items whose texts are encoded to fit the ridge (a seeded sample above this)


# --- text encoder -------------------------------------------------------------------------------------------
class TextEncoder:
    """texts -> (N, hidden) float32: mean over real tokens of the text part's last hidden states (frozen).

    Each distinct text is encoded once, alone (one segment), in batches sorted by length and padded to their longest
    row (catalogues repeat texts: 91,803 grocery products have 3,895 distinct "type | category | department" texts)."""

    def __init__(self, lm, tokenizer, max_len: int, batch_size: int = 64):
        self.body, self.tokenizer, self.max_len, self.batch_size = lm.base_model, tokenizer, max_len, batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        distinct, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
        return self._encode(distinct.tolist())[inverse.reshape(-1)] if len(distinct) < len(texts) else self._encode(list(texts))

    def _encode(self, texts: list[str]) -> np.ndarray:
        hidden = self.body.config.hidden_size
        out = np.zeros((len(texts), hidden), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        self.body.eval()
        for i in range(0, len(texts), self.batch_size):
            rows = order[i:i + self.batch_size]
            enc = self.tokenizer([texts[r] for r in rows], truncation=True, max_length=self.max_len, padding=True,
                                 return_tensors="pt")
            with torch.inference_mode():
                states = self.body(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            out[rows] = ((states * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float().numpy()
        return out


# --- text -> item vector ------------------------------------------------------------------------------------
@dataclass
class TextProjection:
    """Ridge regression from text vectors (H,) to item vectors (D,): y = (x - x_mean) @ weight + y_mean."""
    x_mean: np.ndarray  # (H,)
    weight: np.ndarray  # (H, D)
    y_mean: np.ndarray  # (D,)
    alpha: float = 0.0
    loo_r2: float = float("nan")  # leave-one-out R^2 over the known items it was fitted on (all D outputs pooled)
    num_fit: int = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.x_mean) @ self.weight + self.y_mean).astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = RIDGE_ALPHAS) -> "TextProjection":
        """The alpha with the least exact leave-one-out error (one SVD serves every alpha). Fewer than 3 rows:
        predict their mean (zeros with none)."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        n, h, d = len(x), x.shape[1], y.shape[1]
        if n < 3:
            y_mean = y.mean(0) if n else np.zeros(d)
            return cls(np.zeros(h, np.float32), np.zeros((h, d), np.float32), y_mean.astype(np.float32), num_fit=n)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        uy = u.T @ yc  # (r, D)
        best = None
        for alpha in alphas:
            shrink = s ** 2 / (s ** 2 + alpha)  # (r,)
            fitted = u @ (shrink[:, None] * uy)
            leverage = (u ** 2) @ shrink + 1.0 / n  # diagonal of the hat matrix, + the intercept's share
            loo = (yc - fitted) / (1.0 - leverage)[:, None]
            mse = float((loo ** 2).mean())
            if best is None or mse < best[0]:
                best = (mse, alpha)
        mse, alpha = best
        weight = vt.T @ ((s / (s ** 2 + alpha))[:, None] * uy)  # (H, D)
        total = float((yc ** 2).mean())
        return cls(x_mean.astype(np.float32), weight.astype(np.float32), y_mean.astype(np.float32), float(alpha),
                   1.0 - mse / total if total > 0 else float("nan"), n)


@dataclass
class ItemSource:
    """What computes vectors for new items: the model's table vectors for ids it knows, else text -> projection."""
    vocab: ItemVocab
    table: np.ndarray  # (num_items + 1, D) from item_table_vectors
    seen: np.ndarray  # (num_items + 1,) bool: the row's item had events (CollabNet.seen); the others come from text
    encode: Callable[[Sequence[str]], np.ndarray]  # texts -> (N, H)
    key: str  # model_key of the model

    @classmethod
    def from_model(cls, model, tokenizer, cfg, batch_size: int = 64) -> "ItemSource":
        require_hybrid(model)
        seen = model.collab.seen(torch.arange(len(model.vocab) + 1)).numpy()
        return cls(model.vocab, item_table_vectors(model.collab), seen,
                   TextEncoder(model.lm, tokenizer, cfg.model.max_seq_len, batch_size), model_key(model))

    def vectors(self, item_ids: Sequence[str], texts: Sequence[str], projection: TextProjection) -> tuple[np.ndarray, np.ndarray]:
        """((N, D) float32, (N,) bool from_text): table rows for known ids, the projected text vector for the rest."""
        rows = self.vocab.rows(item_ids)
        out = self.table[rows].astype(np.float32)
        from_text = ~self.seen[rows]
        if from_text.any():
            out[from_text] = projection(self.encode([texts[i] for i in np.flatnonzero(from_text)]))
        return out, from_text


# --- build / save / load ----------------------------------------------------------------------------------
def build_index(model, tokenizer, cfg, item_ids: Sequence[str], texts: Sequence[str], genres: Optional[Sequence] = None,
                *, version: str, batch_size: int = 64, max_fit_items: int = MAX_FIT_ITEMS, seed: int = 0) -> ItemIndex:
    """The item index of one version from its loaded hybrid export (llmrec_ray.model.load_export) and the catalogue
    (item ids, candidate texts as llmrec_ray.text.item_text writes them, genres 'A|B' or sets). Texts encoded: the
    unknown items' and up to `max_fit_items` known ones' (to fit the text -> item vector ridge), once each."""
    if len(texts) != len(item_ids) or (genres is not None and len(genres) != len(item_ids)):
        raise ValueError(f"build_index: {len(item_ids)} ids but {len(texts)} texts"
                         + ("" if genres is None else f" and {len(genres)} genre entries"))
    source = ItemSource.from_model(model, tokenizer, cfg, batch_size)
    ids = [str(i) for i in item_ids]
    known = np.flatnonzero(source.seen[source.vocab.rows(ids)])
    if len(known) > max_fit_items:
        known = np.sort(np.random.default_rng(seed).choice(known, max_fit_items, replace=False))
    projection = TextProjection.fit(source.encode([texts[i] for i in known]),
                                    source.table[source.vocab.rows([ids[i] for i in known])])
    vectors, from_text = source.vectors(ids, list(texts), projection)
    return ItemIndex(ids, vectors, version=version, model_key=source.key, from_text=from_text, genres=genres,
                     projection=projection, source=source)


def save_index(index: ItemIndex, out_dir: str | Path) -> Path:
    """<out_dir>/item_index.npz, written atomically (temp file + rename): readers see the old index or the new one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols, p = index.columns, index.projection
    meta = {"format": FORMAT, "version": index.version, "model_key": index.model_key, "dim": index.dim,
            "item_ids": cols.item_ids, "genres": ["|".join(sorted(g)) for g in cols.genres],
            "projection": None if p is None else {"alpha": p.alpha, "loo_r2": p.loo_r2, "num_fit": p.num_fit}}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), "vectors_t": cols.vectors_t,
              "from_text": cols.from_text}
    if p is not None:
        arrays.update(proj_x_mean=p.x_mean, proj_weight=p.weight, proj_y_mean=p.y_mean)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{INDEX_FILE}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, out_dir / INDEX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_dir / INDEX_FILE


def load_index(index_dir: str | Path, *, version: str, model=None, tokenizer=None, cfg=None) -> ItemIndex:
    """The index saved in index_dir for `version`. ValueError when it is missing, unreadable, of another version, or
    (with `model`) built from other tables. With model + tokenizer + cfg the model is attached for add_items."""
    path = Path(index_dir) / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"no item index at {path}; build it at promotion (llmrec_ray.item_index.build_index + save_index)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != "meta"}
        assert meta["format"] == FORMAT, f"format {meta['format']}, this code reads {FORMAT}"
    except Exception as exc:  # truncated file, bad JSON, another format: one clear error
        raise ValueError(f"item index {path} cannot be loaded: {type(exc).__name__}: {exc}; rebuild it") from None
    if meta["version"] != version:
        raise ValueError(f"item index {path} was built for version {meta['version']!r}, not {version!r}; "
                         "serve each version with its own index (rebuild it for this version)")
    if model is not None and model_key(model) != meta["model_key"]:
        raise ValueError(f"item index {path} (version {version}) was built from other collaborative tables than the "
                         "model given; rebuild it from this version's export")
    projection = None
    if "proj_weight" in arrays:
        p = meta["projection"]
        projection = TextProjection(arrays["proj_x_mean"], arrays["proj_weight"], arrays["proj_y_mean"], p["alpha"],
                                    p["loo_r2"], p["num_fit"])
    source = None
    if model is not None and tokenizer is not None and cfg is not None:
        source = ItemSource.from_model(model, tokenizer, cfg)
    return ItemIndex(meta["item_ids"], arrays["vectors_t"].T, version=meta["version"], model_key=meta["model_key"],
                     from_text=arrays["from_text"], genres=meta["genres"], projection=projection, source=source)


def index_builder(cfg: Config, store: Store):
    """For a hybrid export: the version's item index (retrieval stage of /v1/recommend), saved in its folder."""
    def build(export_dir: Path, version: str) -> None:
        model, tokenizer, mcfg = load_export(export_dir)
        if not model.is_hybrid:
            return
        catalog = load_catalog(store, ["title", "genres", "description"])
        texts = item_texts(catalog)
        ids = list(catalog.index)
        save_index(build_index(model, tokenizer, mcfg, ids, [texts[i][0] for i in ids], catalog["genres"].tolist(),
                               version=version), export_dir)
    return build if cfg.model.kind == "hybrid" else None
