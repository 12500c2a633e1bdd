"""Reading the audit back (issue 16 item 13): `GET /_gateway/v1/audit` with filters, and
`scopegate audit tail|export` with filters, `--json`, remote mode and a clear answer when the only
sink is stdout (the example config, the Docker image)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.audit import AuditLog, AuditRecord
from gateway.core.audit_sinks import FileSink, StreamSink
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread
from tests.test_cli_ops import TOKEN_RE, base_env, call, claims, status

REPO = Path(__file__).resolve().parent.parent
V1 = "/_gateway/v1"
STAGING, PROD = "/v1/apps/web-staging/machines", "/v1/apps/web-prod/machines"


def traffic(gateway: RunningGateway) -> tuple[str, str]:
    """Two tokens' requests: one allowed and one denied each, on two apps."""
    first = gateway.mint("deployer@app:web-staging", name="first")
    second = gateway.mint("deployer@app:web-staging", name="second")
    for token in (first, second):
        assert status(gateway.url, token) == 200
        assert status(gateway.url, token, path=PROD) == 403
    gateway.services.audit.flush()
    return first, second


def read(gateway: RunningGateway, admin: str, **params: str) -> httpx.Response:
    with gateway.client() as client:
        return client.get(f"{V1}/audit", params=params, headers={"Authorization": f"Bearer {admin}"})


def requests_of(records: list[dict[str, Any]]) -> list[tuple[str | None, str, str]]:
    return [(r["token_name"], r["path"], r["decision"]) for r in records if r["path"].startswith("/v1/")]


def test_the_admin_api_reads_the_file_sink_with_filters(gateway: RunningGateway) -> None:
    first, second = traffic(gateway)
    admin = gateway.mint("token-admin@gateway", name="auditor")
    everything = read(gateway, admin)
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert body["source"] == "file"
    assert requests_of(body["records"]) == [("first", STAGING, "allow"), ("first", PROD, "deny"),
                                            ("second", STAGING, "allow"), ("second", PROD, "deny")]
    assert TOKEN_RE.search(everything.text) is None and UPSTREAM_SECRET not in everything.text

    denied = read(gateway, admin, decision="deny").json()["records"]
    assert {r["decision"] for r in denied} == {"deny"} and len(requests_of(denied)) == 2
    by_app = read(gateway, admin, app="web-prod").json()["records"]
    assert [(r["token_name"], r["app"]) for r in by_app] == [("first", "web-prod"), ("second", "web-prod")]
    assert len(read(gateway, admin, app="web-*").json()["records"]) == 4
    by_jti = read(gateway, admin, token=claims(second)["jti"]).json()["records"]
    assert requests_of(by_jti) == [("second", STAGING, "allow"), ("second", PROD, "deny")]
    by_name = read(gateway, admin, token="first").json()["records"]
    assert requests_of(by_name) == [("first", STAGING, "allow"), ("first", PROD, "deny")]
    newest = read(gateway, admin, limit="1", app="web-*").json()["records"]
    assert requests_of(newest) == [("second", PROD, "deny")]
    assert read(gateway, admin, since="2999-01-01T00:00:00Z").json()["records"] == []
    assert len(read(gateway, admin, since="1h", app="web-*").json()["records"]) == 4

    for params, word in (({"decision": "maybe"}, "decision"), ({"limit": "0"}, "limit"),
                         ({"limit": "many"}, "limit"), ({"since": "last tuesday"}, "last tuesday"),
                         ({"jti": "x"}, "jti")):
        refused = read(gateway, admin, **params)
        assert refused.status_code == 400 and word in refused.json()["message"], (params, refused.text)
    assert read(gateway, first).status_code == 403  # a deployer token reads no audit
    with gateway.client() as client:
        assert client.get(f"{V1}/audit").status_code == 401
    # Reading the audit is itself audited.
    gateway.services.audit.flush()
    assert any(r["action"] == "gateway:audit" and r["token_name"] == "auditor" for r in gateway.audit_records())


@pytest.fixture
def stdout_gateway(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, audit={"sinks": ["stdout"]})
    yield running
    running.server.stop()


