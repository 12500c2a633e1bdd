"""Local mode: the CLI works on the config's keyring, policy and store directly.

The token registry needs no upstream credential, so token commands work on a machine that
only administers tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config
from gateway.core.keyring import Keyring
from gateway.core.policy import PolicyEngine
from gateway.core.ratelimit import DerivationLimit
from gateway.core.registry import TokenRegistry
from gateway.core.rules import check_roles
from gateway.core.tokens import TokenIssuer
from gateway.store import TokenStore
from gateway.store.backends import open_store


@dataclass
class LocalAdmin:
    config: Config
    keyring: Keyring
    store: TokenStore
    registry: TokenRegistry

    @classmethod
    def open(cls, config: Config, keyring: Keyring | None = None) -> LocalAdmin:
        keyring = keyring or Keyring.load(config.tokens_keyring)
        policy = PolicyEngine(config.policy_model, config.policy_policy)
        check_roles(policy)  # grants are checked against the roles; a typo'd role is no role
        store = open_store(config)
        issuer = TokenIssuer(keyring, config.tokens_issuer, config.tokens_audience)
        registry = TokenRegistry(store, issuer, known_roles=policy.roles,
                                 environments=config.environment_names, default_ttl_s=config.tokens_default_ttl_s,
                                 max_ttl_s=config.tokens_max_ttl_s, max_children=config.tokens_max_children,
                                 derivations=DerivationLimit(store.rate_buckets,
                                                             config.rate_limit_derivations_per_minute))
        registry.role_includes = policy.includes
        return cls(config, keyring, store, registry)

    async def close(self) -> None:
        await self.store.close()
