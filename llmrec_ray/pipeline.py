"""One incremental round: find new data -> evaluate the promoted model on it (prequential) -> train
from the promoted checkpoint on new + replayed data -> evaluate the candidate -> gate -> promote ->
commit the ledger.

Crash safety: the promoted pointer is the commit point. Every write before it is either harmless to
repeat (training checkpoints under a fresh run name) or found again on a rerun (a registered,
gate-approved but unpromoted version of the same parent and shards is promoted instead of retrained).
Every round starts by reconciling: if the promoted version's shards are not yet committed in the
ledger (a crash between promotion and ledger commit), they are committed first. So a crash at any
step followed by a rerun never consumes a shard twice nor skips one.

Races: promotion is a compare-and-swap on "the promoted version is still this round's parent". Of two rounds
started from the same parent exactly one promotes; the other reports LOST_RACE, commits nothing in the ledger
and leaves its candidate registered, unpromoted (the next round starts from the winner).

Periods: the round learns the oldest new shard(s) (data.first_round_shards in the first round,
data.shards_per_round later). The gate compares candidate and promoted model on the *next* period
(the following shard, not yet learned); for the newest shard there is no next period and the gate
uses the round's time-split validation rows. Forgetting is measured on the oldest learned shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import pandas as pd

from llmrec_ray.config import Config
from llmrec_ray.ledger import Ledger, read_shard
from llmrec_ray.registry import PromotionConflict, Registry
from llmrec_ray.store import Store
from llmrec_ray.train import train_candidate

FAIL_POINTS = ("after_eval", "after_train", "after_register", "after_promote")
LOST_RACE = "lost race"  # RoundReport.decision when another writer promoted first: nothing committed


class InjectedFailure(RuntimeError):
    """Raised at a named step by run_round(fail_at=...) to test crash safety."""


@dataclass
class RoundReport:
    round_shards: list[str] = field(default_factory=list)
    version: Optional[str] = None
    parent: Optional[str] = None
    promoted: bool = False
    decision: str = "nothing new"
    reason: str = ""
    num_train_rows: int = 0
    train_seconds: float = 0.0
    round_seconds: float = 0.0
    eval_period: Optional[str] = None
    metrics: dict = field(default_factory=dict)  # {"prequential": {...}, "next": {name: {...}}, "old": {...}}
    stage_seconds: dict = field(default_factory=dict)  # wall time per step: prepare, prequential, train, evaluate, register, commit

    def summary(self) -> str:
        nxt = self.metrics.get("next", {})
        cand, prev = nxt.get("candidate", {}), nxt.get("promoted", {})
        return (f"{','.join(s.split('=')[1][:10] for s in self.round_shards) or '-'}: {self.decision} "
                f"{self.version or ''} ({self.reason}); rows={self.num_train_rows} train={self.train_seconds:.0f}s "
                f"AUC candidate={cand.get('auc', float('nan')):.4f} promoted={prev.get('auc', float('nan')):.4f}"
                + (" | " + " ".join(f"{k}={v:.0f}s" for k, v in self.stage_seconds.items()) if self.stage_seconds else ""))

    def to_dict(self) -> dict:
        return asdict(self)


class _Laps:
    """Wall time of each step of a round, written into a RoundReport's stage_seconds."""

    def __init__(self, into: dict, start: float):
        self.into, self.last = into, start

    def __call__(self, name: str) -> None:
        now = time.time()
        self.into[name] = now - self.last
        self.last = now


def _frame(cfg: Config, store: Store, targets: list[str], older: list[str]) -> pd.DataFrame:
    from llmrec_ray.ingest import examples_frame

    return examples_frame(cfg, store, targets, history_keys=older)


def _events(store: Store, keys: list[str]) -> pd.DataFrame:
    cols = ["user_id", "item_id", "rating", "label", "timestamp"]
    return pd.concat([read_shard(store, k).select(cols).to_pandas() for k in keys], ignore_index=True) if keys else pd.DataFrame(columns=cols)


def reconcile(ledger: Ledger, registry: Registry) -> None:
    """Commit the promoted version's shards if a crash came between promotion and ledger commit."""
    promoted = registry.promoted_version()
    if not promoted:
        return
    shards = registry.show(promoted).get("shards", [])
    lineage = registry.lineage(promoted)
    missing = [s for s in ledger.shards() if s.key in shards and promoted not in s.consumed_by]
    if missing:
        print(f"round: reconciling ledger: committing {len(missing)} shards of promoted {promoted}")
        ledger.commit([s.key for s in missing], promoted, lineage)


