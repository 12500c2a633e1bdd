"""Local admin actions are audited like the admin API's, and `keys retire` refuses to break live
tokens (issue 16 items 7 and 10)."""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.config import load_config
from gateway.core.audit import FIELDS
from gateway.core.tokens import new_jti
from gateway.store import TokenRecord
from gateway.store.backends import open_store
from tests.conftest import RunningGateway, write_config
from tests.test_cli_ops import TOKEN_RE, base_env, call, claims, only_token

OPERATOR = f"local:{getpass.getuser()}"


def initialized(folder: Path, **sections: dict[str, Any]) -> tuple[Path, str]:
    config = write_config(folder, "http://127.0.0.1:9", **sections)
    result = call(["init", "--config", str(config)], base_env(), folder)
    assert result.returncode == 0, result.stderr
    return config, result.stdout.strip()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return call([*args, "--config", str(config)], base_env(), config.parent)


def audit_lines(folder: Path) -> list[dict[str, Any]]:
    path = folder / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def keyring_kids(config: Path) -> list[str]:
    return [k["kid"] for k in json.loads((config.parent / "keyring.json").read_text())["keys"]]


def put_records(config: Path, *records: TokenRecord) -> None:
    async def run() -> None:
        store = open_store(load_config(config))
        try:
            for record in records:
                await store.put(record)
        finally:
            await store.close()

    asyncio.run(run())


def record(name: str, *, iat: int, exp: int, revoked: bool = False) -> TokenRecord:
    return TokenRecord(jti=new_jti(), sub="test", name=name, grants=("viewer@app:web",), iat=iat, exp=exp,
                       revoked_at=iat + 1 if revoked else None)


# --- item 10: local admin actions are audited ---------------------------------------------------------

def test_local_admin_actions_write_the_same_audit_records_as_the_api(tmp_path: Path) -> None:
    config, admin_token = initialized(tmp_path)
    minted = only_token(cli(config, "token", "mint", "--grant", "deployer@app:web-staging", "--name", "ci"))
    jti = claims(minted)["jti"]
    rotated = json.loads(cli(config, "token", "rotate", jti, "--json").stdout)
    assert cli(config, "token", "revoke", rotated["jti"], "--reason", "left").returncode == 0
    assert cli(config, "token", "list").returncode == 0  # reads are not audited locally
    assert cli(config, "keys", "rotate").returncode == 0
    old_kid = keyring_kids(config)[0]
    assert cli(config, "keys", "retire", old_kid).returncode == 1  # the bootstrap token is still live
    assert cli(config, "keys", "retire", old_kid, "--force").returncode == 0

    lines = audit_lines(tmp_path)
    assert [(r["action"], r["path"], r["decision"], r["status"]) for r in lines] == [
        ("gateway:mint", "scopegate init", "allow", 201),
        ("gateway:mint", "scopegate token mint", "allow", 201),
        ("gateway:rotate", "scopegate token rotate", "allow", 201),
        ("gateway:revoke", "scopegate token revoke", "allow", 204),
        ("gateway:rotate-key", "scopegate keys rotate", "allow", 200),
        ("gateway:retire-key", "scopegate keys retire", "deny", 403),
        ("gateway:retire-key", "scopegate keys retire", "allow", 200),
    ]
    for line in lines:
        assert list(line) == list(FIELDS)  # the one encoder: the same fields in the same order
        assert (line["sub"], line["client_ip"], line["method"], line["jti"]) == (OPERATOR, "local", "CLI", None)
        assert "sgt_" not in json.dumps(line)
    assert lines[0]["reason"] == f"minted {claims(admin_token)['jti']} (token-admin@gateway, bootstrap)"
    assert lines[1]["reason"] == f"minted {jti} (deployer@app:web-staging)"
    assert lines[2]["reason"] == f"rotated {jti} -> {rotated['jti']}"
    assert lines[3]["reason"] == f"revoked {rotated['jti']}"
    assert "still verifies" in lines[5]["reason"] and "forbidden" in lines[5]["reason"]
    assert "--force" in lines[6]["reason"]


def test_a_refused_local_action_is_audited_as_a_denial(tmp_path: Path) -> None:
    config, _ = initialized(tmp_path)
    refused = cli(config, "token", "mint", "--grant", "viewer@app:web", "--ttl", "999d", "--name", "too-long")
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = [r for r in audit_lines(tmp_path) if r["path"] == "scopegate token mint"]
    assert (line["action"], line["decision"], line["status"]) == ("gateway:mint", "deny", 400)
    assert "max" in line["reason"] or "ttl" in line["reason"], line["reason"]


def test_the_same_action_through_the_api_and_locally(gateway: RunningGateway, tmp_path: Path) -> None:
    admin = gateway.mint("token-admin@gateway", name="api-admin")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        response = client.post("/_gateway/v1/tokens", headers={"Authorization": f"Bearer {admin}"},
                               json={"grants": ["viewer@app:web"], "name": "via-api"})
    assert response.status_code == 201
    config = tmp_path / "scopegate.yaml"
    only_token(call(["token", "mint", "--grant", "viewer@app:web", "--name", "via-cli", "--config", str(config)],
                    base_env(), tmp_path))
    time.sleep(0.1)
    mints = [r for r in gateway.audit_records() if r["action"] == "gateway:mint"]
    assert len(mints) == 2, mints
    api, local = mints
    assert list(api) == list(local) == list(FIELDS)
    assert (api["decision"], api["status"]) == (local["decision"], local["status"]) == ("allow", 201)
    assert api["reason"].startswith("minted ") and local["reason"].startswith("minted ")
    assert api["token_name"] == "api-admin" and local["sub"] == OPERATOR


