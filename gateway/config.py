"""Configuration: a YAML file, overridden key by key from `SCOPEGATE_<SECTION>__<KEY>`.

Every key is declared once in `_SCHEMA` with its parser and default; anything else (an unknown
section or key, a value of the wrong type) stops the start with a ConfigError naming the key.
Relative paths resolve against the config file's folder (or the working directory when there is
no file). Secrets never live here: the upstream credential is read from the env var named by
`upstream.token_env` or the file `upstream.token_file`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from gateway import config_values as parsers
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.oidc.rules import TrustRule

ENV_PREFIX = "SCOPEGATE_"
# The shipped policies, route maps and constraints: package data (`gateway/policies/`, which in a
# clone of the repository is a link to its top-level `policies/`), so an installed wheel or the
# Docker image finds them from any folder.
SHIPPED_POLICIES = Path(__file__).resolve().parent / "policies"


@dataclass(frozen=True)
class EnvironmentRule:
    app: str
    env: str


@dataclass(frozen=True)
class RoleRateLimit:
    role: str
    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class Config:
    base_dir: Path
    source: str
    server_host: str = "127.0.0.1"
    server_port: int = 8080
    upstream_url: str = "https://api.machines.dev"
    upstream_token_env: str = "FLY_API_TOKEN"
    upstream_token_file: Path | None = None
    upstream_auth_scheme: str = "Bearer"
    upstream_attenuate: str = "none"
    upstream_attenuate_window_s: int = 300
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 75.0
    upstream_graphql_url: str = "https://api.fly.io/graphql"
    upstream_api_url: str = "https://api.fly.io"
    upstream_org_slug: str | None = None
    upstream_registry_url: str = "https://registry.fly.io"
    routes: tuple[Path, ...] = ()
    graphql_map: Path = Path("policies/routes/fly-graphql.yaml")
    rest_routes: tuple[Path, ...] = ()
    policy_model: Path = Path("policies/model.conf")
    policy_policy: Path = Path("policies/policy.csv")
    policy_constraints: Path | None = Path("policies/constraints.yaml")
    environment_rules: tuple[EnvironmentRule, ...] = (
        EnvironmentRule("*-prod", "production"), EnvironmentRule("*-staging", "staging"))
    environment_default: str = "development"
    tokens_issuer: str = "scopegate"
    tokens_audience: str = "scopegate"
    tokens_keyring: Path = Path(".scopegate/keyring.json")
    tokens_default_ttl_s: int = 30 * 86400
    tokens_max_ttl_s: int = 90 * 86400
    tokens_max_children: int = 100
    store_url: str = "sqlite:///./.scopegate/state.db"
    store_timeout_ms: int = 500
    store_prefix: str = "scopegate:"
    audit_sinks: tuple[str, ...] = ("stdout",)
    audit_redis_maxlen: int = 100_000
    limits_max_body_bytes: int = 10 * 1024 * 1024
    limits_max_blob_bytes: int = 10 * 1024 * 1024 * 1024  # image layers pushed through the registry surface
    limits_token_cache_mb: int = 128  # each of the verified-token cache and the registry's record cache
    rate_limit_requests_per_second: float = 0.0
    rate_limit_burst: int = 0
    rate_limit_roles: tuple[RoleRateLimit, ...] = ()
    rate_limit_derivations_per_minute: int = 60
    oidc_trust: tuple[TrustRule, ...] = field(default=())
    ui_enabled: bool = True
    ui_session_idle_s: int = 15 * 60
    ui_secure_cookie: str = "auto"

    def upstream_credential(self) -> str:
        """The upstream credential, from the file or env var the config names. Never logged."""
        if self.upstream_token_file is not None:
            try:
                value = self.upstream_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"upstream.token_file {self.upstream_token_file} cannot be read ({exc.strerror})"
                ) from None
        else:
            value = os.environ.get(self.upstream_token_env, "").strip()
        if not value:
            where = (f"file {self.upstream_token_file}" if self.upstream_token_file
                     else f"environment variable {self.upstream_token_env}")
            raise ConfigError(f"the upstream credential is missing: set {where} (upstream.token_env / token_file)")
        if any(c in value for c in "\r\n"):
            raise ConfigError("the upstream credential contains a line break; check upstream.token_env / token_file")
        return value

    @property
    def environment_names(self) -> frozenset[str]:
        """Every environment an app can be in: the rules' and the default."""
        return frozenset(rule.env for rule in self.environment_rules) | {self.environment_default}

    def store_sqlite_path(self) -> Path:
        parsed = urlsplit(self.store_url)
        raw = self.store_url[len("sqlite:///"):] if parsed.scheme == "sqlite" else ""
        return self._path(raw)

    def _path(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def _role_rate_limits(value: Any) -> tuple[RoleRateLimit, ...]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of role -> {requests_per_second: N, burst: N}")
    limits = []
    for role, body in value.items():
        if not isinstance(role, str) or not role or not isinstance(body, dict) \
                or not set(body) <= {"requests_per_second", "burst"} or "requests_per_second" not in body:
            raise ValueError(f"role {role!r} needs a mapping with requests_per_second and optionally burst")
        try:
            rate = parsers.non_negative_float(body["requests_per_second"])
            burst = parsers.non_negative_int(body.get("burst", 0))
        except ValueError as exc:
            raise ValueError(f"role {role!r}: {exc}") from None
        limits.append(RoleRateLimit(role, rate, burst))
    return tuple(limits)


def _env_rules(value: Any) -> tuple[EnvironmentRule, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of {app: GLOB, env: NAME}")
    rules = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"app", "env"}:
            raise ValueError(f"item {index} must be a mapping with exactly the keys app and env")
        rules.append(EnvironmentRule(parsers.nonempty(item["app"]), parsers.nonempty(item["env"])))
    return tuple(rules)


def _trust_rules(value: Any) -> tuple[TrustRule, ...]:
    # Strict per-rule validation (ConfigError naming `oidc.trust[i].key`) lives with the trust rules.
    from gateway.oidc.rules import parse_trust_rules

    return parse_trust_rules(value)


Parser = Callable[[Any], Any]

# section -> key -> (Config field, parser). `routes` is a top-level list.
_SCHEMA: dict[str, dict[str, tuple[str, Parser]]] = {
    "server": {"host": ("server_host", parsers.nonempty), "port": ("server_port", parsers.port)},
    "upstream": {
        "url": ("upstream_url", parsers.http_url),
        "token_env": ("upstream_token_env", parsers.env_var_name),
        "token_file": ("upstream_token_file", parsers.path_value),
        "auth_scheme": ("upstream_auth_scheme", parsers.auth_scheme),
        "attenuate": ("upstream_attenuate", parsers.attenuate_mode),
        "attenuate_window": ("upstream_attenuate_window_s", parsers.duration),
        "connect_timeout_s": ("upstream_connect_timeout_s", parsers.positive_float),
        "read_timeout_s": ("upstream_read_timeout_s", parsers.positive_float),
        "graphql_url": ("upstream_graphql_url", parsers.http_url),
        "api_url": ("upstream_api_url", parsers.http_url),
        "org_slug": ("upstream_org_slug", parsers.org_slug),
        "registry_url": ("upstream_registry_url", parsers.http_url),
    },
    "graphql": {"map": ("graphql_map", parsers.path_value)},
    "rest": {"routes": ("rest_routes", parsers.string_list)},
    "policy": {"model": ("policy_model", parsers.path_value), "policy": ("policy_policy", parsers.path_value),
               "constraints": ("policy_constraints", parsers.optional_path)},
    "environments": {"rules": ("environment_rules", _env_rules), "default": ("environment_default", parsers.nonempty)},
    "tokens": {
        "issuer": ("tokens_issuer", parsers.nonempty),
        "audience": ("tokens_audience", parsers.nonempty),
        "keyring": ("tokens_keyring", parsers.path_value),
        "default_ttl": ("tokens_default_ttl_s", parsers.duration),
        "max_ttl": ("tokens_max_ttl_s", parsers.duration),
        "max_children": ("tokens_max_children", parsers.positive_int),
    },
    "store": {"url": ("store_url", parsers.store_url), "timeout_ms": ("store_timeout_ms", parsers.positive_int),
              "prefix": ("store_prefix", parsers.key_prefix)},
    "audit": {"sinks": ("audit_sinks", parsers.sinks), "redis_maxlen": ("audit_redis_maxlen", parsers.positive_int)},
    "limits": {"max_body_bytes": ("limits_max_body_bytes", parsers.positive_int),
               "max_blob_bytes": ("limits_max_blob_bytes", parsers.positive_int),
               "token_cache_mb": ("limits_token_cache_mb", parsers.cache_megabytes)},
    "rate_limit": {
        "requests_per_second": ("rate_limit_requests_per_second", parsers.non_negative_float),
        "burst": ("rate_limit_burst", parsers.non_negative_int),
        "roles": ("rate_limit_roles", _role_rate_limits),
        "derivations_per_minute": ("rate_limit_derivations_per_minute", parsers.non_negative_int),
    },
    "oidc": {"trust": ("oidc_trust", _trust_rules)},
    "ui": {"enabled": ("ui_enabled", parsers.boolean), "session_idle": ("ui_session_idle_s", parsers.duration),
           "secure_cookie": ("ui_secure_cookie", parsers.cookie_secure)},
}
_PATH_FIELDS = {"upstream_token_file", "policy_model", "policy_policy", "policy_constraints", "tokens_keyring",
                "graphql_map"}
_STRUCTURED = {"environment_rules", "oidc_trust", "audit_sinks", "routes", "rate_limit_roles", "rest_routes"}


def load_config(path: str | os.PathLike[str] | None = None, *,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or $SCOPEGATE_CONFIG, or ./scopegate.yaml when it exists, or nothing) and the
    environment overrides."""
    environ = os.environ if environ is None else environ
    chosen = path if path is not None else environ.get("SCOPEGATE_CONFIG") or discovered_config()
    raw: dict[str, Any] = {}
    if chosen is not None:
        config_path = Path(chosen).expanduser().resolve()
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} does not exist (--config / SCOPEGATE_CONFIG)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must be a mapping of sections")
        raw = loaded or {}
        base_dir, source = config_path.parent, str(config_path)
    else:
        base_dir, source = Path.cwd(), "(defaults)"
    return build_config(raw, base_dir=base_dir, source=source, environ=environ)


def build_config(raw: Mapping[str, Any], *, base_dir: Path, source: str,
                 environ: Mapping[str, str]) -> Config:
    values: dict[str, Any] = {}
    for section, body in raw.items():
        if section == "routes":
            values["routes"] = _parse("routes", parsers.string_list, body)
            continue
        if section not in _SCHEMA:
            raise ConfigError(f"unknown config section {section!r} in {source}; known: routes, {', '.join(_SCHEMA)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys")
        for key, value in body.items():
            values.update(_parse_key(section, key, value, source))
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        if rest == "ROUTES":
            values["routes"] = _parse(name, parsers.string_list, _env_value(name, text, structured=True))
            continue
        section, sep, key = rest.partition("__")
        if not sep:
            continue  # SCOPEGATE_CONFIG, SCOPEGATE_ADDR, SCOPEGATE_TOKEN are not config keys.
        section, key = section.lower(), key.lower()
        if section not in _SCHEMA or key not in _SCHEMA[section]:
            raise ConfigError(f"environment variable {name} names no config key ({section}.{key})")
        field_name = _SCHEMA[section][key][0]
        value = _env_value(name, text, structured=field_name in _STRUCTURED)
        values.update(_parse_key(section, key, value, f"environment variable {name}"))
    if "routes" not in values:
        values["routes"] = ("policies/routes/fly-machines.yaml",)
    if "rest_routes" not in values:
        values["rest_routes"] = ("policies/routes/fly-api.yaml",)
    resolved: dict[str, Any] = {}
    for name, value in values.items():
        if name in _PATH_FIELDS:
            resolved[name] = None if value is None else _resolve(base_dir, value)
        elif name in ("routes", "rest_routes"):
            resolved[name] = tuple(_resolve(base_dir, v) for v in value)
        else:
            resolved[name] = value
    for name in ("policy_model", "policy_policy", "policy_constraints", "tokens_keyring", "graphql_map"):
        resolved.setdefault(name, _resolve(base_dir, str(getattr(Config, name))))
    config = Config(base_dir=base_dir, source=source, **resolved)
    if config.tokens_default_ttl_s > config.tokens_max_ttl_s:
        raise ConfigError("tokens.default_ttl is longer than tokens.max_ttl; shorten it or raise max_ttl")
    return config


DISCOVERED_NAME = "scopegate.yaml"


def discovered_config() -> Path | None:
    """./scopegate.yaml, when the current folder holds one: `scopegate serve` there reads it rather
    than the built-in defaults (which proxy to Fly's real API)."""
    candidate = Path.cwd() / DISCOVERED_NAME
    return candidate if candidate.is_file() else None


# SCOPEGATE_* variables that are not config keys: the CLI's own, and the names docs/ci.md uses.
NOT_CONFIG_VARIABLES = frozenset({"CONFIG", "ADDR", "TOKEN", "PARENT_TOKEN", "ADMIN_TOKEN", "URL", "ID_TOKEN",
                                  "AUDIENCE"})


def environment_warnings(environ: Mapping[str, str]) -> list[str]:
    """A line for each `SCOPEGATE_*` variable that looks like a config override but is not one
    (`SCOPEGATE_SERVER_PORT` for `SCOPEGATE_SERVER__PORT`): read as nothing, it would be lost
    silently. Names with `__` are checked strictly by build_config (an unknown key is an error)."""
    keys = {f"{section}__{key}".upper() for section, known in _SCHEMA.items() for key in known}
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" in rest or rest in NOT_CONFIG_VARIABLES or rest == "ROUTES":
            continue
        # One '_' where the section ends (SERVER_PORT), or a near spelling of a whole key.
        splits = [rest[:i] + "_" + rest[i:] for i, char in enumerate(rest) if char == "_"]
        guess = next((k for k in splits if k in keys), None) \
            or next(iter(difflib.get_close_matches(rest, keys | NOT_CONFIG_VARIABLES, n=1, cutoff=0.8)), None)
        if guess is not None:
            out.append(f"environment variable {name} is not read; did you mean {ENV_PREFIX}{guess}?"
                       + (" (config overrides are SCOPEGATE_<SECTION>__<KEY>, with two underscores)"
                          if "__" in guess else ""))
    return out


def _resolve(base_dir: Path, raw: str) -> Path:
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    candidate = (base_dir / path).resolve()
    # `policies/...` that the config's folder does not hold is the shipped file of that name: a
    # config-less start (the defaults, --dev) from any folder finds them.
    shipped = SHIPPED_POLICIES.joinpath(*path.parts[1:])
    if not candidate.exists() and path.parts[:1] == ("policies",) and shipped.exists():
        return shipped.resolve()
    return candidate


def _env_value(name: str, text: str, *, structured: bool) -> Any:
    if not structured:
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be JSON (a list or mapping)") from None


def _parse_key(section: str, key: str, value: Any, source: str) -> dict[str, Any]:
    known = _SCHEMA[section]
    if key not in known:
        raise ConfigError(f"unknown config key {section}.{key} in {source}; known: {', '.join(known)}")
    field_name, parser = known[key]
    return {field_name: _parse(f"{section}.{key}", parser, value)}


def _parse(label: str, parser: Parser, value: Any) -> Any:
    try:
        return parser(value)
    except ValueError as exc:
        raise ConfigError(f"bad value for {label}: {exc}") from None
