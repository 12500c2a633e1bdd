"""Casbin policies and the decision: grants ∩ policy (DESIGN section 4).

`PolicyEngine` owns the Casbin enforcer loaded from `policy.model` and `policy.policy`.
Casbin scans policy lines linearly (~0.4 ms at 20 lines, ~70 ms at 10,000), so verdicts are
cached by (role, app, environment, action); the cache is bounded and replaced whole when the
policy is reloaded, so a stale verdict can never outlive the policy that produced it.

`decide` is pure: a request resolved to (app, environment, action) is allowed iff some grant
covers the app (a pattern grant only in its pattern's own environment, see grants.py) and
Casbin allows that grant's role there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import casbin

from gateway.core.grants import EnvironmentOf, Grant
from gateway.errors import ConfigError

# Placeholders for requests with no app: org-level operations and the gateway's own API.
ORG_TARGET = "*"
GATEWAY_TARGET = "_gateway"
_CACHE_LIMIT = 65_536  # verdicts kept; the cache is replaced whole when full


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rule: tuple[str, ...]  # the policy line that decided, empty when nothing matched


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    grant: Grant | None = None
    rule: tuple[str, ...] = ()
    # A derived token's: the grant of each token it descends from that allows the same (their
    # constraints apply too).
    chain: tuple[Grant, ...] = ()


class PolicyEngine:
    def __init__(self, model: Path, policy: Path) -> None:
        self.model_path = model
        self.policy_path = policy
        self.cache_hits = 0
        self.generation = 0  # bumped by `reload`: caches built on this engine check it
        self._enforcer = self._load(model, policy)
        self._cache: dict[tuple[str, str, str, str], Verdict] = {}

    @staticmethod
    def _load(model: Path, policy: Path) -> Any:
        for label, path in (("policy.model", model), ("policy.policy", policy)):
            if not path.is_file():
                raise ConfigError(f"{label} file {path} does not exist")
        _check_model_text(model)  # casbin's own errors on a broken model name nothing useful
        try:
            enforcer = casbin.Enforcer(str(model), str(policy))
        except Exception as exc:  # casbin raises bare Exceptions for bad files
            raise ConfigError(f"policy files {model} / {policy} cannot be loaded: {exc}") from None
        _check_model(enforcer, model)
        _check_policy_lines(policy)
        try:
            # Casbin compiles the matcher on first use: decide once now, so a broken matcher is a
            # load error rather than a 500 on every request after a reload.
            enforcer.enforce_ex("_probe_role", "_probe_app", "_probe_env", "_probe:action")
        except Exception as exc:
            raise ConfigError(f"policy model {model}: the matcher cannot be evaluated ({exc.__class__.__name__}: "
                              f"{exc})") from None
        return enforcer

    def reload(self) -> None:
        enforcer = self._load(self.model_path, self.policy_path)
        self._enforcer, self._cache = enforcer, {}
        self.generation += 1

    def roles(self) -> set[str]:
        roles = set(self._enforcer.get_all_subjects())
        for child, parent in ((rule[0], rule[1]) for rule in self._enforcer.get_grouping_policy()):
            roles.update((child, parent))
        return roles

    def includes(self, role: str, other: str) -> bool:
        """Does `role` include `other` (the same role, or one it inherits through `g` lines)?"""
        return role == other or other in self._enforcer.get_implicit_roles_for_user(role)

    def role_lines(self) -> list[tuple[str, str]]:
        """`g, CHILD, PARENT` lines as (child, parent)."""
        return [(str(rule[0]), str(rule[1])) for rule in self._enforcer.get_grouping_policy()]

    def policy_lines(self) -> list[tuple[str, ...]]:
        return [tuple(str(x) for x in rule) for rule in self._enforcer.get_policy()]

    def verdict(self, role: str, app: str, env: str, action: str) -> Verdict:
        key = (role, app, env, action)
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        allowed, rule = self._enforcer.enforce_ex(role, app, env, action)
        verdict = Verdict(bool(allowed), tuple(str(x) for x in rule))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {}
        self._cache[key] = verdict
        return verdict


_REQUEST_TOKENS = ["r_sub", "r_app", "r_env", "r_act"]
_POLICY_TOKENS = ["p_sub", "p_app", "p_env", "p_act", "p_eft"]


_MODEL_SECTIONS = {"request_definition": "r = sub, app, env, act", "policy_definition": "p = sub, app, env, act, eft",
                   "role_definition": "g = _, _", "policy_effect": "e = ...", "matchers": "m = ..."}


def _check_model_text(model: Path) -> None:
    """Every section the gateway's model needs, each with its key, and nothing but `[section]`,
    `key = value` and comments."""
    sections: dict[str, set[str]] = {}
    current: str | None = None
    continued = False
    for number, raw in enumerate(model.read_text().splitlines(), start=1):
        line = raw.strip()
        if continued:  # the rest of a value broken with a trailing backslash
            continued = line.endswith("\\")
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections.setdefault(current, set())
            continue
        key, equals, _ = line.partition("=")
        if not equals or current is None or not key.strip():
            raise ConfigError(f"policy model {model}:{number}: expected `[section]` or `key = value`, "
                              f"found {line[:60]!r}; start from the shipped policies/model.conf")
        sections[current].add(key.strip())
        continued = line.endswith("\\")
    missing = [f"[{name}] with `{example}`" for name, example in _MODEL_SECTIONS.items()
               if example.split(" ", 1)[0] not in sections.get(name, set())]
    if missing:
        raise ConfigError(f"policy model {model} lacks {'; '.join(missing)}; start from the shipped "
                          "policies/model.conf")


def _check_model(enforcer: Any, model: Path) -> None:
    """The gateway asks (role, app, env, action) and reads policy lines in that order."""
    definitions = enforcer.get_model().model
    request = list(definitions["r"]["r"].tokens) if "r" in definitions and "r" in definitions["r"] else []
    policy = list(definitions["p"]["p"].tokens) if "p" in definitions and "p" in definitions["p"] else []
    if request != _REQUEST_TOKENS:
        raise ConfigError(f"policy model {model}: request_definition must be `r = sub, app, env, act`")
    if policy != _POLICY_TOKENS:
        raise ConfigError(f"policy model {model}: policy_definition must be `p = sub, app, env, act, eft`")


def _check_policy_lines(policy: Path) -> None:
    """Casbin skips lines it cannot use; a skipped deny would silently allow. Refuse them instead."""
    for number, raw in enumerate(policy.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        where = f"{policy}:{number}: '{line}'"
        if fields[0] == "p":
            if len(fields) != 6 or not all(fields[1:]):
                raise ConfigError(f"{where}: a policy line is `p, ROLE, APP_GLOB, ENV_GLOB, ACTION_GLOB, allow|deny`")
            if fields[5] not in ("allow", "deny"):
                raise ConfigError(f"{where}: the effect must be allow or deny, not {fields[5]!r}")
        elif fields[0] == "g":
            if len(fields) != 3 or not all(fields[1:]):
                raise ConfigError(f"{where}: a role line is `g, CHILD_ROLE, PARENT_ROLE`")
        else:
            raise ConfigError(f"{where}: lines start with `p,` (a permission) or `g,` (role inheritance)")


def decide(grants: tuple[Grant, ...], policy: PolicyEngine, *, app: str | None, env: str | None,
           action: str, token_name: str, env_of: EnvironmentOf, gateway_target: bool = False,
           org_filtered: bool = False) -> Decision:
    """Is `action` on `app` allowed for a token carrying `grants`? Pure apart from the cache."""
    if gateway_target:
        target_desc = "the gateway's admin API"
        candidates = [g for g in grants if g.kind == "gateway"]
        app_key = env_key = GATEWAY_TARGET
    elif app is None:
        # Org-level operations: only grants that cover every app speak for the organization,
        # except harmless platform reads and listings the gateway filters to the token's apps.
        target_desc = "the organization (org-level operation)"
        candidates = [g for g in grants if g.kind != "gateway" and (
            g.is_org_wide or org_filtered or action == "platform:read")]
        app_key = env_key = ORG_TARGET
    else:
        assert env is not None
        target_desc = f"app {app} (environment {env})"
        candidates = [g for g in grants if g.kind != "gateway" and g.covers_app(app, env, env_of)]
        app_key, env_key = app, env
    if not candidates:
        return Decision(False, f"token '{token_name}' has no grant that covers {target_desc}"
                               + _other_environment(grants, app, env_of))
    last_rule: tuple[str, ...] = ()
    for grant in candidates:
        verdict = policy.verdict(grant.role, app_key, env_key, action)
        if verdict.allowed:
            return Decision(True, f"{grant} allows {action} on {target_desc}", grant, verdict.rule)
        last_rule = verdict.rule or last_rule
    roles = ", ".join(sorted({g.role for g in candidates}))
    why = f" (denied by policy line: {', '.join(last_rule)})" if last_rule and last_rule[-1] == "deny" else ""
    return Decision(False, f"token '{token_name}' does not grant {action} on {target_desc}; "
                           f"its role(s) there: {roles}{why}", None, last_rule)


def _other_environment(grants: tuple[Grant, ...], app: str | None, env_of: EnvironmentOf) -> str:
    """Why a pattern grant whose glob matches the name does not cover the app: another environment."""
    if app is None:
        return ""
    stopped = [f"{g} matches the name but stays in environment {g.environment(env_of)}, its pattern's own"
               for g in grants if g.is_pattern and g.matches_name(app)]
    if not stopped:
        return ""
    return ("; " + "; ".join(stopped) + " (a pattern grant never reaches another environment: grant the app "
            "by name, or an env: grant)")
