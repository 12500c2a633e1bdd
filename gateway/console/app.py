"""The console's Starlette app, mounted by gateway/app.py at `/_gateway/ui/` when `ui.enabled`.

Every response carries a strict Content-Security-Policy (scripts, styles and connections from
the gateway itself only: no inline script or style anywhere), `X-Frame-Options: DENY`,
`nosniff`, no referrer, and `no-store` (pages show tokens' details and, once, minted tokens).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.console.audit_view import AuditView
from gateway.console.explain_page import ExplainPage
from gateway.console.pages import HERE, UI, Console
from gateway.console.signin import SignIn
from gateway.console.tokens import TokenPages
from gateway.errors import BadRequest, NotFound
from gateway.services import Services

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
           (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cache-control", b"no-store")]


class SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                message["headers"] = [*(h for h in message.get("headers", []) if h[0].lower() not in names),
                                      *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_console_app(services: Services) -> SecurityHeaders:
    console = Console(services)
    signin, tokens = SignIn(console), TokenPages(console)
    audit, explain = AuditView(console), ExplainPage(console)
    page = console.page

    async def not_found(request: Request, exc: Exception) -> Response:
        return console.error_page(request, NotFound(f"{request.url.path} is not a page of the console"), "")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        error = BadRequest(f"{request.method} is not allowed on {request.url.path}")
        error.status = 405
        return console.error_page(request, error, "")

    app = Starlette(routes=[
        Route(f"{UI}/", page(None, tokens.home, audit_as="gateway:console"), methods=["GET"]),
        Route(f"{UI}/signin", signin.form, methods=["GET"]),
        Route(f"{UI}/signin", signin.submit, methods=["POST"]),
        Route(f"{UI}/signout", page(None, signin.signout, audit_as="gateway:console-signout"), methods=["POST"]),
        Route(f"{UI}/tokens", page("gateway:list", tokens.list), methods=["GET"]),
        Route(f"{UI}/mint", page("gateway:mint", tokens.mint_form), methods=["GET"]),
        Route(f"{UI}/mint", page("gateway:mint", tokens.mint), methods=["POST"]),
        Route(f"{UI}/tokens/{{jti}}", page(None, tokens.show, audit_as="gateway:show"), methods=["GET"]),
        Route(f"{UI}/tokens/{{jti}}/revoke", page("gateway:revoke", tokens.revoke_form), methods=["GET"]),
        Route(f"{UI}/tokens/{{jti}}/revoke", page("gateway:revoke", tokens.revoke), methods=["POST"]),
        Route(f"{UI}/tokens/{{jti}}/rotate", page("gateway:rotate", tokens.rotate), methods=["POST"]),
        Route(f"{UI}/audit", page("gateway:list", audit.page, audit_as="gateway:audit"), methods=["GET"]),
        Route(f"{UI}/audit/events", page("gateway:list", audit.events), methods=["GET"]),
        Route(f"{UI}/explain", page(None, explain.form, audit_as="gateway:explain"), methods=["GET"]),
        Route(f"{UI}/explain", page(None, explain.submit, audit_as="gateway:explain"), methods=["POST"]),
        Mount(f"{UI}/static", StaticFiles(directory=HERE / "static"), name="static"),
    ], exception_handlers={404: not_found, 405: not_allowed})
    app.router.redirect_slashes = False
    return SecurityHeaders(app)
