"""A real third-party client through the gateway: fly-python-sdk 0.3.4 (PyPI, MIT).

The SDK pins httpx<0.25, so it runs in a virtualenv of its own (.tools/fly-sdk-venv, built once by
`tools.sdk_python()`) and the tests drive it with small scripts in a subprocess. Its base URL is the
default of `FlyApi.__init__(self, api_token, api_timeout=60, api_version=1, base_url=...)`, bound
when the function was defined, so the script replaces `FlyApi.__init__.__defaults__`.

Upstream is the dev sandbox (gateway.sandbox), which only answers requests carrying the gateway's
credential, so creations and deletions really change state that the tests then inspect.

The SDK raises `FlyError` with messages of its own ("403: Unable to create machine!") and drops the
response body, so to show that the gateway's 403 message reaches the caller the script also wraps the
SDK's three request methods (same calls, same return values) and reports the responses they got.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.dev.sandbox import SandboxState, create_sandbox_app
from tests.conftest import CREDENTIAL_ENV
from tests.contract.tools import Gateway, sdk_python
from tests.servers import ServerThread

CREDENTIAL = "fo1_sdk-contract-sandbox-credential"
IMAGE = "registry.fly.io/web-staging:deployment-42"

SCRIPT = r'''
"""Runs fly-python-sdk steps against BASE_URL; prints one JSON document with every step's outcome."""
import asyncio
import json
import sys

from fly_python_sdk.exceptions import FlyError
from fly_python_sdk.fly import Fly
from fly_python_sdk.fly.api import FlyApi
from fly_python_sdk.models.machine import FlyMachine, FlyMachineConfig

base_url, token, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# (api_timeout, api_version, base_url): check the SDK still has the shape this script patches.
assert FlyApi.__init__.__defaults__ == (60, 1, "https://api.machines.dev"), FlyApi.__init__.__defaults__
FlyApi.__init__.__defaults__ = (30, 1, base_url)

responses = []


def spy(original):
    async def wrapper(self, *args, **kwargs):
        response = await original(self, *args, **kwargs)
        responses.append({"method": response.request.method, "url": str(response.request.url),
                          "status": response.status_code, "body": response.text})
        return response
    return wrapper


for name in ("_make_api_get_request", "_make_api_post_request", "_make_api_delete_request"):
    setattr(FlyApi, name, spy(getattr(FlyApi, name)))


async def run(step):
    kind, args = step[0], step[1:]
    org = Fly(token).Org("personal")
    if kind == "list-apps":
        return [app.name for app in await org.list_apps()]
    if kind == "list-machines":
        return [m.id for m in await org.App(args[0]).list_machines()]
    if kind == "create-machine":
        app, image = args
        machine = FlyMachine(config=FlyMachineConfig(image=image), region="iad", name=f"{app}-sdk")
        created = await org.App(app).create_machine(machine)
        return {"id": created.id, "state": created.state, "image": created.config.image}
    if kind == "inspect-machine":
        machine = await org.App(args[0]).Machine(args[1]).inspect()
        return {"id": machine.id, "state": machine.state}
    if kind == "stop-machine":
        # Machine.stop() calls a get_machine() the SDK does not define; use its own request method.
        machine = org.App(args[0]).Machine(args[1])
        response = await machine._make_api_post_request(f"apps/{args[0]}/machines/{args[1]}/stop")
        return response.status_code
    if kind == "destroy-machine":
        await org.App(args[0]).Machine(args[1]).destroy()
        return "destroyed"
    raise ValueError(kind)


async def main():
    outcomes = []
    for step in steps:
        before = len(responses)
        try:
            outcome = {"ok": True, "result": await run(step)}
        except FlyError as error:
            outcome = {"ok": False, "error": str(error)}
        outcome["responses"] = responses[before:]
        outcomes.append(outcome)
    print(json.dumps(outcomes))


