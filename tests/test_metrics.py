"""`GET /_gateway/metrics` (issue 3, DESIGN section 12): Prometheus text through a real gateway.

Requests counted by decision, action and status; latency histograms for the whole request and
for the upstream; decision-cache hits; policy reloads; store errors. Parsed with
prometheus_client's own parser, and compared before/after the requests each test makes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.store import TokenStore
from tests.conftest import RunningGateway
from tests.servers import Reply

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BOUNDED_LABELS = {"decision", "action", "status", "result", "le"}


def scrape(gateway: RunningGateway) -> tuple[Samples, set[str], str]:
    with gateway.client() as client:
        response = client.get("/_gateway/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families, response.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, decision: str, action: str, status: int) -> float:
    return value(samples, "scopegate_requests_total", decision=decision, action=action, status=str(status))


def call(gateway: RunningGateway, token: str | None, method: str, path: str) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with gateway.client() as client:
        return client.request(method, path, headers=headers).status_code


def test_metrics_are_prometheus_text_with_every_family(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        response = client.get("/_gateway/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "version=0.0.4" in response.headers["content-type"]
    _, families, text = scrape(gateway)
    assert {"scopegate_requests", "scopegate_request_duration_seconds", "scopegate_upstream_duration_seconds",
            "scopegate_decision_cache_hits", "scopegate_policy_reloads", "scopegate_store_errors"} <= families
    assert "# TYPE scopegate_request_duration_seconds histogram" in text
    assert "# TYPE scopegate_upstream_duration_seconds histogram" in text
    assert "# TYPE scopegate_requests_total counter" in text
    assert "# TYPE scopegate_store_errors_total counter" in text
    # Metrics are public: nothing about tokens, paths or the upstream credential.
    assert "sgt_" not in text and "/v1/" not in text


def test_requests_are_counted_by_decision_action_and_status(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging")
    admin = gateway.mint("token-admin@gateway")
    before, _, _ = scrape(gateway)
    assert call(gateway, token, "GET", "/v1/apps/web-staging/machines") == 200
    assert call(gateway, token, "GET", "/v1/apps/web-staging/machines") == 200
    assert call(gateway, token, "POST", "/v1/apps/web-prod/machines") == 403
    assert call(gateway, None, "GET", "/v1/apps/web-staging/machines") == 401
    assert call(gateway, token, "GET", "/v1/not-a-route") == 403
    gateway.upstream.replies[b"/v1/apps/web-staging"] = Reply(status=404, body=b"{}")
    assert call(gateway, token, "GET", "/v1/apps/web-staging") == 404
    assert call(gateway, admin, "GET", "/_gateway/v1/tokens") == 200
    assert call(gateway, token, "GET", "/_gateway/v1/tokens") == 403
    after, _, text = scrape(gateway)

    def delta(decision: str, action: str, status: int) -> float:
        return requests(after, decision, action, status) - requests(before, decision, action, status)

    assert delta("allow", "machines:read", 200) == 2
    assert delta("deny", "machines:deploy", 403) == 1
    assert delta("deny", "none", 401) == 1
    assert delta("deny", "none", 403) == 1  # unknown route: no action known
    assert delta("allow", "apps:read", 404) == 1  # the upstream's own status is what is counted
    assert delta("allow", "gateway:list", 200) == 1
    assert delta("deny", "gateway:list", 403) == 1
    total = sum(v for (name, _), v in after.items() if name == "scopegate_requests_total") - \
        sum(v for (name, _), v in before.items() if name == "scopegate_requests_total")
    assert total == 8
    for (name, labels), _ in after.items():
        assert {key for key, _ in labels} <= BOUNDED_LABELS, (name, labels)
    assert "web-staging" not in text and "web-prod" not in text


def histogram(samples: Samples, name: str) -> tuple[float, float, list[tuple[float, float]]]:
    count = value(samples, f"{name}_count")
    total = value(samples, f"{name}_sum")
    buckets = sorted((float(dict(labels)["le"]), v) for (sample, labels), v in samples.items()
                     if sample == f"{name}_bucket")
    return count, total, buckets


def test_latency_histograms_count_requests_and_upstream_calls(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging")
    before, _, _ = scrape(gateway)
    gateway.upstream.reply = Reply(delay_s=0.03)
    for _ in range(3):
        assert call(gateway, token, "GET", "/v1/apps/web-staging/machines") == 200
    assert call(gateway, token, "DELETE", "/v1/apps/web-staging") == 403  # never reaches the upstream
    assert call(gateway, None, "GET", "/v1/apps/web-staging") == 401
    after, _, _ = scrape(gateway)

    total_before = histogram(before, "scopegate_request_duration_seconds")
    total_after = histogram(after, "scopegate_request_duration_seconds")
    upstream_before = histogram(before, "scopegate_upstream_duration_seconds")
    upstream_after = histogram(after, "scopegate_upstream_duration_seconds")
    assert total_after[0] - total_before[0] == 5
    assert upstream_after[0] - upstream_before[0] == 3
    # The upstream took >= 30 ms three times; the whole requests at least as long.
    assert upstream_after[1] - upstream_before[1] >= 0.09
    assert total_after[1] - total_before[1] >= upstream_after[1] - upstream_before[1]
    for count, _, buckets in (total_after, upstream_after):
        assert buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == count
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    # Three upstream calls of >= 30 ms: none in the buckets below 25 ms.
    fast = [v for le, v in upstream_after[2] if le <= 0.025]
    fast_before = [v for le, v in upstream_before[2] if le <= 0.025]
    assert fast == fast_before


def test_decision_cache_hits_grow_on_repeated_requests(gateway: RunningGateway) -> None:
    token = gateway.mint("viewer@app:web-staging")
    assert call(gateway, token, "GET", "/v1/apps/web-staging/machines") == 200  # warms the caches
    before, _, _ = scrape(gateway)
    for _ in range(5):
        assert call(gateway, token, "GET", "/v1/apps/web-staging/machines") == 200
    after, _, _ = scrape(gateway)
    assert value(after, "scopegate_decision_cache_hits") - value(before, "scopegate_decision_cache_hits") >= 5
    assert value(after, "scopegate_token_cache_hits") - value(before, "scopegate_token_cache_hits") >= 5
    # A different question is not a hit the first time.
    hits = value(after, "scopegate_decision_cache_hits")
    assert call(gateway, token, "GET", "/v1/apps/web-staging/volumes") == 200
    again, _, _ = scrape(gateway)
    assert value(again, "scopegate_decision_cache_hits") == hits


def test_store_errors_are_counted(gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    before, _, _ = scrape(gateway)
    assert ("scopegate_store_errors_total", frozenset()) in before
    assert value(before, "scopegate_store_errors_total") == 0
    store: TokenStore = gateway.services.store

    async def broken(cursor: str) -> Any:
        raise OSError("disk went away")

    # The store's change feed fails (as a lost Redis or a broken disk would make it).
    monkeypatch.setattr(store, "changes_since", broken)
    deadline = time.monotonic() + 3
    while value(scrape(gateway)[0], "scopegate_store_errors_total") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value(scrape(gateway)[0], "scopegate_store_errors_total") >= 2
    monkeypatch.undo()
    time.sleep(0.6)
    settled = value(scrape(gateway)[0], "scopegate_store_errors_total")
    time.sleep(0.6)
    assert value(scrape(gateway)[0], "scopegate_store_errors_total") == settled
