"""The `scopegate` CLI (DESIGN sections 9 and 13), run as real subprocesses.

Token commands work on a config written into tmp_path; `serve` runs in front of a recording
upstream and sees revocations the CLI makes; `serve --dev` prints tokens and curl lines that work.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from gateway.config import load_config
from gateway.core.tokens import new_jti
from gateway.store import TokenRecord
from gateway.store.backends import open_store
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, write_config
from tests.servers import RecordingUpstream, ServerThread

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gateway.cli.main"]
TOKEN_RE = re.compile(r"sgt_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
RECORD_FIELDS = {"jti", "sub", "name", "grants", "iat", "exp", "parent", "revoked_at", "last_used_at"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_") and k != CREDENTIAL_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env or clean_env(),
                          cwd=cwd or REPO, timeout=timeout, check=False)


def run_all(commands: list[tuple[str, ...]], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 30) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands concurrently (each CLI start costs a fraction of a second)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda argv: run(*argv, env=env, cwd=cwd, timeout=timeout), commands))


def claims(token: str) -> dict[str, Any]:
    payload = token.removeprefix("sgt_").split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


@dataclass
class Setup:
    folder: Path
    config: Path
    admin_token: str

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        # Options go before a `--` that ends them (jtis are base64url and may start with '-').
        argv = list(args)
        at = argv.index("--") if "--" in argv else len(argv)
        argv[at:at] = ["--config", str(self.config)]
        return run(*argv, **kwargs)

    def mint(self, *grants: str, extra: tuple[str, ...] = ()) -> str:
        args = [a for g in grants for a in ("--grant", g)]
        result = self.cli("token", "mint", *args, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, "http://127.0.0.1:9")


def initialized(folder: Path) -> Setup:
    config = write_config(folder, "http://127.0.0.1:9")
    result = run("init", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return Setup(folder, config, result.stdout.strip())


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """A fresh store holding only the bootstrap token (for tests that count records)."""
    return initialized(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """One store for tests that only look at the tokens they mint themselves, or mint nothing."""
    return initialized(tmp_path_factory.mktemp("shared"))


# --- init ---------------------------------------------------------------------------------------

def test_init_creates_keyring_and_store_and_prints_one_token(tmp_path: Path, config_path: Path) -> None:
    result = run("init", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    token = lines[0]
    assert TOKEN_RE.fullmatch(token)
    assert claims(token)["grants"] == ["token-admin@gateway"]
    keyring = tmp_path / "keyring.json"
    assert keyring.is_file()
    assert keyring.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state.db").is_file()
    # Nothing secret on stderr: the token goes to stdout only.
    assert "sgt_" not in result.stderr
    assert json.loads(keyring.read_text())["keys"]

    again = run("init", "--config", str(config_path))
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "sgt_" not in again.stderr
    assert keyring.stat().st_mode & 0o777 == 0o600

    # The bootstrap token is registered, once.
    listing = run("token", "list", "--json", "--config", str(config_path))
    records = json.loads(listing.stdout)
    assert [r["jti"] for r in records] == [claims(token)["jti"]]
    assert records[0]["grants"] == ["token-admin@gateway"]


# --- token mint ---------------------------------------------------------------------------------

def test_mint_prints_only_the_token(shared: Setup) -> None:
    result = shared.cli("token", "mint", "--grant", "deployer@app:web-staging")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("sgt_")
    assert TOKEN_RE.fullmatch(lines[0])
    payload = claims(lines[0])
    assert payload["grants"] == ["deployer@app:web-staging"]
    assert payload["exp"] - payload["iat"] == 30 * 86400  # tokens.default_ttl
    assert lines[0] not in result.stderr


def test_mint_json(shared: Setup) -> None:
    result = shared.cli("token", "mint", "--grant", "deployer@app:web-staging", "--grant", "viewer@env:staging",
                       "--ttl", "1h", "--name", "web-ci", "--subject", "ci:github:acme/web", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"token", "jti", "exp", "grants", "sub", "name"} <= set(document)
    assert document["token"].startswith("sgt_")
    assert document["grants"] == ["deployer@app:web-staging", "viewer@env:staging"]
    assert document["sub"] == "ci:github:acme/web"
    assert document["name"] == "web-ci"
    assert document["exp"] - document["iat"] == 3600
    payload = claims(document["token"])
    assert payload["jti"] == document["jti"]
    assert payload["exp"] == document["exp"]
    assert payload["sub"] == "ci:github:acme/web"


# --- token list / show / revoke -----------------------------------------------------------------

def test_list_never_shows_token_strings(setup: Setup) -> None:
    token = setup.mint("deployer@app:web-staging", extra=("--name", "web-ci"))
    jti = claims(token)["jti"]
    signature = token.rsplit(".", 1)[1]

    table = setup.cli("token", "list", "-o", "wide")  # every field (the default table is narrow)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[0].lower()
    assert all(column in header for column in RECORD_FIELDS), lines[0]
    # One row per record.
    assert sum(jti in line for line in lines) == 1
    assert sum(claims(setup.admin_token)["jti"] in line for line in lines) == 1
    row = next(line for line in lines if jti in line)
    assert "web-ci" in row and "deployer@app:web-staging" in row
    assert "sgt_" not in table.stdout and signature not in table.stdout

    as_json = setup.cli("token", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert isinstance(records, list) and len(records) == 2
    for record in records:
        assert set(record) >= RECORD_FIELDS
        assert "token" not in record
    assert {r["jti"] for r in records} == {jti, claims(setup.admin_token)["jti"]}
    for secret in (token, signature, setup.admin_token, setup.admin_token.rsplit(".", 1)[1]):
        assert secret not in as_json.stdout and secret not in table.stdout


def test_show(shared: Setup) -> None:
    token = shared.mint("operator@app:web-*", extra=("--name", "ops", "--subject", "user:ann"))
    jti = claims(token)["jti"]
    human = shared.cli("token", "show", "--", jti)
    assert human.returncode == 0, human.stderr
    for value in (jti, "user:ann", "ops", "operator@app:web-*"):
        assert value in human.stdout
    assert "sgt_" not in human.stdout

    as_json = shared.cli("token", "show", "--json", "--", jti)
    assert as_json.returncode == 0, as_json.stderr
    record = json.loads(as_json.stdout)
    assert set(record) >= RECORD_FIELDS
    assert "token" not in record and "sgt_" not in as_json.stdout
    assert record["jti"] == jti
    assert record["sub"] == "user:ann"
    assert record["name"] == "ops"
    assert record["grants"] == ["operator@app:web-*"]
    assert record["iat"] == claims(token)["iat"] and record["exp"] == claims(token)["exp"]
    assert record["parent"] is None
    assert record["revoked_at"] is None


def test_revoke_with_reason(shared: Setup) -> None:
    jti = claims(shared.mint("deployer@app:web-staging"))["jti"]
    before = int(time.time())
    result = shared.cli("token", "revoke", "--reason", "leaked in a CI log", "--", jti)
    assert result.returncode == 0, result.stderr
    assert jti in result.stdout

    record = json.loads(shared.cli("token", "show", "--json", "--", jti).stdout)
    assert isinstance(record["revoked_at"], int)
    assert before - 1 <= record["revoked_at"] <= int(time.time()) + 1
    reasons = [v for k, v in record.items() if "reason" in k]
    assert reasons == ["leaked in a CI log"]

    human = shared.cli("token", "show", "--", jti).stdout
    assert "leaked in a CI log" in human
    assert time.strftime("%Y-%m-%d", time.gmtime(record["revoked_at"])) in human

    # Only that token: the bootstrap admin token is untouched; `--active` leaves out the revoked one.
    active = {r["jti"] for r in json.loads(shared.cli("token", "list", "--active", "--json").stdout)}
    assert claims(shared.admin_token)["jti"] in active
    assert jti not in active

    # Revoking again is harmless and keeps the first revocation's time and reason.
    again = shared.cli("token", "revoke", "--json", "--reason", "second", "--", jti)
    assert again.returncode == 0, again.stderr
    json.loads(again.stdout)  # --json everywhere
    second = json.loads(shared.cli("token", "show", "--json", "--", jti).stdout)
    assert second["revoked_at"] == record["revoked_at"]
    assert "second" not in json.dumps(second)


def test_a_jti_that_starts_with_a_dash_works_as_printed(shared: Setup) -> None:
    # jtis are base64url (`-` is in the alphabet), so about one in 64 starts with '-'. `token list`
    # prints it as is; `token show JTI` / `token revoke JTI` must accept it as printed (or the
    # gateway must never issue such jtis).
    jti = "-" + "Q" * 26

    async def put() -> None:
        store = open_store(load_config(shared.config, environ={}))
        try:
            now = int(time.time())
            await store.put(TokenRecord(jti=jti, sub="test:dash", name="dash", grants=("viewer@app:web",),
                                        iat=now, exp=now + 3600))
        finally:
            await store.close()

    asyncio.run(put())
    shown = shared.cli("token", "show", jti, "--json")
    revoked = shared.cli("token", "revoke", jti)
    cli_accepts_it = shown.returncode == 0 and revoked.returncode == 0
    never_issued = not any(new_jti().startswith("-") for _ in range(5000))
    assert cli_accepts_it or never_issued, (
        f"`scopegate token show {jti}` exits {shown.returncode}: {shown.stderr.strip()}")


# --- exit codes ---------------------------------------------------------------------------------

def test_unknown_jti_exits_1(shared: Setup) -> None:
    for result in run_all([("token", "show", "no-such-jti", "--config", str(shared.config)),
                           ("token", "revoke", "no-such-jti", "--config", str(shared.config)),
                           ("token", "show", "no-such-jti", "--json", "--config", str(shared.config))]):
        assert result.returncode == 1, (result.args, result.stderr)
        assert "no-such-jti" in result.stderr
        assert result.stdout == ""


BAD_MINTS: list[tuple[tuple[str, ...], str]] = [
    (("--grant", "deployer@nope"), "deployer@nope"),
    (("--grant", "deployer@app:Web_Staging"), "Web_Staging"),
    (("--grant", "wizard@app:x"), "wizard"),
    (("--grant", "token-admin@app:web"), "token-admin@app:web"),
    (("--grant", "viewer@app:web", "--grant", "wizard@app:x"), "wizard"),
    # Typos would mint a token that grants nothing: named, with the likely meaning.
    (("--grant", "deployer@env:produciton"),
     "environment 'produciton' is not one the environment rules produce (did you mean 'production'?)"),
    (("--grant", "deplyer@app:web"), "role 'deplyer' is not in the policy (did you mean 'deployer'?)"),
    (("--grant", "viewer@app:web", "--ttl", "91d"), "ttl 91d is longer than tokens.max_ttl (90d)"),
    (("--grant", "viewer@app:web", "--ttl", "90d1h"), "ttl 2161h is longer than tokens.max_ttl (90d)"),
    (("--grant", "viewer@app:web", "--ttl", "30m1h"), "give each unit once, largest first"),
    (("--grant", "viewer@app:web", "--ttl", "forever"), "forever"),
    (("--grant", "viewer@app:web", "--ttl=-1h"), "-1h"),
]


def test_bad_grant_or_ttl_exits_2_naming_it_and_mints_nothing(shared: Setup) -> None:
    commands = [("token", "mint", *args, "--name", "must-not-exist", "--config", str(shared.config))
                for args, _ in BAD_MINTS]
    for (args, named), result in zip(BAD_MINTS, run_all(commands), strict=True):
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert named in result.stderr, (args, result.stderr)
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
    names = {r["name"] for r in json.loads(shared.cli("token", "list", "--json").stdout)}
    assert "must-not-exist" not in names


def test_ttl_at_max_is_fine(shared: Setup) -> None:
    payload = claims(shared.mint("viewer@app:web", extra=("--ttl", "90d")))
    assert payload["exp"] - payload["iat"] == 90 * 86400
    compound = claims(shared.mint("viewer@app:web", extra=("--ttl", "1h30m")))
    assert compound["exp"] - compound["iat"] == 5400


def test_bad_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9", server={"hostname": "0.0.0.0"})
    commands = [("init",), ("token", "list"), ("serve", "--port", "0")]
    for command, result in zip(commands, run_all([(*c, "--config", str(path)) for c in commands]), strict=True):
        assert result.returncode == 2, (command, result.stderr)
        assert "server.hostname" in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_config_value_exits_2_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9", tokens={"max_ttl": "eventually"})
    result = run("token", "list", "--config", str(path))
    assert result.returncode == 2
    assert "tokens.max_ttl" in result.stderr


def test_unknown_env_override_exits_2(shared: Setup) -> None:
    result = shared.cli("token", "list", env=clean_env(SCOPEGATE_NOPE__X="1"))
    assert result.returncode == 2
    assert "SCOPEGATE_NOPE__X" in result.stderr


def test_missing_keyring_exits_2_and_says_run_init(config_path: Path) -> None:
    commands = [("token", "mint", "--grant", "viewer@app:web"), ("token", "show", "x")]
    results = run_all([(*c, "--config", str(config_path)) for c in commands])
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 2, (command, result.stderr)
        assert "scopegate init" in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_missing_keyring_in_the_default_location(tmp_path: Path) -> None:
    # No --config and no SCOPEGATE_CONFIG: the defaults, relative to the working directory.
    result = run("token", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "scopegate init" in result.stderr
    assert str(tmp_path / ".scopegate" / "keyring.json") in result.stderr


USAGE_ERRORS: list[tuple[str, ...]] = [
    (),
    ("bogus",),
    ("token", "mint"),  # --grant is required
    ("serve", "--port", "eighty"),
    ("serve", "--port", "99999"),
    ("serve", "--port", "-5"),
]


def test_usage_errors_exit_2() -> None:
    for argv, result in zip(USAGE_ERRORS, run_all(USAGE_ERRORS), strict=True):
        assert result.returncode == 2, (argv, result.stderr)
        assert "usage:" in result.stderr, (argv, result.stderr)
        assert result.stdout == ""


def test_a_port_out_of_range_is_a_usage_error_naming_the_range() -> None:
    for port in ("99999", "-5", "eighty"):
        result = run("serve", "--port", port)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{port!r} is not a port: give a number from 0 (a free one) to 65535" in result.stderr


@pytest.mark.parametrize(("host", "advice"), [
    ("203.0.113.7", "that address is not on this machine; pick another --host"),  # TEST-NET-3, never local
    ("no-such-host.invalid", "--host must be an IP address or a name this machine resolves"),
])
def test_a_bad_host_is_answered_about_the_host_not_the_port(tmp_path: Path, host: str, advice: str) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    assert run("init", "--config", str(config)).returncode == 0
    result = run("serve", "--config", str(config), "--host", host, "--port", "0",
                 env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}), timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on {host}:0" in result.stderr and advice in result.stderr
    assert "pick another --port" not in result.stderr


@pytest.mark.parametrize(("name", "suggestion"), [
    ("SCOPEGATE_SERVER_PORT", "SCOPEGATE_SERVER__PORT"),
    ("SCOPEGATE_UPSTREAM_ORG_SLUG", "SCOPEGATE_UPSTREAM__ORG_SLUG"),
    ("SCOPEGATE_CONFG", "SCOPEGATE_CONFIG"),
])
def test_a_near_miss_environment_variable_is_warned_about(tmp_path: Path, name: str, suggestion: str) -> None:
    result = run("serve", "--config", str(tmp_path / "missing.yaml"), env=clean_env(**{name: "9999"}))
    assert f"scopegate: warning: environment variable {name} is not read; did you mean {suggestion}?" \
        in result.stderr
    # The variables the CLI reads and the docs' recipes use are not warned about.
    quiet = run("serve", "--config", str(tmp_path / "missing.yaml"),
                env=clean_env(SCOPEGATE_URL="https://x", SCOPEGATE_AUDIENCE="a", SCOPEGATE_ADMIN_TOKEN="t"))
    assert "warning" not in quiet.stderr


def test_a_trust_rule_granting_an_environment_no_app_is_in_stops_serve(tmp_path: Path) -> None:
    trust = {"name": "web-deploy", "issuer": "https://token.actions.githubusercontent.com",
             "audience": "https://scopegate.example", "claims": {"repository": "acme/web"},
             "grants": ["deployer@env:stagign"], "ttl": "10m"}
    config = write_config(tmp_path, "http://127.0.0.1:9", oidc={"trust": [trust]})
    run("init", "--config", str(config))
    result = run("serve", "--config", str(config), "--port", "0", env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}),
                 timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("oidc.trust[0].grants: grant deployer@env:stagign: environment 'stagign' is not one the environment "
            "rules produce (did you mean 'staging'?)") in result.stderr
    assert "listening" not in result.stderr


def test_the_state_store_is_created_owner_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    assert run("init", "--config", str(config)).returncode == 0
    (state,) = [p for p in tmp_path.rglob("*.db")]
    assert state.stat().st_mode & 0o077 == 0, oct(state.stat().st_mode)
    assert state.parent.stat().st_mode & 0o077 == 0 or state.parent == tmp_path
    for companion in state.parent.glob(state.name + "-*"):  # SQLite's -wal and -shm follow the file's mode
        assert companion.stat().st_mode & 0o077 == 0, (companion, oct(companion.stat().st_mode))


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    commands = [("init",), ("token", "mint", "--grant", "viewer@app:web"), ("serve", "--port", "0")]
    results = run_all([(*c, "--config", str(missing)) for c in commands])
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 2, (command, result.stderr)
        assert str(missing) in result.stderr
    assert not missing.exists()


def test_scopegate_config_is_used_without_config_flag(tmp_path: Path, config_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(SCOPEGATE_CONFIG=str(config_path))
    init = run("init", env=env, cwd=elsewhere)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "keyring.json").is_file()
    assert not (elsewhere / ".scopegate").exists()
    minted = run("token", "mint", "--grant", "viewer@app:web", env=env, cwd=elsewhere)
    assert minted.returncode == 0, minted.stderr
    jti = claims(minted.stdout.strip())["jti"]
    # The same store, reached with --config.
    shown = run("token", "show", "--json", "--config", str(config_path), "--", jti)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["jti"] == jti


def test_scopegate_config_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "gone.yaml"
    result = run("token", "list", env=clean_env(SCOPEGATE_CONFIG=str(missing)), cwd=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_config_flag_beats_scopegate_config(shared: Setup, tmp_path: Path) -> None:
    env = clean_env(SCOPEGATE_CONFIG=str(tmp_path / "gone.yaml"))
    result = shared.cli("token", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert claims(shared.admin_token)["jti"] in {r["jti"] for r in json.loads(result.stdout)}


# --- running servers ----------------------------------------------------------------------------

class Process:
    """A subprocess whose stdout and stderr are read line by line by threads, so reads have deadlines."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, cwd=cwd)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.stopped = False
        self._changed = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [threading.Thread(target=self._pump, args=(name, stream), daemon=True)
                         for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for thread in self._threads:
            thread.start()

    def _pump(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self, name: str) -> str:
        with self._changed:
            return "\n".join(self.lines[name])

    def wait_for(self, name: str, done: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self.lines[name]):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(f"timed out waiting on {name}; stdout:\n{self.text('stdout')}\n"
                                         f"stderr:\n{self.text('stderr')}")
                self._changed.wait(min(left, 0.1))
            return list(self.lines[name])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("the server did not stop on SIGTERM within 10 s") from None
        finally:
            for thread in self._threads:
                thread.join(timeout=5)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            self.proc.stderr.close()
        return code


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if not process.stopped:
            with contextlib.suppress(AssertionError):
                process.stop()


@pytest.fixture
def recording_upstream() -> Iterator[tuple[RecordingUpstream, ServerThread]]:
    app = RecordingUpstream()
    server = ServerThread(app).start()
    yield app, server
    server.stop()


LISTENING = re.compile(r"scopegate listening on (http://[^\s]+) -> (\S+)")


def test_serve_in_a_folder_with_scopegate_yaml_reads_it_and_says_so(tmp_path: Path, processes: list[Process]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")  # tmp_path/scopegate.yaml
    assert run("init", cwd=tmp_path).returncode == 0
    assert (tmp_path / "keyring.json").exists()  # the file's keyring, not ./.scopegate's defaults
    server = Process([*CLI, "serve", "--port", "0"], env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}),
                     cwd=tmp_path)
    processes.append(server)
    lines = server.wait_for("stderr", lambda lines: any(LISTENING.search(line) for line in lines))
    assert f"scopegate: using {config} (found in the current folder" in "\n".join(lines)
    match = next(m for m in map(LISTENING.search, lines) if m)
    assert match.group(2) == "http://127.0.0.1:9"  # the file's upstream, not https://api.machines.dev
    # An explicit choice is not announced, and wins over the folder's file.
    other = tmp_path / "other"
    other.mkdir()
    chosen = write_config(other, "http://127.0.0.1:10")
    result = run("policy", "check", "--config", str(chosen), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "found in the current folder" not in result.stderr


def test_serve_forwards_and_sees_cli_revocations(tmp_path: Path, processes: list[Process],
                                                 recording_upstream: tuple[RecordingUpstream, ServerThread]) -> None:
    upstream, upstream_server = recording_upstream
    config = write_config(tmp_path, upstream_server.url)
    setup = Setup(tmp_path, config, "")
    assert setup.cli("init").returncode == 0
    server = Process([*CLI, "serve", "--config", str(config), "--port", "0"],
                     env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}), cwd=tmp_path)
    processes.append(server)
    lines = server.wait_for("stderr", lambda ls: any(LISTENING.search(line) for line in ls))
    match = next(m for m in map(LISTENING.search, lines) if m)
    base, upstream_url = match.group(1), match.group(2)
    assert base.startswith("http://127.0.0.1:") and not base.endswith(":0")
    assert upstream_url == upstream_server.url

    # A token minted by the CLI while the server runs is accepted.
    token = setup.mint("deployer@app:web-staging", extra=("--name", "e2e"))
    jti = claims(token)["jti"]
    with httpx.Client(base_url=base, timeout=5) as client:
        response = client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True}
        assert len(upstream.received) == 1
        got = upstream.received[0]
        assert got.method == "GET" and got.raw_path == b"/v1/apps/web-staging/machines"
        assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
        assert token not in repr(got.headers)

        denied = client.get("/v1/apps/web-prod/machines", headers={"Authorization": f"Bearer {token}"})
        assert denied.status_code == 403
        assert len(upstream.received) == 1

        revoked = setup.cli("token", "revoke", "--reason", "e2e", "--", jti)
        assert revoked.returncode == 0, revoked.stderr
        revoked_at = time.monotonic()
        statuses: list[int] = []
        while time.monotonic() - revoked_at < 1.0:
            response = client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"Bearer {token}"})
            statuses.append(response.status_code)
            if response.status_code == 401:
                break
            time.sleep(0.05)
        assert statuses[-1] == 401, f"still {statuses[-1]} 1 s after revocation ({statuses})"
        assert response.json()["error"] == "unauthenticated"
        assert "invalid_token" in response.headers["www-authenticate"]
        assert len(upstream.received) == statuses.count(200) + 1

    code = server.stop()
    # A graceful stop: uvicorn finishes shutdown, then exits by the signal it caught (or 0).
    assert code in (0, -signal.SIGTERM), server.text("stderr")
    assert "Traceback" not in server.text("stderr")
    assert UPSTREAM_SECRET not in server.text("stderr") + server.text("stdout")
    audit = (tmp_path / "audit.jsonl").read_text()
    assert UPSTREAM_SECRET not in audit and token not in audit
    assert jti in audit


