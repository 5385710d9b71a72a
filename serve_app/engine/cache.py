"""A bounded LRU of compiled constraints (bounded in entries and in bytes), with counters."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Sized(Protocol):
    size_bytes: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    compile_seconds: float = 0.0
    entries: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CompileCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.stats = CacheStats()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def get_or_compile(self, key: str, compile_fn: Callable[[], Any]) -> Any:
        """Return the cached item or compile it once, even when several threads ask at once."""
        item = self.get(key)
        if item is not None:
            self.stats.hits += 1
            return item
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            item = self.get(key)
            if item is not None:
                self.stats.hits += 1
                return item
            self.stats.misses += 1
            item = compile_fn()
            self.stats.compile_seconds += getattr(item, "compile_seconds", 0.0)
            self.put(key, item)
        with self._lock:
            self._key_locks.pop(key, None)
        return item

    def put(self, key: str, item: Sized) -> None:
        with self._lock:
            if key in self._items:
                self.stats.bytes -= self._items.pop(key).size_bytes
            self._items[key] = item
            self.stats.bytes += item.size_bytes
            self._evict()
            self.stats.entries = len(self._items)

    def _evict(self) -> None:
        while len(self._items) > 1 and (
            len(self._items) > self.max_entries or self.stats.bytes > self.max_bytes
        ):
            _, old = self._items.popitem(last=False)
            self.stats.bytes -= old.size_bytes
            self.stats.evictions += 1
