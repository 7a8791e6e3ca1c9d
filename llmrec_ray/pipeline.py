"""One incremental round: select the new shards -> evaluate the promoted model on them (prequential) -> train from
the promoted checkpoint on new + replayed data -> judge the candidate (llmrec_ray/judge.py: next period, forgetting,
gate) -> register it -> promote it and commit the ledger.

Crash safety: the promoted pointer is the commit point. Every write before it is either harmless to
repeat (training checkpoints under a fresh run name) or found again on a rerun (a registered,
gate-approved but unpromoted version of the same parent and shards is promoted instead of retrained).
Every round starts by reconciling: if the promoted version's shards are not yet committed in the
ledger (a crash between promotion and ledger commit), they are committed first. So a crash at any
step followed by a rerun never consumes a shard twice nor skips one. Tests crash a round on purpose
after any step: run_round(fail_at=<step>).

Races: promotion is a compare-and-swap on "the promoted version is still this round's parent". Of two rounds
started from the same parent exactly one promotes; the other reports LOST_RACE, commits nothing in the ledger
and leaves its candidate registered, unpromoted (the next round starts from the winner).

Periods: the round learns the oldest new shard(s) (data.first_round_shards in the first round,
data.shards_per_round later) and is judged on the shard after them (see llmrec_ray/judge.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm

from llmrec_ray import judge
from llmrec_ray.config import Config
from llmrec_ray.evaluate import model_scorer
from llmrec_ray.item_index import index_builder
from llmrec_ray.ledger import Ledger
from llmrec_ray.registry import PromotionConflict, Registry, model_prefix
from llmrec_ray.report import write_report
from llmrec_ray.catalog import catalog_version, load_catalog
from llmrec_ray.schema import period_of_key
from llmrec_ray.store import Store
from llmrec_ray.text import item_texts
from llmrec_ray.train import TrainResult, train_candidate

STEPS = ("prepare", "prequential", "train", "evaluate", "register", "promote", "commit")
FAIL_POINTS = ("prequential", "train", "register", "promote")  # a crash after each leaves different writes behind
LOST_RACE = "lost race"  # RoundReport.decision when another writer promoted first: nothing committed


class InjectedFailure(RuntimeError):
    """Raised after a named step by run_round(fail_at=...) to test crash safety."""


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
    catalog_version: Optional[str] = None  # the catalogue the round read (llmrec_ray/catalog.py)
    metrics: dict = field(default_factory=dict)  # {"prequential": {...}, "next": {name: {...}}, "old": {...}}
    stage_seconds: dict = field(default_factory=dict)  # wall time of each step run (STEPS)

    def summary(self) -> str:
        nxt = self.metrics.get("next", {})
        cand, prev = nxt.get("candidate", {}), nxt.get("promoted", {})
        return (f"{','.join(period_of_key(s) for s in self.round_shards) or '-'}: {self.decision} "
                f"{self.version or ''} ({self.reason}); rows={self.num_train_rows} train={self.train_seconds:.0f}s "
                f"AUC candidate={cand.get('auc', float('nan')):.4f} promoted={prev.get('auc', float('nan')):.4f}"
                + (" | " + " ".join(f"{k}={v:.0f}s" for k, v in self.stage_seconds.items()) if self.stage_seconds else ""))

    def to_dict(self) -> dict:
        return asdict(self)


class _Steps:
    """The round's step hook: times each step into report.stage_seconds, shows the running step on a progress bar
    (progress=True, on a terminal), and raises InjectedFailure after the step named by fail_at."""

    def __init__(self, report: RoundReport, fail_at: Optional[str], progress: bool, desc: str = "round"):
        if fail_at is not None and fail_at not in STEPS:
            raise ValueError(f"fail_at={fail_at!r}; use one of {STEPS}")
        self.report, self.fail_at, self.desc, self.started = report, fail_at, desc, time.time()
        # stdout, like the round's own lines: stderr may be a log file (llmrec_ray.runtime.quiet_output)
        self.bar = tqdm(total=len(STEPS), desc=desc, unit="step", file=sys.stdout, leave=False,
                        disable=None if progress else True,  # None: only on a terminal
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed}")
        self.done = threading.Event()
        if not self.bar.disable:  # the elapsed time ticks on while a long step (train) runs
            threading.Thread(target=self._tick, name="round-progress", daemon=True).start()

    def _tick(self) -> None:
        while not self.done.wait(1.0):
            self.bar.refresh()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description_str(f"{self.desc}: {name}")
        start = time.time()
        try:
            yield
        except BaseException:
            self._close()
            raise
        self.report.stage_seconds[name] = time.time() - start
        self.bar.update(1)
        if name == self.fail_at:
            self._close()
            raise InjectedFailure(name)

    def _close(self) -> None:
        self.done.set()
        self.bar.close()

    def finish(self) -> RoundReport:
        self._close()
        self.report.round_seconds = time.time() - self.started
        return self.report


def run_round(cfg: Config, store: Store, fail_at: Optional[str] = None, train_fn: Optional[Callable] = None,
              progress: bool = False, desc: str = "round") -> RoundReport:
    """One round, step by step (STEPS). train_fn: train_candidate's signature (tests pass a fast fake)."""
    report = RoundReport()
    steps = _Steps(report, fail_at, progress, desc)
    ledger, registry = Ledger(store, cfg.data.hold_unknown_items_s), Registry(store, cfg.registry.keep_versions)
    with steps("prepare"):
        ledger.refresh()
        reconcile(ledger, registry)
        parent = report.parent = registry.promoted_version()
        chosen = select_shards(cfg, ledger, registry, parent)
        periods = chosen.periods
        if periods is not None:
            report.round_shards, report.eval_period = periods.learn, periods.next
            # pinned for the whole round (ingest, training, judging): an update landing meanwhile waits for the next
            periods.catalog_version = report.catalog_version = catalog_version(store)
            texts = item_texts(load_catalog(store, version=periods.catalog_version))
            promoted = model_scorer(registry.model_dir(parent, _cache_dir(store))) if parent else None  # loaded once
    if periods is None:  # nothing to learn now: the round ends before its first step
        report.decision, report.reason = chosen.decision, chosen.reason
        report.stage_seconds.clear()
        return steps.finish()
    with steps("prequential"):  # the promoted model on the new data, before it learns it
        if promoted is not None:
            report.metrics["prequential"] = judge.prequential(cfg, store, texts, promoted, periods)

    approved = _find_approved(registry, parent, periods.learn)  # a crashed rerun's candidate: promote, not retrain
    if approved is None:
        result = None
        try:
            with steps("train"):
                result = (train_fn or train_candidate)(cfg, store, periods.learn, periods.before, chosen.replay,
                                                       store.key_uri(model_prefix(parent)) if parent else None,
                                                       f"round-{parent or 'base'}-{period_of_key(periods.learn[0])}-{int(time.time())}",
                                                       catalog_version=periods.catalog_version)
                report.num_train_rows = int(result.metrics.get("num_train_rows", 0))
                report.train_seconds = float(result.metrics.get("train_seconds", 0.0))
            with steps("evaluate"):
                verdict = judge.judge(cfg, store, texts, model_scorer(result.export_dir), promoted, periods)
                report.metrics.update(verdict.metrics)
                report.decision, report.reason = ("promote" if verdict.promote else "reject"), verdict.reason
            with steps("register"):
                report.version = _register(cfg, registry, result, verdict, report)
        finally:  # registered (or failed): the driver's local copy of the export goes
            if result is not None:
                result.discard()
        if not verdict.promote:  # the report says so: decision "reject" and the gate's reason
            return steps.finish()
    else:
        report.version, report.decision = approved["version"], "promote"
        report.reason = f"resumed: {approved['gate'].get('reason', '')}"
        report.metrics = approved.get("eval", {})

    with steps("promote"):  # the commit point
        report.promoted = _promote(registry, report)
    if report.promoted:
        with steps("commit"):
            ledger.commit(report.round_shards, report.version, registry.lineage(report.version))
            registry.retain()
    return steps.finish()


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


