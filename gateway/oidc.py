"""Keyless CI: exchange a CI platform's OIDC id token for a short-lived gateway token (RFC 8693).

A CI job (GitHub Actions, GitLab CI) asks its platform for an id token whose audience is this
gateway and posts it to `POST /_gateway/v1/token/exchange`. The gateway checks it against the
`oidc.trust` rules and answers with an `sgt_` token minted through the registry, so it is
recorded, listed and revocable like any other token. Nobody stores a deploy credential.

What a subject token must pass, in order (every failure is a refusal and nothing is minted):

1. the header: `alg` RS256 or ES256 only (never `none`, HS*, EdDSA...), a `kid`, and no header
   that names its own key (`jku`, `jwk`, `x5u`, `x5c`) or a `crit` extension;
2. the unverified `iss` must be the exact issuer of some trust rule: only then is the key looked
   up, and only in *that* issuer's JWKS (a kid another issuer publishes is unknown here);
3. the signature, with the key of that kid from the issuer's JWKS (discovered through
   `/.well-known/openid-configuration` unless the rule names `jwks_url`). The JWKS is cached for
   `JWKS_TTL_S`; an unknown kid triggers one refetch, and refetches per issuer are rate-limited
   to one per `REFETCH_INTERVAL_S`. A JWKS that cannot be fetched refuses the exchange (503);
4. time: `exp` and `iat` required, `nbf` honoured, `LEEWAY_S` of clock skew, and `iat` at most
   `MAX_AGE_S` old: id tokens are meant to be exchanged right after they are issued;
5. `aud` exactly the rule's audience (a single audience: a token also meant for another service
   could be replayed here by that service), then the rule's claim conditions;
6. replay: each id token is accepted once, until it expires (`TokenStore.claim_once`).

Several matching rules combine: the minted token carries the union of their grants and lives as
long as the shortest of their ttls (docs/ci.md explains why).

JOSE work (JWK import, signature verification) uses joserfc, the JOSE library of the Authlib
project: Authlib's own `authlib.jose` is deprecated in its favour and delegates to it.
The discovery URL is Authlib's `get_well_known_url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from authlib.oidc.discovery import get_well_known_url
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.durations import format_duration, parse_duration
from gateway.errors import ConfigError, GatewayError
from gateway.grants import GrantError, parse_grant, parse_grants

if TYPE_CHECKING:
    from gateway.registry import TokenRegistry
    from gateway.state import GatewayState
    from gateway.store import TokenStore

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = (ID_TOKEN_TYPE, JWT_TOKEN_TYPE)

ALGORITHMS = ("RS256", "ES256")
LEEWAY_S = 60                 # clock skew allowed on exp, nbf and iat
MAX_AGE_S = 600               # an id token older than this (by iat) is refused
DEFAULT_TTL_S = 15 * 60       # a rule's ttl when it names none
MAX_TTL_S = 3600              # no rule may ask for more
JWKS_TTL_S = 600              # a fetched JWKS (and discovery document) is used this long
REFETCH_INTERVAL_S = 30       # at most one JWKS fetch per issuer per this many seconds
CONNECT_TIMEOUT_S = 3.0
FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_FORM_BYTES = 64 * 1024
MAX_SUBJECT_TOKEN_CHARS = 16 * 1024
MIN_RSA_BITS = 2048
# Claims that are the job's identity: copied (when present) into the audit record.
KEY_CLAIMS = ("sub", "repository", "repository_id", "repository_owner", "repository_owner_id", "ref", "ref_type",
              "sha", "environment", "event_name", "workflow_ref", "job_workflow_ref", "run_id", "run_attempt",
              "actor", "project_path", "project_id", "namespace_path", "pipeline_id", "pipeline_source", "job_id",
              "user_login")
# Registered claims the exchange checks itself; a rule may not put conditions on them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti", "azp"})
_SELF_KEYED_HEADERS = ("jku", "jwk", "x5u", "x5c")
_RULE_KEYS = ("name", "issuer", "audience", "jwks_url", "claims", "grants", "ttl")
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


# --- trust rules: parsed and checked when the config loads ---------------------------------------

@dataclass(frozen=True)
class ClaimCondition:
    """`claim` must equal one of `allowed` (each an exact value, or a glob with `*` and `?`)."""

    claim: str
    allowed: tuple[str, ...]

    def matches(self, value: object) -> bool:
        text = claim_text(value)
        return text is not None and any(_glob(pattern).fullmatch(text) is not None for pattern in self.allowed)

    def describe(self) -> str:
        shown = [repr(p) for p in self.allowed]
        return shown[0] if len(shown) == 1 else f"one of {', '.join(shown)}"


@dataclass(frozen=True)
class TrustRule:
    name: str
    issuer: str
    audience: str
    grants: tuple[str, ...]
    claims: tuple[ClaimCondition, ...] = ()
    ttl_s: int = DEFAULT_TTL_S
    jwks_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "issuer": self.issuer, "audience": self.audience, "jwks_url": self.jwks_url,
                "claims": {c.claim: list(c.allowed) if len(c.allowed) > 1 else c.allowed[0] for c in self.claims},
                "grants": list(self.grants), "ttl": format_duration(self.ttl_s)}


def parse_trust_rules(value: Any) -> tuple[TrustRule, ...]:
    """`oidc.trust` from the config; a ConfigError names the offending `oidc.trust[i].key`."""
    if not isinstance(value, list):
        raise ValueError("expected a list of trust rules (mappings with name, issuer, audience, claims, grants, ttl)")
    rules: list[TrustRule] = []
    for index, item in enumerate(value):
        rules.append(_parse_rule(index, item))
    names: dict[str, int] = {}
    jwks_by_issuer: dict[str, tuple[int, str | None]] = {}
    for index, rule in enumerate(rules):
        if rule.name in names:
            raise ConfigError(f"bad value for oidc.trust[{index}].name: {rule.name!r} is already the name of "
                              f"oidc.trust[{names[rule.name]}]; rule names must be unique")
        names[rule.name] = index
        first = jwks_by_issuer.setdefault(rule.issuer, (index, rule.jwks_url))
        if first[1] != rule.jwks_url:
            raise ConfigError(f"bad value for oidc.trust[{index}].jwks_url: oidc.trust[{first[0]}] names the same "
                              f"issuer with jwks_url {first[1] or '(discovered)'}; one issuer has one key set")
    return tuple(rules)


def _parse_rule(index: int, item: Any) -> TrustRule:
    where = f"oidc.trust[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"bad value for {where}: expected a mapping with the keys {', '.join(_RULE_KEYS)}")
    for key in item:
        if key not in _RULE_KEYS:
            raise ConfigError(f"unknown config key {where}.{key}; known: {', '.join(_RULE_KEYS)}")
    for key in ("name", "issuer", "audience", "grants"):
        if item.get(key) is None:
            raise ConfigError(f"missing config key {where}.{key}; every trust rule needs name, issuer, audience "
                              "and grants")

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"bad value for {where}.{key}: {why}")

    name = item["name"]
    if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
        raise bad("name", "expected 1 to 64 letters, digits, '.', '_' or '-'")
    issuer = item["issuer"]
    try:
        issuer = fetchable_url(issuer)
    except ValueError as exc:
        raise bad("issuer", str(exc)) from None
    audience = item["audience"]
    if not isinstance(audience, str) or not audience.strip() or audience != audience.strip():
        raise bad("audience", "expected a non-empty string without surrounding spaces (the id token's exact aud)")
    jwks_url = item.get("jwks_url")
    if jwks_url is not None:
        try:
            jwks_url = fetchable_url(jwks_url)
        except ValueError as exc:
            raise bad("jwks_url", str(exc)) from None
        if urlsplit(issuer).scheme == "https" and urlsplit(jwks_url).scheme != "https":
            raise bad("jwks_url", "an https issuer's keys must be fetched over https")
    grants = item["grants"]
    if isinstance(grants, str):
        grants = [grants]
    if not isinstance(grants, list) or not grants or not all(isinstance(g, str) for g in grants):
        raise bad("grants", 'expected a non-empty list of grants like "deployer@app:web-staging"')
    try:
        parsed = parse_grants(grants)
    except GrantError as exc:
        raise bad("grants", str(exc)) from None
    for grant in parsed:
        if grant.kind == "gateway":
            raise bad("grants", f"{grant} administers the gateway itself; a CI identity never gets it")
    ttl_s = DEFAULT_TTL_S
    if item.get("ttl") is not None:
        raw_ttl = item["ttl"]
        if isinstance(raw_ttl, bool) or not isinstance(raw_ttl, str | int):
            raise bad("ttl", "expected a duration like 15m or 1h")
        try:
            ttl_s = parse_duration(raw_ttl)
        except ValueError as exc:
            raise bad("ttl", str(exc)) from None
        if ttl_s > MAX_TTL_S:
            raise bad("ttl", f"{format_duration(ttl_s)} is longer than the {format_duration(MAX_TTL_S)} maximum "
                             "for tokens exchanged from CI")
    claims = item.get("claims")
    conditions: list[ClaimCondition] = []
    if claims is not None:
        if not isinstance(claims, dict):
            raise bad("claims", "expected a mapping of claim name -> value, glob or list of them")
        for claim, expected in claims.items():
            conditions.append(_parse_condition(where, claim, expected))
    return TrustRule(name=name, issuer=issuer, audience=audience, grants=tuple(str(g) for g in parsed),
                     claims=tuple(conditions), ttl_s=ttl_s, jwks_url=jwks_url)


def _parse_condition(where: str, claim: Any, expected: Any) -> ClaimCondition:
    if not isinstance(claim, str) or not claim.strip():
        raise ConfigError(f"bad value for {where}.claims: claim names must be non-empty strings")
    label = f"{where}.claims.{claim}"
    if claim in RESERVED_CLAIMS:
        raise ConfigError(f"bad value for {label}: {claim} is checked by the exchange itself "
                          "(issuer, audience, times, replay); remove it from claims")
    values = expected if isinstance(expected, list) else [expected]
    if not values:
        raise ConfigError(f"bad value for {label}: an empty list matches nothing; give a value, glob or list")
    allowed: list[str] = []
    for value in values:
        text = claim_text(value)
        if text is None or text == "":
            raise ConfigError(f"bad value for {label}: expected a string, glob, whole number or true/false "
                              f"(or a list of them), got {value!r}")
        if text.strip("*?") == "":
            raise ConfigError(f"bad value for {label}: {text!r} matches any value; drop the condition or pin it")
        if claim.endswith("_id") and any(c in text for c in "*?"):
            raise ConfigError(f"bad value for {label}: ids are compared exactly, as strings; no wildcards")
        allowed.append(text)
    return ClaimCondition(claim, tuple(allowed))


def fetchable_url(value: Any) -> str:
    """An https URL, or http on a loopback address (tests, a local issuer). Kept exactly as given."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError("expected a URL without surrounding spaces")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("expected an https:// URL")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ValueError("expected an https:// URL (plain http only on a loopback address)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a URL without credentials, query or fragment")
    return value


