"""Method tricks: overrides, methods the route map does not know, and spellings HTTP does not allow.

The route map matches method + path template; anything else is `unknown_route` (403) once the
caller is authenticated, and method names are case-sensitive (RFC 9110 section 9.1), so `get` is
not GET: the server refuses it as a malformed request line. Override headers are dropped, so the
upstream always performs the method that was authorized.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway
from tests.security.harness import (
    assert_forwarded_exactly,
    assert_refused,
    request,
    reset,
    running_gateway,
    send,
)

APP = b"/v1/apps/web-staging"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-methods")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint("viewer@app:web-staging", "operator@app:web-staging", name="methods")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


# (name, method, target, send a token, status, error code or None for the server's own 400)
REFUSED: list[tuple[str, bytes, bytes, bool, int, str | None]] = [
    ("lower-case get", b"get", APP, True, 400, None),
    ("mixed-case Get", b"Get", APP, True, 400, None),
    ("lower-case delete", b"delete", APP, True, 400, None),
    ("unknown method FOO", b"FOO", APP, True, 400, None),
    ("method with a trailing tab", b"GET\t", APP, True, 400, None),
    ("PROPFIND", b"PROPFIND", APP, True, 403, "unknown_route"),
    ("TRACE", b"TRACE", APP, True, 403, "unknown_route"),
    ("TRACE without a token", b"TRACE", APP, False, 401, "unauthenticated"),
    ("CONNECT with a path", b"CONNECT", APP, True, 403, "unknown_route"),
    ("CONNECT authority-form to the upstream", b"CONNECT", b"api.machines.dev:443", True, 400, None),
    ("HEAD on an app", b"HEAD", APP, True, 403, None),
    ("OPTIONS on an app", b"OPTIONS", APP, True, 403, "unknown_route"),
    ("PATCH on an app", b"PATCH", APP, True, 403, "unknown_route"),
    ("PUT on a machine (not a route)", b"PUT", APP + b"/machines/m1", True, 403, "unknown_route"),
    ("POST a machine update without deploy rights", b"POST", APP + b"/machines/m1", True, 403, "forbidden"),
    ("DELETE an app with a viewer token", b"DELETE", APP, True, 403, "forbidden"),
    ("POST to a GET-only route", b"POST", APP + b"/machines/m1/events", True, 403, "unknown_route"),
]


@pytest.mark.parametrize(("name", "method", "target", "with_token", "status", "error"), REFUSED,
                         ids=[c[0] for c in REFUSED])
def test_method_outside_the_route_map_is_refused(name: str, method: bytes, target: bytes, with_token: bool,
                                                 status: int, error: str | None, token: str,
                                                 gw: RunningGateway) -> None:
    answer = send(gw, request(method, target, token=token if with_token else None))
    assert_refused(gw, answer, status, error)
    if method == b"HEAD":
        assert answer.body == b""


OVERRIDES = [b"X-HTTP-Method-Override", b"X-Method-Override", b"X-HTTP-Method", b"x-http-method-override"]


@pytest.mark.parametrize("header", OVERRIDES, ids=[h.decode() for h in OVERRIDES])
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", APP + b"/machines/m1", None),
    ("POST", APP + b"/machines/m1/stop", b"{}"),
], ids=["GET overridden to DELETE", "POST stop overridden to DELETE"])
def test_method_override_header_is_dropped(header: bytes, method: str, path: bytes, body: bytes | None, token: str,
                                           gw: RunningGateway) -> None:
    answer = send(gw, request(method, path, token=token, body=body, headers=[(header, b"DELETE")]))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method=method, raw_path=path, body=body or b"", client_tokens=[token])
    names = {name.lower() for name, _ in got.headers}
    assert not names & {b"x-http-method-override", b"x-method-override", b"x-http-method"}
    assert b"DELETE" not in b"".join(value for _, value in got.headers)
