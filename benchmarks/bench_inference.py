"""CPU inference of the scorer: fp32 padded to max_seq_len (and model.collab.history_len) vs fp32 cut to each
batch's longest row (and longest history; model.trim_padding, what serving runs) vs dynamic int8
(serve.quantize=int8), on the quality benchmark's rows.

    .venv/bin/python benchmarks/bench_inference.py [--work out/quality] [--model hybrid-1998-04-20] [--rows 1024]

Needs a finished `benchmarks/quality_ml100k.py` run in --work (its examples cache and the hybrid export that
scored the last test week). Pairs/s: --rows rows of that week, batches of --batch-size, torch threads as
given (default: all cores), one warm-up batch first;
the arms are timed interleaved --repeats times and the best pass counts. AUC: every row of the week, with the hybrid and with its
text part alone (the lm logit: int8 harm there is what the collaborative part could hide). Prints a table and
writes <work>/inference.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from quality_ml100k import OVERRIDES, fast_auc, prepare, split, week_bounds  # a script beside it
from llmrec_ray.config import load_config
from llmrec_ray.model import encode_inputs, load_export, quantize_int8, trim_padding
from llmrec_ray.store import Store


def encode(model, tokenizer, cfg, frame: pd.DataFrame) -> dict:
    return encode_inputs(tokenizer, model.vocab, cfg, frame["candidate_text"].tolist(), frame["history_text"].tolist(),
                         frame["item_id"].tolist(), frame["history_ids"].tolist(), frame["history_ratings"].tolist(),
                         frame["history_labels"].tolist())


def run(model, batches: list[dict], trim: bool) -> tuple[np.ndarray, np.ndarray]:
    """(hybrid logits, text-part logits) over the batches."""
    hybrid, text = [], []
    with torch.inference_mode():
        for enc in batches:
            enc = trim_padding(enc) if trim else enc
            t = {k: torch.from_numpy(v) for k, v in enc.items()}
            lm = {k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            text.append(model.lm(**lm).logits.squeeze(-1).float().numpy())
            hybrid.append(model(**t).numpy())
    return np.concatenate(hybrid), np.concatenate(text)


def pairs_per_s(model, batches: list[dict], trim: bool) -> float:
    with torch.inference_mode():
        model(**{k: torch.from_numpy(v) for k, v in (trim_padding(batches[0]) if trim else batches[0]).items()})
        started = time.perf_counter()
        for enc in batches:
            model(**{k: torch.from_numpy(v) for k, v in (trim_padding(enc) if trim else enc).items()})
    return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/quality")
    p.add_argument("--model", default="hybrid-1998-04-20", help="an export under <work>/models (the last week's hybrid)")
    p.add_argument("--rows", type=int, default=1024, help="rows timed for pairs/s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timing passes, interleaved; the best one counts")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}"])
    keys, events, examples = prepare(cfg, Store.from_config(cfg.store), work)
    start = week_bounds(keys, 1)[0][1]
    _, week = split(events, examples, start, int(events["timestamp"].max()) + 1)
    model, tokenizer, mcfg = load_export(work / "models" / args.model)
    batches = [encode(model, tokenizer, mcfg, week.iloc[i:i + args.batch_size]) for i in range(0, len(week), args.batch_size)]
    timed = batches[: max(1, args.rows // args.batch_size)]
    y = week["label"].to_numpy()
    int8 = quantize_int8(copy.deepcopy(model))
    arms = {"fp32, padded to max_seq_len": (model, False), "fp32, padded to the batch's longest row": (model, True),
            "int8 dynamic, padded to the batch's longest row": (int8, True)}
    variants = {}
    for name, (m, trim) in arms.items():
        hybrid, text = run(m, batches, trim)
        variants[name] = {"auc_hybrid": fast_auc(y, hybrid), "auc_text_part": fast_auc(y, text), "logits": (hybrid, text),
                          "pairs_per_s": 0.0}
    for _ in range(args.repeats):  # interleaved, best of: other load on the machine slows every arm alike
        for name, (m, trim) in arms.items():
            variants[name]["pairs_per_s"] = max(variants[name]["pairs_per_s"], pairs_per_s(m, timed, trim))
    base = variants["fp32, padded to max_seq_len"]
    lines = [f"Rows: the {len(week):,} rows of the last test week ({args.model}); pairs/s over {len(timed) * args.batch_size} "
             f"rows, batch {args.batch_size}, {args.threads} torch threads, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; max_seq_len {mcfg.model.max_seq_len}.", "",
             "| variant | pairs/s | speed-up | AUC hybrid | AUC text part | max abs logit change (hybrid) |", "|---|---|---|---|---|---|"]
    out = {}
    for name, v in variants.items():
        change = float(np.abs(v["logits"][0] - base["logits"][0]).max())
        lines.append(f"| {name} | {v['pairs_per_s']:.1f} | {v['pairs_per_s'] / base['pairs_per_s']:.2f}x | "
                     f"{v['auc_hybrid']:.4f} | {v['auc_text_part']:.4f} | {change:.4f} |")
        out[name] = {k: v[k] for k in ("pairs_per_s", "auc_hybrid", "auc_text_part")} | {"max_abs_logit_change": change}
    print("\n".join(lines))
    (work / "inference.md").write_text("\n".join(lines) + "\n")
    (work / "inference.json").write_text(json.dumps({"rows": len(week), "threads": args.threads, "variants": out}, indent=2))


if __name__ == "__main__":
    main()
