"""CPU inference of the scorer's text part in ONNX Runtime (fp32, ORT's BERT fusions, ORT dynamic int8) vs torch
fp32 and torch dynamic int8 (serve.quantize=int8), on the quality benchmark's rows. Issue #15: the plain (unfused)
QInt8 arm is what serve.quantize=onnx-int8 serves; export, quantisation and the ORT stand-in for `model.lm` are
llmrec_ray/onnx_text.py's, shared with Serve.

    .venv/bin/python benchmarks/bench_onnx.py [--work out/quality] [--model hybrid-1998-04-20] [--threads 2]

Needs: a finished `benchmarks/quality_ml100k.py` run in --work (as bench_inference.py) and
`pip install -e '.[onnx]'`. Takes ~12 min on 2 busy cores.

What runs: the text part (transformer + classification head -> the lm logit) is exported once with
torch.onnx.export (llmrec_ray.onnx_text.export_text: TorchScript exporter, dynamic batch and sequence axes, eager
attention so ORT's BERT optimizer can fuse it), then optimised offline (onnxruntime.transformers.optimizer) and
quantised (onnx_text.quantize_graph: onnxruntime.quantization.quantize_dynamic). Each ORT arm replaces `model.lm`
with an ORT session behind the same call signature (onnx_text.with_ort_text), so every arm is timed through
`predict_probs` -- what Serve runs: trim padding, the text part, the collaborative part + fusion in torch, sigmoid. Threads: torch.set_num_threads(--threads) and ORT
intra_op_num_threads=--threads. Pairs/s: the first --rows rows of the week in batches of --batch-size, one warm-up
batch per arm, the arms timed in turn --repeats times (order rotated each round, so other load on the machine hits
them alike); reported: the best pass, and the median over rounds of the arm's speed-up against torch fp32 in
the same round. Quality: every row of the week (labelled), max |P(like) change| against torch fp32 and AUC.
Prints a table and writes out/bench_onnx/results.{json,md} (graphs under out/bench_onnx/graphs).
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
import torch

from bench_inference import encode  # a script beside it
from quality_ml100k import OVERRIDES, fast_auc, prepare, split, week_bounds
from llmrec_ray.config import load_config
from llmrec_ray.model import load_export, predict_probs, quantize_int8
from llmrec_ray.onnx_text import export_text, quantize_graph, with_ort_text
from llmrec_ray.store import Store
from llmrec_ray.text import TOKEN_KEYS


def export_graphs(lm, graph_dir: Path) -> dict[str, Path]:
    """fp32, BERT-fused fp32 and dynamic int8 (QInt8 / QUInt8 weights, plain and fused) ONNX graphs of the text part."""
    from onnxruntime.transformers import optimizer

    fp32 = export_text(lm, graph_dir / "text_fp32.onnx")  # eager attention: the BERT optimizer can fuse it
    fused = graph_dir / "text_fp32_fused.onnx"
    optimizer.optimize_model(str(fp32), model_type="bert", num_heads=lm.config.num_attention_heads,
                             hidden_size=lm.config.hidden_size).save_model_to_file(str(fused))
    graphs = {"fp32": fp32, "fp32_fused": fused}
    for src in ("fp32", "fp32_fused"):
        for qtype in ("QInt8", "QUInt8"):
            graphs[f"{src}_{qtype.lower()}"] = quantize_graph(graphs[src], graph_dir / f"text_{src}_{qtype.lower()}.onnx", qtype)
    return graphs


def score(model, batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(P(like) of the hybrid, text-part logit) over the batches."""
    probs, text = [], []
    for enc in batches:
        probs.append(predict_probs(model, enc))
        with torch.inference_mode():
            text.append(model.lm(**{k: torch.from_numpy(enc[k]) for k in TOKEN_KEYS}).logits.squeeze(-1).float().numpy())
    return np.concatenate(probs), np.concatenate(text)


