"""How a console page runs: inside the request frame, with a session, authorized, audited.

`Console.page(action, handler)` wraps a handler like the admin API's `authorized`: the frame
audits the request under `action` (`gateway:list`, `gateway:mint`, ...; None: any signed-in
token), the session's token is checked as every request's is, a token-admin action is decided by
the policy, and a POST must carry the session's CSRF token. Refusals render as a page (no
session: back to sign-in).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from gateway.api.endpoint import open_frame
from gateway.console.records import RecordCache
from gateway.console.session import Session, Sessions, check_csrf
from gateway.core.audit import AuditRecord
from gateway.core.tokens import Claims
from gateway.errors import BadRequest, Forbidden, GatewayError, Unauthenticated
from gateway.frame import refuse_tokens_in_query
from gateway.services import Services

HERE = Path(__file__).resolve().parent
UI = "/_gateway/ui"
MAX_FORM_BYTES = 64 * 1024


@dataclass
class Ctx:
    request: Request
    session: Session
    claims: Claims
    admin: bool
    record: AuditRecord
    form: dict[str, list[str]]

    def one(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[-1] if values else default


Handler = Callable[[Ctx], Awaitable[Response]]


async def read_form(request: Request) -> dict[str, list[str]]:
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        raise BadRequest(f"the form is larger than {MAX_FORM_BYTES} bytes")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise BadRequest("console forms are sent as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form is not valid UTF-8 form data") from None
    form: dict[str, list[str]] = {}
    for key, value in pairs:
        form.setdefault(key, []).append(value)
    return form


class Console:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions = Sessions(services)
        self.records = RecordCache(services.store)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters["tojson_attr"] = lambda value: json.dumps(value)  # autoescaped where it lands
        self.templates = Jinja2Templates(env=env)

    def render(self, request: Request, name: str, context: dict[str, Any], *, status: int = 200,
               ctx: Ctx | None = None) -> Response:
        base: dict[str, Any] = {"ui": UI, "me": None, "admin": False, "csrf": "", "title": ""}
        if ctx is not None:
            base.update(me=ctx.claims, admin=ctx.admin, csrf=ctx.session.csrf)
        return self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def error_page(self, request: Request, error: GatewayError, request_id: str) -> Response:
        if isinstance(error, Unauthenticated) and request.method == "GET":
            return RedirectResponse(f"{UI}/signin", status_code=303)
        return self.render(request, "error.html", {"title": "Refused", "error": error, "request_id": request_id},
                           status=error.status)

    def page(self, action: str | None, handler: Handler, *, audit_as: str | None = None
             ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` for a signed-in token; with `action`, only if its grants allow that gateway action."""
        services = self.services

        async def run(request: Request) -> Response:
            frame = open_frame(services, request, audit_as or action or "gateway:console")

            async def work() -> Response:
                refuse_tokens_in_query(request.scope.get("query_string", b""))
                session = await self.sessions.load(request)
                claims = await self.sessions.claims(session)
                frame.identify(claims)
                form: dict[str, list[str]] = {}
                if request.method == "POST":
                    form = await read_form(request)
                    values = form.get("csrf")
                    check_csrf(session.csrf, values[-1] if values else None)
                admin = services.authorizer.decide_gateway(claims, "gateway:list").allowed
                if action is not None:
                    ruling = services.authorizer.decide_gateway(claims, action)
                    if not ruling.allowed:
                        raise Forbidden(ruling.decision.reason + "; sign in with a token-admin@gateway token")
                    frame.record.reason = ruling.decision.reason
                await self.sessions.touch(session, claims)
                response = await handler(Ctx(request, session, claims, admin, frame.record, form))
                frame.record.decision, frame.record.status = "allow", response.status_code
                return response

            async def refuse(error: GatewayError) -> Response:
                return self.error_page(request, error, frame.request_id)

            return await frame.run(work, refuse)

        return run
