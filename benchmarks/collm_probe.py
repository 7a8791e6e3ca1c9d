"""Probe: CoLLM-style collaborative tokens inside the cross-encoder, the fusion issue 11 names besides late fusion
(kept as a measured result; the shipped hybrid fuses late, llmrec_ray/model.py).

    .venv/bin/python benchmarks/collm_probe.py [--variants text,collm,collm-feat] [--rows 800] [--weeks 4] [--work out/quality]

CoLLM (Zhang et al., 2023) maps a collaborative model's user and item embeddings into the language model's input
space and feeds them to it as extra tokens. Here the collaborative model is the hybrid's own part, fitted as the
quality protocol's `collab` arm (every event before a time t; each fit warm-started from the one before, as a
round's is). Per row it gives the candidate's item embedding and bias and the user vector read from the history
(CollabNet.user_side: no per-user table); a two-layer MLP per token maps it into MiniLM's input embedding space, and
the tokens sit right after [CLS] of the (candidate text, history text) pair the text arm reads. Variants:

  text        no collaborative tokens: the control (the same loop, so it isolates what the tokens add)
  collm       a user token and an item token (the CoLLM recipe)
  collm-feat  the same + a token of the tree head's input features (standardised): what the shipped part scores from

Time-respecting: a round trains on rows of [t_prev, t) with the tables fitted before t_prev (they never saw those
rows' labels -- tables that did would be trusted too much, as benchmarks/gbdt_probe.py --leaky shows for the head),
and test week [t, t_next) is scored with the tables fitted before t. The first round trains on the 4 weeks before the
first test week, from the pretrained backbone; each later round on the test week just scored, from the previous
round's model. Each round: at most --rows rows (seeded sample; no replay), the latest 10% held out for early stopping
(every 10 steps, patience 2, best state kept), one epoch, batch 16, AdamW (lr 5e-5 first round, 2e-5 later; the
mapping MLPs 1e-3), linear warm-up over 10% and decay; MiniLM at 64 text tokens, 5 history items in the text, as in
the protocol. Plain torch in one process (not Ray Train): this asks a modelling question, not a systems one.
Each variant starts from torch.manual_seed(0) (the new classifier head's and the mapping MLPs' initial weights,
dropout), so a run repeats (two runs of `--rows 100 --weeks 1 --variants collm` both gave 0.6263; before the seed,
three gave 0.5586 / 0.6612 / 0.6749). Every row of each test week is scored; prints AUC per week, pooled AUC [95% CI]
per variant and the tables' own AUC (the collab arm with these warm-started fits), and writes
<work>/collm_probe-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quality_ml100k import bootstrap_ci, classical_scorer, fast_auc, load_protocol, week_bounds  # beside it
from llmrec_ray.catalog import load_catalog
from llmrec_ray.collab import batch_tensors
from llmrec_ray.ids import history_arrays
from llmrec_ray.model import build_model, trim_padding
from llmrec_ray.store import Store
from llmrec_ray.text import candidate_texts, tokenize_pairs

WEEK = 7 * 24 * 3600
TOKENS = {"text": (), "collm": ("user", "item"), "collm-feat": ("user", "item", "feat")}


class CollmScorer(nn.Module):
    """A cross-encoder reading [CLS] + one mapped token per collaborative input + the text pair's other tokens."""

    def __init__(self, lm, dims: dict[str, int]):
        super().__init__()
        self.lm, hidden = lm, lm.config.hidden_size
        self.maps = nn.ModuleDict({k: nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden))
                                   for k, d in dims.items()})

    def forward(self, input_ids, attention_mask, token_type_ids, **inputs) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(input_ids)
        extra = [self.maps[k](inputs[k]).unsqueeze(1) for k in self.maps]
        n = len(extra)
        if n:
            emb = torch.cat([emb[:, :1], *extra, emb[:, 1:]], 1)
            attention_mask = torch.cat([attention_mask[:, :1].expand(-1, n + 1), attention_mask[:, 1:]], 1)
            token_type_ids = torch.cat([token_type_ids[:, :1].expand(-1, n + 1), token_type_ids[:, 1:]], 1)
        return self.lm(inputs_embeds=emb, attention_mask=attention_mask, token_type_ids=token_type_ids).logits.squeeze(-1)


