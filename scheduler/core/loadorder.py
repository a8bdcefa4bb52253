"""Names kept in order of a key that changes one name at a time.

A large pool's pick reads its least loaded endpoints without visiting the others
(``Scheduler``'s candidate pruning): the order is updated where an endpoint's load changes
(a routed request, a first token, a completion, a scrape, a peer's message), not rebuilt per
pick. A sorted list of (key, name) with binary search: a change is two bisections and two
memmoves of at most a few thousand pointers, ~1-2 us at 1,000 names, where a balanced tree
in Python would cost more per step than the memmove it saves.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

K = TypeVar("K", bound="SupportsRichComparison")


class OrderedNames(Generic[K]):
    """Names, smallest key first; equal keys by name."""

    __slots__ = ("_entries", "_keys")

    def __init__(self) -> None:
        self._keys: dict[str, K] = {}
        self._entries: list[tuple[K, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def set(self, name: str, key: K) -> None:
        """Give ``name`` this key (adding it if new)."""
        old = self._keys.get(name)
        if old is not None:
            if old == key:
                return
            del self._entries[bisect_left(self._entries, (old, name))]
        self._keys[name] = key
        insort(self._entries, (key, name))

    def remove(self, name: str) -> None:
        old = self._keys.pop(name, None)
        if old is not None:
            del self._entries[bisect_left(self._entries, (old, name))]

    def key(self, name: str) -> K | None:
        return self._keys.get(name)

    def __iter__(self) -> Iterator[str]:
        """Names, smallest key first. Do not change the order while iterating."""
        return (name for _, name in self._entries)
