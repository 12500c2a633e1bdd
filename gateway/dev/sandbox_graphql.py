"""The sandbox's stand-in for Fly's GraphQL API (`POST /graphql`), executing Fly's real schema.

flyctl still asks GraphQL for a few things the Machines API does not answer: an image reference
resolved server-side (`app{image(ref)}` for `deploy --image` and `machine run`), the release
history (`releasesUnprocessed`), the current release's config, the app's org and network, the org
list for `apps create`. This module executes those documents with graphql-core against Fly's schema
(the copy the gateway validates with, gateway/surfaces/graphql/fly-schema.graphql, built into an
object of its own: the sandbox attaches resolvers), so a document flyctl sends that the schema does
not allow fails here as it would at Fly, with errors in the standard
`{"errors": [{"message", "locations", "path"}]}` shape.

The answers are not random mocks: `Query.app`, `organization(s)`, `viewer` and friends read the
same `SandboxState` as the Machines and REST emulations. Every field without a resolver answers
null where the schema allows it and an empty value (``""``, 0, false, [], an empty object) where
it does not, so a client that asks for a field the sandbox knows nothing about gets a well-typed
nothing rather than an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from graphql import (
    ExecutionResult,
    GraphQLError,
    GraphQLOutputType,
    GraphQLSchema,
    build_schema,
    execute,
    get_named_type,
    is_enum_type,
    is_list_type,
    is_non_null_type,
    is_object_type,
    parse,
    validate,
)
from graphql.type.definition import GraphQLAbstractType, GraphQLResolveInfo
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.dev.sandbox_state import App, Org, SandboxError, SandboxState, timestamp
from gateway.surfaces.graphql.surface import SCHEMA_FILE

__all__ = ["fly_schema", "graphql_routes"]

_SCHEMA_FILE = SCHEMA_FILE
_ZERO: dict[str, Any] = {"Int": 0, "Float": 0.0, "Boolean": False, "BigInt": "0", "JSON": {},
                         "ISO8601DateTime": "1970-01-01T00:00:00Z"}
_USER = {"__typename": "User", "id": "U_sandbox", "email": "sandbox@scopegate.dev", "name": "Sandbox User",
         "username": "sandbox"}
_STRATEGIES = frozenset({"BLUEGREEN", "CANARY", "IMMEDIATE", "ROLLING", "ROLLING_ONE", "SIMPLE"})

Resolver = Callable[..., Any]


@lru_cache(maxsize=1)
def fly_schema() -> GraphQLSchema:
    """Built once per process: the schema is 190 kB and takes a moment to build."""
    return build_schema(_SCHEMA_FILE.read_text(encoding="utf-8"))


def _empty(type_: GraphQLOutputType) -> Any:
    """The well-typed nothing for a field that has no value here."""
    if not is_non_null_type(type_):
        return None
    inner = type_.of_type
    if is_list_type(inner):
        return []
    if is_enum_type(inner):
        return next(iter(inner.values.values())).value
    if is_object_type(inner):
        return {}
    named = get_named_type(inner)
    return _ZERO.get(named.name, "") if named is not None else None


def _resolve(source: Any, info: GraphQLResolveInfo[Any], **args: Any) -> Any:
    """Dict keys are field names; a callable value is a resolver and gets the field's arguments."""
    value = source.get(info.field_name) if isinstance(source, dict) else None
    if value is None and info.parent_type is info.schema.mutation_type:
        raise GraphQLError(f"the sandbox does not emulate the mutation {info.field_name}")
    if callable(value):
        value = value(**args)
    return _empty(info.return_type) if value is None else value


def _type_of(value: Any, info: GraphQLResolveInfo[Any], abstract: GraphQLAbstractType) -> str | None:
    return value.get("__typename") if isinstance(value, dict) else None


def _connection(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"nodes": items, "edges": [{"cursor": str(i), "node": n} for i, n in enumerate(items)],
            "totalCount": len(items), "pageInfo": {"hasNextPage": False, "hasPreviousPage": False}}