@dataclass
class Selection:
    """What a round learns (select_shards)."""

    periods: Optional[judge.Periods]  # None: nothing to learn now
    replay: list[str] = field(default_factory=list)  # shards the promoted lineage learned: replayed against forgetting
    decision: str = ""  # when periods is None: "nothing new" or "waiting", and why
    reason: str = ""


def select_shards(cfg: Config, ledger: Ledger, registry: Registry, parent: Optional[str]) -> Selection:
    """The oldest new shards for the promoted lineage, and the periods around them. A shard list whose candidate the
    gate rejected is not dropped: the next round learns it together with the next shard(s) -- retraining the very
    same shards with the same config would repeat the result."""
    lineage = registry.lineage(parent) if parent else set()
    new = ledger.new_shards(lineage)
    if not new:
        held = ledger.held()
        if held:
            key, h = min(held.items(), key=lambda kv: kv[1]["period"])
            return Selection(None, decision="waiting", reason=f"{key} is held: {h['unknown_rows']} rows name items not "
                             f"in the catalogue yet (e.g. {h['examples'][:3]}); rounds go on once a catalogue update adds "
                             "them or the shard is quarantined (data.hold_unknown_items_s)")
        return Selection(None, decision="nothing new", reason="no new shards")
    take = cfg.data.shards_per_round if parent else cfg.data.first_round_shards
    rejected = _rejected_shard_lists(registry, parent, cfg)
    while take < len(new) and tuple(s.key for s in new[:take]) in rejected:
        take += cfg.data.shards_per_round
    if tuple(s.key for s in new[:take]) in rejected:
        return Selection(None, decision="waiting", reason=f"the gate rejected a candidate trained on all {len(new)} new "
                         "shards with this config; waiting for more data (or change the config to retry)")
    shards = ledger.shards()
    learned = [s for s in shards if set(s.consumed_by) & lineage]
    periods = judge.Periods(learn=[s.key for s in new[:take]], before=[s.key for s in shards if s.period < new[0].period],
                            next=new[take].key if len(new) > take else None,
                            oldest_learned=learned[0].key if learned else None,
                            before_oldest=[s.key for s in shards if learned and s.period < learned[0].period])
    return Selection(periods, [s.key for s in learned])


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