def test_with_only_the_stdout_sink_the_cli_audits_on_stderr(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", audit={"sinks": ["stdout"]})
    env = base_env()
    init = subprocess.run([sys.executable, "-m", "gateway.cli.main", "init", "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30, check=False)
    assert init.returncode == 0, init.stderr
    assert TOKEN_RE.fullmatch(init.stdout.strip())  # stdout still carries only the token
    (line,) = [json.loads(t) for t in init.stderr.splitlines() if t.startswith("{")]
    assert line["action"] == "gateway:mint" and line["sub"] == OPERATOR


# --- item 7: keys retire refuses to break live tokens -----------------------------------------------

def test_retire_is_refused_while_the_key_verifies_live_tokens(tmp_path: Path) -> None:
    config, _ = initialized(tmp_path)
    now = int(time.time())
    first = keyring_kids(config)[0]
    # Tokens issued under the first key: live, expired, revoked.
    put_records(config, record("live-a", iat=now, exp=now + 3600), record("live-b", iat=now, exp=now + 7200),
                record("gone", iat=now, exp=now - 1), record("revoked", iat=now, exp=now + 3600, revoked=True))
    assert cli(config, "keys", "rotate").returncode == 0
    listed = {k["kid"]: k for k in json.loads(cli(config, "keys", "list", "--json").stdout)}
    assert listed[first]["status"] == "verify"
    assert listed[first]["live_tokens"] == 3  # the bootstrap token, live-a, live-b
    assert listed[first]["verifies_until"] is not None

    refused = cli(config, "keys", "retire", first)
    assert refused.returncode == 1
    message = refused.stderr
    assert f"key {first} still verifies 3 live tokens" in message
    assert "live-a" in message and "live-b" in message and "gone" not in message and "(revoked" not in message
    assert "401" in message and "--force" in message and "token rotate" in message
    assert json.loads(cli(config, "keys", "list", "--json").stdout)[0]["status"] == "verify"  # unchanged

    forced = cli(config, "keys", "retire", first, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "3 live tokens signed with it are now refused (--force)" in forced.stderr
    assert json.loads(cli(config, "keys", "list", "--json").stdout)[0]["status"] == "retired"


def test_retire_goes_ahead_once_no_live_token_needs_the_key(tmp_path: Path) -> None:
    config, admin_token = initialized(tmp_path)
    first = keyring_kids(config)[0]
    rotated = cli(config, "keys", "rotate")
    assert "keeps verifying its 1 live tokens" in rotated.stderr and f"keys retire {first}" in rotated.stderr
    assert cli(config, "token", "revoke", claims(admin_token)["jti"]).returncode == 0
    retired = cli(config, "keys", "retire", first)
    assert retired.returncode == 0, retired.stderr
    assert f"key {first} retired" in retired.stderr and "--force" not in retired.stderr


def test_the_active_key_is_never_retired(tmp_path: Path) -> None:
    config, _ = initialized(tmp_path)
    (active,) = keyring_kids(config)
    for args in ((), ("--force",)):
        refused = cli(config, "keys", "retire", active, *args)
        assert refused.returncode == 2
        assert "active signing key" in refused.stderr and "keys rotate" in refused.stderr


def test_a_store_opened_twice_in_one_process_keeps_the_first_connection_working(tmp_path: Path) -> None:
    """Opening the SQLite store again in a process (the CLI in-process, dev mode) must not drop the
    locks of connections already open, or another process can remove the WAL under them."""
    config, _ = initialized(tmp_path)

    async def run() -> None:
        first = open_store(load_config(config))
        try:
            for _ in range(3):
                await first.put(record("before", iat=int(time.time()), exp=int(time.time()) + 60))
                second = open_store(load_config(config))
                await second.close()
                other = subprocess.run([sys.executable, "-m", "gateway.cli.main", "token", "mint", "--grant",
                                        "viewer@app:web", "--config", str(config)], capture_output=True, text=True,
                                       env=base_env(), cwd=tmp_path, timeout=30, check=False)
                assert other.returncode == 0, other.stderr
                await first.put(record("after", iat=int(time.time()), exp=int(time.time()) + 60))
                assert await first.records()
                third = open_store(load_config(config))
                try:
                    assert await third.records()
                finally:
                    await third.close()
        finally:
            await first.close()

    asyncio.run(run())


def test_an_action_that_cannot_be_audited_is_not_taken(tmp_path: Path) -> None:
    config, _ = initialized(tmp_path)
    (tmp_path / "blocker").write_text("a file where the audit folder should be\n")
    broken = write_config(tmp_path, "http://127.0.0.1:9", audit={"sinks": ["file:blocker/audit.jsonl"]})
    assert broken == config
    before = json.loads(cli(config, "token", "list", "--json").stdout)  # reads open no sink
    refused = cli(config, "token", "mint", "--grant", "viewer@app:web")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "audit sink" in refused.stderr and "nothing was changed" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert json.loads(cli(config, "token", "list", "--json").stdout) == before
    kids = keyring_kids(config)
    assert cli(config, "keys", "rotate").returncode == 2
    assert keyring_kids(config) == kids
