"""Request-target canonicalization (DESIGN section 6): one meaning per path, or a 400.

Unit cases for `canonicalize`, the same refusals through a real gateway (nothing reaches the
upstream), and Hypothesis properties tying the authorized app to the raw bytes forwarded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest, UnknownRoute
from gateway.surfaces.paths import MAX_PATH_BYTES, MAX_QUERY_BYTES, canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request
from tests.conftest import RunningGateway
from tests.servers import json_body, raw_request

REPO = Path(__file__).resolve().parent.parent
TABLE = RouteTable.load([REPO / "policies/routes/fly-machines.yaml"])
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- canonicalize: unit cases ----------------------------------------------------------------

ACCEPTED: list[tuple[str, bytes, bytes, str]] = [
    ("plain", b"/v1/apps/web/machines", b"", "/v1/apps/web/machines"),
    ("encoded-space-in-key", b"/v1/apps/web/machines/abc/metadata/k%20v", b"",
     "/v1/apps/web/machines/abc/metadata/k v"),
    ("ipv6-ish", b"/v1/apps/web/ip_assignments/fdaa:0:1::3", b"", "/v1/apps/web/ip_assignments/fdaa:0:1::3"),
    ("root", b"/", b"", "/"),
    ("query-kept-raw", b"/v1/apps/web/secrets", b"show_secrets=true&x=%2F%2e%25", "/v1/apps/web/secrets"),
    ("query-with-semicolon", b"/v1/apps", b"org_slug=acme;x", "/v1/apps"),
    ("encoded-reserved", b"/v1/apps/web/machines/abc/metadata/a%3Ab", b"", "/v1/apps/web/machines/abc/metadata/a:b"),
]


@pytest.mark.parametrize(("raw_path", "raw_query", "decoded"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(raw_path: bytes, raw_query: bytes, decoded: str) -> None:
    target = canonicalize(raw_path, raw_query)
    assert target.path == decoded
    assert target.raw_path == raw_path
    assert target.raw_query == raw_query
    assert target.forward_target == raw_path + (b"?" + raw_query if raw_query else b"")


REFUSED: list[tuple[str, bytes, bytes]] = [
    ("dot-dot", b"/v1/apps/web-staging/../web-prod/machines", b""),
    ("dot", b"/v1/apps/web/./machines", b""),
    ("dot-dot-at-end", b"/v1/apps/..", b""),
    ("encoded-dot-dot-lower", b"/v1/apps/web-staging/%2e%2e/web-prod/machines", b""),
    ("encoded-dot-upper", b"/v1/apps/web/%2E/machines", b""),
    ("encoded-dot-in-name", b"/v1/apps/web%2Eprod/machines", b""),
    ("encoded-slash-lower", b"/v1/apps/web%2fprod/machines", b""),
    ("encoded-slash-upper", b"/v1/apps/web%2Fprod/machines", b""),
    ("encoded-backslash", b"/v1/apps/web%5cprod/machines", b""),
    ("double-encoded-slash", b"/v1/apps/web%252fprod/machines", b""),
    ("encoded-percent", b"/v1/apps/web/machines/abc/metadata/a%25", b""),
    ("double-slash", b"/v1/apps//web/machines", b""),
    ("leading-double-slash", b"//v1/apps/web/machines", b""),
    ("trailing-slash", b"/v1/apps/web/machines/", b""),
    ("path-parameter", b"/v1/apps/web/machines;jsessionid=x", b""),
    ("backslash", b"/v1/apps/web\\machines", b""),
    ("nul-raw", b"/v1/apps/web\x00/machines", b""),
    ("nul-encoded", b"/v1/apps/web%00/machines", b""),
    ("control-encoded-lf", b"/v1/apps/web%0a/machines", b""),
    ("control-encoded-del", b"/v1/apps/web%7F/machines", b""),
    ("control-raw-tab", b"/v1/apps/web\t/machines", b""),
    ("control-raw-lf-inside", b"/v1/apps/web\n/machines", b""),
    # A trailing raw control byte is a control byte too (regex `$` also matches before a final "\n").
    ("control-raw-lf-at-end", b"/v1/apps/web\n", b""),
    ("raw-space", b"/v1/apps/web prod/machines", b""),
    ("non-ascii-raw", b"/v1/apps/w\xc3\xa9b/machines", b""),
    ("non-ascii-encoded", b"/v1/apps/w%C3%A9b/machines", b""),
    ("encoded-plain-letter", b"/v1/apps/%77eb/machines", b""),
    ("encoded-plain-digit", b"/v1/apps/web%31/machines", b""),
    ("encoded-plain-dash", b"/v1/apps/web%2Dprod/machines", b""),
    ("malformed-escape-zz", b"/v1/apps/web%zz/machines", b""),
    ("malformed-escape-short", b"/v1/apps/web/machines%4", b""),
    ("malformed-escape-bare", b"/v1/apps/web%", b""),
    ("absolute-form", b"http://evil/v1/apps", b""),
    ("asterisk-form", b"*", b""),
    ("empty", b"", b""),
    ("relative", b"v1/apps/web/machines", b""),
    ("fragment-in-path", b"/v1/apps/web/machines#x", b""),
    ("fragment-in-query", b"/v1/apps/web/machines", b"a=b#x"),
    # The upstream would read everything after a raw '?' as the query: two meanings for one target.
    ("question-mark-in-raw-path", b"/v1/apps/web/secrets/API_KEY?show_secrets=true", b""),
    ("path-too-long", b"/v1/apps/" + b"a" * MAX_PATH_BYTES, b""),
    ("query-too-long", b"/v1/apps", b"a=" + b"b" * MAX_QUERY_BYTES),
    ("query-raw-space", b"/v1/apps", b"a=b c"),
    ("query-nul-raw", b"/v1/apps", b"a=\x00"),
    ("query-control-encoded", b"/v1/apps", b"a=%0d%0a"),
    ("query-control-raw-lf-at-end", b"/v1/apps", b"a=b\n"),
    ("query-non-ascii", b"/v1/apps", b"a=\xff"),
    ("query-malformed-escape", b"/v1/apps", b"a=%g1"),
]


@pytest.mark.parametrize(("raw_path", "raw_query"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(raw_path: bytes, raw_query: bytes) -> None:
    with pytest.raises(BadRequest):
        canonicalize(raw_path, raw_query)


def test_length_limits_are_inclusive() -> None:
    path = b"/v1/apps/" + b"a" * (MAX_PATH_BYTES - len(b"/v1/apps/"))
    query = b"a=" + b"b" * (MAX_QUERY_BYTES - 2)
    target = canonicalize(path, query)
    assert len(target.raw_path) == MAX_PATH_BYTES
    assert len(target.raw_query) == MAX_QUERY_BYTES


# --- through a real gateway ------------------------------------------------------------------


def raw_get(gateway: RunningGateway, target: bytes, token: str) -> tuple[int, bytes]:
    request = (b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
               + b"\r\nConnection: close\r\n\r\n")
    status, _, body = raw_request(gateway.port, request)
    return status, body


GATEWAY_REFUSED: list[tuple[str, bytes]] = [
    ("encoded-slash", b"/v1/apps/web%2Fprod/machines"),
    ("dot-dot", b"/v1/apps/web-staging/../web-prod/machines"),
    ("encoded-dot-dot", b"/v1/apps/web-staging/%2e%2e/web-prod/machines"),
    ("leading-double-slash", b"//v1/apps/web/machines"),
    ("absolute-form", b"http://evil.example/v1/apps/web/machines"),
    ("fragment", b"/v1/apps/web/machines#x"),
    # The server splits the query off before the app sees it: a fragment after '?' must be refused too.
    ("fragment-after-query", b"/v1/apps/web/machines?a=b#x"),
    ("backslash", b"/v1/apps/web\\machines"),
]


@pytest.mark.parametrize("target", [t for _, t in GATEWAY_REFUSED], ids=[n for n, _ in GATEWAY_REFUSED])
def test_gateway_refuses_ambiguous_targets(gateway: RunningGateway, target: bytes) -> None:
    token = gateway.mint("admin@app:*")
    status, body = raw_get(gateway, target, token)
    assert status == 400, body
    assert json_body(body)["error"] == "bad_request"
    assert gateway.upstream.received == []


FORWARDED: list[tuple[str, str, bytes, bytes]] = [
    ("encoded-space-metadata-key", "GET", b"/v1/apps/web/machines/abc/metadata/k%20v", b""),
    ("ipv6-ish-ip", "DELETE", b"/v1/apps/web/ip_assignments/fdaa:0:1::3", b""),
    ("encoded-query", "GET", b"/v1/apps/web/machines", b"x=%2F%20%2e&y"),
]


@pytest.mark.parametrize(("method", "path", "query"), [c[1:] for c in FORWARDED], ids=[c[0] for c in FORWARDED])
def test_gateway_forwards_odd_but_fine_targets_byte_for_byte(gateway: RunningGateway, method: str, path: bytes,
                                                             query: bytes) -> None:
    token = gateway.mint("admin@app:*")
    target = path + (b"?" + query if query else b"")
    request = (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + token.encode() + b"\r\nConnection: close\r\n\r\n")
    status, _, body = raw_request(gateway.port, request)
    assert status == 200, body
    received = gateway.upstream.received
    assert len(received) == 1
    assert received[0].method == method
    assert received[0].raw_path == path
    assert received[0].query == query


# --- properties ------------------------------------------------------------------------------

PATHISH = "/%.\\;#?abcdefABCDEF0123456789-_~:@!$&'()*+,= \x00\n\t\x7f\u00e9vpsm"


@PROPERTY
@given(raw_path=st.binary(max_size=64), raw_query=st.binary(max_size=32))
def test_canonicalize_only_raises_bad_request_on_bytes(raw_path: bytes, raw_query: bytes) -> None:
    with contextlib.suppress(BadRequest):
        canonicalize(raw_path, raw_query)


@PROPERTY
@given(path=st.text(alphabet=PATHISH, max_size=64), query=st.text(alphabet=PATHISH, max_size=32))
def test_canonicalize_only_raises_bad_request_on_pathish_text(path: str, query: str) -> None:
    with contextlib.suppress(BadRequest):
        canonicalize(("/" + path).encode("utf-8"), query.encode("utf-8"))


# Segments built from pieces an attacker would combine: plain names, escapes (valid, double,
# encoded separators and plain characters), dots, separators.
PIECES = ["web", "prod", "a", "-", "0", ".", "..", "/", "//", "\\", ";", "?", "#", "%", "%2f", "%2F", "%2e", "%2E",
          "%5c", "%25", "%252f", "%41", "%77", "%20", "%3A", "%3a", "%3F", "%21", "%00", "%0a", "%zz", "%4", ":", "@",
          "~", "_", "A", "\n"]
segment = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join)
APP_ROUTES = [r for r in TABLE.routes if r.app_source == "path" and not r.deny_always]


@st.composite
def routed_targets(draw: st.DrawFn) -> tuple[str, bytes]:
    """A request line built from a route template, each {param} filled with an arbitrary segment."""
    route = draw(st.sampled_from(APP_ROUTES))
    parts = [literal if literal is not None else draw(segment) for literal in route.segments]
    if draw(st.booleans()):
        # Sometimes a well-formed app name, so that plenty of examples get through.
        parts[route.segments.index(None)] = draw(st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,8}\Z"))
    return route.method, ("/" + "/".join(parts)).encode("utf-8")


def raw_app_segment(raw_path: bytes) -> bytes:
    assert raw_path.startswith(b"/v1/apps/")
    return raw_path[len(b"/v1/apps/"):].split(b"/")[0]


@PROPERTY
@example(request=("GET", b"/v1/apps/web%2Fprod/machines"), query=b"")
@example(request=("GET", b"/v1/apps/%77eb/machines"), query=b"")
@given(request=routed_targets(), query=st.sampled_from([b"", b"show_secrets=true", b"a=%2F&b", b"x"]))
def test_resolved_app_is_the_raw_segment_and_forwarded_target_is_the_authorized_one(
        request: tuple[str, bytes], query: bytes) -> None:
    method, raw_path = request
    try:
        target = canonicalize(raw_path, query)
        match = TABLE.resolve(method, target.path)
        resolved = resolve_request(match, target.raw_query, None)
    except (BadRequest, UnknownRoute):
        return
    if resolved.route.app_source != "path":
        return
    assert resolved.app is not None
    # Percent-decoding never changes the app: what was authorized is what the upstream reads.
    assert resolved.app.encode("ascii") == raw_app_segment(raw_path)
    assert target.forward_target == raw_path + (b"?" + query if query else b"")


@PROPERTY
@example(request=("GET", b"/v1/apps/web/secrets/API_KEY?show_secrets=true"), query=b"")
@given(request=routed_targets(), query=st.sampled_from([b"", b"show_secrets=true", b"a=%2F&b"]))
def test_upstream_reads_the_authorized_path_and_query(request: tuple[str, bytes], query: bytes) -> None:
    """The upstream splits the forwarded target at the first '?': it must see the path and query authorized."""
    method, raw_path = request
    try:
        target = canonicalize(raw_path, query)
        TABLE.resolve(method, target.path)
    except (BadRequest, UnknownRoute):
        return
    upstream_path, _, upstream_query = target.forward_target.partition(b"?")
    assert upstream_path == target.raw_path
    assert upstream_query == target.raw_query


@PROPERTY
@example(path=b"/v1/apps/web-staging/%2e%2e/web-prod")
@given(path=st.one_of(
    st.lists(segment, min_size=1, max_size=6).map(lambda parts: ("/" + "/".join(parts)).encode("utf-8")),
    st.text(alphabet=PATHISH, max_size=48).map(lambda text: ("/" + text).encode("utf-8")),
))
def test_accepted_paths_have_no_dot_or_empty_segments(path: bytes) -> None:
    try:
        target = canonicalize(path, b"")
    except BadRequest:
        return
    if target.path == "/":
        return
    segments = target.path.split("/")[1:]
    assert all(s not in ("", ".", "..") for s in segments), target
