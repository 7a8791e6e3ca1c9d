"""Probe: does one arm of the quality benchmark add to another? (issue 11, kept as a measured result.)

    .venv/bin/python benchmarks/arm_blend_probe.py [--work out/quality] [--base collab] [--add text]

Reads the per-row probabilities a finished `quality_ml100k.py` run stored in <work>/state.json (no model is run)
and prints the AUC per week and pooled of logit(base) + a x logit(add) for a few a, chosen on the test rows
themselves: an upper bound on what any fusion of the two arms fitted on validation rows could add.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from quality_ml100k import fast_auc, load_protocol, split, week_bounds  # a script beside it
from llmrec_ray.schema import period_of_key

BLENDS = (0.0, 0.1, 0.25, 0.5, 1.0)


def logit(p: list[float]) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/quality")
    p.add_argument("--weeks", type=int, default=4)
    p.add_argument("--base", default="collab")
    p.add_argument("--add", default="text")
    args = p.parse_args()
    scores = json.loads((Path(args.work) / "state.json").read_text())["scores"]
    _, keys, events, examples = load_protocol(args.work)
    weeks, ys, bases, adds = week_bounds(keys, args.weeks), [], [], []
    for w, (key, start) in enumerate(weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        y = split(events, examples, start, end)[1]["label"].to_numpy()
        got = [scores.get(f"{arm}@{period_of_key(key)}") for arm in (args.base, args.add)]
        if any(g is None for g in got):
            raise SystemExit(f"{args.work}/state.json has no scores of {args.base!r} and {args.add!r} for the week of "
                             f"{period_of_key(key)}: finish `quality_ml100k.py --work {args.work}` first")
        base, add = (logit(g["probs"]) for g in got)
        if not len(y) == len(base) == len(add):
            raise SystemExit(f"week {period_of_key(key)}: {len(y)} rows in the protocol but {len(base)} / {len(add)} "
                             f"stored scores: the state is from another protocol; rerun into a fresh --work")
        ys.append(y), bases.append(base), adds.append(add)
        print(f"week {period_of_key(key)}: " + "  ".join(f"a={a}: {fast_auc(y, base + a * add):.4f}" for a in BLENDS)
              + f"  {args.add} alone: {fast_auc(y, add):.4f}", flush=True)
    y, base, add = map(np.concatenate, (ys, bases, adds))
    print(f"pooled over {len(weeks)} week(s), logit({args.base}) + a x logit({args.add}): "
          + "  ".join(f"a={a}: {fast_auc(y, base + a * add):.4f}" for a in BLENDS)
          + f"  {args.add} alone: {fast_auc(y, add):.4f}")


if __name__ == "__main__":
    main()
