"""The retrieval stage (llmrec_ray/retrieval.py): its latency at catalogue scale and its quality on MovieLens-100K.

    .venv/bin/python benchmarks/bench_retrieval.py                      # both parts, ~15 min on 2 busy cores
    .venv/bin/python benchmarks/bench_retrieval.py --part latency       # ~1 min
    .venv/bin/python benchmarks/bench_retrieval.py --part quality --users 0   # every user of the week: 22, ~30 min

latency  top-100 over a synthetic catalogue of --items (1,000,000) vectors of dim 17 (the collaborative dim 16 + 1),
         single requests with 50 history items excluded, at 1 torch thread (one Serve replica's CPU): p50/p99 for the
         whole catalogue, a 10% pool (a genre) and a 50% pool; recall against numpy brute force.
quality  the quality benchmark's model frozen at the start of a test week (--model, default the last week's,
         hybrid-1998-04-20) and that week's users: for --users sampled users (each at their first liked event of the
         week: history = every earlier event, the liked item held out) the full hybrid scores every catalogue item
         (exhaustive), retrieval returns its top-N over the catalogue, history excluded in both. Reported:
         recall@N of the exhaustive top-10 within the retrieved N, and HR@10 / NDCG@10 of the held-out item for
         exhaustive ranking, two-stage (the shortlist of 100 -- retrieval.shortlist_ids: the index's inner product plus
         the neighbour terms, and with a tree head the head's best 100 of that ranking's 100 x --widen -- reranked
         with the full scorer) and the index's inner product alone. --widen W1,W2,..: the shortlist's recall for each
         width (serve.shortlist_widen; default the model's own).
         Needs benchmarks/quality_ml100k.py's outputs in --work (its store and examples cache). The exhaustive scores
         are cached in out/bench/retrieval-exhaustive-<model>.npz, so a rerun only scores users it has not seen.

Results: printed, and merged into out/bench/retrieval.json + retrieval.md (each part rewrites its own section; the
quality part one section per --model).
Timing figures come from here only; tests assert exactness, never speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT_DIR = Path("out/bench")
RECALL_AT = (10, 50, 100, 200)


def pct_ms(seconds) -> dict:
    a = np.asarray(seconds) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


# --- (a) latency at scale -----------------------------------------------------------------------------------
def latency(num_items: int, dim: int, n: int, requests: int, threads: int, seed: int = 0) -> dict:
    import torch

    from llmrec_ray.retrieval import ItemIndex

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    ids = [f"i{r}" for r in range(num_items)]
    vectors = rng.standard_normal((num_items, dim), dtype=np.float32)
    t0 = time.perf_counter()
    index = ItemIndex(ids, vectors, version="synthetic", genres=[("G%d" % (r % 10),) for r in range(num_items)])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    genre = index.genre_rows("G3")  # 10% of the items; cached after the first call, as Serve would hold it
    genre_s = time.perf_counter() - t0
    half = rng.random(num_items) < 0.5
    pools = {"all": None, "genre (10%)": genre, "mask (50%)": half}
    users = rng.standard_normal((requests, dim), dtype=np.float32)
    history = [[ids[r] for r in rng.choice(num_items, 50, replace=False)] for _ in range(requests)]
    out = {"items": num_items, "dim": dim, "n": n, "requests": requests, "torch_threads": threads,
           "index_build_s": round(build_s, 2), "genre_rows_first_call_s": round(genre_s, 2), "pools": {}}
    for name, allowed in pools.items():
        for q, h in zip(users[:20], history[:20]):  # warm up
            index.top_n(q, n, allowed=allowed, exclude=[h])
        wall, cpu = [], []
        for q, h in zip(users, history):
            t0, c0 = time.perf_counter(), time.thread_time()
            index.top_n(q, n, allowed=allowed, exclude=[h])
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)  # this thread's CPU time: what the request costs without contention
        out["pools"][name] = {**pct_ms(wall), "cpu_p50_ms": pct_ms(cpu)["p50_ms"], "cpu_p99_ms": pct_ms(cpu)["p99_ms"]}
        print(f"  top-{n} over {num_items:,} items, pool {name}: {out['pools'][name]}", flush=True)
    # exactness: the same rows as a numpy brute force (argsort of every score), 20 requests
    hits = 0
    for q, h in zip(users[:20], history[:20]):
        scores = vectors @ q
        scores[index.rows(h)] = -np.inf
        expected = set(np.argsort(-scores)[:n].tolist())
        hits += len(expected & set(index.top_n(q, n, exclude=[h])[0].rows.tolist()))
    out["recall_vs_brute_force"] = hits / (20 * n)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


# --- (b) quality on MovieLens-100K -------------------------------------------------------------------------
def sample_requests(examples, week_start: int, week_s: int, num_users: int, seed: int):
    """Each sampled user's first liked event of the week (history = every earlier event of theirs)."""
    week = examples[(examples["timestamp"] >= week_start) & (examples["timestamp"] < week_start + week_s)]
    liked = week[week["label"] == 1].sort_values("timestamp", kind="stable")
    first = liked.groupby("user_id", sort=True).head(1)
    users = first.sample(min(num_users, len(first)), random_state=seed) if num_users else first
    return users.sort_values("user_id"), int(first["user_id"].nunique())


