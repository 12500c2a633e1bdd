"""Day-2 CLI operations (DESIGN section 9, issue 3) against a live gateway.

Every token command and `policy explain` runs twice: in local mode (`--config`, the store and
keyring directly) and in remote mode (`SCOPEGATE_ADDR`/`SCOPEGATE_TOKEN` against a running
`scopegate serve` subprocess), and must print the same thing. Local-only commands (`keys`,
`policy check|test`, `audit`) run against the same files a live gateway uses.

A CLI process costs most of a second to start, so most commands run the CLI's `main()` in this
process (own argv, environment, working directory, stdout and stderr; exit code returned); the
commands whose process-level behaviour matters (printing only a token, exit codes, env handling)
also run as real `python -m gateway.cli.main` subprocesses.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.cli.main import main
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, write_config
from tests.servers import RecordingUpstream, ServerThread

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gateway.cli.main"]
TOKEN_RE = re.compile(r"sgt_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
LISTENING = re.compile(r"scopegate listening on (http://\S+) -> (\S+)")
STAGING_MACHINES = "/v1/apps/web-staging/machines"
Result = subprocess.CompletedProcess[str]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_") and k != CREDENTIAL_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30) -> Result:
    """A real `scopegate` process."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          check=False)


def call(args: list[str], env: dict[str, str], cwd: Path) -> Result:
    """The CLI's `main(args)` in this process, with exactly `env` as its SCOPEGATE_* environment."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SCOPEGATE_")]:
            patch.delenv(name)
        for name, value in env.items():
            if name.startswith("SCOPEGATE_"):
                patch.setenv(name, value)
        patch.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception:  # what the interpreter does with an uncaught exception: traceback, exit 1
                traceback.print_exc(file=err)
                code = 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def with_config(args: tuple[str, ...], config: Path) -> list[str]:
    """`--config F` goes before a `--` that ends the options."""
    at = args.index("--") if "--" in args else len(args)
    return [*args[:at], "--config", str(config), *args[at:]]


def claims(token: str) -> dict[str, Any]:
    part = token.removeprefix("sgt_").split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def kid(token: str) -> str:
    part = token.removeprefix("sgt_").split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["kid"])


def only_token(result: Result) -> str:
    """The output of a command that prints only a token: exactly one line, the token."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert TOKEN_RE.fullmatch(lines[0]), lines[0]
    assert lines[0] not in result.stderr
    return lines[0]


def status(base: str, token: str, method: str = "GET", path: str = STAGING_MACHINES) -> int:
    with httpx.Client(base_url=base, timeout=10) as client:
        return client.request(method, path, headers={"Authorization": f"Bearer {token}"}).status_code


def wait_for(check: Callable[[], bool], *, within: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)
    return time.monotonic() - started