def collab_inputs(net, vocab, frame, cfg) -> dict[str, np.ndarray]:
    """Per row: user (u from the history), item (E[cand], b[cand]), feat (the tree head's features), float32, and
    logit: the tables' own score (the collab arm with this fit)."""
    hist = history_arrays(vocab, frame["history_ids"].tolist(), frame["history_ratings"].tolist(),
                          frame["history_labels"].tolist(), cfg.model.collab.history_len, cfg.data.like_threshold)
    tensors = batch_tensors(vocab.rows(frame["item_id"].tolist()), hist)
    out = {"user": [], "item": [], "feat": [], "logit": []}
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(frame), 2048):
            t = {k: v[i:i + 2048] for k, v in tensors.items()}
            u, _ = net.user_side(t["hist_rows"], t["hist_present"], t["hist_liked"], t["hist_rating"], t["hist_rated"])
            out["user"].append(u)
            out["item"].append(torch.cat([net.cand(t["cand_rows"]), net.item_bias(t["cand_rows"])], -1))
            out["feat"].append(net.head_features(**t))
            out["logit"].append(net(**t))
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def batches(frame, inputs: dict, tokens, tokenizer, max_len: int, size: int):
    for i in range(0, len(frame), size):
        part = frame.iloc[i:i + size]
        enc = trim_padding(tokenize_pairs(tokenizer, part["candidate_text"].tolist(), part["history_text"].tolist(), max_len))
        batch = {k: torch.from_numpy(v) for k, v in enc.items()}
        batch.update({k: torch.from_numpy(inputs[k][i:i + size]) for k in tokens})
        yield batch, torch.tensor(part["label"].to_numpy(np.float32))


def score(model, frame, inputs, tokens, tokenizer, max_len) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(**b).float().numpy() for b, _ in batches(frame, inputs, tokens, tokenizer, max_len, 128)])


