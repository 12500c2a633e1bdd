"""Issue 17: Fly macaroons, and `upstream.attenuate: apps` forwarding a narrowed one per request.

The wire format is checked against Fly's own Go library twice: tests/data/macaroon_vectors.json
holds tokens minted and attenuated by github.com/superfly/macaroon v0.3.0 (made with
tests/macaroon_go, `macaroon-check vectors`), which this module decodes, verifies and re-encodes
byte for byte in every run; and where that program is built (scripts/install-test-tools, marker
`macaroon_go`), it verifies the tokens this gateway mints and narrows.

Through a real gateway in front of the dev sandbox holding the root key: each forwarded request
carries a macaroon narrowed to its app, and a route map broken on purpose (the app read from the
wrong path segment) is refused by the sandbox because the macaroon names the other app.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core.keyring import Keyring
from gateway.dev.sandbox import SANDBOX_ORG_SLUG, create_sandbox_app
from gateway.dev.sandbox_macaroon import RequireMacaroon, issue, new_root_key
from gateway.errors import ConfigError
from gateway.services import Services
from gateway.upstream import macaroon
from gateway.upstream.attenuation import root_macaroon
from gateway.upstream.macaroon import MacaroonError
from tests.conftest import CREDENTIAL_ENV, REPO, RunningGateway, write_config
from tests.contract.flyctl import Recorder
from tests.servers import ServerThread

VECTORS = json.loads((REPO / "tests/data/macaroon_vectors.json").read_text())
KEY = bytes.fromhex(VECTORS["key"])
GO_CHECK = Path(os.environ.get("MACAROON_CHECK", REPO / ".tools/bin/macaroon-check"))
PY_CAVEATS = {  # the caveats of the vectors, built by this module
    "apps-one": [macaroon.apps({123: macaroon.READ})],
    "apps-many": [macaroon.apps({70000: macaroon.ALL_ACTIONS, 5: macaroon.READ | macaroon.WRITE,
                                 4294967296: macaroon.DELETE})],
    "validity": [macaroon.validity_window(1796688000, 1796688300)],
    "mutations": [macaroon.mutations(["setSecrets", "createRelease"])],
    "apps-and-window": [macaroon.apps({7: macaroon.ALL_ACTIONS}), macaroon.validity_window(0, 1796688300)],
}


# --- the wire format, against Fly's Go library ------------------------------------------------

@pytest.mark.parametrize("vector", VECTORS["tokens"], ids=lambda v: v["name"])
def test_go_minted_tokens_decode_verify_and_reencode_byte_for_byte(vector: dict[str, Any]) -> None:
    token = macaroon.decode(vector["token"])
    caveats = macaroon.verify(token, KEY)
    assert token.kid == bytes.fromhex(VECTORS["kid"]) and token.location == VECTORS["location"]
    assert macaroon.encode(token) == vector["token"]
    packer = msgpack.Packer()
    assert packer.pack_array_header(2 * len(caveats)) + b"".join(c.raw[1:] for c in caveats) == \
        bytes.fromhex(vector["packed"])
    assert [c.type for c in caveats] == [{"Apps": 3, "ValidityWindow": 4, "Mutations": 6, "Organization": 0,
                                          "IfPresent": 13}[c["type"]] for c in vector["caveats"]]
    if vector["name"] in PY_CAVEATS:  # built here, the same bytes as Go's encoder made
        assert [c.raw for c in PY_CAVEATS[vector["name"]]] == [c.raw for c in caveats]
    with pytest.raises(MacaroonError, match="does not verify"):
        macaroon.verify(token, bytes(32))


@pytest.mark.parametrize("vector", [v for v in VECTORS["attenuation"] if v["name"] in PY_CAVEATS],
                         ids=lambda v: v["name"])
def test_attenuating_here_gives_the_bytes_go_gives(vector: dict[str, Any]) -> None:
    narrowed = macaroon.attenuate(macaroon.decode(vector["base"]), *PY_CAVEATS[vector["name"]])
    assert macaroon.encode(narrowed) == vector["result"]
    macaroon.verify(narrowed, KEY)


def test_caveats_cannot_be_dropped_or_changed() -> None:
    narrowed = macaroon.decode(next(v["result"] for v in VECTORS["attenuation"] if v["name"] == "apps-one"))
    dropped = macaroon.Macaroon(narrowed.nonce, narrowed.kid, narrowed.proof, narrowed.location,
                                narrowed.caveats[:-1], narrowed.tail)
    changed = macaroon.Macaroon(narrowed.nonce, narrowed.kid, narrowed.proof, narrowed.location,
                                (*narrowed.caveats[:-1], macaroon.apps({124: macaroon.READ})), narrowed.tail)
    for forged in (dropped, changed):
        with pytest.raises(MacaroonError, match="does not verify"):
            macaroon.verify(macaroon.decode(macaroon.encode(forged)), KEY)


@pytest.mark.parametrize(("token", "named"), [
    pytest.param("sgt_abc", "fm2_", id="not-fm2"),
    pytest.param("fm2_!!!", "base64", id="not-base64"),
    pytest.param("fm2_" + base64.b64encode(b"\x93\x01\x02\x03").decode(), "array of 4", id="three-fields"),
    pytest.param("fm2_" + base64.b64encode(b"\x94\x92").decode(), "truncated", id="truncated"),
    pytest.param(VECTORS["tokens"][0]["token"][:-4] + "AA==", "does not verify", id="bad-tail"),
])
def test_malformed_macaroons_are_refused_naming_why(token: str, named: str) -> None:
    with pytest.raises(MacaroonError, match=named):
        macaroon.verify(macaroon.decode(token), KEY)


def test_a_credential_that_cannot_be_narrowed_stops_the_start() -> None:
    with pytest.raises(ConfigError, match="needs a Fly macaroon"):
        root_macaroon("an-opaque-api-token")
    with pytest.raises(ConfigError, match="discharge"):
        root_macaroon("FlyV1 fm2_aaaa,fm2_bbbb")
    third_party = macaroon.mint(KEY, b"k", "loc", macaroon.caveat(macaroon.THIRD_PARTY, [b"x", b"y", "loc"]))
    with pytest.raises(ConfigError, match="third-party caveat"):
        root_macaroon(macaroon.encode(third_party))
    assert root_macaroon("FlyV1 " + VECTORS["tokens"][0]["token"]).kid == bytes.fromhex(VECTORS["kid"])


@pytest.mark.macaroon_go
def test_flys_go_library_verifies_what_the_gateway_mints_and_narrows() -> None:
    if not GO_CHECK.exists():
        pytest.fail(f"{GO_CHECK} is missing: run scripts/install-test-tools (it builds tests/macaroon_go "
                    "where the Go module proxy serves github.com/superfly/macaroon), or set MACAROON_CHECK")
    root = macaroon.mint(KEY, b"\x01\x02\x03", "https://api.fly.io/")
    tokens = [macaroon.encode(macaroon.attenuate(root, *caveats)) for caveats in PY_CAVEATS.values()]
    tokens.append(macaroon.encode(macaroon.attenuate(root, macaroon.apps({1: 1}))).replace("fm2_", "fm2_A", 1))
    done = subprocess.run([str(GO_CHECK), "verify", KEY.hex()], input="\n".join(tokens), capture_output=True,
                          text=True, timeout=30, check=True)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert all("error" not in r for r in results[:-1]), results
    assert "error" in results[-1]
    assert [[c["type"] for c in r["caveats"]] for r in results[:2]] == [["Apps"], ["Apps"]]
    assert results[1]["caveats"][0]["body"]["apps"] == {"5": "rw", "70000": "rwcdC", "4294967296": "d"}


# --- through the gateway, in front of the sandbox holding the root key -------------------------

@dataclass
class Attenuated:
    gateway: RunningGateway
    recorder: Recorder
    key: bytes


def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes: Path | None = None) -> Iterator[Attenuated]:
    key = new_root_key()
    sandbox = create_sandbox_app(macaroon_key=key)
    recorder = Recorder(sandbox)
    upstream = ServerThread(recorder).start()
    monkeypatch.setenv(CREDENTIAL_ENV, issue(key))
    sections: dict[str, Any] = {"upstream": {"auth_scheme": "FlyV1", "attenuate": "apps",
                                             "graphql_url": f"{upstream.url}/graphql", "api_url": upstream.url,
                                             "org_slug": SANDBOX_ORG_SLUG}}
    path = write_config(tmp_path, upstream.url, **sections)
    if routes is not None:  # write_config merges sections; `routes` is a top-level list
        document = yaml.safe_load(path.read_text())
        document["routes"] = [str(routes)]
        path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    Keyring.generate(config.tokens_keyring).save()
    services = Services.build(config)
    server = ServerThread(GatewayApp(services), gateway_stack=True).start()
    try:
        yield Attenuated(RunningGateway(config, services, server, None, tmp_path / "audit.jsonl"),  # type: ignore[arg-type]
                         recorder, key)
    finally:
        server.stop()
        upstream.stop()


@pytest.fixture
def attenuated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Attenuated]:
    yield from start(tmp_path, monkeypatch)


def caveats_of(authorization: str, key: bytes) -> list[tuple[int, Any]]:
    scheme, _, token = authorization.partition(" ")
    assert scheme == "FlyV1"
    return [(c.type, c.body) for c in macaroon.verify(macaroon.decode(token), key)]


def test_each_request_carries_a_macaroon_narrowed_to_its_app(attenuated: Attenuated) -> None:
    deployer = attenuated.gateway.mint("deployer@app:web-staging")
    sandbox = attenuated.recorder.app.state.sandbox  # type: ignore[attr-defined]
    staging_id = sandbox.apps["web-staging"].internal_numeric_id
    with attenuated.gateway.client() as client:
        auth = {"Authorization": f"Bearer {deployer}"}
        listed = client.get("/v1/apps/web-staging/machines", headers=auth)
        created = client.post("/v1/apps/web-staging/machines", headers=auth,
                              json={"config": {"image": "registry.fly.io/web-staging:v9"}})
        again = client.get("/v1/apps/web-staging/machines", headers=auth)
        apps = client.get("/v1/apps", params={"org_slug": "personal"}, headers=auth)
    assert listed.status_code == 200 and again.status_code == 200, listed.text
    assert created.status_code == 200, created.text
    assert apps.status_code == 200 and [a["name"] for a in apps.json()["apps"]] == ["web-staging"]
    forwarded = {(c.method, c.path): c.authorization for c in attenuated.recorder.calls}
    read = caveats_of(forwarded[("GET", "/v1/apps/web-staging/machines")], attenuated.key)
    write = caveats_of(forwarded[("POST", "/v1/apps/web-staging/machines")], attenuated.key)
    org = caveats_of(forwarded[("GET", "/v1/apps")], attenuated.key)
    assert read[0] == (macaroon.APPS, [{staging_id: macaroon.READ}]) and read[1][0] == macaroon.VALIDITY_WINDOW
    assert write[0] == (macaroon.APPS, [{staging_id: macaroon.ALL_ACTIONS}])
    assert [t for t, _ in org] == [macaroon.VALIDITY_WINDOW]  # org-level: the window only
    not_before, not_after = read[1][1]
    assert 0 < not_after - not_before <= 300 + 60
    # The app's id was asked once, with the gateway's own credential; nothing else reached the sandbox.
    lookups = [c for c in attenuated.recorder.calls if (c.method, c.path) == ("GET", "/v1/apps/web-staging")]
    assert len(lookups) == 1


def test_graphql_mutations_are_confined_to_exactly_the_mutations_authorized(attenuated: Attenuated) -> None:
    deployer = attenuated.gateway.mint("deployer@app:web-staging")
    mutation = {"query": "mutation($input: SetSecretsInput!) { setSecrets(input: $input) { release { id } } }",
                "variables": {"input": {"appId": "web-staging", "secrets": [{"key": "A", "value": "b"}]}}}
    query = {"query": 'query { app(name: "web-staging") { name } }'}
    with attenuated.gateway.client() as client:
        auth = {"Authorization": f"Bearer {deployer}"}
        mutated = client.post("/graphql", headers=auth, json=mutation)
        queried = client.post("/graphql", headers=auth, json=query)
    calls = [c for c in attenuated.recorder.calls if c.path == "/graphql"]
    assert [c.status for c in calls] == [200, 200], (mutated.text, queried.text)  # the sandbox accepted both
    assert caveats_of(calls[0].authorization, attenuated.key)[0] == (macaroon.MUTATIONS, [["setSecrets"]])
    assert [t for t, _ in caveats_of(calls[1].authorization, attenuated.key)] == [macaroon.VALIDITY_WINDOW]
    assert queried.json()["data"]["app"]["name"] == "web-staging"
    # The sandbox holds a Mutations caveat to its names: another mutation, or a query, is refused.
    narrowed = macaroon.decode(calls[0].authorization.partition(" ")[2])
    guard = RequireMacaroon(lambda *a: None, attenuated.key, {}.get)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/graphql",
             "headers": [(b"authorization", f"FlyV1 {macaroon.encode(narrowed)}".encode())]}
    other = json.dumps({"query": "mutation { deleteApp(appId: \"web-staging\") { organization { id } } }"}).encode()
    assert "does not allow deleteApp" in str(guard.problem(scope, other))
    assert "runs something else" in str(guard.problem(scope, json.dumps(query).encode()))
    assert guard.problem(scope, json.dumps(mutation).encode()) is None


def test_a_body_mixing_mutations_and_queries_is_refused_under_attenuation(attenuated: Attenuated) -> None:
    # Red-team finding: with operationName picking the mutation, a mixed document went up with the
    # window only, the organization's whole power. One credential per body: mixed bodies are refused.
    deployer = attenuated.gateway.mint("deployer@app:web-staging")
    mixed: dict[str, Any] = {
        "query": 'mutation M($input: SetSecretsInput!) { setSecrets(input: $input) { release { id } } } '
                 'query Q { app(name: "web-staging") { name } }',
        "operationName": "M",
        "variables": {"input": {"appId": "web-staging", "secrets": [{"key": "A", "value": "b"}]}}}
    batch = [{"query": mixed["query"].split(" query Q")[0], "variables": mixed["variables"]},
             {"query": 'query { app(name: "web-staging") { name } }'}]
    before = len(attenuated.recorder.calls)
    with attenuated.gateway.client() as client:
        auth = {"Authorization": f"Bearer {deployer}"}
        answers = [client.post("/graphql", headers=auth, json=body) for body in (mixed, batch)]
    # GraphQL refusals are HTTP 200 (flyctl reads `errors` only from a 200), their status inside.
    errors = [answer.json()["errors"][0] for answer in answers]
    assert [e["extensions"]["status"] for e in errors] == [400, 400], errors
    assert all("not both" in e["message"] for e in errors)
    assert [c for c in attenuated.recorder.calls[before:] if c.path == "/graphql"] == []


def test_the_sandbox_reads_mutations_through_fragments_and_refuses_odd_caveat_bodies() -> None:
    key = new_root_key()
    guard = RequireMacaroon(lambda *a: None, key, {"web-staging": 11}.get)  # type: ignore[arg-type]
    root = macaroon.mint(key, b"k", "loc")

    def problem(token: macaroon.Macaroon, path: str, body: bytes = b"", method: str = "POST") -> str | None:
        return guard.problem({"type": "http", "method": method, "path": path,
                              "headers": [(b"authorization", f"FlyV1 {macaroon.encode(token)}".encode())]}, body)

    only_secrets = macaroon.attenuate(root, macaroon.mutations(["setSecrets"]))
    spread = {"query": "mutation { ...F } fragment F on Mutations { deleteApp(appId: \"x\") { organization { id } } }"}
    inline = {"query": "mutation { ... on Mutations { deleteApp(appId: \"x\") { organization { id } } } }"}
    for body in (spread, inline):
        assert "does not allow deleteApp" in str(problem(only_secrets, "/graphql", json.dumps(body).encode()))
    odd = macaroon.attenuate(root, macaroon.caveat(macaroon.APPS, [[1, 2]]))
    assert "cannot read" in str(problem(odd, "/v1/apps/web-staging/machines", method="GET"))


def test_a_macaroon_with_unhashable_map_keys_is_a_clear_error() -> None:
    # Found by fuzzing: an Apps map keyed by a list raised TypeError out of the decoder.
    packed = msgpack.packb([[b"k", b"r" * 16], "loc", [3, [{1: 1}]], b"t" * 32], use_bin_type=True)
    assert b"\x81\x01\x01" in packed
    listed_key = packed.replace(b"\x81\x01\x01", b"\x81\x91\x01\x01", 1)  # {[1]: 1}
    with pytest.raises(MacaroonError, match="not valid MessagePack"):
        macaroon.decode("fm2_" + base64.b64encode(listed_key).decode())


def test_a_mismapped_request_is_refused_by_the_upstream_itself(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A route map broken on purpose: Machines_show reads the app from the machine id segment, so
    # GET /v1/apps/web-prod/machines/web-staging is authorized as a request on web-staging.
    document = yaml.safe_load((REPO / "policies/routes/fly-machines.yaml").read_text())
    for route in document["routes"]:
        if route["operation"] == "Machines_show":
            route["app"] = "path:machine_id"
    broken = tmp_path / "broken-routes.yaml"
    broken.write_text(yaml.safe_dump(document))
    for attenuated in start(tmp_path, monkeypatch, routes=broken):
        staging = attenuated.gateway.mint("deployer@app:web-staging")
        with attenuated.gateway.client() as client:
            answer = client.get("/v1/apps/web-prod/machines/web-staging",
                                headers={"Authorization": f"Bearer {staging}"})
        assert answer.status_code == 401, answer.text
        assert "does not include app web-prod" in answer.text
        call = next(c for c in attenuated.recorder.calls if c.path == "/v1/apps/web-prod/machines/web-staging")
        assert call.status == 401


def test_dev_sandbox_refuses_the_gateways_credential_without_caveats_on_a_confined_request() -> None:
    # The sandbox is the check: a macaroon for another app, an expired window, or another key fail.
    key = new_root_key()
    guard = RequireMacaroon(lambda *a: None, key, {"web-staging": 11, "web-prod": 22}.get)  # type: ignore[arg-type]
    root = macaroon.mint(key, b"k", "loc")

    def scope(path: str, token: macaroon.Macaroon, method: str = "GET") -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path,
                "headers": [(b"authorization", f"FlyV1 {macaroon.encode(token)}".encode())]}

    staging = macaroon.attenuate(root, macaroon.apps({11: macaroon.READ}))
    assert guard.problem(scope("/v1/apps/web-staging/machines", staging), b"") is None
    assert "does not include app web-prod" in str(guard.problem(scope("/v1/apps/web-prod/machines", staging), b""))
    assert "does not allow POST" in str(guard.problem(scope("/v1/apps/web-staging/machines", staging, "POST"), b""))
    assert "names none" in str(guard.problem(scope("/v1/apps", staging), b""))
    expired = macaroon.attenuate(root, macaroon.validity_window(1, 2))
    assert "validity window" in str(guard.problem(scope("/v1/apps", expired), b""))
    foreign = macaroon.mint(new_root_key(), b"k", "loc")
    assert "does not verify" in str(guard.problem(scope("/v1/apps", foreign), b""))
    assert guard.problem(scope("/v1/apps", root), b"") is None

