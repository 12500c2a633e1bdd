"""The real flyctl against the dev sandbox, with no gateway in between.

Why: the gateway will have to pass exactly what flyctl sends (Machines API, GraphQL, uiex REST,
logs). Before it stands in the middle, this proves that the sandbox answers those calls the way
flyctl needs, so a later run of the same commands through the gateway fails only because of the
gateway. Each test runs one command on a fresh, seeded sandbox and checks what the sandbox's state
shows afterwards, not just flyctl's exit code.

It also pins what flyctl sends: every GraphQL document must be one of the files in
flyctl_documents/ byte for byte (the gateway's GraphQL allow-list is built from them), every call
must carry `Authorization: Bearer <token>` and get a 2xx answer, and the token must reach the
local trace sink, not Fly's collector. flyctl comes from scripts/install-test-tools; without it
these tests fail, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.dev.sandbox import SANDBOX_ORG_SLUG, SandboxState, create_sandbox_app
from tests.contract.flyctl import Flyctl, Recorder, Result, TraceSink, require_flyctl
from tests.servers import ServerThread

TOKEN = "sandbox-upstream-credential"  # not fm2_/fm1r_: flyctl would try to parse it as a macaroon
DOCUMENTS = Path(__file__).with_name("flyctl_documents")
IMAGE = "registry.fly.io/web-staging:v2"
FLY_TOML = 'app = "web-staging"\nprimary_region = "iad"\n'

pytestmark = pytest.mark.flyctl  # scripts/test-flyctl runs these; they need the flyctl binary


@dataclass
class Rig:
    fly: Flyctl
    state: SandboxState
    recorder: Recorder
    sink: TraceSink

    def run(self, *args: str) -> Result:
        """Runs flyctl and checks the invariants every command must keep (see the module docstring)."""
        before = len(self.recorder.calls)
        result = self.fly.run(*args)
        assert result.returncode == 0, result.explain()
        calls = self.recorder.calls[before:]
        assert calls, f"flyctl {args} sent nothing to the sandbox"
        known = {p.read_text(encoding="utf-8") for p in DOCUMENTS.glob("*.graphql")}
        for call in calls:
            where = f"{call.method} {call.path}?{call.query}"
            assert call.authorization == f"Bearer {TOKEN}", f"{where} sent Authorization {call.auth_scheme} ..."
            assert 200 <= call.status < 300, f"{where} got {call.status}\n{result.explain()}"
            document = call.graphql
            assert document is None or document in known, (
                f"flyctl {' '.join(args)} sent a GraphQL document that is not in {DOCUMENTS.name}/; "
                f"the gateway's allow-list needs it too:\n{document}")
        return result


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_flyctl()
    sandbox = create_sandbox_app(expected_token=TOKEN, seed=True)
    recorder = Recorder(sandbox)
    server = ServerThread(recorder).start()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / "fly.toml").write_text(FLY_TOML, encoding="utf-8")
    try:
        with TraceSink() as sink:
            yield Rig(Flyctl(server.url, TOKEN, sink.host, home, work), sandbox.state.sandbox, recorder, sink)
    finally:
        server.stop()


def test_deploy_image_makes_a_release_and_rolls_the_machines(rig: Rig) -> None:
    app = rig.state.apps["web-staging"]
    machine_ids = set(app.machines)
    rig.run("deploy", "--image", IMAGE, "-a", "web-staging", "--dns-checks=false")
    release = app.releases[-1]
    assert (release["version"], release["status"], release["image_ref"]) == (2, "complete", IMAGE)
    assert release["definition"]["app"] == "web-staging"  # fly.toml, as JSON
    assert set(app.machines) == machine_ids  # updated in place, not replaced
    for machine in app.machines.values():
        assert machine["config"]["image"] == IMAGE
        assert machine["config"]["metadata"]["fly_release_id"] == release["id"]
        assert machine["state"] == "started"
    assert [b["status"] for b in rig.state.builds.values()] == ["completed"]
    # flyctl exports its traces with the raw token in `authorization`; here they stay on loopback.
    assert rig.sink.received and {auth for _, auth in rig.sink.received} == {TOKEN}


def test_status_reads_without_changing_anything(rig: Rig) -> None:
    app = rig.state.apps["web-staging"]
    result = rig.run("status", "-a", "web-staging")
    assert "web-staging.fly.dev" in result.stdout and SANDBOX_ORG_SLUG in result.stdout
    assert len(app.releases) == 1 and len(app.machines) == 1


def test_machine_run_adds_a_machine_on_the_resolved_image(rig: Rig) -> None:
    app = rig.state.apps["web-staging"]
    before = set(app.machines)
    result = rig.run("machine", "run", IMAGE, "-a", "web-staging")
    (new,) = set(app.machines) - before
    image = app.machines[new]["config"]["image"]
    assert image == f"{IMAGE}@{rig.state.image(IMAGE)['digest']}"  # GraphQL resolved the digest
    assert new in result.stdout


def test_secrets_set_stores_the_secret_and_restarts_with_a_new_release(rig: Rig) -> None:
    app = rig.state.apps["web-staging"]
    rig.run("secrets", "set", "FOO=bar", "-a", "web-staging")
    assert app.secrets["FOO"]["value"] == "bar"
    assert [r["status"] for r in app.releases] == ["complete", "complete"]
    (machine,) = app.machines.values()
    assert machine["config"]["metadata"]["fly_release_id"] == app.releases[-1]["id"]


def test_releases_lists_the_sandbox_history(rig: Rig) -> None:
    rig.state.apps["web-staging"].releases[0]["description"] = "the seeded release"
    result = rig.run("releases", "-a", "web-staging")
    assert "v1" in result.stdout and "the seeded release" in result.stdout


def test_logs_no_tail_prints_the_apps_log_lines(rig: Rig) -> None:
    rig.state.apps["web-staging"].log("hello from the sandbox")
    result = rig.run("logs", "--no-tail", "-a", "web-staging")
    assert "hello from the sandbox" in result.stdout


def test_scale_count_clones_a_machine(rig: Rig) -> None:
    app = rig.state.apps["web-staging"]
    rig.run("scale", "count", "2", "-a", "web-staging", "--yes")
    assert len(app.machines) == 2
    images = {m["config"]["image"] for m in app.machines.values()}
    assert images == {"registry.fly.io/web-staging:deployment-1"}


def test_apps_create_makes_an_app_in_the_sandbox_org(rig: Rig) -> None:
    rig.run("apps", "create", "web-pr-42", "--org", SANDBOX_ORG_SLUG)
    created = rig.state.apps["web-pr-42"]
    assert created.org_slug == SANDBOX_ORG_SLUG and not created.machines
