"""The dev-mode sandbox upstream, exercised over real HTTP through uvicorn on a loopback port."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from gateway.dev.sandbox import create_sandbox_app

TOKEN = "fo1_sandbox-upstream-credential"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MACHINE_CONFIG = {"image": "registry.fly.io/demo-app:deployment-7", "guest": {"cpus": 1, "memory_mb": 256}}


@contextmanager
def running_sandbox(*, seed: bool = True) -> Iterator[str]:
    """Serve a fresh sandbox on 127.0.0.1 and yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_sandbox_app(expected_token=TOKEN, seed=seed), log_level="warning",
                            lifespan="off", ws="none", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "sandbox server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture
def base_url() -> Iterator[str]:
    with running_sandbox() as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=5) as c:
        yield c


def new_machine(client: httpx.Client, app: str = "web-prod") -> str:
    response = client.post(f"/v1/apps/{app}/machines", json={"config": MACHINE_CONFIG, "region": "ams"})
    assert response.status_code == 200, response.text
    machine_id = response.json()["id"]
    assert isinstance(machine_id, str)
    return machine_id


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"FlyV1 {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["missing", "wrong", "longer", "other-scheme", "no-scheme"],
)
def test_requests_without_the_upstream_token_are_refused(base_url: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=base_url, timeout=5) as anonymous:
        for method, path in [("GET", "/v1/apps?org_slug=personal"), ("GET", "/v1/apps/web-prod/secrets"),
                             ("DELETE", "/v1/apps/web-prod"), ("GET", "/v1/not-a-route")]:
            response = anonymous.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.json() == {"error": "unauthorized"}
        # Refused requests changed nothing.
        assert anonymous.get("/v1/apps/web-prod", headers=AUTH).status_code == 200


