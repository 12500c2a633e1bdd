"""Requests shaped like fly-go's flaps client (flyctl) through a real gateway to a recording upstream.

What flyctl sends and expects is in shared/upstream/ENDPOINTS.md ("How real clients talk to the
Machines API"): the `FlyV1` scheme, lease nonces, `fly-request-id`, query flags the published spec
does not list (`kill`, `force_stop`, `wait`), the org-wide app listing inside app-scoped flows and
`GET /v1/tokens/current`.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import UPSTREAM_SECRET, RunningGateway
from tests.servers import Reply, raw_request

FLYCTL_UA = "flyctl/v0.3.45 linux/amd64 Go/1.23.1"


def test_flyv1_scheme_with_a_gateway_token_is_accepted(gateway: RunningGateway) -> None:
    token = gateway.mint("viewer@app:web-staging")
    assert token.startswith("sgt_")
    with gateway.client() as client:
        for scheme in ("FlyV1", "flyv1", "Bearer"):
            response = client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"{scheme} {token}"})
            assert response.status_code == 200, (scheme, response.text)
        refused = client.get("/v1/apps/web-prod/machines", headers={"Authorization": f"FlyV1 {token}"})
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert len(gateway.upstream.received) == 3
    for received in gateway.upstream.received:
        assert received.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
        assert token not in repr(received.headers)


def test_flyv1_without_the_sgt_prefix_is_unauthenticated(gateway: RunningGateway) -> None:
    token = gateway.mint("viewer@app:web-staging")
    with gateway.client() as client:
        for value in (f"FlyV1 {token.removeprefix('sgt_')}", "FlyV1 fm2_lJPECAAAAAAAAMQ=", "FlyV1"):
            response = client.get("/v1/apps/web-staging", headers={"Authorization": value})
            assert response.status_code == 401, value
            assert response.json()["error"] == "unauthenticated"
    assert gateway.upstream.received == []


def test_lease_nonce_passes_through_both_ways_and_routing_headers_stop(gateway: RunningGateway) -> None:
    gateway.upstream.reply = Reply(status=200, body=b'{"status":"success"}', headers=[
        (b"content-type", b"application/json"), (b"fly-request-id", b"01J9ZQ2M3N4P5Q6R7S8T9V0W1X-iad"),
        (b"fly-machine-lease-nonce", b"f00dfeed"), (b"set-cookie", b"flaps=1; Path=/; HttpOnly")])
    token = gateway.mint("operator@app:web-staging")
    headers = {"Authorization": f"FlyV1 {token}", "fly-machine-lease-nonce": "0123456789abcdef",
               "fly-request-id": "client-trace-7", "Fly-Force-Instance-Id": "148ed193b95389",
               "User-Agent": FLYCTL_UA}
    with gateway.client() as client:
        response = client.post("/v1/apps/web-staging/machines/148ed193b95389/lease",
                               json={"ttl": 30, "description": "flyctl deploy"}, headers=headers)
        released = client.delete("/v1/apps/web-staging/machines/148ed193b95389/lease", headers=headers)
    assert response.status_code == 200 and released.status_code == 200
    assert response.headers["fly-request-id"] == "01J9ZQ2M3N4P5Q6R7S8T9V0W1X-iad"
    assert response.headers["fly-machine-lease-nonce"] == "f00dfeed"
    assert response.headers["set-cookie"] == "flaps=1; Path=/; HttpOnly"
    acquire, release = gateway.upstream.received
    for received in (acquire, release):
        assert received.header("fly-machine-lease-nonce") == ["0123456789abcdef"]
        # What the gateway asserts, it sets (issue 15, class 4): a client's request id and its choice
        # of the upstream instance to route to stop at the gateway.
        assert received.header("fly-request-id") == []
        assert received.header("fly-force-instance-id") == []
        assert received.header("user-agent") == [FLYCTL_UA]
    assert json.loads(acquire.body) == {"ttl": 30, "description": "flyctl deploy"}
    assert (acquire.method, release.method) == ("POST", "DELETE")


@pytest.mark.parametrize(("grant", "method", "path", "query"), [
    ("admin@app:web", "DELETE", "/v1/apps/web/machines/148ed193b95389", b"kill=true"),
    ("admin@app:web", "DELETE", "/v1/apps/web/machines/148ed193b95389", b"force=true&kill=true"),
    ("operator@app:web", "POST", "/v1/apps/web/machines/148ed193b95389/stop", b"force_stop=true"),
    ("deployer@app:web", "POST", "/v1/apps/web/machines/148ed193b95389", b"wait=true&timeout=60"),
    ("viewer@app:web", "GET", "/v1/apps/web/machines/148ed193b95389/wait",
     b"instance_id=01J9&state=started&timeout=60&wait=true"),
    ("operator@app:web", "POST", "/v1/apps/web/machines/148ed193b95389/restart",
     b"force_stop=true&kill=true&wait=true&signal=SIGTERM&x=%2Fa%20b"),
], ids=["kill", "force-kill", "force_stop", "wait-update", "wait-wait", "all-in-order"])
def test_query_flags_flyctl_sends_are_forwarded_byte_for_byte(gateway: RunningGateway, grant: str, method: str,
                                                              path: str, query: bytes) -> None:
    token = gateway.mint(grant)
    # fly-go sends a JSON body only where the operation takes one (the gateway refuses one elsewhere).
    body = "" if method in ("GET", "DELETE") or path.endswith("/restart") else "{}"
    request = (f"{method} {path}?{query.decode()} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
               f"Authorization: Bearer {token}\r\n"
               f"User-Agent: {FLYCTL_UA}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    status, _, _ = raw_request(gateway.port, request)
    assert status == 200
    (received,) = gateway.upstream.received
    assert (received.method, received.raw_path, received.query) == (method, path.encode(), query)


def test_org_app_listing_is_filtered_to_the_token_and_never_leaks_the_org(gateway: RunningGateway) -> None:
    org_apps = ["web-staging", "web-prod", "api-staging", "billing-prod", "remote-builder-personal"]
    listing = {"total_apps": len(org_apps), "apps": [
        {"id": f"id-{n}", "name": n, "machine_count": 1, "network": "default", "status": "deployed",
         "organization": {"name": "Personal", "slug": "personal"}} for n in org_apps]}
    gateway.upstream.reply = Reply(body=json.dumps(listing).encode(), headers=[
        (b"content-type", b"application/json"), (b"fly-request-id", b"list-1")])
    cases = {
        "viewer@app:nothing-matches-*": [],
        "deployer@app:web-staging": ["web-staging"],
        "viewer@env:production": ["web-prod", "billing-prod"],
        "admin@app:*": org_apps,
    }
    with gateway.client() as client:
        for grant, expected in cases.items():
            response = client.get("/v1/apps?org_slug=personal",
                                  headers={"Authorization": f"FlyV1 {gateway.mint(grant)}", "User-Agent": FLYCTL_UA})
            assert response.status_code == 200, (grant, response.text)
            body = response.json()
            assert [a["name"] for a in body["apps"]] == expected, grant
            assert body["total_apps"] == len(expected), grant
            for hidden in set(org_apps) - set(expected):
                assert hidden not in response.text, (grant, hidden)
            assert response.headers["fly-request-id"] == "list-1"
    assert [r.query for r in gateway.upstream.received] == [b"org_slug=personal"] * len(cases)
    assert all(r.raw_path == b"/v1/apps" for r in gateway.upstream.received)


def test_remote_builder_lookup_is_filtered_too(gateway: RunningGateway) -> None:
    # flyctl looks for its builder with ?app_role=remote-docker-builder inside app-scoped deploys.
    listing = {"total_apps": 1, "apps": [{"name": "fly-builder-personal", "organization": {"slug": "personal"}}]}
    gateway.upstream.reply = Reply(body=json.dumps(listing).encode())
    token = gateway.mint("deployer@app:web-staging")
    with gateway.client() as client:
        response = client.get("/v1/apps?org_slug=personal&app_role=remote-docker-builder",
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json() == {"total_apps": 0, "apps": []}
    assert gateway.upstream.received[0].query == b"org_slug=personal&app_role=remote-docker-builder"


def test_current_token_is_answered_by_the_gateway_and_never_forwarded(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging", "viewer@env:staging", name="ci-web", ttl_s=900)
    with gateway.client() as client:
        response = client.get("/v1/tokens/current", headers={"Authorization": f"FlyV1 {token}",
                                                              "User-Agent": FLYCTL_UA})
        anonymous = client.get("/v1/tokens/current")
    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "scopegate" and body["name"] == "ci-web"
    assert body["grants"] == ["deployer@app:web-staging", "viewer@env:staging"]
    assert 890 <= body["exp"] - body["iat"] <= 900
    assert isinstance(body["jti"], str) and body["jti"] and body["jti"] in token_jtis(gateway)
    assert UPSTREAM_SECRET not in response.text
    assert anonymous.status_code == 401
    assert gateway.upstream.received == []


def token_jtis(gateway: RunningGateway) -> set[str]:
    return {r["jti"] for r in gateway.audit_records() if r.get("jti")}
