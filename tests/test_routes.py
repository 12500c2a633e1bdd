"""The route map against the real Fly Machines OpenAPI spec, the shipped policy, and `resolve_request`.

DESIGN section 5: every operation of the spec has exactly one route; unknown method+path is
`unknown_route`; `show_secrets` refines secret reads; the body names the app for `POST /v1/apps`.
DESIGN section 4: `deploy_token` and `/v1/tokens/*` are always denied (`/v1/tokens/current` is
answered by the gateway).
"""

from __future__ import annotations

import functools
import json
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import build_config
from gateway.core.constraints import ConstraintSet
from gateway.core.policy import PolicyEngine
from gateway.core.rules import ProducedAction, check_cross_references
from gateway.errors import BadRequest, ConfigError, Forbidden, UnknownRoute
from gateway.services import produced_actions
from gateway.surfaces.routes import Route, RouteTable, resolve_request

REPO = Path(__file__).resolve().parent.parent
ROUTE_FILE = REPO / "policies/routes/fly-machines.yaml"
POLICY_FILE = REPO / "policies/policy.csv"
MODEL_FILE = REPO / "policies/model.conf"
SPEC_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared/upstream/fly-machines-openapi.json",
    Path("/work/shared/upstream/fly-machines-openapi.json"),
)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Org-level listings of every app's machines/volumes: deliberately granted to no shipped role.
UNGRANTED_ACTIONS = {"orgs:list-machines", "orgs:list-volumes"}


def spec_path() -> Path:
    for candidate in SPEC_CANDIDATES:
        if candidate.is_file():
            return candidate
    pytest.fail(f"the Fly Machines OpenAPI spec is missing; looked at {[str(c) for c in SPEC_CANDIDATES]}")


@functools.cache
def load_spec_operations() -> dict[tuple[str, str], str]:
    """(METHOD, /v1 + path) -> operationId, for every operation of the spec; fails (never skips) without it."""
    document = json.loads(spec_path().read_text())
    server = document["servers"][0]["url"]
    assert server.endswith("/v1"), server
    operations: dict[tuple[str, str], str] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                operations[(method.upper(), "/v1" + path)] = operation["operationId"]
    return operations


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable.load([ROUTE_FILE])


def policy_allow_actions() -> set[str]:
    """Action globs of every `p, ROLE, APP, ENV, ACTION, allow` line of the shipped policy."""
    globs = set()
    for line in POLICY_FILE.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if fields[0] == "p" and len(fields) == 6 and fields[5] == "allow":
            globs.add(fields[4])
    assert globs, "no allow lines parsed from policy.csv"
    return globs


# --- the route file against the spec -------------------------------------------------------


def test_spec_has_76_operations() -> None:
    assert len(load_spec_operations()) == 76


def test_every_spec_operation_has_exactly_one_route_with_its_operation_id(table: RouteTable) -> None:
    spec_operations = load_spec_operations()
    missing, wrong_id, duplicated = [], [], []
    for (method, path), operation_id in sorted(spec_operations.items()):
        routes = [r for r in table.routes if r.method == method and r.path == path]
        if not routes:
            missing.append(f"{method} {path} ({operation_id})")
        elif len(routes) > 1:
            duplicated.append(f"{method} {path}")
        elif routes[0].operation != operation_id:
            wrong_id.append(f"{method} {path}: route says {routes[0].operation}, spec says {operation_id}")
    assert missing == []
    assert duplicated == []
    assert wrong_id == []


def test_every_route_is_a_spec_operation(table: RouteTable) -> None:
    spec_operations = load_spec_operations()
    extra = [f"{r.method} {r.path} ({r.operation})" for r in table.routes
             if spec_operations.get((r.method, r.path)) != r.operation]
    assert extra == []
    assert len(table.routes) == 76


@functools.cache
def load_spec_bodies() -> dict[str, frozenset[str] | None]:
    """operationId -> the top-level fields of its JSON request body (None: it takes no body)."""
    document = json.loads(spec_path().read_text())
    schemas = document["components"]["schemas"]
    bodies: dict[str, frozenset[str] | None] = {}
    for item in document["paths"].values():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            content = operation.get("requestBody", {}).get("content")
            if content is None:
                bodies[operation["operationId"]] = None
                continue
            schema = content["application/json"]["schema"]
            if "$ref" in schema:
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            bodies[operation["operationId"]] = frozenset(schema.get("properties", {}))
    return bodies