def claim_text(value: object) -> str | None:
    """A claim value as the string it is compared as: numbers (ids) by their decimal text, booleans as
    true/false; anything else (lists, objects, fractions) has no text and matches nothing."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return None


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*` any run of characters (including `/`), `?` one character; everything else literal."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


def rule_mismatches(rule: TrustRule, claims: Mapping[str, Any]) -> list[str]:
    """Why `rule` does not accept these claims; empty when it does. Signature and times are not checked."""
    issuer = claims.get("iss")
    if issuer != rule.issuer:
        return [f"issuer mismatch: expected {rule.issuer!r}, got {issuer!r}"]
    reasons = []
    audience = claims.get("aud")
    if not audience_matches(audience, rule.audience):
        extra = " (tokens with several audiences are refused)" if isinstance(audience, list) and len(audience) > 1 \
            else ""
        reasons.append(f"audience mismatch: expected {rule.audience!r}, got {audience!r}{extra}")
    for condition in rule.claims:
        if condition.claim not in claims:
            reasons.append(f"claim {condition.claim}: expected {condition.describe()}, the token has no such claim")
        elif not condition.matches(claims[condition.claim]):
            reasons.append(f"claim {condition.claim}: expected {condition.describe()}, "
                           f"got {claims[condition.claim]!r}")
    return reasons


def audience_matches(audience: object, expected: str) -> bool:
    return audience == expected or audience == [expected]


@dataclass(frozen=True)
class Outcome:
    """What the rules make of a token's claims: the matching rules and, for the others, why not."""

    matched: tuple[TrustRule, ...]
    refused: tuple[tuple[TrustRule, tuple[str, ...]], ...]

    @property
    def grants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for rule in self.matched for g in rule.grants))

    @property
    def ttl_s(self) -> int:
        return min(rule.ttl_s for rule in self.matched)


