"""Admission by work, not by request count: candidate rows accepted by the ingress and not yet answered.

Serve's own bounds (max_ongoing_requests, max_queued_requests) count requests; a request of 1,000 candidates
costs a thousand times one of 1. Measured with benchmarks/bench_flood.py (200 clients x 1,000 candidates,
MiniLM, 1 Scorer replica on 2 cores): with request-count bounds alone, 192 requests were accepted, memory
stayed bounded, but 182 clients waited 120 s for nothing. This bound answers 503 + Retry-After at once when the
rows already pending plus the new ones exceed serve.max_pending_rows per Scorer replica; a request that finds
nothing pending always goes (the per-request limits of schemas.py/resolve.py bound it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class Overloaded(Exception):
    """Raised by Admission.hold when the request would exceed the bound."""


class Admission:
    def __init__(self, max_pending_rows: int):
        self.max_pending_rows = max_pending_rows
        self.pending = 0  # the Api replica runs one event loop: no lock needed
        self.refused = 0

    @contextmanager
    def hold(self, rows: int) -> Iterator[None]:
        if self.pending and self.pending + rows > self.max_pending_rows:
            self.refused += 1
            raise Overloaded(f"{self.pending} candidate rows are pending, {rows} more would pass the bound "
                             f"({self.max_pending_rows}: serve.max_pending_rows x Scorer replicas)")
        self.pending += rows
        try:
            yield
        finally:
            self.pending -= rows


def rows_to_score(num_candidates: int, shortlist: int | None) -> int:
    """The rows a request costs the Scorer: a two-stage /v1/recommend scores its shortlist, not its pool. (A version
    without an item index scores the whole pool but is counted by the shortlist too -- the ingress does not know
    which version a Scorer holds; serve.max_pool and Serve's request queues bound those requests.)"""
    return num_candidates if shortlist is None else min(num_candidates, shortlist)
