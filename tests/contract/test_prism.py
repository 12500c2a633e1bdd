"""Contract tests: the gateway in front of Prism serving the Fly Machines OpenAPI spec.

Prism (`prism mock --errors`) validates every request it receives against the spec, path, query,
headers, body and the bearer credential, and answers a spec-valid one with the operation's 2xx
mock. So an allowed request that comes back with the spec's 2xx status and Prism's CORS headers
went through the gateway unmangled; a denied one must come back as the gateway's own JSON 403,
and Prism's log (read after a marker request) proves it never got there.

Every operation of the spec has at least one case here; `test_every_operation_is_exercised` fails
when the spec gains one that is not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import CREDENTIAL_ENV
from tests.contract.tools import Gateway, Prism, load_spec, operations, prism_spec

CREDENTIAL = "fm2_prism-contract-credential-0123456789"
APP = "web-staging"  # environment staging: deployers may write its secrets
MACHINE = "148ed193b95389"
VOLUME = "vol_4vxn0ydvdl6o9ek6"
HOST = "www.example.com"
IP = "2a09:8280:1::1"
CONFIG = {
    "image": "registry.fly.io/web-staging:deployment-2",
    "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
    "env": {"PORT": "8080"},
    "services": [{"protocol": "tcp", "internal_port": 8080, "autostart": True, "min_machines_running": 0,
                  "ports": [{"port": 443, "handlers": ["tls", "http"]}, {"port": 80, "handlers": ["http"],
                                                                          "force_https": True}]}],
    "checks": {"alive": {"type": "http", "port": 8080, "path": "/healthz", "interval": "15s", "timeout": "2s"}},
    "restart": {"policy": "on-failure", "max_retries": 3},
    "metadata": {"team": "web"},
    "containers": [{"name": "app", "image": "registry.fly.io/web-staging:deployment-2",
                    "depends_on": [{"name": "sidecar", "condition": "healthy"}],
                    "healthchecks": [{"name": "ready", "kind": "readiness", "unhealthy": "stop",
                                      "http": {"port": 8080, "path": "/ready", "scheme": "http"}}]}],
}


@dataclass(frozen=True)
class Case:
    """One request. `{app}` in path and body is the app: APP when allowed, a fresh `dn-...` when denied.

    allow: the narrowest grant that may do it (expect Prism's 2xx). deny: a grant that may not
    (expect the gateway's 403); when it covers the denied app, the message must name `action`.
    """

    op: str
    method: str
    path: str
    allow: str
    deny: str
    action: str
    query: str = ""
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    deny_env_suffix: str = ""  # "-prod": the denied app is in production
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}-{self.method}{'-' + self.label if self.label else ''}"

    def target(self, app: str) -> str:
        return self.path.replace("{app}", app) + (f"?{self.query}" if self.query else "")

    def content(self, app: str) -> bytes | None:
        if self.body is None:
            return None
        return json.dumps(self.body).replace("{app}", app).encode()


A = "/v1/apps/{app}"
M = f"/v1/apps/{{app}}/machines/{MACHINE}"
READ = "viewer@app:web-*"  # never covers a `dn-...` app: the denial is "no grant covers"
NONCE = {"fly-machine-lease-nonce": "5f3a1c9e0b2d4f6a8c7e9d1b3a5c7e9f"}
BYTES = [104, 101, 108, 108, 111]

CASES = [
    # apps
    Case("Apps_create", "POST", "/v1/apps", "deployer@app:web-pr-*", "viewer@app:dn-*", "apps:create",
         body={"name": "{app}", "org_slug": "personal", "network": "default", "enable_subdomains": False}),
    Case("Apps_show", "GET", A, "viewer@app:{app}", READ, "apps:read"),
    Case("Apps_delete", "DELETE", A, "admin@app:{app}", "deployer@app:dn-*", "apps:delete"),
    # machines
    Case("Machines_list", "GET", f"{A}/machines", "viewer@app:{app}", READ, "machines:read",
         query="include_deleted=false&region=iad&state=started&summary=true"),
    Case("Machines_create", "POST", f"{A}/machines", "deployer@app:{app}", "viewer@app:dn-*", "machines:deploy",
         body={"config": CONFIG, "region": "iad", "name": "web-staging-2", "skip_launch": False,
               "lease_ttl": 30}),
    Case("Machines_show", "GET", M, "viewer@app:{app}", READ, "machines:read"),
    Case("Machines_update", "POST", M, "deployer@app:{app}", "operator@app:dn-*", "machines:deploy",
         body={"config": CONFIG, "current_version": "01HZ7Q", "region": "iad"}, headers=NONCE),
    Case("Machines_delete", "DELETE", M, "admin@app:{app}", "deployer@app:dn-*", "machines:destroy",
         query="force=true"),
    Case("Machines_cordon", "POST", f"{M}/cordon", "operator@app:{app}", "viewer@app:dn-*", "machines:control"),
    Case("Machines_uncordon", "POST", f"{M}/uncordon", "operator@app:{app}", "viewer@app:dn-*",
         "machines:control"),
    Case("Machines_list_events", "GET", f"{M}/events", "viewer@app:{app}", READ, "machines:read", query="limit=5"),
    Case("Machines_exec", "POST", f"{M}/exec", "admin@app:{app}", "deployer@app:dn-*", "machines:exec",
         body={"command": ["df", "-h"], "timeout": 5, "container": "app"}),  # policies/constraints.yaml
    Case("Machines_get_memory", "GET", f"{M}/memory", "viewer@app:{app}", READ, "machines:read"),
    Case("Machines_set_memory_limit", "PUT", f"{M}/memory", "operator@app:{app}", "viewer@app:dn-*",
         "machines:control", body={"limit_mb": 512}),
    Case("Machines_reclaim_memory", "POST", f"{M}/memory/reclaim", "operator@app:{app}", "viewer@app:dn-*",
         "machines:control", body={"amount_mb": 128}),
    Case("Machines_list_processes", "GET", f"{M}/ps", "viewer@app:{app}", READ, "machines:read",
         query="sort_by=cpu&order=desc"),
    Case("Machines_restart", "POST", f"{M}/restart", "operator@app:{app}", "viewer@app:dn-*", "machines:control",
         query="timeout=10s&signal=SIGTERM"),
    Case("Machines_signal", "POST", f"{M}/signal", "operator@app:{app}", "viewer@app:dn-*", "machines:control",
         body={"signal": "SIGUSR1"}),
    Case("Machines_start", "POST", f"{M}/start", "operator@app:{app}", "viewer@app:dn-*", "machines:control"),
    Case("Machines_stop", "POST", f"{M}/stop", "operator@app:{app}", "viewer@app:dn-*", "machines:control",
         body={"signal": "SIGTERM", "timeout": "10s"}),
    Case("Machines_suspend", "POST", f"{M}/suspend", "operator@app:{app}", "viewer@app:dn-*", "machines:control"),
    Case("Machines_list_versions", "GET", f"{M}/versions", "viewer@app:{app}", READ, "machines:read"),
    Case("Machines_wait", "GET", f"{M}/wait", "viewer@app:{app}", READ, "machines:read",
         query="instance_id=01HZ7Q&timeout=30&state=started"),
    # leases
    Case("Machines_show_lease", "GET", f"{M}/lease", "viewer@app:{app}", READ, "leases:read"),
    Case("Machines_create_lease", "POST", f"{M}/lease", "operator@app:{app}", "viewer@app:dn-*", "leases:acquire",
         body={"ttl": 60, "description": "deploy from CI"}),
    Case("Machines_release_lease", "DELETE", f"{M}/lease", "operator@app:{app}", "viewer@app:dn-*",
         "leases:release", headers=NONCE),
    # metadata
    Case("Machines_show_metadata", "GET", f"{M}/metadata", "viewer@app:{app}", READ, "metadata:read"),
    Case("Machines_update_metadata", "PUT", f"{M}/metadata", "deployer@app:{app}", "operator@app:dn-*",
         "metadata:write", body={"metadata": {"team": "web", "tier": "frontend"}, "machine_version": "01HZ7Q"}),
    Case("Machines_update_metadata", "PATCH", f"{M}/metadata", "deployer@app:{app}", "viewer@app:dn-*",
         "metadata:write", body={"metadata": {"tier": "edge"}, "updated_at": "2026-01-02T03:04:05Z"}),
    Case("Machines_get_metadata_key", "GET", f"{M}/metadata/team", "viewer@app:{app}", READ, "metadata:read"),
    Case("Machines_upsert_metadata", "POST", f"{M}/metadata/team", "deployer@app:{app}", "viewer@app:dn-*",
         "metadata:write", body={"value": "platform"}),
    Case("Machines_delete_metadata", "DELETE", f"{M}/metadata/team", "deployer@app:{app}", "viewer@app:dn-*",
         "metadata:write"),
    # secrets (names readable by viewers, values only by admins, writes not by deployers in production)
    Case("Secrets_list", "GET", f"{A}/secrets", "viewer@app:{app}", READ, "secrets:list", query="min_version=3"),
    Case("Secrets_list", "GET", f"{A}/secrets", "admin@app:{app}", "deployer@app:dn-*", "secrets:read",
         query="show_secrets=true", label="values"),
    # dn-*-prod: a pattern grant reaches only its pattern's environment (production here).
    Case("Secrets_update", "POST", f"{A}/secrets", "deployer@app:{app}", "deployer@app:dn-*-prod", "secrets:write",
         body={"values": {"DATABASE_URL": "postgres://db.internal/web", "API_KEY": "k-123"}},
         deny_env_suffix="-prod"),
    Case("Secret_get", "GET", f"{A}/secrets/DATABASE_URL", "viewer@app:{app}", READ, "secrets:list"),
    Case("Secret_get", "GET", f"{A}/secrets/DATABASE_URL", "admin@app:{app}", "operator@app:dn-*",
         "secrets:read", query="show_secrets=true", label="value"),
    Case("Secret_create", "POST", f"{A}/secrets/API_KEY", "deployer@app:{app}", "viewer@app:dn-*",
         "secrets:write", body={"value": "k-456"}),
    Case("Secret_delete", "DELETE", f"{A}/secrets/API_KEY", "deployer@app:{app}", "deployer@app:dn-*-prod",
         "secrets:write", deny_env_suffix="-prod"),
    # secret keys: admin only
    Case("Secretkeys_list", "GET", f"{A}/secretkeys", "admin@app:{app}", "deployer@app:dn-*", "secretkeys:read",
         query="types=hmac,aead&min_version=1"),
    Case("Secretkey_get", "GET", f"{A}/secretkeys/signing", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:read"),
    Case("Secretkey_set", "POST", f"{A}/secretkeys/signing", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:write", body={"type": "hmac_sha256", "value": BYTES}),
    Case("Secretkey_delete", "DELETE", f"{A}/secretkeys/signing", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:delete"),
    Case("Secretkey_generate", "POST", f"{A}/secretkeys/signing/generate", "admin@app:{app}",
         "deployer@app:dn-*", "secretkeys:write", body={"type": "ed25519"}),
    Case("Secretkey_encrypt", "POST", f"{A}/secretkeys/signing/encrypt", "admin@app:{app}", "operator@app:dn-*",
         "secretkeys:use", body={"plaintext": BYTES, "associated_data": [1, 2]}),
    Case("Secretkey_decrypt", "POST", f"{A}/secretkeys/signing/decrypt", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:use", body={"ciphertext": BYTES, "associated_data": [1, 2]}, query="min_version=1"),
    Case("Secretkey_sign", "POST", f"{A}/secretkeys/signing/sign", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:use", body={"plaintext": BYTES}),
    Case("Secretkey_verify", "POST", f"{A}/secretkeys/signing/verify", "admin@app:{app}", "deployer@app:dn-*",
         "secretkeys:use", body={"plaintext": BYTES, "signature": [9, 8, 7]}),
    # volumes
    Case("Volumes_list", "GET", f"{A}/volumes", "viewer@app:{app}", READ, "volumes:read", query="summary=true"),
    Case("Volumes_create", "POST", f"{A}/volumes", "deployer@app:{app}", "viewer@app:dn-*", "volumes:create",
         body={"name": "data", "region": "iad", "size_gb": 1, "encrypted": True, "require_unique_zone": False,
               "snapshot_retention": 5, "compute": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}}),
    Case("Volumes_get_by_id", "GET", f"{A}/volumes/{VOLUME}", "viewer@app:{app}", READ, "volumes:read"),
    Case("Volumes_update", "PUT", f"{A}/volumes/{VOLUME}", "admin@app:{app}", "deployer@app:dn-*",
         "volumes:write", body={"auto_backup_enabled": True, "snapshot_retention": 7}),
    Case("Volume_delete", "DELETE", f"{A}/volumes/{VOLUME}", "admin@app:{app}", "deployer@app:dn-*",
         "volumes:delete"),
    Case("Volumes_extend", "PUT", f"{A}/volumes/{VOLUME}/extend", "deployer@app:{app}", "viewer@app:dn-*",
         "volumes:extend", body={"size_gb": 2}),
    Case("Volumes_list_snapshots", "GET", f"{A}/volumes/{VOLUME}/snapshots", "viewer@app:{app}", READ,
         "volumes:read"),
    Case("createVolumeSnapshot", "POST", f"{A}/volumes/{VOLUME}/snapshots", "admin@app:{app}",
         "deployer@app:dn-*", "volumes:snapshot"),
    # certificates
    Case("App_Certificates_list", "GET", f"{A}/certificates", "viewer@app:{app}", READ, "certificates:read",
         query="filter=example&limit=10"),
    Case("App_Certificates_acme_create", "POST", f"{A}/certificates/acme", "deployer@app:{app}",
         "viewer@app:dn-*", "certificates:create", body={"hostname": HOST}),
    Case("App_Certificates_custom_create", "POST", f"{A}/certificates/custom", "deployer@app:{app}",
         "viewer@app:dn-*", "certificates:create",
         body={"hostname": HOST, "fullchain": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
               "private_key": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"}),
    Case("App_Certificates_show", "GET", f"{A}/certificates/{HOST}", "viewer@app:{app}", READ,
         "certificates:read"),
    Case("App_Certificates_check", "POST", f"{A}/certificates/{HOST}/check", "admin@app:{app}",
         "deployer@app:dn-*", "certificates:write"),
    Case("App_Certificates_delete", "DELETE", f"{A}/certificates/{HOST}", "admin@app:{app}",
         "deployer@app:dn-*", "certificates:delete"),
    Case("App_Certificates_acme_delete", "DELETE", f"{A}/certificates/{HOST}/acme", "admin@app:{app}",
         "deployer@app:dn-*", "certificates:delete"),
    Case("App_Certificates_custom_delete", "DELETE", f"{A}/certificates/{HOST}/custom", "admin@app:{app}",
         "deployer@app:dn-*", "certificates:delete"),
    # IP assignments
    Case("App_IPAssignments_list", "GET", f"{A}/ip_assignments", "viewer@app:{app}", READ, "ips:read"),
    Case("App_IPAssignments_create", "POST", f"{A}/ip_assignments", "deployer@app:{app}", "viewer@app:dn-*",
         "ips:allocate", body={"type": "v6", "region": "iad", "org_slug": "personal", "network": "",
                               "service_name": ""}),
    Case("App_IPAssignments_delete", "DELETE", f"{A}/ip_assignments/{IP}", "admin@app:{app}",
         "deployer@app:dn-*", "ips:release"),
    Case("App_IPAssignments_delete", "DELETE", f"{A}/ip_assignments/203.0.113.7", "admin@app:{app}",
         "deployer@app:dn-*", "ips:release", label="v4"),
    # platform (org level, harmless reads: any app-scoped grant may, a gateway-only token may not)
    Case("Platform_regions_get", "GET", "/v1/platform/regions", "viewer@app:{app}", "token-admin@gateway",
         "platform:read"),
    Case("Platform_placements_post", "POST", "/v1/platform/placements", "viewer@app:{app}", "token-admin@gateway",
         "platform:read", body={"org_slug": "personal", "region": "iad,any", "count": 2,
                                "compute": {"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048},
                                "volume_name": "data", "volume_size_bytes": 1073741824}),
]

# Refused whatever the token says (they would mint or reveal upstream credentials, or list the
# whole organization, which no shipped role may): (operationId, METHOD, path, body, words in the message).
ALWAYS_DENIED = [
    ("App_create_deploy_token", "POST", f"/v1/apps/{APP}/deploy_token", {"expiry": "24h"}, "always denied"),
    ("Tokens_authenticate", "POST", "/v1/tokens/authenticate", {"header": "FlyV1 fm2_x"}, "always denied"),
    ("Tokens_authorize", "POST", "/v1/tokens/authorize", {"header": "FlyV1 fm2_x"}, "always denied"),
    ("Tokens_request_Kms", "POST", "/v1/tokens/kms", None, "always denied"),
    ("Tokens_request_OIDC", "POST", "/v1/tokens/oidc", {"aud": "https://fly.io/personal"}, "always denied"),
    ("Machines_org_list", "GET", "/v1/orgs/personal/machines", None, "orgs:list-machines"),
    ("Volumes_org_list", "GET", "/v1/orgs/personal/volumes", None, "orgs:list-volumes"),
]
# Covered by dedicated tests below.
SPECIAL = {("Apps_list", "GET"), ("CurrentToken_show", "GET")}


@pytest.fixture(scope="session")
def spec() -> dict[str, Any]:
    return load_spec()


@pytest.fixture(scope="session")
def prism(spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prism]:
    folder = tmp_path_factory.mktemp("prism")
    spec_file = folder / "fly-machines-v1.json"
    spec_file.write_text(json.dumps(prism_spec(spec)))
    server = Prism.start(spec_file, folder, CREDENTIAL)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prism_gateway(prism: Prism, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
        gateway = Gateway.start(tmp_path_factory.mktemp("gateway-prism"), prism.url,
                                upstream={"org_slug": "personal"})  # the org the spec's examples name
        yield gateway
        gateway.stop()


@pytest.fixture(scope="session")
def client(prism_gateway: Gateway) -> Iterator[httpx.Client]:
    with prism_gateway.client() as http:
        yield http


def success_status(spec: dict[str, Any], method: str, path: str) -> int:
    """The 2xx Prism answers for this operation: the lowest declared."""
    responses = spec["paths"][path.removeprefix("/v1")][method.lower()]["responses"]
    return min(int(code) for code in responses if code.startswith("2"))


def spec_path_of(spec: dict[str, Any], case: Case) -> str:
    """The spec's template for this case's path ({app_name}, {machine_id}, ... put back)."""
    for op_id, method, template, _ in operations(spec):
        if op_id == case.op and method == case.method:
            return "/v1" + template
    raise AssertionError(f"{case.op} {case.method} is not in the spec")


def send(client: httpx.Client, token: str, method: str, target: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
    if body is not None:
        sent["Content-Type"] = "application/json"
    return client.request(method, target, content=body, headers=sent)


def assert_answered_by_prism(response: httpx.Response) -> None:
    # Prism adds CORS headers to every answer; the gateway never does.
    assert response.headers.get("access-control-allow-origin") == "*", response.headers


def assert_gateway_refusal(response: httpx.Response, *words: str) -> dict[str, Any]:
    assert response.status_code == 403, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    assert "access-control-allow-origin" not in response.headers, "the refusal came from Prism"
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}, body
    assert body["error"] == "forbidden", body
    assert body["request_id"] == response.headers["x-request-id"]
    for word in words:
        assert word in body["message"], (word, body["message"])
    assert CREDENTIAL not in response.text
    return dict(body)


def test_prism_itself_refuses_requests_that_violate_the_spec(prism: Prism) -> None:
    """Without this the 2xx answers below would prove nothing: Prism must really validate."""
    auth = {"Authorization": f"Bearer {CREDENTIAL}"}
    signal = f"/v1/apps/{APP}/machines/{MACHINE}/signal"
    with httpx.Client(base_url=prism.url, timeout=10) as direct:
        assert direct.post(signal, json={"signal": "SIGTERM"}).status_code == 401  # no credential
        assert direct.post(signal, json={"signal": "SIGTERM"}, headers=auth).status_code == 200
        assert direct.post(signal, json={"signal": "SIGFOO"}, headers=auth).status_code == 400  # not in the enum
        assert direct.post(signal, content=b'{"signal": "SIGTERM"}',
                           headers={**auth, "Content-Type": "text/plain"}).status_code in (400, 415)
        lease = f"/v1/apps/{APP}/machines/{MACHINE}/lease"
        assert direct.delete(lease, headers=auth).status_code == 422  # required nonce header missing
        assert direct.delete(lease, headers={**auth, **NONCE}).status_code == 200
        assert direct.get("/v1/apps", headers=auth).status_code == 422  # required org_slug missing
        assert direct.post(f"/v1/apps/{APP}/machines/{MACHINE}/memory/reclaim", json={"amount_mb": "lots"},
                           headers=auth).status_code == 422  # integer expected


def test_every_operation_is_exercised(spec: dict[str, Any]) -> None:
    in_spec = {(op_id, method) for op_id, method, _, _ in operations(spec)}
    assert len(in_spec) == 76
    covered = {(c.op, c.method) for c in CASES} | {(op, m) for op, m, *_ in ALWAYS_DENIED} | SPECIAL
    assert in_spec - covered == set(), "operations without a contract case"
    assert covered - in_spec == set(), "cases for operations the spec does not have"
    for case in CASES:  # each case's path has the shape of its operation's template
        template = spec_path_of(spec, case)
        assert case.path.count("/") == template.count("/"), (case.id, template)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_allowed_request_reaches_prism_valid(case: Case, prism_gateway: Gateway, client: httpx.Client,
                                            spec: dict[str, Any]) -> None:
    app = "web-pr-7" if case.op == "Apps_create" else APP
    token = prism_gateway.token(case.allow.replace("{app}", app))
    response = send(client, token, case.method, case.target(app), case.content(app), case.headers)
    expected = success_status(spec, case.method, spec_path_of(spec, case))
    assert response.status_code == expected, (response.status_code, response.text[:2000])
    assert_answered_by_prism(response)
    if response.status_code != 204 and response.content:
        json.loads(response.content)  # Prism's mock of the operation's JSON response, relayed whole
    assert CREDENTIAL not in response.text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_denied_request_never_reaches_prism(case: Case, prism: Prism, prism_gateway: Gateway,
                                            client: httpx.Client) -> None:
    app = f"dn-{uuid.uuid4().hex[:10]}{case.deny_env_suffix}"
    token = prism_gateway.token(case.deny.replace("{app}", app))
    target = case.target(app)
    path = target.partition("?")[0]
    prism.sync()
    before = prism.received(case.method, path)
    response = send(client, token, case.method, target, case.content(app), case.headers)
    covers = case.deny.endswith(("@app:dn-*", "@app:dn-*-prod"))
    words = [case.action, app] if covers else ["no grant that covers"]
    if case.deny_env_suffix == "-prod":
        words.append("production")
    assert_gateway_refusal(response, *words)
    prism.sync()
    assert prism.received(case.method, path) == before, f"{case.method} {path} reached Prism"


@pytest.mark.parametrize(("op", "method", "path", "body", "words"), ALWAYS_DENIED, ids=[d[0] for d in ALWAYS_DENIED])
def test_always_denied_operations_never_reach_prism(op: str, method: str, path: str, body: Any, words: str,
                                                    prism: Prism, prism_gateway: Gateway,
                                                    client: httpx.Client) -> None:
    token = prism_gateway.token("admin@app:*", "deployer@app:*", "viewer@env:staging")
    content = json.dumps(body).encode() if body is not None else None
    prism.sync()
    before = prism.received(method, path)
    assert_gateway_refusal(send(client, token, method, path, content), words)
    prism.sync()
    assert prism.received(method, path) == before


def test_current_token_is_answered_by_the_gateway_not_prism(prism: Prism, prism_gateway: Gateway,
                                                            client: httpx.Client) -> None:
    token = prism_gateway.token("viewer@app:web-staging", name="who-am-i")
    prism.sync()
    response = send(client, token, "GET", "/v1/tokens/current")
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    body = response.json()
    assert body["source"] == "scopegate" and body["name"] == "who-am-i"
    assert body["grants"] == ["viewer@app:web-staging"] and body["exp"] > body["iat"]
    prism.sync()
    assert prism.received("GET", "/v1/tokens/current") == 0


def test_app_listing_goes_to_prism_and_comes_back_filtered(prism_gateway: Gateway, client: httpx.Client) -> None:
    # Prism's mock lists one app named "string" (the schema's example), in the org asked for.
    wide = send(client, prism_gateway.token("viewer@app:*"), "GET", "/v1/apps?org_slug=personal&app_role=")
    assert wide.status_code == 200, wide.text
    assert [a["name"] for a in wide.json()["apps"]] == ["string"]
    assert wide.json()["total_apps"] == 1
    narrow = send(client, prism_gateway.token("deployer@app:web-staging"), "GET", "/v1/apps?org_slug=personal")
    assert narrow.status_code == 200, narrow.text
    assert narrow.json() == {"apps": [], "total_apps": 0}
    # The query is forwarded as sent: without the required org_slug Prism refuses, and it is relayed.
    missing = send(client, prism_gateway.token("viewer@app:*"), "GET", "/v1/apps")
    assert missing.status_code == 422
    assert_answered_by_prism(missing)


def test_spec_violations_in_allowed_requests_are_prisms_answer_relayed(prism_gateway: Gateway,
                                                                       client: httpx.Client) -> None:
    """The gateway does not launder bodies: an allowed but invalid request fails at the upstream."""
    token = prism_gateway.token(f"admin@app:{APP}")
    bad_signal = send(client, token, "POST", f"/v1/apps/{APP}/machines/{MACHINE}/signal",
                      json.dumps({"signal": "SIGFOO"}).encode())
    assert bad_signal.status_code == 400
    assert_answered_by_prism(bad_signal)
    no_nonce = send(client, token, "DELETE", f"/v1/apps/{APP}/machines/{MACHINE}/lease")
    assert no_nonce.status_code == 422
    assert_answered_by_prism(no_nonce)
    assert "fly-machine-lease-nonce" in no_nonce.text
    bad_type = send(client, token, "PUT", f"/v1/apps/{APP}/volumes/{VOLUME}/extend",
                    json.dumps({"size_gb": "ten"}).encode())
    assert bad_type.status_code == 422
    assert_answered_by_prism(bad_type)


def test_the_spec_copy_prism_serves_is_the_shared_spec_with_v1_paths(spec: dict[str, Any], prism: Prism) -> None:
    served = json.loads(prism.spec_file.read_text())
    assert set(served["paths"]) == {"/v1" + p for p in spec["paths"]}
    assert served["paths"]["/v1/apps"] == spec["paths"]["/apps"]


def test_volume_ownership_lookups_are_spec_valid_requests(prism: Prism, prism_gateway: Gateway,
                                                         client: httpx.Client) -> None:
    """policies/constraints.yaml makes the gateway ask the upstream whether a mounted volume or a
    restored snapshot belongs to the app; those lookups must be valid for the spec too. Prism's mock
    volumes and snapshots all have the id "string", so that id belongs to every app and no other does.
    """
    token = prism_gateway.token(f"deployer@app:{APP}")
    machines, lookup = f"/v1/apps/{APP}/machines", f"/v1/apps/{APP}/volumes/string"
    mounted = {"config": {**CONFIG, "mounts": [{"volume": "string", "path": "/data"}]}, "region": "iad"}
    prism.sync()
    before = prism.received("POST", machines), prism.received("GET", lookup)
    response = send(client, token, "POST", machines, json.dumps(mounted).encode())
    assert response.status_code == 200, response.text
    assert_answered_by_prism(response)
    prism.sync()
    assert (prism.received("POST", machines), prism.received("GET", lookup)) == (before[0] + 1, before[1] + 1)

    foreign = {"config": {**CONFIG, "mounts": [{"volume": "vol_of_another_app", "path": "/data"}]}}
    refused = send(client, token, "POST", machines, json.dumps(foreign).encode())
    assert_gateway_refusal(refused, "config.mounts[0].volume", "vol_of_another_app")
    prism.sync()
    assert prism.received("GET", f"/v1/apps/{APP}/volumes/vol_of_another_app") >= 1  # asked, and told no
    assert prism.received("POST", machines) == before[0] + 1  # the create itself never went out

    restore = {"name": "data", "region": "iad", "size_gb": 1, "snapshot_id": "string"}
    restored = send(client, token, "POST", f"/v1/apps/{APP}/volumes", json.dumps(restore).encode())
    assert restored.status_code == 200, restored.text
    assert_answered_by_prism(restored)
    prism.sync()
    assert prism.received("GET", f"/v1/apps/{APP}/volumes/string/snapshots") >= 1
