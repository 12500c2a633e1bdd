"""Request-target attacks through a running gateway (DESIGN section 6).

The token covers only `web-staging`; every target tries to reach `web-prod` (or to make the app
mean something else to the upstream than to the gateway). A refusal is a 400 before any matching
(or the server's own 400 for bytes HTTP/1.1 does not allow in a request line), and nothing is
forwarded. What is accepted is forwarded byte for byte: the raw path and query that were
authorized, nothing re-encoded or normalized. Targets are sent as raw bytes: an HTTP client
would normalize most of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.surfaces.paths import MAX_PATH_BYTES, MAX_QUERY_BYTES
from tests.conftest import RunningGateway
from tests.security.harness import (
    assert_forwarded_exactly,
    assert_refused,
    audit_record,
    request,
    reset,
    running_gateway,
    send,
)

GRANT = "admin@app:web-staging"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-paths")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint(GRANT, name="paths")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


# (name, method, raw target, status, gateway error code or None for the HTTP server's own 400)
REFUSED: list[tuple[str, str, bytes, int, str | None]] = [
    # dot segments, raw and encoded
    ("raw dot-dot to another app", "GET", b"/v1/apps/web-staging/../web-prod/machines", 400, "bad_request"),
    ("raw dot-dot at the end", "DELETE", b"/v1/apps/web-prod/machines/m1/..", 400, "bad_request"),
    ("raw dot segment", "GET", b"/v1/apps/web-staging/./machines", 400, "bad_request"),
    ("encoded dot-dot lower", "GET", b"/v1/apps/web-staging/%2e%2e/web-prod/machines", 400, "bad_request"),
    ("encoded dot-dot upper", "GET", b"/v1/apps/web-staging/%2E%2E/web-prod/machines", 400, "bad_request"),
    ("half-encoded dot-dot", "GET", b"/v1/apps/web-staging/.%2e/web-prod/machines", 400, "bad_request"),
    ("dot-dot after a machine id", "GET", b"/v1/apps/web-staging/machines/m1/../../../web-prod/machines", 400,
     "bad_request"),
    # encoded separators and double encoding
    ("encoded slash lower", "GET", b"/v1/apps/web-staging%2f..%2fweb-prod/machines", 400, "bad_request"),
    ("encoded slash upper", "GET", b"/v1/apps/web-prod%2Fmachines", 400, "bad_request"),
    ("double-encoded slash", "GET", b"/v1/apps/web-staging%252f..%252fweb-prod/machines", 400, "bad_request"),
    ("double-encoded dot", "GET", b"/v1/apps/web-staging/%252e%252e/web-prod", 400, "bad_request"),
    ("encoded backslash", "GET", b"/v1/apps/web-staging%5c..%5cweb-prod", 400, "bad_request"),
    ("IIS %u escape", "GET", b"/v1/apps/web-staging%u002f..%u002fweb-prod", 400, "bad_request"),
    ("overlong UTF-8 slash", "GET", b"/v1/apps/web-staging%c0%af..%c0%afweb-prod", 400, "bad_request"),
    # empty segments and trailing slash
    ("double slash inside", "GET", b"/v1//apps/web-prod/machines", 400, "bad_request"),
    ("double slash before the app", "GET", b"/v1/apps//web-prod", 400, "bad_request"),
    ("trailing slash", "GET", b"/v1/apps/web-staging/", 400, "bad_request"),
    ("only slashes after apps", "GET", b"/v1/apps///", 400, "bad_request"),
    # path parameters and backslashes
    ("semicolon parameter in the app", "GET", b"/v1/apps/web-staging;/../web-prod/machines", 400, "bad_request"),
    ("semicolon parameter naming another app", "GET", b"/v1/apps/web-prod;app=web-staging", 400, "bad_request"),
    ("raw backslash traversal", "GET", b"/v1/apps/web-staging\\..\\web-prod", 400, "bad_request"),
    # NUL and control bytes
    ("encoded NUL", "GET", b"/v1/apps/web-prod%00.web-staging", 400, "bad_request"),
    ("encoded CR LF", "GET", b"/v1/apps/web-staging%0d%0aX-Injected:%201/machines", 400, "bad_request"),
    ("encoded DEL", "GET", b"/v1/apps/web-staging%7f", 400, "bad_request"),
    ("raw NUL", "GET", b"/v1/apps/web-prod\x00/machines", 400, None),
    ("raw TAB", "GET", b"/v1/apps/web-prod\t/machines", 400, None),
    ("raw DEL", "GET", b"/v1/apps/web-prod\x7f/machines", 400, None),
    # unicode lookalikes
    ("raw UTF-8 hyphen lookalike", "GET", b"/v1/apps/web\xe2\x80\x90prod", 400, None),
    ("raw UTF-8 Cyrillic e", "GET", b"/v1/apps/w\xd0\xb5b-prod", 400, None),
    ("raw fullwidth solidus", "GET", b"/v1/apps/web-staging\xef\xbc\x8f..\xef\xbc\x8fweb-prod", 400, None),
    ("encoded fullwidth solidus", "GET", b"/v1/apps/web-staging%EF%BC%8F..%EF%BC%8Fweb-prod", 400, "bad_request"),
    ("encoded Cyrillic e", "GET", b"/v1/apps/w%D0%B5b-prod", 400, "bad_request"),
    # plain characters hidden behind escapes, and names no Fly app can have
    ("encoded letter in the app", "GET", b"/v1/apps/web-pro%64/machines", 400, "bad_request"),
    ("upper-case app name", "GET", b"/v1/apps/WEB-STAGING/machines", 400, "bad_request"),
    ("encoded space before the app", "GET", b"/v1/apps/%20web-prod", 400, "bad_request"),
    ("encoded hash in the app", "GET", b"/v1/apps/web-staging%23/machines", 400, "bad_request"),
    ("encoded question mark in the app", "GET", b"/v1/apps/web-prod%3F.web-staging/machines", 400, "bad_request"),
    # request-target forms
    ("absolute-form http", "GET", b"http://127.0.0.1/v1/apps/web-staging/machines", 400, "bad_request"),
    ("absolute-form https naming the upstream", "GET", b"https://api.machines.dev/v1/apps/web-prod", 400,
     "bad_request"),
    ("asterisk-form", "OPTIONS", b"*", 400, "bad_request"),
    ("fragment after the path", "GET", b"/v1/apps/web-staging#/../../web-prod", 400, "bad_request"),
    ("fragment after the query", "GET", b"/v1/apps/web-staging/secrets?x=1#show_secrets=true", 400,
     "bad_request"),
    ("empty fragment after the query", "GET", b"/v1/apps/web-staging/secrets/K?show_secrets=true#", 400,
     "bad_request"),
    # sizes
    ("overlong path", "GET", b"/v1/apps/web-staging/machines/" + b"a" * MAX_PATH_BYTES, 400, "bad_request"),
    ("overlong query", "GET", b"/v1/apps/web-staging/machines?a=" + b"b" * MAX_QUERY_BYTES, 400, "bad_request"),
    # other shapes of another app
    ("missing /v1 prefix", "GET", b"/apps/web-prod", 403, "unknown_route"),
    ("upper-case V1", "GET", b"/V1/apps/web-prod", 403, "unknown_route"),
    ("another app in the path, plainly", "GET", b"/v1/apps/web-prod/machines", 403, "forbidden"),
    ("another app with this app in the query", "GET", b"/v1/apps/web-prod/machines?app=web-staging", 403,
     "forbidden"),
]


@pytest.mark.parametrize(("name", "method", "target", "status", "error"), REFUSED, ids=[c[0] for c in REFUSED])
def test_ambiguous_or_foreign_target_is_refused(name: str, method: str, target: bytes, status: int,
                                                 error: str | None, token: str, gw: RunningGateway) -> None:
    answer = send(gw, request(method, target, token=token))
    assert_refused(gw, answer, status, error)


# (name, method, raw path, raw query): accepted, and forwarded exactly as sent
FORWARDED: list[tuple[str, str, bytes, bytes]] = [
    ("plain", "GET", b"/v1/apps/web-staging/machines", b""),
    ("question mark trick: the rest is a query", "GET", b"/v1/apps/web-staging", b"/../web-prod"),
    ("another app named in the query", "GET", b"/v1/apps/web-staging/machines", b"app_name=web-prod"),
    ("encoded slash in the query", "GET", b"/v1/apps/web-staging/machines", b"x=%2F..%2Fweb-prod"),
    ("double encoding in the query", "GET", b"/v1/apps/web-staging/machines", b"x=%252f"),
    ("encoded plus in a metadata key", "GET", b"/v1/apps/web-staging/machines/m1/metadata/a%2Bb", b""),
    ("encoded colon in a metadata key", "DELETE", b"/v1/apps/web-staging/machines/m1/metadata/a%3Ab", b""),
    ("ipv6 address segment", "DELETE", b"/v1/apps/web-staging/ip_assignments/fdaa:0:1::3", b""),
    ("show_secrets false stays a listing", "GET", b"/v1/apps/web-staging/secrets", b"show_secrets=false"),
]


@pytest.mark.parametrize(("name", "method", "path", "query"), FORWARDED, ids=[c[0] for c in FORWARDED])
def test_unambiguous_target_is_forwarded_byte_for_byte(name: str, method: str, path: bytes, query: bytes, token: str,
                                                       gw: RunningGateway) -> None:
    answer = send(gw, request(method, path + (b"?" + query if query else b""), token=token))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method=method, raw_path=path, query=query, client_tokens=[token])
    record = audit_record(gw, answer)
    assert record["app"] == "web-staging"
    assert record["decision"] == "allow"