@dataclass
class Served:
    """A `scopegate serve` subprocess, its config and a token-admin token (from `scopegate init`)."""

    folder: Path
    config: Path
    url: str
    admin: str
    upstream: RecordingUpstream

    def local(self, *args: str, env: dict[str, str] | None = None, real: bool = False) -> Result:
        return (run if real else call)(with_config(args, self.config), env or base_env(), self.folder)

    def remote(self, *args: str, token: str | None = None, addr: str | None = None, real: bool = False) -> Result:
        env = base_env(SCOPEGATE_ADDR=addr or self.url, SCOPEGATE_TOKEN=token or self.admin)
        # No config anywhere near: remote mode must not need one.
        return (run if real else call)(list(args), env, self.folder / "elsewhere")

    def both(self, *args: str, real: bool = False) -> tuple[Result, Result]:
        if not real:
            return self.local(*args), self.remote(*args)
        with ThreadPoolExecutor(max_workers=2) as pool:
            local = pool.submit(self.local, *args, real=True)
            remote = pool.submit(self.remote, *args, real=True)
            return local.result(), remote.result()

    def mint(self, *grants: str, ttl: str = "1h", name: str = "cli-ops") -> str:
        return only_token(self.local("token", "mint", *[a for g in grants for a in ("--grant", g)], "--ttl", ttl,
                                     "--name", name))

    def records(self) -> list[dict[str, Any]]:
        result = self.local("token", "list", "--json")
        assert result.returncode == 0, result.stderr
        listed: list[dict[str, Any]] = json.loads(result.stdout)
        return listed


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("cli-ops")
    (folder / "elsewhere").mkdir()
    upstream = RecordingUpstream()
    upstream_server = ServerThread(upstream).start()
    config = write_config(folder, upstream_server.url)
    init = run(["init", "--config", str(config)], base_env(), folder)
    assert init.returncode == 0, init.stderr
    admin = only_token(init)
    stderr_path = folder / "serve.stderr"
    with stderr_path.open("w") as stderr, (folder / "serve.stdout").open("w") as stdout:
        process = subprocess.Popen([*CLI, "serve", "--config", str(config), "--port", "0"], cwd=folder,
                                   env=base_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}), stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        match = None
        while match is None:
            match = LISTENING.search(stderr_path.read_text())
            if match is None:
                assert process.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "scopegate serve did not say where it listens"
                time.sleep(0.05)
        url = match.group(1)
        wait_for(lambda: httpx.get(f"{url}/_gateway/readyz", timeout=5).status_code == 200, within=10,
                 what="readyz")
        yield Served(folder, config, url, admin, upstream)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        upstream_server.stop()
    log = stderr_path.read_text()
    assert "Traceback" not in log, log
    assert UPSTREAM_SECRET not in log


# --- token mint / list / show / revoke ----------------------------------------------------------

def test_mint_prints_only_the_token_in_both_modes(served: Served) -> None:
    args = ("token", "mint", "--grant", "deployer@app:web-staging", "--ttl", "1h", "--name", "mint-both",
            "--subject", "ci:web")
    local, remote = served.both(*args, real=True)
    tokens = [only_token(local), only_token(remote)]
    for token in tokens:
        payload = claims(token)
        assert payload["grants"] == ["deployer@app:web-staging"]
        assert payload["name"] == "mint-both" and payload["sub"] == "ci:web"
        assert payload["exp"] - payload["iat"] == 3600
        assert status(served.url, token) == 200
        assert status(served.url, token, path="/v1/apps/web-prod/machines") == 403

    local, remote = served.both(*args, "--json")
    documents = [json.loads(local.stdout), json.loads(remote.stdout)]
    assert documents[0].keys() == documents[1].keys()
    assert {"token", "jti", "exp", "grants", "sub", "name", "iat", "parent"} <= documents[0].keys()
    varying = {"token", "jti", "iat", "exp", "last_used_at"}
    assert ({k: v for k, v in documents[0].items() if k not in varying}
            == {k: v for k, v in documents[1].items() if k not in varying})
    for document in documents:
        assert claims(document["token"])["jti"] == document["jti"]


def test_mint_usage_errors_exit_2_in_both_modes_and_mint_nothing(served: Served) -> None:
    before = {r["jti"] for r in served.records()}
    for bad, named in ((("--grant", "deployer@app:web-staging", "--ttl", "91d"), "max_ttl"),
                       (("--grant", "wizard@app:web"), "wizard"),
                       (("--grant", "deployer@nowhere"), "deployer@nowhere")):
        local, remote = served.both("token", "mint", *bad, real=bad[-1] == "91d")
        for result in (local, remote):
            assert result.returncode == 2, (bad, result.returncode, result.stderr)
            assert named in result.stderr
            assert result.stdout == ""
    assert {r["jti"] for r in served.records()} == before


def _without_admin_use(records: list[dict[str, Any]], admin_jti: str) -> list[dict[str, Any]]:
    # Remote calls authenticate with the admin token, which moves its last_used_at between the two reads.
    return [{k: v for k, v in r.items() if not (r["jti"] == admin_jti and k == "last_used_at")} for r in records]


