"""`oidc.trust` rules: strict config validation, claim matching, how rules combine, time checks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import build_config
from gateway.errors import ConfigError
from gateway.oidc.exchange import (
    DEFAULT_TTL_S,
    LEEWAY_S,
    MAX_AGE_S,
    ClaimCondition,
    TrustRule,
    evaluate,
    issuer_id,
    parse_jwks,
    parse_trust_rules,
    rule_mismatches,
    time_problems,
)
from tests.test_oidc_issuer import new_key

REPO = Path(__file__).resolve().parent.parent
GITHUB = "https://token.actions.githubusercontent.com"
GITLAB = "https://gitlab.com"


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "web-deploy", "issuer": GITHUB, "audience": "https://scopegate.example",
                            "claims": {"repository": "acme/web", "ref": "refs/heads/main"},
                            "grants": ["deployer@app:web-staging"], "ttl": "10m"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def config_error(*rules: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_config({"oidc": {"trust": list(rules)}}, base_dir=Path("/tmp"), source="test.yaml", environ={})
    return str(info.value)


# --- config -------------------------------------------------------------------------------------

def test_a_rule_parses_with_defaults() -> None:
    config = build_config({"oidc": {"trust": [rule(ttl=None, jwks_url=f"{GITHUB}/.well-known/jwks")]}},
                          base_dir=Path("/tmp"), source="test.yaml", environ={})
    (parsed,) = config.oidc_trust
    assert parsed == TrustRule(name="web-deploy", issuer=GITHUB, audience="https://scopegate.example",
                               grants=("deployer@app:web-staging",),
                               claims=(ClaimCondition("repository", ("acme/web",)),
                                       ClaimCondition("ref", ("refs/heads/main",))),
                               ttl_s=DEFAULT_TTL_S, jwks_url=f"{GITHUB}/.well-known/jwks")
    assert parsed.ttl_s == 15 * 60


def test_rules_come_from_the_environment_as_json() -> None:
    environ = {"SCOPEGATE_OIDC__TRUST": json.dumps([rule(), rule(name="other", ttl="1h")])}
    config = build_config({}, base_dir=Path("/tmp"), source="test.yaml", environ=environ)
    assert [r.name for r in config.oidc_trust] == ["web-deploy", "other"]
    assert config.oidc_trust[1].ttl_s == 3600
    bad = {"SCOPEGATE_OIDC__TRUST": json.dumps([rule(ttl="2h")])}
    with pytest.raises(ConfigError, match=r"oidc\.trust\[0\]\.ttl"):
        build_config({}, base_dir=Path("/tmp"), source="test.yaml", environ=bad)


@pytest.mark.parametrize(
    ("bad_rule", "named"),
    [
        (rule(repository="acme/web"), "oidc.trust[0].repository"),           # unknown key
        (rule(name=None), "oidc.trust[0].name"),
        (rule(issuer=None), "oidc.trust[0].issuer"),
        (rule(audience=None), "oidc.trust[0].audience"),
        (rule(grants=None), "oidc.trust[0].grants"),
        (rule(name="has space"), "oidc.trust[0].name"),
        (rule(issuer="token.actions.githubusercontent.com"), "oidc.trust[0].issuer"),
        (rule(issuer="http://token.actions.githubusercontent.com"), "oidc.trust[0].issuer"),
        (rule(issuer=f"{GITHUB}?x=1"), "oidc.trust[0].issuer"),
        (rule(audience=""), "oidc.trust[0].audience"),
        (rule(audience=["a", "b"]), "oidc.trust[0].audience"),
        (rule(jwks_url="ftp://keys.example/jwks"), "oidc.trust[0].jwks_url"),
        (rule(jwks_url="http://127.0.0.1:9/jwks"), "oidc.trust[0].jwks_url"),  # https issuer, http keys
        (rule(grants=[]), "oidc.trust[0].grants"),
        (rule(grants=["deployer"]), "oidc.trust[0].grants"),
        (rule(grants=["token-admin@gateway"]), "oidc.trust[0].grants"),
        (rule(ttl="2h"), "oidc.trust[0].ttl"),
        (rule(ttl="soon"), "oidc.trust[0].ttl"),
        (rule(ttl=True), "oidc.trust[0].ttl"),
        (rule(claims=["repository"]), "oidc.trust[0].claims"),
        (rule(claims={"repository": None}), "oidc.trust[0].claims.repository"),
        (rule(claims={"repository": {"a": 1}}), "oidc.trust[0].claims.repository"),
        (rule(claims={"repository": []}), "oidc.trust[0].claims.repository"),
        (rule(claims={"repository": "*"}), "oidc.trust[0].claims.repository"),
        (rule(claims={"repository_id": "12*"}), "oidc.trust[0].claims.repository_id"),
        (rule(claims={"aud": "x"}), "oidc.trust[0].claims.aud"),
        (rule(claims={"iss": GITHUB}), "oidc.trust[0].claims.iss"),
        ("not-a-mapping", "oidc.trust[0]"),
    ],
)
def test_bad_rules_name_the_key(bad_rule: Any, named: str) -> None:
    assert named in config_error(bad_rule)


def test_second_rule_errors_name_its_index() -> None:
    assert "oidc.trust[1].ttl" in config_error(rule(), rule(name="b", ttl="3h"))
    assert "oidc.trust[1].name" in config_error(rule(), rule())  # duplicate names
    mismatch = config_error(rule(), rule(name="b", jwks_url=f"{GITHUB}/keys"))
    assert "oidc.trust[1].jwks_url" in mismatch
    assert "oidc.trust" in config_error("github")  # not a list


def test_loopback_issuers_may_use_plain_http() -> None:
    (parsed,) = parse_trust_rules([rule(issuer="http://127.0.0.1:8443", jwks_url="http://localhost:8443/k")])
    assert parsed.issuer == "http://127.0.0.1:8443"


def test_rule_grant_roles_are_checked_against_the_policy() -> None:
    from gateway.oidc.exchange import TokenExchanger

    rules = parse_trust_rules([rule(grants=["deployr@app:web"])])
    with pytest.raises(ConfigError, match=r"oidc\.trust\[0\]\.grants.*deployr"):
        TokenExchanger(rules, registry=SimpleNamespace(environments=frozenset({"staging"})),  # type: ignore[arg-type]
                       store=None, gateway_audience="scopegate", env_of=lambda app: "staging",  # type: ignore[arg-type]
                       known_roles={"deployer", "viewer"})


# --- matching -----------------------------------------------------------------------------------

def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": GITHUB, "aud": "https://scopegate.example",
                            "sub": "repo:acme/web:ref:refs/heads/main", "repository": "acme/web",
                            "repository_id": "123456", "ref": "refs/heads/main", "event_name": "push"}
    base.update(overrides)
    return base


def test_exact_values_globs_and_alternatives() -> None:
    (parsed,) = parse_trust_rules([rule(claims={"repository": "acme/*", "ref": ["refs/heads/main", "refs/tags/v?.*"],
                                                "repository_id": 123456, "event_name": "push"})])
    assert rule_mismatches(parsed, claims()) == []
    assert rule_mismatches(parsed, claims(ref="refs/tags/v1.2")) == []
    assert rule_mismatches(parsed, claims(repository_id=123456)) == []  # a numeric claim compares as text
    assert rule_mismatches(parsed, claims(ref="refs/tags/v10.2")) != []
    assert rule_mismatches(parsed, claims(repository="acme-evil/web")) != []
    assert rule_mismatches(parsed, claims(repository="ACME/web")) != []  # case-sensitive
    assert rule_mismatches(parsed, claims(repository_id="1234567")) != []
    assert rule_mismatches(parsed, claims(repository_id="0123456")) != []  # ids exactly, not numerically
    assert rule_mismatches(parsed, claims(repository_id=123456.0)) != []
    assert rule_mismatches(parsed, claims(event_name=["push"])) != []  # lists never match a value


def test_glob_special_characters_are_literal() -> None:
    (parsed,) = parse_trust_rules([rule(claims={"ref": "refs/heads/[a-z]*", "repository": "acme/web.api"})])
    assert rule_mismatches(parsed, claims(ref="refs/heads/[a-z]-x", repository="acme/web.api")) == []
    assert rule_mismatches(parsed, claims(ref="refs/heads/b-x", repository="acme/web.api")) != []
    assert rule_mismatches(parsed, claims(ref="refs/heads/[a-z]-x", repository="acme/webXapi")) != []


def test_booleans_compare_as_true_false() -> None:
    (parsed,) = parse_trust_rules([rule(issuer=GITLAB, claims={"ref_protected": True})])
    gitlab = claims(iss=GITLAB)
    assert rule_mismatches(parsed, {**gitlab, "ref_protected": "true"}) == []
    assert rule_mismatches(parsed, {**gitlab, "ref_protected": True}) == []
    assert rule_mismatches(parsed, {**gitlab, "ref_protected": "false"}) != []


def test_mismatch_reasons_read_well() -> None:
    (parsed,) = parse_trust_rules([rule(claims={"repository": "acme/web", "environment": "production"})])
    assert rule_mismatches(parsed, claims(iss=GITLAB)) == [f"issuer mismatch: expected {GITHUB!r}, got {GITLAB!r}"]
    reasons = rule_mismatches(parsed, claims(aud="other", repository="acme/other"))
    assert reasons == ["audience mismatch: expected 'https://scopegate.example', got 'other'",
                       "claim repository: expected 'acme/web', got 'acme/other'",
                       "claim environment: expected 'production', the token has no such claim"]
    several = rule_mismatches(parsed, claims(aud=["https://scopegate.example", "other"], environment="production"))
    assert several and "several audiences" in several[0]
    assert rule_mismatches(parsed, claims(aud=["https://scopegate.example"], environment="production")) == []


def test_several_matching_rules_give_the_union_of_grants_and_the_shortest_ttl() -> None:
    rules = parse_trust_rules([
        rule(name="deploy", claims={"ref": "refs/heads/main"}, grants=["deployer@app:web-staging"], ttl="30m"),
        rule(name="read", claims={"ref": "refs/heads/*"}, grants=["viewer@app:web-*", "deployer@app:web-staging"],
             ttl="1h"),
        rule(name="prod", claims={"environment": "production"}, grants=["deployer@app:web-prod"], ttl="5m"),
    ])
    outcome = evaluate(rules, claims())
    assert [r.name for r in outcome.matched] == ["deploy", "read"]
    assert outcome.grants == ("deployer@app:web-staging", "viewer@app:web-*")
    assert outcome.ttl_s == 30 * 60
    assert [r.name for r, _ in outcome.refused] == ["prod"]
    branch = evaluate(rules, claims(ref="refs/heads/x"))
    assert [r.name for r in branch.matched] == ["read"] and branch.ttl_s == 3600


# --- times ----------------------------------------------------------------------------------------

def test_time_checks_with_leeway_and_maximum_age() -> None:
    now = int(time.time())
    fresh = {"iat": now, "nbf": now, "exp": now + 300}
    assert time_problems(fresh, now) == []
    assert time_problems({**fresh, "exp": now - LEEWAY_S + 1}, now) == []  # within the leeway
    assert "expired" in time_problems({**fresh, "exp": now - LEEWAY_S}, now)[0]
    assert time_problems({**fresh, "nbf": now + LEEWAY_S}, now) == []
    assert "nbf" in time_problems({**fresh, "nbf": now + LEEWAY_S + 1}, now)[0]
    assert "future" in time_problems({**fresh, "iat": now + LEEWAY_S + 1}, now)[0]
    assert time_problems({**fresh, "iat": now - MAX_AGE_S - LEEWAY_S}, now) == []
    assert "issued" in time_problems({**fresh, "iat": now - MAX_AGE_S - LEEWAY_S - 1}, now)[0]
    assert "no exp" in time_problems({"iat": now}, now)[0]
    assert "no iat" in time_problems({"exp": now + 10}, now)[0]
    assert "not a number" in time_problems({**fresh, "exp": "tomorrow"}, now)[0]
    assert "not a number" in time_problems({**fresh, "exp": True}, now)[0]
    assert "not a number" in time_problems({**fresh, "exp": float("nan")}, now)[0]


# --- keys ---------------------------------------------------------------------------------------

def test_jwks_parsing_keeps_only_usable_signing_keys() -> None:
    rsa, ec = new_key("RSA", "r1"), new_key("EC", "e1")
    doubled_a, doubled_b = new_key("RSA", "dup"), new_key("EC", "dup")
    no_kid = new_key("RSA").as_dict(private=False)
    no_kid.pop("kid")
    document = {"keys": [
        rsa.as_dict(private=True),                                  # private members are never imported
        ec.as_dict(private=False),
        {**new_key("RSA", "enc").as_dict(private=False), "use": "enc"},
        {**new_key("RSA", "ps").as_dict(private=False), "alg": "PS256"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        no_kid, doubled_a.as_dict(private=False), doubled_b.as_dict(private=False), "junk",
    ]}
    keys = parse_jwks(document)
    assert sorted(keys) == ["e1", "r1"]
    assert not keys["r1"].key.is_private
    assert keys["r1"].alg == "RS256"


def test_subject_names_the_issuer_host() -> None:
    assert issuer_id(GITHUB) == "token.actions.githubusercontent.com"
    assert issuer_id("https://gitlab.example.com/gitlab/") == "gitlab.example.com/gitlab"
    assert issuer_id("http://127.0.0.1:8443") == "127.0.0.1:8443"


# --- the documentation's examples are real -------------------------------------------------------

def yaml_blocks(text: str) -> list[Any]:
    import yaml

    blocks = text.split("```yaml\n")[1:]
    return [yaml.safe_load(block.split("```")[0]) for block in blocks]


def test_docs_ci_examples_parse() -> None:
    docs = (REPO / "docs/ci.md").read_text()
    blocks = yaml_blocks(docs)
    configs = [b for b in blocks if isinstance(b, dict) and "oidc" in b]
    names = [r.name for b in configs
             for r in build_config(b, base_dir=REPO, source="docs/ci.md", environ={}).oidc_trust]
    assert names == ["web-staging-deploy", "api-staging-gitlab"]
    (workflow,) = [b for b in blocks if isinstance(b, dict) and "jobs" in b]
    assert workflow["permissions"]["id-token"] == "write"
    steps = "\n".join(step.get("run", "") for step in workflow["jobs"]["deploy"]["steps"])
    assert "/_gateway/v1/token/exchange" in steps and "audience=$SCOPEGATE_AUDIENCE" in steps
    (gitlab,) = [b for b in blocks if isinstance(b, dict) and "deploy-staging" in b]
    assert gitlab["deploy-staging"]["id_tokens"]["SCOPEGATE_ID_TOKEN"]["aud"]


def test_the_commented_example_in_config_example_parses() -> None:
    import yaml

    lines = (REPO / "config.example.yaml").read_text().splitlines()
    start = lines.index("  # trust:")
    example = []
    for line in lines[start + 1:]:
        if not line.startswith("  #"):
            break
        example.append(line[4:])
    rules = parse_trust_rules(yaml.safe_load("\n".join(example)))
    assert [r.name for r in rules] == ["web-staging-deploy", "api-staging-gitlab"]
