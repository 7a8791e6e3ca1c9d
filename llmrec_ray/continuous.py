"""Continuous mode: watch the store and run an incremental round whenever enough new data has landed.

SIGTERM / SIGINT ask for a clean stop: the loop finishes the round it is in (every write it makes --
checkpoint, version, promoted pointer, ledger -- is atomic anyway) and exits before starting another.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Optional

from llmrec_ray.config import Config
from llmrec_ray.ledger import Ledger
from llmrec_ray.pipeline import LOST_RACE, run_round
from llmrec_ray.registry import Registry
from llmrec_ray.store import Store

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between rounds and while sleeping."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("signal %s: stopping after the current step", signum)
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def enough_new_data(num_new_shards: int, num_new_rows: int, cfg: Config) -> bool:
    return num_new_shards >= cfg.continuous.min_new_shards and num_new_rows >= cfg.continuous.min_new_rows


def run_continuous(cfg: Config, store: Store, stop: Optional[StopFlag] = None,
                   round_fn: Optional[Callable] = None) -> list:
    """Poll for new shards; run a round when thresholds are met. Returns the rounds' reports."""
    round_fn = round_fn or run_round
    stop = stop or StopFlag()
    stop.install()
    ledger, registry, reports = Ledger(store, cfg.data.hold_unknown_items_s), Registry(store), []
    rejected_at: Optional[int] = None  # new-shard count when the gate last rejected: wait for more data
    print(f"continuous: watching {store.uri} every {cfg.continuous.poll_interval_s:g} s (SIGTERM stops cleanly)")
    while not stop.is_set():
        ledger.refresh()
        new = ledger.new_shards(registry.lineage_of_promoted())
        rows = sum(s.num_rows for s in new)
        waiting_for_more = rejected_at is not None and len(new) <= rejected_at
        if enough_new_data(len(new), rows, cfg) and not waiting_for_more:
            print(f"continuous: {len(new)} new shards ({rows:,} rows) -> round {len(reports) + 1}")
            report = round_fn(cfg, store)
            reports.append(report)
            print(f"continuous: round {len(reports)}: {report.summary()}")
            # a rejected or waiting round waits for more data; a lost promotion race retries at once from the winner
            retry = report.promoted or report.decision == LOST_RACE
            rejected_at = None if retry else len(new)
            if cfg.continuous.max_rounds and len(reports) >= cfg.continuous.max_rounds:
                break
            continue  # more may be waiting: check again at once
        stop.wait(cfg.continuous.poll_interval_s)
    print(f"continuous: stopped after {len(reports)} rounds")
    return reports
