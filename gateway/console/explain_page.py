"""The explain page: METHOD PATH (+ body) for a token or a grant set -> the decision, the policy line
and the reason, from the same `explain` the admin API's `POST /_gateway/v1/explain` runs."""

from __future__ import annotations

import json

from starlette.responses import Response

from gateway.console.pages import Console, Ctx
from gateway.core.grants import GrantError
from gateway.errors import BadRequest, Forbidden, Unauthenticated
from gateway.surfaces.machines.explain import Explanation, explain


class ExplainPage:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.services = console.services

    def _render(self, ctx: Ctx, values: dict[str, str], result: object, error: str | None,
                status: int = 200) -> Response:
        return self.console.render(ctx.request, "explain.html", {
            "title": "Explain", "values": values, "result": result, "error": error}, status=status, ctx=ctx)

    async def form(self, ctx: Ctx) -> Response:
        ctx.record.reason = "console: the explain form"
        return self._render(ctx, {"method": "GET", "path": "/v1/apps/web-staging/machines", "body": "",
                                  "grants": "", "token": ""}, None, None)

    async def submit(self, ctx: Ctx) -> Response:
        values = {k: ctx.one(k) for k in ("method", "path", "body", "grants", "token")}
        values["token"] = ""  # a token pasted here is used once, never shown back
        try:
            result = await self._explain(ctx)
        except (BadRequest, Forbidden) as exc:
            ctx.record.reason = f"explain refused: {exc.message}"
            return self._render(ctx, values, None, exc.message, status=exc.status)
        ctx.record.reason = f"explained {result.method} {result.path}: {'allowed' if result.allowed else 'denied'}"
        return self._render(ctx, values, result, None)

    async def _explain(self, ctx: Ctx) -> Explanation:
        method, path = ctx.one("method").strip().upper() or "GET", ctx.one("path").strip()
        if not path.startswith("/"):
            raise BadRequest("path must start with /, e.g. /v1/apps/web-staging/machines")
        raw_body = None
        if ctx.one("body").strip():
            try:
                raw_body = json.dumps(json.loads(ctx.one("body"))).encode()
            except ValueError:
                raise BadRequest("body is not valid JSON; leave it empty or paste a JSON document") from None
        grants, name, chain = ctx.claims.grants, ctx.claims.name, ctx.claims.chain
        other_token, grant_text = ctx.one("token").strip(), ctx.one("grants").strip()
        if other_token or grant_text:
            if not ctx.admin:
                raise Forbidden("explaining another token or grant set needs token-admin@gateway; leave both "
                                "empty to explain for your own token")
            if other_token:
                try:
                    other = self.services.authorizer.verifier.verify(other_token)
                    await self.services.registry.check(other, use=False)  # asked about, not used
                except Unauthenticated as exc:
                    raise BadRequest(f"token: {exc.message}") from None
                grants, name, chain = other.grants, other.name, other.chain
            else:
                try:
                    texts = grant_text.replace(",", " ").split()
                    grants, name, chain = self.services.registry.validate_grants(texts), "explain", ()
                except GrantError as exc:
                    raise BadRequest(str(exc)) from None
        return await explain(grants, method, path, raw_body, routes=self.services.machines.routes,
                             rules=self.services.authorizer.rules, environments=self.services.authorizer.environments,
                             org_slug=self.services.config.upstream_org_slug, token_name=name, chain=chain)
