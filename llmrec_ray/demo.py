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


def pick_user(store, after_shard: str, catalog, history_len: int) -> Optional[dict]:
    """A real user of the period after `after_shard` with a liked and a disliked movie in it: their history
    (every rating before that movie, most recent first) and the two movies with the ratings they gave."""
    keys = [s.key for s in Ledger(store).shards()]
    later = [k for k in keys if k > after_shard]
    if not later:
        return None
    week = store.read_table(later[0]).to_pandas().sort_values("timestamp")
    for user, rows in week.groupby("user_id", sort=True):
        liked, disliked = rows[rows["label"] == 1], rows[rows["label"] == 0]
        if len(liked) and len(disliked) and liked.iloc[0]["item_id"] in catalog.index and disliked.iloc[0]["item_id"] in catalog.index:
            first = min(liked.iloc[0]["timestamp"], disliked.iloc[0]["timestamp"])
            past = pd.concat([store.read_table(k).to_pandas() for k in keys if k <= after_shard] + [rows])
            past = past[(past["user_id"] == user) & (past["timestamp"] < first)].sort_values("timestamp", ascending=False)
            history = [{"item_id": str(i), "rating": float(r)} for i, r in zip(past["item_id"], past["rating"])][:history_len]
            return {"user": str(user), "history": history, "liked": liked.iloc[0], "disliked": disliked.iloc[0]}
    return None


def sample_requests(base_url: str, catalog, pick: Optional[dict]) -> None:
    """Score a real user's liked and disliked movie of the next week: the model should rank the liked one higher."""
    if pick is None:
        return
    cands = [pick["liked"], pick["disliked"]]
    body = {"history": pick["history"], "candidates": [{"item_id": str(c["item_id"])} for c in cands]}
    out = _get_json(f"{base_url}/v1/score", body)
    shown = ", ".join(f"{catalog.loc[str(c['item_id']), 'title'][:30]!r} (rated {c['rating']:g}) -> {s['probability']:.3f}"
                      for c, s in zip(cands, out["scores"]))
    print(f"   user {pick['user']} next week ({len(pick['history'])} past ratings sent), model {out['model_version']}: {shown}")


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
