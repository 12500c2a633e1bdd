"""Prometheus metrics (`GET /_gateway/metrics`), one registry per gateway state.

Labels are bounded: decision (allow/deny), action (from the route map, or `none` before a
route is known) and status code. Never a path, app name or token: those would grow without
bound and belong in the audit log.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 75.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("scopegate_requests_total", "Requests by decision, action and status",
                                ("decision", "action", "status"), registry=self.registry)
        self.latency = Histogram("scopegate_request_duration_seconds", "Whole request, gateway included",
                                 buckets=_BUCKETS, registry=self.registry)
        self.upstream_latency = Histogram("scopegate_upstream_duration_seconds",
                                          "Upstream time to response headers", buckets=_BUCKETS,
                                          registry=self.registry)
        self.decision_cache_hits = Gauge("scopegate_decision_cache_hits",
                                         "Policy verdicts served from the cache since the last policy load",
                                         registry=self.registry)
        self.token_cache_hits = Gauge("scopegate_token_cache_hits",
                                      "Token verifications served from the cache (since start)",
                                      registry=self.registry)
        self.policy_reloads = Counter("scopegate_policy_reloads_total", "Policy/route/keyring reloads by result",
                                      ("result",), registry=self.registry)
        self._children: dict[tuple[str, str, int], Any] = {}
        self.store_errors = Counter("scopegate_store_errors_total", "Failed calls to the token store",
                                    registry=self.registry)

    def observe(self, decision: str, action: str | None, status: int, duration_s: float,
                upstream_s: float | None) -> None:
        key = (decision, action or "none", status)
        child = self._children.get(key)
        if child is None:
            # Bounded: decisions x route actions x the statuses the gateway answers with.
            child = self._children[key] = self.requests.labels(key[0], key[1], str(status))
        child.inc()
        self.latency.observe(duration_s)
        if upstream_s is not None:
            self.upstream_latency.observe(upstream_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
