"""A synthetic, drifting interaction stream at controllable scale (millions of events in seconds).

Users hold taste vectors over genres that drift from period to period (cfg.synth.drift); item
popularity follows a random walk; new items appear every period. Each event is an impression of an
item: label 1 ("click") with probability sigmoid(taste . item genres + item quality + popularity),
else label 0 ("impression"). Titles and genres are words, so a text model can learn the tastes.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from llmrec_ray.config import Config
from llmrec_ray.datasets import ImportReport, write_dataset

GENRES = ["Space", "Cooking", "Mystery", "Sports", "Romance", "History", "Music", "Travel", "Horror", "Comedy",
          "Science", "Fantasy"]
ADJECTIVES = ["Silent", "Golden", "Hidden", "Lost", "Bright", "Wild", "Frozen", "Secret", "Final", "Broken", "Crimson",
              "Endless", "Quiet", "Rapid", "Ancient", "Electric"]
NOUNS = ["Harbor", "Garden", "Signal", "Empire", "River", "Engine", "Castle", "Voyage", "Mirror", "Forest", "Circuit",
         "Kitchen", "Stadium", "Comet", "Letter", "Island"]
START_TS = 1_700_000_000 - (1_700_000_000 - 4 * 86400) % (7 * 86400)  # a Monday 00:00 UTC (aligned to weekly shards)


def _items(rng: np.random.Generator, n: int, first_period: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Catalogue rows and each item's genre indicator matrix (n, G)."""
    g = len(GENRES)
    genre_mat = np.zeros((n, g), dtype=np.float32)
    num_genres = rng.integers(1, 3, size=n)
    for k in range(2):
        pick = rng.integers(0, g, size=n)
        genre_mat[np.arange(n)[num_genres > k], pick[num_genres > k]] = 1.0
    titles = [f"{ADJECTIVES[a]} {NOUNS[b]} {i}" for i, (a, b) in
              enumerate(zip(rng.integers(0, len(ADJECTIVES), n), rng.integers(0, len(NOUNS), n)))]
    genres = ["|".join(GENRES[j] for j in np.flatnonzero(row)) for row in genre_mat]
    catalog = pd.DataFrame({"item_id": [f"s{i}" for i in range(n)], "title": titles, "genres": genres,
                            "description": None, "year": None, "first_seen": None})
    catalog["first_period"] = first_period
    return catalog, genre_mat


def generate_events(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    s, period_s = cfg.synth, cfg.data.shard_period_days * 86400
    rng = np.random.default_rng(s.seed)
    num_items = s.num_items + s.new_items_per_period * (s.num_periods - 1)
    first_period = np.concatenate([np.zeros(s.num_items, int),
                                   np.repeat(np.arange(1, s.num_periods), s.new_items_per_period)])
    catalog, genre_mat = _items(rng, num_items, first_period)
    quality = rng.normal(0.0, 0.5, num_items).astype(np.float32)
    taste = rng.normal(0.0, 1.0, (s.num_users, len(GENRES))).astype(np.float32)
    popularity = rng.normal(0.0, 1.0, num_items).astype(np.float32)
    user_weight = rng.zipf(1.5, s.num_users).astype(np.float64).clip(max=1000)
    user_p = user_weight / user_weight.sum()

    per_period = np.bincount(rng.integers(0, s.num_periods, s.num_events), minlength=s.num_periods)
    frames = []
    for p in range(s.num_periods):
        n = int(per_period[p])
        available = np.flatnonzero(first_period <= p)
        pop = np.exp(popularity[available] - popularity[available].max())
        items = rng.choice(available, size=n, p=pop / pop.sum())
        users = rng.choice(s.num_users, size=n, p=user_p)
        logit = 1.5 * (taste[users] * genre_mat[items]).sum(axis=1) + quality[items] + 0.3 * popularity[items] - 0.5
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        frames.append(pd.DataFrame({
            "user_id": np.char.add("u", users.astype(str)), "item_id": np.char.add("s", items.astype(str)),
            "event": np.where(label == 1, "click", "impression"), "rating": np.float32("nan"), "label": label,
            "timestamp": START_TS + p * period_s + rng.integers(0, period_s, n)}))
        # Drift: tastes move toward a fresh random direction, popularity random-walks.
        taste = (1 - s.drift) * taste + s.drift * rng.normal(0.0, 1.0, taste.shape).astype(np.float32)
        popularity = popularity + rng.normal(0.0, 0.3, num_items).astype(np.float32)
    events = pd.concat(frames, ignore_index=True)
    events["rating"] = None
    events["context"] = None
    first_seen = events.groupby("item_id")["timestamp"].min()
    catalog["first_seen"] = catalog["item_id"].map(first_seen).astype("Int64")
    catalog["year"] = catalog["year"].astype("Int32")
    return catalog.drop(columns="first_period"), events


def generate_synth(cfg: Config, store, progress: bool = True) -> ImportReport:
    started = time.time()
    catalog, events = generate_events(cfg)
    return write_dataset(store, catalog, events, cfg.data.shard_period_days, started, progress, desc="synth shards")
