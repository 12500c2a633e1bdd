"""The request path's caches (surfaces/machines/request_lines.py, core/decision_cache.py): repeated
requests get the answers and audit records a first request gets, and nothing a cache holds outlives what it depends on.

Through a real gateway: the first request of a (method, target) and token takes the whole path,
later ones take the cached plan and decision. Directly: the caches refuse entries for another
token object, drop themselves on reload and stay within their bounds.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core import decision_cache
from gateway.core.audit import AuditRecord
from gateway.core.authorizer import Ruling
from gateway.core.decision_cache import CachedDecision, DecisionCache
from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import parse_grants
from gateway.core.keyring import Keyring
from gateway.core.tokens import Claims
from gateway.services import Services
from gateway.surfaces.machines import request_lines
from gateway.surfaces.machines.request_lines import RequestLine, RequestLineCache
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request
from tests.conftest import CREDENTIAL_ENV, REPO, UPSTREAM_SECRET, RunningGateway, start_gateway, write_config
from tests.servers import RecordingUpstream, ServerThread

MACHINES = "/v1/apps/web-staging/machines"
PER_REQUEST = {"request_id", "ts", "duration_ms", "upstream_ms"}


def _get(gateway: RunningGateway, token: str, path: str = MACHINES) -> int:
    with gateway.client() as client:
        return client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code


def _raw_lines(gateway: RunningGateway) -> list[str]:
    return [line for line in gateway.audit_text().splitlines() if line]


def test_repeated_requests_write_the_same_record_as_the_first(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging", name="web-ci", subject="ci:acme/web")
    assert [_get(gateway, token) for _ in range(3)] == [200, 200, 200]
    lines = _raw_lines(gateway)
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    first = records[0]
    assert first["decision"] == "allow" and first["jti"] and first["reason"].startswith("deployer@app:web-staging")
    for record in records[1:]:
        # Same fields in the same order; only the per-request ones differ.
        assert list(record) == list(first)
        assert {k: v for k, v in record.items() if k not in PER_REQUEST} == \
               {k: v for k, v in first.items() if k not in PER_REQUEST}
        assert isinstance(record["upstream_ms"], float) and isinstance(record["duration_ms"], float)
    assert len({r["request_id"] for r in records}) == 3
    assert gateway.services.authorizer.decisions.hits >= 2


def test_a_token_in_the_path_stays_redacted_on_the_cached_path(gateway: RunningGateway) -> None:
    other = gateway.mint("viewer@app:web-staging")
    token = gateway.mint("deployer@app:web-staging")
    path = f"{MACHINES}/{other}"  # a token pasted where a machine id belongs
    assert [_get(gateway, token, path) for _ in range(3)] == [200, 200, 200]
    text = gateway.audit_text()
    assert other not in text and other.split(".")[-1] not in text
    records = [json.loads(line) for line in _raw_lines(gateway)]
    assert [r["path"] for r in records] == [f"{MACHINES}/sgt_[redacted]"] * 3


def test_two_tokens_on_one_path_keep_their_own_answers(gateway: RunningGateway) -> None:
    staging = gateway.mint("viewer@app:web-staging")
    prod = gateway.mint("viewer@app:web-prod")
    answers = [(_get(gateway, staging), _get(gateway, prod)) for _ in range(3)]
    assert answers == [(200, 403)] * 3
    assert all(r.raw_path == MACHINES.encode() for r in gateway.upstream.received)
    assert len(gateway.upstream.received) == 3


def test_revocation_is_checked_on_every_request_of_a_cached_decision(gateway: RunningGateway) -> None:
    token = gateway.mint("viewer@app:web-staging")
    assert [_get(gateway, token) for _ in range(2)] == [200, 200]
    jti = gateway.audit_records()[-1]["jti"]
    gateway.revoke(jti)
    deadline = time.monotonic() + 2
    while _get(gateway, token) != 401:
        assert time.monotonic() < deadline, "still allowed 2 s after revocation"
        time.sleep(0.05)
    assert gateway.audit_records()[-1]["status"] == 401


def test_constraints_read_every_body_on_a_planned_path(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging")
    good = {"config": {"image": "registry.fly.io/web-staging:deployment-7"}}
    bad = {"config": {"image": "docker.io/library/nginx:latest"}}
    statuses = []
    with gateway.client() as client:
        for body in (good, good, bad, good, bad):
            statuses.append(client.post(MACHINES, content=json.dumps(body),
                                        headers={"Authorization": f"Bearer {token}"}).status_code)
    assert statuses == [200, 200, 403, 200, 403]
    images = [json.loads(r.body)["config"]["image"] for r in gateway.upstream.received if r.method == "POST"]
    assert images == [good["config"]["image"]] * 3


def test_a_failure_after_a_cached_decision_is_audited_with_the_token_and_app(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, rate_limit={"requests_per_second": 0.01, "burst": 2})
    try:
        token = running.mint("viewer@app:web-staging", name="limited")
        assert [_get(running, token) for _ in range(3)] == [200, 200, 429]
        allowed, cached, limited = running.audit_records()
        assert cached["decision"] == "allow" and cached["jti"] == allowed["jti"]
        assert limited["status"] == 429 and limited["decision"] == "deny"
        assert limited["reason"].startswith("rate_limited")
        for key in ("jti", "sub", "token_name", "method", "path", "action", "app", "env"):
            assert limited[key] == allowed[key], key
    finally:
        running.server.stop()


def _declare_too_large(gateway: RunningGateway, token: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.putrequest("GET", MACHINES, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_refusal_on_a_cached_decision_is_audited_with_the_token(gateway: RunningGateway) -> None:
    fresh = gateway.mint("viewer@app:web-staging", name="fresh")
    warm = gateway.mint("viewer@app:web-staging", name="warm")
    assert [_get(gateway, warm) for _ in range(3)] == [200, 200, 200]
    assert _declare_too_large(gateway, fresh) == 413  # planned path, no cached decision
    assert _declare_too_large(gateway, warm) == 413  # cached decision
    *_, slow, fast = gateway.audit_records()
    for record, name in ((slow, "fresh"), (fast, "warm")):
        assert record["status"] == 413 and record["decision"] == "deny"
        assert record["token_name"] == name and record["jti"] and record["sub"] == "test:user"
        assert (record["action"], record["app"], record["env"]) == ("machines:read", "web-staging", "staging")


def test_a_reload_while_the_token_is_checked_applies_to_that_request(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    routes = tmp_path / "routes.yaml"
    shutil.copy(REPO / "policies/routes/fly-machines.yaml", routes)
    path = write_config(tmp_path, upstream[1].url)
    document = yaml.safe_load(path.read_text())
    document["routes"] = [str(routes)]
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    Keyring.generate(config.tokens_keyring).save()
    services = Services.build(config)
    server = ServerThread(GatewayApp(services), gateway_stack=True).start()
    running = RunningGateway(config, services, server, upstream[0], tmp_path / "audit.jsonl")
    try:
        token = running.mint("viewer@app:web-staging")
        assert [_get(running, token) for _ in range(2)] == [200, 200]  # planned and decided
        original = services.registry.check

        async def check_then_reload(claims: Claims) -> None:  # a reload lands while the store is read
            await original(claims)
            routes_document = yaml.safe_load(routes.read_text())
            for route in routes_document["routes"]:
                if route["operation"] == "Machines_list":
                    route.update(deny="always", reason="closed by the operator")
            routes.write_text(yaml.safe_dump(routes_document))
            assert services.reloader.reload_policy()

        monkeypatch.setattr(services.registry, "check", check_then_reload)
        before = len(upstream[0].received)
        assert _get(running, token) == 403
        assert len(upstream[0].received) == before
        assert "closed by the operator" in running.audit_records()[-1]["reason"]
    finally:
        server.stop()


# --- the caches themselves ----------------------------------------------------------------------

def _claims(jti: str, *grants: str) -> Claims:
    return Claims(iss="i", aud="a", sub="s", jti=jti, iat=0, nbf=0, exp=2**40, name="n", grants=parse_grants(grants))


def _line(services: Services, path: str, raw_query: bytes = b"") -> RequestLine:
    target = canonicalize(path.encode(), raw_query)
    resolved = resolve_request(services.machines.routes.resolve("GET", target.path), raw_query, None)
    return RequestLine("GET", target, path, resolved, services.authorizer.check(resolved.action, resolved.app))


def _entry(services: Services, claims: Claims, line: RequestLine) -> tuple[Ruling, CachedDecision]:
    ruling = services.authorizer.decide(claims, [line.check])
    assert ruling.allowed
    return ruling, CachedDecision(claims, ruling.decision, "who", "what")


def _put(cache: DecisionCache, claims: Claims, line: RequestLine, ruling: Ruling, entry: CachedDecision) -> None:
    cache.put(ruling.rules, ruling.generation, claims, line, entry)


def _lines(services: Services) -> tuple[RouteTable, EnvironmentResolver]:
    return services.machines.routes, services.authorizer.environments


def test_an_allowed_entry_serves_only_the_claims_object_it_was_built_for(gateway: RunningGateway) -> None:
    services = gateway.services
    cache = DecisionCache()
    line = _line(services, MACHINES)
    owner = _claims("same-jti", "viewer@app:web-staging")
    rules = services.authorizer.rules
    assert cache.get(rules, owner, line) is None  # first use adopts the current rules
    _put(cache, owner, line, *_entry(services, owner, line))
    entry = cache.get(rules, owner, line)
    assert entry is not None and entry.claims is owner
    # Another token object, even one claiming the same jti, never gets that decision.
    assert cache.get(rules, _claims("same-jti", "viewer@app:web-staging"), line) is None
    assert cache.get(rules, _claims("same-jti", "admin@app:*"), line) is None
    # Another request line object for the same path is another key.
    assert cache.get(rules, owner, _line(services, MACHINES)) is None


def test_caches_drop_everything_when_the_policy_or_routes_change(gateway: RunningGateway) -> None:
    services = gateway.services
    lines = RequestLineCache()
    decisions = DecisionCache()
    line = _line(services, MACHINES)
    owner = _claims("j1", "viewer@app:web-staging")
    assert lines.get(*_lines(services), "GET", MACHINES.encode(), b"", False) is None
    lines.put(*_lines(services), line)
    assert lines.get(*_lines(services), "GET", MACHINES.encode(), b"", False) is line
    assert decisions.get(services.authorizer.rules, owner, line) is None
    _put(decisions, owner, line, *_entry(services, owner, line))
    assert decisions.get(services.authorizer.rules, owner, line) is not None

    services.policy.reload()  # the same engine, reloaded in place: a new generation
    assert decisions.get(services.authorizer.rules, owner, line) is None
    _put(decisions, owner, line, *_entry(services, owner, line))
    assert decisions.get(services.authorizer.rules, owner, line) is not None
    assert services.reloader.reload_policy()  # new policy, routes and constraint objects
    assert decisions.get(services.authorizer.rules, owner, line) is None
    assert lines.get(*_lines(services), "GET", MACHINES.encode(), b"", False) is None
    # A put for a request decided before the reload is ignored.
    authorizer = services.authorizer
    ruling, _ = _entry(services, owner, line)
    authorizer.cached(owner, line)
    assert services.reloader.reload_policy()
    authorizer.remember(owner, line, ruling, AuditRecord("r", "127.0.0.1", "GET", MACHINES, "machines:read"))
    assert authorizer.decisions.entries == {}
    assert authorizer.cached(owner, line) is None


def test_caches_stay_within_their_bounds(gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_lines, "LINE_LIMIT", 8)
    monkeypatch.setattr(decision_cache, "DECISION_LIMIT", 8)
    services = gateway.services
    lines = RequestLineCache()
    decisions = DecisionCache()
    lines.get(*_lines(services), "GET", b"/", b"", False)
    owner = _claims("j1", "viewer@app:*")
    decisions.get(services.authorizer.rules, owner, _line(services, MACHINES))
    sizes = []
    for index in range(50):
        line = _line(services, f"/v1/apps/app-{index}/machines")
        lines.put(*_lines(services), line)
        _put(decisions, owner, line, *_entry(services, owner, line))
        sizes.append((len(lines.lines), len(decisions.entries)))
    assert max(max(pair) for pair in sizes) <= 8
    assert sizes[-1] != (0, 0)


def test_long_targets_are_never_planned_so_plans_stay_small_in_bytes(gateway: RunningGateway) -> None:
    services = gateway.services
    cache = RequestLineCache()
    cache.get(*_lines(services), "GET", b"/", b"", False)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for index in range(2000):  # queries up to the 8 KiB limit, each a different target
            raw_query = b"x=" + str(index).encode().rjust(8180, b"0")
            cache.put(*_lines(services), _line(services, MACHINES, raw_query))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.lines == {}
    assert grown < 2 * 2**20, f"{grown / 2**20:.1f} MiB kept"
    short = _line(services, MACHINES)
    cache.put(*_lines(services), short)
    assert cache.get(*_lines(services), "GET", MACHINES.encode(), b"", False) is short


def test_plans_are_keyed_by_path_and_query_apart(gateway: RunningGateway) -> None:
    services = gateway.services
    cache = RequestLineCache()
    cache.get(*_lines(services), "GET", b"/", b"", False)
    line = _line(services, MACHINES, b"a=1")
    cache.put(*_lines(services), line)
    assert cache.get(*_lines(services), "GET", MACHINES.encode(), b"a=1", True) is line
    assert cache.get(*_lines(services), "GET", MACHINES.encode() + b"?a=1", b"", False) is None
    assert cache.get(*_lines(services), "POST", MACHINES.encode(), b"a=1", True) is None


def test_a_bare_question_mark_is_another_request_line(gateway: RunningGateway) -> None:
    services = gateway.services
    cache = RequestLineCache()
    cache.get(*_lines(services), "GET", b"/", b"", False)
    line = _line(services, MACHINES)
    cache.put(*_lines(services), line)
    assert cache.get(*_lines(services), "GET", MACHINES.encode(), b"", True) is None
