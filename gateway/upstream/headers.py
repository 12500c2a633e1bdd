"""The headers of a request to the upstream, as bytes from the client's to the wire."""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest

_UNSAFE_IN_HEAD = (b"\r", b"\n", b"\x00")


class OutgoingHeaders:
    """An upstream request's headers as bytes, in order; names lower-case and compared that way.
    Surfaces set (`headers["Content-Type"] = ...`, replacing), drop (`popall`) and read (`get`)."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[bytes, bytes]] | None = None) -> None:
        self.items: list[tuple[bytes, bytes]] = [] if items is None else items

    def __setitem__(self, name: str, value: str) -> None:
        key = name.lower().encode("latin-1")
        self.items = [item for item in self.items if item[0] != key]
        self.items.append((key, checked_value(value.encode("latin-1"))))

    def add(self, name: bytes, value: bytes) -> None:
        self.items.append((name, checked_value(value)))

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for item_name, value in self.items:
            if item_name == key:
                return value.decode("latin-1")
        return default

    def popall(self, name: str, default: Any = None) -> Any:
        key = name.lower().encode("latin-1")
        found = [value.decode("latin-1") for item_name, value in self.items if item_name == key]
        if not found:
            return default
        self.items = [item for item in self.items if item[0] != key]
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __len__(self) -> int:
        return len(self.items)


def checked_value(value: bytes) -> bytes:
    """A header value that cannot end its line early: a CR, LF or NUL in it is refused (the
    client's parser already refuses them; this guards what the gateway builds too)."""
    for unsafe in _UNSAFE_IN_HEAD:
        if unsafe in value:
            raise BadRequest("a header value holds a line break or NUL; send each header on one line")
    return value
