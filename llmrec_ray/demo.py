"""`llmrec demo`: the whole loop on the embedded default, end to end, with Serve up the whole time.

Recipe: import MovieLens-100K into weekly shards (once) -> a first round from the pretrained MiniLM ->
incremental rounds, each evaluated, gated and promoted -> after every promotion, real HTTP scoring
requests show the version change -> a per-round table and a PNG plot.

Its config is jobs/configs/demo.yaml, sized for a 2-core machine: short texts (64 tokens, 5 history items)
and a cap on training and evaluation rows per round. Every value is a normal config key; pass
`--set key=value` to change one, or `--config FILE` for another file.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pandas as pd

from llmrec_ray.config import Config
from llmrec_ray.datasets.movielens import import_movielens
from llmrec_ray.ledger import Ledger
from llmrec_ray.pipeline import RoundReport, run_round
from llmrec_ray.registry import Registry
from llmrec_ray.report import write_report
from llmrec_ray.runtime import ensure_ray
from llmrec_ray.catalog import has_catalog, load_catalog
from llmrec_ray.serve import run_serve, stop_serve
from llmrec_ray.store import Store


def _get_json(url: str, body: dict | None = None, timeout_s: float = 30.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_for_version(base_url: str, version: str, timeout_s: float = 120.0) -> float:
    """Seconds until the Serve app answers with `version`; raises TimeoutError."""
    start = time.time()
    while time.time() - start < timeout_s:
        try:
            if _get_json(f"{base_url}/v1/model", timeout_s=5).get("version") == version:
                return time.time() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Serve did not switch to {version} within {timeout_s:.0f} s")


def next_week_sample(week: pd.DataFrame, known_items, returning_users=None, max_items: int = 8) -> Optional[pd.DataFrame]:
    """The demo's sample: among `returning_users` (None: every user of `week`), the user whose first `max_items` rated
    movies (the catalogue's, in time order) hold the most liked x disliked pairs (ties: the smallest user id), those
    rows in time order; None when no such user has a liked and a disliked one. Chosen by the ratings alone, never
    by the model's scores."""
    best, best_pairs = None, 0
    rows = week[week["item_id"].astype(str).isin(known_items)]
    if returning_users is not None:
        rows = rows[rows["user_id"].isin(returning_users)]
    for _user, mine in rows.sort_values(["timestamp", "item_id"], kind="stable").groupby("user_id", sort=True):
        mine = mine.head(max_items)
        pairs = int((mine["label"] == 1).sum()) * int((mine["label"] == 0).sum())
        if pairs > best_pairs:
            best, best_pairs = mine, pairs
    return best


def ordered_pairs(scores, labels) -> tuple[int, int]:
    """(liked x disliked pairs the scores put in the right order -- the liked one strictly higher --, all such pairs)."""
    liked = [s for s, y in zip(scores, labels) if y == 1]
    disliked = [s for s, y in zip(scores, labels) if y == 0]
    return sum(a > b for a in liked for b in disliked), len(liked) * len(disliked)


def pick_user(store, after_shard: str, catalog, history_len: int) -> Optional[dict]:
    """A real user of the period after `after_shard` who rated movies before it (next_week_sample): their history
    (every rating before the first of their sampled movies, most recent first) and those movies with their ratings."""
    keys = [s.key for s in Ledger(store).shards()]
    later = [k for k in keys if k > after_shard]
    if not later:
        return None
    week = store.read_table(later[0]).to_pandas()
    earlier = pd.concat([store.read_table(k).to_pandas() for k in keys if k <= after_shard])
    movies = next_week_sample(week, set(catalog.index.astype(str)), set(earlier["user_id"]))
    if movies is None:
        return None
    user, first = movies["user_id"].iloc[0], movies["timestamp"].min()
    past = pd.concat([earlier, week])
    past = past[(past["user_id"] == user) & (past["timestamp"] < first)].sort_values("timestamp", ascending=False)
    history = [{"item_id": str(i), "rating": float(r)} for i, r in zip(past["item_id"], past["rating"])][:history_len]
    return {"user": str(user), "history": history, "movies": movies}


def sample_requests(base_url: str, catalog, pick: Optional[dict]) -> None:
    """Score a real user's next-week movies in one request and print them by score with the rating the user gave:
    the liked ones (label 1) should come first."""
    if pick is None:
        return
    movies = pick["movies"]
    body = {"history": pick["history"], "candidates": [{"item_id": str(i)} for i in movies["item_id"]]}
    out = _get_json(f"{base_url}/v1/score", body)
    scores = [s["probability"] for s in out["scores"]]
    right, total = ordered_pairs(scores, movies["label"].tolist())
    print(f"   user {pick['user']}'s next {len(movies)} movies ({len(pick['history'])} past ratings sent), "
          f"model {out['model_version']}: {right} of {total} liked/disliked pairs in the right order")
    for score, (_, m) in sorted(zip(scores, movies.iterrows()), key=lambda t: -t[0]):
        mark = "liked   " if m["label"] == 1 else "disliked"
        print(f"     {score:.3f}  {mark} (rated {m['rating']:g})  {catalog.loc[str(m['item_id']), 'title'][:50]}")


def run_demo(cfg: Config, rounds: int, log_path: Optional[Path] = None, out_dir: str | Path = "out/demo") -> int:
    """Import (once), 1 + `rounds` rounds with Serve up from the first promotion, then the report. log_path: see
    runtime.ensure_ray."""
    started = time.time()
    store = Store.from_config(cfg.store)
    print(f"== llmrec demo: store {store.uri}")
    if not has_catalog(store):
        rep = import_movielens(cfg, store)
        print(f"== imported MovieLens-100K: {rep.num_rows:,} ratings in {rep.num_shards} weekly shards ({rep.seconds:.1f} s)")
    ensure_ray(cfg, log_path)
    catalog, registry = load_catalog(store), Registry(store)
    base_url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    serving, reports = False, []
    try:
        for i in range(rounds + 1):
            label = f"== round {i + 1}/{rounds + 1}"
            report = run_round(cfg, store, progress=True, desc=label)
            reports.append(report)
            print(f"{label}: {report.summary()}")
            promoted = registry.promoted_version()
            if promoted and not serving:
                run_serve(cfg, blocking=False)
                serving = True
                print(f"== Serve is up at {base_url} (docs: {base_url}/docs)")
            if serving and report.promoted:
                waited = wait_for_version(base_url, promoted)
                print(f"   Serve answers with {promoted} ({waited:.1f} s after promotion)")
                sample_requests(base_url, catalog, pick_user(store, report.round_shards[-1], catalog, cfg.serve.max_history))
            elif serving:
                print(f"   the gate kept {promoted}: Serve goes on answering with it; the next round learns "
                      "this round's data together with the next week's")
        _finish(reports, store, base_url, Path(out_dir), started)
    finally:
        if serving:
            stop_serve()
    return 0


def _finish(reports: list[RoundReport], store: Store, base_url: str, out_dir: Path, started: float) -> None:
    paths = write_report(reports, out_dir)
    print(Path(paths["markdown"]).read_text())
    print(f"== done in {time.time() - started:.0f} s. Report: {paths['markdown']}  plot: {paths['plot']}")
    print(f"== the store (shards, ledger, registry, checkpoints) is at {store.uri}")
    print(f"== serve it again: llmrec serve --store {store.uri}   then:\n"
          f"   curl -s {base_url}/v1/model\n"
          f"   curl -s -XPOST {base_url}/v1/recommend -H 'Content-Type: application/json' "
          "-d '{\"history\": [{\"item_id\": \"1\", \"rating\": 5}], \"pool\": \"all\", \"k\": 5}'")
