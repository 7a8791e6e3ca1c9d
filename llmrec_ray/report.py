"""The per-round table (Markdown + JSON) and a PNG plot of the metrics over rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from llmrec_ray.schema import period_of_key


def _get(m: dict, *path, default=float("nan")):
    for p in path:
        if not isinstance(m, dict) or p not in m or m[p] is None:
            return default
        m = m[p]
    return m


def rows(reports) -> list[dict]:
    out = []
    for i, r in enumerate(reports, 1):
        m = r.metrics
        out.append({
            "round": i, "shards": ",".join(period_of_key(s) for s in r.round_shards) or "-",
            "rows": r.num_train_rows, "train_s": round(r.train_seconds), "round_s": round(r.round_seconds),
            "auc_prequential": _get(m, "prequential", "auc"),
            "auc_candidate": _get(m, "next", "candidate", "auc"), "auc_promoted": _get(m, "next", "promoted", "auc"),
            "auc_popularity": _get(m, "next", "popularity", "auc"), "auc_mf": _get(m, "next", "mf", "auc"),
            "auc_history_lr": _get(m, "next", "history_lr", "auc"),
            "ndcg@10_candidate": _get(m, "next", "candidate", "ndcg@10"), "ndcg@10_promoted": _get(m, "next", "promoted", "ndcg@10"),
            "cold_auc": _get(m, "next", "candidate", "cold_auc"), "n_cold": _get(m, "next", "candidate", "n_cold", default=0),
            "rare_auc": _get(m, "next", "candidate", "rare_auc"), "n_rare": _get(m, "next", "candidate", "n_rare", default=0),
            "version": r.version or "-", "decision": r.decision,
        })
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_report(reports, out_dir) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(reports)
    cols = list(table[0]) if table else ["round"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in table]
    paths = {"markdown": str(out_dir / "report.md"), "json": str(out_dir / "report.json"), "plot": str(out_dir / "rounds.png")}
    Path(paths["markdown"]).write_text("\n".join(md) + "\n")
    Path(paths["json"]).write_text(json.dumps([r.to_dict() for r in reports], indent=2, default=str))
    _plot(table, paths["plot"])
    return paths


def _plot(table: list[dict], path: str) -> None:
    fig = Figure(figsize=(8, 4.5))  # no pyplot: no global backend or figure state
    ax = fig.subplots()
    x = [r["round"] for r in table]
    for key, label in (("auc_candidate", "candidate (next period)"), ("auc_promoted", "frozen previous model"),
                       ("auc_prequential", "promoted, prequential"), ("auc_popularity", "popularity"), ("auc_mf", "biased MF"),
                       ("auc_history_lr", "history-aware logistic")):
        ax.plot(x, [r[key] for r in table], marker="o", label=label)
    ax.set_xticks(x)  # whole rounds, never 1.5
    ax.set_xlabel("round")
    ax.set_ylabel("AUC")
    ax.set_title("llmrec-ray: AUC per incremental round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
