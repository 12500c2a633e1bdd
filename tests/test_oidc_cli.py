"""`scopegate oidc check ID_TOKEN_FILE`, run as a real subprocess: offline, says which rule matches and why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from joserfc import jwt

from tests.conftest import write_config
from tests.test_oidc_issuer import AUDIENCE, forge_unsigned, github_claims, new_key

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gateway.cli.main"]
GITHUB = "https://token.actions.githubusercontent.com"
GITLAB = "https://gitlab.com"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_")}
    # No network is reachable through a proxy that does not exist: an attempt would fail loudly.
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=30,
                          check=False, input=stdin)


def config(tmp_path: Path) -> Path:
    rules = [
        {"name": "web-staging", "issuer": GITHUB, "audience": AUDIENCE,
         "claims": {"repository": "acme/web", "repository_id": 123456, "ref": "refs/heads/main",
                    "event_name": ["push", "workflow_dispatch"]},
         "grants": ["deployer@app:web-staging"], "ttl": "10m"},
        {"name": "web-prod", "issuer": GITHUB, "audience": AUDIENCE,
         "claims": {"repository": "acme/web", "environment": "production"}, "grants": ["deployer@app:web-prod"]},
        {"name": "gitlab-api", "issuer": GITLAB, "audience": AUDIENCE, "claims": {"project_path": "acme/api"},
         "grants": ["deployer@app:api-staging"]},
    ]
    return write_config(tmp_path, "http://127.0.0.1:9", oidc={"trust": rules})


def token_file(tmp_path: Path, name: str = "id_token", **overrides: object) -> Path:
    key = new_key("RSA")
    token = jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, github_claims(GITHUB, **overrides), key)
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


def test_check_names_the_matching_rule_and_why_the_others_do_not(tmp_path: Path) -> None:
    result = run("oidc", "check", str(token_file(tmp_path)), "--config", str(config(tmp_path)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "signature was NOT verified" in out and "no keys were fetched" in out
    assert "rule web-staging: MATCHES -> deployer@app:web-staging (ttl 10m)" in out
    assert "rule web-prod: no match" in out
    assert "claim environment: expected 'production', the token has no such claim" in out
    assert f"issuer mismatch: expected '{GITLAB}', got '{GITHUB}'" in out
    assert "result: the exchange would mint deployer@app:web-staging for 10m" in out


def test_check_json(tmp_path: Path) -> None:
    path = token_file(tmp_path, ref="refs/heads/dev", aud="https://elsewhere.example")
    result = run("oidc", "check", str(path), "--config", str(config(tmp_path)), "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["offline"] is True and document["signature_checked"] is False
    assert document["matched"] == [] and document["grants"] == [] and document["ttl"] is None
    rules = {r["name"]: r for r in document["rules"]}
    assert rules["web-staging"]["reasons"] == [
        f"audience mismatch: expected '{AUDIENCE}', got 'https://elsewhere.example'",
        "claim ref: expected 'refs/heads/main', got 'refs/heads/dev'"]
    assert rules["gitlab-api"]["reasons"][0].startswith("issuer mismatch")
    assert document["claims"]["repository"] == "acme/web"


def test_check_reports_wrong_values_and_notes_times_and_algorithms(tmp_path: Path) -> None:
    claims = github_claims(GITHUB, repository="acme/other", exp=1_000_000_100, iat=1_000_000_000,
                           nbf=1_000_000_000)
    path = tmp_path / "forged"
    path.write_text(forge_unsigned(claims, "k1"))
    result = run("oidc", "check", str(path), "--config", str(config(tmp_path)))
    assert result.returncode == 1
    assert "claim repository: expected 'acme/web', got 'acme/other'" in result.stdout
    assert "result: no rule matches" in result.stdout
    assert "note: the token expired" in result.stdout
    assert "note: alg 'none' would be refused" in result.stdout


def test_check_reads_stdin_and_a_matching_token_with_several_rules(tmp_path: Path) -> None:
    token = token_file(tmp_path, environment="production").read_text()
    result = run("oidc", "check", "-", "--config", str(config(tmp_path)), "--json", stdin=token)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["matched"] == ["web-staging", "web-prod"]
    assert document["grants"] == ["deployer@app:web-staging", "deployer@app:web-prod"]
    assert document["ttl"] == "10m"


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    cfg = str(config(tmp_path))
    missing = run("oidc", "check", str(tmp_path / "nope"), "--config", cfg)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    garbage = tmp_path / "garbage"
    garbage.write_text("hello")
    not_jwt = run("oidc", "check", str(garbage), "--config", cfg)
    assert not_jwt.returncode == 2 and "not a JWT" in not_jwt.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("oidc:\n  trust:\n    - {name: x, issuer: https://a.example, audience: b, grants: "
                          "[viewer@app:web], ttl: 2h}\n")
    result = run("oidc", "check", str(token_file(tmp_path)), "--config", str(bad_config))
    assert result.returncode == 2 and "oidc.trust[0].ttl" in result.stderr
