"""The real flyctl through the gateway, in front of the dev sandbox: `fly deploy` from CI with a
one-app token (issue 13).

flyctl sends one `sgt_` token to the Machines API, GraphQL and the REST API, all pointed at the
gateway, which forwards to the sandbox with its own credential. With `deployer@app:web-staging`
every command a deploy job needs succeeds and the sandbox shows its effect; the same commands
against `web-prod` fail with the gateway's message on flyctl's stderr, and the sandbox receives
nothing that names `web-prod`. A `deployer@app:web-pr-*` token creates a preview app.

flyctl is the binary scripts/install-test-tools builds (docs/clients.md says how it is obtained);
without it these tests fail, saying so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import GatewayApp
from gateway.cli.local import LocalAdmin
from gateway.config import load_config
from gateway.core.keyring import Keyring
from gateway.dev.sandbox import SANDBOX_ORG_SLUG, SandboxState, create_sandbox_app
from gateway.dev.sandbox_macaroon import issue, new_root_key
from gateway.services import Services
from tests.conftest import CREDENTIAL_ENV, write_config
from tests.contract.flyctl import Flyctl, Recorder, Result, TraceSink, require_flyctl
from tests.servers import ServerThread

SANDBOX_TOKEN = "sandbox-upstream-credential"
IMAGE = "registry.fly.io/web-staging:v2"
FLY_TOML = 'app = "{app}"\nprimary_region = "iad"\n'

pytestmark = pytest.mark.flyctl


@dataclass
class Through:
    """flyctl -> gateway -> (recorded) sandbox."""

    sandbox: SandboxState
    recorder: Recorder
    sink: TraceSink
    gateway_url: str
    config_path: Path
    home: Path
    work: Path

    def mint(self, grant: str) -> str:
        async def run() -> str:
            admin = LocalAdmin.open(load_config(self.config_path))
            try:
                return (await admin.registry.mint(grants=[grant], ttl_s=3600, name="ci", subject="ci:test")).token
            finally:
                await admin.close()

        return asyncio.run(run())

    def fly(self, token: str, app: str) -> Flyctl:
        (self.work / "fly.toml").write_text(FLY_TOML.format(app=app), encoding="utf-8")
        return Flyctl(self.gateway_url, token, self.sink.host, self.home, self.work)

    def upstream_saw(self, text: str, since: int) -> list[str]:
        calls = self.recorder.calls[since:]
        return [f"{c.method} {c.path}" for c in calls if text in c.path or text in json.dumps(c.body)]


def start_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, narrowed: bool = False) -> Iterator[Through]:
    """flyctl -> gateway -> sandbox; `narrowed`: the sandbox holds a macaroon root key and the gateway
    forwards per-request narrowed macaroons (upstream.attenuate: apps, issue 17)."""
    require_flyctl()
    key = new_root_key()
    sandbox = (create_sandbox_app(macaroon_key=key, seed=True) if narrowed
               else create_sandbox_app(expected_token=SANDBOX_TOKEN, seed=True))
    recorder = Recorder(sandbox)
    upstream = ServerThread(recorder).start()
    monkeypatch.setenv(CREDENTIAL_ENV, issue(key) if narrowed else SANDBOX_TOKEN)
    extra = {"auth_scheme": "FlyV1", "attenuate": "apps"} if narrowed else {}
    path = write_config(tmp_path, upstream.url, upstream={
        "graphql_url": f"{upstream.url}/graphql", "api_url": upstream.url, "org_slug": SANDBOX_ORG_SLUG,
        "read_timeout_s": 30, **extra})
    config = load_config(path)
    Keyring.generate(config.tokens_keyring).save()
    services = Services.build(config)
    gateway = ServerThread(GatewayApp(services), gateway_stack=True).start()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    try:
        with TraceSink() as sink:
            yield Through(sandbox.state.sandbox, recorder, sink, gateway.url, path, home, work)
    finally:
        gateway.stop()
        upstream.stop()


@pytest.fixture
def through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Through]:
    yield from start_through(tmp_path, monkeypatch)


@pytest.fixture
def narrowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Through]:
    yield from start_through(tmp_path, monkeypatch, narrowed=True)


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.explain()
    return result


def test_a_one_app_deployer_runs_every_deploy_command_through_the_gateway(through: Through) -> None:
    fly = through.fly(through.mint("deployer@app:web-staging"), "web-staging")
    app = through.sandbox.apps["web-staging"]

    ok(fly.run("deploy", "--image", IMAGE, "-a", "web-staging", "--dns-checks=false"))
    release = app.releases[-1]
    assert (release["version"], release["status"], release["image_ref"]) == (2, "complete", IMAGE)
    assert {m["config"]["image"] for m in app.machines.values()} == {IMAGE}

    assert "web-staging" in ok(fly.run("status", "-a", "web-staging")).stdout

    before = set(app.machines)
    ok(fly.run("machine", "run", IMAGE, "-a", "web-staging"))
    assert len(set(app.machines) - before) == 1

    ok(fly.run("secrets", "set", "FOO=bar", "-a", "web-staging"))
    assert app.secrets["FOO"]["value"] == "bar" and app.releases[-1]["status"] == "complete"

    assert "v2" in ok(fly.run("releases", "-a", "web-staging")).stdout

    app.log("hello through the gateway")
    assert "hello through the gateway" in ok(fly.run("logs", "--no-tail", "-a", "web-staging")).stdout

    before = set(app.machines)  # one deployed in the `app` group, one from `machine run` (no group)
    ok(fly.run("scale", "count", "3", "-a", "web-staging", "--yes"))
    assert len(set(app.machines) - before) == 2

    # The sandbox only ever saw the gateway's credential, never the client's token.
    assert {call.authorization for call in through.recorder.calls} == {f"Bearer {SANDBOX_TOKEN}"}


PROD_COMMANDS = [
    ("deploy", ["deploy", "--image", "registry.fly.io/web-prod:v2", "-a", "web-prod", "--dns-checks=false"]),
    ("status", ["status", "-a", "web-prod"]),
    ("machine run", ["machine", "run", "registry.fly.io/web-prod:v2", "-a", "web-prod"]),
    ("secrets set", ["secrets", "set", "FOO=bar", "-a", "web-prod"]),
    ("releases", ["releases", "-a", "web-prod"]),
    ("logs", ["logs", "--no-tail", "-a", "web-prod"]),
    ("scale count", ["scale", "count", "2", "-a", "web-prod", "--yes"]),
]


@pytest.mark.parametrize(("name", "args"), PROD_COMMANDS, ids=[name for name, _ in PROD_COMMANDS])
def test_the_same_token_cannot_touch_another_app(through: Through, name: str, args: list[str]) -> None:
    fly = through.fly(through.mint("deployer@app:web-staging"), "web-prod")
    since = len(through.recorder.calls)
    result = fly.run(*args)
    assert result.returncode != 0, result.explain()
    if name == "logs":
        # fly-go's log client prints only the status line of a refused request ("403 Forbidden").
        assert "403 Forbidden" in result.stderr, result.explain()
    else:
        assert "token 'ci' has no grant that covers app web-prod" in result.stderr, result.explain()
    assert through.upstream_saw("web-prod", since) == []


def test_a_preview_token_creates_its_preview_app_and_no_other(through: Through) -> None:
    fly = through.fly(through.mint("deployer@app:web-pr-*"), "web-pr-42")
    ok(fly.run("apps", "create", "web-pr-42", "--org", SANDBOX_ORG_SLUG))
    assert through.sandbox.apps["web-pr-42"].org_slug == SANDBOX_ORG_SLUG
    since = len(through.recorder.calls)
    result = fly.run("apps", "create", "web-prod-2", "--org", SANDBOX_ORG_SLUG)
    assert result.returncode != 0 and "web-prod-2" in result.stderr, result.explain()
    assert through.upstream_saw("web-prod-2", since) == []


def test_fly_deploy_through_the_gateway_with_narrowed_fly_macaroons(narrowed: Through) -> None:
    # upstream.attenuate: apps (issue 17): the sandbox plays Fly and checks every request's
    # macaroon caveats, so each call the deploy makes was forwarded narrowed to web-staging.
    fly = narrowed.fly(narrowed.mint("deployer@app:web-staging"), "web-staging")
    app = narrowed.sandbox.apps["web-staging"]
    ok(fly.run("deploy", "--image", IMAGE, "-a", "web-staging", "--dns-checks=false"))
    assert app.releases[-1]["image_ref"] == IMAGE and app.releases[-1]["status"] == "complete"
    ok(fly.run("secrets", "set", "FOO=bar", "-a", "web-staging"))
    assert "web-staging" in ok(fly.run("status", "-a", "web-staging")).stdout
    ok(fly.run("scale", "count", "2", "-a", "web-staging", "--yes"))
    assert all(call.status != 401 for call in narrowed.recorder.calls), \
        [(c.method, c.path, c.status) for c in narrowed.recorder.calls if c.status == 401]
    machine_calls = [c for c in narrowed.recorder.calls if c.path.startswith("/v1/apps/web-staging/")]
    assert machine_calls and all(c.authorization.startswith("FlyV1 fm2_") for c in machine_calls)
