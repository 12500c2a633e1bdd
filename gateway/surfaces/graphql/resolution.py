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
    def mutations(self) -> tuple[str, ...]:
        """The mutation fields the body's documents hold, each once."""
        return tuple(dict.fromkeys(name for document in self.key.documents for name in document.mutations))

    @property
    def mixed(self) -> bool:
        """The body holds mutations and other root fields (in one document or across a batch)."""
        documents = self.key.documents
        mutations = sum(len(document.mutations) for document in documents)
        return 0 < mutations < sum(len(document.uses) for document in documents)
