"""The GraphQL operation map (policies/routes/fly-graphql.yaml): root fields, actions, app sources,
and the per-type field allow-list that bounds what a document may traverse.

`OperationMap.load` reads the file and checks it against Fly's schema (every root field, type
and field it names must exist; an app source must name an argument the field has), so a typo is
a load error, never a silently open or closed operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from graphql import GraphQLInterfaceType, GraphQLObjectType, GraphQLSchema

from gateway.core.rules import ProducedAction
from gateway.errors import ConfigError

SourceKind = Literal["arg", "input", "none", "org"]


@dataclass(frozen=True, slots=True)
class AppSource:
    kind: SourceKind
    name: str = ""  # the argument (arg, org) or the input field (input)


@dataclass(frozen=True, slots=True)
class RootRule:
    operation: str  # query | mutation
    field: str
    action: str = ""
    sources: tuple[AppSource, ...] = ()
    filter_organizations: bool = False
    deny_reason: str | None = None
    source: str = ""  # where in the map file, for messages


@dataclass(frozen=True, slots=True)
class FieldRule:
    action: str | None = None  # reading the field also needs this action on the root field's app


class OperationMap:
    def __init__(self, roots: dict[tuple[str, str], RootRule], types: dict[str, dict[str, FieldRule]],
                 source: Path) -> None:
        self.roots = roots
        self.types = types
        self.source = source

    def produced_actions(self) -> list[ProducedAction]:
        produced = [ProducedAction(rule.action, rule.source) for rule in self.roots.values()
                    if rule.deny_reason is None]
        produced += [ProducedAction(rule.action, f"{self.source}: types.{type_name}.{field}")
                     for type_name, fields in self.types.items() for field, rule in fields.items() if rule.action]
        return produced

    @classmethod
    def load(cls, path: Path, schema: GraphQLSchema) -> OperationMap:
        try:
            document = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"GraphQL map {path} does not exist (graphql.map)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"GraphQL map {path} is not valid YAML: {exc}") from None
        if not isinstance(document, dict) or set(document) - {"query", "mutation", "types"}:
            raise ConfigError(f"GraphQL map {path} must be a mapping with query:, mutation: and types:")
        roots: dict[tuple[str, str], RootRule] = {}
        for operation, root_type in (("query", schema.query_type), ("mutation", schema.mutation_type)):
            for field, item in (document.get(operation) or {}).items():
                where = f"{path}: {operation}.{field}"
                if root_type is None or field not in root_type.fields:
                    raise ConfigError(f"{where}: Fly's schema has no {operation} field {field!r}")
                roots[(operation, field)] = _root_rule(operation, field, item, root_type, where)
        types: dict[str, dict[str, FieldRule]] = {}
        for type_name, fields in (document.get("types") or {}).items():
            graphql_type = schema.type_map.get(type_name)
            if not isinstance(graphql_type, GraphQLObjectType | GraphQLInterfaceType) or not isinstance(fields, list):
                raise ConfigError(f"{path}: types.{type_name} must be an object or interface type of the schema "
                                  "with a list of its fields")
            types[type_name] = {}
            for entry in fields:
                name, rule = _field_rule(entry, f"{path}: types.{type_name}")
                if name not in graphql_type.fields:
                    raise ConfigError(f"{path}: types.{type_name}: the schema has no field {name!r}")
                types[type_name][name] = rule
        return cls(roots, types, path)


def _root_rule(operation: str, field: str, item: Any, root_type: GraphQLObjectType, where: str) -> RootRule:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping (action, app) or (deny, reason)")
    if item.get("deny") is not None:
        if item.get("deny") != "always" or not isinstance(item.get("reason"), str):
            raise ConfigError(f"{where}: deny must be `always`, with a `reason` for the client")
        return RootRule(operation, field, deny_reason=item["reason"], source=where)
    unknown = set(item) - {"action", "app", "filter"}
    if unknown or not isinstance(item.get("action"), str) or not isinstance(item.get("app"), str):
        raise ConfigError(f"{where}: expected action: and app: (and optionally filter: organizations)")
    if item.get("filter") not in (None, "organizations"):
        raise ConfigError(f"{where}: filter must be `organizations` when present")
    arguments = root_type.fields[field].args
    sources = []
    for alternative in item["app"].split("|"):
        kind, _, name = alternative.partition(":")
        if kind in ("arg", "org") and name in arguments:
            sources.append(AppSource("arg" if kind == "arg" else "org", name))
        elif kind == "input" and "input" in arguments and name:
            sources.append(AppSource("input", name))
        elif kind == "none" and not name:
            sources.append(AppSource("none"))
        else:
            raise ConfigError(f"{where}: app {alternative!r} must be arg:<argument>, input:<field>, org:<argument> "
                              f"or none (arguments: {', '.join(arguments) or 'none'})")
    if any(s.kind in ("none", "org") for s in sources) and item["action"] != "platform:read":
        raise ConfigError(f"{where}: fields without an app (none, org:) may only be platform:read")
    return RootRule(operation, field, item["action"], tuple(sources), item.get("filter") == "organizations",
                    source=where)


def _field_rule(entry: Any, where: str) -> tuple[str, FieldRule]:
    if isinstance(entry, str):
        return entry, FieldRule()
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, action),) = entry.items()
        if isinstance(name, str) and isinstance(action, str):
            return name, FieldRule(action)
    raise ConfigError(f"{where}: each field is a name, or {{name: action}}")