def test_routes_take_a_body_exactly_where_the_spec_gives_one(table: RouteTable) -> None:
    """A body sent to a route that takes none is refused (issue 15, class 3): `body: none` must
    be where the spec has no request body, and nowhere else."""
    bodies = load_spec_bodies()
    wrong = [f"{r.method} {r.path} ({r.operation}): route says {'a' if r.takes_body else 'no'} body"
             for r in table.routes if r.takes_body != (bodies[r.operation] is not None)]
    assert wrong == []


def test_declared_body_fields_are_the_spec_request_schemas(table: RouteTable) -> None:
    """Where a constraint judges a body, fields outside `fields` are refused: they must be the spec's."""
    bodies = load_spec_bodies()
    declared = {r.operation: r.fields for r in table.routes if r.fields is not None}
    assert {op: bodies[op] for op in declared} == declared
    # every operation whose action carries a shipped constraint declares its fields
    constrained = ConstraintSet.load(REPO / "policies/constraints.yaml").actions()
    assert {r.operation for r in table.routes if r.action in constrained and r.takes_body} <= set(declared)


def test_every_routed_action_is_granted_to_some_role_except_the_org_listings(table: RouteTable) -> None:
    globs = policy_allow_actions()
    checked = {r.action for r in table.routes if not r.deny_always and not r.answer_gateway}
    checked.update(r.refine.action for r in table.routes if r.refine and not r.deny_always)
    ungranted = {a for a in checked if not any(fnmatchcase(a, g) for g in globs)}
    assert ungranted == UNGRANTED_ACTIONS


def test_only_current_token_is_answered_by_the_gateway(table: RouteTable) -> None:
    # The one non-denied route the previous test leaves out: it never reaches the policy.
    assert [(r.method, r.path) for r in table.routes if r.answer_gateway] == [("GET", "/v1/tokens/current")]


def test_org_listings_are_org_level_routes(table: RouteTable) -> None:
    routes = {r.action: r for r in table.routes if r.action in UNGRANTED_ACTIONS}
    assert set(routes) == UNGRANTED_ACTIONS
    assert all(r.app_source == "none" and not r.filter_apps and not r.deny_always for r in routes.values())


# --- resolve_request -----------------------------------------------------------------------

SECRET_PATHS = ["/v1/apps/web/secrets", "/v1/apps/web/secrets/DATABASE_URL"]
SHOW_SECRETS_CASES = [
    ("show_secrets=true", "secrets:read"),
    ("SHOW_SECRETS=1", "secrets:read"),
    ("Show_Secrets=yes", "secrets:read"),
    ("show_secrets=false&show_secrets=true", "secrets:read"),
    ("show_secrets=true&show_secrets=false", "secrets:read"),
    ("show_secrets=false", "secrets:list"),
    ("show_secrets=0", "secrets:list"),
    ("other=1", "secrets:list"),
    ("", "secrets:list"),
]


@pytest.mark.parametrize("path", SECRET_PATHS)
@pytest.mark.parametrize(("query", "action"), SHOW_SECRETS_CASES,
                         ids=[f"{q or 'absent'}->{a}" for q, a in SHOW_SECRETS_CASES])
def test_show_secrets_refinement(table: RouteTable, path: str, query: str, action: str) -> None:
    resolved = resolve_request(table.resolve("GET", path), query.encode(), None)
    assert resolved.app == "web"
    assert resolved.action == action


def test_show_secrets_only_refines_secret_reads(table: RouteTable) -> None:
    resolved = resolve_request(table.resolve("GET", "/v1/apps/web/machines"), b"show_secrets=true", None)
    assert resolved.action == "machines:read"


def token_routes(table: RouteTable) -> list[Route]:
    return [r for r in table.routes if r.path.startswith("/v1/tokens/")]


def test_deploy_token_is_always_forbidden(table: RouteTable) -> None:
    match = table.resolve("POST", "/v1/apps/web/deploy_token")
    assert match.route.operation == "App_create_deploy_token"
    with pytest.raises(Forbidden, match="always denied"):
        resolve_request(match, b"", b'{"expiry": "1h"}')


def test_token_routes_are_the_five_of_the_spec(table: RouteTable) -> None:
    assert sorted((r.method, r.path) for r in token_routes(table)) == [
        ("GET", "/v1/tokens/current"),
        ("POST", "/v1/tokens/authenticate"),
        ("POST", "/v1/tokens/authorize"),
        ("POST", "/v1/tokens/kms"),
        ("POST", "/v1/tokens/oidc"),
    ]


