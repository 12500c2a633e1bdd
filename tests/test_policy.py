"""The decision (DESIGN section 4) over the shipped policy files: grants ∩ Casbin.

A role table for every shipped role x every action a route produces x three environments, grant
coverage, org-level and gateway targets, the refusal message, the verdict cache across reloads,
and the environment rules (DESIGN section 5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import parse_grants
from gateway.core.policy import Decision, PolicyEngine, decide
from gateway.core.rules import GATEWAY_ACTIONS
from gateway.surfaces.routes import RouteTable

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "policies/model.conf"
POLICY = REPO / "policies/policy.csv"
ROUTE_ACTIONS = sorted(RouteTable.load([REPO / "policies/routes/fly-machines.yaml"]).actions())
ENVIRONMENTS = ["production", "staging", "development"]
# config.example.yaml's environment rules: a pattern grant stays in its pattern's own environment.
ENV_OF = EnvironmentResolver((("*-prod", "production"), ("*-staging", "staging")), "development").resolve
APP_FAMILIES = ("apps", "machines", "leases", "metadata", "secrets", "secretkeys", "volumes", "ips", "certificates")

VIEWER = {"apps:read", "apps:list", "machines:read", "leases:read", "metadata:read", "secrets:list", "volumes:read",
          "ips:read", "certificates:read", "platform:read"}
DEPLOYER = VIEWER | {"apps:create", "machines:deploy", "machines:control", "leases:acquire", "leases:release",
                     "metadata:write", "secrets:write", "volumes:create", "volumes:extend", "ips:allocate",
                     "certificates:create"}
OPERATOR = VIEWER | {"machines:control", "leases:acquire", "leases:release"}
ADMIN = VIEWER | {a for a in ROUTE_ACTIONS if a.split(":")[0] in APP_FAMILIES}


def expected_allowed(role: str, action: str, env: str) -> bool:
    if role == "deployer" and action == "secrets:write":
        return env != "production"
    table = {"viewer": VIEWER, "deployer": DEPLOYER, "operator": OPERATOR, "admin": ADMIN, "token-admin": set()}
    return action in table[role]


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(MODEL, POLICY)


def ask(engine: PolicyEngine, grants: list[str], *, app: str | None, env: str | None, action: str,
        name: str = "ci", gateway_target: bool = False, org_filtered: bool = False) -> Decision:
    return decide(parse_grants(grants), engine, app=app, env=env, action=action, token_name=name,
                  env_of=ENV_OF, gateway_target=gateway_target, org_filtered=org_filtered)


def test_the_action_list_is_representative() -> None:
    # Guards the table below against an empty or shrunken action list.
    for action in ("apps:delete", "machines:exec", "secrets:read", "secretkeys:use", "tokens:mint",
                   "orgs:list-machines", "volumes:snapshot", "certificates:write"):
        assert action in ROUTE_ACTIONS
    assert DEPLOYER.issubset(ADMIN)
    assert OPERATOR.issubset(ADMIN)
    assert not any(a.startswith(("tokens:", "orgs:")) for a in ADMIN)


def test_shipped_roles(engine: PolicyEngine) -> None:
    assert {"viewer", "deployer", "operator", "admin", "token-admin"} <= engine.roles()


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("action", ROUTE_ACTIONS)
@pytest.mark.parametrize("role", ["viewer", "deployer", "operator", "admin", "token-admin"])
def test_role_table(engine: PolicyEngine, role: str, action: str, env: str) -> None:
    decision = ask(engine, [f"{role}@app:web"], app="web", env=env, action=action)
    assert decision.allowed is expected_allowed(role, action, env), decision.reason
    if decision.allowed:
        assert decision.grant is not None and str(decision.grant) == f"{role}@app:web"


@pytest.mark.parametrize("action", sorted({"orgs:list-machines", "orgs:list-volumes", "tokens:mint", "tokens:verify",
                                           "tokens:introspect", "tokens:kms", "tokens:oidc"}))
@pytest.mark.parametrize("role", ["viewer", "deployer", "operator", "admin", "token-admin"])
def test_no_role_gets_tokens_or_orgs_at_org_level(engine: PolicyEngine, role: str, action: str) -> None:
    assert not ask(engine, [f"{role}@app:*"], app=None, env=None, action=action).allowed
    assert not ask(engine, [f"{role}@app:*"], app=None, env=None, action=action, org_filtered=True).allowed


# --- grant coverage --------------------------------------------------------------------------

COVERAGE: list[tuple[str, str, str, str, bool]] = [
    ("deployer@app:web-pr-*", "web-pr-42", "development", "machines:deploy", True),
    ("deployer@app:web-pr-*", "web-prod", "production", "machines:deploy", False),
    ("deployer@app:web-pr-*", "api-web-pr-1", "development", "machines:deploy", False),
    ("viewer@app:web-?", "web-a", "development", "apps:read", True),
    ("viewer@app:web-?", "web-ab", "development", "apps:read", False),
    ("viewer@app:web*-prod", "web-prod", "production", "apps:read", True),
    ("viewer@app:web", "web", "production", "apps:read", True),
    ("viewer@app:web", "web-2", "production", "apps:read", False),
    ("deployer@env:staging", "api-staging", "staging", "machines:deploy", True),
    ("deployer@env:staging", "api-prod", "production", "machines:deploy", False),
    ("deployer@env:staging", "api-dev", "development", "machines:deploy", False),
    ("admin@app:*", "anything", "production", "apps:delete", True),
    ("token-admin@gateway", "web", "staging", "apps:read", False),
    ("admin@gateway", "web", "staging", "apps:read", False),
]


@pytest.mark.parametrize(("grant", "app", "env", "action", "allowed"), COVERAGE,
                         ids=[f"{g} {a} ({e}) -> {ok}" for g, a, e, _, ok in COVERAGE])
def test_grant_coverage(engine: PolicyEngine, grant: str, app: str, env: str, action: str, allowed: bool) -> None:
    decision = ask(engine, [grant], app=app, env=env, action=action)
    assert decision.allowed is allowed, decision.reason
    if not allowed:
        assert decision.reason == f"token 'ci' has no grant that covers app {app} (environment {env})"


def test_a_pattern_grant_in_another_environment_is_named(engine: PolicyEngine) -> None:
    decision = ask(engine, ["deployer@app:web-pr-*"], app="web-pr-1-prod", env="production", action="apps:create")
    assert not decision.allowed
    assert decision.reason.startswith("token 'ci' has no grant that covers app web-pr-1-prod (environment production)")
    assert "deployer@app:web-pr-* matches the name but stays in environment development" in decision.reason


def test_uncovered_reason_names_token_app_and_environment(engine: PolicyEngine) -> None:
    decision = ask(engine, ["admin@app:web-staging", "deployer@env:staging"], app="web-prod", env="production",
                   action="machines:read", name="nightly")
    assert not decision.allowed
    assert decision.grant is None
    assert decision.reason == "token 'nightly' has no grant that covers app web-prod (environment production)"


def test_any_covering_grant_that_allows_wins(engine: PolicyEngine) -> None:
    grants = ["deployer@app:web-prod", "admin@app:web*-prod"]
    decision = ask(engine, grants, app="web-prod", env="production", action="secrets:write")
    assert decision.allowed
    assert str(decision.grant) == "admin@app:web*-prod"
    assert not ask(engine, grants[:1], app="web-prod", env="production", action="secrets:write").allowed


@pytest.mark.parametrize("action", sorted(GATEWAY_ACTIONS))
def test_token_admin_covers_only_gateway_targets(engine: PolicyEngine, action: str) -> None:
    assert ask(engine, ["token-admin@gateway"], app=None, env=None, action=action, gateway_target=True).allowed
    # The same action against an app or the organization: the gateway grant covers neither.
    app_level = ask(engine, ["token-admin@gateway"], app="web", env="staging", action=action)
    assert app_level.reason == "token 'ci' has no grant that covers app web (environment staging)"
    org_level = ask(engine, ["token-admin@gateway"], app=None, env=None, action=action)
    assert org_level.reason == "token 'ci' has no grant that covers the organization (org-level operation)"
    # An app grant, even org-wide and for token-admin, does not reach the gateway's admin API.
    for grant in ("token-admin@app:*", "admin@app:*"):
        decision = ask(engine, [grant], app=None, env=None, action=action, gateway_target=True)
        assert not decision.allowed
        assert decision.reason == "token 'ci' has no grant that covers the gateway's admin API"


def test_non_token_admin_gateway_grant_is_denied_by_policy(engine: PolicyEngine) -> None:
    decision = ask(engine, ["admin@gateway"], app=None, env=None, action="gateway:mint", gateway_target=True)
    assert not decision.allowed
    assert "does not grant gateway:mint on the gateway's admin API" in decision.reason


# --- org-level operations ----------------------------------------------------------------------


@pytest.mark.parametrize("grant", ["viewer@app:web", "viewer@app:web-pr-*", "viewer@env:staging", "viewer@app:*"])
def test_platform_read_at_org_level_for_any_viewer_grant(engine: PolicyEngine, grant: str) -> None:
    assert ask(engine, [grant], app=None, env=None, action="platform:read").allowed


def test_platform_read_needs_a_role_that_has_it(engine: PolicyEngine) -> None:
    assert not ask(engine, ["token-admin@app:web"], app=None, env=None, action="platform:read").allowed
    assert not ask(engine, ["token-admin@gateway"], app=None, env=None, action="platform:read").allowed


def test_org_wide_actions_need_an_org_wide_grant(engine: PolicyEngine) -> None:
    narrow = ask(engine, ["viewer@app:web"], app=None, env=None, action="apps:list")
    assert not narrow.allowed
    assert narrow.reason == "token 'ci' has no grant that covers the organization (org-level operation)"
    assert ask(engine, ["viewer@app:web"], app=None, env=None, action="apps:list", org_filtered=True).allowed
    assert ask(engine, ["viewer@app:*"], app=None, env=None, action="apps:list").allowed


def test_org_listing_of_machines_is_denied_even_for_org_wide_admin(engine: PolicyEngine) -> None:
    decision = ask(engine, ["admin@app:*"], app=None, env=None, action="orgs:list-machines")
    assert not decision.allowed
    assert decision.reason.startswith(
        "token 'ci' does not grant orgs:list-machines on the organization (org-level operation)")


# --- the refusal message -------------------------------------------------------------------------


def test_message_when_the_role_lacks_the_action(engine: PolicyEngine) -> None:
    decision = ask(engine, ["viewer@app:web"], app="web", env="staging", action="machines:deploy", name="ci-bot")
    assert not decision.allowed
    assert decision.reason.startswith("token 'ci-bot' does not grant machines:deploy on app web (environment staging)")
    assert "viewer" in decision.reason


def test_message_when_an_explicit_deny_decides(engine: PolicyEngine) -> None:
    decision = ask(engine, ["deployer@app:web-prod"], app="web-prod", env="production", action="secrets:write",
                   name="deploy-prod")
    assert not decision.allowed
    assert decision.reason.startswith(
        "token 'deploy-prod' does not grant secrets:write on app web-prod (environment production)")
    assert "deployer" in decision.reason
    assert decision.rule[-1] == "deny"
    assert "secrets:write" in decision.rule


# --- the verdict cache across reloads ------------------------------------------------------------


@pytest.fixture
def editable(tmp_path: Path) -> tuple[PolicyEngine, Path]:
    model, policy = tmp_path / "model.conf", tmp_path / "policy.csv"
    shutil.copyfile(MODEL, model)
    shutil.copyfile(POLICY, policy)
    return PolicyEngine(model, policy), policy


def test_reload_drops_cached_verdicts_granting(editable: tuple[PolicyEngine, Path]) -> None:
    engine, policy = editable
    assert not ask(engine, ["viewer@app:web"], app="web", env="staging", action="machines:deploy").allowed
    hits = engine.cache_hits
    assert not ask(engine, ["viewer@app:web"], app="web", env="staging", action="machines:deploy").allowed
    assert engine.cache_hits == hits + 1
    policy.write_text(policy.read_text() + "\np, viewer, *, staging, machines:deploy, allow\n")
    # Not re-read until reload: the file alone changes nothing.
    assert not ask(engine, ["viewer@app:web"], app="web", env="staging", action="machines:deploy").allowed
    engine.reload()
    assert ask(engine, ["viewer@app:web"], app="web", env="staging", action="machines:deploy").allowed
    assert not ask(engine, ["viewer@app:web"], app="web", env="production", action="machines:deploy").allowed


def test_reload_drops_cached_verdicts_revoking(editable: tuple[PolicyEngine, Path]) -> None:
    engine, policy = editable
    assert ask(engine, ["admin@app:web"], app="web", env="production", action="machines:exec").allowed
    assert ask(engine, ["admin@app:web"], app="web", env="production", action="machines:exec").allowed
    policy.write_text(policy.read_text() + "\np, admin, *, production, machines:exec, deny\n")
    engine.reload()
    decision = ask(engine, ["admin@app:web"], app="web", env="production", action="machines:exec")
    assert not decision.allowed
    assert decision.rule[-1] == "deny"
    assert ask(engine, ["admin@app:web"], app="web", env="staging", action="machines:exec").allowed


# --- environments ----------------------------------------------------------------------------------


def test_environment_first_match_wins() -> None:
    resolver = EnvironmentResolver((("web-prod*", "production"), ("web-*", "staging"), ("*-prod", "production")),
                                   "development")
    assert resolver.resolve("web-prod") == "production"
    assert resolver.resolve("web-prod-eu") == "production"
    assert resolver.resolve("web-pr-1") == "staging"
    assert resolver.resolve("api-prod") == "production"
    assert resolver.resolve("api") == "development"
    # Asked again (cached): the same answers.
    assert [resolver.resolve(a) for a in ("web-prod", "web-pr-1", "api")] == ["production", "staging", "development"]


def test_environment_rule_order_matters() -> None:
    broad_first = EnvironmentResolver((("web-*", "staging"), ("web-prod", "production")), "development")
    narrow_first = EnvironmentResolver((("web-prod", "production"), ("web-*", "staging")), "development")
    assert broad_first.resolve("web-prod") == "staging"
    assert narrow_first.resolve("web-prod") == "production"


def test_environment_globs_are_case_sensitive_and_whole_name() -> None:
    resolver = EnvironmentResolver((("*-prod", "production"),), "staging")
    assert resolver.resolve("api-prod") == "production"
    assert resolver.resolve("api-prod-2") == "staging"
    assert resolver.resolve("api-PROD") == "staging"
