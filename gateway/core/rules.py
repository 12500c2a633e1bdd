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

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from gateway.core.constraints import ConstraintSet
from gateway.core.policy import PolicyEngine
from gateway.core.registry import did_you_mean
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
    check_roles(policy)
    constraints = load_constraints(constraints_file, {p.action for p in produced})
    check_constraint_names(constraints, policy.roles(), environments)
    return Rules(policy, constraints)


def check_environments(policy: PolicyEngine, environments: frozenset[str]) -> None:
    """A policy line's environment must be one an app can be in (or a glob matching one): a typo
    in a deny line (`prodution`) would deny nothing, silently."""
    for rule in policy.policy_lines():
        pattern = rule[2]
        if not any(fnmatchcase(env, pattern) for env in environments):
            raise ConfigError(f"{policy.policy_path}: policy line 'p, {', '.join(rule)}' names environment "
                              f"{pattern!r}, which no app is in{did_you_mean(pattern, environments)}; "
                              f"environments: {', '.join(sorted(environments))} (environments.rules, "
                              "environments.default)")


def check_roles(policy: PolicyEngine) -> None:
    """A role is defined by `p,` lines of its own; a name that has none is a typo, which would
    otherwise create a role silently (`g, deployr, viewer` next to `deployer`). So every role a
    `g,` line names, child or parent, has a `p,` line of its own, and a role whose own lines are
    all `deny` is in some `g,` line (inheriting what it may do, or passing its denies on): alone,
    it allows nothing and its denies bind no one (`p, deployr, *, production, secrets:write, deny`
    would deny nothing). Grants are checked against the same roles (registry.unknown_name)."""
    own: dict[str, set[str]] = {}
    for rule in policy.policy_lines():
        own.setdefault(rule[0], set()).add(rule[4])
    defined = set(own)
    related: set[str] = set()
    for child, parent in policy.role_lines():
        related.update((child, parent))
        for role in (child, parent):
            if role not in defined:
                raise ConfigError(f"{policy.policy_path}: role line 'g, {child}, {parent}' names role {role!r}, "
                                  f"which has no `p,` line of its own{did_you_mean(role, defined)}; a role is "
                                  "defined by its own permission lines: fix the name, or give the role a line")
    for role, effects in sorted(own.items()):
        if effects == {"deny"} and role not in related:
            raise ConfigError(f"{policy.policy_path}: role {role!r} has only deny lines and no `g,` line, so it "
                              f"allows nothing and its denies bind no one{did_you_mean(role, defined - {role})}; "
                              f"fix the name, or add `g, {role}, PARENT_ROLE` or `g, SOME_ROLE, {role}`")


def check_constraint_names(constraints: ConstraintSet, roles: set[str], environments: frozenset[str]) -> None:
    """A constraint's roles and environments (globs) must each match a role of the policy and an
    environment some app is in: `roles: [deployr]` would constrain no one, silently."""
    for constraint in constraints.constraints:
        for key, patterns, known in (("roles", constraint.roles, roles), ("envs", constraint.envs, environments)):
            for pattern in patterns:
                if not any(fnmatchcase(name, pattern) for name in known):
                    raise ConfigError(f"{constraints.source}: constraint '{constraint.name}' {key} names {pattern!r}, "
                                      f"which matches no {'role of the policy' if key == 'roles' else 'environment'}"
                                      f"{did_you_mean(pattern, known)}; known: {', '.join(sorted(known))}")


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