class _Graph:
    """Turns sandbox records into schema-shaped dicts; one per request, over that request's state."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def org(self, org: Org) -> dict[str, Any]:
        return {
            "__typename": "Organization", "id": org.id, "internalNumericId": str(org.internal_numeric_id),
            "slug": org.slug, "rawSlug": org.slug, "name": org.name, "viewerRole": "admin",
            "type": "PERSONAL" if org.slug == "personal" else "SHARED", "paidPlan": True, "billable": True,
            "billingStatus": "CURRENT", "remoteBuilderImage": org.to_uiex()["remote_builder_image"],
            "apps": lambda **_: _connection([self.app(a) for a in self.state.apps.values()
                                             if a.org_slug == org.slug]),
        }

    def org_of(self, app: App) -> Org:
        return self.state.orgs.get(app.org_slug) or Org(app.org_slug, app.org_slug)

    def release(self, app: App, release: dict[str, Any], typename: str = "ReleaseUnprocessed") -> dict[str, Any]:
        strategy = release["strategy"] if release["strategy"] in _STRATEGIES else "ROLLING"
        return {
            "__typename": typename, "id": release["id"], "version": release["version"],
            "description": release["description"], "reason": release["reason"], "status": release["status"],
            "stable": release["stable"], "inProgress": release["in_progress"], "imageRef": release["image_ref"],
            "deploymentStrategy": strategy, "createdAt": release["created_at"], "updatedAt": timestamp(),
            "user": _USER, "configDefinition": release["definition"], "config": None,
            "metadata": release["metadata"], "image": lambda **_: self.state.image(release["image_ref"]),
        }

    def machine(self, app: App, machine: dict[str, Any]) -> dict[str, Any]:
        return {"__typename": "Machine", "id": machine["id"], "name": machine["name"], "state": machine["state"],
                "region": machine["region"], "instanceId": machine["instance_id"], "config": machine["config"],
                "createdAt": machine["created_at"], "updatedAt": machine["updated_at"],
                "app": lambda **_: self.app(app)}

    def app(self, app: App) -> dict[str, Any]:
        releases = list(reversed(app.releases))  # newest first, as Fly lists them
        current = next((r for r in releases if r["status"] == "complete"), None)

        def releases_page(typename: str) -> Resolver:
            def page(first: int | None = None, **_: Any) -> dict[str, Any]:
                chosen = releases if first is None else releases[: max(first, 0)]
                return _connection([self.release(app, r, typename) for r in chosen])
            return page

        return {
            "__typename": "App", "id": app.name, "name": app.name, "internalId": str(app.internal_numeric_id),
            "internalNumericId": app.internal_numeric_id, "key": app.name, "network": app.network,
            "status": "deployed" if app.machines else "pending", "deployed": bool(app.machines),
            "state": "DEPLOYED" if app.machines else "PENDING", "hostname": f"{app.name}.fly.dev",
            "appUrl": f"https://{app.name}.fly.dev", "platformVersion": "machines", "createdAt": timestamp(),
            "version": len(app.releases), "organization": lambda **_: self.org(self.org_of(app)),
            "currentRelease": current and self.release(app, current, "Release"),
            "currentReleaseUnprocessed": current and self.release(app, current),
            "releases": releases_page("Release"), "releasesUnprocessed": releases_page("ReleaseUnprocessed"),
            "image": lambda ref, **_: self.state.image(ref),
            "egressIpAddresses": lambda **_: _connection([]), "ipAddresses": lambda **_: _connection([]),
            "machines": lambda **_: _connection([self.machine(app, m) for m in app.machines.values()]),
            "secrets": [{"__typename": "Secret", "id": f"{app.name}/{s['name']}", "name": s["name"],
                         "digest": s["digest"], "createdAt": s["created_at"]} for s in app.secrets.values()],
        }

    def find_app(self, name: str | None = None, id: str | None = None, internalId: str | None = None,
                 key: str | None = None) -> dict[str, Any]:
        for app in self.state.apps.values():
            if app.name in (name, id, key) or str(app.internal_numeric_id) == internalId:
                return self.app(app)
        raise GraphQLError("Could not find App", extensions={"code": "NOT_FOUND"})

    def find_org(self, id: str | None = None, name: str | None = None, slug: str | None = None) -> dict[str, Any]:
        for org in self.state.orgs.values():
            if org.slug == slug or org.id == id or (name is not None and org.name == name):
                return self.org(org)
        raise GraphQLError("Could not find Organization", extensions={"code": "NOT_FOUND"})

    def user(self) -> dict[str, Any]:
        orgs = list(self.state.orgs.values())
        return {**_USER, "organizations": lambda **_: _connection([self.org(o) for o in orgs]),
                "personalOrganization": lambda **_: self.org(orgs[0])}

    def query(self) -> dict[str, Any]:
        return {
            "app": self.find_app,
            "apps": lambda organizationId=None, **_: _connection(
                [self.app(a) for a in self.state.apps.values()
                 if organizationId in (None, self.org_of(a).id, a.org_slug)]),
            "organization": self.find_org,
            "organizations": lambda **_: _connection([self.org(o) for o in self.state.orgs.values()]),
            "viewer": self.user, "currentUser": self.user,
            "canPerformBluegreenDeployment": lambda name, **_: name in self.state.apps,
            "latestImageDetails": self.latest_image,
        }

    def latest_image(self, image: str, **_: Any) -> dict[str, Any]:
        """What Fly says is the newest build of a Fly-published image (flyio/postgres and such)."""
        found = self.state.image(image)
        return {"digest": found["digest"], "registry": found["registry"], "repository": found["repository"],
                "tag": found["tag"], "version": None}


def _errors(errors: list[GraphQLError], status: int = 200) -> Response:
    return JSONResponse({"errors": [e.formatted for e in errors]}, status_code=status)


async def graphql_endpoint(request: Request) -> Response:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _errors([GraphQLError("request body is not valid JSON")], 400)
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        return _errors([GraphQLError("the body must be a JSON object with a string `query`")], 400)
    variables, operation = body.get("variables") or {}, body.get("operationName") or None
    if not isinstance(variables, dict) or not isinstance(operation, str | None):
        return _errors([GraphQLError("`variables` must be an object and `operationName` a string")], 400)
    try:
        document = parse(body["query"])
    except GraphQLError as error:
        return _errors([error])
    schema = fly_schema()
    if invalid := validate(schema, document):
        return _errors(invalid)
    state = request.app.state.sandbox
    if not isinstance(state, SandboxState):
        raise SandboxError(500, "the sandbox has no state")
    graph = _Graph(state)
    result = execute(schema, document, root_value=graph.query(), variable_values=variables,
                     operation_name=operation, field_resolver=_resolve, type_resolver=_type_of)
    assert isinstance(result, ExecutionResult), "sandbox resolvers are synchronous"
    answer: dict[str, Any] = {"data": result.data}
    if result.errors:
        answer["errors"] = [e.formatted for e in result.errors]
    return JSONResponse(answer)


def graphql_routes() -> list[Route]:
    return [Route("/graphql", graphql_endpoint, methods=["POST"])]
