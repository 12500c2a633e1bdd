"""The composition root: everything a running gateway holds, built once from the configuration.

`Services.build` loads and checks every file the gateway needs (keyring, policy, constraints,
route maps, store, audit sinks) so that a bad configuration stops the start with a message
instead of failing requests later, and wires the parts together: the decision core
(`Authorizer`), the upstream client, the surfaces, the token exchange. `start`/`stop` own what
needs an event loop: the upstream session, the issuers' key fetcher, and the watch loops
(watch.py) that keep policy, keys and token records current. Nothing here runs per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from gateway.config import Config
from gateway.core.audit import AuditLog
from gateway.core.audit_sinks import Sink, sinks_from_config
from gateway.core.authorizer import Authorizer
from gateway.core.environments import EnvironmentResolver
from gateway.core.keyring import Keyring
from gateway.core.policy import PolicyEngine
from gateway.core.ratelimit import DerivationLimit, RateLimits
from gateway.core.registry import TokenRegistry
from gateway.core.rules import ProducedAction
from gateway.core.sized_cache import MIB
from gateway.core.tokens import TokenIssuer, TokenVerifier
from gateway.errors import ConfigError, StateUnavailable
from gateway.metrics import GatewayMetrics
from gateway.oidc.exchange import TokenExchanger
from gateway.store import TokenStore
from gateway.store.backends import open_store
from gateway.surfaces import Surface
from gateway.surfaces.graphql.operations import OperationMap
from gateway.surfaces.graphql.surface import GraphQLSurface, load_schema
from gateway.surfaces.machines.surface import MachinesSurface
from gateway.surfaces.registry.surface import RegistrySurface
from gateway.surfaces.registry.surface import produced_actions as registry_actions
from gateway.surfaces.rest.surface import RestSurface
from gateway.surfaces.routes import RouteTable
from gateway.upstream.attenuation import Attenuator, root_macaroon
from gateway.upstream.client import UpstreamClient
from gateway.watch import CACHE_LEASE_S, FileWatcher, Reloader, follow_files, follow_store, load_policy, watched_files

log = logging.getLogger("scopegate")


@dataclass
class Services:
    config: Config
    store: TokenStore
    authorizer: Authorizer
    audit: AuditLog
    upstream: UpstreamClient  # the Machines API's
    surfaces: list[Surface]
    reloader: Reloader
    metrics: GatewayMetrics
    exchanger: TokenExchanger | None = None  # CI token exchange (oidc.trust); None: nothing trusted
    upstreams: list[UpstreamClient] = field(default_factory=list)  # every surface's, started and stopped here
    ready: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, config: Config, *, credential: str | None = None) -> Services:
        keyring = Keyring.load(config.tokens_keyring)
        store = open_store(config)
        metrics = GatewayMetrics()
        audit = AuditLog()  # its sinks are opened last, once everything else is known to be good
        secret = credential if credential is not None else config.upstream_credential()

        def upstream_at(url: str) -> UpstreamClient:
            return UpstreamClient(url, auth_scheme=config.upstream_auth_scheme, credential=secret,
                                  connect_timeout_s=config.upstream_connect_timeout_s,
                                  read_timeout_s=config.upstream_read_timeout_s)

        upstream, graphql_upstream, rest_upstream = (upstream_at(url) for url in (
            config.upstream_url, config.upstream_graphql_url, config.upstream_api_url))
        # The image registry takes the same credential as docker sends it: basic auth, user `x`.
        registry_upstream = UpstreamClient(config.upstream_registry_url, auth_scheme=config.upstream_auth_scheme,
                                           credential=secret, basic_user="x",
                                           connect_timeout_s=config.upstream_connect_timeout_s,
                                           read_timeout_s=config.upstream_read_timeout_s)
        registry = TokenRegistry(store, TokenIssuer(keyring, config.tokens_issuer, config.tokens_audience),
                                 known_roles=set, environments=config.environment_names,
                                 default_ttl_s=config.tokens_default_ttl_s,
                                 max_ttl_s=config.tokens_max_ttl_s, max_children=config.tokens_max_children,
                                 derivations=DerivationLimit(store.rate_buckets,
                                                             config.rate_limit_derivations_per_minute),
                                 cache_bytes=config.limits_token_cache_mb * MIB)
        verifier = TokenVerifier(keyring, config.tokens_issuer, config.tokens_audience,
                                 cache_bytes=config.limits_token_cache_mb * MIB)
        authorizer = Authorizer(verifier, registry,
                                EnvironmentResolver(tuple((r.app, r.env) for r in config.environment_rules),
                                                    config.environment_default),
                                rate_limits(config, store))
        attenuator = _attenuator(config, secret, upstream)
        surfaces: list[Surface] = [
            GraphQLSurface(config.graphql_map, schema=load_schema(), authorizer=authorizer, upstream=graphql_upstream,
                           audit=audit, metrics=metrics, org_slug=config.upstream_org_slug, attenuator=attenuator),
            RestSurface(list(config.rest_routes), authorizer=authorizer, upstream=rest_upstream, audit=audit,
                        metrics=metrics, max_body_bytes=config.limits_max_body_bytes, store=store,
                        org_slug=config.upstream_org_slug, attenuator=attenuator),
            RegistrySurface(authorizer=authorizer, upstream=registry_upstream, audit=audit, metrics=metrics,
                            store=store, max_body_bytes=config.limits_max_body_bytes,
                            max_blob_bytes=config.limits_max_blob_bytes),
            MachinesSurface(list(config.routes), authorizer=authorizer, upstream=upstream, audit=audit,
                            metrics=metrics, max_body_bytes=config.limits_max_body_bytes,
                            org_slug=config.upstream_org_slug, attenuator=attenuator),  # serves the rest
        ]
        reloader = Reloader(config, authorizer, surfaces, metrics)
        reloader.install(*load_policy(config, surfaces))  # the rules come from the policy and the route maps
        roles = authorizer.rules.policy.roles()
        check_rate_limit_roles(config, roles)  # before the audit sinks open: a bad key opens no file
        exchanger = TokenExchanger(config.oidc_trust, registry=registry, store=store,
                                   gateway_audience=config.tokens_audience, env_of=authorizer.environments.resolve,
                                   known_roles=roles) if config.oidc_trust else None
        audit.open(sinks_from_config(config.audit_sinks, config.base_dir, redis_sink=redis_sink(config, store)))
        return cls(config=config, store=store, authorizer=authorizer, audit=audit, upstream=upstream,
                   surfaces=surfaces, reloader=reloader, metrics=metrics, exchanger=exchanger,
                   upstreams=[upstream, graphql_upstream, rest_upstream, registry_upstream])

    @property
    def registry(self) -> TokenRegistry:
        return self.authorizer.registry

    @property
    def keyring(self) -> Keyring:
        return self.authorizer.verifier.keyring

    @property
    def machines(self) -> MachinesSurface:
        """The Machines API surface (explain answers for it)."""
        return next(surface for surface in self.surfaces if type(surface) is MachinesSurface)

    @property
    def policy(self) -> PolicyEngine:
        return self.authorizer.rules.policy

    async def start(self) -> None:
        for upstream in self.upstreams:
            await upstream.start()
        # Cached token records are trusted only while the change feed keeps being read.
        self.registry.lease_s = CACHE_LEASE_S
        try:
            await self.registry.start()
        except StateUnavailable as exc:
            # Start anyway, refusing with 503 until the store answers (the sync loop retries).
            self.registry.mark_unavailable(exc.message)
            log.warning("the token store is unavailable at start; requests get 503 until it answers")
        if self.exchanger is not None:
            await self.exchanger.start()  # the HTTP client for issuers' discovery documents and JWKS
        watcher = FileWatcher(watched_files(self.config))
        self._tasks = [asyncio.create_task(follow_store(self.registry, self.store, self.metrics)),
                       asyncio.create_task(follow_files(watcher, self.reloader, self.config.tokens_keyring))]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for upstream in self.upstreams:
            await upstream.close()
        if self.exchanger is not None:
            await self.exchanger.close()
        await self.audit.drain()  # the redis sink ships over the store's connection
        await self.store.close()
        self.audit.close()


def produced_actions(config: Config) -> list[ProducedAction]:
    """What every surface's route map produces, read without building a gateway (for
    `scopegate policy check`); the same files `Services.build` loads into the surfaces."""
    return [*RouteTable.load(config.routes).produced_actions(),
            *RouteTable.load(config.rest_routes).produced_actions(),
            *OperationMap.load(config.graphql_map, load_schema()).produced_actions(),
            *registry_actions()]


def _attenuator(config: Config, credential: str, machines: UpstreamClient) -> Attenuator | None:
    """`upstream.attenuate: apps`: the credential, decoded now (a start with one that cannot be narrowed
    stops here), narrowed per request; app ids asked of the Machines API."""
    if config.upstream_attenuate != "apps":
        return None

    async def lookup(app: str, request_id: str) -> tuple[int, object]:
        return await machines.get_json(f"/v1/apps/{quote(app, safe='')}", request_id)

    return Attenuator(root_macaroon(credential), window_s=config.upstream_attenuate_window_s, lookup=lookup)


def redis_sink(config: Config, store: TokenStore) -> Callable[[], Sink] | None:
    """The `redis` audit sink's maker, when the store can offer one."""
    sink = store.audit_sink(config.audit_redis_maxlen) if "redis" in config.audit_sinks else None
    return None if sink is None else (lambda: sink)


def rate_limits(config: Config, store: TokenStore) -> RateLimits:
    """`rate_limit.requests_per_second`/`burst`, with `rate_limit.roles` overrides, in the store's buckets."""
    return RateLimits(store.rate_buckets, (config.rate_limit_requests_per_second, config.rate_limit_burst),
                      {item.role: (item.requests_per_second, item.burst) for item in config.rate_limit_roles})


def check_rate_limit_roles(config: Config, known_roles: set[str]) -> None:
    for item in config.rate_limit_roles:
        if item.role not in known_roles:
            raise ConfigError(f"rate_limit.roles: role {item.role!r} is not in the policy; known roles: "
                              f"{', '.join(sorted(known_roles))}")
