"""Grant strings `ROLE@SCOPE` (DESIGN section 3): parsing, what a grant covers, and narrowing."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import APP_NAME, Grant, GrantError, parse_grant, parse_grants

# The environment rules of config.example.yaml: what a pattern grant's own environment is read with.
ENV_OF = EnvironmentResolver((("*-prod", "production"), ("*-staging", "staging")), "development").resolve

# --- parse_grant: valid forms -----------------------------------------------------------------

VALID: list[tuple[str, Grant, str]] = [
    ("deployer@app:web-staging", Grant("deployer", "app", "web-staging"), "deployer@app:web-staging"),
    ("viewer@app:web", Grant("viewer", "app", "web"), "viewer@app:web"),
    ("deployer@app:web-pr-*", Grant("deployer", "app", "web-pr-*"), "deployer@app:web-pr-*"),
    ("viewer@app:web-?", Grant("viewer", "app", "web-?"), "viewer@app:web-?"),
    ("viewer@app:*", Grant("viewer", "app", "*"), "viewer@app:*"),
    ("viewer@app:0day", Grant("viewer", "app", "0day"), "viewer@app:0day"),
    ("deployer@env:staging", Grant("deployer", "env", "staging"), "deployer@env:staging"),
    ("viewer@env:prod_eu-1", Grant("viewer", "env", "prod_eu-1"), "viewer@env:prod_eu-1"),
    ("token-admin@gateway", Grant("token-admin", "gateway", ""), "token-admin@gateway"),
    ("ci_role-2@app:x", Grant("ci_role-2", "app", "x"), "ci_role-2@app:x"),
    ("  viewer@app:web  ", Grant("viewer", "app", "web"), "viewer@app:web"),
    ("viewer@app:" + "a" * 63, Grant("viewer", "app", "a" * 63), "viewer@app:" + "a" * 63),
    ("r" * 63 + "@env:" + "e" * 63, Grant("r" * 63, "env", "e" * 63), "r" * 63 + "@env:" + "e" * 63),
]


@pytest.mark.parametrize(("text", "grant", "shown"), VALID, ids=[v[0].strip() or "blank" for v in VALID])
def test_parse_grant_valid(text: str, grant: Grant, shown: str) -> None:
    parsed = parse_grant(text)
    assert parsed == grant
    assert str(parsed) == shown
    assert parse_grant(str(parsed)) == parsed  # what is shown back parses to the same grant


# --- parse_grant: invalid forms, each message names the bad part ------------------------------

INVALID: list[tuple[str, str, str]] = [
    # (case, text, the part the message must name)
    ("empty", "", "ROLE@SCOPE"),
    ("blank", "   ", "ROLE@SCOPE"),
    ("no at sign", "viewer", "ROLE@SCOPE"),
    ("role missing", "@app:web", "ROLE@SCOPE"),
    ("scope missing", "viewer@", "ROLE@SCOPE"),
    ("role upper-case", "Viewer@app:web", "'Viewer'"),
    ("role with space", "view er@app:web", "'view er'"),
    ("role starts with digit", "1viewer@app:web", "'1viewer'"),
    ("role with dot", "viewer.x@app:web", "'viewer.x'"),
    ("role too long", "r" * 64 + "@app:web", "'" + "r" * 64 + "'"),
    ("role with trailing newline", "viewer\n@app:web", "'viewer\\n'"),
    ("scope kind unknown", "viewer@apps:web", "'apps:web'"),
    ("scope kind upper-case", "viewer@APP:web", "'APP:web'"),
    ("scope app without colon", "viewer@app", "'app'"),
    ("scope env without colon", "viewer@env", "'env'"),
    ("scope gateway with value", "token-admin@gateway:x", "'gateway:x'"),
    ("scope org", "viewer@org:acme", "'org:acme'"),
    ("app empty", "viewer@app:", "''"),
    ("app upper-case", "viewer@app:Web", "'Web'"),
    ("app leading dash", "viewer@app:-web", "'-web'"),
    ("app with slash", "viewer@app:web/prod", "'web/prod'"),
    ("app with dot", "viewer@app:web.prod", "'web.prod'"),
    ("app with underscore", "viewer@app:web_prod", "'web_prod'"),
    ("app bracket glob", "viewer@app:[a-z]*", "'[a-z]*'"),
    ("app with second at", "viewer@app:web@x", "'web@x'"),
    ("app with space", "viewer@app:web prod", "'web prod'"),
    ("app too long", "viewer@app:" + "a" * 64, "'" + "a" * 64 + "'"),
    ("env empty", "viewer@env:", "''"),
    ("env upper-case", "viewer@env:Staging", "'Staging'"),
    ("env glob", "viewer@env:stag*", "'stag*'"),
    ("env leading digit", "viewer@env:1st", "'1st'"),
    ("env with colon", "viewer@env:a:b", "'a:b'"),
]


@pytest.mark.parametrize(("case", "text", "names"), INVALID, ids=[c[0] for c in INVALID])
def test_parse_grant_invalid(case: str, text: str, names: str) -> None:
    with pytest.raises(GrantError) as caught:
        parse_grant(text)
    message = str(caught.value)
    assert names in message, message
    # The message says what the right form is.
    assert "ROLE@" in message or "lowercase" in message, message


def test_grant_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_grant("nonsense")


# --- parse_grants -----------------------------------------------------------------------------

def test_parse_grants_keeps_order_and_drops_duplicates() -> None:
    grants = parse_grants(["viewer@app:b", "deployer@env:staging", "viewer@app:b", " viewer@app:a ", "viewer@app:a"])
    assert grants == (Grant("viewer", "app", "b"), Grant("deployer", "env", "staging"), Grant("viewer", "app", "a"))


def test_parse_grants_accepts_a_tuple() -> None:
    assert parse_grants(("token-admin@gateway",)) == (Grant("token-admin", "gateway", ""),)


@pytest.mark.parametrize("texts", [[], ()], ids=["empty list", "empty tuple"])
def test_parse_grants_needs_at_least_one(texts: list[str] | tuple[str, ...]) -> None:
    with pytest.raises(GrantError, match="at least one grant"):
        parse_grants(texts)


def test_parse_grants_names_the_bad_one() -> None:
    with pytest.raises(GrantError) as caught:
        parse_grants(["viewer@app:web", "deployer@app:Web-Prod", "admin@env:staging"])
    assert "'Web-Prod'" in str(caught.value)
    assert "viewer@app:web'" not in str(caught.value)


# --- covers_app -------------------------------------------------------------------------------

COVERS: list[tuple[str, str, str, bool]] = [
    # (grant, app, env, covered?)
    ("viewer@app:web", "web", "production", True),
    ("viewer@app:web", "web-staging", "staging", False),
    ("viewer@app:web", "we", "production", False),
    ("viewer@app:web", "WEB", "production", False),
    ("viewer@app:web-staging", "web-staging", "staging", True),
    ("viewer@app:web-staging", "web-prod", "staging", False),
    ("deployer@app:web-pr-*", "web-pr-42", "development", True),
    ("deployer@app:web-pr-*", "web-pr-", "development", True),
    ("deployer@app:web-pr-*", "web-pr-42-x", "development", True),
    ("deployer@app:web-pr-*", "web-prod", "production", False),
    ("deployer@app:web-pr-*", "web-pr", "development", False),
    ("deployer@app:web-pr-*", "api-web-pr-1", "development", False),
    ("deployer@app:web-pr-*", "WEB-PR-1", "development", False),
    ("viewer@app:web-?", "web-a", "development", True),
    ("viewer@app:web-?", "web-1", "development", True),
    ("viewer@app:web-?", "web-", "development", False),
    ("viewer@app:web-?", "web-ab", "development", False),
    # A pattern grant stays in its pattern's own environment (issue 15 class 5).
    ("deployer@app:web-pr-*", "web-pr-1-prod", "production", False),
    ("deployer@app:web-pr-*", "web-pr-1-staging", "staging", False),
    ("viewer@app:web-*", "web-staging", "staging", False),
    ("viewer@app:web-*-prod", "web-a-prod", "production", True),
    ("viewer@app:web-*-prod", "web-a-prod-staging", "staging", False),
    ("viewer@app:web-?", "web-prod", "production", False),
    ("viewer@app:*", "web-pr-1-prod", "production", True),
    ("viewer@app:*-staging", "api-staging", "staging", True),
    ("viewer@app:*-staging", "api-staging-2", "staging", False),
    ("viewer@app:*", "anything-at-all", "production", True),
    ("viewer@env:staging", "api-staging", "staging", True),
    ("viewer@env:staging", "web-prod", "staging", True),
    ("viewer@env:staging", "api-staging", "production", False),
    ("viewer@env:staging", "staging", "production", False),
    ("viewer@env:staging", "api-staging", "Staging", False),
    ("viewer@env:staging", "api-staging", "staging-2", False),
    ("token-admin@gateway", "web", "staging", False),
    ("token-admin@gateway", "", "", False),
]


@pytest.mark.parametrize(("grant", "app", "env", "covered"), COVERS,
                         ids=[f"{g} {'covers' if c else 'not'} {a} ({e})" for g, a, e, c in COVERS])
def test_covers_app(grant: str, app: str, env: str, covered: bool) -> None:
    assert parse_grant(grant).covers_app(app, env, ENV_OF) is covered


@pytest.mark.parametrize(("text", "org_wide"), [
    ("viewer@app:*", True), ("viewer@app:web-*", False), ("viewer@app:web", False), ("viewer@env:staging", False),
    ("token-admin@gateway", False),
])
def test_is_org_wide(text: str, org_wide: bool) -> None:
    assert parse_grant(text).is_org_wide is org_wide


# --- within (narrowing) -----------------------------------------------------------------------

WITHIN: list[tuple[str, str, bool]] = [
    # (child, parent, child within parent?)
    ("deployer@app:web", "deployer@app:web", True),
    ("deployer@app:web-pr-42", "deployer@app:web-pr-*", True),
    ("deployer@app:web-pr-*", "deployer@app:web-pr-*", True),
    ("deployer@app:web-a", "deployer@app:web-?", True),
    ("deployer@app:anything", "deployer@app:*", True),
    ("deployer@app:*", "deployer@app:*", True),
    ("deployer@app:web-prod", "deployer@app:web-pr-*", False),
    ("deployer@app:web-pr-1-prod", "deployer@app:web-pr-*", False),  # matches, but in production
    ("deployer@app:web-pr-1-staging", "deployer@app:web-pr-*", False),
    ("deployer@app:web-pr-1-prod", "deployer@app:*", True),
    ("deployer@app:web-pr-*", "deployer@app:web-pr-42", False),
    ("deployer@app:*", "deployer@app:web-pr-*", False),
    ("deployer@app:web-pr-1*", "deployer@app:web-pr-*", False),  # narrower glob: refused, conservatively
    ("deployer@app:web-?", "deployer@app:web-*", False),
    ("deployer@app:web", "deployer@app:web-staging", False),
    ("viewer@app:web", "deployer@app:web", False),  # another role, even an inherited one
    ("admin@app:web", "deployer@app:web", False),
    ("deployer@app:staging", "deployer@env:staging", False),
    ("deployer@env:staging", "deployer@app:*", False),
    ("deployer@env:staging", "deployer@env:staging", True),
    ("deployer@env:staging", "deployer@env:production", False),
    ("token-admin@gateway", "token-admin@gateway", True),
    ("token-admin@gateway", "token-admin@app:*", False),
    ("token-admin@app:*", "token-admin@gateway", False),
]


@pytest.mark.parametrize(("child", "parent", "inside"), WITHIN,
                         ids=[f"{c} {'within' if w else 'not within'} {p}" for c, p, w in WITHIN])
def test_within(child: str, parent: str, inside: bool) -> None:
    assert parse_grant(child).within(parse_grant(parent), ENV_OF) is inside


# --- APP_NAME: the app-name check routes.py applies to names taken from paths and bodies -------

@pytest.mark.parametrize(("name", "valid"), [
    ("web", True), ("web-prod", True), ("0day", True), ("a", True), ("a" * 63, True),
    ("", False), ("-web", False), ("Web", False), ("web_prod", False), ("web.prod", False), ("web prod", False),
    ("a" * 64, False), ("web-prod\n", False), ("web-prod\r", False), ("web-prod\n\n", False), ("web\nprod", False),
], ids=repr)
def test_app_name_check(name: str, valid: bool) -> None:
    # routes.py applies it with fullmatch(); a name that passes reaches environment resolution and
    # the upstream, so "web-prod\n" must not pass (it would resolve to the default environment).
    assert (APP_NAME.fullmatch(name) is not None) is valid


# --- properties -------------------------------------------------------------------------------

APP_NAMES = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
ENVS = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)


@given(name=APP_NAMES, env=ENVS)
def test_literal_grant_covers_its_own_app(name: str, env: str) -> None:
    grant = Grant("viewer", "app", name)
    assert grant.covers_app(name, "x", ENV_OF)
    assert grant.covers_app(name, env, ENV_OF)
    assert parse_grant(f"viewer@app:{name}") == grant
    assert grant.within(grant, ENV_OF)


@given(name=APP_NAMES, other=APP_NAMES)
def test_literal_grant_never_covers_a_different_app(name: str, other: str) -> None:
    assume(name != other)
    assert not Grant("viewer", "app", name).covers_app(other, "x", ENV_OF)
    assert not parse_grant(f"viewer@app:{name}").covers_app(other, "x", ENV_OF)


GLOBS = st.from_regex(r"[ab*?-]{1,6}", fullmatch=True).filter(lambda g: g[0] != "-")
SMALL_APPS = st.from_regex(r"[ab][ab-]{0,6}", fullmatch=True)


@given(child=st.one_of(SMALL_APPS, GLOBS), parent=GLOBS, app=SMALL_APPS)
def test_within_never_widens(child: str, parent: str, app: str) -> None:
    """A grant accepted as narrower than its parent covers no app the parent does not."""
    narrowed, original = parse_grant(f"deployer@app:{child}"), parse_grant(f"deployer@app:{parent}")
    if narrowed.within(original, ENV_OF) and narrowed.covers_app(app, ENV_OF(app), ENV_OF):
        assert original.covers_app(app, ENV_OF(app), ENV_OF)
