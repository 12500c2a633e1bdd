"""The CLI as people and scripts use it (issue 16: items 11, 12 and 14).

- `token list`: a table that fits 80 columns, `-o wide|json|yaml` (`--json` kept), `--field F`,
  filters (`--grant`, `--app`, `--subject`, `--state`), the same both ways;
- `token show|revoke|rotate` by jti, unique jti prefix or name; ambiguous is exit 2 naming the
  candidates;
- remote mode: local-only commands refuse (exit 2, nothing created); `token attenuate` takes its
  parent from `--token` or $SCOPEGATE_PARENT_TOKEN, not the admin token;
- `whoami` both ways, never printing the token; a 401's own hint reaches the user intact.

Local and remote runs use the live gateway of tests/test_cli_ops.py (`served`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import ServerThread
from tests.test_cli_ops import (  # noqa: F401  (`served` is a fixture, used by `gw`)
    Served,
    base_env,
    call,
    claims,
    only_token,
    run,
    served,
    status,
    wait_for,
)

Result = subprocess.CompletedProcess[str]


@pytest.fixture
def gw(served: Served) -> Served:  # noqa: F811  (the module-scoped gateway of test_cli_ops)
    return served


def ok(result: Result) -> Result:
    assert result.returncode == 0, (result.args, result.stderr)
    return result


def listed(result: Result) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(ok(result).stdout)
    return records


def jtis(result: Result) -> set[str]:
    return {r["jti"] for r in listed(result)}


# --- token list -------------------------------------------------------------------------------------

def test_the_default_list_fits_80_columns_and_wide_shows_every_field(gw: Served) -> None:
    token = gw.mint("deployer@app:web-staging", "viewer@env:staging", "viewer@app:api-staging",
                        name="a-rather-long-token-name-for-the-ci-of-web")
    jti = claims(token)["jti"]
    for result in gw.both("token", "list"):
        lines = ok(result).stdout.splitlines()
        assert lines[0].split() == ["NAME", "ID", "GRANTS", "EXPIRES", "STATE"]
        assert all(len(line) <= 80 for line in lines), max(lines, key=len)
        row = next(line for line in lines if jti[:8] in line)
        assert jti not in result.stdout  # a prefix, not the 27-character id
        assert "a-rather-long" in row and "…" in row and row.endswith("active")
        assert re.search(r"  in (1h|59m(\d+s)?) ", row), row  # minted with --ttl 1h
        assert "sgt_" not in result.stdout
    local, remote = gw.both("token", "list", "-o", "wide")
    assert ok(local).stdout.splitlines()[0].split()[:4] == ["JTI", "SUB", "NAME", "GRANTS"]
    for result in (local, remote):
        row = next(line for line in ok(result).stdout.splitlines() if jti in line)  # one line, uncut
        assert "deployer@app:web-staging viewer@env:staging viewer@app:api-staging" in row


def test_list_outputs_json_yaml_and_one_field_alike_both_ways(gw: Served) -> None:
    gw.mint("viewer@app:web", name="outputs")
    admin_jti = claims(gw.admin)["jti"]

    def stable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not (r["jti"] == admin_jti and k == "last_used_at")} for r in records]

    local, remote = gw.both("token", "list", "--json")
    as_json = stable(listed(local))
    assert stable(listed(remote)) == as_json
    assert stable(listed(gw.local("token", "list", "-o", "json"))) == as_json
    for result in gw.both("token", "list", "-o", "yaml"):
        assert stable(yaml.safe_load(ok(result).stdout)) == as_json
    for result in gw.both("token", "list", "--field", "jti"):
        assert ok(result).stdout.splitlines() == [r["jti"] for r in as_json]
    grants = ok(gw.local("token", "list", "--field", "grants")).stdout.splitlines()
    assert grants == [" ".join(r["grants"]) for r in as_json]
    states = ok(gw.local("token", "list", "--field", "state")).stdout.splitlines()
    assert set(states) <= {"active", "revoked", "expired"} and len(states) == len(as_json)

    for bad in (("--field", "secret"), ("--field", "jti", "--json"), ("--json", "-o", "yaml")):
        refused = gw.local("token", "list", *bad)
        assert refused.returncode == 2 and refused.stdout == "", (bad, refused.stderr)
    assert "fields: jti" in gw.local("token", "list", "--field", "secret").stderr


def test_list_filters_both_ways(gw: Served) -> None:
    staging_env = gw.mint("viewer@env:staging", name="flt-env")
    web_glob = gw.mint("deployer@app:*", name="flt-glob")
    prod = gw.mint("viewer@app:web-prod", name="flt-prod")
    revoked = gw.mint("viewer@app:api-staging", name="flt-revoked")
    expired = gw.mint("viewer@app:api-prod", name="flt-expired")
    ci = only_token(gw.local("token", "mint", "--grant", "viewer@app:docs", "--subject", "ci:github:acme/docs",
                                 "--name", "flt-ci"))
    ok(gw.local("token", "revoke", "--", claims(revoked)["jti"]))
    ok(gw.local("token", "rotate", "--grace", "0s", "--", claims(expired)["jti"]))
    mine = {claims(t)["jti"] for t in (staging_env, web_glob, prod, revoked, expired, ci)}

    def both(*args: str) -> set[str]:
        local, remote = gw.both("token", "list", *args, "--json")
        assert jtis(local) == jtis(remote), args
        return jtis(local)

    def jti(token: str) -> str:
        return str(claims(token)["jti"])

    # web-staging is in environment staging: the env grant covers it, as does app:* (a pattern
    # grant such as app:web-* stays in its pattern's environment, development: docs/grants.md).
    assert both("--app", "web-staging") & mine == {jti(staging_env), jti(web_glob)}
    assert both("--app", "web-prod") & mine == {jti(web_glob), jti(prod)}
    assert both("--app", "api-staging", "--state", "active") & mine == {jti(staging_env), jti(web_glob)}
    assert both("--grant", "deployer@app:*") & mine == {jti(web_glob)}
    assert both("--subject", "ci:github:acme/*") == {jti(ci)}
    assert both("--state", "revoked") & mine == {jti(revoked)}
    assert both("--state", "expired") & mine == {jti(expired)}
    active = both("--state", "active")
    assert jti(revoked) not in active and jti(expired) not in active and jti(prod) in active
    assert both("--active") == active
    assert gw.local("token", "list", "--active", "--state", "revoked").returncode == 2


# --- show / revoke / rotate by name or prefix -------------------------------------------------------

def test_show_revoke_and_rotate_by_name_or_jti_prefix(gw: Served) -> None:
    token = gw.mint("viewer@app:web", name="by-name-unique")
    jti = claims(token)["jti"]
    for ref in ("by-name-unique", jti[:8], jti):
        for result in gw.both("token", "show", "--field", "jti", "--", ref):
            assert ok(result).stdout == f"{jti}\n", ref
    for result in gw.both("token", "show", "-o", "yaml", "by-name-unique"):
        assert yaml.safe_load(ok(result).stdout)["jti"] == jti

    rotated = only_token(gw.remote("token", "rotate", "--grace", "0s", "--", jti[:6]))
    assert "parent" not in claims(rotated)  # a successor, not a child of the old token
    rotated_from = gw.local("token", "show", "--field", "rotated_from", "--", claims(rotated)["jti"]).stdout
    assert rotated_from == f"{jti}\n"
    # The name now belongs to the old (expired) token and its replacement: the active one is meant.
    for result in gw.both("token", "show", "--field", "jti", "by-name-unique"):
        assert ok(result).stdout.strip() == claims(rotated)["jti"]
    ok(gw.local("token", "revoke", "by-name-unique"))
    assert gw.local("token", "show", "--field", "state", "--", claims(rotated)["jti"]).stdout == "revoked\n"


def test_an_ambiguous_name_is_a_usage_error_listing_the_candidates(gw: Served) -> None:
    first = gw.mint("viewer@app:web", name="twin")
    second = gw.mint("viewer@app:api", name="twin")
    before = jtis(gw.local("token", "list", "--json", "--state", "revoked"))
    for args in (("show", "twin"), ("revoke", "twin"), ("rotate", "twin")):
        for result in gw.both("token", *args):
            assert result.returncode == 2, (args, result.stderr)
            assert result.stdout == ""
            assert "names 2 tokens" in result.stderr
            assert claims(first)["jti"] in result.stderr and claims(second)["jti"] in result.stderr
            assert "sgt_" not in result.stderr
    assert jtis(gw.local("token", "list", "--json", "--state", "revoked")) == before
    for result in gw.both("token", "show", "no-such-token-name"):
        assert result.returncode == 1 and "no-such-token-name" in result.stderr


# --- remote mode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [("store", "info"), ("keys", "list"), ("keys", "rotate"), ("init",)])
def test_local_only_commands_refuse_remote_mode_and_create_nothing(gw: Served, tmp_path: Path,
                                                                   command: tuple[str, ...]) -> None:
    env = base_env(SCOPEGATE_ADDR=gw.url, SCOPEGATE_TOKEN=gw.admin)
    result = run(list(command), env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "SCOPEGATE_ADDR" in result.stderr and " ".join(command) in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no ./.scopegate/state.db, no keyring


def test_store_info_on_a_missing_sqlite_store_creates_nothing(tmp_path: Path) -> None:
    result = call(["store", "info"], base_env(), tmp_path)
    assert result.returncode == 2, result.stderr
    assert "no store at" in result.stderr and "scopegate init" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_attenuate_takes_its_parent_from_flag_or_its_own_variable(gw: Served, mode: str) -> None:
    parent = gw.mint("deployer@env:staging", name=f"att-parent-{mode}")
    args = ["token", "attenuate", "--grant", "deployer@app:web-staging", "--ttl", "5m", "--name", "att-child"]
    env = base_env(SCOPEGATE_PARENT_TOKEN=parent)
    if mode == "remote":
        env["SCOPEGATE_ADDR"] = gw.url  # no SCOPEGATE_TOKEN at all: attenuating needs no admin token
    else:
        args += ["--config", str(gw.config)]
    child = only_token(run(args, env, gw.folder))
    assert claims(child)["parent"] == claims(parent)["jti"]
    # SCOPEGATE_TOKEN holds the admin token: the parent variable wins, the admin token is not narrowed.
    env["SCOPEGATE_TOKEN"] = gw.admin
    assert claims(only_token(call(args, env, gw.folder)))["parent"] == claims(parent)["jti"]
    del env["SCOPEGATE_PARENT_TOKEN"]
    flagged = only_token(call([*args, "--token", parent], env, gw.folder))
    assert claims(flagged)["parent"] == claims(parent)["jti"]
    # Only SCOPEGATE_TOKEN (scripts from before SCOPEGATE_PARENT_TOKEN): used, and said so.
    fallback = call(args, {**env, "SCOPEGATE_TOKEN": parent}, gw.folder)
    assert claims(only_token(fallback))["parent"] == claims(parent)["jti"]
    assert "narrowing the token in SCOPEGATE_TOKEN" in fallback.stderr

    ok(gw.local("token", "revoke", "--", claims(parent)["jti"]))
    wait_for(lambda: status(gw.url, parent) == 401, within=5, what="the gateway sees the revocation")
    refused = call([*args, "--token", parent], env, gw.folder)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "--token" in refused.stderr and "revoked; ask for a new one" in refused.stderr
    assert parent not in refused.stderr


def test_attenuate_without_any_parent_names_the_flag_and_variables(gw: Served) -> None:
    result = call(["token", "attenuate", "--grant", "viewer@app:web"], base_env(SCOPEGATE_ADDR=gw.url),
                  gw.folder)
    assert result.returncode == 2
    assert "--token" in result.stderr and "SCOPEGATE_PARENT_TOKEN" in result.stderr
    misspelt = call(["token", "attenuate", "--grant", "viewer@app:web"],
                    base_env(SCOPEGATE_ADDR=gw.url, SCOPEGATE_PARENT_TOKNE="sgt_x"), gw.folder)
    assert misspelt.returncode == 2
    assert "SCOPEGATE_PARENT_TOKNE is not read; did you mean SCOPEGATE_PARENT_TOKEN?" in misspelt.stderr


def test_a_401_reaches_the_user_with_its_own_hint(gw: Served) -> None:
    admin = gw.mint("token-admin@gateway", name="soon-revoked-admin")
    ok(gw.local("token", "revoke", "--", claims(admin)["jti"]))
    wait_for(lambda: status(gw.url, admin) == 401, within=5, what="the gateway sees the revocation")
    result = gw.remote("token", "list", token=admin)
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "SCOPEGATE_TOKEN" in message and admin not in message
    assert message.endswith("has been revoked; ask for a new one"), message


# --- whoami -------------------------------------------------------------------------------------------

def test_whoami_both_ways_never_prints_the_token(gw: Served) -> None:
    parent = gw.mint("deployer@env:staging", "viewer@app:web-prod", name="whoami-parent")
    token = only_token(call(["token", "attenuate", "--token", parent, "--grant", "deployer@app:web-staging",
                             "--grant", "viewer@app:web-prod", "--ttl", "10m", "--name", "whoami-me",
                             "--config", str(gw.config)], base_env(), gw.folder))
    remote_env = base_env(SCOPEGATE_ADDR=gw.url, SCOPEGATE_TOKEN=token)
    local = call(["whoami", "--json", "--config", str(gw.config)], base_env(SCOPEGATE_TOKEN=token),
                 gw.folder)
    remote = call(["whoami", "--json"], remote_env, gw.folder / "elsewhere")
    documents = [json.loads(ok(r).stdout) for r in (local, remote)]
    for document in documents:
        assert document["jti"] == claims(token)["jti"] and document["parent"] == claims(parent)["jti"]
        assert document["grants"] == ["deployer@app:web-staging", "viewer@app:web-prod"]
        assert document["state"] == "active" and document["exp"] == claims(token)["exp"]
        may = {(row["grant"], row["env"]): row["actions"] for row in document["may"]}
        assert "secrets:write" in may[("deployer@app:web-staging", "staging")]
        assert "apps:read" in may[("viewer@app:web-prod", "production")]
        assert "secrets:write" not in may[("viewer@app:web-prod", "production")]
    assert {k: v for k, v in documents[0].items() if k != "last_used_at"} == \
        {k: v for k, v in documents[1].items() if k != "last_used_at"}
    human = ok(call(["whoami"], remote_env, gw.folder))
    for text in ("whoami-me", "deployer@app:web-staging", "expires:", "parent:", claims(parent)["jti"]):
        assert text in human.stdout
    for result in (local, remote, human):
        assert token not in result.stdout + result.stderr and "sgt_" not in result.stdout

    ok(gw.local("token", "revoke", "--", claims(token)["jti"]))
    wait_for(lambda: status(gw.url, token) == 401, within=5, what="the gateway sees the revocation")
    revoked = call(["whoami"], remote_env, gw.folder)
    assert revoked.returncode == 1 and revoked.stdout == ""
    assert revoked.stderr.strip().endswith("has been revoked; ask for a new one")
    missing = call(["whoami"], base_env(SCOPEGATE_ADDR=gw.url), gw.folder)
    assert missing.returncode == 2 and "SCOPEGATE_TOKEN" in missing.stderr


def test_a_gateway_that_ignores_a_filter_is_not_taken_at_its_word(tmp_path: Path) -> None:
    """A gateway from before the filters answers the whole list (it honours only active=true)."""
    record = {"jti": "A" * 27, "sub": "ci:x", "name": "old", "grants": ["viewer@app:web"], "iat": 1, "exp": 4102444800,
              "parent": None, "revoked_at": None, "revoked_reason": None, "last_used_at": None}
    seen: list[str] = []

    async def old_gateway(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"tokens": [record]}).encode()})

    server = ServerThread(old_gateway).start()
    try:
        env = base_env(SCOPEGATE_ADDR=server.url, SCOPEGATE_TOKEN="sgt_x.y.z")
        refused = call(["token", "list", "--app", "web-prod"], env, tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert "does not filter by app" in refused.stderr
        active = call(["token", "list", "--active", "--field", "name"], env, tmp_path)
        assert ok(active).stdout == "old\n"
        assert "active=true" in seen[-1]
    finally:
        server.stop()


def test_list_marks_a_rotated_token_and_its_successor(gw: Served) -> None:
    # Issue 16 item 8: after a rotation both tokens live (the old one for its grace); the listing
    # tells them apart, and revoking the old one leaves the successor alone.
    old = gw.mint("viewer@app:web", name="rotating-one")
    old_jti = claims(old)["jti"]
    new = ok(gw.local("token", "rotate", "--grace", "1h", "--json", "--", old_jti))
    new_jti = json.loads(new.stdout)["jti"]
    for result in gw.both("token", "list"):
        rows = {line.split()[1]: line for line in ok(result).stdout.splitlines()[1:]}
        assert rows[old_jti[:8]].endswith("rotated") and rows[new_jti[:8]].endswith("renewed")
    wide = ok(gw.local("token", "list", "-o", "wide")).stdout
    assert old_jti in next(line for line in wide.splitlines() if line.startswith(new_jti))  # rotated_from
    ok(gw.local("token", "revoke", "--", old_jti))
    states = {r["jti"]: r["revoked_at"] for r in listed(gw.local("token", "list", "--json"))}
    assert states[old_jti] is not None and states[new_jti] is None
