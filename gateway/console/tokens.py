"""Console token pages: the list, a token's page, mint, revoke (cascade first), rotate.

Actions go through the same registry calls as the admin API (gateway/api/tokens.py) and are
audited with the same reasons.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.responses import RedirectResponse, Response

from gateway.console.pages import UI, Console, Ctx
from gateway.console.session import claims_of
from gateway.console.views import (
    LAST_USED,
    STATES,
    ListQuery,
    allowances,
    cascade,
    filter_page,
    lineage,
    state_of,
)
from gateway.durations import format_duration, parse_duration
from gateway.errors import BadRequest, Forbidden
from gateway.store import TokenRecord

MAX_GRANT_ROWS = 8


def _duration(text: str, what: str, *, allow_zero: bool = False) -> int | None:
    if not text.strip():
        return None
    try:
        return parse_duration(text.strip(), allow_zero=allow_zero)
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None


class TokenPages:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.services = console.services

    def _common(self) -> dict[str, Any]:
        return {"now": int(time.time()), "state_of": state_of, "ago": _ago}

    async def home(self, ctx: Ctx) -> Response:
        where = f"{UI}/tokens" if ctx.admin else f"{UI}/tokens/{ctx.claims.jti}"
        return RedirectResponse(where, status_code=303)

    async def list(self, ctx: Ctx) -> Response:
        now = int(time.time())
        query = ListQuery.parse(dict(ctx.request.query_params))
        records = await self.console.records.current()
        page = filter_page(records, query, now)
        # The cached list's last-use times may lag; the rows shown are read fresh.
        rows = [await self.services.store.get(r.jti) or r for r in page.rows]
        return self.console.render(ctx.request, "tokens.html", {
            **self._common(), "title": "Tokens", "query": query, "page": page, "rows": rows, "states": STATES,
            "last_used": list(LAST_USED), "total_known": len(records)}, ctx=ctx)

    async def show(self, ctx: Ctx) -> Response:
        jti = ctx.request.path_params["jti"]
        if jti != ctx.claims.jti:
            ruling = self.services.authorizer.decide_gateway(ctx.claims, "gateway:show")
            if not ruling.allowed:
                raise Forbidden("a token without token-admin@gateway sees only its own page")
        record = await self.services.registry.show(jti)
        tree = None
        if ctx.admin:
            await self.console.records.current()
            known = dict(self.console.records.by_jti())
            known[record.jti] = record
            tree = lineage(record, known)
        ctx.record.reason = f"console: the page of token {record.jti}"
        claims = await claims_of(self.services, record)
        actions = self.services.machines.routes.actions()
        return self.console.render(ctx.request, "token.html", {
            **self._common(), "title": f"Token {record.name}", "t": record, "tree": tree,
            "allowances": allowances(claims, self.services.authorizer, actions),
            "grace_default": "1h"}, ctx=ctx)

    async def mint_form(self, ctx: Ctx) -> Response:
        return self._mint_page(ctx, {}, None)

    def _mint_page(self, ctx: Ctx, values: dict[str, Any], error: str | None, status: int = 200) -> Response:
        config = self.services.config
        roles = sorted(self.services.policy.roles())
        envs = sorted(config.environment_names)
        return self.console.render(ctx.request, "mint.html", {
            "title": "Mint a token", "roles": roles, "envs": envs, "rows": MAX_GRANT_ROWS,
            "max_ttl": format_duration(config.tokens_max_ttl_s), "max_ttl_s": config.tokens_max_ttl_s,
            "default_ttl": format_duration(config.tokens_default_ttl_s), "values": values, "error": error},
            status=status, ctx=ctx)

    async def mint(self, ctx: Ctx) -> Response:
        grants = []
        for index in range(MAX_GRANT_ROWS):
            role, kind, pattern = (ctx.one(f"role{index}").strip(), ctx.one(f"kind{index}").strip(),
                                   ctx.one(f"pattern{index}").strip())
            if not role:
                continue
            grants.append(f"{role}@gateway" if kind == "gateway" else f"{role}@{kind}:{pattern}")
        values = {k: v[-1] for k, v in ctx.form.items() if k != "csrf"}
        try:
            if not grants:
                raise BadRequest("choose at least one grant: a role and a scope")
            ttl = _duration(ctx.one("ttl"), "ttl")
            minted = await self.services.registry.mint(
                grants=grants, ttl_s=ttl, name=ctx.one("name").strip() or "console-token",
                subject=ctx.one("subject").strip() or f"console:{ctx.claims.sub}")
        except BadRequest as exc:
            ctx.record.reason = f"mint refused: {exc.message}"
            return self._mint_page(ctx, values, exc.message, status=400)
        ctx.record.reason = f"minted {minted.record.jti} ({', '.join(minted.record.grants)})"
        self.console.records.put(minted.record)
        return self._secret(ctx, "Minted", minted.token, minted.record, None)

    def _secret(self, ctx: Ctx, title: str, token: str, record: TokenRecord, old: str | None) -> Response:
        response = self.console.render(ctx.request, "minted.html", {
            **self._common(), "title": title, "token": token, "t": record, "old": old}, status=201, ctx=ctx)
        return response

    async def revoke_form(self, ctx: Ctx) -> Response:
        record = await self.services.registry.show(ctx.request.path_params["jti"])
        await self.console.records.current()
        known = dict(self.console.records.by_jti())
        known[record.jti] = record
        return self.console.render(ctx.request, "revoke.html", {
            **self._common(), "title": f"Revoke {record.name}", "t": record,
            "cascade": cascade(record.jti, known)}, ctx=ctx)

    async def revoke(self, ctx: Ctx) -> Response:
        jti = ctx.request.path_params["jti"]
        reason = ctx.one("reason").strip()[:200] or None
        revoked = await self.services.registry.revoke(jti, reason=reason)
        ctx.record.reason = f"revoked {', '.join(revoked) or 'nothing (already revoked)'}"
        await self.console.records.current()
        return self.console.render(ctx.request, "revoked.html", {
            "title": "Revoked", "jti": jti, "revoked": revoked}, ctx=ctx)

    async def rotate(self, ctx: Ctx) -> Response:
        jti = ctx.request.path_params["jti"]
        grace = _duration(ctx.one("grace"), "grace", allow_zero=True)
        minted = await self.services.registry.rotate(jti, grace_s=3600 if grace is None else grace)
        ctx.record.reason = f"rotated {jti} -> {minted.record.jti}"
        self.console.records.put(minted.record)
        return self._secret(ctx, "Rotated", minted.token, minted.record, jti)


def _ago(then: int | None, now: int) -> str:
    if then is None:
        return "never"
    delta = now - then
    if delta < 0:
        return "in " + _rough(-delta)
    return "just now" if delta < 1 else f"{_rough(delta)} ago"


def _rough(seconds: int) -> str:
    """A span as people read it in a list: 29d, 23h, 14m, 9s (rounded down)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit != "d" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