def timed_pass(model, batches: list[dict]) -> float:
    """Pairs/s of predict_probs over the batches, after one warm-up batch."""
    predict_probs(model, batches[0])
    started = time.perf_counter()
    for enc in batches:
        predict_probs(model, enc)
    return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/quality", help="a finished quality_ml100k.py run")
    p.add_argument("--model", default="hybrid-1998-04-20", help="an export under <work>/models (the last week's hybrid)")
    p.add_argument("--out", default="out/bench_onnx")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=512, help="rows timed for pairs/s (the first of the week)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds, arms in rotated order")
    p.add_argument("--threads", type=int, default=2, help="torch threads and ORT intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work, out_dir = Path(args.work), Path(args.out)

    # Rows: the last test week of the quality benchmark, encoded as Serve encodes a request
    cfg = load_config(None, [*OVERRIDES, f"store.uri={work / 'store'}"])
    keys, events, examples = prepare(cfg, Store.from_config(cfg.store), work)
    _, week = split(events, examples, week_bounds(keys, 1)[0][1], int(events["timestamp"].max()) + 1)
    model, tokenizer, mcfg = load_export(work / "models" / args.model)
    batches = [encode(model, tokenizer, mcfg, week.iloc[i:i + args.batch_size]) for i in range(0, len(week), args.batch_size)]
    timed = batches[: max(1, args.rows // args.batch_size)]
    y = week["label"].to_numpy()

    # Arms: torch as today, then ORT graphs of the same weights
    graphs = export_graphs(model.lm, out_dir / "graphs")
    arms = {"torch fp32": model, "torch int8 dynamic (serve.quantize=int8)": quantize_int8(copy.deepcopy(model)),
            "ORT fp32": with_ort_text(model, graphs["fp32"], args.threads),
            "ORT fp32, BERT-fused": with_ort_text(model, graphs["fp32_fused"], args.threads),
            "ORT int8 dynamic (QInt8 weights)": with_ort_text(model, graphs["fp32_qint8"], args.threads),
            "ORT int8 dynamic (QUInt8 weights)": with_ort_text(model, graphs["fp32_quint8"], args.threads),
            "ORT int8 dynamic, BERT-fused (QInt8)": with_ort_text(model, graphs["fp32_fused_qint8"], args.threads),
            "ORT int8 dynamic, BERT-fused (QUInt8)": with_ort_text(model, graphs["fp32_fused_quint8"], args.threads)}
    scores = {name: score(m, batches) for name, m in arms.items()}

    # Timing: rounds of every arm in turn, order rotated; a round's speed-ups are paired against its own torch fp32
    names, rates, load = list(arms), {name: [] for name in arms}, [os.getloadavg()]
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(timed_pass(arms[name], timed))
        load.append(os.getloadavg())
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{rates[n][-1]:.0f}" for n in names) + f" pairs/s; load {load[-1][0]:.1f}")

    # Report
    base_probs, base_rates = scores["torch fp32"][0], np.array(rates["torch fp32"])
    base_auc = fast_auc(y, base_probs)
    lines = [f"Rows: the {len(week):,} labelled rows of the last test week ({args.model}) for quality, the first "
             f"{sum(len(b['input_ids']) for b in timed)} timed; batch {args.batch_size}, "
             f"{args.threads} torch / ORT intra-op threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"max_seq_len {mcfg.model.max_seq_len}, padding trimmed to each batch's longest row (predict_probs). "
             f"{args.repeats} interleaved rounds; load average (1 min) {min(l[0] for l in load):.1f}-{max(l[0] for l in load):.1f} "
             "while timing.", "",
             "| variant | pairs/s (best) | speed-up (median paired) | max abs P(like) change | AUC hybrid | AUC change | "
             "AUC text part | max abs text-logit change |", "|---|---|---|---|---|---|---|---|"]
    results = {}
    for name in names:
        probs, text = scores[name]
        v = {"pairs_per_s_best": max(rates[name]), "pairs_per_s_rounds": rates[name],
             "speedup_median": float(np.median(np.array(rates[name]) / base_rates)),
             "max_abs_prob_change": float(np.abs(probs - base_probs).max()), "auc_hybrid": fast_auc(y, probs),
             "auc_text_part": fast_auc(y, text), "max_abs_text_logit_change": float(np.abs(text - scores["torch fp32"][1]).max())}
        v["auc_change"] = v["auc_hybrid"] - base_auc
        results[name] = v
        lines.append(f"| {name} | {v['pairs_per_s_best']:.1f} | {v['speedup_median']:.2f}x | {v['max_abs_prob_change']:.4f} | "
                     f"{v['auc_hybrid']:.4f} | {v['auc_change']:+.4f} | {v['auc_text_part']:.4f} | {v['max_abs_text_logit_change']:.4f} |")
    print("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps({
        "rows": len(week), "rows_timed": sum(len(b["input_ids"]) for b in timed), "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
        "loadavg_while_timing": load, "versions": versions(), "variants": results}, indent=2))


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    main()