def train_round(model, rows, inputs, tokens, tokenizer, max_len: int, lm_lr: float, seed: int) -> dict:
    """One epoch over the older 90% of `rows` (time order kept for the split, shuffled for training), early stopping
    on the latest 10% every 10 steps (patience 2); the best state is kept. Returns the round's figures."""
    from transformers import get_linear_schedule_with_warmup

    n_val = max(1, len(rows) // 10)
    train, val = rows.iloc[:-n_val], rows.iloc[-n_val:]
    pick = np.random.default_rng(seed).permutation(len(train))
    train, train_inputs = train.iloc[pick], {k: v[:-n_val][pick] for k, v in inputs.items()}
    val_inputs = {k: v[-n_val:] for k, v in inputs.items()}
    groups = [{"params": model.lm.parameters(), "lr": lm_lr}]
    if len(model.maps):
        groups.append({"params": model.maps.parameters(), "lr": 1e-3})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = -(-len(train) // 16)
    sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    y_val = torch.tensor(val["label"].to_numpy(np.float32))

    def val_loss() -> float:
        p = torch.from_numpy(score(model, val, val_inputs, tokens, tokenizer, max_len))
        return float(nn.functional.binary_cross_entropy_with_logits(p, y_val))

    best, best_state, best_step, bad, step, started = val_loss(), None, 0, 0, 0, time.time()
    for batch, y in batches(train, train_inputs, tokens, tokenizer, max_len, 16):
        model.train()
        loss = nn.functional.binary_cross_entropy_with_logits(model(**batch), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0 or step == steps:
            v = val_loss()
            if v < best:
                best, best_step, bad = v, step, 0
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            else:
                bad += 1
                if bad >= 2:
                    break
    if best_state is not None:  # None: no step beat the model as it came in, which then stays
        model.load_state_dict(best_state)
    return {"rows": len(rows), "steps": step, "best_step": best_step, "val_loss": best, "seconds": time.time() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="text,collm,collm-feat")
    p.add_argument("--rows", type=int, default=800, help="training rows per round (the protocol's --max-train-rows)")
    p.add_argument("--weeks", type=int, default=4)
    p.add_argument("--work", default="out/quality")
    args = p.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()  # the load report of the new classifier head, once per variant
    transformers.logging.disable_progress_bar()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in TOKENS]
    if unknown:
        raise SystemExit(f"--variants: {unknown} are not among {sorted(TOKENS)}")
    cfg, keys, events, examples = load_protocol(args.work)
    texts = candidate_texts(load_catalog(Store.from_config(cfg.store)))
    weeks = week_bounds(keys, 4)
    max_len = cfg.model.max_seq_len
    # times t_-1 < t_0 < ... : tables fitted before each; t_-1 starts the first round's 4 weeks
    times = [weeks[0][1] - 4 * WEEK] + [s for _, s in weeks]
    ends = times[1:] + [int(events["timestamp"].max()) + 1]
    weeks, times = weeks[:args.weeks], times[:args.weeks + 1]
    fits, previous = [], None
    for t in times:
        started = time.time()
        _, previous = classical_scorer("collab", events[events["timestamp"] < t], examples[examples["timestamp"] < t],
                                       events[events["timestamp"] < t], cfg, previous=previous, texts=texts)
        fits.append(previous)
        print(f"tables fitted before {time.strftime('%Y-%m-%d', time.gmtime(t))} ({time.time() - started:.0f} s)",
              flush=True)
    models, tokenizer, results = {}, None, {v: {"weeks": [], "rounds": []} for v in variants}
    ys, tables = [], []
    for w in range(len(weeks)):
        rows = examples[(examples["timestamp"] >= times[w]) & (examples["timestamp"] < times[w + 1])]
        if len(rows) > args.rows:
            rows = rows.sample(args.rows, random_state=w)
        rows = rows.sort_values("timestamp", kind="stable")  # train_round holds out the latest 10%
        week = examples[(examples["timestamp"] >= times[w + 1]) & (examples["timestamp"] < ends[w + 1])]
        train_in, week_in = collab_inputs(*fits[w], rows, cfg), collab_inputs(*fits[w + 1], week, cfg)
        if w == 0:
            feat_mean, feat_std = train_in["feat"].mean(0), train_in["feat"].std(0) + 1e-6  # fixed after round 1
        for d in (train_in, week_in):
            d["feat"] = (d["feat"] - feat_mean) / feat_std
        ys.append(week["label"].to_numpy())
        tables.append(week_in["logit"])
        for v in variants:
            if v not in models:
                torch.manual_seed(0)  # the new classifier head's and the mapping MLPs' initial weights, and dropout
                lm, tokenizer = build_model(cfg.model)
                models[v] = CollmScorer(lm, {k: train_in[k].shape[1] for k in TOKENS[v]})
            fig = train_round(models[v], rows, train_in, TOKENS[v], tokenizer, max_len,
                              cfg.train.lr_first if w == 0 else cfg.train.lr_incremental, seed=w)
            started = time.time()
            s = score(models[v], week, week_in, TOKENS[v], tokenizer, max_len)
            fig["score_seconds"] = time.time() - started
            results[v]["weeks"].append(s)
            results[v]["rounds"].append(fig)
            print(f"{v:<11} week {w + 1}: AUC {fast_auc(ys[-1], s):.4f}  (round: {fig['rows']} rows, best step "
                  f"{fig['best_step']}/{fig['steps']}, {fig['seconds']:.0f} s; scoring {len(week):,} rows "
                  f"{fig['score_seconds']:.0f} s)", flush=True)
        print(f"{'tables':<11} week {w + 1}: AUC {fast_auc(ys[-1], tables[-1]):.4f}", flush=True)
    y = np.concatenate(ys)
    summary = {}
    for name, s in [*((v, np.concatenate(results[v]["weeks"])) for v in variants), ("tables", np.concatenate(tables))]:
        lo, hi = bootstrap_ci(y, s)
        summary[name] = {"auc": fast_auc(y, s), "auc_ci95": [lo, hi], "rounds": results.get(name, {}).get("rounds", [])}
        print(f"{name:<11} pooled over {len(weeks)} week(s), {len(y):,} rows: AUC {summary[name]['auc']:.4f} "
              f"[{lo:.3f}, {hi:.3f}]")
    out = Path(args.work) / f"collm_probe-{args.rows}.json"
    out.write_text(json.dumps({"rows_per_round": args.rows, "weeks": len(weeks), "arms": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