def test_serve_without_the_upstream_credential_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    assert run("init", "--config", str(config)).returncode == 0
    result = run("serve", "--config", str(config), "--port", "0", timeout=20)
    assert result.returncode == 2
    assert CREDENTIAL_ENV in result.stderr
    assert "listening" not in result.stderr


def test_serve_without_keyring_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    result = run("serve", "--config", str(config), "--port", "0",
                 env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}), timeout=20)
    assert result.returncode == 2
    assert "scopegate init" in result.stderr


@dataclass
class DevServer:
    process: Process
    text: str
    scratch: Path
    work: Path


def start_dev(tmp_path: Path, processes: list[Process]) -> DevServer:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    server = Process([*CLI, "serve", "--dev", "--port", "0"], env=clean_env(TMPDIR=str(scratch)), cwd=work)
    processes.append(server)

    def ready(lines: list[str]) -> bool:
        text = "\n".join(lines)
        return ("export SCOPEGATE_ADDR=" in text and "export DEPLOY_TOKEN=" in text
                and "Listening on http://" in text and text.count("curl ") >= 2)

    text = "\n".join(server.wait_for("stdout", ready))
    return DevServer(server, text, scratch, work)


def test_dev_mode(tmp_path: Path, processes: list[Process]) -> None:
    dev = start_dev(tmp_path, processes)
    text = dev.text
    admin_match = re.search(r"export SCOPEGATE_ADDR=(\S+) SCOPEGATE_TOKEN=(\S+)", text)
    deploy_match = re.search(r"export DEPLOY_TOKEN=(\S+)", text)
    base_match = re.search(r"Listening on (http://127\.0\.0\.1:\d+)", text)
    assert admin_match and deploy_match and base_match
    admin_token, deploy_token, base = admin_match.group(2), deploy_match.group(1), base_match.group(1)
    assert admin_match.group(1) == base
    # The CLI works on the dev gateway with the banner's two variables (remote mode).
    listed = run("token", "list", "--json", env=clean_env(SCOPEGATE_ADDR=base, SCOPEGATE_TOKEN=admin_token),
                 cwd=dev.work)
    assert listed.returncode == 0, listed.stderr
    assert {"dev-admin", "dev-deploy-web-staging"} <= {record["name"] for record in json.loads(listed.stdout)}
    assert TOKEN_RE.fullmatch(admin_token) and TOKEN_RE.fullmatch(deploy_token)
    assert claims(admin_token)["grants"] == ["token-admin@gateway"]
    assert claims(deploy_token)["grants"][0].startswith("deployer@app:")
    assert not base.endswith(":0")

    curls = re.findall(r'curl -s -H "Authorization: Bearer \$DEPLOY_TOKEN" (\S+)', text)
    assert len(curls) == 2, text
    allowed_url, denied_url = curls
    assert allowed_url.startswith(base + "/") and denied_url.startswith(base + "/")
    with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {deploy_token}"}) as client:
        allowed = client.get(allowed_url)
        assert allowed.status_code == 200, allowed.text
        machines = allowed.json()
        assert isinstance(machines, list) and machines
        assert all(isinstance(m, dict) and "id" in m and "state" in m for m in machines)

        denied = client.get(denied_url)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"] == "forbidden"

        # The admin token is registered with this gateway (authenticated), but covers no app.
        admin_call = client.get(allowed_url, headers={"Authorization": f"Bearer {admin_token}"})
        assert admin_call.status_code == 403, admin_call.text
        assert admin_call.json()["error"] == "forbidden"
        # A token the gateway never issued is refused before any policy decision.
        forged = client.get(allowed_url, headers={"Authorization": "Bearer sgt_aaa.bbb.ccc"})
        assert forged.status_code == 401

    code = dev.process.stop()
    assert code in (0, -signal.SIGTERM), dev.process.text("stderr")
    assert "Traceback" not in dev.process.text("stderr")
    # Nothing written to the working directory.
    assert list(dev.work.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_dev_mode_leaves_nothing_behind(tmp_path: Path, processes: list[Process], sig: int) -> None:
    # "Everything is gone when the process stops": the ephemeral keyring (a private signing key)
    # and store are removed whether the user presses Ctrl-C or a supervisor sends SIGTERM.
    dev = start_dev(tmp_path, processes)
    created = list(dev.scratch.iterdir())
    assert len(created) == 1 and (created[0] / "keyring.json").is_file()
    code = dev.process.stop(sig)
    assert code in (0, 130, -sig), dev.process.text("stderr")
    assert list(dev.work.iterdir()) == []
    assert list(dev.scratch.iterdir()) == [], "dev mode left its keyring and store behind"


def test_scopegate_addr_without_a_token_is_an_error_not_the_local_store(tmp_path: Path) -> None:
    result = run("token", "list", env=clean_env(SCOPEGATE_ADDR="http://127.0.0.1:9"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "SCOPEGATE_ADDR is set but SCOPEGATE_TOKEN is not" in result.stderr
    assert not (tmp_path / ".scopegate").exists()  # no local store was created or read


def test_dev_mode_refuses_non_loopback(tmp_path: Path) -> None:
    result = run("serve", "--dev", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path, timeout=20)
    assert result.returncode == 2
    assert "loopback" in result.stderr
