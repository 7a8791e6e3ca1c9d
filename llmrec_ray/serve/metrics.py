"""GET /metrics: the ingress replica's request counts and the Scorer's model state, written by prometheus_client
(which escapes label values and formats the text exposition; it comes with ray[serve])."""

from collections import Counter
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class _Snapshot:
    """A collector that yields metric families built for one scrape."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class IngressMetrics:
    """HTTP answers counted by this ingress replica, by path (any path but `routes` counts as "other") and status."""

    def __init__(self, routes: Iterable[str]):
        self.routes = set(routes)
        self.requests: Counter = Counter()
        self.failures: Counter = Counter()

    def count(self, path: str, status: int) -> None:
        path = path if path in self.routes else "other"
        self.requests[path] += 1
        if status >= 400:
            self.failures[(path, str(status))] += 1

    def render(self, info: dict) -> bytes:
        """The Prometheus text exposition of the counts and of `info` (the Scorer's GET /v1/model answer)."""
        requests = CounterMetricFamily("llmrec_requests", "HTTP requests by path (this ingress replica)", labels=["path"])
        for path, n in sorted(self.requests.items()):
            requests.add_metric([path], n)
        failures = CounterMetricFamily("llmrec_request_failures", "Failed HTTP requests by path and status",
                                       labels=["path", "code"])
        for (path, code), n in sorted(self.failures.items()):
            failures.add_metric([path, code], n)
        served = GaugeMetricFamily("llmrec_model_info", "The version being served", labels=["version"])
        if info.get("version"):
            served.add_metric([info["version"]], 1)
        families = [requests, failures,
                    CounterMetricFamily("llmrec_model_reloads", "Model versions loaded (one scorer replica)",
                                        value=info["reloads"]),
                    CounterMetricFamily("llmrec_model_failed_loads", "Model versions refused because they failed to "
                                        "load", value=info["failed_loads"]),
                    GaugeMetricFamily("llmrec_model_in_sync", "1 when the served version is the promoted one",
                                      value=int(info["in_sync"])),
                    served]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(families))
        return generate_latest(registry)
