"""Where token commands are carried out: the local store, or a running gateway's admin API.

With SCOPEGATE_ADDR and SCOPEGATE_TOKEN set, every token command and `policy explain` go
through the admin API (`RemoteBackend`); otherwise they work on the config's keyring and store
directly (`LocalBackend`). Both return the admin API's JSON shapes, so the output is the same
whichever way a command went.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Protocol

import httpx

from gateway.cli.common import config_from
from gateway.cli.local import LocalAdmin
from gateway.cli.local_audit import LocalAudit
from gateway.config import Config
from gateway.core.environments import EnvironmentResolver
from gateway.core.policy import PolicyEngine
from gateway.core.rules import Rules, load_rules
from gateway.core.token_query import TokenFilter, abilities, select, state_of
from gateway.core.tokens import Claims, TokenVerifier
from gateway.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    GatewayError,
    NotFound,
    StateUnavailable,
    Unauthenticated,
    Unprocessable,
)
from gateway.services import produced_actions
from gateway.surfaces.machines.explain import explain
from gateway.surfaces.routes import RouteTable

Json = dict[str, Any]


class Backend(Protocol):
    async def mint(self, grants: list[str], ttl_s: int | None, name: str, subject: str) -> Json: ...
    async def records(self, wanted: TokenFilter) -> list[Json]: ...
    async def show(self, jti: str) -> Json: ...
    async def revoke(self, jti: str, reason: str | None) -> None: ...
    async def rotate(self, jti: str, grace_s: int | None) -> Json: ...
    async def attenuate(self, parent_token: str, grants: list[str], ttl_s: int | None, name: str | None) -> Json: ...
    async def explain(self, method: str, path: str, body: Any, *, token: str | None,
                      grants: list[str] | None) -> Json: ...
    async def whoami(self, token: str) -> Json: ...
    async def close(self) -> None: ...


def remote_settings() -> tuple[str, str] | None:
    addr, token = os.environ.get("SCOPEGATE_ADDR", ""), os.environ.get("SCOPEGATE_TOKEN", "")
    if addr and not token:
        # Falling back to the local store here would act on another gateway's tokens than meant.
        raise ConfigError("SCOPEGATE_ADDR is set but SCOPEGATE_TOKEN is not: set SCOPEGATE_TOKEN to a "
                          "token-admin@gateway token to use that gateway, or unset SCOPEGATE_ADDR to work on "
                          "the local store")
    return (addr.rstrip("/"), token) if addr and token else None


def open_backend(args: argparse.Namespace) -> Backend:
    remote = remote_settings()
    if remote is not None:
        return RemoteBackend(*remote)
    return LocalBackend(args)


def caller_backend(args: argparse.Namespace, token: str, source: str) -> Backend:
    """For commands made with the caller's own token (attenuate, whoami): the gateway at
    SCOPEGATE_ADDR, asked with that token (no admin token needed), else the local config."""
    addr = os.environ.get("SCOPEGATE_ADDR", "").rstrip("/")
    return RemoteBackend(addr, token, token_source=source) if addr else LocalBackend(args, token_source=source)


class LocalBackend:
    def __init__(self, args: argparse.Namespace, *, token_source: str = "SCOPEGATE_TOKEN") -> None:
        self.config = config_from(args)
        self.admin = LocalAdmin.open(self.config)
        self.token_source = token_source  # where a caller's own token came from, for messages
        # Writes are audited like the admin API's (local_audit.py); reads are not.
        self.audit = LocalAudit.open(self.config, self.admin.store)

    async def mint(self, grants: list[str], ttl_s: int | None, name: str, subject: str) -> Json:
        async with self.audit.action("gateway:mint", "token mint") as record:
            minted = await self.admin.registry.mint(grants=grants, ttl_s=ttl_s, name=name, subject=subject)
            record.reason, record.status = f"minted {minted.record.jti} ({', '.join(minted.record.grants)})", 201
        return {"token": minted.token, **minted.record.to_json()}

    async def records(self, wanted: TokenFilter) -> list[Json]:
        return [r.to_json() for r in select(await self.admin.store.records(), wanted,
                                            env_of=self._environments().resolve, now=int(time.time()))]

    async def show(self, jti: str) -> Json:
        return (await self.admin.registry.show(jti)).to_json()

    async def revoke(self, jti: str, reason: str | None) -> None:
        async with self.audit.action("gateway:revoke", "token revoke") as record:
            revoked = await self.admin.registry.revoke(jti, reason=reason)
            record.reason, record.status = f"revoked {', '.join(revoked) or 'nothing (already revoked)'}", 204

    async def rotate(self, jti: str, grace_s: int | None) -> Json:
        async with self.audit.action("gateway:rotate", "token rotate") as record:
            minted = await self.admin.registry.rotate(jti, grace_s=3600 if grace_s is None else grace_s)
            record.reason, record.status = f"rotated {jti} -> {minted.record.jti}", 201
        return {"token": minted.token, **minted.record.to_json()}

    async def _caller(self, token: str) -> Claims:
        try:
            claims = self._verifier().verify(token)
            await self.admin.registry.check(claims)
        except Unauthenticated as exc:
            raise Unauthenticated(f"{self.token_source} is refused: {exc.message}") from None
        return claims

    async def attenuate(self, parent_token: str, grants: list[str], ttl_s: int | None, name: str | None) -> Json:
        async with self.audit.action("gateway:attenuate", "token attenuate") as record:
            parent = await self._caller(parent_token)
            record.jti, record.token_name = parent.jti, parent.name  # the token narrowed, as the API names it
            minted = await self.admin.registry.attenuate(parent, grants=grants, ttl_s=ttl_s, name=name,
                                                         env_of=self._environments().resolve)
            record.reason, record.status = f"attenuated {parent.jti} -> {minted.record.jti}", 201
        return {"token": minted.token, **minted.record.to_json()}

    async def explain(self, method: str, path: str, body: Any, *, token: str | None,
                      grants: list[str] | None) -> Json:
        if token is not None:
            try:
                claims = self._verifier().verify(token)
                await self.admin.registry.check(claims, use=False)  # asked about, not used
            except Unauthenticated as exc:
                raise Unprocessable(f"field 'token': {exc.message}") from None
            parsed, name, chain = claims.grants, claims.name, claims.chain
        else:
            parsed, name, chain = self.admin.registry.validate_grants(grants or []), "explain", ()
        raw = None if body is None else json.dumps(body).encode()
        routes, rules, environments = dry_run_rules(self.config)
        result = await explain(parsed, method, path, raw, routes=routes, rules=rules, environments=environments,
                               org_slug=self.config.upstream_org_slug, token_name=name, chain=chain)
        return result.to_json()

    async def whoami(self, token: str) -> Json:
        claims = await self._caller(token)
        record = await self.admin.registry.show(claims.jti)
        config = self.config
        may = abilities(claims.grants, PolicyEngine(config.policy_model, config.policy_policy),
                        env_of=self._environments().resolve, environments=config.environment_names)
        return {**record.to_json(), "state": state_of(record, int(time.time())), "may": may}

    def _verifier(self) -> TokenVerifier:
        return TokenVerifier(self.admin.keyring, self.config.tokens_issuer, self.config.tokens_audience)

    def _environments(self) -> EnvironmentResolver:
        return environment_resolver(self.config)

    async def close(self) -> None:
        try:
            await self.audit.close()
        finally:
            await self.admin.close()


def environment_resolver(config: Config) -> EnvironmentResolver:
    return EnvironmentResolver(tuple((r.app, r.env) for r in config.environment_rules), config.environment_default)


def dry_run_rules(config: Config) -> tuple[RouteTable, Rules, EnvironmentResolver]:
    """What a dry run (explain, `policy test`) decides with: the rules a gateway would load from this
    config (policy and constraints, checked as a start or reload checks them), and its routes."""
    rules = load_rules(config.policy_model, config.policy_policy, config.policy_constraints,
                       produced_actions(config), config.environment_names)
    return RouteTable.load(config.routes), rules, environment_resolver(config)


_ERRORS: dict[int, type[GatewayError]] = {400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound,
                                           422: Unprocessable}


class RemoteBackend:
    def __init__(self, addr: str, token: str, *, token_source: str = "SCOPEGATE_TOKEN") -> None:
        self.addr = addr
        self.token_source = token_source  # where the token came from, for messages (never the token)
        self.client = httpx.AsyncClient(base_url=addr + "/_gateway/v1", timeout=30,
                                        headers={"Authorization": f"Bearer {token}"})

    async def _call(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None,
                    bearer: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        try:
            response = await self.client.request(method, path, json=json_body, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise StateUnavailable(f"cannot reach the gateway at {self.addr} ({exc.__class__.__name__}); "
                                   "check SCOPEGATE_ADDR") from None
        if response.status_code >= 400:
            try:
                message = str(response.json().get("message", response.text))
            except ValueError:
                message = response.text or f"HTTP {response.status_code}"
            error_class = _ERRORS.get(response.status_code)
            if error_class is Unauthenticated:
                # The gateway's message ends with what to do ("ask for a new one"): keep it last.
                raise Unauthenticated(f"the gateway at {self.addr} refused {self.token_source}: {message}")
            if error_class is not None:
                raise error_class(message)
            error = GatewayError(message)
            error.status = response.status_code
            raise error
        return response

    async def mint(self, grants: list[str], ttl_s: int | None, name: str, subject: str) -> Json:
        body = {"grants": grants, "name": name, "subject": subject, **({"ttl": ttl_s} if ttl_s else {})}
        result: Json = (await self._call("POST", "/tokens", json_body=body)).json()
        return result

    async def records(self, wanted: TokenFilter) -> list[Json]:
        given = wanted.given()
        # `active=true` as well: gateways from before the filters honour it (and echo nothing).
        params = {**given, "active": "true"} if given.get("state") == "active" else given
        document = (await self._call("GET", "/tokens", params=params or None)).json()
        applied = document.get("filters", {"state": "active"} if "active" in params else {})
        ignored = sorted(key for key, value in given.items() if applied.get(key) != value)
        if ignored:
            # An older gateway ignores filters it does not know: its whole list is not the answer.
            raise ConfigError(f"the gateway at {self.addr} does not filter by {', '.join(ignored)} (an older "
                              "version?); upgrade it, or list without those filters")
        result: list[Json] = document["tokens"]
        return result

    async def show(self, jti: str) -> Json:
        result: Json = (await self._call("GET", f"/tokens/{_segment(jti)}")).json()
        return result

    async def revoke(self, jti: str, reason: str | None) -> None:
        await self._call("DELETE", f"/tokens/{_segment(jti)}", params={"reason": reason} if reason else None)

    async def rotate(self, jti: str, grace_s: int | None) -> Json:
        body = {} if grace_s is None else {"grace": grace_s if grace_s else "0s"}
        result: Json = (await self._call("POST", f"/tokens/{_segment(jti)}/rotate", json_body=body)).json()
        return result

    async def attenuate(self, parent_token: str, grants: list[str], ttl_s: int | None, name: str | None) -> Json:
        body: Json = {"grants": grants}
        if ttl_s:
            body["ttl"] = ttl_s
        if name:
            body["name"] = name
        result: Json = (await self._call("POST", "/token/attenuate", json_body=body, bearer=parent_token)).json()
        return result

    async def explain(self, method: str, path: str, body: Any, *, token: str | None,
                      grants: list[str] | None) -> Json:
        request: Json = {"method": method, "path": path}
        if body is not None:
            request["body"] = body
        if token is not None:
            request["token"] = token
        if grants:
            request["grants"] = grants
        result: Json = (await self._call("POST", "/explain", json_body=request)).json()
        return result

    async def whoami(self, token: str) -> Json:
        result: Json = (await self._call("GET", "/token/self", bearer=token)).json()
        return result

    async def close(self) -> None:
        await self.client.aclose()


def _segment(jti: str) -> str:
    # jtis are URL-safe base64; anything else cannot name a token and must not reshape the path.
    if not jti or not all(c.isalnum() or c in "-_" for c in jti):
        raise NotFound(f"no token with jti {jti!r}")
    return jti
