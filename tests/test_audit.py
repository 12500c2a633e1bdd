"""Audit records: one JSON line per request, allowed or denied, field by field, with no secret."""

from __future__ import annotations

import json
import re
import time

from gateway.core.audit import FIELDS, AuditRecord, encode, what_part, who_part
from tests.conftest import UPSTREAM_SECRET, RunningGateway
from tests.servers import raw_request


def _wait_for_records(gateway: RunningGateway, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while True:
        records = gateway.audit_records()
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def test_allowed_and_denied_requests_are_audited_field_by_field(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging", name="web-ci", subject="ci:github:acme/web")
    with gateway.client() as client:
        allowed = client.post("/v1/apps/web-staging/machines/m1/start", headers={"Authorization": f"Bearer {token}"})
        denied = client.post("/v1/apps/web-prod/machines", content=b"{}",
                             headers={"Authorization": f"Bearer {token}"})
    assert allowed.status_code == 200 and denied.status_code == 403
    first, second = _wait_for_records(gateway, 2)
    for record in (first, second):
        assert set(record) == set(FIELDS)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["ts"]))
        assert record["jti"] and record["sub"] == "ci:github:acme/web" and record["token_name"] == "web-ci"
        assert record["client_ip"] == "127.0.0.1"
        assert isinstance(record["duration_ms"], float)
    assert first["request_id"] == allowed.headers["x-request-id"]
    assert first["method"] == "POST" and first["path"] == "/v1/apps/web-staging/machines/m1/start"
    assert first["action"] == "machines:control" and first["app"] == "web-staging" and first["env"] == "staging"
    assert first["decision"] == "allow" and first["status"] == 200
    assert first["reason"] == ("deployer@app:web-staging allows machines:control on app web-staging "
                               "(environment staging)")
    assert isinstance(first["upstream_ms"], float)

    assert second["request_id"] == denied.json()["request_id"]
    assert second["action"] == "machines:deploy" and second["app"] == "web-prod" and second["env"] == "production"
    assert second["decision"] == "deny" and second["status"] == 403 and second["upstream_ms"] is None
    assert "has no grant that covers app web-prod" in str(second["reason"])


def test_unauthenticated_and_malformed_requests_are_audited_too(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        client.get("/v1/apps/web", headers={"Authorization": "Bearer sgt_not-a-token"})
    raw_request(gateway.port, b"GET /v1/apps/web/../web-prod HTTP/1.1\r\nHost: x\r\n\r\n")
    records = _wait_for_records(gateway, 2)
    assert [r["status"] for r in records] == [401, 400]
    assert all(r["decision"] == "deny" and r["jti"] is None for r in records)


def test_no_token_or_credential_in_any_audit_line(gateway: RunningGateway) -> None:
    token = gateway.mint("admin@app:web")
    with gateway.client() as client:
        client.get("/v1/apps/web", headers={"Authorization": f"Bearer {token}"})
        client.get("/v1/apps/web?access_token=" + token, headers={"Authorization": f"Bearer {token}"})
        client.get("/v1/apps/other", headers={"Authorization": f"Bearer {token}"})
    _wait_for_records(gateway, 3)
    text = gateway.audit_text()
    assert len(text.splitlines()) == 3
    signature = token.rsplit(".", 1)[1]
    assert token not in text
    assert signature not in text
    assert "sgt_ey" not in text
    assert UPSTREAM_SECRET not in text


# --- one encoder: a first request and a cached one write the same line ---------------------------

_PER_REQUEST = re.compile(r'"(request_id|upstream_ms|duration_ms|ts)":("[^"]*"|[0-9.]+|null)')


def _shape(line: str) -> str:
    """The line with the values that differ per request (ids, timings) blanked, text kept as written."""
    return _PER_REQUEST.sub(lambda m: f'"{m.group(1)}":_', line)


def test_a_cached_decision_writes_the_same_line_as_the_first_request(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging", name="web-ci", subject="ci:github:acme/web")
    with gateway.client() as client:
        for _ in range(3):
            assert client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"Bearer {token}"}) \
                .status_code == 200
    assert gateway.services.authorizer.decisions.hits >= 2  # the later two took the cached path
    first, *cached = [line for line in gateway.audit_text().splitlines() if line]
    assert len(cached) == 2
    for line in cached:
        assert _shape(line) == _shape(first)  # byte for byte, but for ids and timings
    assert '"decision":"allow"' in first and '"token_name":"web-ci"' in first


def test_encode_builds_the_repeating_parts_as_the_cache_keeps_them() -> None:
    record = AuditRecord("r1", "10.0.0.1", "GET", "/v1/apps/web/machines/sgt_pasted.token", "machines:read",
                         jti="j1", sub="ci:x", token_name="tok \"quoted\" é", app="web", env="staging",
                         decision="allow", reason="viewer@app:web allows machines:read", status=200,
                         upstream_ms=1.5, duration_ms=2.25)
    fresh = encode(record, "2026-12-07T00:00:00.000Z")
    record.who, record.what = who_part(record), what_part(record)  # what the decision cache hands back
    assert encode(record, "2026-12-07T00:00:00.000Z") == fresh
    document = json.loads(fresh)
    assert list(document) == list(FIELDS)
    assert document["path"] == "/v1/apps/web/machines/sgt_[redacted]" and document["token_name"] == 'tok "quoted" é'
    record.deny(429, "rate_limited: slow down")  # a refusal after the cached decision drops the stale part
    assert json.loads(encode(record, "2026-12-07T00:00:00.000Z"))["decision"] == "deny"
