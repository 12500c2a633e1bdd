"""A bounded fuzz run (Hypothesis) over what parses attacker bytes before any decision.

Token parsing (`bearer_token`, `TokenVerifier.verify`), path canonicalization (`canonicalize`)
and the route resolver (`RouteTable.resolve`, `resolve_request`, including the JSON body of
`POST /v1/apps`) may only ever raise the errors they are documented to raise: Unauthenticated,
BadRequest, Forbidden, UnknownRoute. Anything else would be a 500 at best and a crash of the
decision path at worst. Where an input is accepted, what comes out is checked too. 2,000 examples
per wide target (token text, mutated tokens, raw paths), 1,000 per narrow one; the whole module
runs in well under 20 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core.grants import APP_NAME, parse_grant
from gateway.core.keyring import Keyring
from gateway.core.tokens import PREFIX, TokenIssuer, TokenVerifier, bearer_token
from gateway.errors import BadRequest, Forbidden, Unauthenticated, UnknownRoute
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request

REPO = Path(__file__).resolve().parents[2]
TABLE = RouteTable.load([REPO / "policies/routes/fly-machines.yaml"])
_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
FUZZ = settings(max_examples=2000, deadline=None, database=None, suppress_health_check=_HEALTH)
# Cheap, narrow targets whose input space 1,000 examples already covers densely.
FUZZ_NARROW = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=_HEALTH)

KEYRING = Keyring.generate()
ISSUER, AUDIENCE = "fuzz-issuer", "fuzz-audience"
VALID, CLAIMS = TokenIssuer(KEYRING, ISSUER, AUDIENCE).mint(
    sub="fuzz:user", name="fuzz", grants=(parse_grant("viewer@app:web-staging"),), ttl_s=3600)
TOKENISH = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \t\x00%sgt_{}\":,eyJ\u00e9"


def fresh_verifier() -> TokenVerifier:
    return TokenVerifier(KEYRING, ISSUER, AUDIENCE)


# --- token parsing ---------------------------------------------------------------------------------

SEGMENT = st.text(alphabet=TOKENISH, max_size=120)


@FUZZ
@example(text=PREFIX)
@example(text=PREFIX + "..")
@example(text=PREFIX + "e30.e30.")
@example(text=PREFIX + "eyJhbGciOiJub25lIn0.e30.")
@given(text=st.one_of(st.text(alphabet=TOKENISH, max_size=400), st.text(max_size=200),
                      st.builds(lambda a, b, c: f"{PREFIX}{a}.{b}.{c}", SEGMENT, SEGMENT, SEGMENT)))
def test_verify_only_refuses_arbitrary_text(text: str) -> None:
    try:
        claims = fresh_verifier().verify(text)
    except Unauthenticated as error:
        assert error.status == 401
        return
    # Only a string signed by our key can come out verified, and then with its own claims.
    assert claims == CLAIMS


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """The valid token with up to four single-character edits (replace, insert, delete)."""
    token = VALID
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        position = draw(st.integers(min_value=0, max_value=len(token)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from(TOKENISH))
        if op == "insert":
            token = token[:position] + char + token[position:]
        elif op == "replace":
            token = token[:position] + char + token[position + 1:]
        else:
            token = token[:position] + token[position + 1:]
    return token


@FUZZ
@given(token=mutated())
def test_verify_refuses_mutated_tokens_or_returns_the_signed_claims(token: str) -> None:
    try:
        claims = fresh_verifier().verify(token)
    except Unauthenticated:
        return
    assert claims == CLAIMS


HEADER_BYTES = st.binary(max_size=120) | st.builds(
    lambda scheme, sep, rest: scheme + sep + rest,
    st.sampled_from([b"Bearer", b"bearer", b"FlyV1", b"Basic", b"", b"BEARER"]),
    st.sampled_from([b" ", b"  ", b"\t", b"", b","]),
    st.binary(max_size=80) | st.just(VALID.encode()))


@FUZZ_NARROW
@given(values=st.lists(HEADER_BYTES, max_size=3))
def test_bearer_token_only_refuses_and_never_returns_two_tokens(values: list[bytes]) -> None:
    try:
        token = bearer_token(values)
    except Unauthenticated:
        return
    assert len(values) == 1
    assert token and " " not in token and "," not in token
    assert token == token.strip()
    assert token in values[0].decode("ascii")


# --- path canonicalization and the route resolver ---------------------------------------------------

PATHISH = "/%.\\;#?abcdefABCDEF0123456789-_~:@!$&'()*+,= \x00\n\t\x7f\u00e9\uff0fvpsm"
PATH_PIECES = ["/v1/apps/", "web-staging", "web-prod", "/machines", "/m1", "/secrets", "/..", "/.", "//", "%2f", "%2e",
               "%25", "%252f", "%5c", "%3f", "%00", "%c0%af", ";x", "\\", "#", "?", "%41", "%zz", "%4"]


@FUZZ
@example(raw_path=b"/v1/apps/web\n", raw_query=b"")
@example(raw_path=b"/v1/apps/%2e%2e", raw_query=b"a=%0a")
@given(raw_path=st.one_of(st.binary(max_size=120),
                          st.text(alphabet=PATHISH, max_size=80).map(lambda t: ("/" + t).encode("utf-8")),
                          st.lists(st.sampled_from(PATH_PIECES), max_size=8).map(lambda p: "".join(p).encode())),
       raw_query=st.one_of(st.binary(max_size=60), st.text(alphabet=PATHISH, max_size=40).map(str.encode)))
def test_canonicalize_only_refuses_and_what_it_accepts_is_unambiguous(raw_path: bytes, raw_query: bytes) -> None:
    try:
        target = canonicalize(raw_path, raw_query)
    except BadRequest as error:
        assert error.status == 400
        return
    assert target.raw_path == raw_path and target.raw_query == raw_query
    assert raw_path.startswith(b"/") and raw_path.isascii() and raw_query.isascii()
    assert b"//" not in raw_path and b"#" not in raw_path + raw_query and b"?" not in raw_path
    assert raw_path == b"/" or not raw_path.endswith(b"/")
    assert all(part not in ("", ".", "..") for part in target.path.split("/")[1:]) or target.path == "/"
    assert target.forward_target.partition(b"?") == (raw_path, b"?" if raw_query else b"", raw_query)


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "get", ""]


@FUZZ_NARROW
@given(method=st.sampled_from(METHODS),
       raw_path=st.lists(st.sampled_from(PATH_PIECES), max_size=8).map(lambda p: "".join(p).encode()),
       raw_query=st.sampled_from([b"", b"show_secrets=1", b"Show_Secrets=true", b"show_secrets", b"%73how_secrets=1",
                                  b"show_secrets=false&show_secrets=1", b"a=%ff"]),
       body=st.one_of(st.none(), st.binary(max_size=64)))
def test_route_resolution_only_refuses(method: str, raw_path: bytes, raw_query: bytes, body: bytes | None) -> None:
    try:
        target = canonicalize(raw_path, raw_query)
        resolved = resolve_request(TABLE.resolve(method, target.path), target.raw_query, body)
    except (BadRequest, UnknownRoute, Forbidden):
        return
    assert resolved.app is None or APP_NAME.fullmatch(resolved.app)
    if resolved.route.app_source == "path":
        assert resolved.app is not None
        assert target.raw_path.split(b"/")[3] == resolved.app.encode("ascii")
    if resolved.route.refine is not None and b"show_secrets=1" in raw_query.lower():
        assert resolved.action == resolved.route.refine.action


SCALAR = st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(
    ["web-staging", "web-prod", "WEB", "", "web-staging\n", " web-staging"])
KEY = st.sampled_from(["name", "app_name", "NAME", "Name", "org_slug", "x"])
JSON = st.one_of(
    SCALAR,
    st.lists(SCALAR, max_size=3),
    st.dictionaries(KEY, SCALAR | st.lists(SCALAR, max_size=2) | st.dictionaries(KEY, SCALAR, max_size=2),
                    max_size=4),
)


@FUZZ_NARROW
@example(document={"name": "web-staging", "app_name": "web-staging"}, raw=b"", use_raw=False)
@example(document={}, raw=b'{"name":"web-staging"}\xff', use_raw=True)
@given(document=JSON, raw=st.binary(max_size=40), use_raw=st.booleans())
def test_app_from_the_body_only_refuses_and_is_the_one_the_body_names(document: Any, raw: bytes,
                                                                      use_raw: bool) -> None:
    body = raw if use_raw else json.dumps(document).encode()
    match = TABLE.resolve("POST", "/v1/apps")
    try:
        resolved = resolve_request(match, b"", body)
    except (BadRequest, Forbidden):
        return
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    # The upstream (Go) matches keys case-insensitively, and so does the gateway.
    folded = {key.casefold(): value for key, value in parsed.items()}
    named = {folded[f] for f in ("name", "app_name") if f in folded}
    assert named == {resolved.app}
    assert resolved.app is not None and APP_NAME.fullmatch(resolved.app)