def test_list_shows_the_same_records_both_ways(served: Served) -> None:
    minted = [served.mint("viewer@app:web", name="list-a"), served.mint("operator@env:staging", name="list-b")]
    local, remote = served.both("token", "list", "--json")
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
    admin_jti = claims(served.admin)["jti"]
    local_records, remote_records = json.loads(local.stdout), json.loads(remote.stdout)
    assert _without_admin_use(local_records, admin_jti) == _without_admin_use(remote_records, admin_jti)
    jtis = {r["jti"] for r in local_records}
    assert {claims(t)["jti"] for t in minted} | {admin_jti} <= jtis
    for output in (local.stdout, remote.stdout):
        assert TOKEN_RE.search(output) is None and "sgt_" not in output
        assert all(t.split(".")[2] not in output for t in [*minted, served.admin])

    local, remote = served.both("token", "list", "-o", "wide")
    for result in (local, remote):
        assert result.returncode == 0, result.stderr
        assert "JTI" in result.stdout and "GRANTS" in result.stdout
        for token in minted:
            assert claims(token)["jti"] in result.stdout
        assert "sgt_" not in result.stdout


def test_show_is_the_same_both_ways(served: Served) -> None:
    token = served.mint("operator@app:api-*", name="show-me")
    jti = claims(token)["jti"]
    local, remote = served.both("token", "show", "--json", "--", jti)
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
    assert json.loads(local.stdout) == json.loads(remote.stdout)
    record = json.loads(local.stdout)
    assert record["jti"] == jti and record["grants"] == ["operator@app:api-*"] and record["name"] == "show-me"
    assert "token" not in record
    local, remote = served.both("token", "show", "--", jti)
    assert local.stdout == remote.stdout
    assert jti in local.stdout and "show-me" in local.stdout

    local, remote = served.both("token", "show", "--", "no-such-jti")
    assert local.returncode == remote.returncode == 1
    assert "no-such-jti" in local.stderr and "no-such-jti" in remote.stderr
    assert local.stdout == remote.stdout == ""


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_revoke_stops_the_token_at_the_gateway(served: Served, mode: str) -> None:
    token = served.mint("deployer@app:web-staging", name=f"revoke-{mode}")
    jti = claims(token)["jti"]
    assert status(served.url, token) == 200
    runner = served.local if mode == "local" else served.remote
    result = runner("token", "revoke", "--reason", "rotated out", "--", jti)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"revoked {jti} and every token derived from it"
    wait_for(lambda: status(served.url, token) == 401, within=1.0, what=f"401 after {mode} revoke")
    record = json.loads(served.local("token", "show", "--json", "--", jti).stdout)
    assert record["revoked_at"] is not None and record["revoked_reason"] == "rotated out"
    again = runner("token", "revoke", "--json", "--", jti)
    assert again.returncode == 0 and json.loads(again.stdout) == {"revoked": jti}


def test_revoke_of_an_unknown_jti_exits_1_both_ways(served: Served) -> None:
    local, remote = served.both("token", "revoke", "--", "no-such-jti")
    assert local.returncode == remote.returncode == 1
    assert "no-such-jti" in local.stderr and "no-such-jti" in remote.stderr


# --- rotate / attenuate ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["local", "remote"])
def test_rotate_prints_only_the_new_token(served: Served, mode: str) -> None:
    old = served.mint("deployer@app:web-staging", ttl="2h", name=f"rotate-{mode}")
    runner = served.local if mode == "local" else served.remote
    new = only_token(runner("token", "rotate", "--grace", "1h", "--", claims(old)["jti"]))
    assert "parent" not in claims(new)  # a successor, not a child: revoking the old one spares it
    assert claims(new)["grants"] == claims(old)["grants"] and claims(new)["name"] == f"rotate-{mode}"
    assert claims(new)["exp"] - claims(new)["iat"] == 7200
    assert status(served.url, new) == 200
    assert status(served.url, old) == 200  # inside the hour of grace
    record = json.loads(served.local("token", "show", "--json", "--", claims(old)["jti"]).stdout)
    assert 3590 <= record["exp"] - time.time() <= 3601

    as_json = runner("token", "rotate", "--grace", "0s", "--json", "--", claims(new)["jti"])
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["rotated_from"] == claims(new)["jti"] and document["parent"] is None
    assert TOKEN_RE.fullmatch(document["token"])
    wait_for(lambda: status(served.url, new) == 401, within=1.0, what="401 after --grace 0s")
    assert status(served.url, document["token"]) == 200


