"""GraphQL documents: parsed, bounded, validated against Fly's schema and analyzed, once each.

`DocumentAnalyzer.analyze(text)` returns what a document asks for: one `RootUse` per root field of
every operation in it (aliases, fragments and several operations included), each with its rule
from the operation map, its arguments as written and the actions of the fields read below it. The
result, or the refusal, is cached by the document's SHA-256, so a repeated document costs a hash
and a lookup.

A hostile document is refused cheaply, in order: its length; its tokens and brace nesting, counted
by one regular expression before anything is parsed (graphql-core's parser costs ~5 µs a token);
after parsing, its depth, aliases and fields (one linear pass; a fragment is measured once however
often it is spread); and only then full validation (~1 ms for a flyctl document).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLCompositeType,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    ValueNode,
    VariableDefinitionNode,
    VariableNode,
    get_named_type,
    parse,
    validate,
)
from graphql.utilities import value_from_ast_untyped

from gateway.errors import BadRequest, Forbidden, GatewayError, UnknownRoute
from gateway.surfaces.graphql.operations import OperationMap, RootRule

MAX_DOCUMENT_BYTES = 16 * 1024
MAX_TOKENS = 1_000  # flyctl's largest document has about 60
MAX_NESTING = 16  # braces, before parsing: field depth (MAX_DEPTH) plus input objects
MAX_DEPTH = 12
MAX_ALIASES = 20
MAX_FIELDS = 400
MAX_OPERATIONS = 5
CACHE_LIMIT = 2_048
# What the GraphQL lexer reads as tokens (strings, names, numbers, punctuators) and comments, left to
# right, so a '#' inside a string stays part of the string. Possessive quantifiers and an optional
# closing quote keep it linear: an unterminated string is one token to the end of its line (block
# strings: of the text), never a rescan from every quote.
_TOKEN = re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*+(?:""")?|"(?:[^"\\\n]|\\.)*+"?|#[^\n\r]*+|\.\.\.'
                    r"|[!$&():=@\[\]{|}]|-?\d[\d.eE+-]*+|[_A-Za-z][_0-9A-Za-z]*+")


@dataclass(frozen=True, slots=True)
class RootUse:
    """One root field a document selects."""

    rule: RootRule
    response_key: str  # its alias, else its name: where its answer is in `data`
    arguments: dict[str, ValueNode]
    defaults: dict[str, Any]  # the operation's variable defaults
    field_actions: tuple[str, ...]  # actions of the fields read below it (App.secrets: secrets:list)
    arg_checks: tuple[tuple[str, ValueNode, str], ...] = ()  # (where, value as written, kind) per request


@dataclass(frozen=True, slots=True, eq=False)  # identity: part of a decision cache key
class Document:
    uses: tuple[RootUse, ...]
    operations: int
    mutations: tuple[str, ...] = field(default=())
    # Each operation's variable definitions: the request's variables are coerced against them.
    variables: tuple[tuple[VariableDefinitionNode, ...], ...] = field(default=())

    @property
    def filtered(self) -> tuple[RootUse, ...]:
        """The root fields whose answer the gateway cuts down (organizations)."""
        return tuple(use for use in self.uses if use.rule.filter_organizations)