asyncio.run(main())
'''


@dataclass
class SdkWorld:
    python: Path
    script: Path
    gateway: Gateway
    sandbox: SandboxState

    def run(self, token: str, *steps: list[str]) -> list[dict[str, Any]]:
        done = subprocess.run([str(self.python), str(self.script), self.gateway.url, token, json.dumps(steps)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        outcomes = json.loads(done.stdout)
        assert isinstance(outcomes, list) and len(outcomes) == len(steps)
        return outcomes

    def machines(self, app: str) -> dict[str, dict[str, Any]]:
        return self.sandbox.apps[app].machines


@pytest.fixture(scope="session")
def sdk() -> Path:
    return sdk_python()


@pytest.fixture(scope="module")
def world(sdk: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkWorld]:
    folder = tmp_path_factory.mktemp("fly-sdk")
    script = folder / "drive_sdk.py"
    script.write_text(SCRIPT)
    sandbox_app = create_sandbox_app(expected_token=CREDENTIAL)
    sandbox_server = ServerThread(sandbox_app).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
        gateway = Gateway.start(folder / "gateway", sandbox_server.url)
        try:
            state = sandbox_app.state.sandbox
            assert isinstance(state, SandboxState)
            # Fly always returns guest.cpu_kind and the SDK's model requires it; the sandbox's seeded
            # machines omit it (the spec marks nothing required), so give them what Fly would.
            for app in state.apps.values():
                for machine in app.machines.values():
                    machine["config"].get("guest", {}).setdefault("cpu_kind", "shared")
            yield SdkWorld(sdk, script, gateway, state)
        finally:
            gateway.stop()
            sandbox_server.stop()


def refusal(outcome: dict[str, Any]) -> dict[str, Any]:
    """The gateway's 403 as the SDK received it (the SDK itself raised FlyError)."""
    assert outcome["ok"] is False, outcome
    (response,) = outcome["responses"]
    assert response["status"] == 403, response
    body = json.loads(response["body"])
    assert body["error"] == "forbidden"
    assert isinstance(body, dict)
    return body


def test_sdk_lists_apps_and_machines_through_the_gateway(world: SdkWorld) -> None:
    token = world.gateway.token("deployer@app:web-staging", name="sdk-deployer")
    seeded = list(world.machines("web-staging"))
    apps, machines, other = world.run(token, ["list-apps"], ["list-machines", "web-staging"],
                                      ["list-machines", "web-prod"])
    # The sandbox's org holds web-staging, web-prod and api-staging; the token covers one of them.
    assert sorted(world.sandbox.apps) == ["api-staging", "web-prod", "web-staging"]
    assert apps["ok"] and apps["result"] == ["web-staging"]
    assert apps["responses"][0]["url"].endswith("/v1/apps?org_slug=personal")
    assert machines["ok"] and set(machines["result"]) >= set(seeded) and seeded
    body = refusal(other)
    assert "sdk-deployer" in body["message"] and "web-prod" in body["message"]


def test_sdk_creates_a_machine_with_a_deploy_token_and_an_admin_deletes_it(world: SdkWorld) -> None:
    deployer = world.gateway.token("deployer@app:web-staging", name="sdk-deployer")
    (created,) = world.run(deployer, ["create-machine", "web-staging", IMAGE])
    assert created["ok"], created
    machine_id = created["result"]["id"]
    assert created["result"]["image"] == IMAGE
    assert world.machines("web-staging")[machine_id]["config"]["image"] == IMAGE  # really created upstream

    # Destroying is machines:destroy, which only admin has: the deploy token is refused ...
    destroy, listed = world.run(deployer, ["destroy-machine", "web-staging", machine_id],
                                ["list-machines", "web-staging"])
    body = refusal(destroy)
    assert "does not grant machines:destroy on app web-staging" in body["message"]
    assert machine_id in listed["result"] and machine_id in world.machines("web-staging")

    # ... it may stop the machine (machines:control), and an admin token deletes it.
    (stopped,) = world.run(deployer, ["stop-machine", "web-staging", machine_id])
    assert stopped["ok"] and stopped["result"] == 200, stopped
    assert world.machines("web-staging")[machine_id]["state"] == "stopped"
    admin = world.gateway.token("admin@app:web-staging", name="sdk-admin")
    destroyed, after = world.run(admin, ["destroy-machine", "web-staging", machine_id],
                                 ["list-machines", "web-staging"])
    assert destroyed["ok"] and destroyed["result"] == "destroyed", destroyed
    assert machine_id not in world.machines("web-staging")
    assert machine_id not in after["result"]


def test_sdk_with_a_viewer_token_is_refused_and_sees_the_gateways_message(world: SdkWorld) -> None:
    viewer = world.gateway.token("viewer@app:web-staging", name="sdk-viewer")
    existing = next(iter(world.machines("web-staging")))
    count = len(world.machines("web-staging"))
    listed, created, destroyed = world.run(viewer, ["list-machines", "web-staging"],
                                           ["create-machine", "web-staging", IMAGE],
                                           ["destroy-machine", "web-staging", existing])
    assert listed["ok"] and existing in listed["result"]  # reading is what a viewer may do
    assert created["error"] == "403: Unable to create machine!"  # the SDK's own words
    body = refusal(created)
    assert body["message"] == ("token 'sdk-viewer' does not grant machines:deploy on app web-staging "
                               "(environment staging); its role(s) there: viewer")
    assert "machines:destroy" in refusal(destroyed)["message"]
    assert len(world.machines("web-staging")) == count and existing in world.machines("web-staging")