def exhaustive_probs(model, tokenizer, cfg, catalog_ids, catalog_texts, row) -> np.ndarray:
    """P(like) of every catalogue item for this request's history (the full hybrid, one row per item)."""
    import pandas as pd

    from llmrec_ray.model import score_frame

    n = len(catalog_ids)
    frame = pd.DataFrame({"candidate_text": catalog_texts, "history_text": [row.history_text] * n,
                          "item_id": catalog_ids, "history_ids": [row.history_ids] * n,
                          "history_ratings": [row.history_ratings] * n, "history_labels": [row.history_labels] * n})
    return score_frame(model, tokenizer, cfg, frame, batch_size=cfg.eval.batch_size)


def rank_metrics(ranked_ids: list[str], positive: str, k: int) -> tuple[float, float]:
    top = ranked_ids[:k]
    if positive not in top:
        return 0.0, 0.0
    return 1.0, 1.0 / np.log2(top.index(positive) + 2)


def quality(work: Path, model_name: str, num_users: int, n: int, seed: int, widen: list[int]) -> dict:
    import pandas as pd
    import torch

    from llmrec_ray.item_index import build_index
    from llmrec_ray.model import load_export
    from llmrec_ray.retrieval import shortlist_ids, user_vectors
    from llmrec_ray.schema import CATALOG_KEY
    from llmrec_ray.text import item_text

    model_dir = work / "store" / "quality" / "models" / model_name
    model, tokenizer, cfg = load_export(model_dir)
    widths = widen or [cfg.serve.shortlist_widen]
    width_cfgs = {w: cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"shortlist_widen": w})}) for w in widths}
    try:
        week = dt.date.fromisoformat(model_name[-10:])  # hybrid-1998-04-20: frozen at the start of that week
    except ValueError:
        raise SystemExit(f"--model {model_name}: its name must end with the week it was frozen for (YYYY-MM-DD)") from None
    week_start = int(dt.datetime(week.year, week.month, week.day, tzinfo=dt.timezone.utc).timestamp())
    catalog = pd.read_parquet(work / "store" / CATALOG_KEY).set_index("item_id")
    ids = [str(i) for i in catalog.index]
    desc = catalog["description"] if "description" in catalog else [None] * len(catalog)
    texts = [item_text(t, g, d) for t, g, d in zip(catalog["title"], catalog["genres"], desc)]
    examples = pd.read_pickle(work / f"examples-h{cfg.model.collab.history_len}.pkl")
    requests, week_users = sample_requests(examples, week_start, cfg.data.shard_period_days * 86400, num_users, seed)
    print(f"  {model_name}: week {week}, {week_users} users with a liked event, {len(requests)} sampled; "
          f"catalogue {len(ids):,} items; torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    index = build_index(model, tokenizer, cfg, ids, texts, list(catalog["genres"]), version=model_name)
    build_s = time.perf_counter() - t0
    print(f"  index built in {build_s:.1f} s: {int(index.from_text.sum())} items from text; ridge alpha "
          f"{index.projection.alpha:g}, leave-one-out R^2 {index.projection.loo_r2:.3f} over "
          f"{index.projection.num_fit} known items", flush=True)

    cache_path = OUT_DIR / f"retrieval-exhaustive-{model_name}.npz"
    cache = dict(np.load(cache_path)) if cache_path.exists() else {}
    position = {i: r for r, i in enumerate(ids)}
    per_user, timing = [], {"exhaustive_s": [], "retrieve_s": [], "rerank_s": []}
    for u, row in enumerate(requests.itertuples(index=False)):
        key = f"{row.user_id}@{row.timestamp}"
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = exhaustive_probs(model, tokenizer, cfg, ids, texts, row)
            timing["exhaustive_s"].append(time.perf_counter() - t0)
            if len(timing["exhaustive_s"]) % 10 == 0:
                np.savez(cache_path, **cache)
        probs = cache[key].copy()
        seen = [h for h in row.history_ids if h in position]
        probs[[position[h] for h in seen]] = -np.inf  # exclude_history
        exhaustive = [ids[r] for r in np.argsort(-probs, kind="stable") if np.isfinite(probs[r])]
        t0 = time.perf_counter()
        uv = user_vectors(model, cfg, [row.history_ids], [row.history_ratings], [row.history_labels])
        retrieved = index.top_n(uv, max(max(RECALL_AT), n), exclude=[row.history_ids])[0].item_ids
        timing["retrieve_s"].append(time.perf_counter() - t0)
        # what Serve reranks: the index's best with the neighbour terms added (retrieval.shortlist_ids)
        wide = {}
        for w, wcfg in width_cfgs.items():
            t0 = time.perf_counter()
            wide[w] = shortlist_ids(model, wcfg, index, row.history_ids, row.history_ratings, n, exclude=row.history_ids)
            timing.setdefault(f"shortlist_x{w}_s", []).append(time.perf_counter() - t0)
        short = wide[widths[0]]
        two_stage = sorted(short, key=lambda i: -probs[position[i]])  # the same scores a rerank of the n computes
        top10 = set(exhaustive[:10])
        m = {"user_id": row.user_id, "positive": row.item_id,
             **{f"recall@{r}": len(top10 & set(retrieved[:r])) / 10 for r in RECALL_AT},
             "recall_shortlist": len(top10 & set(short)) / 10,
             **{f"recall_shortlist_x{w}": len(top10 & set(wide[w])) / 10 for w in widths}}
        for name, ranking in (("exhaustive", exhaustive), ("two_stage", two_stage), ("retrieval", retrieved)):
            m[f"{name}_hr@10"], m[f"{name}_ndcg@10"] = rank_metrics(ranking, row.item_id, 10)
        m["positive_in_retrieved"] = float(row.item_id in short)
        per_user.append(m)
        print(f"  user {u + 1}/{len(requests)} {row.user_id}: recall@{n} {m[f'recall@{n}']:.1f}, "
              f"shortlist {m['recall_shortlist']:.1f}, "
              f"positive rank exhaustive {exhaustive.index(row.item_id) + 1}", flush=True)
    np.savez(cache_path, **cache)
    # what a rerank of the n retrieved items costs with this scorer (10 users; exhaustive cost per user beside it)
    for row in list(requests.itertuples(index=False))[:10]:
        t0 = time.perf_counter()
        exhaustive_probs(model, tokenizer, cfg, ids[:n], texts[:n], row)
        timing["rerank_s"].append(time.perf_counter() - t0)
    mean = {k: round(float(np.mean([m[k] for m in per_user])), 4) for k in per_user[0] if k not in ("user_id", "positive")}
    return {"model": model_name, "week": week.isoformat(), "week_users": week_users, "users": len(per_user),
            "seed": seed, "n": n, "widen": widths, "catalogue_items": len(ids),
            "items_from_text": int(index.from_text.sum()),
            "index_build_s": round(build_s, 1), "ridge_alpha": index.projection.alpha,
            "ridge_loo_r2": round(index.projection.loo_r2, 4), "ridge_fit_items": index.projection.num_fit,
            "mean": mean, "timing": {k: pct_ms(v) for k, v in timing.items() if v},
            "torch_threads": torch.get_num_threads(), "per_user": per_user}


# --- report -----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = []
    lat = result.get("latency")
    if lat:
        lines += [f"### Retrieval latency: top-{lat['n']} over {lat['items']:,} items (dim {lat['dim']}), single requests, "
                  f"{lat['torch_threads']} torch thread, 50 history items excluded", "",
                  "| pool | p50 ms | p99 ms | max ms | CPU p50 ms | CPU p99 ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} | {v['cpu_p50_ms']} | {v['cpu_p99_ms']} |"
                  for k, v in lat["pools"].items()]
        lines += ["", f"Exact search; recall against numpy brute force {lat['recall_vs_brute_force']:.3f}; index "
                  f"build {lat['index_build_s']} s; {lat['requests']} requests; 1-min load average during the run "
                  f"{lat['load_avg_1m']} on {os.cpu_count()} cores (wall time includes waiting for a core; CPU time is the "
                  "request's own work).", ""]
    for q in result.get("quality", {}).values():
        m = q["mean"]
        lines += [f"### Retrieval quality: MovieLens-100K week {q['week']}, model {q['model']}, {q['users']} of "
                  f"{q['week_users']} users (seed {q['seed']})", "",
                  "| recall of the exhaustive top-10 within the retrieved N | " + " | ".join(f"N={r}" for r in RECALL_AT)
                  + " |", "|---|" + "---|" * len(RECALL_AT),
                  "| mean | " + " | ".join(f"{m[f'recall@{r}']:.3f}" for r in RECALL_AT) + " |", "",
                  f"Within the shortlist Serve reranks ({q['n']}: the index's inner product + the neighbour terms, "
                  f"then a tree head's best of {q['n']} x widen; retrieval.shortlist_ids): "
                  + (", ".join(f"widen {w}: {m[f'recall_shortlist_x{w}']:.3f}" for w in q["widen"]) if "widen" in q
                     else f"{m['recall_shortlist']:.3f}") + ".", "",
                  "| ranking of the held-out liked item (catalogue, history excluded) | HR@10 | NDCG@10 |", "|---|---|---|",
                  f"| exhaustive: the full hybrid over all {q['catalogue_items']:,} items | {m['exhaustive_hr@10']:.3f} | "
                  f"{m['exhaustive_ndcg@10']:.3f} |",
                  f"| two-stage: shortlist {q['n']}, rerank with the full hybrid | {m['two_stage_hr@10']:.3f} | "
                  f"{m['two_stage_ndcg@10']:.3f} |",
                  f"| the index's inner product alone | {m['retrieval_hr@10']:.3f} | {m['retrieval_ndcg@10']:.3f} |",
                  "", f"The held-out item is among the {q['n']} retrieved for {m['positive_in_retrieved']:.0%} of users. "
                  f"{q['items_from_text']} catalogue items indexed from text (ridge alpha {q['ridge_alpha']:g}, "
                  f"leave-one-out R^2 {q['ridge_loo_r2']:.3f} over {q['ridge_fit_items']} known items); index build "
                  f"{q['index_build_s']} s."]
        t = q["timing"]
        parts = [f"retrieval (user vector + top-{max(max(RECALL_AT), q['n'])}) p50 {t['retrieve_s']['p50_ms']} ms"]
        parts += [f"shortlist (widen {w}) p50 {t[f'shortlist_x{w}_s']['p50_ms']} ms" for w in q.get("widen", [])
                  if f"shortlist_x{w}_s" in t]
        if "rerank_s" in t:
            parts.append(f"full-scorer rerank of {q['n']} items p50 {t['rerank_s']['p50_ms']} ms")
        if "exhaustive_s" in t:
            parts.append(f"exhaustive scoring of {q['catalogue_items']:,} items p50 {t['exhaustive_s']['p50_ms']:.0f} ms")
        lines += [f"Per request, {q['torch_threads']} torch threads: " + "; ".join(parts) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["latency", "quality", "all"], default="all")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=17, help="item vector size: the collaborative dim + 1")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the latency part (a Serve replica has 1 CPU)")
    p.add_argument("--n", type=int, default=100, help="items retrieved for the rerank")
    p.add_argument("--work", default="out/quality", help="benchmarks/quality_ml100k.py's work folder")
    p.add_argument("--model", default="hybrid-1998-04-20", help="a hybrid export of that run; its date names the week")
    p.add_argument("--users", type=int, default=50, help="sampled users of the week (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widen", default="", help="comma-separated serve.shortlist_widen values (first: the two-stage row)")
    args = p.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    json_path = OUT_DIR / "retrieval.json"
    result = json.loads(json_path.read_text()) if json_path.exists() else {}
    started = time.time()
    if args.part in ("latency", "all"):
        print("== latency", flush=True)
        result["latency"] = latency(args.items, args.dim, args.n, args.requests, args.threads, args.seed)
    if args.part in ("quality", "all"):
        print("== quality", flush=True)
        result.setdefault("quality", {})[args.model] = quality(Path(args.work), args.model, args.users, args.n, args.seed,
                                                         [int(w) for w in args.widen.split(",") if w])
    json_path.write_text(json.dumps(result, indent=2))
    (OUT_DIR / "retrieval.md").write_text(markdown(result))
    print(markdown(result))
    print(f"done in {time.time() - started:.0f} s; {json_path}, {OUT_DIR / 'retrieval.md'}")


if __name__ == "__main__":
    main()
