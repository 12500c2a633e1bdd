"""App smuggling: a token for `web-staging` trying to act on `web-prod` through everything but the path.

Authorization is on the path's app (or, for `POST /v1/apps`, on the body's `name`/`app_name`);
queries and bodies that name another app are forwarded unchanged but never change what was
authorized. The upstream is a Go service: `encoding/json` matches object keys
case-insensitively and, for a key given twice, decodes both (the last string wins, objects are
merged). A body whose meaning differs between Python's `json` and Go's must be refused, or the
app/field the gateway authorized is not the one the upstream acts on.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway
from tests.security.harness import (
    assert_forwarded_exactly,
    assert_refused,
    audit_record,
    request,
    reset,
    running_gateway,
    send,
)
from tests.servers import Reply


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-smuggling"), upstream={"org_slug": "acme"}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def tokens(shared: RunningGateway) -> dict[str, str]:
    return {
        "deployer": shared.mint("deployer@app:web-staging", name="staging-deployer"),
        "viewer": shared.mint("viewer@app:web-staging", name="staging-viewer"),
        "org-admin": shared.mint("admin@app:*", name="org-admin"),
    }


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


STAGING_IMAGE = "registry.fly.io/web-staging:deploy-1"
PROD_IMAGE = "registry.fly.io/web-prod:deploy-1"


def machine(**extra: object) -> bytes:
    return json.dumps({"config": {"image": STAGING_IMAGE}, **extra}).encode()


# (name, role, method, path, query, body, expected status (or statuses), error code when refused)
Case = tuple[str, str, str, bytes, bytes, bytes | None, int | tuple[int, ...], str | None]
# A body that means one thing to Python and another to Go: refused as ambiguous (400) or judged the
# way the upstream will read it (403); never forwarded.
AMBIGUOUS = (400, 403)

CASES: list[Case] = [
    # the query names another app: forwarded unchanged, authorized on the path
    ("query app_name=web-prod on a web-staging path", "viewer", "GET", b"/v1/apps/web-staging/machines",
     b"app_name=web-prod", None, 200, None),
    ("query app_name=web-staging on a web-prod path", "viewer", "GET", b"/v1/apps/web-prod/machines",
     b"app_name=web-staging", None, 403, "forbidden"),
    ("query app_name=web-staging on POST /v1/apps naming web-prod", "deployer", "POST", b"/v1/apps",
     b"app_name=web-staging", b'{"name":"web-prod"}', 403, "forbidden"),
    # the body names another app on an app-scoped path
    ("machine create body naming web-prod", "deployer", "POST", b"/v1/apps/web-staging/machines", b"",
     machine(name="web-prod"), 200, None),
    ("machine create body with app_name, a field the constrained schema lacks", "deployer", "POST",
     b"/v1/apps/web-staging/machines", b"", machine(app_name="web-prod"), 400, "bad_request"),
    ("machine create on web-prod with a body naming web-staging", "deployer", "POST", b"/v1/apps/web-prod/machines",
     b"", machine(app_name="web-staging"), 403, "forbidden"),
    ("ip allocation body naming another app", "deployer", "POST", b"/v1/apps/web-staging/ip_assignments",
     b"", b'{"type":"v6","org_slug":"acme","app_name":"web-prod"}', 200, None),
    ("ip allocation body naming another org", "deployer", "POST", b"/v1/apps/web-staging/ip_assignments",
     b"", b'{"type":"v6","org_slug":"other-org"}', 403, "forbidden"),
    # POST /v1/apps: the app is in the body
    ("create: name is covered", "deployer", "POST", b"/v1/apps", b"", b'{"name":"web-staging","org_slug":"acme"}',
     200, None),
    ("create: app_name is covered", "deployer", "POST", b"/v1/apps", b"wait=true", b'{"app_name":"web-staging"}',
     200, None),
    ("create: name not covered", "deployer", "POST", b"/v1/apps", b"", b'{"name":"web-prod"}', 403, "forbidden"),
    ("create: app_name not covered", "deployer", "POST", b"/v1/apps", b"", b'{"app_name":"web-prod"}', 403,
     "forbidden"),
    ("create: name covered, app_name not", "deployer", "POST", b"/v1/apps", b"",
     b'{"name":"web-staging","app_name":"web-prod"}', 400, "bad_request"),
    ("create: app_name covered, name not", "deployer", "POST", b"/v1/apps", b"",
     b'{"app_name":"web-staging","name":"web-prod"}', 400, "bad_request"),
    ("create: JSON escape spelling the same key twice", "deployer", "POST", b"/v1/apps", b"",
     b'{"name":"web-staging","n\\u0061me":"web-prod"}', AMBIGUOUS, None),
    ("create: name as a list", "deployer", "POST", b"/v1/apps", b"", b'{"name":["web-staging"]}', 400,
     "bad_request"),
    ("create: upper-case name", "deployer", "POST", b"/v1/apps", b"", b'{"name":"WEB-STAGING"}', 400, "bad_request"),
    ("create: name with a trailing NUL", "deployer", "POST", b"/v1/apps", b"", b'{"name":"web-staging\\u0000"}', 400,
     "bad_request"),
    ("create: a second JSON document after the first", "deployer", "POST", b"/v1/apps", b"",
     b'{"name":"web-staging"}{"name":"web-prod"}', 400, "bad_request"),
    ("create: a JSON array", "deployer", "POST", b"/v1/apps", b"", b'[{"name":"web-staging"}]', 400, "bad_request"),
    ("create: no body", "deployer", "POST", b"/v1/apps", b"", b"", 400, "bad_request"),
    # parser differentials: Go's encoding/json folds key case and decodes every duplicate
    ("create: NAME in another case names web-prod (Go reads it)", "deployer", "POST", b"/v1/apps", b"",
     b'{"name":"web-staging","NAME":"web-prod"}', AMBIGUOUS, None),
    ("create: App_Name in another case names web-prod (Go reads it)", "deployer", "POST", b"/v1/apps", b"",
     b'{"app_name":"web-staging","App_Name":"web-prod"}', AMBIGUOUS, None),
    ("create: name given twice", "deployer", "POST", b"/v1/apps", b"", b'{"name":"web-prod","name":"web-staging"}',
     AMBIGUOUS, None),
    # the same differential against the request-shape constraints on a machine body
    ("machine image from another app is refused (control)", "deployer", "POST", b"/v1/apps/web-staging/machines",
     b"", json.dumps({"config": {"image": PROD_IMAGE}}).encode(), 403, "forbidden"),
    ("machine image in another key case (Go reads Image)", "deployer", "POST", b"/v1/apps/web-staging/machines", b"",
     json.dumps({"config": {"image": STAGING_IMAGE, "Image": PROD_IMAGE}}).encode(), AMBIGUOUS, None),
    ("machine config given twice (Go merges both)", "deployer", "POST", b"/v1/apps/web-staging/machines", b"",
     ('{"config":{"image":"' + PROD_IMAGE + '"},"config":{}}').encode(), AMBIGUOUS, None),
    # org-level endpoints
    ("org machines of another org, org-wide admin", "org-admin", "GET", b"/v1/orgs/other-org/machines", b"", None,
     403, "forbidden"),
    ("org volumes, org-wide admin", "org-admin", "GET", b"/v1/orgs/acme/volumes", b"", None, 403, "forbidden"),
    ("org machines, app-scoped token", "viewer", "GET", b"/v1/orgs/acme/machines", b"", None, 403, "forbidden"),
    ("placements in the gateway's org", "viewer", "POST", b"/v1/platform/placements", b"",
     b'{"org_slug":"acme","region":"ams"}', 200, None),
    ("placements naming another org (every org_slug must be the gateway's)", "viewer", "POST",
     b"/v1/platform/placements", b"", b'{"org_slug":"other-org","region":"ams"}', 403, "forbidden"),
    ("deploy token for the covered app (always denied)", "org-admin", "POST", b"/v1/apps/web-staging/deploy_token",
     b"", b"{}", 403, "forbidden"),
    ("upstream token verification oracle (always denied)", "org-admin", "POST", b"/v1/tokens/authenticate", b"",
     b'{"token":"x"}', 403, "forbidden"),
    # secret values: show_secrets refines the action, fail closed on every spelling
    ("show_secrets=true for a viewer", "viewer", "GET", b"/v1/apps/web-staging/secrets", b"show_secrets=true", None,
     403, "forbidden"),
    ("Show_Secrets in another case", "viewer", "GET", b"/v1/apps/web-staging/secrets", b"Show_Secrets=1", None, 403,
     "forbidden"),
    ("show_secrets with an encoded underscore", "viewer", "GET", b"/v1/apps/web-staging/secrets",
     b"show%5Fsecrets=1", None, 403, "forbidden"),
    ("show_secrets false then true", "viewer", "GET", b"/v1/apps/web-staging/secrets",
     b"show_secrets=false&show_secrets=true", None, 403, "forbidden"),
    ("show_secrets=yes on one secret", "viewer", "GET", b"/v1/apps/web-staging/secrets/API_KEY", b"show_secrets=yes",
     None, 403, "forbidden"),
    ("show_secrets=false stays a listing", "viewer", "GET", b"/v1/apps/web-staging/secrets", b"show_secrets=false",
     None, 200, None),
]


@pytest.mark.parametrize(("name", "role", "method", "path", "query", "body", "status", "error"), CASES,
                         ids=[c[0] for c in CASES])
def test_app_is_authorized_where_the_upstream_reads_it(name: str, role: str, method: str, path: bytes, query: bytes,
                                                        body: bytes | None, status: int | tuple[int, ...],
                                                        error: str | None,
                                                        tokens: dict[str, str], gw: RunningGateway) -> None:
    token = tokens[role]
    target = path + (b"?" + query if query else b"")
    answer = send(gw, request(method, target, token=token, body=body,
                              headers=[(b"Content-Type", b"application/json")] if body is not None else []))
    if status == 200:
        assert answer.status == 200, answer.body
        assert_forwarded_exactly(gw, method=method, raw_path=path, query=query, body=body or b"",
                                 client_tokens=tokens.values())
        record = audit_record(gw, answer)
        assert record["decision"] == "allow"
        assert record["app"] in ("web-staging", None)
    else:
        assert_refused(gw, answer, status, error)


# --- the filtered app listing never leaks ----------------------------------------------------

LISTING = {"total_apps": 3, "apps": [{"name": n, "organization": {"slug": "acme"}}
                                     for n in ("web-prod", "web-staging", "api-staging")]}


def listing_reply(status: int = 200, body: bytes | None = None, headers: list[tuple[bytes, bytes]] | None = None
                  ) -> Reply:
    return Reply(status=status, body=body if body is not None else json.dumps(LISTING).encode(),
                 headers=headers or [(b"content-type", b"application/json")])


LISTINGS: list[tuple[str, Reply]] = [
    ("plain 200 listing", listing_reply()),
    ("listing with a 203 status", listing_reply(status=203)),
    ("gzip-encoded listing", listing_reply(body=gzip.compress(json.dumps(LISTING).encode()),
                                           headers=[(b"content-type", b"application/json"),
                                                    (b"content-encoding", b"gzip")])),
    ("listing whose items hide names", listing_reply(body=json.dumps({"apps": [
        {"Name": "web-prod"}, {"name": ["web-prod"]}, "web-prod", {"name": "web-staging"}]}).encode())),
    ("listing with apps given twice", listing_reply(
        body=b'{"apps":[{"name":"web-prod"}],"apps":[{"name":"web-staging"}]}')),
]


@pytest.mark.parametrize(("name", "reply"), LISTINGS, ids=[n for n, _ in LISTINGS])
def test_org_listing_never_shows_an_app_the_token_does_not_cover(name: str, reply: Reply, tokens: dict[str, str],
                                                                 gw: RunningGateway) -> None:
    gw.upstream.reply = reply
    answer = send(gw, request("GET", b"/v1/apps?org_slug=other-org", token=tokens["viewer"]))
    assert_forwarded_exactly(gw, method="GET", raw_path=b"/v1/apps", query=b"org_slug=other-org",
                             client_tokens=tokens.values())
    assert b"web-prod" not in answer.body
    assert b"api-staging" not in answer.body
    try:
        raw = gzip.decompress(answer.body)
    except (OSError, EOFError):
        raw = answer.body
    assert b"web-prod" not in raw and b"api-staging" not in raw
    if answer.status == 200:
        names = [item["name"] for item in answer.json()["apps"]]
        assert set(names) <= {"web-staging"}
