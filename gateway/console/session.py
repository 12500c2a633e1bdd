"""Console sessions: a token pasted once, exchanged for a random session id in an HttpOnly cookie.

The session lives in the store's remembered facts (`TokenStore.remember`/`recall`), so every
instance on a shared Redis store knows it, and under the SHA-256 of its id, so a copy of the store
holds no cookie that works. It keeps the token's jti, never the token: each request rebuilds the
token's claims from its record, so a revocation, expiry or store outage ends the session at once.
A session ends after `ui.session_idle` without a request, when the token dies, or at sign-out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from gateway.core.grants import Grant, parse_grants
from gateway.core.registry import MAX_DEPTH
from gateway.core.tokens import Claims
from gateway.errors import Forbidden, NotFound, Unauthenticated
from gateway.services import Services
from gateway.store import TokenRecord

COOKIE = "sg_console"
SIGNIN_COOKIE = "sg_console_signin"  # the sign-in form's CSRF value (double submit), before any session
PATH = "/_gateway/ui/"
MAX_SESSION_S = 12 * 3600  # however active, sign in again after this


@dataclass(frozen=True)
class Session:
    sid_hash: str
    jti: str
    csrf: str
    started: int


def _key(sid_hash: str) -> str:
    return f"console-session:{sid_hash}"


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.idle_s = services.config.ui_session_idle_s

    async def start(self, claims: Claims) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(_hash(sid), claims.jti, secrets.token_urlsafe(24), int(time.time()))
        await self._keep(session, claims.exp)
        return sid, session

    async def load(self, request: Request) -> Session:
        sid = request.cookies.get(COOKIE, "")
        if not sid or len(sid) > 100:
            raise Unauthenticated("no console session; sign in with a token")
        sid_hash = _hash(sid)
        raw = await self.services.store.recall(_key(sid_hash))
        if raw is None:
            raise Unauthenticated("the console session has ended (idle too long, or signed out); sign in again")
        data = json.loads(raw)
        return Session(sid_hash, str(data["jti"]), str(data["csrf"]), int(data["started"]))

    async def touch(self, session: Session, claims: Claims) -> None:
        """Another request: the idle clock starts again."""
        await self._keep(session, claims.exp)

    async def _keep(self, session: Session, token_exp: int) -> None:
        now = int(time.time())
        until = min(now + self.idle_s, token_exp, session.started + MAX_SESSION_S)
        if until <= now:
            raise Unauthenticated("the console session has reached its end; sign in again")
        value = json.dumps({"jti": session.jti, "csrf": session.csrf, "started": session.started})
        await self.services.store.remember(_key(session.sid_hash), value, expires_at=until)

    async def end_any(self, request: Request) -> None:
        """End the session the request's cookie names, if any (signing in again starts afresh)."""
        sid = request.cookies.get(COOKIE, "")
        if sid and len(sid) <= 100:
            await self.services.store.remember(_key(_hash(sid)), "", expires_at=int(time.time()) - 1)

    async def end(self, session: Session) -> None:
        await self.services.store.remember(_key(session.sid_hash), "", expires_at=int(time.time()) - 1)

    def secure(self, request: Request) -> bool:
        """Secure cookies on TLS: the connection's own scheme (X-Forwarded-Proto is never read: a
        client could send it), or always when `ui.secure_cookie: always` says TLS ends at a proxy."""
        mode = self.services.config.ui_secure_cookie
        return mode == "always" or (mode == "auto" and request.url.scheme == "https")

    def set_cookie(self, response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                            secure=self.secure(request))

    async def claims(self, session: Session) -> Claims:
        """The session's token as it is now: its record, checked like every request's token."""
        try:
            record = await self.services.registry.show(session.jti)
        except NotFound:
            raise Unauthenticated("the session's token is no longer registered; sign in with another") from None
        claims = await claims_of(self.services, record)
        await self.services.registry.check(claims)
        return claims


async def claims_of(services: Services, record: TokenRecord) -> Claims:
    """A token's claims rebuilt from its record (and its ancestors' grants, for a derived token)."""
    chain: list[tuple[Grant, ...]] = []
    ancestor = record.parent
    while ancestor is not None and len(chain) <= MAX_DEPTH:
        above = await services.registry.show(ancestor)
        chain.append(parse_grants(list(above.grants)))
        ancestor = above.parent
    config = services.config
    return Claims(iss=config.tokens_issuer, aud=config.tokens_audience, sub=record.sub, jti=record.jti, iat=record.iat,
                  nbf=record.iat, exp=record.exp, name=record.name, grants=parse_grants(list(record.grants)),
                  parent=record.parent, root=record.root, chain=tuple(chain))


def check_csrf(expected: str, given: str | None) -> None:
    if not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and submit it again")
