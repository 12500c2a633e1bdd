"""Environments: which environment an app is in (DESIGN section 5).

`environments.rules` is an ordered list of `{app: GLOB, env: NAME}`; the first rule whose glob
matches the app name wins, else `environments.default`. Grants like `viewer@env:staging` and
policy lines like "deployers may not write secrets in production" are written against these names.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

_CACHE_LIMIT = 65_536


class EnvironmentResolver:
    """App name -> environment: the first `environments.rules` glob that matches, else the default."""

    def __init__(self, rules: tuple[tuple[str, str], ...], default: str) -> None:
        self.rules = rules
        self.default = default
        self._cache: dict[str, str] = {}

    def resolve(self, app: str) -> str:
        env = self._cache.get(app)
        if env is None:
            env = next((name for glob, name in self.rules if fnmatchcase(app, glob)), self.default)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {}
            self._cache[app] = env
        return env
