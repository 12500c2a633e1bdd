"""What a GraphQL request body resolved to: its root fields, their checks, and the key its decision
is cached under (surface.py keeps small resolutions by the body's SHA-256)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.authorizer import Check
from gateway.surfaces.graphql.documents import Document, RootUse


class DecisionKey:
    """The documents (by identity) and the checks a body resolved to, hashed once: the decision
    cache's key, equal for bodies that differ only in what changes no check (an unused variable)."""

    __slots__ = ("_hash", "checks", "documents")

    def __init__(self, documents: tuple[Document, ...], checks: tuple[Check, ...]) -> None:
        self.documents, self.checks = documents, checks
        self._hash = hash((documents, checks))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecisionKey) and self._hash == other._hash \
            and self.documents == other.documents and self.checks == other.checks


@dataclass(frozen=True, slots=True, eq=False)
class Resolution:
    """A body's root fields and their checks, in order, the uses whose answers are filtered, and
    the key its decision is cached under."""

    asked: tuple[tuple[str, Check], ...]  # (operation and field, check)
    checks: tuple[Check, ...]
    filtered: tuple[RootUse, ...]
    key: DecisionKey

    @property
    def only_mutations(self) -> tuple[str, ...]:
        """The mutations the body runs, when it runs nothing else; () otherwise."""
        documents = self.key.documents
        names = tuple(dict.fromkeys(name for document in documents for name in document.mutations))
        if sum(len(document.mutations) for document in documents) != sum(len(d.uses) for d in documents):
            return ()
        return names
