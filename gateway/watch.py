"""Keeping a running gateway current: policy, route maps and keyring reloaded when their files
change, and token records dropped when the store's change feed names them.

- `load_policy` reads the policy, the constraints and every surface's route map together and
  checks them against each other; `Reloader.reload_policy` installs a new set only when all of it
  is good (the last good set keeps serving otherwise, and the failure is counted and logged).
- `Reloader.reload_keyring` swaps the keyring: a retired key stops verifying at once.
- `follow_files` polls the files every RELOAD_INTERVAL_S; `follow_store` reads the change feed
  (a store that can wait for it, Redis, wakes early) and, when the feed cannot be read, refuses
  every request with 503 until it can (fail closed: cached records may be stale).
"""

from __future__ import annotations

import asyncio
import logging
from itertools import chain
from pathlib import Path

from gateway.config import Config
from gateway.core.authorizer import Authorizer
from gateway.core.keyring import Keyring
from gateway.core.registry import TokenRegistry
from gateway.core.rules import Rules, load_rules
from gateway.errors import StateUnavailable
from gateway.metrics import GatewayMetrics
from gateway.store import TokenStore
from gateway.surfaces import Surface, SurfaceLoad

log = logging.getLogger("scopegate")
SYNC_INTERVAL_S = 0.25
RELOAD_INTERVAL_S = 0.5
CACHE_LEASE_S = 2 * SYNC_INTERVAL_S  # a cached record is used only this long after the last good sync


def load_policy(config: Config, surfaces: list[Surface]) -> tuple[Rules, list[SurfaceLoad]]:
    """Policy, constraints and route maps, read and cross-checked; nothing is installed."""
    loads = [surface.load() for surface in surfaces]
    rules = load_rules(config.policy_model, config.policy_policy, config.policy_constraints,
                       chain.from_iterable(load.produced for load in loads), config.environment_names)
    return rules, loads


def watched_files(config: Config) -> list[Path]:
    return [config.policy_model, config.policy_policy, *config.routes, *config.rest_routes, config.graphql_map,
            config.tokens_keyring,
            *([config.policy_constraints] if config.policy_constraints else [])]


class Reloader:
    def __init__(self, config: Config, authorizer: Authorizer, surfaces: list[Surface],
                 metrics: GatewayMetrics) -> None:
        self.config = config
        self.authorizer = authorizer
        self.surfaces = surfaces
        self.metrics = metrics

    def reload_policy(self) -> bool:
        """Load model, policy, constraints and routes anew; on any error keep serving the last good ones."""
        try:
            rules, loads = load_policy(self.config, self.surfaces)
        except Exception as exc:  # any failure keeps the last good policy: never a half-loaded one
            self.metrics.reloaded(ok=False)
            log.error("policy reload refused, the last good policy keeps serving: %s", exc)
            return False
        self.install(rules, loads)
        self.metrics.reloaded(ok=True)
        log.warning("policy reloaded: %d actions routed, %d policy lines",
                    len({p.action for load in loads for p in load.produced}), len(rules.policy.policy_lines()))
        return True

    def install(self, rules: Rules, loads: list[SurfaceLoad]) -> None:
        """Serve these rules and route maps from now on."""
        self.authorizer.install(rules)
        for load in loads:
            load.install()

    def reload_keyring(self) -> bool:
        try:
            keyring = Keyring.load(self.config.tokens_keyring)
        except Exception as exc:
            self.metrics.reloaded(ok=False)
            log.error("keyring reload refused, the last good keyring keeps serving: %s", exc)
            return False
        self.authorizer.install_keyring(keyring)
        self.metrics.reloaded(ok=True)
        log.warning("keyring reloaded: active key %s, %d verifying", keyring.active.kid, len(keyring.verifying_keys()))
        return True


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


async def follow_files(watcher: FileWatcher, reloader: Reloader, keyring_file: Path) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL_S)
        try:
            changed = watcher.changed()
            if keyring_file in changed:
                reloader.reload_keyring()
            if changed - {keyring_file}:
                reloader.reload_policy()
        except Exception:  # the watcher must outlive any one bad reload
            log.exception("file watcher failed; it keeps watching")


async def follow_store(registry: TokenRegistry, store: TokenStore, metrics: GatewayMetrics) -> None:
    failing = False
    while True:
        if failing:
            await asyncio.sleep(SYNC_INTERVAL_S)
        else:
            await store.wait_for_change(registry.cursor, SYNC_INTERVAL_S)
        try:
            await registry.sync()
            if failing:
                log.warning("the store answers again; serving")
            failing = False
        except Exception as exc:
            metrics.store_failed()
            # Without the change feed the cached records may be stale: drop them and refuse
            # every request with 503 until the feed can be read again (fail closed).
            message = exc.message if isinstance(exc, StateUnavailable) else \
                "the token store's change feed cannot be read; the request was not forwarded, retry shortly"
            registry.mark_unavailable(message)
            if not failing:
                log.warning("the store's change feed failed (%s); refusing requests until it answers",
                            exc.__class__.__name__)
            failing = True
