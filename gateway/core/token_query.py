"""Questions about token records and grants that the CLI and the admin API answer alike.

- `state_of`: active, revoked or expired (a rotated-away token past its grace is expired);
- `TokenFilter` / `select`: `token list --grant/--app/--subject/--state` and
  `GET /_gateway/v1/tokens?grant=&app=&subject=&state=`; `app` means "the token's grants cover
  this app" (an `env:` grant covers the apps the environment rules put in that environment);
- `abilities`: what a grant set may do, per grant, for `scopegate whoami` and
  `GET /_gateway/v1/token/self`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from gateway.core.grants import Grant, GrantError, parse_grant
from gateway.core.policy import GATEWAY_TARGET, PolicyEngine
from gateway.store import TokenRecord

STATES = ("active", "revoked", "expired")
FILTER_KEYS = ("grant", "app", "subject", "state")


def state_of(record: TokenRecord, now: int) -> str:
    if record.revoked_at is not None:
        return "revoked"
    return "expired" if record.exp <= now else "active"


@dataclass(frozen=True)
class TokenFilter:
    grant: str | None = None  # an exact grant string the token carries
    app: str | None = None  # an app some grant of the token covers
    subject: str | None = None  # the token's subject, or a glob of it (ci:github:acme/*)
    state: str | None = None  # one of STATES

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {self.state!r}")

    def given(self) -> dict[str, str]:
        """The filters set, by name (query parameters of the admin API)."""
        return {key: value for key in FILTER_KEYS if (value := getattr(self, key)) is not None}


def _covers(texts: Iterable[str], app: str, env: str, env_of: Callable[[str], str]) -> bool:
    for text in texts:
        try:
            grant = parse_grant(text)
        except GrantError:
            continue
        if grant.covers_app(app, env, env_of):
            return True
    return False


def select(records: Iterable[TokenRecord], wanted: TokenFilter, *, env_of: Callable[[str], str],
           now: int) -> list[TokenRecord]:
    env = env_of(wanted.app) if wanted.app is not None else ""
    return [r for r in records
            if (wanted.grant is None or wanted.grant in r.grants)
            and (wanted.subject is None or fnmatchcase(r.sub, wanted.subject))
            and (wanted.state is None or state_of(r, now) == wanted.state)
            and (wanted.app is None or _covers(r.grants, wanted.app, env, env_of))]


def _action_patterns(policy: PolicyEngine) -> list[str]:
    return sorted({rule[3] for rule in policy.policy_lines() if len(rule) >= 5 and rule[4] == "allow"})


def _allowed(policy: PolicyEngine, role: str, app: str, env: str, patterns: list[str]) -> list[str]:
    allowed = [p for p in patterns if policy.verdict(role, app, env, p).allowed]
    # `machines:*` already says `machines:deploy`.
    return [a for a in allowed if not any(o != a and "*" in o and fnmatchcase(a, o) for o in allowed)]


def abilities(grants: Iterable[Grant], policy: PolicyEngine, *, env_of: Callable[[str], str],
              environments: Iterable[str]) -> list[dict[str, Any]]:
    """Per grant and environment it reaches: the actions its role is allowed there.

    A literal app is in one environment; an `env:` grant names its own; an app glob may reach
    any environment. Policy lines naming particular apps are evaluated against the grant's own
    pattern, so `scopegate policy explain` stays the definite answer for one request."""
    patterns = _action_patterns(policy)
    rows: list[dict[str, Any]] = []
    for grant in grants:
        if grant.kind == "gateway":
            actions = _allowed(policy, grant.role, GATEWAY_TARGET, GATEWAY_TARGET, patterns)
            rows.append({"grant": str(grant), "env": None, "actions": actions})
            continue
        if grant.kind == "env":
            reach = [grant.pattern]
        elif any(c in grant.pattern for c in "*?"):
            reach = sorted(environments)
        else:
            reach = [env_of(grant.pattern)]
        for env in reach:
            app = grant.pattern if grant.kind == "app" else "*"
            rows.append({"grant": str(grant), "env": env,
                         "actions": _allowed(policy, grant.role, app, env, patterns)})
    return rows