def test_a_stdout_only_gateway_answers_from_memory(stdout_gateway: RunningGateway) -> None:
    traffic(stdout_gateway)
    admin = stdout_gateway.mint("token-admin@gateway", name="auditor")
    body = read(stdout_gateway, admin, app="web-*").json()
    assert body["source"] == "memory" and "file" in body["note"]
    assert requests_of(body["records"]) == [("first", STAGING, "allow"), ("first", PROD, "deny"),
                                            ("second", STAGING, "allow"), ("second", PROD, "deny")]

    # The CLI in remote mode reads the same, with no config in sight.
    env = base_env(SCOPEGATE_ADDR=stdout_gateway.url, SCOPEGATE_TOKEN=admin)
    elsewhere = stdout_gateway.config.base_dir / "elsewhere"
    elsewhere.mkdir()
    tail = call(["audit", "tail", "--json", "--decision", "deny", "--app", "web-prod"], env, elsewhere)
    assert tail.returncode == 0, tail.stderr
    assert requests_of([json.loads(line) for line in tail.stdout.splitlines()]) == [
        ("first", PROD, "deny"), ("second", PROD, "deny")]


def test_audit_tail_with_only_the_stdout_sink_says_where_the_lines_go(tmp_path: Path) -> None:
    example = call(["audit", "tail", "--config", str(REPO / "config.example.yaml")], base_env(), tmp_path)
    docker = call(["audit", "tail", "-n", "5"], base_env(SCOPEGATE_AUDIT__SINKS='["stdout"]'), tmp_path)
    for result in (example, docker):
        assert result.returncode == 1, result.stderr
        message = result.stderr
        assert "Traceback" not in message and "standard output" in message and "docker logs" in message
        assert "file:/var/lib/scopegate/audit.jsonl" in message and "SCOPEGATE_AUDIT__SINKS" in message
        assert "SCOPEGATE_ADDR" in message and "--file" in message


def test_audit_tail_and_export_filter_locally_and_remotely_alike(gateway: RunningGateway) -> None:
    first, second = traffic(gateway)
    admin = gateway.mint("token-admin@gateway", name="auditor")
    config = str(gateway.config.source)
    remote_env = base_env(SCOPEGATE_ADDR=gateway.url, SCOPEGATE_TOKEN=admin)
    elsewhere = gateway.config.base_dir / "elsewhere"
    elsewhere.mkdir()
    for args in (["tail", "--app", "web-prod"], ["tail", "--json", "--decision", "allow", "-n", "1"],
                 ["tail", "--token", claims(first)["jti"]], ["tail", "--jti", claims(second)["jti"], "--since", "1h"],
                 ["export", "--since", "1h", "--app", "web-*", "--json"],
                 ["export", "--since", "1h", "--token", "second"]):
        local = call(["audit", *args, "--config", config], base_env(), gateway.config.base_dir)
        remote = call(["audit", *args], remote_env, elsewhere)
        assert local.returncode == remote.returncode == 0, (args, local.stderr, remote.stderr)
        assert local.stdout == remote.stdout, args
        assert local.stdout, args
    tail = call(["audit", "tail", "--app", "web-prod", "--config", config], base_env(), gateway.config.base_dir)
    assert requests_of([json.loads(line) for line in tail.stdout.splitlines()]) == [
        ("first", PROD, "deny"), ("second", PROD, "deny")]
    bad = call(["audit", "tail", "--decision", "maybe", "--config", config], base_env(), gateway.config.base_dir)
    assert bad.returncode == 2 and "decision" in bad.stderr
    wrong = call(["audit", "tail"], base_env(SCOPEGATE_ADDR=gateway.url, SCOPEGATE_TOKEN=first), elsewhere)
    assert wrong.returncode == 1 and wrong.stdout == ""


def test_the_audit_endpoint_is_in_the_openapi_document(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        document = client.get(f"{V1}/openapi.json").json()
    operation = document["paths"][f"{V1}/audit"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"since", "app", "decision", "token", "limit"}


def test_records_are_kept_in_memory_only_without_a_file_sink(tmp_path: Path) -> None:
    with_file = AuditLog([FileSink(tmp_path / "audit.jsonl")], keep_recent=3)
    stdout_only = AuditLog([StreamSink(io.StringIO())], keep_recent=3)
    for index in range(5):
        for log in (with_file, stdout_only):
            log.emit(AuditRecord(f"r{index}", "127.0.0.1", "GET", "/v1/apps", decision="allow", status=200))
    assert with_file.recent_lines() == []
    assert [json.loads(line)["request_id"] for line in stdout_only.recent_lines()] == ["r2", "r3", "r4"]
    with_file.close()