class DocumentAnalyzer:
    def __init__(self, schema: GraphQLSchema, operations: OperationMap) -> None:
        self.schema = schema
        self.operations = operations
        self._cache: dict[bytes, Document | tuple[type[GatewayError], str]] = {}
        self.parsed = 0  # documents parsed and validated (the rest came from the cache)

    def analyze(self, text: str) -> Document:
        if len(text) > MAX_DOCUMENT_BYTES:  # before hashing or parsing anything
            raise BadRequest(f"the GraphQL document is longer than {MAX_DOCUMENT_BYTES} characters")
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(key)
        if cached is None:
            try:
                cached = self._analyze(text)
            except GatewayError as error:
                cached = (type(error), error.message)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache = {}
            self._cache[key] = cached
        if isinstance(cached, Document):
            return cached
        error_class, message = cached
        raise error_class(message)

    def _analyze(self, text: str) -> Document:
        _precount(text)
        self.parsed += 1
        try:
            document = parse(text, no_location=True, max_tokens=MAX_TOKENS)
        except GraphQLError as exc:
            raise BadRequest(f"the GraphQL document does not parse: {exc.message}") from None
        fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        if not operations:
            raise BadRequest("the GraphQL document has no operation")
        if len(operations) > MAX_OPERATIONS:
            raise BadRequest(f"the GraphQL document has more than {MAX_OPERATIONS} operations")
        measure = _Measure(fragments)
        for operation in operations:
            measure.selection_set(operation.selection_set, 1)
        errors = validate(self.schema, document, max_errors=5)
        if errors:
            raise BadRequest("the GraphQL document is not valid against Fly's schema: "
                             + "; ".join(error.message for error in errors))
        uses: list[RootUse] = []
        mutations: list[str] = []
        for operation in operations:
            if operation.operation == OperationType.SUBSCRIPTION:
                raise UnknownRoute("GraphQL subscriptions are not served through the gateway")
            kind = "mutation" if operation.operation == OperationType.MUTATION else "query"
            root_type = self.schema.mutation_type if kind == "mutation" else self.schema.query_type
            assert root_type is not None  # validation checked the operation against the schema
            defaults = {d.variable.name.value: value_from_ast_untyped(d.default_value)
                        for d in operation.variable_definitions or () if d.default_value is not None}
            for node in _fields(operation.selection_set, fragments):
                name = node.name.value
                if name == "__typename":
                    continue
                rule = self.operations.roots.get((kind, name))
                if rule is None:
                    raise UnknownRoute(f"GraphQL {kind} field {name!r} is not served through the gateway; "
                                       "it is denied")
                if rule.deny_reason is not None:
                    raise Forbidden(f"GraphQL {kind} field {name!r} is always denied through the gateway: "
                                    f"{rule.deny_reason}")
                if kind == "mutation":
                    mutations.append(name)
                where = f"{kind} {name}"
                arguments = {a.name.value: a.value for a in node.arguments or ()}
                checks = _root_argument_checks(rule, arguments, where)
                if rule.filter_organizations:
                    _check_organizations_shape(node, where)
                actions = self._traverse(node, root_type.fields[name].type, fragments, where, checks)
                uses.append(RootUse(rule, node.alias.value if node.alias else name, arguments, defaults,
                                    tuple(dict.fromkeys(actions)), tuple(checks)))
        return Document(tuple(uses), len(operations), tuple(mutations),
                        tuple(tuple(o.variable_definitions or ()) for o in operations))

    def _traverse(self, node: FieldNode, field_type: Any, fragments: dict[str, FragmentDefinitionNode],
                  where: str, checks: list[tuple[str, ValueNode, str]]) -> list[str]:
        """The actions of the fields selected below `node`; raises Forbidden for a field the map does not
        let a token read (the traversal rule of docs/graphql.md)."""
        named = get_named_type(field_type)
        if node.selection_set is None or not isinstance(named, GraphQLCompositeType):
            return []
        actions: list[str] = []
        stack: list[tuple[SelectionSetNode, Any, str]] = [(node.selection_set, named, where)]
        while stack:
            selection_set, parent, path = stack.pop()
            for selection in selection_set.selections:
                if isinstance(selection, FieldNode):
                    name = selection.name.value
                    if name == "__typename":
                        continue
                    allowed = self.operations.types.get(parent.name, {})
                    rule = allowed.get(name)
                    if rule is None or not isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
                        raise Forbidden(f"{path}: field {parent.name}.{name} is not readable through the gateway "
                                        "(docs/graphql.md lists what is)")
                    if rule.action:
                        actions.append(rule.action)
                    allowed_args = dict(rule.args)
                    for argument in selection.arguments or ():
                        kind = allowed_args.get(argument.name.value)
                        if kind is None:
                            raise Forbidden(f"{path}: argument {parent.name}.{name}({argument.name.value}:) is not "
                                            "accepted through the gateway")
                        checks.append((f"{path}.{name}({argument.name.value}:)", argument.value, kind))
                    child = get_named_type(parent.fields[name].type)
                    if selection.selection_set is not None and isinstance(child, GraphQLCompositeType):
                        stack.append((selection.selection_set, child, f"{path}.{name}"))
                elif isinstance(selection, FragmentSpreadNode | InlineFragmentNode):
                    fragment = fragments[selection.name.value] if isinstance(selection, FragmentSpreadNode) \
                        else selection
                    condition = fragment.type_condition
                    target = self.schema.type_map.get(condition.name.value) if condition is not None else parent
                    stack.append((fragment.selection_set, target, path))
        return actions


def _root_argument_checks(rule: RootRule, arguments: dict[str, ValueNode],
                          where: str) -> list[tuple[str, ValueNode, str]]:
    """The root field's arguments: its app's, its `input` (fields checked per request), and those the
    map lets through; any other refuses the document."""
    sources = {source.name for source in rule.sources if source.kind in ("arg", "org")}
    allowed = dict(rule.args)
    checks: list[tuple[str, ValueNode, str]] = []
    for name, value in arguments.items():
        if name in sources or (name == "input" and rule.input_fields):
            continue
        kind = allowed.get(name)
        if kind is None:
            raise Forbidden(f"{where}: argument {name}: is not accepted through the gateway (it could name "
                            "something the gateway does not authorize)")
        checks.append((f"{where}({name}:)", value, kind))
    return checks


_ORGANIZATION_CONNECTION = {"nodes", "edges", "totalCount", "pageInfo", "__typename"}