def gate(cfg: Config, cand: dict, prev: Optional[dict], forgetting: Optional[float]) -> tuple[bool, str]:
    """(promote?, reason). Not worse than the promoted model on the next period, bounded forgetting."""
    auc_c = cand.get("auc", float("nan"))
    if not math.isfinite(auc_c) or not math.isfinite(cand.get("logloss", float("nan"))):
        return False, f"candidate metrics are not finite (auc={auc_c})"
    if prev is None:
        return (auc_c > 0.5, f"first model: auc {auc_c:.4f} {'>' if auc_c > 0.5 else '<='} 0.5")
    auc_p = prev.get("auc", float("nan"))
    if math.isfinite(auc_p) and auc_c < auc_p - cfg.eval.gate_auc_tolerance:
        return False, f"auc {auc_c:.4f} < promoted {auc_p:.4f} - tolerance {cfg.eval.gate_auc_tolerance}"
    if forgetting is not None and math.isfinite(forgetting) and forgetting > cfg.eval.max_forgetting:
        return False, f"forgetting {forgetting:.4f} on the oldest period > {cfg.eval.max_forgetting}"
    return True, f"auc {auc_c:.4f} vs promoted {auc_p:.4f} (tolerance {cfg.eval.gate_auc_tolerance})"


def _rejected_shard_lists(registry: Registry, parent: Optional[str], cfg: Config) -> set[tuple[str, ...]]:
    """The shard lists on which the gate already rejected a candidate of this parent and this config."""
    config = cfg.to_dict(redact=True)
    return {tuple(info.get("shards", [])) for info in registry.list()
            if info.get("parent") == parent and info.get("config") == config
            and info.get("gate", {}).get("decision") == "reject"}


def _find_approved(registry: Registry, parent: Optional[str], shards: list[str]) -> Optional[dict]:
    for info in reversed(registry.list()):
        if info.get("parent") == parent and info.get("shards") == shards and info.get("gate", {}).get("decision") == "promote":
            return info
    return None