def _register(cfg: Config, registry: Registry, result: TrainResult, verdict: judge.Verdict, report: RoundReport) -> str:
    flat = {"candidate_auc": verdict.metrics["next"]["candidate"]["auc"], "forgetting": verdict.forgetting,
            "num_train_rows": report.num_train_rows,
            "train": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool))}}
    return registry.create_version(
        result.export_dir, parent=report.parent, shards=report.round_shards, config=cfg.to_dict(redact=True),
        metrics=_finite(flat), gate={"decision": report.decision, "reason": verdict.reason},
        extra={"eval": _finite(report.metrics), "catalog_version": report.catalog_version}, before_upload=index_builder(cfg, registry.store))


def _promote(registry: Registry, report: RoundReport) -> bool:
    """Promote report.version if the pointer is still at its parent; on a lost race, say so in the report."""
    try:
        registry.promote(report.version, expected_parent=report.parent)
        return True
    except PromotionConflict as exc:  # another round (or `llmrec models promote`) moved the pointer meanwhile
        report.decision = LOST_RACE
        report.reason = (f"{exc.promoted or 'nothing'} was promoted while this round trained from "
                         f"{report.parent or 'the backbone'}; {report.version} stays registered, unpromoted, and no "
                         "shard was committed")
        return False


def _finite(obj):
    """JSON-safe: NaN/inf -> None (registry refuses NaN in metrics; a NaN AUC of an empty subset is 'no value')."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cache_dir(store: Store) -> str:
    """Where promoted models are cached on this machine, one folder per store."""
    path = os.path.join(tempfile.gettempdir(), "llmrec-model-cache", f"{zlib.crc32(store.uri.encode()):08x}")
    os.makedirs(path, exist_ok=True)
    return path


def run_rounds(cfg: Config, store: Store, k: int, out_dir: str = "out/run") -> list[RoundReport]:
    reports = []
    for i in range(k):
        report = run_round(cfg, store, progress=True, desc=f"round {i + 1}/{k}")
        print(f"round {i + 1}/{k}: {report.summary()}")
        reports.append(report)
        if not report.round_shards:
            break
    paths = write_report(reports, out_dir)
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return reports
