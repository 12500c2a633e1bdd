"""A least-recently-used cache bounded by the bytes its entries hold, not by their count.

The token caches (verified claims, registry records) must hold every token in use, however many
there are, and still be bounded: a count bound either wastes memory or thrashes, depending on how
big each entry is. Each entry is charged `size_of(value)` plus a fixed per-entry overhead (the key
and the mapping's own slot), measured with tracemalloc (tests/test_token_cache.py checks the
charge against what tracemalloc sees); `size_of` must be a pure function of the value, since it
is asked again when the entry leaves.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MIB = 1024 * 1024
# What an OrderedDict keeps per entry beyond the key and value objects: its hash table slot and
# index, and the linked-list node (measured with tracemalloc on CPython 3.11 at 100,000 entries:
# ~125-150 bytes, depending on how full the table is).
SLOT_BYTES = 150


class SizedLRU(Generic[K, V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int], *, key_bytes: int = 0) -> None:
        """`key_bytes`: what one key costs (keys of fixed size, e.g. digests); 0 for keys the
        value already holds (a string that is also one of its fields)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be 0 or more")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entry_bytes = SLOT_BYTES + key_bytes
        self.entries: OrderedDict[K, V] = OrderedDict()  # read directly only by hot paths; change with put/pop
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: K) -> bool:
        return key in self.entries

    def get(self, key: K) -> V | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        charge = self._entry_bytes + self._size_of(value)
        if charge > self.max_bytes:
            return  # could never fit: not kept (a budget of 0 keeps nothing)
        self.entries[key] = value
        self.bytes += charge
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self._entry_bytes + self._size_of(old)
            self.evictions += 1

    def pop(self, key: K) -> V | None:
        value = self.entries.pop(key, None)
        if value is not None:
            self.bytes -= self._entry_bytes + self._size_of(value)
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def str_bytes(text: str | None) -> int:
    return 0 if text is None else sys.getsizeof(text)
