"""The rules a gateway serves at one moment: the Casbin policy and the request-shape constraints,
loaded together and checked against the actions the surfaces produce.

Every surface declares the actions its operations map to (`ProducedAction`, with where each is
declared). Policy and surfaces must name the same actions, both ways: a policy line whose action
no surface produces (a typo in a deny line would deny nothing, silently) and an action no policy
line mentions (an operation nobody can be granted, or forgot) both stop the load naming the
offending line. A load that fails leaves the last good `Rules` serving; a new one replaces the
old whole (`Authorizer.install`), never in parts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from gateway.core.constraints import ConstraintSet
from gateway.core.policy import PolicyEngine
from gateway.errors import ConfigError

# The gateway's own API (api/): token administration and explain, granted to token-admin.
GATEWAY_ACTIONS = frozenset({"gateway:mint", "gateway:list", "gateway:show", "gateway:revoke", "gateway:rotate",
                             "gateway:explain", "gateway:audit"})


@dataclass(frozen=True, slots=True)
class ProducedAction:
    action: str
    source: str  # where a surface declares it (a route file entry), for messages


@dataclass(frozen=True, eq=False)
class Rules:
    policy: PolicyEngine
    constraints: ConstraintSet


def load_rules(model: Path, policy_file: Path, constraints_file: Path | None,
               produced: Iterable[ProducedAction], environments: frozenset[str]) -> Rules:
    produced = list(produced)
    policy = PolicyEngine(model, policy_file)
    check_cross_references(policy, produced)
    check_environments(policy, environments)
    return Rules(policy, load_constraints(constraints_file, {p.action for p in produced}))


def check_environments(policy: PolicyEngine, environments: frozenset[str]) -> None:
    """A policy line's environment must be one an app can be in (or a glob matching one): a typo
    in a deny line (`prodution`) would deny nothing, silently."""
    for rule in policy.policy_lines():
        pattern = rule[2]
        if not any(fnmatchcase(env, pattern) for env in environments):
            close = difflib.get_close_matches(pattern, sorted(environments), n=1, cutoff=0.6)
            raise ConfigError(f"{policy.policy_path}: policy line 'p, {', '.join(rule)}' names environment "
                              f"{pattern!r}, which no app is in" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; environments: {', '.join(sorted(environments))} (environments.rules, "
                              "environments.default)")


def load_constraints(path: Path | None, known: set[str]) -> ConstraintSet:
    constraints = ConstraintSet.load(path)
    for constraint in constraints.constraints:
        for pattern in constraint.actions:
            if not any(fnmatchcase(action, pattern) for action in known):
                raise ConfigError(f"{constraints.source}: constraint '{constraint.name}' names action {pattern!r}, "
                                  "which no route produces")
    return constraints


def check_cross_references(policy: PolicyEngine, produced: Iterable[ProducedAction]) -> None:
    produced = list(produced)
    known = {p.action for p in produced} | GATEWAY_ACTIONS
    lines = policy.policy_lines()
    for rule in lines:
        pattern = rule[3]
        if not any(fnmatchcase(action, pattern) for action in known):
            raise ConfigError(f"{policy.policy_path}: policy line 'p, {', '.join(rule)}' names action {pattern!r}, "
                              "which no route produces; check the spelling against the route files")
    for item in produced:
        if not any(fnmatchcase(item.action, rule[3]) for rule in lines):
            raise ConfigError(f"{item.source}: action {item.action!r} appears in no line of {policy.policy_path}; "
                              "grant it to a role (or deny it explicitly)")
