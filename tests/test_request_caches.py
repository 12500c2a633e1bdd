"""The request path's caches (gateway/plans.py): repeated requests get the answers and audit
records a first request gets, and nothing a cache holds outlives what it depends on.

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
from typing import Any

import pytest
import yaml

import gateway.plans as plans
from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core.grants import parse_grants
from gateway.core.keyring import Keyring
from gateway.core.policy import decide
from gateway.core.tokens import Claims
from gateway.plans import AllowedCache, Plan, PlanCache
from gateway.state import GatewayState
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import resolve_request
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
    assert gateway.state.policy.cache_hits >= 2


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
    state = GatewayState.build(config)
    server = ServerThread(GatewayApp(state), gateway_stack=True).start()
    running = RunningGateway(config, state, server, upstream[0], tmp_path / "audit.jsonl")
    try:
        token = running.mint("viewer@app:web-staging")
        assert [_get(running, token) for _ in range(2)] == [200, 200]  # planned and decided
        original = state.registry.check

        async def check_then_reload(claims: Claims) -> None:  # a reload lands while the store is read
            await original(claims)
            routes_document = yaml.safe_load(routes.read_text())
            for route in routes_document["routes"]:
                if route["operation"] == "Machines_list":
                    route.update(deny="always", reason="closed by the operator")
            routes.write_text(yaml.safe_dump(routes_document))
            assert state.reload_policy()

        monkeypatch.setattr(state.registry, "check", check_then_reload)
        before = len(upstream[0].received)
        assert _get(running, token) == 403
        assert len(upstream[0].received) == before
        assert "closed by the operator" in running.audit_records()[-1]["reason"]
    finally:
        server.stop()


# --- the caches themselves ----------------------------------------------------------------------

def _claims(jti: str, *grants: str) -> Claims:
    return Claims(iss="i", aud="a", sub="s", jti=jti, iat=0, nbf=0, exp=2**40, name="n", grants=parse_grants(grants))


def _plan(state: GatewayState, path: str) -> Plan:
    target = canonicalize(path.encode(), b"")
    resolved = resolve_request(state.routes.resolve("GET", target.path), b"", None)
    env = state.environments.resolve(resolved.app) if resolved.app else None
    return Plan("GET", target, path, resolved, env)


def _allow(state: GatewayState, claims: Claims, plan: Plan) -> Any:
    decision = decide(claims.grants, state.policy, app=plan.resolved.app, env=plan.env,
                      action=plan.resolved.action, token_name=claims.name)
    assert decision.allowed
    return decision


def test_an_allowed_entry_serves_only_the_claims_object_it_was_built_for(gateway: RunningGateway) -> None:
    state = gateway.state
    cache = AllowedCache(PlanCache())
    plan = _plan(state, MACHINES)
    owner = _claims("same-jti", "viewer@app:web-staging")
    assert cache.get(state, owner, plan) is None  # first use adopts the current policy
    cache.put(state, owner, plan, _allow(state, owner, plan))
    entry = cache.get(state, owner, plan)
    assert entry is not None and entry.claims is owner
    # Another token object, even one claiming the same jti, never gets that decision.
    assert cache.get(state, _claims("same-jti", "viewer@app:web-staging"), plan) is None
    assert cache.get(state, _claims("same-jti", "admin@app:*"), plan) is None
    # Another plan object for the same path is another key.
    assert cache.get(state, owner, _plan(state, MACHINES)) is None


def test_caches_drop_everything_when_the_policy_or_routes_change(gateway: RunningGateway) -> None:
    state = gateway.state
    planned = PlanCache()
    allowed = AllowedCache(planned)
    plan = _plan(state, MACHINES)
    owner = _claims("j1", "viewer@app:web-staging")
    assert planned.get(state, "GET", MACHINES.encode(), b"") is None
    planned.put(state, plan)
    assert planned.get(state, "GET", MACHINES.encode(), b"") is plan
    assert allowed.get(state, owner, plan) is None
    allowed.put(state, owner, plan, _allow(state, owner, plan))
    assert allowed.get(state, owner, plan) is not None

    state.policy.reload()  # the same engine, reloaded in place: a new generation
    assert allowed.get(state, owner, plan) is None
    allowed.put(state, owner, plan, _allow(state, owner, plan))
    assert allowed.get(state, owner, plan) is not None
    assert state.reload_policy()  # new policy, routes and constraint objects
    assert allowed.get(state, owner, plan) is None
    assert planned.get(state, "GET", MACHINES.encode(), b"") is None
    # A put for a request that started before the reload is ignored.
    stale = AllowedCache(PlanCache())
    stale.get(state, owner, plan)
    assert state.reload_policy()
    stale.put(state, owner, plan, _allow(state, owner, plan))
    assert stale.entries == {}


def test_caches_stay_within_their_bounds(gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plans, "PLAN_LIMIT", 8)
    monkeypatch.setattr(plans, "ALLOWED_LIMIT", 8)
    state = gateway.state
    planned = PlanCache()
    allowed = AllowedCache(planned)
    planned.get(state, "GET", b"/", b"")
    owner = _claims("j1", "viewer@app:*")
    allowed.get(state, owner, _plan(state, MACHINES))
    sizes = []
    for index in range(50):
        path = f"/v1/apps/app-{index}/machines"
        plan = _plan(state, path)
        planned.put(state, plan)
        allowed.get(state, owner, plan)  # follows the plans when they are dropped
        allowed.put(state, owner, plan, _allow(state, owner, plan))
        sizes.append((len(planned.plans), len(allowed.entries)))
    assert max(max(pair) for pair in sizes) <= 8
    assert sizes[-1] != (0, 0)


def test_long_targets_are_never_planned_so_plans_stay_small_in_bytes(gateway: RunningGateway) -> None:
    state = gateway.state
    cache = PlanCache()
    cache.get(state, "GET", b"/", b"")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for index in range(2000):  # queries up to the 8 KiB limit, each a different target
            raw_query = b"x=" + str(index).encode().rjust(8180, b"0")
            target = canonicalize(MACHINES.encode(), raw_query)
            resolved = resolve_request(state.routes.resolve("GET", target.path), raw_query, None)
            cache.put(state, Plan("GET", target, MACHINES, resolved, "staging"))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.plans == {}
    assert grown < 2 * 2**20, f"{grown / 2**20:.1f} MiB kept"
    short = _plan(state, MACHINES)
    cache.put(state, short)
    assert cache.get(state, "GET", MACHINES.encode(), b"") is short


def test_plans_are_keyed_by_path_and_query_apart(gateway: RunningGateway) -> None:
    state = gateway.state
    cache = PlanCache()
    cache.get(state, "GET", b"/", b"")
    plan = Plan("GET", canonicalize(MACHINES.encode(), b"a=1"), MACHINES, _plan(state, MACHINES).resolved, "staging")
    cache.put(state, plan)
    assert cache.get(state, "GET", MACHINES.encode(), b"a=1") is plan
    assert cache.get(state, "GET", MACHINES.encode() + b"?a=1", b"") is None
    assert cache.get(state, "POST", MACHINES.encode(), b"a=1") is None
