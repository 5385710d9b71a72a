"""The one bounded cache of the package: least recently used first out, bounded in entries and
in bytes, thread-safe, with counters (hits, misses, evictions, entries, bytes, seconds spent
building entries). Compiled constraints, plans, refusals, the router's verdicts, prefix KV
caches, check locations and compiles in flight all live in one of these.

No torch or backend import: the router and the constraint language use it too.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    build_seconds: float = 0.0  # time spent in get_or_build's builders (compiling, planning)

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


def _one_byte(_: object) -> int:
    return 1


class BoundedCache(Generic[K, V]):
    """`size_of` gives an entry's bytes (default 1, so `max_bytes` is one more entry bound).
    `get` counts hits and misses; `peek` and `in` count nothing."""

    def __init__(self, max_entries: int, max_bytes: int | None = None,
                 size_of: Callable[[V], int] = _one_byte) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.stats = CacheStats()
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[K, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return found[0]

    def peek(self, key: K) -> V | None:
        with self._lock:
            found = self._items.get(key)
            return None if found is None else found[0]

    def touch(self, key: K) -> None:
        """Mark `key` used now (a lookup that matched it by other means)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)

    def put(self, key: K, value: V) -> None:
        size = self.size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.stats.bytes -= old[1]
            self._items[key] = (value, size)
            self.stats.bytes += size
            self._evict()

    def pop(self, key: K) -> V | None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is None:
                return None
            self.stats.bytes -= old[1]
            self.stats.entries = len(self._items)
            return old[0]

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The cached value, or `build()`'s, built once even when several threads ask at once."""
        found = self.peek(key)
        if found is None:
            with self._lock:
                building = self._building.setdefault(key, threading.Lock())
            with building:
                found = self.peek(key)
                if found is None:
                    found = self._build(key, build)
                else:
                    self._count_hit(key)
            with self._lock:
                self._building.pop(key, None)
            return found
        self._count_hit(key)
        return found

    def _build(self, key: K, build: Callable[[], V]) -> V:
        started = time.perf_counter()
        with self._lock:
            self.stats.misses += 1
        try:
            value = build()
        finally:
            with self._lock:
                self.stats.build_seconds += time.perf_counter() - started
        self.put(key, value)
        return value

    def _count_hit(self, key: K) -> None:
        with self._lock:
            self.stats.hits += 1
            if key in self._items:
                self._items.move_to_end(key)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot, least recently used first."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def __iter__(self) -> Iterator[K]:
        return iter([k for k, _ in self.items()])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats.bytes = self.stats.entries = 0

    def _evict(self) -> None:
        """Oldest first, keeping the newest entry even when it alone exceeds `max_bytes`."""
        while len(self._items) > 1 and (len(self._items) > self.max_entries or (
                self.max_bytes is not None and self.stats.bytes > self.max_bytes)):
            _, (_, size) = self._items.popitem(last=False)
            self.stats.bytes -= size
            self.stats.evictions += 1
        self.stats.entries = len(self._items)
