"""Prometheus metrics (`GET /_gateway/metrics`), one registry per gateway state.

Labels are bounded: decision (allow/deny), action (from the route map, or `none` before a
route is known) and status code. Never a path, app name or token: those would grow without
bound and belong in the audit log.

The per-request series (request counts and the two latency histograms) are plain Python
counters that a collector turns into Prometheus families at scrape time: `observe` runs on
every request, so it is a dict lookup and a few additions, without prometheus_client's
per-value locks (the event loop is one thread). Rare events (reloads, store errors) use
prometheus_client's own types.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 75.0)


class PlainHistogram:
    """Bucket counts and a sum; Prometheus' `le` semantics (a value equal to a bound is in it)."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        if value == value:  # NaN compares false with every bound, +Inf too: no bucket, as in prometheus_client
            self.counts[bisect_left(_BUCKETS, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*(repr(float(b)) for b in _BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.total)
        family.samples.append(Sample(name + "_created", {}, self.created))  # as prometheus_client's Histogram
        return family


class RequestCollector(Collector):
    """scopegate_requests_total and the request/upstream duration histograms, from plain counters."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.created: dict[tuple[str, str, int], float] = {}  # when each label set was first seen
        self.latency = PlainHistogram()
        self.upstream_latency = PlainHistogram()

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("scopegate_requests", "Requests by decision, action and status",
                                       labels=("decision", "action", "status"))
        for key, count in list(self.requests.items()):  # first-seen order, as prometheus_client
            decision, action, status = key
            requests.add_metric((decision, action, str(status)), count, created=self.created.get(key))
        yield requests
        yield self.latency.family("scopegate_request_duration_seconds", "Whole request, gateway included")
        yield self.upstream_latency.family("scopegate_upstream_duration_seconds", "Upstream time to response headers")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_request = RequestCollector()
        self.registry.register(self.per_request)
        self.decision_cache_hits = Gauge("scopegate_decision_cache_hits",
                                         "Policy verdicts served from the cache since the last policy load",
                                         registry=self.registry)
        self.token_cache_hits = Gauge("scopegate_token_cache_hits",
                                      "Token verifications served from the cache (since start)",
                                      registry=self.registry)
        self._policy_reloads = Counter("scopegate_policy_reloads_total", "Policy/route/keyring reloads by result",
                                      ("result",), registry=self.registry)
        self._store_errors = Counter("scopegate_store_errors_total", "Failed calls to the token store",
                                    registry=self.registry)

    def observe(self, decision: str, action: str | None, status: int, duration_s: float,
                upstream_s: float | None) -> None:
        # Bounded: decisions x route actions x the statuses the gateway answers with.
        key = (decision, action or "none", status)
        counts = self.per_request.requests
        count = counts.get(key)
        if count is None:
            self.per_request.created[key] = time.time()
            count = 0
        counts[key] = count + 1
        self.per_request.latency.observe(duration_s)
        if upstream_s is not None:
            self.per_request.upstream_latency.observe(upstream_s)

    def store_failed(self) -> None:
        self._store_errors.inc()

    def reloaded(self, *, ok: bool) -> None:
        self._policy_reloads.labels("ok" if ok else "failed").inc()

    def render(self, *, decision_cache_hits: int, token_cache_hits: int) -> bytes:
        """The Prometheus text; the cache counters are read from their owners at scrape time."""
        self.decision_cache_hits.set(decision_cache_hits)
        self.token_cache_hits.set(token_cache_hits)
        return generate_latest(self.registry)
