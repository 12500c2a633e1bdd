"""A schemathesis run against the admin API's own OpenAPI document on a live gateway (issue 3).

The gateway is the real uvicorn-served app (the `gateway` fixture); schemathesis (its CLI, in a
subprocess, bounded in examples and time) reads `/_gateway/v1/openapi.json` from it and sends
generated requests, valid and invalid, to every operation with a token-admin bearer token. Any 5xx
is a failure (`not_a_server_error`). The audit log then shows that the generated calls were
authorized and got past validation, so the run was not 401s all the way down.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests.conftest import RunningGateway

OPERATIONS = {"POST /_gateway/v1/tokens", "GET /_gateway/v1/tokens", "GET /_gateway/v1/tokens/{jti}",
              "DELETE /_gateway/v1/tokens/{jti}", "POST /_gateway/v1/tokens/{jti}/rotate",
              "POST /_gateway/v1/token/attenuate", "GET /_gateway/v1/token/self", "POST /_gateway/v1/explain"}


def test_schemathesis_finds_no_server_error(gateway: RunningGateway, tmp_path: Path) -> None:
    admin = gateway.mint("token-admin@gateway", name="schemathesis", ttl_s=3600)
    junit = tmp_path / "junit.xml"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{gateway.url}/_gateway/v1/openapi.json",
        "--checks", "not_a_server_error",
        "--header", f"Authorization: Bearer {admin}",
        "--max-examples", "30",
        "--request-timeout", "10",
        "--phases", "examples,coverage,fuzzing",
        "--report", "junit", "--report-junit-path", str(junit),
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=240, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]

    suite = ElementTree.parse(junit).getroot()  # noqa: S314 - the report schemathesis just wrote
    assert suite.get("failures") == "0" and suite.get("errors") == "0", output[-8000:]
    tested = {case.get("name") for case in suite.iter("testcase")}
    with gateway.client() as client:
        document = client.get("/_gateway/v1/openapi.json").json()
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert documented >= OPERATIONS
    assert tested == documented, output[-4000:]

    # The generated calls were authorized and reached every handler (not refused before it).
    records = gateway.audit_records()
    assert len(records) >= 7 * 10
    assert not [r for r in records if int(str(r["status"])) >= 500]
    allowed = {(r["method"], r["action"] or r["path"]) for r in records if r["decision"] == "allow"}
    assert {("POST", "gateway:mint"), ("GET", "gateway:list"), ("POST", "gateway:explain")} <= allowed, allowed
    # Attenuation narrows the caller's own token (token-admin@gateway here), so generated grants are
    # refused, but by the handler (400/403 for an authenticated caller), not by authentication.
    attenuations = [r for r in records if r["path"] == "/_gateway/v1/token/attenuate"]
    assert any(r["jti"] and r["status"] in (400, 403) for r in attenuations)
    statuses = {int(str(r["status"])) for r in records}
    assert {200, 201, 400, 404} <= statuses
