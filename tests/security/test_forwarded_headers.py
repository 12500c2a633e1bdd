"""What the gateway asserts, it sets: request headers reach the upstream by allow-list, per surface
(issue 15, class 4).

A client that sends its own `Fly-Client-IP`, `True-Client-IP`, `Fly-Prefer-Region`,
`Fly-Force-Instance-Id`, ... could make the upstream log another address or route the request to
an instance of its choosing. Each surface (Machines API, GraphQL, REST, registry) forwards only
the headers on its list (SECURITY.md); the gateway sets X-Forwarded-For/-Proto/-Host, X-Request-Id
and Authorization itself. Every case runs the real gateway in front of one recording upstream that
stands in for all four APIs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from gateway.surfaces.graphql.surface import GRAPHQL_HEADERS
from gateway.surfaces.machines.surface import MACHINES_HEADERS
from gateway.surfaces.registry.surface import REGISTRY_HEADERS
from gateway.surfaces.rest.surface import REST_HEADERS
from gateway.upstream.client import GATEWAY_SET
from tests.conftest import RunningGateway
from tests.security.harness import CREDENTIAL, INJECTED, request, reset, running_gateway, send
from tests.servers import Received

# Client-IP, routing and re-targeting headers the red team sent, and a few more of the kind.
OFF_THE_LIST = [
    b"Fly-Client-IP", b"True-Client-IP", b"CF-Connecting-IP", b"Client-IP", b"X-Client-IP", b"X-Real-IP",
    b"X-Cluster-Client-IP", b"Forwarded", b"Via", b"Fly-Prefer-Region", b"Fly-Force-Instance-Id", b"fly-force-region",
    b"Fly-Request-Id", b"Fly-Region", b"Cookie", b"X-Original-URL", b"X-Rewrite-URL", b"X-Forwarded-Prefix",
    b"X-HTTP-Method-Override", b"Content-Encoding", b"Origin", b"Referer", b"X-Anything",
]


def value_for(name: bytes) -> bytes:
    """A value the request stays valid with, distinct per header so a mix-up shows."""
    if name == b"content-type":
        return b"application/json"
    if name == b"accept-encoding":
        return b"identity"
    return b"listed-" + name


class Surface:
    def __init__(self, name: str, listed: frozenset[bytes], method: str, target: bytes, body: bytes | None,
                 authorization: str) -> None:
        self.name, self.listed, self.method, self.target, self.body = name, listed, method, target, body
        self.authorization = authorization


GRAPHQL_BODY = json.dumps({"query": '{ app(name: "web-staging") { id } }'}).encode()
SURFACES = [
    Surface("machines", MACHINES_HEADERS, "GET", b"/v1/apps/web-staging/machines", None, INJECTED),
    Surface("graphql", GRAPHQL_HEADERS, "POST", b"/graphql", GRAPHQL_BODY, INJECTED),
    Surface("rest", REST_HEADERS, "GET", b"/api/v1/apps/web-staging/logs", None, INJECTED),
    Surface("registry", REGISTRY_HEADERS, "GET", b"/v2/web-staging/manifests/latest", None,
            "Basic " + base64.b64encode(f"x:{CREDENTIAL}".encode()).decode()),
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-forwarded-headers"),
                         upstream_urls={"graphql_url": "/graphql", "api_url": "", "registry_url": ""}) as running:
        yield running


@pytest.fixture(scope="module")
def token(gateway: RunningGateway) -> str:
    return gateway.mint("viewer@app:web-staging", name="forwarded-headers")


def forward(gateway: RunningGateway, surface: Surface, token: str,
            headers: list[tuple[bytes, bytes]]) -> tuple[Received, str]:
    reset(gateway)
    answer = send(gateway, request(surface.method, surface.target, token=token, headers=headers, body=surface.body))
    assert answer.status == 200, answer.body[:300]
    (received,) = gateway.upstream.received
    assert received.header("authorization") == [surface.authorization]
    assert received.header("x-forwarded-for") == ["127.0.0.1"]
    assert received.header("x-request-id") == [answer.headers["x-request-id"]]
    return received, answer.headers["x-request-id"]


@pytest.mark.parametrize("surface", SURFACES, ids=[s.name for s in SURFACES])
def test_header_off_the_list_never_reaches_the_upstream(surface: Surface, token: str,
                                                        gateway: RunningGateway) -> None:
    sent = [(name, b"6.6.6.6" if b"ip" in name.lower() else b"client-chosen") for name in OFF_THE_LIST]
    received, _ = forward(gateway, surface, token, [*sent, (b"Content-Type", b"application/json")])
    for name in OFF_THE_LIST:
        assert received.header(name.decode()) == [], name
    forwarded = {k for k, _ in received.headers}
    allowed = surface.listed | GATEWAY_SET | {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
    assert forwarded <= allowed, forwarded - allowed


@pytest.mark.parametrize("surface", SURFACES, ids=[s.name for s in SURFACES])
def test_every_listed_header_reaches_the_upstream(surface: Surface, token: str, gateway: RunningGateway) -> None:
    sent = [(name, value_for(name)) for name in sorted(surface.listed)]
    received, _ = forward(gateway, surface, token, sent)
    for name, value in sent:
        assert received.header(name.decode()) == [value.decode()], name


@pytest.mark.parametrize("surface", SURFACES, ids=[s.name for s in SURFACES])
def test_no_surface_lists_a_header_the_gateway_sets(surface: Surface) -> None:
    assert not surface.listed & GATEWAY_SET
    assert all(name == name.lower() for name in surface.listed)
