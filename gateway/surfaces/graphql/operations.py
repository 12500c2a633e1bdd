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
# What an argument the map lets through may hold (checked per request, variables resolved):
#   any           anything (pagination, flags)
#   app-image     an image reference; on registry.fly.io only in the root field's app's repository
#   public-image  an image reference anywhere but registry.fly.io (no app's private images)
ARG_KINDS = frozenset({"any", "app-image", "public-image"})


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
    args: tuple[tuple[str, str], ...] = ()  # other arguments allowed, with their kind (ARG_KINDS)
    input_fields: frozenset[str] = frozenset()  # the fields its `input` may carry (the app's included)


@dataclass(frozen=True, slots=True)
class FieldRule:
    action: str | None = None  # reading the field also needs this action on the root field's app
    args: tuple[tuple[str, str], ...] = ()  # the arguments it may be given, with their kind


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
                unknown = {arg for arg, _ in rule.args} - set(graphql_type.fields[name].args)
                if unknown:
                    raise ConfigError(f"{path}: types.{type_name}.{name}: the schema has no argument(s) "
                                      f"{', '.join(sorted(unknown))}")
                types[type_name][name] = rule
        return cls(roots, types, path)


def _root_rule(operation: str, field: str, item: Any, root_type: GraphQLObjectType, where: str) -> RootRule:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping (action, app) or (deny, reason)")
    if item.get("deny") is not None:
        if item.get("deny") != "always" or not isinstance(item.get("reason"), str):
            raise ConfigError(f"{where}: deny must be `always`, with a `reason` for the client")
        return RootRule(operation, field, deny_reason=item["reason"], source=where)
    unknown = set(item) - {"action", "app", "filter", "args", "input"}
    if unknown or not isinstance(item.get("action"), str) or not isinstance(item.get("app"), str):
        raise ConfigError(f"{where}: expected action: and app: (and optionally filter:, args:, input:)")
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
    args = _args(item.get("args"), where)
    unknown_args = {arg for arg, _ in args} - set(arguments)
    if unknown_args:
        raise ConfigError(f"{where}: the schema has no argument(s) {', '.join(sorted(unknown_args))}")
    input_fields = frozenset(s.name for s in sources if s.kind == "input")
    if item.get("input") is not None:
        fields = item["input"]
        if not input_fields or not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise ConfigError(f"{where}: input: lists the fields of an `input` that names the app (app: input:...)")
        input_fields |= frozenset(fields)
    return RootRule(operation, field, item["action"], tuple(sources), item.get("filter") == "organizations",
                    source=where, args=args, input_fields=input_fields)


def _args(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(k, str) and v in ARG_KINDS for k, v in raw.items()):
        raise ConfigError(f"{where}: args maps argument names to one of {', '.join(sorted(ARG_KINDS))}")
    return tuple(sorted(raw.items()))


def _field_rule(entry: Any, where: str) -> tuple[str, FieldRule]:
    if isinstance(entry, str):
        return entry, FieldRule()
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, spec),) = entry.items()
        if isinstance(name, str) and isinstance(spec, str):
            return name, FieldRule(spec)
        if isinstance(name, str) and isinstance(spec, dict) and not set(spec) - {"action", "args"} \
                and isinstance(spec.get("action", ""), str):
            return name, FieldRule(spec.get("action") or None, _args(spec.get("args"), f"{where}.{name}"))
    raise ConfigError(f"{where}: each field is a name, {{name: action}} or {{name: {{action: ..., args: {{...}}}}}}")
