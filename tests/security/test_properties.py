"""Properties of the canonicalizer and route resolver, offline and through a running gateway.

The one that matters: for every request the gateway forwards, the app the upstream acts on is the
app that was authorized. "The app the upstream acts on" is read the way a Go server reads the
forwarded path: `url.PathUnescape`, then (ServeMux) `path.Clean`, then the segment after
`/v1/apps/`, and also straight from the raw segments; both readings must agree and equal the
authorized app. Through the gateway the token covers only `web-staging`, so any forwarded request
whose path a Go server would read as another app is a smuggle. `tests/test_paths.py` checks the
raw-segment equality offline; this adds Go's decoding, Go's cleaning, and the running gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest, Forbidden, UnknownRoute
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request
from tests.conftest import RunningGateway
from tests.security.harness import (
    assert_forwarded_exactly,
    audit_record,
    go_app_of,
    request,
    reset,
    running_gateway,
    send,
)

REPO = Path(__file__).resolve().parents[2]
TABLE = RouteTable.load([REPO / "policies/routes/fly-machines.yaml"])
APP_ROUTES = [r for r in TABLE.routes if r.app_source == "path"]
OFFLINE = settings(max_examples=500, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
THROUGH_GATEWAY = settings(max_examples=300, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# What an attacker splices into the app segment (and elsewhere) to change its meaning downstream.
PIECES = ["web-staging", "web-prod", "web", "-prod", "staging", "a", "0", ".", "..", "/", "//", "\\", ";", "?", "#",
          "%", "%2f", "%2F", "%2e", "%2E", "%252f", "%5c", "%3b", "%3f", "%3F", "%23", "%20", "%00", "%0a", "%77",
          "%41", "%2d", "%c0%af", "%ef%bc%8f", "%u002f", ":", "@", "~", "_", "+", "&", "=", "A", " ", "\t", "\u00e9"]
segment = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join)
QUERIES = [b"", b"app_name=web-prod", b"show_secrets=true", b"x=%2F..%2Fweb-prod", b"a=b&c", b"/../web-prod"]


@st.composite
def targets(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and raw target built from a route template, the app segment often tampered with."""
    route = draw(st.sampled_from(APP_ROUTES))
    parts: list[str] = []
    for literal, param in zip(route.segments, route.params, strict=True):
        if literal is not None:
            parts.append(literal)
        elif param == route.app_fields[0]:
            parts.append(draw(st.one_of(st.just("web-staging"), segment,
                                        st.builds(lambda a, b: a + b, st.sampled_from(["web-staging", "web-prod"]),
                                                  segment))))
        else:
            parts.append(draw(st.one_of(st.just("m1"), segment)))
    raw = ("/" + "/".join(parts)).encode("utf-8")
    query = draw(st.sampled_from(QUERIES))
    return route.method, raw + (b"?" + query if query else b"")


# --- offline: canonicalize + resolve, read the Go way ------------------------------------------

@OFFLINE
@example(request=("GET", b"/v1/apps/web-staging%2f..%2fweb-prod/machines"))
@example(request=("GET", b"/v1/apps/web-staging/..%2fweb-prod"))
@example(request=("GET", b"/v1/apps/web%2dprod/machines"))
@example(request=("GET", b"/v1/apps/web-staging?/../web-prod"))
@example(request=("GET", b"/v1/apps/web-staging?"))  # a bare '?' is forwarded as received
@given(request=targets())
def test_resolved_app_is_the_app_a_go_upstream_reads(request: tuple[str, bytes]) -> None:
    method, raw_target = request
    raw_path, mark, raw_query = raw_target.partition(b"?")
    try:
        target = canonicalize(raw_path, raw_query, has_query=bool(mark))
        resolved = resolve_request(TABLE.resolve(method, target.path), target.raw_query, None)
    except (BadRequest, UnknownRoute, Forbidden):
        return
    assert resolved.app is not None
    assert go_app_of(target.raw_path) == resolved.app.encode("ascii")
    assert target.forward_target == raw_target


# --- through a running gateway --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-properties")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint("admin@app:web-staging", name="properties")


@THROUGH_GATEWAY
@example(target=("GET", b"/v1/apps/web-staging/machines"))
@example(target=("GET", b"/v1/apps/web-staging/../web-prod/machines"))
@example(target=("GET", b"/v1/apps/web-staging;/../web-prod"))
@example(target=("DELETE", b"/v1/apps/web-staging/machines/m1%2f..%2f..%2fweb-prod"))
@example(target=("GET", b"/v1/apps/web-staging?"))
@example(target=("GET", b"/v1/apps/web-staging "))  # "GET /... <SP><SP>HTTP/1.1": the target ends at the space
@given(target=targets())
def test_every_forwarded_request_acts_on_the_authorized_app(target: tuple[str, bytes], shared: RunningGateway,
                                                            token: str) -> None:
    reset(shared)
    method, raw_target = target
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    answer = send(shared, request(method, raw_target, token=token, body=body))
    received = shared.upstream.received
    if answer.status != 200:
        assert answer.status in (400, 403, 404, 405, 413), answer.status
        assert received == [], (method, raw_target, answer.status)
        return
    # A space or tab ends the request target on the request line (the HTTP parser reads the rest as
    # separator): what was authorized and forwarded is the target up to it.
    sent_target = raw_target.split(b" ")[0].split(b"\t")[0]
    raw_path, _, raw_query = sent_target.partition(b"?")
    assert_forwarded_exactly(shared, method=method, raw_path=raw_path, query=raw_query, body=body or b"",
                             client_tokens=[token])
    assert go_app_of(received[0].raw_path) == b"web-staging", raw_target
    record = audit_record(shared, answer)
    assert record["app"] == "web-staging"

