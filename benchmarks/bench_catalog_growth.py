"""What a Serve replica pays when the catalogue grows between rounds: model.grow_catalog at catalogue scale.

    .venv/bin/python benchmarks/bench_catalog_growth.py [--items 91803] [--new 1,100,1000] [--threads 1]

A hybrid's collaborative tables over --items items (the config's sizes: dim, neighbours, MiniLM's 384-float text
vectors; random contents -- the cost depends on the sizes only), grown by each --new count of catalogue items it
lacks, the way serve/reload.py does on a catalogue update (inference.grow_tables -> model.grow_catalog: a grown copy
of the tables + the frozen backbone encoding the new items' texts), at --threads torch threads (one Serve replica's
CPU). Reported per count: seconds in all, of which encoding; the tables' size before and after (the old copy is
freed once no batch holds it). The default --items is the grocery scenario's 91,803 products.

Results: printed, and written to out/bench/catalog_growth.{json,md}.
Timing figures come from here only; tests assert exactness, never speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def table_mb(net) -> float:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=91_803)
    p.add_argument("--new", default="1,100,1000", help="comma-separated counts of new catalogue items")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/bench")
    args = p.parse_args()

    import torch

    from llmrec_ray.collab import CollabNet
    from llmrec_ray.config import load_config
    from llmrec_ray.ids import ItemVocab
    from llmrec_ray.model import HybridScorer, build_model, encode_item_texts, grow_catalog, text_vector_dim

    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["model.backbone=minilm"])
    c = cfg.model.collab
    dim = text_vector_dim(cfg.model)
    net = CollabNet(args.items, c.dim, neighbours=c.neighbours, text_dim=dim)
    with torch.no_grad():
        net.item_text[1:] = torch.nn.functional.normalize(torch.randn(args.items, dim), dim=-1)  # row 0: none
        net.item_logcount[1:] = 1.0
    vocab = ItemVocab(f"p{i}" for i in range(args.items))
    lm, _ = build_model(cfg.model)
    served = HybridScorer(lm, net, vocab).eval()

    rows = []
    print(f"tables of {args.items:,} items (dim {c.dim}, {c.neighbours} neighbours, {dim}-float text vectors): "
          f"{table_mb(net):.0f} MB; {args.threads} torch thread(s)")
    for n in (int(x) for x in args.new.split(",")):
        texts = {**{f"p{i}": "" for i in range(3)},  # known ids are skipped, as in a real catalogue
                 **{f"new{i}": f"Product {i} | FRZN VEGETABLE-BULK | PRODUCE | dept {i % 40}" for i in range(n)}}
        t0 = time.perf_counter()
        grown = grow_catalog(served, texts, cfg.model)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()  # the frozen backbone's share, timed alone on the same texts
        encode_item_texts(cfg.model, [t for i, t in texts.items() if i.startswith("new")])
        encode_s = time.perf_counter() - t0
        assert grown is not None and len(grown.vocab) == args.items + n
        row = {"new_items": n, "seconds": round(seconds, 3), "encode_seconds": round(encode_s, 3),
               "tables_mb_before": round(table_mb(net), 1), "tables_mb_after": round(table_mb(grown.collab), 1)}
        rows.append(row)
        print(f"  +{n:>5} items: {seconds:6.2f} s (encoding alone {encode_s:.2f} s), tables {row['tables_mb_after']:.0f} MB")
        del grown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"when": dt.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "items": args.items, "threads": args.threads, "dim": c.dim, "neighbours": c.neighbours, "text_dim": dim}
    (out / "catalog_growth.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Catalogue growth on a replica ({args.items:,} items, {args.threads} thread(s), {meta['machine']}, {meta['when']})",
             "", "| new items | seconds | encoding alone | tables MB before -> after |", "|---|---|---|---|"]
    lines += [f"| {r['new_items']:,} | {r['seconds']:.2f} | {r['encode_seconds']:.2f} | "
              f"{r['tables_mb_before']:.0f} -> {r['tables_mb_after']:.0f} |" for r in rows]
    (out / "catalog_growth.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'catalog_growth.md'}")


if __name__ == "__main__":
    main()