def test_rotate_errors_exit_the_same_way_both_ways(served: Served) -> None:
    token = served.mint("viewer@app:web", name="rotate-errors")
    jti = claims(token)["jti"]
    local, remote = served.both("token", "rotate", "--grace", "whenever", "--", jti)
    assert local.returncode == remote.returncode == 2
    assert "--grace" in local.stderr and "--grace" in remote.stderr
    local, remote = served.both("token", "rotate", "--", "no-such-jti")
    assert local.returncode == remote.returncode == 1
    # A revoked token cannot be rotated: the operation failed (1), it is not a usage error (2).
    assert served.local("token", "revoke", "--", jti).returncode == 0
    local, remote = served.both("token", "rotate", "--", jti)
    assert local.returncode == remote.returncode == 1, (local.stderr, remote.stderr)
    assert "is revoked; mint a new one instead of rotating it" in local.stderr
    assert "is revoked; mint a new one instead of rotating it" in remote.stderr


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_attenuate_narrows_the_token_in_scopegate_token(served: Served, mode: str) -> None:
    parent = served.mint("deployer@env:staging", ttl="1h", name=f"parent-{mode}")
    env = base_env(SCOPEGATE_TOKEN=parent)
    if mode == "remote":
        env["SCOPEGATE_ADDR"] = served.url
        args = ["token", "attenuate", "--grant", "deployer@app:web-staging", "--ttl", "10m", "--name", "child"]
    else:
        args = ["token", "attenuate", "--grant", "deployer@app:web-staging", "--ttl", "10m", "--name", "child",
                "--config", str(served.config)]
    child = only_token(run(args, env, served.folder))  # a real process: SCOPEGATE_TOKEN from its environment
    payload = claims(child)
    assert payload["parent"] == claims(parent)["jti"] and payload["grants"] == ["deployer@app:web-staging"]
    assert payload["exp"] - payload["iat"] == 600 and payload["name"] == "child"
    assert status(served.url, child, "POST") == 200
    assert status(served.url, child, "POST", "/v1/apps/api-staging/machines") == 403
    assert status(served.url, parent, "POST", "/v1/apps/api-staging/machines") == 200

    as_json = call([*args, "--json"], env, served.folder)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["parent"] == claims(parent)["jti"]

    before = {r["jti"] for r in served.records()}
    for wider in ("deployer@app:web-prod", "admin@app:web-staging", "deployer@app:*"):
        refused = call([a if a != "deployer@app:web-staging" else wider for a in args], env, served.folder)
        assert refused.returncode == 1, (wider, refused.stderr)
        assert wider in refused.stderr and refused.stdout == ""
    too_long = call([a if a != "10m" else "2h" for a in args], env, served.folder)
    assert too_long.returncode == 1 and "outlive" in too_long.stderr
    assert {r["jti"] for r in served.records()} == before


def test_attenuate_without_scopegate_token_is_a_usage_error(served: Served) -> None:
    result = served.local("token", "attenuate", "--grant", "viewer@app:web")
    assert result.returncode == 2
    assert "SCOPEGATE_TOKEN" in result.stderr


# --- policy explain -------------------------------------------------------------------------------

