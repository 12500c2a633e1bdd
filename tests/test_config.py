"""Configuration (DESIGN section 10): the YAML file, `SCOPEGATE_<SECTION>__<KEY>` overrides, defaults,
errors that name the key, relative paths, and the upstream credential."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, EnvironmentRule, build_config, load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
CREDENTIAL = "fm2_config-test-credential-ZXCVBNM-0987654321"

# Every key config.example.yaml documents -> the Config field it sets.
KEY_FIELDS: dict[str, str] = {
    "server.host": "server_host",
    "server.port": "server_port",
    "upstream.url": "upstream_url",
    "upstream.token_env": "upstream_token_env",
    "upstream.token_file": "upstream_token_file",
    "upstream.auth_scheme": "upstream_auth_scheme",
    "upstream.connect_timeout_s": "upstream_connect_timeout_s",
    "upstream.read_timeout_s": "upstream_read_timeout_s",
    "upstream.graphql_url": "upstream_graphql_url",
    "upstream.api_url": "upstream_api_url",
    "upstream.org_slug": "upstream_org_slug",
    "upstream.registry_url": "upstream_registry_url",
    "routes": "routes",
    "graphql.map": "graphql_map",
    "rest.routes": "rest_routes",
    "policy.model": "policy_model",
    "policy.policy": "policy_policy",
    "policy.constraints": "policy_constraints",
    "environments.rules": "environment_rules",
    "environments.default": "environment_default",
    "tokens.issuer": "tokens_issuer",
    "tokens.audience": "tokens_audience",
    "tokens.keyring": "tokens_keyring",
    "tokens.default_ttl": "tokens_default_ttl_s",
    "tokens.max_ttl": "tokens_max_ttl_s",
    "tokens.max_children": "tokens_max_children",
    "upstream.attenuate": "upstream_attenuate",
    "upstream.attenuate_window": "upstream_attenuate_window_s",
    "store.url": "store_url",
    "store.timeout_ms": "store_timeout_ms",
    "store.prefix": "store_prefix",
    "audit.sinks": "audit_sinks",
    "audit.redis_maxlen": "audit_redis_maxlen",
    "ui.enabled": "ui_enabled",
    "ui.session_idle": "ui_session_idle_s",
    "ui.secure_cookie": "ui_secure_cookie",
    "limits.max_body_bytes": "limits_max_body_bytes",
    "limits.max_blob_bytes": "limits_max_blob_bytes",
    "limits.token_cache_mb": "limits_token_cache_mb",
    "rate_limit.requests_per_second": "rate_limit_requests_per_second",
    "rate_limit.burst": "rate_limit_burst",
    "rate_limit.derivations_per_minute": "rate_limit_derivations_per_minute",
    "rate_limit.roles": "rate_limit_roles",
    "oidc.trust": "oidc_trust",
}

@dataclass(frozen=True)
class Check:
    """An expected value given as a predicate (for structured values such as trust rules)."""

    ok: Callable[[Any], bool]


# key -> (environment value, expected field value); paths relative to the example's folder (REPO).
OVERRIDES: dict[str, tuple[str, object]] = {
    "server.host": ("0.0.0.0", "0.0.0.0"),
    "server.port": ("9999", 9999),
    "upstream.url": ("http://upstream.test:9000/", "http://upstream.test:9000"),
    "upstream.token_env": ("OTHER_UPSTREAM_TOKEN", "OTHER_UPSTREAM_TOKEN"),
    "upstream.token_file": ("secrets/fly.txt", REPO / "secrets/fly.txt"),
    "upstream.auth_scheme": ("FlyV1", "FlyV1"),
    "upstream.connect_timeout_s": ("2.5", 2.5),
    "upstream.read_timeout_s": ("30", 30.0),
    "upstream.graphql_url": ("http://fly.test/graphql/", "http://fly.test/graphql"),
    "upstream.api_url": ("http://fly.test:8000", "http://fly.test:8000"),
    "upstream.org_slug": ("acme-corp", "acme-corp"),
    "upstream.registry_url": ("http://registry.test:5000/", "http://registry.test:5000"),
    "graphql.map": ("/etc/sg/fly-graphql.yaml", Path("/etc/sg/fly-graphql.yaml")),
    "rest.routes": ('["/etc/sg/fly-api.yaml"]', (Path("/etc/sg/fly-api.yaml"),)),
    "routes": ('["/etc/sg/routes-a.yaml", "more/routes-b.yaml"]',
               (Path("/etc/sg/routes-a.yaml"), REPO / "more/routes-b.yaml")),
    "policy.model": ("/etc/sg/model.conf", Path("/etc/sg/model.conf")),
    "policy.policy": ("/etc/sg/policy.csv", Path("/etc/sg/policy.csv")),
    "policy.constraints": ("none", None),
    "environments.rules": ('[{"app": "api-*", "env": "qa"}]', (EnvironmentRule("api-*", "qa"),)),
    "environments.default": ("sandbox", "sandbox"),
    "tokens.issuer": ("sg-iss", "sg-iss"),
    "tokens.audience": ("sg-aud", "sg-aud"),
    "tokens.keyring": ("/etc/sg/keyring.json", Path("/etc/sg/keyring.json")),
    "tokens.default_ttl": ("1h", 3600),
    "tokens.max_ttl": ("120d", 120 * 86400),
    "tokens.max_children": ("5", 5),
    "upstream.attenuate": ("apps", "apps"),
    "upstream.attenuate_window": ("2m", 120),
    "store.url": ("sqlite:////var/lib/sg/state.db", "sqlite:////var/lib/sg/state.db"),
    "store.timeout_ms": ("250", 250),
    "store.prefix": ("sg-two:", "sg-two:"),
    "audit.sinks": ('["stdout", "file:/var/log/sg.jsonl"]', ("stdout", "file:/var/log/sg.jsonl")),
    "audit.redis_maxlen": ("5000", 5000),
    "ui.enabled": ("false", False),
    "ui.session_idle": ("5m", 300),
    "ui.secure_cookie": ("always", "always"),
    "limits.max_body_bytes": ("2048", 2048),
    "limits.max_blob_bytes": ("1073741824", 1073741824),
    "limits.token_cache_mb": ("32", 32),
    "rate_limit.requests_per_second": ("12.5", 12.5),
    "rate_limit.burst": ("20", 20),
    "rate_limit.derivations_per_minute": ("0", 0),
    "rate_limit.roles": ('{"deployer": {"requests_per_second": 5, "burst": 10}}',
                         Check(lambda limits: [(r.role, r.requests_per_second, r.burst) for r in limits]
                               == [("deployer", 5.0, 10)])),
    "oidc.trust": (json.dumps([{"name": "gh-web", "issuer": "https://token.actions.githubusercontent.com",
                                "audience": "scopegate", "grants": ["deployer@app:web-staging"]}]),
                   Check(lambda rules: len(rules) == 1 and rules[0].name == "gh-web"
                         and rules[0].issuer == "https://token.actions.githubusercontent.com"
                         and rules[0].audience == "scopegate"
                         and tuple(rules[0].grants) == ("deployer@app:web-staging",))),
}


def env_name(key: str) -> str:
    return "SCOPEGATE_" + key.upper().replace(".", "__")


def build(raw: dict[str, Any], base: Path, environ: dict[str, str] | None = None) -> Config:
    return build_config(raw, base_dir=base, source=str(base / "scopegate.yaml"), environ=environ or {})


def config_error(raw: dict[str, Any], base: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(raw, base, environ)
    return str(info.value)


def example_keys() -> set[str]:
    document = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(document, dict)
    keys: set[str] = set()
    for section, body in document.items():
        if section == "routes":
            keys.add("routes")
            continue
        assert isinstance(body, dict), f"section {section} of the example is not a mapping"
        keys.update(f"{section}.{key}" for key in body)
    return keys


def changed_fields(a: Config, b: Config) -> set[str]:
    return {f.name for f in dataclasses.fields(Config) if getattr(a, f.name) != getattr(b, f.name)}


# --- the example file ---------------------------------------------------------------------------

def test_example_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.source == str(EXAMPLE)
    assert config.base_dir == REPO
    assert config.upstream_url == "https://api.machines.dev"
    assert config.routes == (REPO / "policies/routes/fly-machines.yaml",)
    assert config.policy_model == REPO / "policies/model.conf"
    assert config.policy_policy == REPO / "policies/policy.csv"
    assert config.tokens_keyring == REPO / ".scopegate/keyring.json"
    assert config.store_sqlite_path() == REPO / ".scopegate/state.db"
    assert config.tokens_default_ttl_s == 30 * 86400
    assert config.tokens_max_ttl_s == 90 * 86400
    assert config.audit_sinks == ("stdout",)
    assert config.limits_max_body_bytes == 10 * 1024 * 1024
    assert config.oidc_trust == ()


def test_every_example_key_maps_to_a_config_field() -> None:
    keys = example_keys()
    unmapped = keys - set(KEY_FIELDS)
    assert not unmapped, f"keys in config.example.yaml this test does not know: {sorted(unmapped)}"
    field_names = {f.name for f in dataclasses.fields(Config)}
    assert set(KEY_FIELDS.values()) <= field_names
    # ...and the example documents every field (commented-out keys count as documented).
    undocumented = set(KEY_FIELDS) - keys
    text = EXAMPLE.read_text()
    for key in undocumented:
        assert f"# {key.rpartition('.')[2]}:" in text, f"{key} is neither set nor documented in the example"
    assert field_names - set(KEY_FIELDS.values()) == {"base_dir", "source"}


@pytest.mark.parametrize("key", sorted(KEY_FIELDS))
def test_each_key_sets_exactly_its_field(key: str) -> None:
    # An environment override of the key (on top of the example file) changes that field and no other.
    value, expected = OVERRIDES[key]
    baseline = load_config(EXAMPLE, environ={})
    changed = load_config(EXAMPLE, environ={env_name(key): value})
    actual = getattr(changed, KEY_FIELDS[key])
    if isinstance(expected, Check):
        assert expected.ok(actual), actual
    else:
        assert actual == expected
    assert changed_fields(baseline, changed) == {KEY_FIELDS[key]}


def test_example_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Every key is listed with its default": loading the example equals loading no file at all.
    monkeypatch.chdir(REPO)
    from_example = load_config(EXAMPLE, environ={})
    from_nothing = load_config(None, environ={})
    assert from_nothing.source == "(defaults)"
    assert changed_fields(from_example, from_nothing) == {"source"}


# --- defaults -----------------------------------------------------------------------------------

def test_defaults(tmp_path: Path) -> None:
    config = build({}, tmp_path)
    assert config.environment_rules == (EnvironmentRule("*-prod", "production"),
                                        EnvironmentRule("*-staging", "staging"))
    assert config.environment_default == "development"
    assert config.upstream_token_env == "FLY_API_TOKEN"
    assert config.upstream_token_file is None
    assert config.upstream_auth_scheme == "Bearer"
    assert config.upstream_url == "https://api.machines.dev"
    assert config.upstream_connect_timeout_s == 5
    assert config.upstream_read_timeout_s == 75
    assert config.server_host == "127.0.0.1"
    assert config.server_port == 8080
    assert config.store_url == "sqlite:///./.scopegate/state.db"
    assert config.store_sqlite_path() == tmp_path / ".scopegate/state.db"
    assert config.tokens_keyring == tmp_path / ".scopegate/keyring.json"
    assert config.tokens_default_ttl_s == 30 * 86400
    assert config.tokens_max_ttl_s == 90 * 86400
    assert config.limits_max_body_bytes == 10 * 1024 * 1024
    assert config.audit_sinks == ("stdout",)
    # The shipped policy and routes are found even from a folder without them.
    assert config.policy_model == REPO / "policies/model.conf"
    assert config.routes == (REPO / "policies/routes/fly-machines.yaml",)
    assert config.policy_model.exists() and config.routes[0].exists()


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    sections = tmp_path / "sections.yaml"
    sections.write_text("server:\nupstream:\n")
    a = load_config(empty, environ={})
    b = load_config(sections, environ={})
    assert changed_fields(a, b) == {"source"}
    assert a.server_port == 8080


# --- environment overrides ----------------------------------------------------------------------

def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def test_env_overrides_file_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "sg.yaml", {"upstream": {"url": "https://file.example"}, "server": {"port": 1}})
    assert load_config(path, environ={}).upstream_url == "https://file.example"
    config = load_config(path, environ={"SCOPEGATE_UPSTREAM__URL": "http://127.0.0.1:4010"})
    assert config.upstream_url == "http://127.0.0.1:4010"
    assert config.server_port == 1


def test_env_audit_sinks_json(tmp_path: Path) -> None:
    config = build({"audit": {"sinks": ["stdout"]}}, tmp_path,
                   {"SCOPEGATE_AUDIT__SINKS": '["stdout", "file:/var/log/sg.jsonl"]'})
    assert config.audit_sinks == ("stdout", "file:/var/log/sg.jsonl")


def test_env_audit_sinks_not_json(tmp_path: Path) -> None:
    message = config_error({}, tmp_path, {"SCOPEGATE_AUDIT__SINKS": "stdout, file:/x"})
    assert "SCOPEGATE_AUDIT__SINKS" in message
    assert "JSON" in message


def test_env_environment_rules_json(tmp_path: Path) -> None:
    rules = [{"app": "api-*", "env": "production"}, {"app": "*", "env": "qa"}]
    config = build({}, tmp_path, {"SCOPEGATE_ENVIRONMENTS__RULES": json.dumps(rules)})
    assert config.environment_rules == (EnvironmentRule("api-*", "production"), EnvironmentRule("*", "qa"))
    assert config.environment_default == "development"


def test_env_environment_rules_must_be_rules(tmp_path: Path) -> None:
    message = config_error({}, tmp_path, {"SCOPEGATE_ENVIRONMENTS__RULES": '[{"app": "x-*"}]'})
    assert "environments.rules" in message


def test_env_routes_json(tmp_path: Path) -> None:
    config = build({"routes": ["ignored.yaml"]}, tmp_path, {"SCOPEGATE_ROUTES": '["a.yaml", "/abs/b.yaml"]'})
    assert config.routes == (tmp_path / "a.yaml", Path("/abs/b.yaml"))


def test_env_routes_not_json(tmp_path: Path) -> None:
    assert "SCOPEGATE_ROUTES" in config_error({}, tmp_path, {"SCOPEGATE_ROUTES": "a.yaml,b.yaml"})


def test_env_scalar_overrides(tmp_path: Path) -> None:
    config = build({"server": {"port": 8080}}, tmp_path, {
        "SCOPEGATE_SERVER__PORT": "9090",
        "SCOPEGATE_STORE__URL": "redis://cache:6379/0",
        "SCOPEGATE_TOKENS__MAX_TTL": "120d",
        "SCOPEGATE_LIMITS__MAX_BODY_BYTES": "1024",
    })
    assert config.server_port == 9090
    assert config.store_url == "redis://cache:6379/0"
    assert config.tokens_max_ttl_s == 120 * 86400
    assert config.limits_max_body_bytes == 1024


def test_non_config_variables_are_ignored(tmp_path: Path) -> None:
    environ = {"PATH": "/usr/bin", "HOME": "/root", "SCOPEGATE_ADDR": "http://gw:8080",
               "SCOPEGATE_TOKEN": "sgt_x", "SCOPEGATE_CONFIG": "/nonexistent.yaml", "SCOPEGATEX__Y": "1"}
    assert changed_fields(build({}, tmp_path, environ), build({}, tmp_path)) == set()


def test_scopegate_config_picks_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "conf" / "sg.yaml", {"server": {"port": 7001}, "tokens": {"keyring": "k.json"}})
    config = load_config(None, environ={"SCOPEGATE_CONFIG": str(path)})
    assert config.source == str(path)
    assert config.server_port == 7001
    assert config.base_dir == path.parent
    assert config.tokens_keyring == path.parent / "k.json"


def test_explicit_path_beats_scopegate_config(tmp_path: Path) -> None:
    chosen = write_yaml(tmp_path / "a.yaml", {"server": {"port": 7001}})
    other = write_yaml(tmp_path / "b.yaml", {"server": {"port": 7002}})
    assert load_config(chosen, environ={"SCOPEGATE_CONFIG": str(other)}).server_port == 7001


def test_scopegate_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"SCOPEGATE_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_no_file_means_defaults_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={"SCOPEGATE_CONFIG": ""})
    assert config.source == "(defaults)"
    assert config.base_dir == tmp_path
    assert config.tokens_keyring == tmp_path / ".scopegate/keyring.json"


# --- errors name the key ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"servers": {"port": 1}}, "servers"),
        ({"upstreams": {}}, "upstreams"),
        ({"server": {"hostname": "x"}}, "server.hostname"),
        ({"upstream": {"token": "x"}}, "upstream.token"),
        ({"tokens": {"ttl": "1h"}}, "tokens.ttl"),
        ({"server": 8080}, "server"),
        ({"server": {"port": "abc"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": -1}}, "server.port"),
        ({"server": {"port": True}}, "server.port"),
        ({"server": {"port": 80.5}}, "server.port"),
        ({"server": {"host": ""}}, "server.host"),
        ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes"),
        ({"limits": {"max_body_bytes": 0}}, "limits.max_body_bytes"),
        ({"limits": {"max_body_bytes": "10MB"}}, "limits.max_body_bytes"),
        ({"limits": {"token_cache_mb": 0}}, "limits.token_cache_mb"),
        ({"limits": {"token_cache_mb": -64}}, "limits.token_cache_mb"),
        ({"limits": {"token_cache_mb": "128MB"}}, "limits.token_cache_mb"),
        ({"limits": {"token_cache_mb": 1.5}}, "limits.token_cache_mb"),
        ({"limits": {"token_cache_mb": 134217728}}, "limits.token_cache_mb"),
        ({"tokens": {"default_ttl": "forever"}}, "tokens.default_ttl"),
        ({"tokens": {"max_ttl": "0s"}}, "tokens.max_ttl"),
        ({"tokens": {"max_ttl": "-1d"}}, "tokens.max_ttl"),
        ({"tokens": {"max_children": 0}}, "tokens.max_children"),
        ({"upstream": {"attenuate": "app"}}, "upstream.attenuate"),
        ({"rate_limit": {"derivations_per_minute": -1}}, "rate_limit.derivations_per_minute"),
        ({"tokens": {"default_ttl": "1y"}}, "tokens.default_ttl"),
        ({"tokens": {"keyring": ""}}, "tokens.keyring"),
        ({"upstream": {"auth_scheme": "Basic"}}, "upstream.auth_scheme"),
        ({"upstream": {"auth_scheme": "bearer"}}, "upstream.auth_scheme"),
        ({"upstream": {"url": "ftp://api.example"}}, "upstream.url"),
        ({"upstream": {"url": "api.machines.dev"}}, "upstream.url"),
        ({"upstream": {"url": "https://api.example/?x=1"}}, "upstream.url"),
        ({"upstream": {"token_env": "NOT A NAME"}}, "upstream.token_env"),
        ({"upstream": {"connect_timeout_s": 0}}, "upstream.connect_timeout_s"),
        ({"upstream": {"read_timeout_s": "slow"}}, "upstream.read_timeout_s"),
        ({"store": {"url": "mysql://db/sg"}}, "store.url"),
        ({"store": {"url": "mysql://"}}, "store.url"),
        ({"store": {"url": "sqlite://state.db"}}, "store.url"),
        ({"store": {"url": "sqlite:///"}}, "store.url"),
        ({"audit": {"sinks": ["syslog"]}}, "audit.sinks"),
        ({"audit": {"sinks": "syslog"}}, "audit.sinks"),
        ({"audit": {"sinks": ["file:"]}}, "audit.sinks"),
        ({"audit": {"sinks": [1]}}, "audit.sinks"),
        ({"environments": {"rules": {"app": "*", "env": "x"}}}, "environments.rules"),
        ({"environments": {"rules": [{"app": "*", "env": "x", "extra": 1}]}}, "environments.rules"),
        ({"environments": {"default": ""}}, "environments.default"),
        ({"rate_limit": {"requests_per_second": -1}}, "rate_limit.requests_per_second"),
        ({"rate_limit": {"burst": -1}}, "rate_limit.burst"),
        ({"oidc": {"trust": "github"}}, "oidc.trust"),
        ({"routes": [1]}, "routes"),
        ({"routes": [""]}, "routes"),
        ({"upstream": {"graphql_url": "ftp://fly"}}, "upstream.graphql_url"),
        ({"upstream": {"org_slug": "Acme Corp"}}, "upstream.org_slug"),
        ({"graphql": {"mapp": "x.yaml"}}, "graphql.mapp"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, raw: dict[str, Any], named: str) -> None:
    assert named in config_error(raw, tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("SCOPEGATE_NOPE__X", "1", "SCOPEGATE_NOPE__X"),
        ("SCOPEGATE_SERVER__NOPE", "1", "SCOPEGATE_SERVER__NOPE"),
        ("SCOPEGATE_UPSTREAM__TOKEN", "secret", "SCOPEGATE_UPSTREAM__TOKEN"),
        ("SCOPEGATE_SERVER__PORT", "abc", "server.port"),
        ("SCOPEGATE_LIMITS__MAX_BODY_BYTES", "-5", "limits.max_body_bytes"),
        ("SCOPEGATE_TOKENS__DEFAULT_TTL", "soon", "tokens.default_ttl"),
        ("SCOPEGATE_UPSTREAM__AUTH_SCHEME", "Basic", "upstream.auth_scheme"),
        ("SCOPEGATE_STORE__URL", "mysql://", "store.url"),
        ("SCOPEGATE_AUDIT__SINKS", '["syslog"]', "audit.sinks"),
        ("SCOPEGATE_OIDC__TRUST", "{not json", "SCOPEGATE_OIDC__TRUST"),
    ],
)
def test_bad_environment_overrides_name_the_key(tmp_path: Path, variable: str, value: str, named: str) -> None:
    assert named in config_error({}, tmp_path, {variable: value})


def test_default_ttl_longer_than_max_ttl(tmp_path: Path) -> None:
    message = config_error({"tokens": {"default_ttl": "60d", "max_ttl": "30d"}}, tmp_path)
    assert "tokens.default_ttl" in message and "tokens.max_ttl" in message
    # The default (30d) against a lowered maximum, set from the environment.
    message = config_error({}, tmp_path, {"SCOPEGATE_TOKENS__MAX_TTL": "7d"})
    assert "tokens.default_ttl" in message and "tokens.max_ttl" in message
    # Equal is fine.
    assert build({"tokens": {"default_ttl": "7d", "max_ttl": "1w"}}, tmp_path).tokens_max_ttl_s == 7 * 86400


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"tokens": {"max_ttl": float("inf")}}, "tokens.max_ttl"),  # YAML `.inf`
        ({"tokens": {"default_ttl": float("nan")}}, "tokens.default_ttl"),  # YAML `.nan`
        ({"upstream": {"read_timeout_s": float("nan")}}, "upstream.read_timeout_s"),
        ({"upstream": {"connect_timeout_s": float("nan")}}, "upstream.connect_timeout_s"),
        ({"rate_limit": {"requests_per_second": float("nan")}}, "rate_limit.requests_per_second"),
        ({"rate_limit": {"roles": {"deployer": {"requests_per_second": float("nan")}}}}, "rate_limit.roles"),
    ],
)
def test_non_finite_numbers_are_bad_values(tmp_path: Path, raw: dict[str, Any], named: str) -> None:
    # A bad value stops the start with a ConfigError naming the key, not a crash or a NaN setting.
    assert named in config_error(raw, tmp_path)


def test_non_finite_yaml_values_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sg.yaml"
    path.write_text("tokens:\n  max_ttl: .inf\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "tokens.max_ttl" in str(info.value)


def test_error_messages_never_echo_a_secret_put_in_the_wrong_place(tmp_path: Path) -> None:
    # People paste the credential into the YAML or into an env var that does not exist.
    message = config_error({"upstream": {"token": CREDENTIAL}}, tmp_path)
    assert "upstream.token" in message and CREDENTIAL not in message
    message = config_error({}, tmp_path, {"SCOPEGATE_UPSTREAM__TOKEN": CREDENTIAL})
    assert "SCOPEGATE_UPSTREAM__TOKEN" in message and CREDENTIAL not in message
    message = config_error({"upstream": {"url": f"https://x:{CREDENTIAL}@api.machines.dev"}}, tmp_path)
    assert "upstream.url" in message and CREDENTIAL not in message


@pytest.mark.parametrize(
    "text",
    ["server: [unclosed", "- a\n- b\n", "just a string"],
)
def test_unusable_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "sg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", environ={})
    assert "missing.yaml" in str(info.value)


# --- relative paths -----------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "scopegate"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write_yaml(folder / "scopegate.yaml", {
        "upstream": {"token_file": "secrets/fly.txt"},
        "routes": ["routes/fly.yaml", "/abs/routes.yaml"],
        "policy": {"model": "pol/model.conf", "policy": "pol/policy.csv"},
        "tokens": {"keyring": "keys/keyring.json"},
        "store": {"url": "sqlite:///data/state.db"},
    })
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(path, elsewhere), environ={})
    assert config.base_dir == folder
    assert config.upstream_token_file == folder / "secrets/fly.txt"
    assert config.routes == (folder / "routes/fly.yaml", Path("/abs/routes.yaml"))
    assert config.policy_model == folder / "pol/model.conf"
    assert config.policy_policy == folder / "pol/policy.csv"
    assert config.tokens_keyring == folder / "keys/keyring.json"
    assert config.store_sqlite_path() == folder / "data/state.db"


def test_relative_env_override_paths_resolve_against_the_config_folder(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    path = write_yaml(folder / "sg.yaml", {})
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={"SCOPEGATE_TOKENS__KEYRING": "k/keyring.json",
                                        "SCOPEGATE_STORE__URL": "sqlite:///./s/state.db",
                                        "SCOPEGATE_ROUTES": '["r.yaml"]'})
    assert config.tokens_keyring == folder / "k/keyring.json"
    assert config.store_sqlite_path() == folder / "s/state.db"
    assert config.routes == (folder / "r.yaml",)


def test_absolute_sqlite_path(tmp_path: Path) -> None:
    config = build({"store": {"url": f"sqlite:///{tmp_path}/db/state.db"}}, tmp_path / "other")
    assert config.store_sqlite_path() == tmp_path / "db/state.db"


def test_shipped_policy_paths_prefer_the_config_folder(tmp_path: Path) -> None:
    # `policies/...` falls back to the repository's files only when the config folder has none.
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "model.conf").write_text("# mine\n")
    config = build({"policy": {"model": "policies/model.conf", "policy": "policies/policy.csv"}}, tmp_path)
    assert config.policy_model == tmp_path / "policies/model.conf"
    assert config.policy_policy == REPO / "policies/policy.csv"


# --- the upstream credential --------------------------------------------------------------------

def test_credential_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", f"  {CREDENTIAL}\n")
    config = build({"upstream": {"token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    assert config.upstream_credential() == CREDENTIAL


def test_credential_default_variable_is_fly_api_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", CREDENTIAL)
    assert build({}, tmp_path).upstream_credential() == CREDENTIAL
    monkeypatch.delenv("FLY_API_TOKEN")
    with pytest.raises(ConfigError) as info:
        build({}, tmp_path).upstream_credential()
    assert "FLY_API_TOKEN" in str(info.value)


def test_credential_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fly.txt").write_text(CREDENTIAL + "\n")
    monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", "from-the-environment")
    config = build({"upstream": {"token_file": "fly.txt", "token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    assert config.upstream_token_file == tmp_path / "fly.txt"
    assert config.upstream_credential() == CREDENTIAL  # the file takes precedence


@pytest.mark.parametrize("value", [None, "", "   \n"])
def test_credential_missing_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("SG_CFG_TEST_CREDENTIAL", raising=False)
    else:
        monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", value)
    config = build({"upstream": {"token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    with pytest.raises(ConfigError) as info:
        config.upstream_credential()
    assert "SG_CFG_TEST_CREDENTIAL" in str(info.value)


def test_credential_file_missing_or_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", CREDENTIAL)
    config = build({"upstream": {"token_file": "absent.txt", "token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    with pytest.raises(ConfigError) as info:
        config.upstream_credential()
    assert str(tmp_path / "absent.txt") in str(info.value)
    assert CREDENTIAL not in str(info.value)
    (tmp_path / "absent.txt").write_text("\n")
    with pytest.raises(ConfigError) as info:
        config.upstream_credential()
    assert str(tmp_path / "absent.txt") in str(info.value)


def test_credential_with_line_break_is_refused_without_echoing_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = "fm2_first-half-QWERTY", "second-half-ASDFGH"
    monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", f"{first}\n{second}")
    config = build({"upstream": {"token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    with pytest.raises(ConfigError) as info:
        config.upstream_credential()
    message = str(info.value)
    assert first not in message and second not in message
    (tmp_path / "fly.txt").write_text(f"{first}\r\n{second}\n")
    config = build({"upstream": {"token_file": "fly.txt"}}, tmp_path)
    with pytest.raises(ConfigError) as info:
        config.upstream_credential()
    assert first not in str(info.value) and second not in str(info.value)


def test_credential_is_not_in_the_config_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_CFG_TEST_CREDENTIAL", CREDENTIAL)
    config = build({"upstream": {"token_env": "SG_CFG_TEST_CREDENTIAL"}}, tmp_path)
    assert config.upstream_credential() == CREDENTIAL
    assert CREDENTIAL not in repr(config)


def test_token_cache_budget_defaults_to_128_mib_and_says_its_unit_when_wrong(tmp_path: Path) -> None:
    assert build({}, tmp_path).limits_token_cache_mb == 128
    assert build({"limits": {"token_cache_mb": 16}}, tmp_path).limits_token_cache_mb == 16
    message = config_error({"limits": {"token_cache_mb": 134217728}}, tmp_path)
    assert message.startswith("bad value for limits.token_cache_mb:"), message
    assert "MiB" in message and "not bytes" in message and "134217728" in message, message
    message = config_error({}, tmp_path, {"SCOPEGATE_LIMITS__TOKEN_CACHE_MB": "0"})
    assert "limits.token_cache_mb" in message and "from 1 to 65536" in message, message
    message = config_error({"limits": {"token_cache_mb": "lots"}}, tmp_path)
    assert "limits.token_cache_mb" in message and "whole number of MiB" in message, message
