"""The live audit view: a page, and a server-sent event stream of the records its filters select."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from gateway.console.audit_source import AuditUnreadable, follow, source_of
from gateway.console.pages import Console, Ctx
from gateway.errors import StateUnavailable, Unauthenticated

FILTERS = ("app", "env", "decision", "token", "action")
SHOWN = ("ts", "request_id", "decision", "status", "method", "path", "action", "app", "env", "jti", "token_name",
         "reason")
BACKLOG = 500
RECHECK_S = 5.0


def matches(record: dict[str, Any], wanted: dict[str, str]) -> bool:
    for key, value in wanted.items():
        if key == "token":
            if value not in (record.get("jti"), record.get("token_name")):
                return False
        elif key == "action":
            if not str(record.get("action") or "").startswith(value):
                return False
        elif str(record.get(key) or "") != value:
            return False
    return True


class AuditView:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.services = console.services

    def _wanted(self, ctx: Ctx) -> dict[str, str]:
        params = ctx.request.query_params
        return {key: params[key].strip()[:200] for key in FILTERS if params.get(key, "").strip()}

    async def page(self, ctx: Ctx) -> Response:
        try:
            source, problem = source_of(self.services), None
        except AuditUnreadable as exc:
            source, problem = None, exc.message
        return self.console.render(ctx.request, "audit.html", {
            "title": "Audit", "filters": FILTERS, "wanted": self._wanted(ctx), "source": source,
            "problem": problem}, ctx=ctx)

    async def events(self, ctx: Ctx) -> Response:
        source_of(self.services)  # refused now (409) rather than as a stream that ends at once
        # It streams until the client leaves: a server stopping says so (gateway/server.py, ENDLESS).
        ctx.request.scope["scopegate.endless"] = True
        wanted = self._wanted(ctx)
        request = ctx.request
        sessions = self.console.sessions

        async def still_signed_in() -> bool:
            try:
                await sessions.claims(await sessions.load(request))
            except (Unauthenticated, StateUnavailable):
                return False
            return True

        async def stream() -> AsyncIterator[str]:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            checked = idle_since = loop.time()
            yield "retry: 3000\n\n"
            try:
                async for batch in follow(self.services, backlog=BACKLOG, stop=stop):
                    shown = [{k: r.get(k) for k in SHOWN} for r in batch if matches(r, wanted)]
                    if shown:
                        idle_since = loop.time()
                        yield f"event: records\ndata: {json.dumps(shown)}\n\n"
                    elif loop.time() - idle_since > RECHECK_S:
                        idle_since = loop.time()
                        yield ": idle\n\n"  # keeps proxies from closing a quiet stream
                    if await request.is_disconnected():
                        break
                    if loop.time() - checked > RECHECK_S:
                        checked = idle_since = loop.time()
                        if not await still_signed_in():
                            yield "event: ended\ndata: {}\n\n"
                            break
            except AuditUnreadable as exc:
                yield f"event: failed\ndata: {json.dumps({'message': exc.message})}\n\n"
            finally:
                stop.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})
