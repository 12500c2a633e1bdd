"""Signing in (a token pasted once, exchanged for a session) and out.

The sign-in form carries a CSRF value that must equal its own cookie (double submit: no session
exists yet to hold one). The token is read from the form, authenticated as an Authorization
header would be, and forgotten: the session keeps its jti, the page never shows it again.
"""

from __future__ import annotations

import hmac
import secrets

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.api.endpoint import open_frame
from gateway.console.pages import UI, Console, Ctx, read_form
from gateway.console.session import COOKIE, SIGNIN_COOKIE
from gateway.errors import Forbidden, GatewayError, Unauthenticated
from gateway.frame import refuse_tokens_in_query


class SignIn:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.services = console.services

    async def form(self, request: Request) -> Response:
        value = secrets.token_urlsafe(24)
        response = self.console.render(request, "signin.html", {"title": "Sign in", "signin_csrf": value,
                                                                "error": None})
        self.console.sessions.set_cookie(response, request, SIGNIN_COOKIE, value, max_age=3600)
        return response

    async def submit(self, request: Request) -> Response:
        frame = open_frame(self.services, request, "gateway:console-signin")

        async def work() -> Response:
            refuse_tokens_in_query(request.scope.get("query_string", b""))
            form = await read_form(request)
            given, expected = (form.get("csrf") or [""])[-1], request.cookies.get(SIGNIN_COOKIE, "")
            if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                raise Forbidden("the sign-in form's CSRF token is missing or stale; reload the sign-in page")
            token = (form.get("token") or [""])[-1].strip()
            if not token:
                raise Unauthenticated("paste a token (sgt_...) to sign in")
            claims = await self.services.authorizer.authenticate([b"Bearer " + token.encode("utf-8", "replace")])
            frame.identify(claims)
            await self.console.sessions.end_any(request)  # a new session id at each sign-in (no fixation)
            sid, _ = await self.console.sessions.start(claims)
            admin = self.services.authorizer.decide_gateway(claims, "gateway:list").allowed
            frame.record.reason = "console session started" + (" (token-admin)" if admin else " (own token only)")
            response = RedirectResponse(f"{UI}/", status_code=303)
            self.console.sessions.set_cookie(response, request, COOKIE, sid, max_age=None)
            response.delete_cookie(SIGNIN_COOKIE, path="/_gateway/ui/", httponly=True, samesite="strict")
            frame.record.decision, frame.record.status = "allow", 303
            return response

        async def refuse(error: GatewayError) -> Response:
            value = secrets.token_urlsafe(24)
            response = self.console.render(request, "signin.html", {
                "title": "Sign in", "signin_csrf": value, "error": error.message}, status=error.status)
            self.console.sessions.set_cookie(response, request, SIGNIN_COOKIE, value, max_age=3600)
            return response

        return await frame.run(work, refuse)

    async def signout(self, ctx: Ctx) -> Response:
        await self.console.sessions.end(ctx.session)
        ctx.record.reason = "console session ended"
        response = RedirectResponse(f"{UI}/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/_gateway/ui/", httponly=True, samesite="strict")
        return response