def evaluate(rules: Iterable[TrustRule], claims: Mapping[str, Any]) -> Outcome:
    matched: list[TrustRule] = []
    refused: list[tuple[TrustRule, tuple[str, ...]]] = []
    for rule in rules:
        reasons = rule_mismatches(rule, claims)
        if reasons:
            refused.append((rule, tuple(reasons)))
        else:
            matched.append(rule)
    return Outcome(tuple(matched), tuple(refused))


def time_problems(claims: Mapping[str, Any], now: int) -> list[str]:
    """Why the token's times refuse it now (exp, nbf, iat with leeway, and its age)."""
    problems = []
    exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
    if exp is None:
        problems.append("the token has no exp claim")
    elif not _numeric(exp):
        problems.append("exp is not a number")
    elif now >= exp + LEEWAY_S:
        problems.append(f"the token expired {format_duration(int(now - exp))} ago")
    if nbf is not None:
        if not _numeric(nbf):
            problems.append("nbf is not a number")
        elif nbf > now + LEEWAY_S:
            problems.append(f"the token is not valid for another {format_duration(int(nbf - now))} (nbf)")
    if iat is None:
        problems.append("the token has no iat claim")
    elif not _numeric(iat):
        problems.append("iat is not a number")
    elif iat > now + LEEWAY_S:
        problems.append(f"the token claims to be issued {format_duration(int(iat - now))} in the future (iat)")
    elif now - iat > MAX_AGE_S + LEEWAY_S:
        problems.append(f"the token was issued {format_duration(int(now - iat))} ago; id tokens are accepted for "
                        f"{format_duration(MAX_AGE_S)} after they are issued: request one right before exchanging")
    return problems