def test_policy_explain_by_grant_is_the_same_both_ways(served: Served) -> None:
    denied = ("policy", "explain", "--grant", "deployer@app:web-prod", "POST", "/v1/apps/web-prod/secrets")
    allowed = ("policy", "explain", "--grant", "deployer@app:web-prod", "GET", "/v1/apps/web-prod/machines")
    runs = [served.both(*a) for a in (denied, (*denied, "--json"), allowed, (*allowed, "--json"))]
    (denied_local, denied_remote), (djson_local, djson_remote), (allowed_local, allowed_remote), \
        (ajson_local, ajson_remote) = runs
    for result in (denied_local, denied_remote, djson_local, djson_remote):
        assert result.returncode == 1, result.stderr
    for result in (allowed_local, allowed_remote, ajson_local, ajson_remote):
        assert result.returncode == 0, result.stderr
    assert denied_local.stdout == denied_remote.stdout
    assert allowed_local.stdout == allowed_remote.stdout
    assert json.loads(djson_local.stdout) == json.loads(djson_remote.stdout)
    assert json.loads(ajson_local.stdout) == json.loads(ajson_remote.stdout)
    assert "secrets:write" in denied_local.stdout
    assert "deployer, *, production, secrets:write, deny" in denied_local.stdout
    explanation = json.loads(djson_local.stdout)
    assert explanation["allowed"] is False and explanation["env"] == "production"
    assert explanation["rule"] == ["deployer", "*", "production", "secrets:write", "deny"]
    assert json.loads(ajson_local.stdout)["grant"] == "deployer@app:web-prod"


def test_policy_explain_by_token_is_the_same_both_ways(served: Served) -> None:
    token = served.mint("deployer@app:web-staging", name="explain-me")
    forwarded = len(served.upstream.received)
    for method, path, code in (("POST", "/v1/apps/web-staging/secrets", 0),
                               ("POST", "/v1/apps/web-prod/secrets", 1),
                               ("GET", "/v1/apps/web-staging/secrets?show_secrets=true", 1)):
        local, remote = served.both("policy", "explain", "--token", token, method, path, "--json")
        assert local.returncode == remote.returncode == code, (path, local.stderr, remote.stderr)
        assert json.loads(local.stdout) == json.loads(remote.stdout)
        assert token not in local.stdout + remote.stdout
    body = served.both("policy", "explain", "--token", token, "POST", "/v1/apps", "--body", '{"name": "web-staging"}')
    assert body[0].returncode == body[1].returncode == 0
    assert body[0].stdout == body[1].stdout and "apps:create" in body[0].stdout
    assert len(served.upstream.received) == forwarded  # a dry run forwards nothing


def test_policy_explain_of_a_revoked_token_agrees_both_ways(served: Served) -> None:
    token = served.mint("deployer@app:web-staging", name="explain-revoked")
    assert served.local("token", "revoke", "--", claims(token)["jti"]).returncode == 0
    local, remote = served.both("policy", "explain", "--token", token, "GET", STAGING_MACHINES)
    assert local.returncode == 1 and "revoked" in local.stderr, local.stderr
    # The gateway itself would refuse this token (401): remote mode must not call it allowed.
    assert (remote.returncode, "revoked" in remote.stderr) == (1, True), (
        f"remote exit {remote.returncode}, stdout {remote.stdout!r}, stderr {remote.stderr!r}")


def test_policy_explain_of_a_malformed_token_says_the_same_both_ways(served: Served) -> None:
    local, remote = served.both("policy", "explain", "--token", "sgt_garbage", "GET", STAGING_MACHINES)
    assert local.returncode == remote.returncode == 1
    assert "malformed" in local.stderr
    # The admin token in SCOPEGATE_TOKEN is fine: remote mode must not blame it.
    assert remote.stderr == local.stderr


# --- remote failures --------------------------------------------------------------------------------

def test_remote_with_a_bad_token_exits_1_naming_it(served: Served) -> None:
    forged = served.admin[:-4] + ("AAAA" if not served.admin.endswith("AAAA") else "BBBB")
    for token in ("sgt_not-a-token", forged):
        result = served.remote("token", "list", token=token, real=token == forged)
        assert result.returncode == 1, result.stderr
        assert "SCOPEGATE_TOKEN" in result.stderr
        assert token not in result.stderr