def test_bearer_scheme_is_case_insensitive(client: httpx.Client) -> None:
    response = client.get("/v1/apps/web-prod", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_empty_expected_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected_token"):
        create_sandbox_app(expected_token="")


def test_seeded_apps_are_listed_per_org(client: httpx.Client) -> None:
    listing = client.get("/v1/apps", params={"org_slug": "personal"}).json()
    assert listing["total_apps"] == 3
    apps = {app["name"]: app for app in listing["apps"]}
    assert set(apps) == {"web-staging", "web-prod", "api-staging"}
    for app in apps.values():
        assert app["machine_count"] == 1
        assert app["organization"]["slug"] == "personal"
        assert app["network"] == "default"
        assert app["id"]
    assert client.get("/v1/apps", params={"org_slug": "someone-else"}).json() == {"total_apps": 0, "apps": []}
    missing_org = client.get("/v1/apps")
    assert missing_org.status_code == 400
    assert "org_slug" in missing_org.json()["error"]


def test_seeded_machine_and_secret(client: httpx.Client) -> None:
    machines = client.get("/v1/apps/api-staging/machines").json()
    assert len(machines) == 1
    assert machines[0]["state"] == "started"
    assert machines[0]["image_ref"]["repository"] == "api-staging"
    secrets = client.get("/v1/apps/api-staging/secrets").json()["secrets"]
    assert [s["name"] for s in secrets] == ["DATABASE_URL"]


def test_unseeded_sandboxes_are_empty_and_independent() -> None:
    with (
        running_sandbox(seed=False) as first,
        running_sandbox(seed=False) as second,
        httpx.Client(headers=AUTH, timeout=5) as http,
    ):
        created = http.post(f"{first}/v1/apps", json={"name": "only-here", "org_slug": "personal"})
        assert created.status_code == 201
        assert http.get(f"{first}/v1/apps?org_slug=personal").json()["total_apps"] == 1
        assert http.get(f"{second}/v1/apps?org_slug=personal").json() == {"total_apps": 0, "apps": []}
        assert http.get(f"{second}/v1/apps/only-here").status_code == 404


def test_app_lifecycle(client: httpx.Client) -> None:
    created = client.post("/v1/apps", json={"name": "demo-app", "org_slug": "personal"})
    assert created.status_code == 201
    assert created.json()["name"] == "demo-app"
    assert created.json()["machine_count"] == 0

    duplicate = client.post("/v1/apps", json={"name": "demo-app", "org_slug": "personal"})
    assert duplicate.status_code == 409
    assert duplicate.json() == {"error": "app demo-app already exists"}
    bad_name = client.post("/v1/apps", json={"name": "Not Valid", "org_slug": "personal"})
    assert bad_name.status_code == 400

    assert client.get("/v1/apps", params={"org_slug": "personal"}).json()["total_apps"] == 4
    assert client.get("/v1/apps/demo-app").json()["organization"]["slug"] == "personal"
    assert client.delete("/v1/apps/demo-app").status_code == 202
    gone = client.get("/v1/apps/demo-app")
    assert gone.status_code == 404
    assert gone.json() == {"error": "app demo-app not found"}


def test_machine_create_stop_start(client: httpx.Client) -> None:
    assert client.post("/v1/apps", json={"name": "demo-app", "org_slug": "personal"}).status_code == 201
    created = client.post("/v1/apps/demo-app/machines",
                          json={"config": MACHINE_CONFIG, "region": "ams", "name": "worker-1"})
    assert created.status_code == 200
    machine = created.json()
    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert (machine["name"], machine["region"], machine["state"]) == ("worker-1", "ams", "started")
    assert machine["config"]["image"] == MACHINE_CONFIG["image"]
    assert machine["image_ref"] == {"registry": "registry.fly.io", "repository": "demo-app",
                                    "tag": "deployment-7", "digest": ""}
    url = f"/v1/apps/demo-app/machines/{machine['id']}"

    assert client.post(f"{url}/stop").json() == {"ok": True}
    assert client.get(url).json()["state"] == "stopped"
    assert client.get(f"{url}/wait", params={"state": "stopped"}).json()["ok"] is True
    assert client.post(f"{url}/start").json() == {"ok": True}
    assert client.get(url).json()["state"] == "started"
    assert client.post(f"{url}/suspend").status_code == 200
    assert client.get(url).json()["state"] == "suspended"
    assert client.post(f"{url}/restart").status_code == 200
    assert client.get(url).json()["state"] == "started"

    assert client.get("/v1/apps/demo-app").json()["machine_count"] == 1
    assert [m["id"] for m in client.get("/v1/apps/demo-app/machines", params={"state": "started"}).json()] \
        == [machine["id"]]
    assert client.get("/v1/apps/demo-app/machines", params={"state": "stopped"}).json() == []


def test_machine_update_and_delete(client: httpx.Client) -> None:
    machine_id = new_machine(client)
    url = f"/v1/apps/web-prod/machines/{machine_id}"
    before = client.get(url).json()
    updated = client.post(url, json={"config": {**MACHINE_CONFIG, "image": "nginx:1.27"}})
    assert updated.status_code == 200
    assert updated.json()["config"]["image"] == "nginx:1.27"
    assert updated.json()["image_ref"]["registry"] == "docker.io"
    assert updated.json()["region"] == "ams"
    assert updated.json()["instance_id"] != before["instance_id"]
    assert client.post(url, json={"config": {}}).status_code == 400

    refused = client.delete(url)
    assert refused.status_code == 412  # like Fly: a started machine needs force
    assert client.get(url).status_code == 200
    assert client.delete(url, params={"force": "true"}).status_code == 200
    assert client.get(url).json() == {"error": f"machine {machine_id} not found"}
    assert client.get("/v1/apps/web-prod").json()["machine_count"] == 1


def test_machine_wait_times_out_on_the_wrong_state(client: httpx.Client) -> None:
    machine_id = new_machine(client)
    started = time.monotonic()
    response = client.get(f"/v1/apps/web-prod/machines/{machine_id}/wait",
                          params={"state": "stopped", "timeout": "60"})
    assert response.status_code == 408
    assert "stopped" in response.json()["error"]
    assert time.monotonic() - started < 3
    assert client.get(f"/v1/apps/web-prod/machines/{machine_id}/wait",
                      params={"state": "sleeping"}).status_code == 400


def test_signal_requires_a_known_signal(client: httpx.Client) -> None:
    machine_id = new_machine(client)
    url = f"/v1/apps/web-prod/machines/{machine_id}/signal"
    assert client.post(url, json={"signal": "SIGUSR1"}).json() == {"ok": True}
    for bad in [{"signal": "SIGNOPE"}, {"signal": ["SIGKILL"]}, {}]:
        refused = client.post(url, json=bad)
        assert refused.status_code == 400, bad
        assert refused.json()["error"].startswith("signal must be one of")


def test_secrets_hide_values_unless_show_secrets(client: httpx.Client) -> None:
    listed = client.get("/v1/apps/web-prod/secrets").json()["secrets"]
    assert [s["name"] for s in listed] == ["DATABASE_URL"]
    assert "value" not in listed[0]
    assert re.fullmatch(r"[0-9a-f]{16}", listed[0]["digest"])
    assert "value" not in client.get("/v1/apps/web-prod/secrets", params={"show_secrets": "false"}).json()[
        "secrets"][0]

    shown = client.get("/v1/apps/web-prod/secrets", params={"show_secrets": "true"}).json()["secrets"]
    assert shown[0]["value"] == "postgres://sandbox@db.internal/web-prod"
    assert shown[0]["digest"] == listed[0]["digest"]
    # A repeated key reveals too, so a gateway that lets the smuggled copy through is caught.
    smuggled = client.get("/v1/apps/web-prod/secrets?show_secrets=false&show_secrets=true").json()
    assert smuggled["secrets"][0]["value"] == shown[0]["value"]

    one = client.get("/v1/apps/web-prod/secrets/DATABASE_URL")
    assert one.status_code == 200
    assert "value" not in one.json()
    assert client.get("/v1/apps/web-prod/secrets/DATABASE_URL?show_secrets=1").json()["value"].startswith(
        "postgres://")


def test_secrets_set_unset_and_delete(client: httpx.Client) -> None:
    updated = client.post("/v1/apps/web-prod/secrets",
                          json={"values": {"API_KEY": "k-123", "DATABASE_URL": None}})
    assert updated.status_code == 200
    assert [s["name"] for s in updated.json()["secrets"]] == ["API_KEY"]
    assert all("value" not in s for s in updated.json()["secrets"])
    assert updated.json()["version"] == 2
    assert client.get("/v1/apps/web-prod/secrets/API_KEY?show_secrets=true").json()["value"] == "k-123"
    assert client.get("/v1/apps/web-prod/secrets/DATABASE_URL").status_code == 404

    created = client.post("/v1/apps/web-prod/secrets/OTHER", json={"value": "v"})
    assert created.status_code == 201
    assert created.json()["name"] == "OTHER"
    assert "value" not in created.json()
    assert client.delete("/v1/apps/web-prod/secrets/OTHER").status_code == 200
    assert client.delete("/v1/apps/web-prod/secrets/OTHER").status_code == 404
    assert client.post("/v1/apps/web-prod/secrets", json={"values": {"BAD NAME": "x"}}).status_code == 400
    # Other apps' secrets are untouched.
    untouched = client.get("/v1/apps/web-staging/secrets").json()["secrets"]
    assert [s["name"] for s in untouched] == ["DATABASE_URL"]


def test_lease_acquire_and_release_with_nonce(client: httpx.Client) -> None:
    machine_id = new_machine(client)
    url = f"/v1/apps/web-prod/machines/{machine_id}"
    assert client.get(f"{url}/lease").status_code == 404

    acquired = client.post(f"{url}/lease", json={"ttl": 60, "description": "deploy"})
    assert acquired.status_code == 201
    lease = acquired.json()
    nonce = lease["nonce"]
    assert lease["description"] == "deploy"
    assert lease["expires_at"] > time.time()
    assert lease["data"]["nonce"] == nonce
    assert client.get(f"{url}/lease").json()["nonce"] == nonce

    assert client.post(f"{url}/lease", json={"ttl": 60}).status_code == 409
    assert client.post(f"{url}/stop").status_code == 409  # a leased machine needs the nonce
    assert client.get(url).json()["state"] == "started"
    with_nonce = {"fly-machine-lease-nonce": nonce}
    assert client.post(f"{url}/stop", headers=with_nonce).status_code == 200
    assert client.get(url).json()["state"] == "stopped"
    refreshed = client.post(f"{url}/lease", json={"ttl": 120}, headers=with_nonce)
    assert refreshed.status_code == 201
    assert refreshed.json()["nonce"] == nonce

    assert client.delete(f"{url}/lease").status_code == 409
    assert client.delete(f"{url}/lease", headers={"fly-machine-lease-nonce": "not-it"}).status_code == 409
    assert client.delete(f"{url}/lease", headers=with_nonce).status_code == 200
    assert client.get(f"{url}/lease").status_code == 404
    assert client.post(f"{url}/start").status_code == 200


def test_machine_metadata(client: httpx.Client) -> None:
    machine_id = new_machine(client)
    url = f"/v1/apps/web-prod/machines/{machine_id}/metadata"
    assert client.get(url).json() == {}
    assert client.post(f"{url}/fly_process_group", json={"value": "app"}).status_code == 204
    assert client.get(f"{url}/fly_process_group").json() == {"value": "app"}
    assert client.patch(url, json={"metadata": {"color": "blue"}}).status_code == 204
    assert client.get(url).json() == {"fly_process_group": "app", "color": "blue"}
    assert client.put(url, json={"metadata": {"color": "green"}}).status_code == 204
    assert client.get(url).json() == {"color": "green"}
    machine = client.get(f"/v1/apps/web-prod/machines/{machine_id}").json()
    assert machine["config"]["metadata"] == {"color": "green"}
    assert client.delete(f"{url}/color").status_code == 204
    assert client.get(f"{url}/color").status_code == 404
    assert client.put(url, json={"metadata": {"n": 1}}).status_code == 400


def test_regions(client: httpx.Client) -> None:
    body = client.get("/v1/platform/regions").json()
    codes = {row["code"] for row in body["regions"]}
    assert body["nearest"] in codes
    assert {"iad", "lhr"} <= codes
    for region in ["xxx", {"code": "iad"}]:
        body = {"config": MACHINE_CONFIG, "region": region}
        bad_region = client.post("/v1/apps/web-prod/machines", json=body)
        assert bad_region.status_code == 400
        assert "region" in bad_region.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/apps/web-prod/volumes"),  # GET answers an empty list (flyctl asks)
        ("POST", "/v1/apps/web-prod/deploy_token"),
        ("PUT", "/v1/apps/web-prod"),  # a known path, but not this method
        ("GET", "/v1/tokens/current"),
        ("GET", "/healthz"),
    ],
)
def test_unemulated_routes_say_so(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert response.json() == {"error": f"the sandbox does not emulate {method} {path}"}


def test_unknown_app_and_machine(client: httpx.Client) -> None:
    assert client.get("/v1/apps/nope/machines").json() == {"error": "app nope not found"}
    missing = client.post("/v1/apps/web-prod/machines/0123456789abcd/start")
    assert missing.status_code == 404
    assert missing.json() == {"error": "machine 0123456789abcd not found"}
    assert client.get("/v1/apps/nope/secrets").status_code == 404


def test_invalid_json_body(client: httpx.Client) -> None:
    response = client.post("/v1/apps", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": "request body is not valid JSON"}