def _check_organizations_shape(node: FieldNode, where: str) -> None:
    """An answer the gateway filters must have the shape it filters: `nodes { slug ... }` or
    `edges { node { slug ... } }`, no aliases and no fragments anywhere below (an alias would carry
    the unfiltered list under another name)."""

    def plain(selection_set: SelectionSetNode | None, context: str) -> dict[str, FieldNode]:
        fields: dict[str, FieldNode] = {}
        for selection in selection_set.selections if selection_set else ():
            if not isinstance(selection, FieldNode) or selection.alias is not None:
                raise Forbidden(f"{where}: {context} must select plain fields, without aliases or fragments "
                                "(the gateway cuts this answer down to its own organization)")
            fields[selection.name.value] = selection
            plain(selection.selection_set, f"{context}.{selection.name.value}")
        return fields

    connection = plain(node.selection_set, "organizations")
    if set(connection) - _ORGANIZATION_CONNECTION:
        raise Forbidden(f"{where}: organizations may select only {', '.join(sorted(_ORGANIZATION_CONNECTION))}")
    lists = [plain(connection["nodes"].selection_set, "nodes")] if "nodes" in connection else []
    if "edges" in connection:
        edges = plain(connection["edges"].selection_set, "edges")
        lists.append(plain(edges["node"].selection_set, "edges.node") if "node" in edges else {})
    if not lists or not all("slug" in organization for organization in lists):
        raise Forbidden(f"{where}: select `slug` on the organizations (nodes {{ slug }}): the gateway keeps only "
                        "its own")


def _precount(text: str) -> None:
    """Tokens and brace nesting, read before the (slow, pure-Python) parser sees the document."""
    tokens = _TOKEN.findall(text)
    if "#" in text:
        tokens = [token for token in tokens if not token.startswith("#")]
    if len(tokens) > MAX_TOKENS:
        raise BadRequest(f"the GraphQL document has more than {MAX_TOKENS} tokens")
    depth = deepest = 0
    for token in tokens:
        if token == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif token == "}":
            depth -= 1
    if deepest > MAX_NESTING:
        raise BadRequest(f"the GraphQL document is nested deeper than {MAX_DEPTH} levels")


def _fields(selection_set: SelectionSetNode, fragments: dict[str, FragmentDefinitionNode]) -> Iterable[FieldNode]:
    """The fields of a root selection set, through fragments (validation ruled out fragment cycles)."""
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _fields(selection.selection_set, fragments)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is not None:
                yield from _fields(fragment.selection_set, fragments)


class _Measure:
    """Depth, aliases and fields of a document before validation, each fragment measured once."""

    def __init__(self, fragments: dict[str, FragmentDefinitionNode]) -> None:
        self.fragments = fragments
        self._sizes: dict[str, tuple[int, int, int]] = {}  # fragment -> (depth, aliases, fields)
        self._open: set[str] = set()

    def selection_set(self, selection_set: SelectionSetNode, depth: int) -> tuple[int, int, int]:
        deepest, aliases, fields = depth, 0, 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                fields += 1
                aliases += selection.alias is not None
                if selection.selection_set is not None:
                    below = self.selection_set(selection.selection_set, depth + 1)
                    deepest, aliases, fields = max(deepest, below[0]), aliases + below[1], fields + below[2]
            elif isinstance(selection, FragmentSpreadNode | InlineFragmentNode):
                sub = self._fragment(selection.name.value) if isinstance(selection, FragmentSpreadNode) \
                    else self.selection_set(selection.selection_set, 0)
                deepest, aliases, fields = max(deepest, depth + sub[0]), aliases + sub[1], fields + sub[2]
            self._check(deepest, aliases, fields)
        return deepest, aliases, fields

    def _fragment(self, name: str) -> tuple[int, int, int]:
        known = self._sizes.get(name)
        if known is not None:
            return known
        fragment = self.fragments.get(name)
        if fragment is None or name in self._open:
            return (0, 0, 0)  # unknown or cyclic: validation refuses it next
        self._open.add(name)
        size = self.selection_set(fragment.selection_set, 0)
        self._open.discard(name)
        self._sizes[name] = size
        return size

    @staticmethod
    def _check(depth: int, aliases: int, fields: int) -> None:
        if depth > MAX_DEPTH:
            raise BadRequest(f"the GraphQL document is nested deeper than {MAX_DEPTH} levels")
        if aliases > MAX_ALIASES:
            raise BadRequest(f"the GraphQL document has more than {MAX_ALIASES} aliases")
        if fields > MAX_FIELDS:
            raise BadRequest(f"the GraphQL document selects more than {MAX_FIELDS} fields (fragments counted "
                             "every time they are spread)")


def argument_value(node: ValueNode, variables: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """A field argument's value as the upstream will read it: a literal, a variable (the request's
    value, else the operation's default; an explicit null stays null), or an object or list of them."""
    if isinstance(node, VariableNode):
        name = node.name.value
        return variables[name] if name in variables else defaults.get(name)
    return value_from_ast_untyped(node, {**defaults, **variables})


__all__ = ["Document", "DocumentAnalyzer", "DocumentNode", "RootUse", "argument_value"]