def test_remote_with_a_non_admin_token_exits_1(served: Served) -> None:
    viewer = served.mint("viewer@app:web", name="not-admin")
    before = {r["jti"] for r in served.records()}
    for args in (("token", "list"), ("token", "mint", "--grant", "admin@app:*"),
                 ("policy", "explain", "--grant", "admin@app:*", "GET", "/v1/apps/web")):
        result = served.remote(*args, token=viewer)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stdout == ""
    assert {r["jti"] for r in served.records()} == before


def test_remote_with_an_unreachable_gateway_exits_1_naming_scopegate_addr(served: Served) -> None:
    result = served.remote("token", "list", addr="http://127.0.0.1:1", real=True)
    assert result.returncode == 1, result.stderr
    assert "SCOPEGATE_ADDR" in result.stderr
    assert "Traceback" not in result.stderr


# --- audit ---------------------------------------------------------------------------------------

def test_audit_tail_and_export_read_the_file_sink(served: Served) -> None:
    audit = served.folder / "audit.jsonl"
    token = served.mint("deployer@app:web-staging", name="audited")
    assert status(served.url, token) == 200
    assert status(served.url, token, path="/v1/apps/web-prod/machines") == 403
    wait_for(lambda: audit.exists() and "web-prod" in audit.read_text().splitlines()[-1], within=3,
             what="audit lines")
    lines = audit.read_text().splitlines(keepends=True)

    tail = served.local("audit", "tail", "-n", "2")
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout == "".join(lines[-2:])
    last = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(r["path"], r["status"], r["decision"]) for r in last] == [
        (STAGING_MACHINES, 200, "allow"), ("/v1/apps/web-prod/machines", 403, "deny")]
    assert all(r["token_name"] == "audited" for r in last)

    everything = served.local("audit", "export", "--since", "1h")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout == "".join(lines)

    time.sleep(1.1)
    cut = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    time.sleep(0.05)
    assert status(served.url, token, path="/v1/apps/web-staging") == 200
    wait_for(lambda: len(audit.read_text().splitlines()) > len(lines), within=3, what="a new audit line")
    since = served.local("audit", "export", "--since", cut)
    assert since.returncode == 0, since.stderr
    exported = [json.loads(line) for line in since.stdout.splitlines()]
    assert [r["path"] for r in exported] == ["/v1/apps/web-staging"]
    assert all(r["ts"] >= cut for r in exported)
    for output in (tail.stdout, everything.stdout, since.stdout):
        assert TOKEN_RE.search(output) is None and UPSTREAM_SECRET not in output

    bad = served.local("audit", "export", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


# --- keys (local only) against a running gateway ----------------------------------------------------

def test_keys_rotate_and_retire_against_a_running_gateway(gateway: RunningGateway, tmp_path: Path) -> None:
    config = tmp_path / "scopegate.yaml"

    def keys(*args: str, real: bool = False) -> Result:
        return (run if real else call)(["keys", *args, "--config", str(config)], base_env(), tmp_path)

    def jwks_kids() -> set[str]:
        with gateway.client() as client:
            return {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}

    listed = keys("list", "--json")
    assert listed.returncode == 0, listed.stderr
    (first,) = json.loads(listed.stdout)
    old_kid = first["kid"]
    assert first["status"] == "active" and "private" not in listed.stdout and "PRIVATE" not in listed.stdout
    admin = gateway.mint("token-admin@gateway", name="keys-admin")
    old_token = gateway.mint("deployer@app:web-staging", name="old-key")
    assert kid(old_token) == old_kid
    assert status(gateway.url, old_token) == 200

    rotated = keys("rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    statuses = {k["kid"]: k["status"] for k in json.loads(rotated.stdout)}
    (new_kid,) = [k for k, s in statuses.items() if s == "active"]
    assert statuses[old_kid] == "verify" and new_kid != old_kid
    wait_for(lambda: jwks_kids() == {old_kid, new_kid}, within=2.0, what="JWKS after keys rotate")

    # New tokens use the new key, whether minted locally or by the gateway; old ones keep working.
    local_new = only_token(call(["token", "mint", "--grant", "deployer@app:web-staging", "--config", str(config)],
                                base_env(), tmp_path))
    assert kid(local_new) == new_kid
    with gateway.client() as client:
        response = client.post("/_gateway/v1/tokens", headers={"Authorization": f"Bearer {admin}"},
                               json={"grants": ["deployer@app:web-staging"], "ttl": "1h"})
    assert response.status_code == 201, response.text
    assert kid(response.json()["token"]) == new_kid
    assert status(gateway.url, local_new) == 200
    assert status(gateway.url, response.json()["token"]) == 200
    assert status(gateway.url, old_token) == 200

    human = keys("list")
    assert human.returncode == 0 and old_kid in human.stdout and new_kid in human.stdout
    assert "verify" in human.stdout and "active" in human.stdout

    active = keys("retire", new_kid, real=True)
    assert active.returncode == 2
    assert "active" in active.stderr and "keys rotate" in active.stderr
    unknown = keys("retire", "no-such-kid")
    assert unknown.returncode == 1 and "no-such-kid" in unknown.stderr
    assert {k["kid"]: k["status"] for k in json.loads(keys("list", "--json").stdout)} == statuses

    # The old key still verifies live tokens: retiring it is refused, naming them and what to do.
    refused = keys("retire", old_kid, real=True)
    assert refused.returncode == 1, refused.stderr
    assert "old-key" in refused.stderr and "keys-admin" in refused.stderr and "live token" in refused.stderr
    assert "--force" in refused.stderr and "token rotate" in refused.stderr
    assert status(gateway.url, old_token) == 200
    retired = keys("retire", old_kid, "--force")
    assert retired.returncode == 0, retired.stderr
    assert "now refused (--force)" in retired.stderr
    took = wait_for(lambda: status(gateway.url, old_token) == 401, within=2.0, what="401 after keys retire")
    assert took <= 2.0
    assert jwks_kids() == {new_kid}
    assert status(gateway.url, local_new) == 200
    after = keys("list", "--json")
    assert after.returncode == 0, after.stderr
    assert {k["kid"]: k["status"] for k in json.loads(after.stdout)} == {
        old_kid: "retired", new_kid: "active"}


# --- policy check / test (local only) ----------------------------------------------------------------

def policy_copy(folder: Path) -> Path:
    """A config whose model, policy and route files are copies in `folder`."""
    shutil.copytree(REPO / "policies", folder / "policies")
    config = write_config(folder, "http://127.0.0.1:9")
    document = yaml.safe_load(config.read_text())
    document["policy"] = {"model": "policies/model.conf", "policy": "policies/policy.csv"}
    document["routes"] = ["policies/routes/fly-machines.yaml"]
    config.write_text(yaml.safe_dump(document))
    return config


def test_policy_check_passes_on_the_shipped_files(tmp_path: Path) -> None:
    shipped = run(["policy", "check"], base_env(), REPO)
    assert shipped.returncode == 0, shipped.stderr
    assert "policy ok" in shipped.stdout
    config = policy_copy(tmp_path)
    copied = call(["policy", "check", "--json", "--config", str(config)], base_env(), tmp_path)
    assert copied.returncode == 0, copied.stderr
    summary = json.loads(copied.stdout)
    assert summary["ok"] is True and summary["routes"] == 76
    assert set(summary["roles"]) == {"viewer", "deployer", "operator", "admin", "token-admin"}


@pytest.mark.parametrize(("edit", "named"), [
    pytest.param(("policy.csv", "p, deployer, *, production, secrets:write, deny",
                  "p, deployer, *, production, secrets:wirte, deny"), "p, deployer, *, production, secrets:wirte, deny",
                 id="policy-action-typo"),
    # A typo in the effect would silently drop the production secrets deny: deployers could write them.
    pytest.param(("policy.csv", "p, deployer, *, production, secrets:write, deny",
                  "p, deployer, *, production, secrets:write, dney"), "dney", id="policy-effect-typo"),
    # An environment typo in a deny line would deny nothing (and reload live): named, with the likely one.
    pytest.param(("policy.csv", "p, deployer, *, production, secrets:write, deny",
                  "p, deployer, *, prodution, secrets:write, deny"),
                 "names environment 'prodution', which no app is in (did you mean 'production'?)",
                 id="policy-env-typo"),
    pytest.param(("policy.csv", "p, deployer, *, *, certificates:create, allow", "p, deployer, certificates:create"),
                 "deployer, certificates:create", id="policy-line-too-short"),
    pytest.param(("policy.csv", "p, viewer, *, *, platform:read, allow",
                  "p, viewer, *, *, platform:read, allow\nthis is no policy line"), "this is no policy line",
                 id="policy-garbage-line"),
    pytest.param(("routes/fly-machines.yaml", "action: platform:read", "action: platfrom:read"),
                 "platfrom:read", id="route-action-typo"),
    pytest.param(("model.conf", "[matchers]", "[matchers"), "model.conf:", id="model-garbage"),
    # A model without a section made casbin fail with "'NoneType' object is not subscriptable".
    pytest.param(("model.conf", "[policy_definition]\np = sub, app, env, act, eft", ""),
                 "lacks [policy_definition] with `p = sub, app, env, act, eft`", id="model-section-missing"),
    pytest.param(("model.conf", "[role_definition]", "role_definition"),
                 "expected `[section]` or `key = value`, found 'role_definition'", id="model-stray-line"),
    # Casbin compiles the matcher lazily: a syntax error here would fail every decision at run time.
    pytest.param(("model.conf", "m = g(r.sub, p.sub)", "m = g(r.sub, p.sub) &&& ("), "model.conf",
                 id="model-bad-matcher"),
])
def test_policy_check_exits_2_naming_the_offending_line(tmp_path: Path, edit: tuple[str, str, str],
                                                        named: str) -> None:
    config = policy_copy(tmp_path)
    name, old, new = edit
    path = tmp_path / "policies" / name
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = call(["policy", "check", "--config", str(config)], base_env(), tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert named in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_policy_test_runs_the_shipped_cases(tmp_path: Path) -> None:
    cases = yaml.safe_load((REPO / "policies/tests.yaml").read_text())["cases"]
    assert len(cases) >= 30
    result = run(["policy", "test", "policies/tests.yaml"], base_env(), REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == f"{len(cases)} passed, 0 failed"
    assert "FAIL" not in result.stdout
    as_json = call(["policy", "test", "--json", "policies/tests.yaml"], base_env(), REPO)
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["failed"] == 0 and report["passed"] == len(cases)
    assert {row["got"] for row in report["cases"]} == {"allow", "deny"}


def test_policy_test_with_a_wrong_expectation_exits_1(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump([
        {"name": "fine", "grants": ["viewer@app:web"], "method": "GET", "path": "/v1/apps/web", "expect": "allow"},
        {"name": "wrong", "grants": ["deployer@app:web-prod"], "method": "POST", "path": "/v1/apps/web-prod/secrets",
         "expect": "allow"},
    ]))
    result = run(["policy", "test", str(wrong)], base_env(), REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "1 passed, 1 failed"
    assert "secrets:write" in result.stdout  # the failing case says why
    as_json = json.loads(call(["policy", "test", "--json", str(wrong)], base_env(), REPO).stdout)
    assert as_json["failed"] == 1 and [c["ok"] for c in as_json["cases"]] == ["ok", "FAIL"]
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("- grants: [viewer@app:web]\n  method: GET\n  path: /v1/apps/web\n  expect: maybe\n")
    bad = call(["policy", "test", str(malformed)], base_env(), REPO)
    assert bad.returncode == 2 and "expect" in bad.stderr