def _numeric(value: object) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and
                                                                        math.isfinite(value)))


def key_claims(claims: Mapping[str, Any]) -> dict[str, str]:
    """The identity claims worth an audit line, as short strings."""
    picked = {}
    for name in KEY_CLAIMS:
        text = claim_text(claims.get(name))
        if text is not None:
            picked[name] = text[:256]
    return picked


def issuer_id(issuer: str) -> str:
    """The issuer as it appears in a minted token's subject: host[:port][/path]."""
    parts = urlsplit(issuer)
    return f"{parts.netloc}{parts.path.rstrip('/')}"


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, without checking anything. Raises ValueError."""
    token = token.strip()
    if token.count(".") != 2:
        raise ValueError("not a JWT: expected three dot-separated parts (header.payload.signature)")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        header = obj.headers()
        claims = json.loads(obj.payload or b"")
    except (JoseError, ValueError, UnicodeError) as exc:
        raise ValueError(f"not a JWT: its header or payload does not decode ({exc.__class__.__name__})") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT: its payload is not a JSON object")
    return dict(header), claims


# --- refusals -----------------------------------------------------------------------------------

class ExchangeError(Exception):
    """A refusal in the RFC 6749 section 5.2 shape. `description` goes to the client; `detail`
    (more, e.g. each rule's reason) only to the audit log."""

    def __init__(self, code: str, description: str, *, status: int = 400, detail: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s

    def response(self, request_id: str) -> JSONResponse:
        headers = {**NO_STORE, "x-request-id": request_id}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, self.retry_after_s))
        return JSONResponse({"error": self.code, "error_description": self.description}, status_code=self.status,
                            headers=headers)


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def invalid_request(description: str) -> ExchangeError:
    return ExchangeError("invalid_request", description, status=400)


def invalid_grant(description: str, *, detail: str | None = None) -> ExchangeError:
    # The subject token is the credential of this endpoint: refusing it is an authentication failure.
    return ExchangeError("invalid_grant", description, status=401, detail=detail)


def unavailable(description: str, retry_after_s: int = REFETCH_INTERVAL_S) -> ExchangeError:
    return ExchangeError("temporarily_unavailable", description, status=503, retry_after_s=retry_after_s)


# --- issuer keys ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class IssuerKey:
    kid: str
    key: RSAKey | ECKey
    alg: str | None  # the JWK's own "alg", when it names one


@dataclass
class _IssuerEntry:
    keys: dict[str, IssuerKey] = field(default_factory=dict)
    fetched_at: float | None = None    # monotonic time of the last successful fetch
    attempted_at: float | None = None  # ... of the last attempt, successful or not
    last_error: str | None = None
    fetches: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FetchError(Exception):
    pass


