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

The trust rules and the claim checks live in gateway/oidc_rules.py, the issuers' keys in
gateway/oidc_keys.py; the names callers know from here are re-exported.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from gateway.core.grants import EnvironmentOf, GrantError, parse_grant, parse_grants
from gateway.core.registry import unknown_name
from gateway.errors import ConfigError, GatewayError, RateLimited
from gateway.oidc.errors import ExchangeError, invalid_grant, invalid_request, unavailable
from gateway.oidc.keys import JWKS_TTL_S, IssuerKeys, parse_jwks
from gateway.oidc.rules import (
    ALGORITHMS,
    DEFAULT_TTL_S,
    LEEWAY_S,
    MAX_AGE_S,
    ClaimCondition,
    TrustRule,
    audience_matches,
    decode_unverified,
    evaluate,
    issuer_id,
    key_claims,
    parse_trust_rules,
    rule_mismatches,
    time_problems,
)

if TYPE_CHECKING:
    from gateway.core.registry import TokenRegistry
    from gateway.store import TokenStore

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "ALGORITHMS",
    "DEFAULT_TTL_S",
    "GRANT_TYPE",
    "ID_TOKEN_TYPE",
    "JWKS_TTL_S",
    "JWT_TOKEN_TYPE",
    "LEEWAY_S",
    "MAX_AGE_S",
    "ClaimCondition",
    "ExchangeError",
    "ExchangeResult",
    "TokenExchanger",
    "TrustRule",
    "decode_unverified",
    "evaluate",
    "issuer_id",
    "key_claims",
    "parse_form",
    "parse_jwks",
    "parse_trust_rules",
    "rule_mismatches",
    "time_problems",
]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = (ID_TOKEN_TYPE, JWT_TOKEN_TYPE)
MAX_FORM_BYTES = 64 * 1024
MAX_SUBJECT_TOKEN_CHARS = 16 * 1024
_SELF_KEYED_HEADERS = ("jku", "jwk", "x5u", "x5c")


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
                 gateway_audience: str, env_of: EnvironmentOf, known_roles: set[str] | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rules = tuple(rules)
        self.registry = registry
        self.store = store
        self.gateway_audience = gateway_audience
        self.env_of = env_of  # a scope narrowed to one app must be in the environment the rule's pattern is in
        self.clock = clock
        if known_roles is not None:
            for index, rule in enumerate(self.rules):
                for grant in rule.grants:
                    problem = unknown_name(parse_grant(grant), known_roles, registry.environments)
                    if problem is not None:
                        raise ConfigError(f"bad value for oidc.trust[{index}].grants: {problem}")
        self.keys = IssuerKeys({rule.issuer: rule.jwks_url for rule in self.rules}, monotonic=monotonic)

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def exchange(self, form: Mapping[str, str], record: dict[str, Any]) -> ExchangeResult:
        """Exchange a parsed form; `record` (the audit record's extra fields) learns the issuer, rules
        and key claims."""
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
        # After the replay cache took the id token (a replay must not spend the allowance of the
        # pipeline it came from), and per trust rule rather than per `sub`, which a CI platform varies
        # by branch: a refused exchange needs a fresh id token, which CI platforms hand out freely.
        await self._claim_once(token, issuer, claims)
        if self.registry.derivations is not None:
            rules = "+".join(rule.name for rule in outcome.matched)
            try:
                await self.registry.derivations.take(f"oidc:{issuer_id(issuer)}:{rules}", f"trust rule(s) {rules}")
            except RateLimited as exc:
                raise ExchangeError("rate_limited", exc.message + "; request a fresh id token to retry", status=429,
                                    retry_after_s=int(exc.headers["Retry-After"])) from None
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
            if not any(grant == h or grant.within(h, self.env_of) for h in held):
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


# --- the form of POST /_gateway/v1/token/exchange (api/exchange.py) -------------------------------

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
