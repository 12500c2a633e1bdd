"""Grant strings `ROLE@SCOPE` and what they cover.

A grant names a role and the targets it applies to: `app:GLOB` (app names, `*` and `?`
wildcards), `env:NAME` (every app whose environment is NAME) or `gateway` (the gateway's own
admin API). Whether the role may perform an action is Casbin's business (`policy.py`); a grant
only says where the role applies. Parsing is strict so that a typo never widens a grant.

An `app:GLOB` grant stays in one environment: the one the environment rules give the pattern
itself, read as an app name (`web-pr-*` is in `development`, `web-*-prod` in `production`). It
covers an app only when the name matches *and* the app is in that environment, so a
`deployer@app:web-pr-*` job cannot create `web-pr-1-prod` (which the rules put in production) and
then act there, nor plant an app every `*@env:production` grant would cover. `app:*` alone is
the whole organization, every environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

ScopeKind = Literal["app", "env", "gateway"]

_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_APP_GLOB = re.compile(r"[a-z0-9*?][a-z0-9*?-]{0,62}")
_ENV_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# Fly app names: lowercase letters, digits and dashes. Always used with fullmatch: `$` would
# accept a trailing newline.
APP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


# App name (or pattern, read as a name) -> its environment: EnvironmentResolver.resolve.
EnvironmentOf = Callable[[str], str]


class GrantError(ValueError):
    """A grant string that does not parse; the message says what the form is."""


@dataclass(frozen=True, slots=True)
class Grant:
    role: str
    kind: ScopeKind
    pattern: str

    def __str__(self) -> str:
        return f"{self.role}@gateway" if self.kind == "gateway" else f"{self.role}@{self.kind}:{self.pattern}"

    @property
    def is_org_wide(self) -> bool:
        """True for `app:*`, which covers every app of the organization."""
        return self.kind == "app" and self.pattern == "*"

    @property
    def is_pattern(self) -> bool:
        return self.kind == "app" and any(c in self.pattern for c in "*?")

    def environment(self, env_of: EnvironmentOf) -> str | None:
        """The one environment this grant reaches (an app grant: its pattern's own), None for
        `app:*` (every environment) and `gateway` (none)."""
        if self.kind == "env":
            return self.pattern
        if self.kind == "gateway" or self.is_org_wide:
            return None
        return env_of(self.pattern)

    def matches_name(self, app: str) -> bool:
        """The app name matches the pattern (whatever its environment): for messages only."""
        return self.kind == "app" and fnmatchcase(app, self.pattern)

    def covers_app(self, app: str, env: str, env_of: EnvironmentOf) -> bool:
        """`app` (in environment `env`) is one this grant applies to."""
        if self.kind == "app":
            return fnmatchcase(app, self.pattern) and (
                self.is_org_wide or not self.is_pattern or env_of(self.pattern) == env)
        if self.kind == "env":
            return env == self.pattern
        return False

    def within(self, parent: Grant, env_of: EnvironmentOf) -> bool:
        """True when this grant covers no target `parent` does not (used to narrow tokens)."""
        if self.role != parent.role or self.kind != parent.kind:
            return False
        if self.kind == "app":
            # The very same glob, or a literal app the parent covers (its environment included:
            # `web-pr-1-prod` is not within `web-pr-*`, which stays in development).
            return self.pattern == parent.pattern or (
                not self.is_pattern and parent.covers_app(self.pattern, env_of(self.pattern), env_of))
        return self.pattern == parent.pattern


def parse_grant(text: str) -> Grant:
    role, at, scope = text.strip().partition("@")
    form = "write grants as ROLE@app:GLOB, ROLE@env:NAME or ROLE@gateway (e.g. deployer@app:web-staging)"
    if not at or not role or not scope:
        raise GrantError(f"grant {text!r} is not of the form ROLE@SCOPE; {form}")
    if not _ROLE.fullmatch(role):
        raise GrantError(f"grant {text!r} has an invalid role name {role!r}; {form}")
    if scope == "gateway":
        return Grant(role, "gateway", "")
    kind, colon, value = scope.partition(":")
    if not colon or kind not in ("app", "env"):
        raise GrantError(f"grant {text!r} has an unknown scope {scope!r}; {form}")
    if kind == "app":
        if not _APP_GLOB.fullmatch(value):
            raise GrantError(
                f"grant {text!r}: {value!r} is not an app name or glob "
                "(lowercase letters, digits, '-', and the wildcards * and ?)"
            )
        return Grant(role, "app", value)
    if not _ENV_NAME.fullmatch(value):
        raise GrantError(f"grant {text!r}: {value!r} is not an environment name (lowercase letters, digits, - and _)")
    return Grant(role, "env", value)


def parse_grants(texts: list[str] | tuple[str, ...]) -> tuple[Grant, ...]:
    if not texts:
        raise GrantError("a token needs at least one grant, e.g. --grant deployer@app:web-staging")
    grants = tuple(parse_grant(t) for t in texts)
    # Keep order, drop duplicates: `grants` is shown back to people.
    return tuple(dict.fromkeys(grants))