class IssuerKeys:
    """Each trusted issuer's JWKS, fetched over HTTP(S) and cached per issuer.

    Keys are looked up only in the entry of the token's issuer, so a kid published by one issuer
    never verifies a token that names another.
    """

    def __init__(self, jwks_urls: Mapping[str, str | None], *, monotonic: Callable[[], float] = time.monotonic,
                 ttl_s: float = JWKS_TTL_S, refetch_interval_s: float = REFETCH_INTERVAL_S) -> None:
        self.jwks_urls = dict(jwks_urls)  # issuer -> configured jwks_url (None: discover)
        self.monotonic = monotonic
        self.ttl_s = ttl_s
        self.refetch_interval_s = refetch_interval_s
        self.http: httpx.AsyncClient | None = None
        self._entries: dict[str, _IssuerEntry] = {}

    async def start(self) -> None:
        if self.http is None and self.jwks_urls:
            self.http = httpx.AsyncClient(
                timeout=httpx.Timeout(FETCH_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), follow_redirects=False,
                headers={"accept": "application/json", "user-agent": "scopegate-oidc"}, trust_env=False)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def fetches(self, issuer: str) -> int:
        entry = self._entries.get(issuer)
        return entry.fetches if entry else 0

    async def key(self, issuer: str, kid: str) -> IssuerKey:
        """The key `kid` of `issuer`'s JWKS; raises ExchangeError (invalid_grant, or 503 when the
        keys cannot be fetched)."""
        if issuer not in self.jwks_urls:
            raise invalid_grant(f"issuer {issuer!r} is not trusted by this gateway")
        entry = self._entries.setdefault(issuer, _IssuerEntry())
        async with entry.lock:
            now = self.monotonic()
            if entry.fetched_at is None or now - entry.fetched_at >= self.ttl_s:
                await self._refresh(issuer, entry, now)
            found = entry.keys.get(kid)
            if found is None:
                since = now - (entry.attempted_at or 0.0)
                if since >= self.refetch_interval_s:
                    await self._refresh(issuer, entry, now)  # the issuer may have rotated its keys
                    found = entry.keys.get(kid)
                    since = 0.0
                if found is None:
                    wait = max(1, math.ceil(self.refetch_interval_s - since))
                    raise invalid_grant(
                        f"the token's key id {kid!r} is not in the JWKS of issuer {issuer} (keys fetched "
                        f"{int(since)}s ago; refetched at most every {int(self.refetch_interval_s)}s: "
                        f"retry in {wait}s if the issuer has just rotated its keys)")
            return found

    async def _refresh(self, issuer: str, entry: _IssuerEntry, now: float) -> None:
        if entry.last_error is not None and entry.attempted_at is not None \
                and now - entry.attempted_at < self.refetch_interval_s:
            wait = math.ceil(self.refetch_interval_s - (now - entry.attempted_at))
            raise unavailable(f"the signing keys of issuer {issuer} could not be fetched ({entry.last_error}); "
                              f"nothing was minted; retry in {wait}s", wait)
        entry.attempted_at = now
        entry.fetches += 1
        try:
            url = self.jwks_urls[issuer] or await self._discover(issuer)
            entry.keys = parse_jwks(await self._get_json(url, "JWKS"))
        except FetchError as exc:
            entry.last_error = str(exc)
            raise unavailable(f"the signing keys of issuer {issuer} could not be fetched ({exc}); nothing was "
                              f"minted; retry in {int(self.refetch_interval_s)}s",
                              int(self.refetch_interval_s)) from None
        entry.fetched_at, entry.last_error = now, None

    async def _discover(self, issuer: str) -> str:
        url = get_well_known_url(issuer, external=True)
        document = await self._get_json(url, "discovery document")
        if document.get("issuer") != issuer:
            raise FetchError(f"the discovery document at {url} names issuer {document.get('issuer')!r}, "
                             f"not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        try:
            jwks_uri = fetchable_url(jwks_uri)
        except ValueError as exc:
            raise FetchError(f"the discovery document at {url} has no usable jwks_uri: {exc}") from None
        if urlsplit(issuer).scheme == "https" and urlsplit(jwks_uri).scheme != "https":
            raise FetchError(f"the discovery document at {url} names a jwks_uri that is not https")
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        if self.http is None:
            raise FetchError("the gateway's HTTP client is not started")
        try:
            async with self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise FetchError(f"the {what} at {url} answered HTTP {response.status_code}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchError(f"the {what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        except httpx.TimeoutException:
            raise FetchError(f"the {what} at {url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"the {what} at {url} is unreachable ({exc.__class__.__name__})") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise FetchError(f"the {what} at {url} is not JSON") from None
        if not isinstance(document, dict):
            raise FetchError(f"the {what} at {url} is not a JSON object")
        return document


def parse_jwks(document: Mapping[str, Any]) -> dict[str, IssuerKey]:
    """Signing keys by kid: RSA (>= 2048 bits) and EC P-256 public keys. Keys without a kid, for
    encryption, of other types or sizes are skipped; a kid that appears twice is dropped (ambiguous)."""
    items = document.get("keys")
    if not isinstance(items, list):
        raise FetchError("the JWKS has no 'keys' list")
    keys: dict[str, IssuerKey] = {}
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict):
            continue
        kid, kty, alg = item.get("kid"), item.get("kty"), item.get("alg")
        if not isinstance(kid, str) or not kid or item.get("use", "sig") != "sig":
            continue
        if alg is not None and alg not in ALGORITHMS:
            continue
        try:
            key: RSAKey | ECKey
            if kty == "RSA":
                key = RSAKey.import_key({k: item[k] for k in ("kty", "n", "e") if k in item})
                if key.raw_value.key_size < MIN_RSA_BITS:
                    continue
            elif kty == "EC" and item.get("crv") == "P-256":
                key = ECKey.import_key({k: item[k] for k in ("kty", "crv", "x", "y") if k in item})
            else:
                continue
        except (JoseError, ValueError, TypeError):
            continue
        if kid in seen:
            keys.pop(kid, None)
            continue
        seen.add(kid)
        keys[kid] = IssuerKey(kid, key, alg if isinstance(alg, str) else None)
    return keys


# --- the exchange -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExchangeResult:
    access_token: str
    jti: str
    subject: str
    name: str
    grants: tuple[str, ...]
    expires_in: int
    rules: tuple[str, ...]
    scope: str | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"access_token": self.access_token, "issued_token_type": ACCESS_TOKEN_TYPE,
                                "token_type": "Bearer", "expires_in": self.expires_in}
        if self.scope is not None:
            body["scope"] = self.scope
        return body


class TokenExchanger:
    """Checks subject tokens against the trust rules and mints through the registry."""

    def __init__(self, rules: Sequence[TrustRule], *, registry: TokenRegistry, store: TokenStore,
                 gateway_audience: str, known_roles: set[str] | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rules = tuple(rules)
        self.registry = registry
        self.store = store
        self.gateway_audience = gateway_audience
        self.clock = clock
        if known_roles is not None:
            for index, rule in enumerate(self.rules):
                for grant in rule.grants:
                    role = parse_grant(grant).role
                    if role not in known_roles:
                        raise ConfigError(f"bad value for oidc.trust[{index}].grants: role {role!r} of {grant} is "
                                          f"not in the policy; known roles: {', '.join(sorted(known_roles))}")
        self.keys = IssuerKeys({rule.issuer: rule.jwks_url for rule in self.rules}, monotonic=monotonic)

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def exchange(self, form: Mapping[str, str], record: dict[str, Any]) -> ExchangeResult:
        """Exchange a parsed form; `record` (the audit record) learns the issuer, rules and key claims."""
        token = self._check_form(form)
        if not self.rules:
            raise invalid_grant("this gateway trusts no OIDC issuer (oidc.trust is empty)")
        try:
            header, unverified = decode_unverified(token)
        except ValueError as exc:
            raise invalid_request(f"subject_token is {exc}") from None
        issuer = unverified.get("iss")
        record["issuer"] = issuer[:256] if isinstance(issuer, str) else None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise invalid_grant(f"the id token is signed with alg {alg!r}; only {' and '.join(ALGORITHMS)} "
                                "are accepted")
        named = [h for h in (*_SELF_KEYED_HEADERS, "crit") if h in header]
        if named:
            raise invalid_grant(f"the id token's header carries {', '.join(named)}; keys come only from the "
                                "issuer's JWKS, and no extensions are understood")
        if not isinstance(kid, str) or not kid:
            raise invalid_grant("the id token's header has no kid; the issuer's key cannot be chosen")
        if not isinstance(issuer, str) or not any(rule.issuer == issuer for rule in self.rules):
            raise invalid_grant(f"issuer {issuer!r} is not trusted by this gateway (no oidc.trust rule names it)")
        claims = await self._verify(token, issuer, kid, alg)
        record["claims"] = key_claims(claims)
        problems = time_problems(claims, int(self.clock()))
        if problems:
            raise invalid_grant(f"the id token is not valid now: {'; '.join(problems)}")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise invalid_grant("the id token has no sub claim")
        outcome = evaluate((rule for rule in self.rules if rule.issuer == issuer), claims)
        if not outcome.matched:
            detail = "; ".join(f"{rule.name}: {', '.join(reasons)}" for rule, reasons in outcome.refused)
            audience = claims.get("aud")
            if not any(audience_matches(audience, rule.audience) for rule, _ in outcome.refused):
                raise invalid_grant(f"the id token's audience {audience!r} is not one this gateway accepts from "
                                    f"{issuer}; request the token with the gateway's audience", detail=detail)
            shown = ", ".join(f"{k}={v}" for k, v in key_claims(claims).items() if k != "sub")
            raise invalid_grant(f"no trust rule accepts this id token ({shown or 'sub=' + subject}); "
                                "`scopegate oidc check` on the token explains each rule", detail=detail)
        record["rule"] = ",".join(rule.name for rule in outcome.matched)
        grants, scope = self._scope(form.get("scope"), outcome.grants)
        principal = f"oidc:{issuer_id(issuer)}:{subject}"
        if len(principal) > 256:
            raise invalid_grant("the id token's sub claim is too long for a token subject (256 characters)")
        await self._claim_once(token, issuer, claims)
        name = ("ci:" + "+".join(rule.name for rule in outcome.matched))[:128]
        ttl_s = min(outcome.ttl_s, self.registry.max_ttl_s)
        try:
            minted = await self.registry.mint(grants=list(grants), ttl_s=ttl_s, name=name, subject=principal)
        except GatewayError as exc:
            if exc.status == 503:
                raise unavailable(f"the token store is unreachable ({exc.message}); nothing was minted") from None
            raise ExchangeError("server_error", f"the token could not be minted: {exc.message}", status=500) from None
        return ExchangeResult(access_token=minted.token, jti=minted.record.jti, subject=principal, name=name,
                              grants=minted.record.grants, expires_in=ttl_s,
                              rules=tuple(rule.name for rule in outcome.matched), scope=scope)

    def _check_form(self, form: Mapping[str, str]) -> str:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise invalid_request(f"grant_type is required; send grant_type={GRANT_TYPE}")
        if grant_type != GRANT_TYPE:
            raise ExchangeError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported here; "
                                f"this endpoint only does {GRANT_TYPE}")
        token = form.get("subject_token")
        if not token:
            raise invalid_request("subject_token is required: the CI platform's OIDC id token")
        if len(token) > MAX_SUBJECT_TOKEN_CHARS:
            raise invalid_request(f"subject_token is longer than {MAX_SUBJECT_TOKEN_CHARS} characters")
        token_type = form.get("subject_token_type")
        if token_type not in SUBJECT_TOKEN_TYPES:
            raise invalid_request(f"subject_token_type must be {ID_TOKEN_TYPE} or {JWT_TOKEN_TYPE}")
        if "actor_token" in form or "actor_token_type" in form:
            raise invalid_request("delegation (actor_token) is not supported; send only the subject token")
        requested = form.get("requested_token_type")
        if requested is not None and requested != ACCESS_TOKEN_TYPE:
            raise invalid_request(f"requested_token_type must be {ACCESS_TOKEN_TYPE} (or omitted)")
        audience = form.get("audience")
        if audience is not None and audience != self.gateway_audience:
            raise ExchangeError("invalid_target", f"this gateway issues tokens only for audience "
                                f"{self.gateway_audience!r}; omit audience or send that")
        if "resource" in form:
            raise ExchangeError("invalid_target", "this gateway issues tokens only for itself; omit resource")
        return token

    def _scope(self, requested: str | None, granted: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
        """Grants narrowed to `scope` (space-separated grant strings), when the client asks for fewer."""
        if requested is None:
            return granted, None
        held = parse_grants(list(granted))
        try:
            wanted = parse_grants(requested.split())
        except GrantError as exc:
            raise ExchangeError("invalid_scope", f"scope: {exc}") from None
        if not wanted:
            raise ExchangeError("invalid_scope", "scope is empty; omit it to get every grant the rules allow")
        for grant in wanted:
            if not any(grant == h or grant.within(h) for h in held):
                raise ExchangeError("invalid_scope", f"scope {grant} is not within the grants the trust rules "
                                    f"allow this job ({', '.join(granted)})")
        texts = tuple(dict.fromkeys(str(g) for g in wanted))
        return texts, " ".join(texts)

    async def _verify(self, token: str, issuer: str, kid: str, alg: str) -> dict[str, Any]:
        found = await self.keys.key(issuer, kid)
        if found.alg is not None and found.alg != alg:
            raise invalid_grant(f"key {kid!r} of issuer {issuer} is for {found.alg}, but the token says {alg}")
        if (alg == "RS256") != isinstance(found.key, RSAKey):
            raise invalid_grant(f"key {kid!r} of issuer {issuer} is not a key for {alg}")
        try:
            obj = jws.deserialize_compact(token.strip().encode("ascii"), found.key, algorithms=[alg])
            claims = json.loads(obj.payload or b"")
        except (JoseError, ValueError, UnicodeError):
            raise invalid_grant(f"the id token's signature does not verify with key {kid!r} of issuer "
                                f"{issuer}") from None
        if not isinstance(claims, dict) or claims.get("iss") != issuer:
            raise invalid_grant("the id token's payload is not a JSON object naming its issuer")
        return claims

    async def _claim_once(self, token: str, issuer: str, claims: Mapping[str, Any]) -> None:
        jti = claims.get("jti")
        basis = f"jti\0{issuer}\0{jti}" if isinstance(jti, str) and jti else f"token\0{token.strip()}"
        key = "oidc:" + hashlib.sha256(basis.encode()).hexdigest()
        # Kept until the token cannot pass the exp check any more, leeway included.
        expires_at = int(claims["exp"]) + LEEWAY_S + 1
        try:
            first = await self.store.claim_once(key, expires_at=expires_at)
        except GatewayError as exc:
            raise unavailable(f"the replay cache is unreachable ({exc.message}); nothing was minted") from None
        if not first:
            raise invalid_grant("this id token has already been exchanged; each id token is accepted once: "
                                "request a new one from the CI platform")


# --- the HTTP endpoint (POST /_gateway/v1/token/exchange) -----------------------------------------

def parse_form(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; a parameter given twice is refused (RFC 6749 3.2)."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                          max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the body is not a valid application/x-www-form-urlencoded form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise invalid_request(f"parameter {name} is given more than once")
        form[name] = value
    return form


def exchange_endpoint(state: GatewayState) -> Callable[[Request], Any]:
    """The route handler: not bearer-authenticated (the subject token is the credential), audited
    like every admin operation, with the rule names and the job's key claims added."""

    async def run(request: Request) -> Response:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "request_id": request_id, "jti": None, "sub": None, "token_name": None,
            "client_ip": request.client.host if request.client else "", "method": request.method,
            "path": request.url.path, "action": "gateway:exchange", "app": None, "env": None, "decision": "deny",
            "reason": None, "status": 500, "upstream_ms": None, "rule": None, "issuer": None, "claims": None,
        }
        try:
            if request.url.query:
                raise invalid_request("send the parameters in the form body, never in the query string")
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/x-www-form-urlencoded":
                raise invalid_request("send the request as application/x-www-form-urlencoded (RFC 8693)")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    raise invalid_request(f"the body is larger than {MAX_FORM_BYTES} bytes")
            exchanger = state.oidc
            if exchanger is None:
                raise invalid_grant("this gateway trusts no OIDC issuer (oidc.trust is empty)")
            result = await exchanger.exchange(parse_form(body), record)
            record.update(decision="allow", status=200, jti=result.jti, sub=result.subject, token_name=result.name,
                          reason=f"minted {result.jti} ({', '.join(result.grants)}) for {result.expires_in}s "
                                 f"by trust rule(s) {', '.join(result.rules)}")
            return JSONResponse(result.body(), headers={**NO_STORE, "x-request-id": request_id})
        except ExchangeError as error:
            record.update(status=error.status, reason=f"{error.code}: {error.description}"
                          + (f" [{error.detail}]" if error.detail else ""))
            return error.response(request_id)
        except Exception as exc:  # fail closed, and say so in the RFC shape
            record.update(status=500, reason=f"server_error: {exc.__class__.__name__}")
            return ExchangeError("server_error", "the exchange failed inside the gateway; nothing was minted",
                                 status=500).response(request_id)
        finally:
            duration = time.perf_counter() - started
            record["duration_ms"] = round(duration * 1000, 3)
            state.audit.emit(record)
            state.metrics.observe(record["decision"], "gateway:exchange", record["status"], duration, None)

    return run
