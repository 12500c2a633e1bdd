"""`oidc.trust` rules, and what they make of an id token's claims, with nothing checked online.

Config loading validates the rules (`parse_trust_rules`, a ConfigError naming
`oidc.trust[i].key`) and `scopegate oidc check` explains a token against them offline, so this
module stays free of HTTP clients and the exchange endpoint: importing it pulls in neither
httpx nor Starlette. The exchange (gateway/oidc.py) applies the same functions to verified claims,
so the check and the real exchange cannot disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.errors import JoseError

from gateway.core.grants import GrantError, parse_grants
from gateway.durations import format_duration, parse_duration
from gateway.errors import ConfigError

ALGORITHMS = ("RS256", "ES256")
LEEWAY_S = 60                 # clock skew allowed on exp, nbf and iat
MAX_AGE_S = 600               # an id token older than this (by iat) is refused
DEFAULT_TTL_S = 15 * 60       # a rule's ttl when it names none
MAX_TTL_S = 3600              # no rule may ask for more
# Claims that are the job's identity: copied (when present) into the audit record.
KEY_CLAIMS = ("sub", "repository", "repository_id", "repository_owner", "repository_owner_id", "ref", "ref_type",
              "sha", "environment", "event_name", "workflow_ref", "job_workflow_ref", "run_id", "run_attempt",
              "actor", "project_path", "project_id", "namespace_path", "pipeline_id", "pipeline_source", "job_id",
              "user_login")
# Registered claims the exchange checks itself; a rule may not put conditions on them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti", "azp"})
_RULE_KEYS = ("name", "issuer", "audience", "jwks_url", "claims", "grants", "ttl")
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


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
        age = int(now - iat)
        shown = format_duration(age - age % 60)  # whole minutes: "30m", however long the request took
        problems.append(f"the token was issued {shown} ago; id tokens are accepted for "
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