@pytest.mark.parametrize("path", ["/v1/tokens/authenticate", "/v1/tokens/authorize", "/v1/tokens/kms",
                                  "/v1/tokens/oidc"])
def test_token_endpoints_are_always_forbidden(table: RouteTable, path: str) -> None:
    match = table.resolve("POST", path)
    assert match.route.deny_always
    with pytest.raises(Forbidden):
        resolve_request(match, b"", b"{}")


def test_current_token_is_answered_by_the_gateway(table: RouteTable) -> None:
    match = table.resolve("GET", "/v1/tokens/current")
    assert match.route.answer_gateway
    assert not match.route.deny_always
    resolved = resolve_request(match, b"", None)
    assert resolved.app is None
    assert resolved.route.answer_gateway


CREATE_CASES: list[tuple[str, bytes, str | None]] = [
    ("name", b'{"name": "a", "org_slug": "acme"}', "a"),
    ("app_name", b'{"app_name": "a"}', "a"),
    ("both-equal", b'{"name": "a", "app_name": "a"}', "a"),
    ("both-different", b'{"name": "a", "app_name": "b"}', None),
    ("missing", b'{"org_slug": "acme"}', None),
    ("empty-body", b"", None),
    ("non-json", b"name=a", None),
    ("json-array", b'["a"]', None),
    ("name-not-string", b'{"name": 7}', None),
    ("name-null", b'{"name": null}', None),
    ("name-list", b'{"name": ["a"]}', None),
    ("invalid-name-uppercase", b'{"name": "Web_Prod"}', None),
    ("invalid-name-empty", b'{"name": ""}', None),
    ("invalid-name-slash", b'{"name": "web/prod"}', None),
    # APP_NAME is "lowercase letters, digits and dashes"; a trailing newline is none of those.
    ("invalid-name-trailing-newline", b'{"name": "web-pr-1\\n"}', None),
]


@pytest.mark.parametrize(("body", "app"), [(b, a) for _, b, a in CREATE_CASES], ids=[c[0] for c in CREATE_CASES])
def test_apps_create_takes_the_app_from_the_body(table: RouteTable, body: bytes, app: str | None) -> None:
    match = table.resolve("POST", "/v1/apps")
    assert match.route.needs_body
    if app is None:
        with pytest.raises(BadRequest):
            resolve_request(match, b"", body)
    else:
        resolved = resolve_request(match, b"wait=true", body)
        assert resolved.app == app
        assert resolved.action == "apps:create"


def test_apps_create_without_body_is_bad_request(table: RouteTable) -> None:
    with pytest.raises(BadRequest):
        resolve_request(table.resolve("POST", "/v1/apps"), b"", None)


def test_path_app_is_validated(table: RouteTable) -> None:
    with pytest.raises(BadRequest):
        resolve_request(table.resolve("GET", "/v1/apps/Web_Prod/machines"), b"", None)
    resolved = resolve_request(table.resolve("GET", "/v1/apps/web-prod/machines"), b"", None)
    assert (resolved.app, resolved.action) == ("web-prod", "machines:read")


def test_org_level_routes_have_no_app(table: RouteTable) -> None:
    for method, path, action in [("GET", "/v1/apps", "apps:list"), ("GET", "/v1/orgs/acme/machines",
                                 "orgs:list-machines"), ("GET", "/v1/platform/regions", "platform:read")]:
        resolved = resolve_request(table.resolve(method, path), b"org_slug=acme", None)
        assert (resolved.app, resolved.action) == (None, action)


def test_literal_segments_win_over_templates(table: RouteTable) -> None:
    assert table.resolve("GET", "/v1/apps/web/machines/m1/lease").route.action == "leases:read"
    assert table.resolve("POST", "/v1/apps/web/machines/m1/start").route.action == "machines:control"
    assert table.resolve("GET", "/v1/apps/web/machines/m1").route.action == "machines:read"