def run_round(cfg: Config, store: Store, fail_at: Optional[str] = None, train_fn: Optional[Callable] = None) -> RoundReport:
    from llmrec_ray.evaluate import baseline_scorer, evaluate_all, model_scorer
    from llmrec_ray.baselines import BiasedMF, HistoryLogistic, Popularity
    from llmrec_ray.ingest import item_texts, load_catalog

    if fail_at is not None and fail_at not in FAIL_POINTS:
        raise ValueError(f"fail_at={fail_at!r}; use one of {FAIL_POINTS}")
    started = time.time()
    train_fn = train_fn or train_candidate
    ledger, registry = Ledger(store), Registry(store, cfg.registry.keep_versions)
    ledger.refresh()
    reconcile(ledger, registry)

    # 1. what is new for the promoted lineage
    parent = registry.promoted_version()
    lineage = registry.lineage(parent) if parent else set()
    new = ledger.new_shards(lineage)
    if not new:
        return RoundReport(parent=parent, reason="no new shards", round_seconds=time.time() - started)
    take = cfg.data.shards_per_round if parent else cfg.data.first_round_shards
    # Shards whose candidate the gate rejected are not dropped: the next round learns them together with
    # the next shard(s). Retraining the very same shards with the same config would repeat the result.
    rejected = _rejected_shard_lists(registry, parent, cfg)  # one read of the registry
    while take < len(new) and tuple(s.key for s in new[:take]) in rejected:
        take += cfg.data.shards_per_round
    if tuple(s.key for s in new[:take]) in rejected:
        return RoundReport(parent=parent, round_seconds=time.time() - started, decision="waiting",
                           reason=f"the gate rejected a candidate trained on all {len(new)} new shards with this "
                                  "config; waiting for more data (or change the config to retry)")
    round_shards = [s.key for s in new[:take]]
    next_shard = new[take].key if len(new) > take else None
    all_shards = ledger.shards()
    older = [s.key for s in all_shards if s.period < new[0].period]
    learned = [s.key for s in all_shards if set(s.consumed_by) & lineage]
    report = RoundReport(round_shards=round_shards, parent=parent, eval_period=next_shard)
    catalog = load_catalog(store)
    texts = item_texts(catalog)
    parent_dir = registry.model_dir(parent, _cache_dir(store)) if parent else None
    promoted_scorer = model_scorer(parent_dir) if parent_dir is not None else None  # loaded once per round
    lap = _Laps(report.stage_seconds, started)
    lap("prepare")

    # 2. prequential: the promoted model on the new data, before it learns it
    if parent_dir is not None:
        frame = _frame(cfg, store, round_shards, older)
        report.metrics["prequential"] = evaluate_all({"promoted": promoted_scorer}, frame, texts,
                                                     _events(store, older), cfg, ranking=False)["promoted"]
        lap("prequential")
    if fail_at == "after_eval":
        raise InjectedFailure("after_eval")

    # 3. train (or pick up a candidate that a crashed run already registered and approved)
    approved = _find_approved(registry, parent, round_shards)
    if approved is None:
        run_name = f"round-{parent or 'base'}-{round_shards[0].split('=')[1][:10]}-{int(time.time())}"
        init_uri = store.key_uri(f"registry/versions/{parent}/model") if parent else None
        result = train_fn(cfg, store, round_shards, older, learned, init_uri, run_name)
        report.num_train_rows = int(result.metrics.get("num_train_rows", 0))
        report.train_seconds = float(result.metrics.get("train_seconds", 0.0))
        lap("train")
        if fail_at == "after_train":
            raise InjectedFailure("after_train")

        # 4. evaluate candidate vs promoted vs baselines on the next period, and forgetting on the oldest
        seen = older + round_shards
        if next_shard:
            eval_frame = _frame(cfg, store, [next_shard], seen)
        else:  # the newest shard: its latest rows (the validation split) stand in for the next period
            eval_frame = _frame(cfg, store, round_shards, older)
            eval_frame = eval_frame[eval_frame["timestamp"] >= eval_frame["timestamp"].quantile(1 - cfg.data.val_fraction)]
        history = _events(store, seen)
        log = _events(store, seen + [next_shard]) if next_shard else history  # history_lr reads events before each row
        scorers = {"candidate": model_scorer(result.export_dir),
                   "promoted": promoted_scorer,
                   "popularity": baseline_scorer(Popularity().fit(history)),
                   "mf": baseline_scorer(BiasedMF().fit(history)),
                   "history_lr": baseline_scorer(HistoryLogistic().fit(history), log)}
        report.metrics["next"] = evaluate_all(scorers, eval_frame, texts, history, cfg)
        forgetting = None
        if parent_dir is not None and learned:
            old_frame = _frame(cfg, store, [learned[0]], [s.key for s in all_shards if s.period < learned[0].split("=")[1][:10]])
            report.metrics["old"] = evaluate_all({"candidate": scorers["candidate"], "promoted": scorers["promoted"]},
                                                 old_frame, texts, history, cfg, ranking=False)
            forgetting = report.metrics["old"]["promoted"]["auc"] - report.metrics["old"]["candidate"]["auc"]
        ok, reason = gate(cfg, report.metrics["next"]["candidate"], report.metrics["next"].get("promoted"), forgetting)
        report.decision, report.reason = ("promote" if ok else "reject"), reason
        lap("evaluate")
        flat = {"candidate_auc": report.metrics["next"]["candidate"]["auc"], "forgetting": forgetting,
                "num_train_rows": report.num_train_rows, "train": {k: v for k, v in result.metrics.items()
                                                                   if isinstance(v, (int, float, bool))}}
        report.version = registry.create_version(
            result.export_dir, parent=parent, shards=round_shards, config=cfg.to_dict(redact=True),
            metrics=_finite(flat), gate={"decision": report.decision, "reason": reason},
            extra={"eval": _finite(report.metrics)})
        lap("register")
        if fail_at == "after_register":
            raise InjectedFailure("after_register")
        if not ok:
            print(f"round: gate rejected {report.version}: {reason}")
            report.round_seconds = time.time() - started
            return report
    else:
        report.version, report.decision = approved["version"], "promote"
        report.reason = f"resumed: {approved['gate'].get('reason', '')}"
        report.metrics = approved.get("eval", {})

    # 5. promote (the commit point), then commit the ledger
    try:
        registry.promote(report.version, expected_parent=parent)
    except PromotionConflict as exc:  # another round (or `llmrec models promote`) moved the pointer meanwhile
        report.decision = LOST_RACE
        report.reason = (f"{exc.promoted or 'nothing'} was promoted while this round trained from {parent or 'the backbone'}; "
                         f"{report.version} stays registered, unpromoted, and no shard was committed")
        print(f"round: lost the promotion race: {report.reason}")
        report.round_seconds = time.time() - started
        return report
    report.promoted = True
    if fail_at == "after_promote":
        raise InjectedFailure("after_promote")
    ledger.commit(round_shards, report.version, registry.lineage(report.version))
    registry.retain()
    lap("commit")
    report.round_seconds = time.time() - started
    return report


def _finite(obj):
    """JSON-safe: NaN/inf -> None (registry refuses NaN in metrics; a NaN AUC of an empty subset is 'no value')."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cache_dir(store: Store) -> str:
    import os
    import tempfile

    import zlib

    path = os.path.join(tempfile.gettempdir(), "llmrec-model-cache", f"{zlib.crc32(store.uri.encode()):08x}")
    os.makedirs(path, exist_ok=True)
    return path


def run_rounds(cfg: Config, store: Store, k: int, out_dir: str = "out/run") -> list[RoundReport]:
    from llmrec_ray.report import write_report

    reports = []
    for i in range(k):
        report = run_round(cfg, store)
        print(f"round {i + 1}/{k}: {report.summary()}")
        reports.append(report)
        if not report.round_shards:
            break
    paths = write_report(reports, out_dir)
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return reports
