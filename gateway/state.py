"""Everything a running gateway holds, built once from the configuration.

`GatewayState.build` loads and checks every file the gateway needs (keyring, policy, routes,
store) so that a bad configuration stops the start with a message instead of failing requests
later. `start`/`stop` own what needs an event loop: the upstream session and the loop that
follows the store's change feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from gateway.config import Config
from gateway.core.audit import AuditLog, RedisSink
from gateway.core.constraints import ConstraintSet
from gateway.core.keyring import Keyring
from gateway.core.policy import EnvironmentResolver, PolicyEngine
from gateway.core.ratelimit import Limiter, RateLimiter
from gateway.core.registry import TokenRegistry
from gateway.core.tokens import Claims, TokenIssuer, TokenVerifier
from gateway.errors import ConfigError, StateUnavailable
from gateway.metrics import GatewayMetrics
from gateway.oidc.exchange import TokenExchanger
from gateway.store import TokenStore, open_store
from gateway.surfaces.routes import RouteTable
from gateway.upstream.client import UpstreamClient

log = logging.getLogger("scopegate")
SYNC_INTERVAL_S = 0.25
RELOAD_INTERVAL_S = 0.5
CACHE_LEASE_S = 2 * SYNC_INTERVAL_S  # a cached record is used only this long after the last good sync
# The claims `authenticate` verified for the request running in this task (per-role rate limits).
REQUEST_CLAIMS: ContextVar[Claims | None] = ContextVar("scopegate_request_claims", default=None)


@dataclass
class GatewayState:
    config: Config
    keyring: Keyring
    verifier: TokenVerifier
    registry: TokenRegistry
    store: TokenStore
    policy: PolicyEngine
    routes: RouteTable
    constraints: ConstraintSet
    environments: EnvironmentResolver
    audit: AuditLog
    limiter: Limiter
    upstream: UpstreamClient
    max_body_bytes: int
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    watcher: FileWatcher = field(default_factory=lambda: FileWatcher([]))
    ready: bool = False
    oidc: TokenExchanger | None = None  # CI token exchange (oidc.trust); None: nothing trusted
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, config: Config, *, credential: str | None = None) -> GatewayState:
        keyring = Keyring.load(config.tokens_keyring)
        policy = PolicyEngine(config.policy_model, config.policy_policy)
        routes = RouteTable.load(config.routes)
        check_cross_references(policy, routes)
        constraints = load_constraints(config, routes)
        store = open_store(config)
        issuer = TokenIssuer(keyring, config.tokens_issuer, config.tokens_audience)
        registry = TokenRegistry(store, issuer, known_roles=policy.roles, default_ttl_s=config.tokens_default_ttl_s,
                                 max_ttl_s=config.tokens_max_ttl_s)
        upstream = UpstreamClient(
            config.upstream_url, auth_scheme=config.upstream_auth_scheme,
            credential=credential if credential is not None else config.upstream_credential(),
            connect_timeout_s=config.upstream_connect_timeout_s, read_timeout_s=config.upstream_read_timeout_s)
        oidc = TokenExchanger(config.oidc_trust, registry=registry, store=store,
                              gateway_audience=config.tokens_audience,
                              known_roles=policy.roles()) if config.oidc_trust else None
        return cls(
            oidc=oidc,
            config=config, keyring=keyring,
            verifier=TokenVerifier(keyring, config.tokens_issuer, config.tokens_audience),
            registry=registry, store=store, policy=policy, routes=routes, constraints=constraints,
            environments=EnvironmentResolver(tuple((r.app, r.env) for r in config.environment_rules),
                                             config.environment_default),
            limiter=build_limiter(config, store, policy.roles()),  # before audit: a bad key opens no file
            audit=build_audit(config, store),
            upstream=upstream, max_body_bytes=config.limits_max_body_bytes,
            watcher=FileWatcher([config.policy_model, config.policy_policy, *config.routes, config.tokens_keyring,
                                 *([config.policy_constraints] if config.policy_constraints else [])]),
        )

    async def authenticate(self, authorization: list[bytes]) -> Claims:
        """The caller's verified, registered, unrevoked token claims; raises Unauthenticated."""
        claims = self.verifier.verify_authorization(authorization)
        await self.registry.check(claims)
        REQUEST_CLAIMS.set(claims)  # this request's task only: the per-role rate limit reads it
        return claims

    async def start(self) -> None:
        await self.upstream.start()
        # Cached token records are trusted only while the change feed keeps being read.
        self.registry.lease_s = CACHE_LEASE_S
        try:
            await self.registry.start()
        except StateUnavailable as exc:
            # Start anyway, refusing with 503 until the store answers (the sync loop retries).
            self.registry.mark_unavailable(exc.message)
            log.warning("the token store is unavailable at start; requests get 503 until it answers")
        if self.oidc is not None:
            await self.oidc.start()  # the HTTP client for issuers' discovery documents and JWKS
        self._tasks = [asyncio.create_task(self._follow_store()), asyncio.create_task(self._follow_files())]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.upstream.close()
        if self.oidc is not None:
            await self.oidc.close()
        await self.audit.drain()  # the redis sink ships over the store's connection
        await self.store.close()
        self.audit.close()

    def reload_policy(self) -> bool:
        """Load model, policy and routes anew; on any error keep serving the last good ones."""
        config = self.config
        try:
            policy = PolicyEngine(config.policy_model, config.policy_policy)
            routes = RouteTable.load(config.routes)
            check_cross_references(policy, routes)
            constraints = load_constraints(config, routes)
        except Exception as exc:  # any failure keeps the last good policy: never a half-loaded one
            self.metrics.policy_reloads.labels("failed").inc()
            log.error("policy reload refused, the last good policy keeps serving: %s", exc)
            return False
        self.policy, self.routes, self.constraints = policy, routes, constraints
        self.registry.known_roles = policy.roles
        self.metrics.policy_reloads.labels("ok").inc()
        log.warning("policy reloaded: %d routes, %d policy lines", len(routes.routes), len(policy.policy_lines()))
        return True

    def reload_keyring(self) -> bool:
        try:
            keyring = Keyring.load(self.config.tokens_keyring)
        except Exception as exc:
            self.metrics.policy_reloads.labels("failed").inc()
            log.error("keyring reload refused, the last good keyring keeps serving: %s", exc)
            return False
        # A retired key must stop verifying at once: forget every cached verification.
        self.keyring = self.verifier.keyring = self.registry.issuer.keyring = keyring
        self.verifier.clear_cache()
        self.metrics.policy_reloads.labels("ok").inc()
        log.warning("keyring reloaded: active key %s, %d verifying", keyring.active.kid, len(keyring.verifying_keys()))
        return True

    async def _follow_files(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            try:
                changed = self.watcher.changed()
                if self.config.tokens_keyring in changed:
                    self.reload_keyring()
                if changed - {self.config.tokens_keyring}:
                    self.reload_policy()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("file watcher failed; it keeps watching")

    async def _follow_store(self) -> None:
        failing = False
        # A store that can say when its feed moves (Redis: a blocked XREAD, which also fails the
        # moment Redis goes away) wakes the loop early; others are polled.
        wait_for_change = getattr(self.store, "wait_for_change", None)
        while True:
            if wait_for_change is not None and not failing:
                await wait_for_change(self.registry.cursor, SYNC_INTERVAL_S)
            else:
                await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.registry.sync()
                if failing:
                    log.warning("the store answers again; serving")
                failing = False
            except Exception as exc:
                self.metrics.store_errors.inc()
                # Without the change feed the cached records may be stale: drop them and refuse
                # every request with 503 until the feed can be read again (fail closed).
                message = exc.message if isinstance(exc, StateUnavailable) else \
                    "the token store's change feed cannot be read; the request was not forwarded, retry shortly"
                self.registry.mark_unavailable(message)
                if not failing:
                    log.warning("the store's change feed failed (%s); refusing requests until it answers",
                                exc.__class__.__name__)
                failing = True


GATEWAY_ACTIONS = frozenset({"gateway:mint", "gateway:list", "gateway:show", "gateway:revoke", "gateway:rotate",
                             "gateway:explain"})


def build_audit(config: Config, store: TokenStore) -> AuditLog:
    """The configured sinks; `redis` appends to a stream in the store's own Redis."""
    from gateway.store.redis import RedisStore

    def redis_sink() -> RedisSink:
        assert isinstance(store, RedisStore)
        return RedisSink(store.client, store.prefix + "audit", config.audit_redis_maxlen)

    return AuditLog.from_config(config.audit_sinks, config.base_dir,
                                redis_sink=redis_sink if isinstance(store, RedisStore) else None)


def build_limiter(config: Config, store: TokenStore, known_roles: set[str]) -> Limiter:
    """Token buckets in this process (SQLite: one instance), or in Redis shared by every instance;
    per-role overrides (`rate_limit.roles`) through `RoleLimiter`."""
    from gateway.store.redis import RedisRateLimiter, RedisStore

    def make(rate: float, burst: int) -> Limiter:
        if isinstance(store, RedisStore):
            return RedisRateLimiter(store, rate, burst)
        return RateLimiter(rate, burst)

    default = (config.rate_limit_requests_per_second, config.rate_limit_burst)
    if not config.rate_limit_roles:
        return make(*default)
    for item in config.rate_limit_roles:
        if item.role not in known_roles:
            raise ConfigError(f"rate_limit.roles: role {item.role!r} is not in the policy; known roles: "
                              f"{', '.join(sorted(known_roles))}")
    return RoleLimiter(make, default, {item.role: (item.requests_per_second, item.burst)
                                       for item in config.rate_limit_roles})


class RoleLimiter:
    """Rate limits per role: each of a token's roles has its limit (its `rate_limit.roles` entry,
    else `rate_limit.requests_per_second`/`burst`) and the token gets the most generous one —
    unlimited (0) if any role is, else the highest rate, then the largest burst. The roles come
    from the claims `GatewayState.authenticate` verified for this request (REQUEST_CLAIMS)."""

    def __init__(self, make: Callable[[float, int], Limiter], default: tuple[float, int],
                 roles: dict[str, tuple[float, int]]) -> None:
        self.make = make
        self.default = default
        self.roles = roles
        self._limiters: dict[tuple[float, int], Limiter] = {}
        self._chosen: dict[frozenset[str], tuple[float, int]] = {}

    def limits_for(self, roles: Iterable[str]) -> tuple[float, int]:
        candidates = [self.roles.get(role, self.default) for role in roles] or [self.default]
        if any(rate <= 0 for rate, _ in candidates):
            return (0.0, 0)
        return max(candidates)

    async def check(self, key: str, token_name: str) -> None:
        claims = REQUEST_CLAIMS.get()
        roles = frozenset(g.role for g in claims.grants) if claims is not None and claims.jti == key else frozenset()
        limits = self._chosen.get(roles)
        if limits is None:
            limits = self.limits_for(roles)
            if len(self._chosen) < 4096:  # role combinations are few; bounded all the same
                self._chosen[roles] = limits
        if limits[0] <= 0:
            return
        limiter = self._limiters.get(limits)
        if limiter is None:
            limiter = self._limiters[limits] = self.make(*limits)
        await limiter.check(key, token_name)


class FileWatcher:
    """Notices when files change (mtime, size or inode), so edits apply without a restart."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self._seen = {path: self._signature(path) for path in self.paths}

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def changed(self) -> set[Path]:
        changed = set()
        for path in self.paths:
            signature = self._signature(path)
            if signature != self._seen[path]:
                self._seen[path] = signature
                changed.add(path)
        return changed


def load_constraints(config: Config, routes: RouteTable) -> ConstraintSet:
    constraints = ConstraintSet.load(config.policy_constraints)
    known = routes.actions()
    for constraint in constraints.constraints:
        for pattern in constraint.actions:
            if not any(fnmatchcase(action, pattern) for action in known):
                raise ConfigError(f"{constraints.source}: constraint '{constraint.name}' names action {pattern!r}, "
                                  "which no route produces")
    return constraints


def check_cross_references(policy: PolicyEngine, routes: RouteTable) -> None:
    """Policy and routes must name the same actions, both ways.

    A policy line whose action no route produces (a typo in a deny line would deny nothing,
    silently), and a route whose action no policy line mentions (an operation nobody can be
    granted, or forgot), both stop the load naming the offending line.
    """
    known = routes.actions() | GATEWAY_ACTIONS
    lines = policy.policy_lines()
    for rule in lines:
        pattern = rule[3]
        if not any(fnmatchcase(action, pattern) for action in known):
            raise ConfigError(f"{policy.policy_path}: policy line 'p, {', '.join(rule)}' names action {pattern!r}, "
                              "which no route produces; check the spelling against the route files")
    for route in routes.routes:
        if route.deny_always or route.answer_gateway:
            continue
        for action in (route.action, *([route.refine.action] if route.refine else [])):
            if not any(fnmatchcase(action, rule[3]) for rule in lines):
                raise ConfigError(f"{route.source}: action {action!r} appears in no line of {policy.policy_path}; "
                                  "grant it to a role (or deny it explicitly)")