UNKNOWN = [
    ("GET", "/v1/no/such/route"),
    ("TRACE", "/v1/apps"),
    ("PUT", "/v1/apps"),
    ("GET", "/apps/web"),
    ("GET", "/v1/apps/"),
    ("GET", "/v1/apps/web/machines/m1/lease/extra"),
    ("GET", "/v1/apps/web/Machines"),
    ("POST", "/v1/apps/web/secrets/x/y"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN, ids=[f"{m} {p}" for m, p in UNKNOWN])
def test_unknown_route(table: RouteTable, method: str, path: str) -> None:
    with pytest.raises(UnknownRoute):
        table.resolve(method, path)


# --- route file validation -----------------------------------------------------------------

GOOD_ROUTE: dict[str, Any] = {"operation": "Apps_show", "method": "GET", "path": "/v1/apps/{app_name}",
                              "action": "apps:read", "app": "path:app_name"}
BAD_ROUTES: list[tuple[str, list[dict[str, Any]]]] = [
    ("unknown-key", [{**GOOD_ROUTE, "actoin": "apps:read"}]),
    ("app-param-not-in-path", [{**GOOD_ROUTE, "app": "path:name"}]),
    ("app-unknown-kind", [{**GOOD_ROUTE, "app": "query:app"}]),
    ("app-none-with-spec", [{**GOOD_ROUTE, "app": "none:x"}]),
    ("app-body-empty", [{**GOOD_ROUTE, "app": "body:"}]),
    ("missing-action", [{k: v for k, v in GOOD_ROUTE.items() if k != "action"}]),
    ("unknown-method", [{**GOOD_ROUTE, "method": "FETCH"}]),
    ("trailing-slash", [{**GOOD_ROUTE, "path": "/v1/apps/{app_name}/"}]),
    ("bad-deny", [{**GOOD_ROUTE, "deny": "sometimes"}]),
    ("filter-on-app-route", [{**GOOD_ROUTE, "filter": "apps"}]),
    ("duplicate", [GOOD_ROUTE, {**GOOD_ROUTE, "operation": "Apps_show_again"}]),
    ("duplicate-method-case", [GOOD_ROUTE, {**GOOD_ROUTE, "method": "get"}]),
]


@pytest.mark.parametrize("routes", [r for _, r in BAD_ROUTES], ids=[n for n, _ in BAD_ROUTES])
def test_bad_route_file_raises_config_error_naming_the_file(tmp_path: Path, routes: list[dict[str, Any]]) -> None:
    file = tmp_path / "bad-routes.yaml"
    file.write_text(yaml.safe_dump({"routes": routes}))
    with pytest.raises(ConfigError) as raised:
        RouteTable.load([file])
    assert str(file) in str(raised.value)


def test_good_route_file_loads(tmp_path: Path) -> None:
    # The baseline the bad cases are mutations of.
    file = tmp_path / "good-routes.yaml"
    file.write_text(yaml.safe_dump({"routes": [GOOD_ROUTE]}))
    table = RouteTable.load([file])
    assert resolve_request(table.resolve("GET", "/v1/apps/web"), b"", None).app == "web"


def test_duplicate_across_files_names_both(tmp_path: Path) -> None:
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    for file in (first, second):
        file.write_text(yaml.safe_dump({"routes": [GOOD_ROUTE]}))
    with pytest.raises(ConfigError) as raised:
        RouteTable.load([first, second])
    assert str(first) in str(raised.value)
    assert str(second) in str(raised.value)


@pytest.mark.parametrize("text", ["routes: [", "- just a list\n", "other: 1\n"],
                         ids=["invalid-yaml", "list", "no-routes"])
def test_malformed_route_file_raises_config_error(tmp_path: Path, text: str) -> None:
    file = tmp_path / "malformed.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(file))):
        RouteTable.load([file])


def test_missing_route_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        RouteTable.load([tmp_path / "absent.yaml"])


# --- policy lines against route actions ----------------------------------------------------


def shipped(table: RouteTable) -> list[ProducedAction]:
    """What the shipped maps produce: `table` (the Machines API's) and every other surface's."""
    others = produced_actions(build_config({}, base_dir=REPO, source="(test)", environ={}))
    return [*table.produced_actions(), *(p for p in others if "fly-machines.yaml" not in p.source)]


def test_shipped_policy_cross_references_pass(table: RouteTable) -> None:
    check_cross_references(PolicyEngine(MODEL_FILE, POLICY_FILE), shipped(table))


def test_policy_line_with_unknown_action_raises_config_error(tmp_path: Path, table: RouteTable) -> None:
    policy = tmp_path / "policy.csv"
    policy.write_text(POLICY_FILE.read_text() + "\np, viewer, *, *, machines:raed, deny\n")
    with pytest.raises(ConfigError) as raised:
        check_cross_references(PolicyEngine(MODEL_FILE, policy), shipped(table))
    assert "machines:raed" in str(raised.value)
    assert str(policy) in str(raised.value)
